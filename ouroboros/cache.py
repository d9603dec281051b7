"""A static, preallocated KV cache for tree decoding, usable as a transformers ``Cache``.

All layers live in ONE tensor ``buffer: [num_layers, 2, B, Hkv, S_max, D]`` (dim 1: K, V),
so that after each acceptance ``ouroboros_kernels.compact_kv`` moves the accepted rows of
every layer in one launch. Per sequence, ``lengths[b]`` rows are committed.

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

import inspect

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

import ouroboros_kernels
from ouroboros.attention import TreeStep

__all__ = ["CacheOverflowError", "StaticKVCache", "cache_kwarg_name"]


class CacheOverflowError(ValueError):
    """The tokens of a step do not fit into the static cache (context overflow)."""


def cache_kwarg_name(model: torch.nn.Module) -> str:
    """Name of the forward's cache argument: ``cache`` (transformers >= 5.24) or
    ``past_key_values`` (earlier 5.x)."""
    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


class _StaticKVLayer(CacheLayerMixin):
    """One layer's view of a `StaticKVCache` (what transformers' ``Cache`` iterates over)."""

    is_compileable = False
    is_sliding = False

    def __init__(self, owner: StaticKVCache, layer_idx: int) -> None:
        super().__init__()
        self.owner = owner
        self.layer_idx = layer_idx
        self.keys = owner.buffer[layer_idx, 0]
        self.values = owner.buffer[layer_idx, 1]
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Nothing to do: the buffers are preallocated."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args,
               **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``key_states, value_states: [B, Hkv, T, D]`` at ``[lengths[b], lengths[b] +
        T)`` in place; return this layer's buffers ``[B, Hkv, S_max, D]``."""
        self.owner._write(self.keys, key_states)
        self.owner._write(self.values, value_states)
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # Reported so that transformers' SDPA mask builder skips the mask (see module doc).
        return query_length, 0

    def get_seq_length(self) -> int:
        return max(self.owner.host_lengths)

    def get_max_length(self) -> int:
        return self.owner.max_length

    def reset(self) -> None:
        self.owner.truncate(0)


class StaticKVCache(Cache):
    """Preallocated KV cache ``[num_layers, 2, B, Hkv, S_max, D]`` with per-sequence lengths.

    Args:
        num_layers, num_kv_heads, head_dim: the model's attention geometry.
        max_length: S_max, rows per sequence (prompt + new tokens + largest tree + margin).
        batch_size: B.
        dtype, device: of the buffer (the model's).

    Attributes:
        buffer: ``[num_layers, 2, B, Hkv, S_max, D]``, K at index 0 of dim 1, V at 1.
        lengths: ``int32[B]`` committed rows per sequence (on ``device``); ``host_lengths``
            is the same as a Python list (kept in step without reading the device).
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, max_length: int, *,
                 batch_size: int = 1, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> None:
        for name, value in (("num_layers", num_layers), ("num_kv_heads", num_kv_heads),
                            ("head_dim", head_dim), ("max_length", max_length),
                            ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        self.buffer = torch.zeros((num_layers, 2, batch_size, num_kv_heads, max_length,
                                   head_dim), dtype=dtype, device=device)
        self.lengths = torch.zeros(batch_size, dtype=torch.int32, device=self.buffer.device)
        self.host_lengths = [0] * batch_size
        self._positions = torch.arange(max_length, device=self.buffer.device)
        super().__init__(layers=[_StaticKVLayer(self, i) for i in range(num_layers)])

    @classmethod
    def for_model(cls, model: torch.nn.Module, max_length: int,
                  batch_size: int = 1) -> StaticKVCache:
        """A cache shaped for ``model`` (a Llama-like ``PreTrainedModel``), on its device and
        in its dtype."""
        layers, num_kv_heads, head_dim = cls.geometry(model)
        parameter = next(model.parameters())
        return cls(layers, num_kv_heads, head_dim, max_length,
                   batch_size=batch_size, dtype=parameter.dtype, device=parameter.device)

    @staticmethod
    def geometry(model: torch.nn.Module) -> tuple[int, int, int]:
        """``(layers, KV heads, head dim)`` of a Llama-like model's cache."""
        config = model.config
        head_dim = getattr(config, "head_dim", None) or \
            config.hidden_size // config.num_attention_heads
        num_kv_heads = getattr(config, "num_key_value_heads", None) or \
            config.num_attention_heads
        return config.num_hidden_layers, num_kv_heads, head_dim

    @classmethod
    def bytes_for(cls, model: torch.nn.Module, max_length: int, batch_size: int = 1) -> int:
        """Bytes of the buffer `for_model` would allocate, without allocating it."""
        layers, num_kv_heads, head_dim = cls.geometry(model)
        element = next(model.parameters()).element_size()
        return 2 * layers * batch_size * num_kv_heads * max_length * head_dim * element

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
                and self.buffer.dtype == dtype and self.buffer.device == torch.device(device))

    # ------------------------------------------------------------------ transformers API

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """transformers' entry point: see `_StaticKVLayer.update`."""
        return self.layers[layer_idx].update(key_states, value_states)

    def _write(self, buffer: torch.Tensor, states: torch.Tensor) -> None:
        num_new = states.shape[2]
        lengths = self.host_lengths
        start = lengths[0]
        if max(lengths) + num_new > self.max_length:
            raise CacheOverflowError(
                f"context overflow: {max(lengths)} cached + {num_new} new tokens exceed the "
                f"static cache's {self.max_length} rows")
        if all(length == start for length in lengths):
            buffer[:, :, start:start + num_new].copy_(states)
        else:  # sequences of different lengths: one scatter
            rows = (self.lengths.to(torch.int64)[:, None] + self._positions[:num_new])
            index = rows[:, None, :, None].expand_as(states)
            buffer.scatter_(2, index, states)

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
        return TreeStep(prefix_lens=self.lengths, tree_mask=tree_mask, causal=causal,
                        backend=backend, max_prefix_len=longest)

    def commit(self, num_pending: int, accepted_idx: torch.Tensor | None = None,
               accepted_len: torch.Tensor | None = None, host_accepted_len: int = 0,
               backend: str = "reference") -> None:
        """Keep the rows of the last forward's first ``num_pending`` tokens (a committed
        chain), then the accepted tree nodes' rows moved right behind them.

        Args:
            num_pending: rows kept as written (batch-uniform).
            accepted_idx: ``int32[B, A]`` accepted nodes, indices relative to the first row
                after the pending ones (as returned by ``ouroboros_kernels.accept_greedy``
                over the tree without the pending chain); None when nothing is accepted.
            accepted_len: ``int32[B]``.
            host_accepted_len: the same length as a Python int (batch 1), already read.
            backend: ``"triton"`` runs ``compact_kv`` (kernel), ``"reference"``
                ``compact_kv_reference``.
        """
        if num_pending:
            self.lengths += num_pending
            self.host_lengths = [n + num_pending for n in self.host_lengths]
        if accepted_idx is None or host_accepted_len == 0:
            return
        compact = ouroboros_kernels.compact_kv if backend == "triton" \
            else ouroboros_kernels.compact_kv_reference
        compact(self.buffer, self.lengths, accepted_idx, accepted_len)
        self.lengths += accepted_len.to(self.lengths.dtype)
        self.host_lengths = [n + host_accepted_len for n in self.host_lengths]

    def truncate(self, length: int) -> None:
        """Forget every row from ``length`` on (all sequences)."""
        if length < 0 or length > self.max_length:
            raise ValueError(f"length must lie in [0, {self.max_length}], got {length}")
        self.lengths.fill_(length)
        self.host_lengths = [length] * self.batch_size

    def reset(self) -> None:
        """Empty the cache (the buffer is kept)."""
        self.truncate(0)

    def __repr__(self) -> str:
        shape = "x".join(str(d) for d in self.buffer.shape)
        return (f"StaticKVCache(buffer={shape} {str(self.buffer.dtype).replace('torch.', '')}, "
                f"lengths={self.host_lengths})")
