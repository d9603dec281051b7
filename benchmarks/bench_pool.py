"""Candidate-pool microbenchmark: time per decoding step of a realistic op stream.

One step of Ouroboros decoding touches the pool like this (the stream replayed here):

* 4 lookups of one key each, k drawn from 3..16 (draft phrase lookups and the suffix
  lookup for the target's tree),
* 1 refine batch of 1..4 entries: suffixes of the last lookup overwritten by the target's
  corrected version (slots taken from that lookup's result),
* 1 insert batch of 100..400 n-grams (inspiration from the target's predictions and the
  newly accepted text).

Keys and phrases come from a synthetic token stream with a Zipf distribution and copied
spans, so n-grams recur, hot keys fill up and evict, like real text. Every pool is first
warm-started with the n-grams of a long stretch of that text (as a pool carried over from
earlier prompts), then runs untimed steps.

Compared per step (each pool replays the same steps; every timed step is measured on all
pools in turn, in an order rotated every step, and the median is reported):

* the compiled CPU op, through ``CandidatePool`` (argument checks and Python overhead
  included), lookups writing into result buffers reused every step (``out=``), and the same
  with lookups allocating their results;
* a pure-Python dict-of-lists pool with the same semantics, driven as the published
  Ouroboros and lookahead-decoding code drive theirs (``.tolist()`` of the step's tensors,
  one insert call per n-gram, eviction by rebuilding the list): the speed-up basis;
* the same pool with a tuned batch loop fed ready Python lists (no conversion counted): a
  lower bound on what Python could do;
* the CUDA op when a GPU is present (median of per-step CUDA-event times after warm-up,
  and host wall time per step including launches).

All pools are checked to agree (lookups of every touched key; CUDA state == CPU state).

Usage: ``python benchmarks/bench_pool.py [--quick] [--out DIR] [--no-cuda]``.
``--out DIR`` writes the table to ``DIR/pool_<device>.md`` (``cuda`` when a GPU was
measured, else ``cpu``).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass

# numpy's OpenBLAS threads spin after start-up on this 2-core class of machine and would
# steal time from whichever pool is being timed; nothing here needs BLAS threads.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ouroboros_kernels import CandidatePool, PoolLookup, extension_info  # noqa: E402

CAPACITY = 20
LOOKUPS_PER_STEP = 4


# ----------------------------------------------------------------------------- Python pool


class DictListPool:
    """Pure-Python pool: key -> list of phrase tuples, least recent first.

    Same observable semantics as the compiled pool: re-inserting moves a phrase to the
    end (most recent), a full list drops its first (least recent) phrase; lookup returns
    the last k reversed; refine addresses a phrase by its rank in the lookup result and
    replaces it in place, or removes it if the new phrase is already in the list.

    ``insert`` is a tuned batch loop (local names, one dict probe per entry, ``del``
    eviction). ``insert_one`` is written the way the published Ouroboros and lookahead
    decoding code update their pools: one method call per n-gram that indexes the dict
    for each operation and evicts by rebuilding the list (``row[1:] + [phrase]``).
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.table: dict[int, list[tuple[int, ...]]] = {}

    def insert(self, keys: list[int], phrases: list[list[int]]) -> None:
        table, capacity = self.table, self.capacity
        for key, phrase in zip(keys, phrases, strict=True):
            phrase = tuple(phrase)
            row = table.get(key)
            if row is None:
                table[key] = [phrase]
                continue
            if phrase in row:
                row.remove(phrase)
            elif len(row) >= capacity:
                del row[0]
            row.append(phrase)

    def insert_one(self, key: int, phrase: tuple[int, ...]) -> None:
        if key not in self.table:
            self.table[key] = []
        if phrase in self.table[key]:
            self.table[key].remove(phrase)
            self.table[key].append(phrase)
        elif len(self.table[key]) < self.capacity:
            self.table[key].append(phrase)
        else:
            self.table[key] = self.table[key][1:] + [phrase]

    def lookup(self, keys: list[int], k: int) -> list[list[tuple[int, ...]]]:
        return [self.table.get(key, [])[::-1][:k] for key in keys]

    def refine(self, keys: list[int], ranks: list[int], phrases: list[list[int]]) -> None:
        # Ranks refer to the rows as a lookup saw them before this batch (like slots), so
        # removals are marked in place and compacted at the end.
        emptied = set()
        for key, rank, phrase in zip(keys, ranks, phrases, strict=True):
            row = self.table.get(key)
            if row is None or rank >= len(row) or row[len(row) - 1 - rank] is None:
                continue
            index = len(row) - 1 - rank
            phrase = tuple(phrase)
            if phrase in row:
                if row[index] != phrase:
                    row[index] = None
                    emptied.add(key)
            else:
                row[index] = phrase
        for key in emptied:
            self.table[key] = [p for p in self.table[key] if p is not None]


# ----------------------------------------------------------------------------- op stream


def synthetic_text(rng: np.random.Generator, vocab_size: int, length: int) -> np.ndarray:
    """Zipf-distributed tokens (random rank -> id map) with copied spans, so n-grams recur."""
    ids = rng.permutation(vocab_size)
    out: list[int] = []
    while len(out) < length:
        if len(out) > 64 and rng.random() < 0.4:
            start = int(rng.integers(0, len(out) - 32))
            out.extend(out[start:start + int(rng.integers(4, 32))])
        else:
            ranks = rng.zipf(1.15, size=int(rng.integers(1, 12))) - 1
            out.extend(int(ids[r % vocab_size]) for r in ranks)
    return np.asarray(out[:length], dtype=np.int64)


@dataclass
class Step:
    lookup_keys: list[list[int]]
    lookup_k: list[int]
    refine_ranks: list[int]
    refine_phrases: list[list[int]]
    insert_keys: list[int]
    insert_phrases: list[list[int]]


def zipf_tokens(rng: np.random.Generator, ids: np.ndarray, size: int) -> np.ndarray:
    return ids[(rng.zipf(1.15, size=size) - 1) % len(ids)]


def make_stream(vocab_size: int, phrase_len: int, warm_tokens: int, num_steps: int,
                seed: int) -> tuple[np.ndarray, list[Step]]:
    """A warm-start text (inserted as n-grams before timing, like a pool carried over from
    earlier prompts) and the per-step ops that follow it."""
    rng = np.random.default_rng(seed)
    L = phrase_len
    text = synthetic_text(rng, vocab_size, warm_tokens + 8 * num_steps + 64)
    ids = rng.permutation(vocab_size)
    steps = []
    position = warm_tokens
    for _ in range(num_steps):
        position += int(rng.integers(2, 8))  # accepted tokens per step
        lookup_keys = [[int(text[position + j])] for j in range(LOOKUPS_PER_STEP)]
        lookup_k = [int(rng.integers(3, 17)) for _ in range(LOOKUPS_PER_STEP)]
        num_refines = int(rng.integers(1, 5))
        refine_ranks = [int(r) for r in rng.integers(0, lookup_k[-1], size=num_refines)]
        starts = rng.integers(0, position, size=num_refines)
        refine_phrases = [text[s + 1:s + 1 + L].tolist() for s in starts]
        # Inserts: half are n-grams of the recent text, half are new phrases under text
        # keys (the target's predictions along rejected branches: inspiration).
        num_inserts = int(rng.integers(100, 401))
        starts = position - rng.integers(0, 600, size=num_inserts)
        windows = np.stack([text[starts + i] for i in range(L + 1)], axis=1)
        novel = rng.random(num_inserts) < 0.5
        windows[novel, 1:] = zipf_tokens(rng, ids, int(novel.sum()) * L).reshape(-1, L)
        steps.append(Step(lookup_keys, lookup_k, refine_ranks, refine_phrases,
                          windows[:, 0].tolist(), windows[:, 1:].tolist()))
    return text[:warm_tokens], steps


@dataclass
class TensorStep:
    lookup_keys: list[torch.Tensor]
    lookup_k: list[int]
    refine_keys: torch.Tensor
    refine_ranks: torch.Tensor
    refine_phrases: torch.Tensor
    insert_keys: torch.Tensor
    insert_phrases: torch.Tensor


def to_tensors(step: Step, device: str) -> TensorStep:
    def t(x, dtype=torch.int64):
        return torch.tensor(x, dtype=dtype, device=device)

    last_key = step.lookup_keys[-1][0]
    return TensorStep([t(k) for k in step.lookup_keys], step.lookup_k,
                      t([last_key] * len(step.refine_ranks)), t(step.refine_ranks),
                      t(step.refine_phrases), t(step.insert_keys), t(step.insert_phrases))


def lookup_buffers(pool: CandidatePool) -> dict[int, PoolLookup]:
    """Result buffers for one key and each k of the stream, made once and reused every
    step (``lookup(..., out=...)``), as an engine keeps them."""
    return {k: pool.empty_lookup(1, k) for k in range(3, 17)}


def run_compiled_step(pool: CandidatePool, s: TensorStep,
                      buffers: dict[int, PoolLookup] | None = None) -> None:
    """One step through ``CandidatePool``; lookups write into ``buffers`` when given,
    else allocate their results."""
    result = None
    for keys, k in zip(s.lookup_keys, s.lookup_k, strict=True):
        result = pool.lookup(keys, k, out=None if buffers is None else buffers[k])
    # The refined rows' slots: one key was looked up, so the ranks index its row directly.
    slots = torch.take(result.slots, s.refine_ranks)  # -1 (padding) past the count
    pool.refine(s.refine_keys, slots, s.refine_phrases)
    pool.insert(s.insert_keys, s.insert_phrases)


def run_compiled_step_by_part(pool: CandidatePool, s: TensorStep,
                              buffers: dict[int, PoolLookup], parts: dict[str, list[int]]) -> None:
    """run_compiled_step with a clock read between its parts (appended to ``parts``)."""
    clock = time.perf_counter_ns
    t0 = clock()
    result = None
    for keys, k in zip(s.lookup_keys, s.lookup_k, strict=True):
        result = pool.lookup(keys, k, out=buffers[k])
    t1 = clock()
    slots = torch.take(result.slots, s.refine_ranks)
    pool.refine(s.refine_keys, slots, s.refine_phrases)
    t2 = clock()
    pool.insert(s.insert_keys, s.insert_phrases)
    t3 = clock()
    parts["lookups"].append(t1 - t0)
    parts["refine"].append(t2 - t1)
    parts["insert"].append(t3 - t2)


def run_python_step(pool: DictListPool, s: Step) -> None:
    """Tuned Python pool, fed ready Python lists (no conversion counted)."""
    for keys, k in zip(s.lookup_keys, s.lookup_k, strict=True):
        pool.lookup(keys, k)
    last_key = s.lookup_keys[-1][0]
    pool.refine([last_key] * len(s.refine_ranks), s.refine_ranks, s.refine_phrases)
    pool.insert(s.insert_keys, s.insert_phrases)


def run_published_style_step(pool: DictListPool, s: TensorStep) -> None:
    """Python pool as the published code drives it: the step's tensors converted with
    ``.tolist()``, then one ``insert_one`` call per n-gram."""
    for keys, k in zip(s.lookup_keys, s.lookup_k, strict=True):
        pool.lookup(keys.tolist(), k)
    pool.refine(s.refine_keys.tolist(), s.refine_ranks.tolist(), s.refine_phrases.tolist())
    for key, phrase in zip(s.insert_keys.tolist(), s.insert_phrases.tolist(), strict=True):
        pool.insert_one(key, tuple(phrase))


def python_warm_start(pool: DictListPool, text: np.ndarray, phrase_len: int) -> None:
    tokens = text.tolist()
    count = len(tokens) - phrase_len
    pool.insert(tokens[:count], [tokens[t + 1:t + 1 + phrase_len] for t in range(count)])


# ----------------------------------------------------------------------------- timing


def time_cuda(fn, steps) -> tuple[float, float]:
    """(median CUDA-event time per step, host wall time per step incl. launches), in µs."""
    starts = [torch.cuda.Event(enable_timing=True) for _ in steps]
    ends = [torch.cuda.Event(enable_timing=True) for _ in steps]
    torch.cuda.synchronize()
    t0 = time.perf_counter_ns()
    for s, start, end in zip(steps, starts, ends, strict=True):
        start.record()
        fn(s)
        end.record()
    torch.cuda.synchronize()
    wall = (time.perf_counter_ns() - t0) / 1e3 / len(steps)
    events = zip(starts, ends, strict=True)
    return statistics.median(a.elapsed_time(b) * 1e3 for a, b in events), wall


def python_pool_bytes(pool: DictListPool) -> int:
    """Deep size of the Python pool: dict, lists, tuples and the int objects they hold."""
    seen: set[int] = set()
    total = sys.getsizeof(pool.table)
    for key, row in pool.table.items():
        total += sys.getsizeof(row) + sys.getsizeof(key)
        for phrase in row:
            total += sys.getsizeof(phrase)
            for token in phrase:
                if id(token) not in seen:
                    seen.add(id(token))
                    total += sys.getsizeof(token)
    return total


def check_agreement(pool: CandidatePool, py_pool: DictListPool, keys: list[int]) -> None:
    phrases, counts, _ = pool.lookup(torch.tensor(keys, device=pool.device), CAPACITY)
    phrases, counts = phrases.cpu().tolist(), counts.cpu().tolist()
    expected_rows = py_pool.lookup(keys, CAPACITY)
    for key, rows, count, expected in zip(keys, phrases, counts, expected_rows, strict=True):
        got = [tuple(r) for r in rows[:count]]
        if got != expected:
            raise AssertionError(f"pools disagree on key {key}: {got} vs {expected}")


@dataclass
class Row:
    vocab_size: int
    phrase_len: int
    python_lists_us: float
    python_us: float
    cpu_us: float
    cpu_alloc_us: float
    cpu_parts_us: tuple[float, float, float]  # lookups, take + refine, insert
    cuda_us: float | None
    cuda_wall_us: float | None
    cuda_cached_us: float | None  # the experimental register-cached insert path
    cuda_cached_wall_us: float | None
    pool_mib: float
    python_mib: float
    phrases_stored: int


def bench_config(V: int, L: int, warm_tokens: int, num_warmup: int, num_timed: int,
                 use_cuda: bool) -> Row:
    text, steps = make_stream(V, L, warm_tokens, num_warmup + num_timed, seed=V + L)
    tensor_steps = [to_tensors(s, "cpu") for s in steps]

    # Five pools replay the same steps (two Python, three compiled); each timed step is
    # measured on all of them in turn, so that load from other processes hits them alike.
    py_lists, py_published = DictListPool(CAPACITY), DictListPool(CAPACITY)
    python_warm_start(py_lists, text, L)
    python_warm_start(py_published, text, L)
    pool, pool_alloc, pool_parts = (CandidatePool(V, CAPACITY, L) for _ in range(3))
    for compiled in (pool, pool_alloc, pool_parts):
        compiled.insert_ngrams(torch.from_numpy(text))
    buffers, buffers_parts = lookup_buffers(pool), lookup_buffers(pool_parts)
    parts: dict[str, list[int]] = {"lookups": [], "refine": [], "insert": []}
    for s, t in zip(steps[:num_warmup], tensor_steps[:num_warmup], strict=True):
        run_python_step(py_lists, s)
        run_published_style_step(py_published, t)
        run_compiled_step(pool, t, buffers)
        run_compiled_step(pool_alloc, t)
        run_compiled_step_by_part(pool_parts, t, buffers_parts, parts)
    for values in parts.values():
        values.clear()
    gc.collect()
    gc.freeze()  # the benchmark's own data (millions of list items) is not the pools' cost
    runs = {
        "lists": lambda s, t: run_python_step(py_lists, s),
        "published": lambda s, t: run_published_style_step(py_published, t),
        "compiled": lambda s, t: run_compiled_step(pool, t, buffers),
        "alloc": lambda s, t: run_compiled_step(pool_alloc, t),
        "parts": lambda s, t: run_compiled_step_by_part(pool_parts, t, buffers_parts, parts),
    }
    names = list(runs)
    times: dict[str, list[int]] = {name: [] for name in names}
    clock = time.perf_counter_ns
    for step, (s, t) in enumerate(zip(steps[num_warmup:], tensor_steps[num_warmup:],
                                      strict=True)):
        # The order rotates every step: whichever pool runs right after a similar one finds
        # its code paths (and the interpreter's) warm, so a fixed order would favour some.
        for j in range(len(names)):
            name = names[(step + j) % len(names)]
            t0 = clock()
            runs[name](s, t)
            times[name].append(clock() - t0)
    gc.unfreeze()
    median_us = {name: statistics.median(v) / 1e3 for name, v in times.items()}
    check_agreement(pool, py_lists, sorted({k for s in steps for k in s.insert_keys})[:3000])
    check_agreement(pool, py_published, sorted({k for s in steps for k in s.insert_keys})[:3000])
    for other in (pool_alloc, pool_parts):
        for name, tensor in other.state_dict().items():
            if not torch.equal(tensor, pool.state_dict()[name]):
                raise AssertionError(f"the compiled CPU pools disagree ({name})")

    cuda_times: dict[bool, tuple[float, float]] = {}
    if use_cuda:
        from ouroboros_kernels import cuda_insert_cached

        default = cuda_insert_cached()
        cuda_steps = [to_tensors(s, "cuda") for s in steps]
        try:
            for cached in (False, True):  # the default insert path, then the experimental one
                cuda_insert_cached(cached)
                cuda_pool = CandidatePool(V, CAPACITY, L, device="cuda")
                cuda_pool.insert_ngrams(torch.from_numpy(text).cuda())
                cuda_buffers = lookup_buffers(cuda_pool)
                for s in cuda_steps[:num_warmup]:
                    run_compiled_step(cuda_pool, s, cuda_buffers)
                cuda_times[cached] = time_cuda(
                    lambda s, p=cuda_pool, b=cuda_buffers: run_compiled_step(p, s, b),
                    cuda_steps[num_warmup:])
                for name, tensor in cuda_pool.state_dict().items():
                    if not torch.equal(tensor.cpu(), pool.state_dict()[name]):
                        raise AssertionError(f"CUDA (cached insert: {cached}) and CPU pools "
                                             f"disagree ({name})")
        finally:
            cuda_insert_cached(default)
    cuda_us, cuda_wall_us = cuda_times.get(False, (None, None))
    cuda_cached_us, cuda_cached_wall_us = cuda_times.get(True, (None, None))

    # Memory: the compiled pool is preallocated; the Python pool grows with use.
    return Row(V, L, median_us["lists"], median_us["published"], median_us["compiled"],
               median_us["alloc"],
               tuple(statistics.median(parts[p]) / 1e3 for p in ("lookups", "refine", "insert")),
               cuda_us, cuda_wall_us, cuda_cached_us, cuda_cached_wall_us,
               pool.nbytes / 2**20,
               python_pool_bytes(py_lists) / 2**20, pool.num_phrases())


# ----------------------------------------------------------------------------- report


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def header(use_cuda: bool, quick: bool, warm_tokens: int, num_warmup: int,
           num_timed: int, load_at_start: str) -> str:
    info = extension_info()
    card = torch.cuda.get_device_name() if use_cuda else "none"
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return "\n".join([
        "# Candidate pool: time per decoding step",
        "",
        f"* date: {date}{' (--quick)' if quick else ''}",
        f"* machine: {cpu_model()}, {os.cpu_count()} cores (torch threads: "
        f"{torch.get_num_threads()}); card: {card}",
        f"* python {platform.python_version()}, torch {torch.__version__}, extension built "
        f"with CUDA: {info['built_with_cuda']}",
        f"* step: {LOOKUPS_PER_STEP} lookups (1 key each, k=3..16), 1 refine batch (1..4 "
        f"entries, slots from the last lookup), 1 insert batch (100..400 n-grams, half of "
        f"them new); W={CAPACITY}",
        f"* pools warm-started with the n-grams of {warm_tokens} tokens (as after earlier "
        f"prompts), then {num_warmup} untimed steps; median over {num_timed} steps, the pools "
        "timed in turn on each step, in an order rotated every step (a pool timed right after a "
        "similar one finds the code paths warm; each pool is first, second, ... equally often)",
        "* Python pool = dict of lists of tuples, same semantics. 'published style': driven "
        "as the published Ouroboros / lookahead-decoding code drive theirs (the step's tensors "
        "`.tolist()`-ed, one insert call per n-gram, eviction by list rebuild); the speed-up "
        "basis. 'tuned': a faster batch loop fed ready Python lists (conversion not counted)",
        "* compiled: through `CandidatePool` (argument checks and Python overhead included); "
        "lookups write into result buffers made once and reused every step "
        "(`lookup(keys, k, out=buffers)`); 'allocating lookups': a second compiled pool "
        "replaying the same steps with `lookup(keys, k)` (fresh result tensors per call); 'by "
        "part': a third one whose step reads the clock between its parts (median of each part: "
        "the 4 lookups, the `torch.take` of the refined slots + the refine, the insert)",
        f"* load average when the run started: {load_at_start} (other processes share the "
        "cores; every step is timed on all pools in turn, so the ratios hold better than "
        "the absolute times)",
        "",
        "",
    ])


def table(rows: list[Row], use_cuda: bool) -> str:
    cols = ["V", "L", "Python pool, published style µs/step", "Python pool, tuned µs/step",
            "compiled CPU µs/step", "CPU speed-up (vs published style / tuned)",
            "compiled CPU, allocating lookups µs/step",
            "compiled CPU by part µs: lookups / take + refine / insert"]
    if use_cuda:
        cols += ["CUDA µs/step (events, median)", "CUDA µs/step (host wall)",
                 "CUDA speed-up (wall, vs published style)",
                 "CUDA, cached insert µs/step (events / wall)"]
    cols += ["phrases stored", "compiled pool MiB", "Python pool MiB"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [f"{r.vocab_size}", f"{r.phrase_len}", f"{r.python_us:.1f}",
                 f"{r.python_lists_us:.1f}", f"{r.cpu_us:.1f}",
                 f"{r.python_us / r.cpu_us:.1f}x / {r.python_lists_us / r.cpu_us:.1f}x",
                 f"{r.cpu_alloc_us:.1f}",
                 " / ".join(f"{x:.1f}" for x in r.cpu_parts_us)]
        if use_cuda:
            cells += [f"{r.cuda_us:.1f}", f"{r.cuda_wall_us:.1f}",
                      f"{r.python_us / r.cuda_wall_us:.1f}x",
                      f"{r.cuda_cached_us:.1f} / {r.cuda_cached_wall_us:.1f}"]
        cells += [f"{r.phrases_stored}", f"{r.pool_mib:.1f}", f"{r.python_mib:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="reduced run (< 30 s)")
    parser.add_argument("--out", help="directory to write pool_<device>.md into")
    parser.add_argument("--no-cuda", action="store_true", help="skip the CUDA measurement")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)  # the pool ops are single-threaded; keep the timing clean
    use_cuda = (not args.no_cuda and torch.cuda.is_available()
                and extension_info()["built_with_cuda"])
    vocab_sizes = (32000, 49152, 128256)
    phrase_lens = (4, 7) if args.quick else (4, 5, 6, 7)
    warm_tokens, num_warmup, num_timed = ((50_000, 50, 300) if args.quick else
                                          (200_000, 200, 2000))

    load_at_start = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    rows = []
    for V in vocab_sizes:
        for L in phrase_lens:
            rows.append(bench_config(V, L, warm_tokens, num_warmup, num_timed, use_cuda))
            r = rows[-1]
            print(f"V={V} L={L}: python {r.python_us:.1f} µs (tuned {r.python_lists_us:.1f}), "
                  f"compiled CPU {r.cpu_us:.1f} µs (allocating lookups {r.cpu_alloc_us:.1f})"
                  + (f", CUDA {r.cuda_us:.1f} µs (wall {r.cuda_wall_us:.1f})" if use_cuda
                     else ""), file=sys.stderr)
    report = (header(use_cuda, args.quick, warm_tokens, num_warmup, num_timed, load_at_start)
              + table(rows, use_cuda) + "\n")
    print(report)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, f"pool_{'cuda' if use_cuda else 'cpu'}.md")
        with open(path, "w") as f:
            f.write(report)
        print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
