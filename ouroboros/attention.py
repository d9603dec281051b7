"""The "ouroboros" attention implementation for Hugging Face Llama models.

What this module replaces, and how (the transformers way, no monkey-patching):

* ``transformers.AttentionInterface.register("ouroboros", tree_attention_forward)``: a
  model whose ``config._attn_implementation`` is ``"ouroboros"`` (``from_pretrained(...,
  attn_implementation="ouroboros")`` or ``model.set_attn_implementation("ouroboros")``)
  calls `tree_attention_forward` in every attention layer.
* ``AttentionMaskInterface.register("ouroboros", ouroboros_mask)``: the mask builder
  delegates to transformers' SDPA mask. For a decoding step of the engine it returns None
  and materialises nothing: `ouroboros.cache.StaticKVCache` reports mask sizes for which
  SDPA's mask is skippable, and the tree attention reads the tree itself.

A decoding step of the engine passes a `TreeStep` as the forward's keyword argument
``ouroboros_tree=``; transformers hands the forward's extra kwargs to every attention
call. The step carries the prefix lengths, the packed tree mask (or the causal flag) and
the attention backend. Without it (ordinary ``model.generate()``, training, any caller
that does not know about trees) the attention is exactly transformers' SDPA attention with
the mask transformers built, so a switched model behaves as with ``attn_implementation=
"sdpa"``.

Backends: ``"triton"`` runs ``ouroboros_kernels.tree_attention`` (the Triton kernel on
CUDA, or under ``TRITON_INTERPRET=1`` on the CPU), ``"reference"`` runs PyTorch SDPA with the
tree mask expanded once per forward (same semantics as
``ouroboros_kernels.tree_attention_reference``). Default: Triton for CUDA tensors, the
reference for CPU tensors; ``OUROBOROS_ATTENTION_BACKEND`` or an explicit argument
overrides it.
"""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

import ouroboros_kernels
from ouroboros.config import ATTENTION_BACKENDS, backend_from_environment

__all__ = [
    "ATTENTION_NAME",
    "VERIFIED_ARCHITECTURES",
    "TreeStep",
    "check_architecture",
    "enable_ouroboros_attention",
    "ouroboros_mask",
    "register",
    "resolve_backend",
    "tree_attention_forward",
]

ATTENTION_NAME = "ouroboros"
# Architectures whose attention layers were checked against the engine (exactness tests).
VERIFIED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                          "Qwen3ForCausalLM", "GemmaForCausalLM", "Phi3ForCausalLM")


@dataclass
class TreeStep:
    """What one forward pass of the engine tells every attention layer.

    Attributes:
        prefix_lens: ``int32[B]``, committed rows of the static cache per sequence; the new
            tokens' K/V sit at ``[prefix_lens[b], prefix_lens[b] + T)``.
        tree_mask: ``int32[B or 1, T, ceil(T/32)]`` packed ancestor mask (bit j of row i: new
            token i sees new token j), or None with ``causal=True``.
        causal: the new tokens form one chain (prefill, plain decoding): causal mask among
            them, no mask read.
        backend: ``"triton"`` or ``"reference"``.
        max_prefix_len: host copy of ``max(prefix_lens)`` (the reference slices the cache
            with it, without reading the device).
    """

    prefix_lens: torch.Tensor
    tree_mask: torch.Tensor | None
    causal: bool
    backend: str
    max_prefix_len: int
    # Dense boolean mask of the reference backend, built by the first layer, reused by all.
    _dense_mask: torch.Tensor | None = field(default=None, repr=False)

    def dense_mask(self, num_new: int, device: torch.device) -> torch.Tensor:
        """``bool[B or 1, 1, T, max_prefix_len + T]``: what each new token may attend to."""
        if self._dense_mask is None:
            span = self.max_prefix_len + num_new
            rel = torch.arange(span, device=device)[None, :] \
                - self.prefix_lens.to(device=device, dtype=torch.int64)[:, None]  # [B, span]
            rows = torch.arange(num_new, device=device)
            if self.causal:
                visible = rel[:, None, :] <= rows[None, :, None]
            else:
                batch = rel.shape[0]
                bits = ouroboros_kernels.unpack_tree_mask(self.tree_mask, num_new)
                bits = bits.reshape(-1, num_new, num_new).expand(batch, num_new, num_new)
                visible = bits.gather(2, rel.clamp(0, num_new - 1)[:, None, :].expand(
                    batch, num_new, span))
            in_tree = (rel >= 0) & (rel < num_new)
            self._dense_mask = ((rel < 0)[:, None, :] | (visible & in_tree[:, None, :]))[:, None]
        return self._dense_mask


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """The attention backend for tensors on ``device``.

    Order: the explicit ``backend`` argument, then ``OUROBOROS_ATTENTION_BACKEND``, then the
    default (``"triton"`` on CUDA, ``"reference"`` on the CPU). Raises ValueError for an
    unknown name, and for ``"triton"`` on the CPU unless ``TRITON_INTERPRET=1`` (the Triton
    interpreter, which must be chosen before ``ouroboros_kernels`` is imported).
    """
    if backend is None:
        backend = backend_from_environment()
    if backend is None:
        return "triton" if device.type == "cuda" else "reference"
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend must be one of {ATTENTION_BACKENDS}, got "
                         f"{backend!r}")
    if backend == "triton" and device.type != "cuda" \
            and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise ValueError(f"attention backend 'triton' needs CUDA tensors or the Triton "
                         f"interpreter (TRITON_INTERPRET=1 before import); tensors are on "
                         f"{device}. Use backend 'reference' on the CPU.")
    return backend


def tree_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                           value: torch.Tensor, attention_mask: torch.Tensor | None,
                           scaling: float | None = None, dropout: float = 0.0,
                           **kwargs) -> tuple[torch.Tensor, None]:
    """Attention function registered as ``"ouroboros"`` (transformers' calling convention).

    Args:
        module: the attention layer (its ``num_key_value_groups`` and ``is_causal`` are read
            on the SDPA path).
        query: ``[B, Hq, T, D]`` new tokens' queries (RoPE applied).
        key, value: with a tree step, the static cache buffers ``[B, Hkv, S_max, D]`` in
            which the new rows are already written; otherwise whatever the cache returned.
        attention_mask: transformers' mask (None for engine steps).
        scaling: softmax scale (``1/sqrt(D)`` for Llama).
        kwargs: ``ouroboros_tree`` (a `TreeStep`) for engine steps; the rest is passed on to
            the SDPA path.

    Returns:
        ``(attn_output [B, T, Hq, D], None)``.
    """
    step = kwargs.pop("ouroboros_tree", None)
    if step is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      scaling=scaling, dropout=dropout, **kwargs)
    if module.training and dropout > 0.0:
        raise ValueError("ouroboros tree attention is for inference: no attention dropout")
    num_new = query.shape[2]
    if step.backend == "triton":
        output = ouroboros_kernels.tree_attention(
            query.transpose(1, 2), key, value, step.prefix_lens, step.tree_mask,
            causal=step.causal, scale=scaling)
        return output, None
    # Reference: SDPA over the live part of the cache, the tree mask expanded once per forward.
    span = step.max_prefix_len + num_new
    mask = step.dense_mask(num_new, query.device)
    output = F.scaled_dot_product_attention(
        query, key[:, :, :span], value[:, :, :span], attn_mask=mask, scale=scaling,
        enable_gqa=query.shape[1] != key.shape[1])
    return output.transpose(1, 2), None


def ouroboros_mask(*args, **kwargs) -> torch.Tensor | None:
    """Mask function registered as ``"ouroboros"``: transformers' SDPA mask, unchanged.

    For engine steps `StaticKVCache` reports ``kv_length == q_length`` and no padding mask
    is given, so SDPA's mask is skipped (None) and nothing ``[B, 1, T, S]`` is ever built;
    the tree attention takes its mask from the `TreeStep`. For everything else the mask is
    exactly the one SDPA attention would get.
    """
    return sdpa_mask(*args, **kwargs)


_REGISTERED = False


def register() -> None:
    """Register ``"ouroboros"`` with transformers' attention and mask interfaces (idempotent;
    done when `ouroboros` is imported)."""
    global _REGISTERED
    if not _REGISTERED:
        AttentionInterface.register(ATTENTION_NAME, tree_attention_forward)
        AttentionMaskInterface.register(ATTENTION_NAME, ouroboros_mask)
        _REGISTERED = True


def check_architecture(model: torch.nn.Module, name: str = "model", force: bool = False) -> None:
    """Raise ValueError unless ``model`` is a verified architecture (or ``force``)."""
    architecture = type(model).__name__
    check_features(model, name)
    if architecture in VERIFIED_ARCHITECTURES or force:
        return
    raise ValueError(
        f"{name} is a {architecture}; the ouroboros engine is verified for "
        f"{', '.join(VERIFIED_ARCHITECTURES)} only. Models with the same attention "
        f"may work: pass force=True (or "
        f"OuroborosConfig(force_architecture=True)) to try at your own risk.")


def sliding_window(model: torch.nn.Module) -> int | None:
    """The attention window the model applies in any layer (None: full attention)."""
    config = model.config
    window = getattr(config, "sliding_window", None)
    if window is None or getattr(config, "use_sliding_window", True) is False:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None
    return int(window)


def check_features(model: torch.nn.Module, name: str = "model",
                   length: int | None = None) -> None:
    """Raise ValueError for attention features the tree attention does not implement, even
    with ``force``: attention logit soft-capping, and a sliding window shorter than
    ``length`` (the prompt plus the new tokens; a longer window never takes effect)."""
    capping = getattr(model.config, "attn_logit_softcapping", None)
    if capping is not None:
        raise ValueError(f"{name} uses attn_logit_softcapping={capping}, which the ouroboros "
                         f"tree attention does not implement")
    window = sliding_window(model)
    if window is not None and length is not None and length >= window:
        raise ValueError(f"{name} attends within a sliding_window of {window} tokens, which "
                         f"the ouroboros tree attention does not implement; prompt + "
                         f"max_new_tokens ({length}) must stay below it")


def enable_ouroboros_attention(model: torch.nn.Module, *, force: bool = False) -> str:
    """Switch ``model`` to the ``"ouroboros"`` attention; returns the previous implementation.

    Ordinary calls of the model (``generate()``, forward without a tree step) keep SDPA's
    results; engine steps run the tree attention. Raises ValueError for an unverified
    architecture unless ``force``.
    """
    check_architecture(model, force=force)
    register()
    previous = model.config._attn_implementation
    if previous != ATTENTION_NAME:
        model.set_attn_implementation(ATTENTION_NAME)
    return previous


_SWITCH_LOCK = threading.Lock()
_SWITCHED: dict[int, list] = {}  # id(model) -> [users, previous implementation]


@contextlib.contextmanager
def ouroboros_attention(model: torch.nn.Module, *, force: bool = False):
    """The ``"ouroboros"`` attention for the duration of a ``with`` block, then the model's
    previous implementation again (so an ``eager`` model keeps eager's numerics and
    ``output_attentions`` outside the engine). Reference-counted per model: with several
    decoders on one model in several threads, the last one out restores it."""
    key = id(model)
    with _SWITCH_LOCK:
        entry = _SWITCHED.get(key)
        if entry is None:
            entry = _SWITCHED[key] = [0, enable_ouroboros_attention(model, force=force)]
        entry[0] += 1
    try:
        yield
    finally:
        with _SWITCH_LOCK:
            entry[0] -= 1
            if entry[0] == 0:
                del _SWITCHED[key]
                if entry[1] != ATTENTION_NAME:
                    model.set_attn_implementation(entry[1])


register()
