"""Captured passes of the device step (``OuroborosConfig(step="device", compile=...)``).

The device step (`ouroboros.device_step`) runs passes of a few fixed shapes per batch size:
the draft's catch-up pass ``[B, L + 2]`` (tree mask), its one-token passes ``[B, 1]``
(causal) and the target's pass ``[B, T]`` (tree mask). This module runs those passes through
``torch.compile(dynamic=False, fullgraph=True)``; the prefill (any length) stays eager.

What makes the passes static (nothing host-side changes between steps, so each pass shape
compiles once and is never recompiled per step):

* **Attention over the whole buffer.** The compiled pass builds its own `TreeStep` with
  ``max_prefix_len = S_max - T`` and ``exact=False``: the reference attention then always
  attends over ``[0, S_max)`` with the dense mask built on the device from ``prefix_lens``
  (the cache's device lengths). The eager step slices ``[0, max(lengths) + T)``, a shape
  that changes every step. Rows past a sequence's committed length are masked out (they
  hold zeros or stale, finite K/V of uncommitted tokens).
* **Writes by the device lengths.** The model sees a `StaticCacheView` of the
  `StaticKVCache`'s buffer (the same tensor: writes land in the real cache) whose layers
  write the new K/V rows at ``[lengths[b], lengths[b] + T)`` (one ``index_put_`` on the
  whole buffer, done in place); nothing in the compiled region reads ``host_lengths`` (the
  overflow check, `StaticKVCache.tree_step`, runs before the pass, on the host).
  ``get_seq_length`` of the view is 0: transformers reads it only for the positions
  (always given here) and its own mask (unused by the tree attention).
* **Static cache sizes.** With ``compile`` on, the decoder rounds the static caches' rows up
  to a multiple of `CACHE_ROWS_STEP` (`cache_rows`), so calls with other prompt lengths
  reuse the compiled passes.

Modes (``OuroborosConfig.compile``): ``True`` (``"reduce-overhead"`` on CUDA, inductor's
default mode elsewhere), ``"default"`` (inductor), ``"reduce-overhead"`` (inductor with CUDA
graphs: the KV buffer is marked a static address, so the graphs write the real cache; the
logits are cloned out of the graph's memory), ``"aot_eager"`` (AOT autograd without
inductor: the same graphs, traced and checked but not code-generated; fast to compile, what
most tests use). The compiled passes always use the reference attention (SDPA with the dense
mask); the Triton tree-attention kernel is not called inside a captured graph.

Each new pass shape is compiled on its first call and announced on stderr with the seconds
it took (`compile_times` keeps them). Compiled code is kept by torch's cache for the life of
the process, per architecture and shape (the weights are inputs of the graphs): later calls,
other decoders and other models of the same shapes reuse it. Output is token-for-token
that of the eager step (``tests/test_compile.py``). ``TORCH_LOGS=recompiles`` shows why
each graph after the first was made: a new pass shape (``keep``, the batch size ``live``,
the cache rows), never a step; ``fullgraph=True`` makes a graph break an error.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from ouroboros.attention import TreeStep
from ouroboros.config import COMPILE_MODES

__all__ = ["CACHE_ROWS_STEP", "COMPILE_MODES", "CompiledPasses", "StaticCacheView",
           "cache_rows", "compile_times", "compiled_stepper", "graph_count", "resolve_mode"]

# Static caches are sized in multiples of this many rows when compiling (fewer shapes).
CACHE_ROWS_STEP = 64
# Entries per compiled function torch keeps before it falls back to eager: every pass shape
# of every batch size and model is one entry (torch's default, 8, is too few).
RECOMPILE_LIMIT = 256


def resolve_mode(compile: bool | str, device: torch.device) -> str:
    """The compile mode ``compile`` means on ``device`` (``True``: ``"reduce-overhead"``
    on CUDA, ``"default"`` elsewhere)."""
    if compile is True:
        return "reduce-overhead" if torch.device(device).type == "cuda" else "default"
    if compile not in COMPILE_MODES:
        raise ValueError(f"compile must be a bool or one of {COMPILE_MODES}, got {compile!r}")
    return compile


def cache_rows(rows: int) -> int:
    """``rows`` rounded up to a multiple of `CACHE_ROWS_STEP`."""
    return -(-rows // CACHE_ROWS_STEP) * CACHE_ROWS_STEP


# ============================================================================ the cache view


class _ViewLayer(CacheLayerMixin):
    """One layer of a `StaticCacheView`: writes by the device lengths, returns the layer's
    live buffers ``[B, Hkv, S_max, D]``."""

    is_compileable = True
    is_sliding = False

    def __init__(self, owner: StaticCacheView, layer_idx: int) -> None:
        super().__init__()
        self.owner = owner
        self.layer_idx = layer_idx
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Nothing to do: the buffers are preallocated."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args,
               **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``key_states, value_states: [B, Hkv, T, D]`` at rows ``[lengths[b],
        lengths[b] + T)`` of the buffer; return this layer's ``[B, Hkv, S_max, D]``.

        One ``index_put_`` on the whole buffer (not on a view of it): a mutation of a view
        of a graph input is functionalised into copies of the whole buffer, a direct one is
        done in place by inductor."""
        owner = self.owner
        batch, heads, num_new, _ = key_states.shape
        device = key_states.device
        rows = owner.lengths.to(torch.int64)[:, None] + \
            torch.arange(num_new, device=device)  # [B, T]
        index = (torch.full((), self.layer_idx, dtype=torch.int64, device=device),
                 torch.arange(2, device=device)[:, None, None, None],  # K, V
                 torch.arange(batch, device=device)[None, :, None, None],
                 torch.arange(heads, device=device)[None, None, :, None],
                 rows[None, :, None, :])
        owner.buffer.index_put_(index, torch.stack([key_states, value_states]))
        keys = owner.buffer[self.layer_idx, 0, :owner.live]
        values = owner.buffer[self.layer_idx, 1, :owner.live]
        return keys, values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return query_length, 0  # as StaticKVCache: transformers' mask is not needed

    def get_seq_length(self) -> int:
        return 0  # never read for positions: the engine passes them (module doc)

    def get_max_length(self) -> int:
        return self.owner.max_length

    def reset(self) -> None:
        raise RuntimeError("a StaticCacheView is reset through its StaticKVCache")


class StaticCacheView(Cache):
    """A transformers ``Cache`` over a `StaticKVCache`'s buffer for the compiled passes: the
    same buffer ``[num_layers, 2, B, Hkv, S_max, D]`` (``buffer``), its first ``live``
    sequences, written at the device lengths ``lengths: int32[live]`` (set before each
    pass); nothing here reads the host's lengths."""

    def __init__(self, cache) -> None:
        if cache.multi_device:
            raise ValueError("compile needs the model on one device (its static cache has "
                             "several device groups); use compile=False")
        self.buffer = cache.buffer
        self.live = cache.live
        self.max_length = cache.max_length
        self.lengths = cache.lengths
        super().__init__(layers=[_ViewLayer(self, i) for i in range(cache.buffer.shape[0])])


# ============================================================================ compiled passes


def _pass(model: torch.nn.Module, view: StaticCacheView, cache_kwarg: str,
          input_ids: torch.Tensor, positions: torch.Tensor, tree_mask: torch.Tensor | None,
          causal: bool, keep: int) -> torch.Tensor:
    """The compiled region: one forward of ``input_ids [B, T]`` at ``positions [B, T]``
    through ``view``; the logits of the last ``keep`` columns ``[B, keep, V]``."""
    num_new = input_ids.shape[1]
    step = TreeStep(prefix_lens=view.lengths, tree_mask=tree_mask, causal=causal,
                    backend="reference", max_prefix_len=view.max_length - num_new,
                    exact=False)
    output = model(input_ids=input_ids, position_ids=positions, use_cache=True,
                   logits_to_keep=keep, ouroboros_tree=step, **{cache_kwarg: view})
    return output.logits


_FUNCTIONS: dict[str, Callable] = {}
_TIMES: list[tuple[str, tuple[int, ...], float]] = []


def _function(mode: str) -> Callable:
    """The compiled `_pass` of one mode (one per process: torch caches its graphs per
    architecture and pass shape behind it)."""
    function = _FUNCTIONS.get(mode)
    if function is None:
        import torch._dynamo

        config = torch._dynamo.config
        config.recompile_limit = max(config.recompile_limit, RECOMPILE_LIMIT)
        config.accumulated_recompile_limit = max(config.accumulated_recompile_limit,
                                                 4 * RECOMPILE_LIMIT)
        if mode == "aot_eager":
            function = torch.compile(_pass, backend="aot_eager", dynamic=False,
                                     fullgraph=True)
        else:
            function = torch.compile(_pass, mode=mode, dynamic=False, fullgraph=True)
        _FUNCTIONS[mode] = function
    return function


def compile_times() -> list[tuple[str, tuple[int, ...], float]]:
    """``(label, shape, seconds)`` of every pass compiled in this process so far (label:
    ``"target"`` or ``"draft"`` and the mode)."""
    return list(_TIMES)


def graph_count() -> int:
    """Graphs torch.compile has produced in this process so far (all callers)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _uses_graphs(mode: str) -> bool:
    """Whether passes of ``mode`` are CUDA graphs (static buffer, outputs cloned)."""
    return mode == "reduce-overhead"


class CompiledPasses:
    """What `ouroboros.generate._call` runs instead of the eager forward for one runner
    (``ModelRunner.compiled``): the compiled pass over a `StaticCacheView` of its cache."""

    def __init__(self, name: str, mode: str) -> None:
        self.name, self.mode = name, mode
        self.function = _function(mode)
        self.graphs = _uses_graphs(mode)
        self._views: dict[tuple[int, int], StaticCacheView] = {}

    def _view(self, cache) -> StaticCacheView:
        key = (id(cache.buffer), cache.live)
        view = self._views.get(key)
        if view is None:
            view = self._views[key] = StaticCacheView(cache)
            if self.graphs:  # CUDA graphs write the real buffer, not a copy of it
                torch._dynamo.mark_static_address(cache.buffer)
        view.lengths = cache.lengths  # the live rows' device lengths (a view of one tensor)
        return view

    def __call__(self, runner, input_ids: torch.Tensor, positions: torch.Tensor,
                 tree_mask: torch.Tensor | None, causal: bool, keep: int) -> torch.Tensor:
        cache = runner.cache
        cache.tree_step(input_ids.shape[1], tree_mask, causal, runner.backend)  # room check
        view = self._view(cache)
        graphs = graph_count()
        start = time.perf_counter()
        if self.graphs:
            torch.compiler.cudagraph_mark_step_begin()
        logits = self.function(runner.model, view, runner.cache_kwarg, input_ids, positions,
                               tree_mask, causal, keep)
        if self.graphs:  # the graph's output memory is reused by its next replay
            logits = logits.clone()
        if graph_count() != graphs:  # this call compiled its shape
            seconds = time.perf_counter() - start
            shape = tuple(input_ids.shape)
            _TIMES.append((f"{self.name} {self.mode}", shape, seconds))
            kind = "causal" if causal else "tree"
            print(f"ouroboros: compiled the {self.name} pass [{shape[0]}, {shape[1]}] ({kind}, "
                  f"{view.max_length} cache rows, {self.mode}) in {seconds:.1f} s",
                  file=sys.stderr, flush=True)
        return logits


def compiled_stepper(mode: str) -> Callable:
    """``make_step`` for `ouroboros.generate.run_generation`: after the (eager) prefill,
    the session's runners get compiled passes, then the `DeviceStepper` runs as usual."""
    from ouroboros.device_step import DeviceStepper

    def make_step(session):
        session.target.compiled = CompiledPasses("target", mode)
        if session.draft is not None:
            session.draft.compiled = CompiledPasses("draft", mode)
        return DeviceStepper(session)

    return make_step
