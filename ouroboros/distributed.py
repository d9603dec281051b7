"""Targets bigger than one device: tensor parallelism and layer placement.

See docs/architecture.md §6 ("Targets bigger than one device"). Two ways of spreading a target,
both as transformers loads them:

* **Tensor parallel** (``from_pretrained(..., tp_plan="auto")`` under ``torchrun``): every
  rank holds a slice of every layer (its share of the attention heads) and runs the whole
  engine itself. The ranks stay in lock-step without any collective of the engine's own:
  the model's all-reduces and the gathered ``lm_head`` give every rank the same logits,
  bit for bit, so every rank chooses the same tokens, builds the same trees and applies the
  same pool operations in the same order (the pool is identical on every rank). The draft
  runs replicated, each rank its own full copy (see ``benchmarks/bench_tp.py``: one
  draft pass costs the same on every rank, so rank 0 drafting alone and broadcasting the
  tokens would only add a broadcast per step). Each rank's KV cache holds only its own KV
  heads (`local_kv_heads`). `check_ranks_agree` compares the ranks' outputs after each
  ``generate`` (one small all-reduce) and raises if they ever differ; pool files are
  written by rank 0 only (`is_writer`, `barrier`).
* **Layer placement** (accelerate's ``device_map``, ``max_memory``): each decoder layer
  runs on its own device. `layer_devices` reads where each layer *executes* (a layer
  offloaded to ``"cpu"`` beside a GPU runs on the GPU, accelerate moving its weights there
  for each forward), and `ouroboros.cache.StaticKVCache` keeps one buffer per run of
  consecutive layers on one device (`device_groups`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

__all__ = [
    "barrier",
    "check_ranks_agree",
    "device_groups",
    "is_writer",
    "layer_devices",
    "local_kv_heads",
    "local_tensor",
    "tensor_parallel_group",
    "tensor_parallel_size",
]


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return None
    return DTensor


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``tensor`` (a ``DTensor``'s local shard; any other tensor as is)."""
    dtensor = _dtensor_type()
    if dtensor is not None and isinstance(tensor, dtensor):
        return tensor.to_local()
    return tensor


def tensor_parallel_size(model: torch.nn.Module) -> int:
    """The model's tensor-parallel degree (1: not tensor parallel).

    transformers records it as ``model.tp_size`` / ``model._tp_size`` (5.17 and 5.24);
    a model whose parameters are ``DTensor`` shards counts with its mesh's size."""
    for name in ("tp_size", "_tp_size"):
        try:
            size = getattr(model, name, None)
        except Exception:  # noqa: BLE001 - a property that fails means "not recorded"
            size = None
        if isinstance(size, int) and size > 1:
            return size
    dtensor = _dtensor_type()
    if dtensor is not None:
        for parameter in model.parameters():
            if isinstance(parameter, dtensor):
                return max(1, parameter.device_mesh.size())
    return 1


def tensor_parallel_group(model: torch.nn.Module):
    """The process group of the model's tensor parallelism, or None when it is not tensor
    parallel (or torch.distributed is not initialised)."""
    if tensor_parallel_size(model) == 1 or not torch.distributed.is_available() or \
            not torch.distributed.is_initialized():
        return None
    mesh = getattr(model, "_device_mesh", None) or getattr(model, "device_mesh", None)
    if mesh is not None and hasattr(mesh, "get_group"):
        names = getattr(mesh, "mesh_dim_names", None) or ()
        if mesh.ndim > 1 and "tp" in names:
            return mesh.get_group("tp")
        if mesh.ndim == 1:
            return mesh.get_group()
    return torch.distributed.group.WORLD


def is_writer(model: torch.nn.Module) -> bool:
    """Whether this process writes shared files for ``model``: always, unless the model is
    tensor parallel and this is not rank 0 of its group."""
    group = tensor_parallel_group(model)
    return group is None or torch.distributed.get_rank(group) == 0


def barrier(model: torch.nn.Module) -> None:
    """Wait for every rank of the model's tensor-parallel group (nothing when it has none)."""
    group = tensor_parallel_group(model)
    if group is not None:
        torch.distributed.barrier(group=group)


def _collective_device(model: torch.nn.Module, group) -> torch.device:
    backend = torch.distributed.get_backend(group)
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def check_ranks_agree(model: torch.nn.Module, tokens: Sequence[int]) -> None:
    """Raise RuntimeError unless every rank of the model's tensor-parallel group produced
    the same ``tokens`` (one all-reduce of a length and a 62-bit hash; nothing to do
    without tensor parallelism)."""
    group = tensor_parallel_group(model)
    if group is None:
        return
    digest = hashlib.blake2b(torch.tensor(list(tokens), dtype=torch.int64).numpy().tobytes(),
                             digest_size=8).digest()
    value = int.from_bytes(digest, "little") >> 2
    mine = torch.tensor([len(tokens), value], dtype=torch.int64)
    both = torch.cat([mine, -mine]).to(_collective_device(model, group))
    torch.distributed.all_reduce(both, op=torch.distributed.ReduceOp.MAX, group=group)
    high, low = both[:2].cpu(), -both[2:].cpu()
    if not torch.equal(high, low):
        raise RuntimeError(
            f"tensor-parallel ranks disagree on the generated text (rank "
            f"{torch.distributed.get_rank(group)}: {len(tokens)} tokens); every rank must "
            f"run generate with the same prompt and arguments, on models that compute "
            f"identical logits (deterministic kernels)")


# ============================================================================ geometry


def _attention_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """``(name, module)`` of each decoder layer's self-attention, in layer order."""
    found: dict[int, tuple[str, torch.nn.Module]] = {}
    for name, module in model.named_modules():
        layer = getattr(module, "layer_idx", None)
        if isinstance(layer, int) and not isinstance(layer, bool) and \
                type(module).__name__.endswith("Attention") and layer not in found:
            found[layer] = (name, module)
    return [found[i] for i in sorted(found)]


def local_kv_heads(model: torch.nn.Module, num_kv_heads: int, num_heads: int,
                   head_dim: int) -> int:
    """KV heads this process computes per layer: ``num_kv_heads`` (the config's) unless the
    model is tensor parallel, then what the local shard of ``k_proj`` (or a packed
    ``qkv_proj``) really produces, the same in every layer.

    Raises ValueError when a shard does not hold whole heads (a tensor-parallel degree that
    does not divide the KV heads)."""
    if tensor_parallel_size(model) == 1:
        return num_kv_heads
    counts = set()
    for name, attention in _attention_modules(model):
        k_proj = getattr(attention, "k_proj", None)
        qkv_proj = getattr(attention, "qkv_proj", None)
        if k_proj is not None and getattr(k_proj, "weight", None) is not None:
            rows = local_tensor(k_proj.weight).shape[0]
            if rows % head_dim:
                raise ValueError(
                    f"tensor parallel: {name}.k_proj holds {rows} output rows on this rank, "
                    f"not a whole number of {head_dim}-wide KV heads; use a tensor-parallel "
                    f"degree that divides num_key_value_heads ({num_kv_heads})")
            counts.add(rows // head_dim)
        elif qkv_proj is not None and getattr(qkv_proj, "weight", None) is not None:
            rows = local_tensor(qkv_proj.weight).shape[0]
            full = (num_heads + 2 * num_kv_heads) * head_dim
            if full % rows or num_kv_heads % (full // rows):
                raise ValueError(
                    f"tensor parallel: {name}.qkv_proj holds {rows} of {full} rows on this "
                    f"rank, not a whole share of the {num_kv_heads} KV heads")
            counts.add(num_kv_heads // (full // rows))
    if not counts:
        return num_kv_heads
    if len(counts) > 1:
        raise ValueError(f"tensor parallel: layers hold different numbers of KV heads on this "
                         f"rank ({sorted(counts)}); the static cache needs one")
    return counts.pop()


def _hook_device(module: torch.nn.Module) -> torch.device | None:
    """The execution device of an accelerate hook on ``module`` (None: no such hook)."""
    hook = getattr(module, "_hf_hook", None)
    hooks = list(getattr(hook, "hooks", ())) or ([hook] if hook is not None else [])
    for item in hooks:
        device = getattr(item, "execution_device", None)
        if device is not None:
            return torch.device("cuda", device) if isinstance(device, int) else \
                torch.device(device)
    return None


def layer_devices(model: torch.nn.Module, num_layers: int,
                  default: torch.device) -> list[torch.device]:
    """The device each decoder layer's attention runs on (where its K/V are computed).

    An accelerate hook on the attention module or an ancestor decides (nearest first: its
    ``execution_device``, which for layers offloaded to ``"cpu"`` or ``"disk"`` beside a GPU
    is that GPU); without hooks, the device of the attention's weights; ``default`` for
    layers not found."""
    modules = dict(model.named_modules())
    devices = [torch.device(default)] * num_layers
    for layer, (name, attention) in enumerate(_attention_modules(model)[:num_layers]):
        device = None
        parts = name.split(".") if name else []
        for depth in range(len(parts), -1, -1):
            module = modules.get(".".join(parts[:depth]))
            device = _hook_device(module) if module is not None else None
            if device is not None:
                break
        if device is None:
            parameter = next(attention.parameters(), None)
            if parameter is not None and parameter.device.type != "meta":
                device = local_tensor(parameter).device
        if device is not None:
            devices[layer] = device
    return devices


def device_groups(devices: Sequence[torch.device], max_layers: int | None = None
                  ) -> list[tuple[torch.device, int, int]]:
    """Split layers into runs of consecutive layers on one device: ``[(device, start,
    stop)]``; with ``max_layers``, no run is longer (tests use it to split a one-device
    model into several groups)."""
    if max_layers is not None and (isinstance(max_layers, bool) or
                                   not isinstance(max_layers, int) or max_layers < 1):
        raise ValueError(f"max_layers must be an int >= 1 or None, got {max_layers!r}")
    groups: list[tuple[torch.device, int, int]] = []
    for layer, device in enumerate(devices):
        device = torch.device(device)
        if groups and groups[-1][0] == device and \
                (max_layers is None or layer - groups[-1][1] < max_layers):
            groups[-1] = (device, groups[-1][1], layer + 1)
        else:
            groups.append((device, layer, layer + 1))
    return groups
