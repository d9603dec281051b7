"""A static, preallocated KV cache for tree decoding, usable as a transformers ``Cache``.

All layers live in ONE tensor ``buffer: [num_layers, 2, B, Hkv, S_max, D]`` (dim 1: K, V),
so that after each acceptance ``ouroboros_kernels.compact_kv`` moves the accepted rows of
every layer in one launch. Per sequence, ``lengths[b]`` rows are committed.

Targets bigger than one device (docs/architecture.md §6, `ouroboros.distributed`):

* tensor parallel: `StaticKVCache.geometry` counts the KV heads of this rank's shard of
  ``k_proj`` (not the config's full count), so each rank's cache holds only its own heads;
* layers on several devices (accelerate's ``device_map``): one buffer per *device group*
  (a run of consecutive layers executing on one device, `ouroboros.distributed.
  device_groups`), ``buffers[g]: [layers in g, 2, B, Hkv, S_max, D]`` on that device, one
  ``compact_kv`` per group. The lengths and the step's tree mask are mirrored on every
  group's device; just before a layer's attention runs (its ``update`` call) the step is
  pointed at that device's copies and, on CUDA, that device is made current (Triton
  launches on the current device); `forward_context` restores the current device after the
  forward. With one group (one device) none of this runs and nothing changes.

Protocol of one decoding step (driven by `ouroboros.generate`):

1. ``step = cache.tree_step(T, tree_mask, causal, backend)`` checks the room and describes
   the step for the attention (`ouroboros.attention.TreeStep`).
2. The model's forward runs with this cache and ``ouroboros_tree=step``. Each attention
   layer calls `StaticKVCache.update`, which writes the T new K/V rows at
   ``[lengths[b], lengths[b] + T)`` in place and returns that layer's whole buffers
   ``[B, Hkv, S_max, D]``; the tree attention reads the prefix lengths from the step.
   Nothing is concatenated and nothing is allocated.
3. ``cache.commit(num_pending, accepted_idx, accepted_len, host_accepted_len)`` keeps the
   first ``num_pending`` new rows (a chain of committed tokens), moves the accepted tree
   nodes' rows right behind them, and advances the lengths. ``cache.truncate(n)`` rolls
   back (the draft model's cache after a rejection).

Compatibility with transformers 5.17 and 5.24+ (checked by tests in both versions):

* Both versions' ``LlamaAttention`` call ``cache.update(k, v, layer_idx, ...)`` (5.24 adds
  ``kwargs=``; 5.17 passes nothing more), and both build the causal mask through
  ``cache.get_query_offset`` / ``cache.get_mask_sizes``. The cache argument is called
  ``past_key_values`` in 5.17 and ``cache`` in 5.24 (``past_key_values`` is deprecated
  there): `cache_kwarg_name` picks the right one from the model's signature.
* This class subclasses ``transformers.Cache`` with one `CacheLayerMixin` per layer (views
  into the shared buffer), so the base class's bookkeeping (``len``, ``is_sliding``, …)
  works unchanged in both versions.
* ``get_mask_sizes`` reports ``(q_length, 0)``: with no padding mask, transformers' SDPA
  mask builder then returns None instead of materialising ``[B, 1, T, S]`` per step. The
  attention masks itself from the tree step, so this cache must only be used with the
  ``"ouroboros"`` attention and a `TreeStep` (the engine does both).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

import ouroboros_kernels
from ouroboros.attention import TreeStep
from ouroboros.distributed import device_groups, layer_devices, local_kv_heads

__all__ = ["CacheOverflowError", "StaticKVCache", "cache_kwarg_name"]


class CacheOverflowError(ValueError):
    """The tokens of a step do not fit into the static cache (context overflow)."""


def _uniform(counts: int | list[int]) -> int | list[int]:
    """One int for a list whose counts are all equal (the cheaper in-place update)."""
    if isinstance(counts, int) or not counts or any(c != counts[0] for c in counts):
        return counts
    return counts[0]


def cache_kwarg_name(model: torch.nn.Module) -> str:
    """Name of the forward's cache argument: ``cache`` (transformers >= 5.24) or
    ``past_key_values`` (earlier 5.x)."""
    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


class _StaticKVLayer(CacheLayerMixin):
    """One layer's view of a `StaticKVCache` (what transformers' ``Cache`` iterates over)."""

    is_compileable = False
    is_sliding = False

    def __init__(self, owner: StaticKVCache, layer_idx: int, group: _DeviceGroup) -> None:
        super().__init__()
        self.owner = owner
        self.layer_idx = layer_idx
        self.group = group
        self.keys = group.buffer[layer_idx - group.start, 0]
        self.values = group.buffer[layer_idx - group.start, 1]
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Nothing to do: the buffers are preallocated."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args,
               **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``key_states, value_states: [B, Hkv, T, D]`` at ``[lengths[b], lengths[b] +
        T)`` in place; return this layer's buffers ``[B, Hkv, S_max, D]``."""
        owner = self.owner
        if owner.multi_device:
            owner._enter_group(self.group, self.layer_idx, key_states.device)
        live = owner.live
        keys, values = (self.keys, self.values) if live == owner.batch_size else \
            (self.keys[:live], self.values[:live])
        owner._write(self.group, keys, key_states)
        owner._write(self.group, values, value_states)
        return keys, values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # Reported so that transformers' SDPA mask builder skips the mask (see module doc).
        return query_length, 0

    def get_seq_length(self) -> int:
        return max(self.owner.host_lengths)

    def get_max_length(self) -> int:
        return self.owner.max_length

    def reset(self) -> None:
        self.owner.truncate(0)


# The step's private fields: what the attention builds once per forward on the device of the
# first layer that needs it (masks) and reuses; kept per device group.
_STEP_CACHES = tuple(f.name for f in dataclasses.fields(TreeStep) if f.name.startswith("_"))


def _copy_to(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device`` (itself when it is there; asynchronously only towards a GPU:
    a host copy must be complete when it is read)."""
    if tensor.device == device:
        return tensor
    return tensor.to(device, non_blocking=device.type == "cuda")


@dataclass(eq=False)
class _DeviceGroup:
    """Layers ``[start, stop)`` of a `StaticKVCache`, whose rows live on ``device``."""

    index: int
    device: torch.device
    start: int
    stop: int
    buffer: torch.Tensor  # [stop - start, 2, B, Hkv, S_max, D]
    lengths: torch.Tensor  # int32[live] on device (the cache's own ``lengths`` on its device)
    positions: torch.Tensor  # arange(S_max) on device
    all_lengths: torch.Tensor  # int32[B]: ``lengths`` is its first ``live``


class StaticKVCache(Cache):
    """Preallocated KV cache ``[num_layers, 2, B, Hkv, S_max, D]`` with per-sequence lengths.

    Args:
        num_layers, num_kv_heads, head_dim: the model's attention geometry (under tensor
            parallelism: this rank's KV heads).
        max_length: S_max, rows per sequence (prompt + new tokens + largest tree + margin).
        batch_size: B.
        dtype, device: of the buffer (the model's); ``device`` is also where ``lengths``
            and the engine's own tensors live (`StaticKVCache.device`).
        layer_devices: the device each layer runs on (default: all on ``device``);
            consecutive layers on one device share one buffer (a device group).
        max_group_layers: at most this many layers per group (None: no limit).
        mirror_groups: give every group of several its own copies of the lengths and of
            the step's tensors even on ``device`` (what groups on other devices get): lets
            the tests run that bookkeeping on one CPU.

    Attributes:
        buffer: ``[num_layers, 2, B, Hkv, S_max, D]``, K at index 0 of dim 1, V at 1 (with
            several device groups: the first group's buffer; ``buffers`` has them all).
        lengths: ``int32[B]`` committed rows per sequence (on ``device``); ``host_lengths``
            is the same as a Python list (kept in step without reading the device), or,
            after `commit_on_device` (``host_exact`` False), an upper bound of each.
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, max_length: int, *,
                 batch_size: int = 1, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu",
                 layer_devices: list[torch.device | str] | None = None,
                 max_group_layers: int | None = None, mirror_groups: bool = False) -> None:
        for name, value in (("num_layers", num_layers), ("num_kv_heads", num_kv_heads),
                            ("head_dim", head_dim), ("max_length", max_length),
                            ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if layer_devices is None:
            layer_devices = [device] * num_layers
        if len(layer_devices) != num_layers:
            raise ValueError(f"layer_devices names {len(layer_devices)} devices for "
                             f"{num_layers} layers")
        self._all_lengths = torch.zeros(batch_size, dtype=torch.int32, device=device)
        self.lengths = self._all_lengths
        self.device = self.lengths.device
        self.host_lengths = [0] * batch_size
        # False after `commit_on_device`: ``host_lengths`` are then upper bounds, not the
        # lengths (`truncate` and `keep_rows`' lengths make them exact again).
        self.host_exact = True
        self.live = batch_size  # sequences in use: rows [0, live) of the batch dimension
        self.groups: list[_DeviceGroup] = []
        plan = device_groups(layer_devices, max_group_layers)
        mirror_groups = mirror_groups and len(plan) > 1
        for index, (group_device, start, stop) in enumerate(plan):
            buffer = torch.zeros((stop - start, 2, batch_size, num_kv_heads, max_length,
                                  head_dim), dtype=dtype, device=group_device)
            lengths = self.lengths if buffer.device == self.device and not mirror_groups \
                else torch.zeros(batch_size, dtype=torch.int32, device=buffer.device)
            self.groups.append(_DeviceGroup(index, buffer.device, start, stop, buffer,
                                            lengths,
                                            torch.arange(max_length, device=buffer.device),
                                            lengths))
        self.buffers = [group.buffer for group in self.groups]
        self.buffer = self.buffers[0]
        # Several groups: one compaction each, the step's tensors per group (module doc).
        self.multi_device = len(self.groups) > 1 or self.groups[0].device != self.device
        self._step: TreeStep | None = None
        self._step_group = -1  # the group whose tensors the step holds (-1: the cache's own)
        self._step_tensors: dict[int, dict] = {}
        layers = [_StaticKVLayer(self, i, group) for group in self.groups
                  for i in range(group.start, group.stop)]
        super().__init__(layers=layers)

    @classmethod
    def for_model(cls, model: torch.nn.Module, max_length: int, batch_size: int = 1, *,
                  max_group_layers: int | None = None,
                  mirror_groups: bool = False) -> StaticKVCache:
        """A cache shaped for ``model`` (a Llama-like ``PreTrainedModel``), in its dtype: its
        lengths on the device of its first parameter, each layer's rows on the device that
        layer runs on (`ouroboros.distributed.layer_devices`: one device, or the placement of
        accelerate's ``device_map``), only this rank's KV heads under tensor parallelism."""
        layers, num_kv_heads, head_dim = cls.geometry(model)
        parameter = next(model.parameters())
        return cls(layers, num_kv_heads, head_dim, max_length,
                   batch_size=batch_size, dtype=parameter.dtype, device=parameter.device,
                   layer_devices=layer_devices(model, layers, parameter.device),
                   max_group_layers=max_group_layers, mirror_groups=mirror_groups)

    @staticmethod
    def geometry(model: torch.nn.Module) -> tuple[int, int, int]:
        """``(layers, KV heads, head dim)`` of a Llama-like model's cache; under tensor
        parallelism the KV heads of this rank's shard (`ouroboros.distributed.
        local_kv_heads`)."""
        config = model.config
        head_dim = getattr(config, "head_dim", None) or \
            config.hidden_size // config.num_attention_heads
        num_kv_heads = getattr(config, "num_key_value_heads", None) or \
            config.num_attention_heads
        num_kv_heads = local_kv_heads(model, num_kv_heads, config.num_attention_heads,
                                      head_dim)
        return config.num_hidden_layers, num_kv_heads, head_dim

    @classmethod
    def bytes_for(cls, model: torch.nn.Module, max_length: int, batch_size: int = 1) -> int:
        """Bytes of the buffers `for_model` would allocate (all devices), without
        allocating them."""
        return sum(cls.bytes_per_device(model, max_length, batch_size).values())

    @classmethod
    def bytes_per_device(cls, model: torch.nn.Module, max_length: int,
                         batch_size: int = 1) -> dict[torch.device, int]:
        """Bytes `for_model` would allocate on each device, without allocating them."""
        layers, num_kv_heads, head_dim = cls.geometry(model)
        parameter = next(model.parameters())
        per_layer = 2 * batch_size * num_kv_heads * max_length * head_dim * \
            parameter.element_size()
        need: dict[torch.device, int] = {}
        for device in layer_devices(model, layers, parameter.device):
            need[device] = need.get(device, 0) + per_layer
        return need

    @property
    def nbytes(self) -> int:
        """Bytes of all buffers."""
        return sum(buffer.numel() * buffer.element_size() for buffer in self.buffers)

    # ------------------------------------------------------------------ geometry

    @property
    def max_length(self) -> int:
        """S_max, rows per sequence."""
        return self.buffer.shape[4]

    @property
    def batch_size(self) -> int:
        return self.buffer.shape[2]

    def fits(self, batch_size: int, max_length: int, dtype: torch.dtype,
             device: torch.device) -> bool:
        """Whether this cache can serve a request of that size (for reuse across calls)."""
        return (self.batch_size == batch_size and self.max_length >= max_length
                and self.buffer.dtype == dtype and self.device == torch.device(device))

    # ------------------------------------------------------------------ transformers API

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """transformers' entry point: see `_StaticKVLayer.update`."""
        return self.layers[layer_idx].update(key_states, value_states)

    def _write(self, group: _DeviceGroup, buffer: torch.Tensor, states: torch.Tensor) -> None:
        num_new = states.shape[2]
        lengths = self.host_lengths
        start = lengths[0]
        if max(lengths) + num_new > self.max_length:
            raise CacheOverflowError(
                f"context overflow: {max(lengths)} cached + {num_new} new tokens exceed the "
                f"static cache's {self.max_length} rows")
        if self.host_exact and all(length == start for length in lengths):
            buffer[:, :, start:start + num_new].copy_(states)
        else:  # sequences of different lengths: one scatter
            rows = (group.lengths.to(torch.int64)[:, None] + group.positions[:num_new])
            index = rows[:, None, :, None].expand_as(states)
            buffer.scatter_(2, index, states)

    # ------------------------------------------------------------------ several devices

    def _enter_group(self, group: _DeviceGroup, layer_idx: int, device: torch.device) -> None:
        """Before layer ``layer_idx`` attends: point the step at its device's tensors and,
        on CUDA, make that device current (see the module doc)."""
        if device != group.device:
            raise RuntimeError(
                f"layer {layer_idx} computed its keys on {device}, but its cache rows were "
                f"placed on {group.device} (from where the model's layers ran when the cache "
                f"was made); build the decoder again after moving or re-dispatching the model")
        step = self._step
        if step is not None and group.index != self._step_group:
            saved = self._step_tensors[self._step_group]
            for name in _STEP_CACHES:  # what the attention built on the last group's device
                saved[name] = getattr(step, name)
            tensors = self._step_tensors.get(group.index)
            if tensors is None:
                own = self._step_tensors[-1]
                if group.lengths is self.lengths:  # on the cache's device, not mirrored
                    tensors = own
                else:
                    mask = own["tree_mask"]
                    tensors = {"prefix_lens": group.lengths, "tree_mask": None if mask is None
                               else _copy_to(mask, group.device)}
                    tensors.update(dict.fromkeys(_STEP_CACHES))
                self._step_tensors[group.index] = tensors
            for name, value in tensors.items():
                setattr(step, name, value)
            self._step_group = group.index
        if group.device.type == "cuda" and torch.cuda.current_device() != group.device.index:
            torch.cuda.set_device(group.device)

    def forward_context(self) -> contextlib.AbstractContextManager:
        """Wrap the model's forward in this: with layers on several CUDA devices, the
        current CUDA device is restored after it (the layers switch it); otherwise nothing."""
        if self.multi_device and any(group.device.type == "cuda" for group in self.groups):
            return torch.cuda.device(torch.cuda.current_device())
        return contextlib.nullcontext()

    def _sync_lengths(self) -> None:
        for group in self.groups:
            if group.lengths is not self.lengths:
                # Asynchronous only towards a GPU: a host copy must be complete when read.
                group.lengths.copy_(self.lengths, non_blocking=group.device.type == "cuda")

    # ------------------------------------------------------------------ engine API

    def tree_step(self, num_new: int, tree_mask: torch.Tensor | None, causal: bool,
                  backend: str) -> TreeStep:
        """Describe a forward pass of ``num_new`` tokens for the attention layers.

        Raises `CacheOverflowError` when they do not fit behind the committed rows.
        """
        longest = max(self.host_lengths)
        if longest + num_new > self.max_length:
            raise CacheOverflowError(
                f"context overflow: {longest} cached + {num_new} new tokens exceed the static "
                f"cache's {self.max_length} rows")
        step = TreeStep(prefix_lens=self.lengths, tree_mask=tree_mask, causal=causal,
                        backend=backend, max_prefix_len=longest, exact=self.host_exact)
        if self.multi_device:
            self._step, self._step_group = step, -1
            self._step_tensors = {-1: {"prefix_lens": self.lengths, "tree_mask": tree_mask,
                                       **dict.fromkeys(_STEP_CACHES)}}
        return step

    def commit(self, num_pending: int | list[int], accepted_idx: torch.Tensor | None = None,
               accepted_len: torch.Tensor | None = None,
               host_accepted_len: int | list[int] = 0, backend: str = "reference") -> None:
        """Keep the rows of the last forward's first ``num_pending`` tokens (a committed
        chain), then the accepted tree nodes' rows moved right behind them.

        Args:
            num_pending: rows kept as written: one count for every live sequence, or a list
                of one count per live sequence.
            accepted_idx: ``int32[live, A]`` accepted nodes, indices relative to the first row
                after the sequence's pending ones (as returned by
                ``ouroboros_kernels.accept_greedy`` over the tree without the pending chain);
                None when nothing is accepted.
            accepted_len: ``int32[live]``.
            host_accepted_len: the same lengths on the host, already read: one int (batch
                1, or the same for every sequence) or a list per sequence.
            backend: ``"triton"`` runs ``compact_kv`` (kernel), ``"reference"``
                ``compact_kv_reference``.
        """
        if not self.host_exact:
            raise RuntimeError("commit needs exact host lengths: truncate the cache after "
                               "commit_on_device")
        self._step = None
        num_pending = _uniform(num_pending)
        if isinstance(num_pending, int):
            if num_pending:
                self.lengths += num_pending
                self.host_lengths = [n + num_pending for n in self.host_lengths]
        else:
            self._store_lengths([n + p for n, p in zip(self.host_lengths, num_pending,
                                                       strict=True)])
        if isinstance(host_accepted_len, int):
            host_accepted = [host_accepted_len] * self.live
        else:
            host_accepted = list(host_accepted_len)
        if accepted_idx is None or not any(host_accepted):
            if self.multi_device:
                self._sync_lengths()
            return
        self._compact(accepted_idx, accepted_len, backend)
        self.host_lengths = [n + a for n, a in zip(self.host_lengths, host_accepted,
                                                   strict=True)]

    def commit_on_device(self, num_pending: torch.Tensor, accepted_idx: torch.Tensor,
                         accepted_len: torch.Tensor, bounds: list[int],
                         backend: str = "reference") -> None:
        """`commit` without the host: ``num_pending: int[live]`` rows kept as written, then
        the accepted nodes ``accepted_idx: int32[live, A]`` (relative to the first row after
        the pending ones, -1 padded) of ``accepted_len: int32[live]`` moved behind them, all
        on the device. The host lengths become the upper bounds ``bounds`` (one per live
        sequence; ``host_exact`` is False) until `truncate` sets exact lengths again: the
        forward passes in between write with one scatter and attend with the mask."""
        if len(bounds) != self.live:
            raise ValueError(f"commit_on_device got {len(bounds)} bounds for {self.live} "
                             f"sequences")
        self._step = None
        self.lengths += num_pending.to(self.lengths.dtype)
        self._compact(accepted_idx, accepted_len, backend)  # mirrors the lengths first
        self.host_lengths = [min(int(bound), self.max_length) for bound in bounds]
        self.host_exact = False

    def _compact(self, accepted_idx: torch.Tensor, accepted_len: torch.Tensor,
                 backend: str) -> None:
        """Move the accepted rows behind the committed ones (``compact_kv``: one launch per
        device group) and add ``accepted_len`` to the device lengths."""
        compact = ouroboros_kernels.compact_kv if backend == "triton" \
            else ouroboros_kernels.compact_kv_reference
        if not self.multi_device:
            compact(self._live_buffer(self.buffer), self.lengths, accepted_idx, accepted_len)
        else:
            self._sync_lengths()
            for group in self.groups:  # one launch per device group, on its device
                guard = torch.cuda.device(group.device) if group.device.type == "cuda" \
                    else contextlib.nullcontext()
                with guard:
                    compact(self._live_buffer(group.buffer), group.lengths,
                            _copy_to(accepted_idx, group.device),
                            _copy_to(accepted_len, group.device))
        self.lengths += accepted_len.to(self.lengths.dtype)
        if self.multi_device:
            self._sync_lengths()

    def _live_buffer(self, buffer: torch.Tensor) -> torch.Tensor:
        return buffer if self.live == buffer.shape[2] else buffer[:, :, :self.live]

    def _store_lengths(self, lengths: list[int]) -> None:
        """Set the live sequences' lengths, on the host and on the device."""
        self.host_lengths = list(lengths)
        self.host_exact = True
        if lengths:
            self.lengths.copy_(torch.tensor(lengths, dtype=self.lengths.dtype),
                               non_blocking=self.device.type == "cuda")

    def truncate(self, length: int | list[int]) -> None:
        """Forget every row from ``length`` on: one length for all live sequences, or a
        list of one per live sequence."""
        lengths = [length] * self.live if isinstance(length, int) else list(length)
        if len(lengths) != self.live:
            raise ValueError(f"truncate got {len(lengths)} lengths for {self.live} sequences")
        for value in lengths:
            if value < 0 or value > self.max_length:
                raise ValueError(f"length must lie in [0, {self.max_length}], got {value}")
        self._step = None
        length = _uniform(length)
        if isinstance(length, int):
            self.lengths.fill_(length)
            self.host_lengths = lengths
            self.host_exact = True
        else:
            self._store_lengths(lengths)
        self._sync_lengths()

    def keep_rows(self, rows: list[int]) -> None:
        """Keep only the live sequences ``rows`` (increasing indices), renumbered ``0 ..
        len(rows) - 1``: their committed K/V rows move down the batch dimension (finished
        sequences of a batch stop costing compute). `reset` brings back the full batch."""
        if list(rows) != sorted(set(rows)) or (rows and not 0 <= rows[0] <= rows[-1] <
                                               self.live):
            raise ValueError(f"rows must be increasing indices in [0, {self.live}), got "
                             f"{rows}")
        if not self.host_exact:
            raise RuntimeError("keep_rows needs exact host lengths: truncate the cache after "
                               "commit_on_device")
        self._step = None
        for new, old in enumerate(rows):
            if new != old:  # new < old: a source is never overwritten before it is read
                count = self.host_lengths[old]
                for buffer in self.buffers:
                    buffer[:, :, new, :, :count].copy_(buffer[:, :, old, :, :count])
        self._set_live([self.host_lengths[r] for r in rows])

    def _set_live(self, lengths: list[int]) -> None:
        self.live = len(lengths)
        self.lengths = self._all_lengths[:self.live]
        self._store_lengths(lengths)
        for group in self.groups:
            if group.all_lengths is self._all_lengths:
                group.lengths = self.lengths
            else:
                group.lengths = group.all_lengths[:self.live]
        self._sync_lengths()

    def reset(self) -> None:
        """Empty the cache, every sequence of the batch live again (the buffer is kept)."""
        self._set_live([0] * self.batch_size)

    def __repr__(self) -> str:
        shapes = ", ".join("x".join(str(d) for d in buffer.shape) +
                           ("" if len(self.buffers) == 1 else f" on {buffer.device}")
                           for buffer in self.buffers)
        return (f"StaticKVCache(buffer={shapes} {str(self.buffer.dtype).replace('torch.', '')}, "
                f"lengths={self.host_lengths})")
