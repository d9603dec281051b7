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
            with it, without reading the device), or an upper bound of it when ``exact`` is
            False (the reference then always masks by ``prefix_lens``).
        exact: whether ``max_prefix_len`` is the maximum itself.
    """

    prefix_lens: torch.Tensor
    tree_mask: torch.Tensor | None
    causal: bool
    backend: str
    max_prefix_len: int
    exact: bool = True
    # Masks of the reference backend, built by the first layer, reused by all.
    _dense_mask: torch.Tensor | None = field(default=None, repr=False)
    _stacked_bias: torch.Tensor | None = field(default=None, repr=False)

    def stacked_tree_bias(self, num_new: int, groups: int, like: torch.Tensor) -> torch.Tensor:
        """``[groups * T, T]`` additive mask (0 or ``-inf``, ``like``'s dtype) of the tree part
        for query rows stacked head-major (row ``g * T + i`` is tree row ``i``); batch 1."""
        if self._stacked_bias is None:
            if self.causal:
                visible = torch.ones(num_new, num_new, dtype=torch.bool,
                                     device=like.device).tril()
            else:
                visible = ouroboros_kernels.unpack_tree_mask(self.tree_mask, num_new)
                visible = visible.reshape(-1, num_new, num_new)[0]
            bias = torch.zeros(num_new, num_new, dtype=like.dtype, device=like.device)
            self._stacked_bias = bias.masked_fill_(~visible, float("-inf")).repeat(groups, 1)
        return self._stacked_bias

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
    return _reference_attention(step, query, key, value, scaling), None


# Prefixes at least this long are attended without a mask and merged with the tree part by
# log-sum-exp (`_split_attention`); below it one masked SDPA call is cheaper (measured on
# SmolLM2's shapes, one CPU thread: at 1,800 cached rows and 2-8 new tokens the split costs
# 65-80% of the masked call, at 256 rows 5-25% more).
SPLIT_MIN_PREFIX = 512
SPLIT_MAX_NEW = 64


def _reference_attention(step: TreeStep, query: torch.Tensor, key: torch.Tensor,
                         value: torch.Tensor, scaling: float | None) -> torch.Tensor:
    """The ``"reference"`` backend: ``query [B, Hq, T, D]`` over the cache buffers ``key,
    value [B, Hkv, S_max, D]`` -> ``[B, T, Hq, D]``.

    A prefill over an empty cache (any batch: every prefix is empty) is causal SDPA. Batch
    1 takes a path by shape: a long prefix with a small tree is `_split_attention`; one new
    token sees everything and needs no mask. Otherwise (several sequences of different
    lengths and trees, short prefixes, or a prefix length only bounded on the host: ``step.
    exact`` False) one SDPA call with the dense tree mask of the step.
    """
    num_new = query.shape[2]
    prefix = step.max_prefix_len
    span = prefix + num_new
    gqa = query.shape[1] != key.shape[1]
    uniform = query.shape[0] == 1 and step.exact
    if prefix == 0 and step.causal and step.exact:
        output = F.scaled_dot_product_attention(
            query, key[:, :, :num_new], value[:, :, :num_new], is_causal=True, scale=scaling,
            enable_gqa=gqa)
    elif uniform and prefix >= SPLIT_MIN_PREFIX and num_new <= SPLIT_MAX_NEW:
        output = _split_attention(step, query, key, value, scaling)
    elif uniform and num_new == 1:
        output = F.scaled_dot_product_attention(
            query, key[:, :, :span], value[:, :, :span], scale=scaling, enable_gqa=gqa)
    else:
        mask = step.dense_mask(num_new, query.device)
        output = F.scaled_dot_product_attention(
            query, key[:, :, :span], value[:, :, :span], attn_mask=mask, scale=scaling,
            enable_gqa=gqa)
    return output.transpose(1, 2)


def _split_attention(step: TreeStep, query: torch.Tensor, key: torch.Tensor,
                     value: torch.Tensor, scaling: float | None) -> torch.Tensor:
    """Batch-1 attention of T new tokens as two softmaxes merged by their log-sum-exps, as the
    Triton kernel does it: the cached prefix ``[0, P)`` without any mask (every new token
    sees all of it) and the tree part ``[P, P + T)`` with the tree mask.

    Grouped-query heads are stacked into the rows instead of copying K/V: the ``G = Hq / Hkv``
    query heads of a KV head become ``G * T`` query rows of that head (``query`` viewed as
    ``[1, Hkv, G * T, D]``), so both calls read each K/V row once. Returns ``[1, Hq, T, D]``.
    """
    batch, num_q_heads, num_new, head_dim = query.shape
    num_kv_heads = key.shape[1]
    groups = num_q_heads // num_kv_heads
    prefix = step.max_prefix_len
    stacked = query.reshape(batch, num_kv_heads, groups * num_new, head_dim)
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    out_prefix, lse_prefix = flash(stacked, key[:, :, :prefix], value[:, :, :prefix],
                                   scale=scaling)
    out_tree, lse_tree = flash(stacked, key[:, :, prefix:prefix + num_new],
                               value[:, :, prefix:prefix + num_new],
                               attn_mask=step.stacked_tree_bias(num_new, groups, query),
                               scale=scaling)
    # weight of the prefix part: exp(lse_prefix) / (exp(lse_prefix) + exp(lse_tree))
    weight = torch.sigmoid(lse_prefix - lse_tree).unsqueeze(-1).to(out_prefix.dtype)
    output = torch.lerp(out_tree, out_prefix, weight)
    return output.reshape(batch, num_q_heads, num_new, head_dim)


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
    return _switch(model, force)[0]


def _switch(model: torch.nn.Module, force: bool) -> tuple[str, list]:
    """Switch ``model`` and every config its modules read to the ``"ouroboros"`` attention.

    Returns the model's previous implementation and ``[(config, previous)]`` for the
    configs outside the model's own that had to be switched as well: a layer shared with
    another model (`ouroboros.models.truncated_draft` shares its parent's) reads that
    model's config, which ``set_attn_implementation`` does not reach, and would otherwise
    run SDPA on an engine step and give wrong tokens."""
    check_architecture(model, force=force)
    register()
    previous = model.config._attn_implementation
    if previous != ATTENTION_NAME:
        model.set_attn_implementation(ATTENTION_NAME)
    shared, seen = [], set()
    for module in model.modules():
        config = getattr(module, "config", None)
        if id(config) in seen or not hasattr(config, "_attn_implementation"):
            continue
        seen.add(id(config))
        if config._attn_implementation != ATTENTION_NAME:
            shared.append((config, config._attn_implementation))
            config._attn_implementation = ATTENTION_NAME
    return previous, shared


_SWITCH_LOCK = threading.Lock()
# id(model) -> [users, previous implementation, [(shared config, its previous)]]
_SWITCHED: dict[int, list] = {}


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
            entry = _SWITCHED[key] = [0, *_switch(model, force)]
        entry[0] += 1
    try:
        yield
    finally:
        with _SWITCH_LOCK:
            entry[0] -= 1
            if entry[0] == 0:
                del _SWITCHED[key]
                for config, previous in reversed(entry[2]):
                    config._attn_implementation = previous
                if entry[1] != ATTENTION_NAME:
                    model.set_attn_implementation(entry[1])


register()
