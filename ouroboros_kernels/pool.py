"""The candidate pool: n-gram phrases keyed by token, with LRU recency, on any device.

``CandidatePool`` wraps the compiled ops ``torch.ops.ouroboros_kernels.pool_insert``,
``pool_lookup`` and ``pool_refine`` (C++ on the CPU, CUDA on the GPU; identical results
for the same op sequence). State is three plain tensors:

* ``phrases``: int32 ``[V, W, L]`` (an empty slot holds -1s),
* ``stamps``:  int64 ``[V, W]`` recency stamps (0 = empty slot),
* ``clock``:   int64 ``[1]`` stamps handed out so far, kept on the pool's device so no
  operation ever needs a host synchronisation.

On the CPU, ``phrases`` and ``stamps`` are strided views of one buffer that keeps each key's
stamps, an index of its slots' first tokens and its phrases together (one run of cache
lines per key; see ``CandidatePool._allocate``); on CUDA they are contiguous tensors.

Semantics (see ``csrc/pool.h`` for the complete statement):

* ``insert`` applies its entries in index order; entry ``i`` gets stamp ``clock + i + 1``.
  A phrase already under its key becomes the most recent; a new phrase takes the
  lowest-index empty slot, else evicts the least recent slot.
* ``lookup`` returns the ``k`` most recent phrases of each key, newest first, with their
  slot indices; rows past the count hold -1. Reads never change recency.
* ``refine`` overwrites a slot's phrase in place (recency unchanged); if the new phrase is
  already under that key in another slot, the refined slot is emptied instead. Refining an
  empty slot does nothing.
* ``-1`` marks padding: a key of -1, a slot of -1, or a phrase containing -1 makes the
  entry a no-op (a lookup of key -1 returns count 0). Callers can therefore pass
  fixed-size batches. Any other out-of-range value raises ``ValueError`` on the CPU; on
  CUDA the op cannot raise without a host sync and skips such entries, unless the call
  passes ``validate=True`` (which syncs).

Argument policy: ``keys`` may be int64 or int32 (int32 costs one small conversion);
``phrases``/``tokens`` int32 or int64; ``slots`` int32 or int64. All must be on the
pool's device. Bad arguments raise ValueError/TypeError naming the argument; the checks
never read device data (so never synchronise) unless ``validate=True``.
"""

from __future__ import annotations

import functools
import json
import os
import re
import stat
import tempfile
import time
import zlib
from typing import Any, NamedTuple

import torch

from ._ext import load_extension

__all__ = ["CandidatePool", "PoolFileError", "PoolLookup", "cuda_insert_cached"]

FORMAT_NAME = "ouroboros-candidate-pool"
FORMAT_VERSION = 1

_INDEX_DTYPES = (torch.int64, torch.int32)
_STATE_NAMES = ("phrases", "stamps", "clock")


class PoolFileError(ValueError):
    """A pool file is unreadable, corrupt, of another format version, or does not match."""


class PoolLookup(NamedTuple):
    """Result of :meth:`CandidatePool.lookup` (unpacks as a 3-tuple).

    phrases: int32 ``[M, k, L]``, newest first, -1 rows past ``counts``.
    counts:  int32 ``[M]``, number of valid rows per key (``<= min(k, W)``).
    slots:   int32 ``[M, k]``, slot index of each row (for :meth:`CandidatePool.refine`),
             -1 past ``counts``.
    """

    phrases: torch.Tensor
    counts: torch.Tensor
    slots: torch.Tensor


_make_lookup = tuple.__new__  # PoolLookup from the op's 3-tuple without re-packing
_is_compiling = torch.compiler.is_compiling


def _bind(name: str, *state: Any) -> tuple[Any, Any]:
    """The pool op ``name`` with its leading state arguments bound, twice: the extension's
    direct twin ``_C.<name>`` (the eager path, no dispatcher overhead; same positional
    arguments, and the lookups also take three result buffers) and the registered
    ``torch.ops.ouroboros_kernels.<name>`` (used while torch.compile traces)."""
    direct = getattr(load_extension(), name)
    op = getattr(torch.ops.ouroboros_kernels, name).default
    return functools.partial(direct, *state), functools.partial(op, *state)


def cuda_insert_cached(enabled: bool | None = None) -> bool:
    """Query (and with ``enabled``, set) the experimental CUDA insert path, process-wide.

    With it, the warp that owns a key keeps the key's W stamps and phrases in registers
    while it applies all of a batch's entries for that key (W <= 32, L <= 8; otherwise the
    default path runs), instead of two global-memory round trips per entry. Same results
    (the GPU tests compare both with the CPU op); off by default until measured on a GPU
    (``benchmarks/bench_pool.py`` times both). Enabling it needs the CUDA build.
    """
    module = load_extension()
    if enabled is not None:
        if not isinstance(enabled, bool):
            raise TypeError(f"enabled: expected a bool, got {type(enabled).__name__}")
        if not module.built_with_cuda:
            if enabled:
                raise ValueError("enabled: the extension was built without CUDA")
            return False
        module.set_cuda_insert_cached(enabled)
    return bool(module.cuda_insert_cached()) if module.built_with_cuda else False


_HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14  # Linux


def _advise_huge_pages(tensor: torch.Tensor) -> None:
    """Ask Linux to back a large CPU tensor with transparent huge pages (before its pages
    are first touched). Keys are looked up at random across a pool of tens of MB, so with
    4 KiB pages nearly every access misses the TLB; 2 MiB pages remove most of that.
    Best effort: silently nothing where madvise or THP is unavailable."""
    if tensor.device.type != "cpu" or tensor.nbytes < 2 * _HUGE_PAGE:
        return
    global _madvise
    if _madvise is None:
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
            _madvise = libc.madvise
        except (OSError, AttributeError):
            _madvise = False
    if not _madvise:
        return
    start = -(-tensor.data_ptr() // _HUGE_PAGE) * _HUGE_PAGE
    end = (tensor.data_ptr() + tensor.nbytes) // _HUGE_PAGE * _HUGE_PAGE
    if end > start:
        _madvise(start, end - start, _MADV_HUGEPAGE)


_madvise: Any = None


def _state_tensor(shape: tuple[int, ...], dtype: torch.dtype,
                  device: torch.device) -> torch.Tensor:
    """An uninitialised state tensor, on the CPU advised to use huge pages."""
    tensor = torch.empty(shape, dtype=dtype, device=device)
    _advise_huge_pages(tensor)
    return tensor


def _require_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value}")
    return value


def _index_tensor(name: str, value: Any, ndim: int, device: torch.device) -> torch.Tensor:
    """Type/dtype/rank/device checks on metadata only (cheap; never syncs)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in _INDEX_DTYPES:
        raise TypeError(f"{name}: expected an int64 or int32 tensor, got {value.dtype}")
    if value.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor, got shape {tuple(value.shape)}")
    if value.device != device:
        raise ValueError(f"{name}: on {value.device}, but the pool is on {device}")
    return value


def _lookup_buffers(out: Any) -> PoolLookup:
    """``out`` of :meth:`CandidatePool.lookup` as a PoolLookup of three tensors (shapes,
    dtypes and devices are checked by the op)."""
    if isinstance(out, PoolLookup):
        return out
    if not isinstance(out, (tuple, list)) or len(out) != 3:
        raise TypeError("out: expected a PoolLookup (phrases, counts, slots) of tensors, got "
                        f"{type(out).__name__}")
    for name, buffer in zip(PoolLookup._fields, out, strict=True):
        if not isinstance(buffer, torch.Tensor):
            raise TypeError(f"out.{name}: expected a torch.Tensor, got {type(buffer).__name__}")
    return PoolLookup(*out)


def _check_range(name: str, values: torch.Tensor, upper: int) -> None:
    """Values must be -1 (padding) or in [0, upper). Reads the data (syncs on CUDA)."""
    if values.numel() == 0:
        return
    bad = values < -1
    if upper <= torch.iinfo(values.dtype).max:  # int32 values can't exceed 2**31 - 1
        bad |= values >= upper
    if bool(bad.any()):
        first = values[bad].flatten()[0].item()
        raise ValueError(f"{name}: holds {first}; expected values in [0, {upper}) or -1 "
                         "for padding")


class CandidatePool:
    """N-gram candidate pool with W slots of L-token phrases for each of V key tokens.

    Args:
        vocab_size: V, number of keys (token ids ``0 .. V-1``).
        capacity: W, phrases kept per key (least recently inserted is evicted).
        phrase_len: L, tokens per phrase (an n-gram of level N = L + 1 minus its key).
        device: where the state lives (default CPU). Every argument must be on it.

    Memory: about ``V * W * (4 * L + 12)`` bytes on the CPU (a key's record is padded to
    64 bytes; it is advised to use transparent huge pages, since keys are read at random
    across tens of MB), ``V * W * (4 * L + 8)`` on CUDA.
    """

    def __init__(self, vocab_size: int, capacity: int, phrase_len: int,
                 device: torch.device | str | None = None) -> None:
        _require_int("vocab_size", vocab_size, 1)
        _require_int("capacity", capacity, 1)
        _require_int("phrase_len", phrase_len, 1)
        load_extension()
        device = torch.device("cpu") if device is None else torch.device(device)
        self._allocate(vocab_size, capacity, phrase_len, device)

    @torch.inference_mode(False)
    def _allocate(self, V: int, W: int, L: int, device: torch.device) -> None:
        """Empty state on ``device`` (ordinary tensors, with version counters, even when
        the pool is made under ``torch.inference_mode``).

        On the CPU the state of one key is one record of a single buffer: its W stamps
        (int64), an index of the W first tokens (int32, -1 = empty) and its W phrases
        (int32 [W, L]), padded to a multiple of 64 bytes. An insert then reads one
        contiguous run of cache lines per key (stamps and first tokens) and a single
        phrase, instead of a stamps row and a whole phrase row in two distant tensors
        (the insert is bound by cache misses; see benchmarks/bench_pool.py). The
        documented state tensors are strided views of that buffer. On CUDA the state is
        three contiguous tensors (the kernels there read them coalesced).
        """
        self._clock = torch.zeros(1, dtype=torch.int64, device=device)
        if device.type == "cpu":
            row = -(-(3 * W + W * L) // 16) * 16  # int32 per key
            record = _state_tensor((V, row), torch.int32, device)
            record.fill_(-1)
            self._record: torch.Tensor | None = record
            self._stamps = record.view(torch.int64)[:, :W]
            self._stamps.zero_()
            self._first_tokens: torch.Tensor | None = record[:, 2 * W:3 * W]
            self._phrases = record[:, 3 * W:3 * W + W * L].unflatten(1, (W, L))
            self._index_version = record._version
            # The packed ops, bound to the one buffer (compiling, the torch ops mutate that
            # buffer, not dtype views of it, which AOTAutograd needs).
            suffix, insert_state, state = "_packed", (record, self._clock, W, L), (record, W, L)
        else:
            self._record = self._first_tokens = None
            self._phrases = _state_tensor((V, W, L), torch.int32, device).fill_(-1)
            self._stamps = _state_tensor((V, W), torch.int64, device).zero_()
            state = (self._phrases, self._stamps)
            suffix, insert_state = "", (*state, self._clock)
        # Called with the step's arguments only: (keys, phrases) / (keys, k[, *out]) /
        # (keys, slots, phrases).
        self._insert, self._insert_op = _bind("pool_insert" + suffix, *insert_state)
        self._lookup, self._lookup_op = _bind("pool_lookup" + suffix, *state)
        self._refine, self._refine_op = _bind("pool_refine" + suffix, *state)
        self._device = self._phrases.device  # normalised, e.g. cuda -> cuda:0

    def _sync_index(self) -> None:
        """Rebuild the CPU first-token index if the state was written from outside the
        packed ops (through :meth:`state_dict` views, or by the generic ops, which bump
        the version counter; the packed ops write through raw pointers and keep it)."""
        record = self._record
        if record is not None and record._version != self._index_version:
            self._first_tokens.copy_(self._phrases[:, :, 0])
            self._index_version = record._version

    # ------------------------------------------------------------------ properties

    @property
    def vocab_size(self) -> int:
        return self._phrases.shape[0]

    @property
    def capacity(self) -> int:
        return self._phrases.shape[1]

    @property
    def phrase_len(self) -> int:
        return self._phrases.shape[2]

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def nbytes(self) -> int:
        """Bytes held by the state (on the CPU including the first-token index and the
        records' padding)."""
        tensors = ((self._phrases, self._stamps) if self._record is None else
                   (self._record,)) + (self._clock,)
        return sum(t.numel() * t.element_size() for t in tensors)

    def __repr__(self) -> str:
        return (f"CandidatePool(vocab_size={self.vocab_size}, capacity={self.capacity}, "
                f"phrase_len={self.phrase_len}, device='{self.device}')")

    def num_phrases(self) -> int:
        """Number of phrases stored (all keys). Reads the state: syncs on CUDA."""
        return int(torch.count_nonzero(self._stamps).item())

    # ------------------------------------------------------------------ ops

    # The hot path calls the compiled function directly: it checks dtypes, shapes, devices
    # (and, on the CPU, values) itself and raises ValueError/TypeError naming the argument.
    # Only when it fails are the arguments examined here, to report a non-tensor argument
    # or a device mismatch as clearly as everything else. No check ever reads device data
    # unless validate=True.

    def _diagnose(self, keys: Any, k: Any = None, slots: Any = None,
                  phrases: Any = None) -> None:
        """Raise the clearest error for bad arguments (or return if none is found here)."""
        keys = _index_tensor("keys", keys, 1, self._device)
        M = keys.shape[0]
        if k is not None:
            _require_int("k", k, 1)
        if slots is not None:
            slots = _index_tensor("slots", slots, 1, self._device)
            if slots.shape[0] != M:
                raise ValueError(f"slots: expected shape [{M}] ([M]), got {tuple(slots.shape)}")
        if phrases is not None:
            phrases = _index_tensor("phrases", phrases, 2, self._device)
            if tuple(phrases.shape) != (M, self.phrase_len):
                raise ValueError(f"phrases: expected shape [{M}, {self.phrase_len}] ([M, L]), "
                                 f"got {tuple(phrases.shape)}")

    def _validate(self, keys: Any, k: Any = None, slots: Any = None,
                  phrases: Any = None, out: Any = None) -> None:
        """validate=True: all checks, including the values of device tensors (syncs)."""
        self._diagnose(keys, k, slots, phrases)
        if out is not None:
            _lookup_buffers(out)
        _check_range("keys", keys, self.vocab_size)
        if slots is not None:
            _check_range("slots", slots, self.capacity)
        if phrases is not None:
            _check_range("phrases", phrases, 2**31)

    def lookup(self, keys: torch.Tensor, k: int, *, out: PoolLookup | None = None,
               validate: bool = False) -> PoolLookup:
        """The ``k`` most recent phrases of each key, newest first.

        Args:
            keys: int64 or int32 ``[M]`` key tokens; -1 = padding (count 0).
            k: rows per key, ``k >= 1`` (``k > W`` allowed: the extra rows are -1).
            out: optional buffers to write the result into instead of allocating it, as
                made by :meth:`empty_lookup` (``M`` and ``k`` must match): contiguous
                int32 tensors on the pool's device of shapes ``[M, k, L]``, ``[M]``,
                ``[M, k]``. A caller that looks up the same ``(M, k)`` every step can
                reuse them (each call overwrites them entirely); this skips three
                allocations per call.
            validate: also range-check ``keys`` on CUDA (syncs). The CPU op always checks.
        Returns:
            ``PoolLookup(phrases int32 [M, k, L], counts int32 [M], slots int32 [M, k])``;
            rows past ``counts`` are -1. Recency is not changed. With ``out``, ``out``
            itself (as a PoolLookup).
        """
        if out.__class__ is PoolLookup and k.__class__ is int and not validate \
                and not _is_compiling():
            # The engine's per-step path, kept short: the op checks everything itself.
            try:
                self._lookup(keys, k, *out)
            except (TypeError, ValueError):
                self._diagnose(keys, k=k)
                raise
            return out
        if validate:
            self._validate(keys, k=k, out=out)
        elif k.__class__ is not int:
            _require_int("k", k, 1)
        compiling = _is_compiling()
        try:
            if out is None:
                lookup = self._lookup_op if compiling else self._lookup
                return _make_lookup(PoolLookup, lookup(keys, k))
            if out.__class__ is not PoolLookup:
                out = _lookup_buffers(out)
            if compiling:
                for buffer, value in zip(out, self._lookup_op(keys, k), strict=True):
                    buffer.copy_(value)
            else:
                self._lookup(keys, k, *out)
            return out
        except (TypeError, ValueError):
            self._diagnose(keys, k=k)
            raise

    def empty_lookup(self, num_keys: int, k: int) -> PoolLookup:
        """Uninitialised result buffers for ``lookup(keys, k, out=...)`` with ``num_keys``
        keys: int32 ``[num_keys, k, L]``, ``[num_keys]``, ``[num_keys, k]`` on the pool's
        device."""
        _require_int("num_keys", num_keys, 0)
        _require_int("k", k, 1)
        empty = self._phrases.new_empty
        return PoolLookup(empty((num_keys, k, self.phrase_len)), empty((num_keys,)),
                          empty((num_keys, k)))

    def insert(self, keys: torch.Tensor, phrases: torch.Tensor, *,
               validate: bool = False) -> None:
        """Insert ``phrases[i]`` under ``keys[i]`` for i in order (LRU; see module doc).

        Args:
            keys: int64 or int32 ``[M]``; -1 = padding (entry skipped).
            phrases: int32 or int64 ``[M, L]``; a row containing -1 is padding.
            validate: also range-check the arguments on CUDA (syncs).
        """
        if validate:
            self._validate(keys, phrases=phrases)
        try:
            if _is_compiling():
                self._insert_op(keys, phrases)
            else:
                self._sync_index()
                self._insert(keys, phrases)
        except (TypeError, ValueError):
            self._diagnose(keys, phrases=phrases)
            raise

    def refine(self, keys: torch.Tensor, slots: torch.Tensor, phrases: torch.Tensor, *,
               validate: bool = False) -> None:
        """Overwrite the phrase in slot ``slots[i]`` of ``keys[i]``, for i in order.

        The slot keeps its recency. If ``phrases[i]`` is already under that key in
        another slot, the refined slot is emptied instead (phrases stay distinct).
        Refining an empty slot does nothing.

        Args:
            keys: int64 or int32 ``[M]``; -1 = padding.
            slots: int32 or int64 ``[M]`` in ``[0, W)`` (as returned by :meth:`lookup`);
                -1 = padding.
            phrases: int32 or int64 ``[M, L]``; a row containing -1 is padding.
            validate: also range-check the arguments on CUDA (syncs).
        """
        if validate:
            self._validate(keys, slots=slots, phrases=phrases)
        try:
            if _is_compiling():
                self._refine_op(keys, slots, phrases)
            else:
                self._sync_index()
                self._refine(keys, slots, phrases)
        except (TypeError, ValueError):
            self._diagnose(keys, slots=slots, phrases=phrases)
            raise

    def insert_ngrams(self, tokens: torch.Tensor, n: int | None = None) -> None:
        """Insert every n-gram of a token sequence: key ``tokens[t]``, phrase
        ``tokens[t+1 : t+1+L]``, in sequence order (later occurrences are more recent).

        Args:
            tokens: int64 (or int32) ``[S]`` on the pool's device. Fewer than ``n`` tokens
                insert nothing.
            n: n-gram level; defaults to and must equal ``phrase_len + 1``.
        """
        tokens = _index_tensor("tokens", tokens, 1, self._device)
        L = self.phrase_len
        if n is not None:
            _require_int("n", n, 2)
            if n != L + 1:
                raise ValueError(f"n: this pool stores {L}-token phrases, so n must be "
                                 f"{L + 1}, got {n}")
        count = tokens.shape[0] - L
        if count <= 0:
            return
        phrases = tokens.unfold(0, L, 1)[1:]  # [count, L]: window t+1 .. t+L for key t
        if _is_compiling():
            self._insert_op(tokens[:count], phrases)
        else:
            self._sync_index()
            self._insert(tokens[:count], phrases)

    def clear(self) -> None:
        """Empty every slot and reset the clock (no reallocation)."""
        self._phrases.fill_(-1)
        self._stamps.zero_()
        self._clock.zero_()
        self._sync_index()

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The live state tensors (not copies): ``phrases`` int32 [V, W, L], ``stamps``
        int64 [V, W], ``clock`` int64 [1]. On the CPU ``phrases`` and ``stamps`` are
        strided views of the pool's one buffer (not contiguous). Writing into them in
        place (or with the generic ``torch.ops.ouroboros_kernels.pool_*`` ops) is allowed:
        the pool notices and rebuilds its first-token index; :meth:`load_state_dict` is
        the checked way to set a state."""
        return {"phrases": self._phrases, "stamps": self._stamps, "clock": self._clock}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Copy a state (as from :meth:`state_dict`) into this pool, after validating its
        keys, shapes, dtypes and values (raises ValueError/TypeError)."""
        if not isinstance(state, dict):
            raise TypeError(f"state: expected a dict, got {type(state).__name__}")
        _validate_state(state, (self.vocab_size, self.capacity, self.phrase_len))
        self._assign(state)

    def _assign(self, state: dict[str, torch.Tensor]) -> None:
        """Copy a validated state in (any device), then make the index agree."""
        self._phrases.copy_(state["phrases"])
        self._stamps.copy_(state["stamps"])
        self._clock.copy_(state["clock"])
        self._sync_index()

    def to(self, device: torch.device | str) -> CandidatePool:
        """Move the state to ``device`` (in place, like ``nn.Module.to``); returns self."""
        device = torch.device(device)
        if device.type == self._device.type and (device.index is None
                                                 or device.index == self._device.index):
            return self
        state = self.state_dict()
        self._allocate(self.vocab_size, self.capacity, self.phrase_len, device)
        self._assign(state)
        return self

    def save(self, path: str | os.PathLike) -> None:
        """Write the pool to ``path`` (safetensors) atomically.

        The data goes to a temporary file ``.<name>.<pid>.<random>.tmp`` in the same
        directory, is fsynced, given the mode of the file it replaces (else
        ``0o666 & ~umask``) and renamed over ``path``. A failure at any point removes the
        temporary file and leaves an existing file untouched; temporary files left by
        killed saves are removed by the next save.
        """
        from safetensors.torch import save_file

        tensors = {name: t.detach().to("cpu").contiguous()
                   for name, t in self.state_dict().items()}
        metadata = {
            "format": FORMAT_NAME,
            "format_version": str(FORMAT_VERSION),
            "vocab_size": str(self.vocab_size),
            "capacity": str(self.capacity),
            "phrase_len": str(self.phrase_len),
            "crc32": str(_crc32(tensors)),
        }
        path = os.fspath(path)
        directory = os.path.dirname(os.path.abspath(path))
        name = os.path.basename(path)
        _remove_stale_temp_files(directory, name)
        mode = _file_mode(path)
        fd, tmp_path = tempfile.mkstemp(prefix=f".{name}.{os.getpid()}.", suffix=".tmp",
                                        dir=directory)
        os.close(fd)
        replaced = False
        try:
            save_file(tensors, tmp_path, metadata=metadata)
            with open(tmp_path, "rb") as f:
                os.fsync(f.fileno())
            os.chmod(tmp_path, mode)  # mkstemp creates 0600
            os.replace(tmp_path, path)
            replaced = True
        finally:
            if not replaced:
                try:
                    os.unlink(tmp_path)
                except OSError:
                    pass
        try:  # make the rename itself durable
            dir_fd = os.open(directory, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(dir_fd)
        except OSError:
            pass
        finally:
            os.close(dir_fd)

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str | None = None, *,
             vocab_size: int | None = None, capacity: int | None = None,
             phrase_len: int | None = None) -> CandidatePool:
        """Read a pool written by :meth:`save` onto ``device`` (default CPU).

        The file is read once, whole, and parsed from memory, so a load racing a save
        sees the old or the new file, never a mix. ``vocab_size``/``capacity``/
        ``phrase_len``, when given, must match the file. Raises ``FileNotFoundError`` if
        there is no file and :class:`PoolFileError` (a ValueError) if it is unreadable,
        truncated, corrupt (including phrase tokens outside ``[0, vocab_size)``), of
        another format version, or does not match.
        """
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"pool file not found: {path}")
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise FileNotFoundError(f"pool file not found: {path}") from None
        except OSError as err:
            raise PoolFileError(f"{path}: not a readable pool file ({err})") from err
        try:
            metadata, tensors = _parse_safetensors(data)
        except Exception as err:  # safetensors raises its own error types
            raise PoolFileError(f"{path}: not a readable pool file ({err})") from err
        names = set(tensors)

        def fail(message: str) -> PoolFileError:
            return PoolFileError(f"{path}: {message}")

        if metadata.get("format") != FORMAT_NAME:
            raise fail(f"not an {FORMAT_NAME} file (format={metadata.get('format')!r})")
        if metadata.get("format_version") != str(FORMAT_VERSION):
            raise fail(f"format version {metadata.get('format_version')!r} is not supported "
                       f"(this version reads {FORMAT_VERSION})")
        if names != set(_STATE_NAMES):
            raise fail(f"expected tensors {sorted(_STATE_NAMES)}, found {sorted(names)}")
        try:
            dims = tuple(int(metadata[name]) for name in ("vocab_size", "capacity",
                                                          "phrase_len"))
            crc = int(metadata["crc32"])
        except (KeyError, ValueError) as err:
            raise fail(f"bad or missing metadata ({err})") from err
        for name, expected in zip(("vocab_size", "capacity", "phrase_len"),
                                  (vocab_size, capacity, phrase_len), strict=True):
            if expected is not None and expected != int(metadata[name]):
                raise fail(f"{name} is {metadata[name]}, expected {expected}")
        try:
            _validate_state(tensors, dims)
        except (ValueError, TypeError) as err:
            raise fail(str(err)) from err
        if _crc32(tensors) != crc:
            raise fail("checksum mismatch: the file is corrupt")
        # An intact file can still hold tokens past the vocabulary (set through
        # load_state_dict: the ops accept any token), and a token >= V would index past
        # the model's vocabulary in generate.
        phrases = tensors["phrases"]
        if phrases.numel() and int(phrases.max()) >= dims[0]:
            key, slot, _ = (phrases >= dims[0]).nonzero()[0].tolist()
            raise fail(f"phrase of key {key} (slot {slot}) holds token "
                       f"{int(phrases[key, slot].max())}, outside the vocabulary "
                       f"[0, {dims[0]})")
        pool = cls(*dims, device="cpu" if device is None else device)
        pool._assign(tensors)
        return pool


_STALE_TEMP_AGE_S = 600.0  # a temp file untouched this long is a dead save's, whatever its pid


def _parse_safetensors(data: bytes) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(metadata, tensors) of a safetensors file's bytes."""
    from safetensors.torch import load

    if len(data) < 8:
        raise ValueError(f"{len(data)} bytes, too short for a safetensors header")
    size = int.from_bytes(data[:8], "little")
    if size > len(data) - 8:
        raise ValueError(f"header of {size} bytes past the end of the file")
    header = json.loads(data[8:8 + size])
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict):
        raise ValueError("__metadata__ is not a mapping")
    return {str(k): v for k, v in metadata.items()}, load(data)


def _file_mode(path: str) -> int:
    """Permission bits for a file saved at ``path``: the existing file's, else the
    umask's ``0o666 & ~umask``."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        pass
    return 0o666 & ~_umask()


def _umask() -> int:
    """The process umask, read without changing it where Linux allows."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # (briefly process-wide elsewhere)
    os.umask(mask)
    return mask


def _pid_alive(pid: int) -> bool:
    if os.name != "posix":  # os.kill(pid, 0) would terminate the process on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. EPERM: it exists, owned by someone else
        return True
    return True


def _remove_stale_temp_files(directory: str, name: str) -> None:
    """Best effort: remove ``.<name>.<pid>.<random>.tmp`` files in ``directory`` left by
    saves that died (their pid is gone, or the file is older than _STALE_TEMP_AGE_S)."""
    pattern = re.compile(rf"\.{re.escape(name)}\.(\d+)\.[A-Za-z0-9_]+\.tmp")
    try:
        entries = os.listdir(directory)
    except OSError:
        return
    now = time.time()
    for entry in entries:
        match = pattern.fullmatch(entry)
        if match is None:
            continue
        full = os.path.join(directory, entry)
        try:
            pid = int(match.group(1))
            stale = (now - os.lstat(full).st_mtime > _STALE_TEMP_AGE_S
                     or (pid != os.getpid() and not _pid_alive(pid)))
            if stale:
                os.unlink(full)
        except (OSError, ValueError, OverflowError):
            pass


def _crc32(tensors: dict[str, torch.Tensor]) -> int:
    crc = 0
    for name in _STATE_NAMES:
        crc = zlib.crc32(tensors[name].contiguous().numpy().view("uint8").data, crc)
    return crc


def _validate_state(state: dict[str, Any], dims: tuple[int, int, int]) -> None:
    """Check a pool state's names, dtypes, shapes and values; raise ValueError/TypeError."""
    V, W, L = dims
    missing = [name for name in _STATE_NAMES if name not in state]
    if missing:
        raise ValueError(f"state: missing {missing}")
    specs = {"phrases": (torch.int32, (V, W, L)), "stamps": (torch.int64, (V, W)),
             "clock": (torch.int64, (1,))}
    for name, (dtype, shape) in specs.items():
        t = state[name]
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"state[{name!r}]: expected a tensor, got {type(t).__name__}")
        if t.dtype != dtype:
            raise TypeError(f"state[{name!r}]: expected {dtype}, got {t.dtype}")
        if tuple(t.shape) != shape:
            raise ValueError(f"state[{name!r}]: expected shape {list(shape)}, got "
                             f"{list(t.shape)}")
    phrases = state["phrases"].to("cpu")
    stamps = state["stamps"].to("cpu")
    clock = int(state["clock"].to("cpu")[0])
    occupied = stamps != 0
    if bool((stamps < 0).any()):
        raise ValueError("state['stamps']: negative stamp")
    if clock < 0 or (stamps.numel() and int(stamps.max()) > clock):
        raise ValueError("state['clock']: smaller than a stamp (or negative)")
    if bool((phrases[~occupied] != -1).any()):
        raise ValueError("state['phrases']: an empty slot (stamp 0) holds a phrase")
    if bool((phrases[occupied] < 0).any()):
        raise ValueError("state['phrases']: an occupied slot holds a negative token")
    # Phrases of one key must be distinct: compare all slot pairs, a block of keys at a time.
    off_diagonal = ~torch.eye(W, dtype=torch.bool)
    block = max(1, (1 << 24) // max(1, W * W * L))
    for start in range(0, V, block):
        p = phrases[start:start + block]
        occ = occupied[start:start + block]
        same = (p[:, :, None, :] == p[:, None, :, :]).all(-1)
        same &= occ[:, :, None] & occ[:, None, :] & off_diagonal
        if bool(same.any()):
            key = start + int(same.flatten(1).any(1).nonzero()[0])
            raise ValueError(f"state['phrases']: key {key} holds the same phrase twice")
