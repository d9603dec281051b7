"""Batched decoding benchmark (issue 11): total tokens/s at batch sizes B = 1, 2, 4, 8, ...

For every batch size B the same ``--prompts`` prompts (default: held-out HumanEval problems
82-163, evenly spaced; never the tuning prompts 0-81) are decoded in consecutive groups of
B (``--prompts`` must be a multiple of every B), greedy, ``--max-new-tokens``
new tokens at most (EOS ends a row earlier), by:

* ``hf_greedy``: transformers' batched greedy decoding, ``target.generate(input_ids,
  attention_mask=..., do_sample=False, max_new_tokens=..., pad_token_id=...)`` on the
  batch left-padded here (no tokenizer involved), once with the dynamic cache and once with
  ``cache_implementation="static"`` (``--static auto``: as transformers runs it, i.e.
  compiled on a GPU; ``eager``: ``disable_compile=True``; ``off``: not run). The faster
  of the two at each B is the baseline of that B (the table names which);
* ``ouroboros``: ``OuroborosDecoder(target, draft)`` (the default: tuned for the device,
  adaptive trees; ``--no-tune``: the ``"ouroboros"`` preset) called with the batch as a list
  of token lists (``--engine-input tensor``: the left-padded tensor and its attention mask).
  One decoder for the whole run; its pool is cleared at the start of every B (the same
  prompts come again) and kept across the batches of one B, as a user's decoder would.

Before the timed batches of each B every method runs once untimed on the batch of that B
with the longest prompts (first-call costs, transformers' static cache sized for every
batch of the B, compilation). Within a B the methods' order is rotated per batch so that
drift of a shared machine hits them alike. Total tokens/s = new tokens of all rows / the
summed wall times of the calls (prefill included).

Exactness, row by row: every row's new tokens are compared with the greedy output of that
prompt decoded alone (``target.generate`` with batch 1, computed once per prompt, untimed).
transformers' own left-padded batches may differ from its batch-1 greedy by float
rounding: such rows are reported as a note. An ``ouroboros`` row that differs is an error:
the script exits with status 1 after writing the results.

Outputs (``--out``, default ``benchmarks/results``): ``batch_<device>[_<tag>].md`` (table,
machine, card, versions, date, threads, load average), ``.json`` (raw totals) and ``.png``
(tokens/s against B). ``--quick``: B = 1, 2, 2 prompts, 16 new tokens. ``--budget-s``: no
further batch size is started once the time spent plus the expected cost of the next one
would pass it (the table says which were skipped).

Usage::

    python benchmarks/bench_batch.py --device cpu --batch-sizes 1,2,4,8 --prompts 8 \
        --max-new-tokens 128 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tools/ (prompt sets)
sys.path.insert(0, str(HERE))  # bench_e2e: model loading, prompt sets, machine lines

import bench_e2e as e2e  # noqa: E402
import torch  # noqa: E402

CPU_SIZES = (1, 2, 4, 8)
GPU_SIZES = (1, 2, 4, 8, 16, 32)
HF_CACHES = ("dynamic", "static")
METHODS = ("hf_dynamic", "hf_static", "ouroboros")
LABELS = {"hf_dynamic": "hf_greedy (dynamic cache)", "hf_static": "hf_greedy (static cache)",
          "ouroboros": "ouroboros"}


# ============================================================================ prompts and batches


def random_prompts(count: int, vocab: int, seed: int = 0, low: int = 4, high: int = 24,
                   ) -> list[tuple[str, list[int]]]:
    """``count`` prompts of random tokens in ``[3, vocab)`` (ids 0-2 are usually pad, BOS and
    EOS) of lengths varying in ``[low, high]``, so that batches carry left padding."""
    rng = random.Random(seed)
    return [(f"random/{i}", [rng.randrange(3, vocab) for _ in range(rng.randint(low, high))])
            for i in range(count)]


def file_prompts(path: str, count: int) -> list[tuple[str, list[int]]]:
    """The first ``count`` prompts of a JSON file: a list of token id lists or an object
    ``{label: token ids}``."""
    data = json.loads(Path(path).read_text())
    items = list(data.items()) if isinstance(data, dict) else [
        (f"{Path(path).name}/{i}", ids) for i, ids in enumerate(data)]
    prompts = [(str(label), [int(t) for t in ids]) for label, ids in items[:count]]
    if len(prompts) < count or any(not ids for _, ids in prompts):
        raise SystemExit(f"bench_batch.py: error: --prompt-file {path} holds {len(items)} "
                         f"prompts (all non-empty needed), --prompts asks for {count}")
    return prompts


def eos_ids(model) -> list[int]:
    eos = model.generation_config.eos_token_id
    if eos is None:
        return []
    return [int(e) for e in eos] if isinstance(eos, (list, tuple)) else [int(eos)]


def pad_id(model) -> int:
    """The spec's pad id: generation config, then model config, then the first EOS, then 0."""
    for value in (model.generation_config.pad_token_id, model.config.pad_token_id):
        if value is not None:
            return int(value[0] if isinstance(value, (list, tuple)) else value)
    eos = eos_ids(model)
    return eos[0] if eos else 0


def left_pad(prompts: Sequence[Sequence[int]], pad: int, device: torch.device,
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)``, both ``int64[B, longest]``, padding on the left."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.int64)
    mask = torch.zeros((len(prompts), width), dtype=torch.int64)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(list(prompt), dtype=torch.int64)
        mask[row, width - len(prompt):] = 1
    return ids.to(device), mask.to(device)


def until_eos(tokens: list[int], eos: Sequence[int]) -> list[int]:
    """A row's tokens up to and including its first EOS (what follows is padding)."""
    for i, token in enumerate(tokens):
        if token in eos:
            return tokens[:i + 1]
    return tokens


def groups(prompts: list, size: int) -> list[list]:
    """Consecutive groups of ``size`` (the last one smaller when ``size`` does not divide;
    `main` asks for a multiple)."""
    return [prompts[i:i + size] for i in range(0, len(prompts), size)]


# ============================================================================ methods


@dataclass
class BatchRun:
    """One method on one batch: each row's new tokens, the wall time of the call, the
    batched target forward passes, and (the engine) the rows' own target passes."""

    rows: list[list[int]]
    seconds: float
    target_passes: int
    row_passes: int | None = None
    shapes: dict = field(default_factory=dict)


class HFGreedy:
    """transformers' batched greedy ``generate`` with one cache implementation."""

    def __init__(self, name: str, target, cache: str, pad: int, eos: list[int],
                 compile_static: bool = True) -> None:
        self.name, self.target, self.cache, self.pad, self.eos = name, target, cache, pad, eos
        self.kwargs = {}
        if cache == "static":
            self.kwargs["cache_implementation"] = "static"
            if not compile_static:
                self.kwargs["disable_compile"] = True
        self.device = next(target.parameters()).device

    @torch.inference_mode()
    def run(self, prompts: list[list[int]], max_new_tokens: int) -> BatchRun:
        ids, mask = left_pad(prompts, self.pad, self.device)
        e2e._synchronize(self.device)
        start = time.perf_counter()
        out = self.target.generate(ids, attention_mask=mask, do_sample=False,
                                   max_new_tokens=max_new_tokens, pad_token_id=self.pad,
                                   **self.kwargs)
        e2e._synchronize(self.device)
        seconds = time.perf_counter() - start
        new = out[:, ids.shape[1]:]
        rows = [until_eos(new[b].tolist(), self.eos) for b in range(len(prompts))]
        # One forward call per generated position (the prefill yields the first token).
        return BatchRun(rows, seconds, int(new.shape[1]))

    def clear(self) -> None:
        pass


class Engine:
    """This package's batched ``OuroborosDecoder.generate``; one decoder for the run."""

    name = "ouroboros"

    def __init__(self, target, draft, tune: bool, pad: int, input_kind: str) -> None:
        from ouroboros.decoder import OuroborosDecoder

        self.decoder = (OuroborosDecoder(target, draft) if tune else
                        OuroborosDecoder(target, draft, "ouroboros"))
        self.config = self.decoder.config
        self.pad, self.input_kind = pad, input_kind
        self.device = next(target.parameters()).device

    def run(self, prompts: list[list[int]], max_new_tokens: int) -> BatchRun:
        if self.input_kind == "tensor":
            ids, mask = left_pad(prompts, self.pad, self.device)
            args, kwargs = (ids,), {"attention_mask": mask}
        else:
            args, kwargs = ([list(p) for p in prompts],), {}
        e2e._synchronize(self.device)
        start = time.perf_counter()
        result = self.decoder.generate(*args, max_new_tokens=max_new_tokens,
                                       pad_token_id=self.pad, **kwargs)
        e2e._synchronize(self.device)
        seconds = time.perf_counter() - start
        rows = [[int(t) for t in tokens] for tokens in result.new_tokens]
        row_passes = sum(row.stats.target_passes for row in result.rows)
        return BatchRun(rows, seconds, result.stats.target_passes, row_passes,
                        dict(getattr(result.stats, "shapes", {}) or {}))

    def clear(self) -> None:
        self.decoder.clear_pool()


# ============================================================================ totals


@dataclass
class Cell:
    """One method at one batch size, summed over its batches."""

    seconds: float = 0.0
    tokens: int = 0
    batches: int = 0
    rows: int = 0
    exact_rows: int = 0
    target_passes: int = 0  # batched forward passes
    row_passes: int = 0  # the engine: the rows' own verification passes, summed
    row_passes_known: bool = True
    mismatches: list[str] = field(default_factory=list)
    batch_seconds: list[float] = field(default_factory=list)
    shapes: dict = field(default_factory=dict)

    def add(self, run: BatchRun, references: list[list[int]], labels: list[str]) -> list[int]:
        """Adds one batch; returns the indices of the rows that differ from batch-1 greedy."""
        self.seconds += run.seconds
        self.batch_seconds.append(run.seconds)
        self.batches += 1
        self.target_passes += run.target_passes
        if run.row_passes is None:
            self.row_passes_known = False
        else:
            self.row_passes += run.row_passes
        for shape, steps in run.shapes.items():
            self.shapes[shape] = self.shapes.get(shape, 0) + steps
        wrong = []
        for b, (tokens, reference) in enumerate(zip(run.rows, references, strict=True)):
            self.rows += 1
            self.tokens += len(tokens)
            if tokens == reference:
                self.exact_rows += 1
            else:
                self.mismatches.append(labels[b])
                wrong.append(b)
        return wrong

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    @property
    def tokens_per_pass(self) -> float | None:
        """Row tokens per target pass that row took part in (greedy: 1.0)."""
        if not self.row_passes_known or not self.row_passes:
            return None
        return self.tokens / self.row_passes

    @property
    def passes_per_batch(self) -> float:
        return self.target_passes / self.batches if self.batches else 0.0


def best_hf(cells: dict[str, Cell]) -> str | None:
    """The faster hf_greedy variant of one B."""
    hf = [name for name in ("hf_dynamic", "hf_static") if name in cells and cells[name].seconds]
    return max(hf, key=lambda name: cells[name].tokens_per_second) if hf else None


# ============================================================================ the run


def references(target, prompts: list[tuple[str, list[int]]], max_new_tokens: int, pad: int,
               eos: list[int], log) -> list[list[int]]:
    """Greedy decoding of every prompt alone (batch 1, untimed): the exactness reference."""
    device = next(target.parameters()).device
    out = []
    with torch.inference_mode():
        for i, (label, prompt) in enumerate(prompts):
            ids = torch.tensor([prompt], dtype=torch.int64, device=device)
            new = target.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                  max_new_tokens=max_new_tokens, pad_token_id=pad)
            out.append(until_eos(new[0, len(prompt):].tolist(), eos))
            log(f"  reference {i + 1}/{len(prompts)} {label}: {len(prompt)} prompt tokens, "
                f"{len(out[-1])} new")
    return out


def run_size(methods: list, size: int, prompts: list[tuple[str, list[int]]],
             refs: list[list[int]], max_new_tokens: int, log, diagnose=None,
             ) -> dict[str, Cell]:
    """Every method on every batch of ``size`` (order rotated per batch) after one untimed
    warm-up of each on the batch with the longest prompts."""
    batches = groups(list(range(len(prompts))), size)
    longest = max(batches, key=lambda rows: (len(rows), max(len(prompts[i][1]) for i in rows)))
    for method in methods:  # untimed
        method.run([prompts[i][1] for i in longest], max_new_tokens)
        method.clear()
    cells = {m.name: Cell() for m in methods}
    for index, rows in enumerate(batches):
        shift = index % len(methods)
        order = methods[shift:] + methods[:shift]
        batch = [prompts[i][1] for i in rows]
        labels = [prompts[i][0] for i in rows]
        batch_refs = [refs[i] for i in rows]
        runs = {m.name: m.run(batch, max_new_tokens) for m in order}
        line = []
        for method in methods:
            run = runs[method.name]
            wrong = cells[method.name].add(run, batch_refs, labels)
            for b in wrong:
                if method.name != "ouroboros":
                    continue
                at = e2e.first_mismatch(run.rows[b], batch_refs[b])
                other = run.rows[b][at] if at < len(run.rows[b]) else None
                why = f": {diagnose(batch[b], batch_refs[b], at, other)}" if diagnose else ""
                log(f"  !!! MISMATCH: ouroboros row {b} ({labels[b]}) of a batch of "
                    f"{len(rows)} differs from batch-1 greedy at new token {at} "
                    f"({len(run.rows[b])} vs {len(batch_refs[b])} tokens){why}")
            tokens = sum(len(r) for r in run.rows)
            line.append(f"{method.name} {tokens / run.seconds:.1f}"
                        + (f" ({len(wrong)} rows differ)" if wrong else ""))
        log(f"  B={size} [{index + 1}/{len(batches)}] {len(rows)} rows, prompts "
            f"{min(len(p) for p in batch)}-{max(len(p) for p in batch)} tokens; tok/s: "
            + ", ".join(line))
    return cells


# ============================================================================ reporting


def versions_line() -> str:
    try:
        import triton

        return f"triton {triton.__version__}"
    except ImportError:
        return "triton: not installed"


def fmt(value: float | None, spec: str = ".1f", suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def markdown(results: dict[int, dict[str, Cell]], header: list[str], notes: list[str]) -> str:
    lines = ["# Batched decoding throughput", ""]
    lines += [f"* {h}" for h in header]
    lines.append("")
    base = greedy_b1(results)
    lines += ["| B | batches | hf_greedy tok/s: dynamic / static | baseline (faster hf) | "
              "ouroboros tok/s | ouroboros / best hf (same B) | ouroboros / greedy B=1 | "
              "best hf / greedy B=1 | tokens per target pass (ouroboros, per row) | "
              "target passes per batch: ouroboros / hf | ouroboros rows identical to batch-1 "
              "greedy | hf batched rows identical to batch-1 greedy |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for size, cells in results.items():
        ours = cells.get("ouroboros")
        best = best_hf(cells)
        best_tps = cells[best].tokens_per_second if best else None
        hf_tps = " / ".join(fmt(cells[n].tokens_per_second) if n in cells else "-"
                            for n in ("hf_dynamic", "hf_static"))
        ratio = ours.tokens_per_second / best_tps if ours and best_tps else None
        vs_b1 = ours.tokens_per_second / base if ours and base else None
        hf_vs_b1 = best_tps / base if best_tps and base else None
        exact = "-"
        if ours:
            exact = f"{ours.exact_rows}/{ours.rows}" + (
                "" if ours.exact_rows == ours.rows else " **MISMATCH**")
        hf_exact = ", ".join(f"{n[3:]} {cells[n].exact_rows}/{cells[n].rows}"
                             for n in ("hf_dynamic", "hf_static") if n in cells)
        batches = next(iter(cells.values())).batches
        lines.append(
            f"| {size} | {batches} | {hf_tps} | {best[3:] if best else '-'} | "
            f"{fmt(ours.tokens_per_second if ours else None)} | {fmt(ratio, '.2f', 'x')} | "
            f"{fmt(vs_b1, '.2f', 'x')} | {fmt(hf_vs_b1, '.2f', 'x')} | "
            f"{fmt(ours.tokens_per_pass if ours else None, '.2f')} | "
            f"{fmt(ours.passes_per_batch if ours else None)} / "
            f"{fmt(cells[best].passes_per_batch if best else None)} | {exact} | {hf_exact} |")
    lines.append("")
    lines += notes
    return "\n".join(lines)


def greedy_b1(results: dict[int, dict[str, Cell]]) -> float | None:
    """tokens/s of the faster hf_greedy variant at B = 1 (the plain batch-1 baseline)."""
    cells = results.get(1)
    best = best_hf(cells) if cells else None
    return cells[best].tokens_per_second if best else None


def plot(results: dict[int, dict[str, Cell]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = list(results)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, style in (("hf_dynamic", "o--"), ("hf_static", "s--"), ("ouroboros", "D-")):
        points = [(b, results[b][name].tokens_per_second) for b in sizes if name in results[b]]
        if points:
            ax.plot([b for b, _ in points], [v for _, v in points], style, label=LABELS[name])
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes)
    ax.set_xticklabels([str(b) for b in sizes])
    ax.set_xlabel("batch size B")
    ax.set_ylabel("total new tokens / s")
    ax.set_title(title, fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ============================================================================ main


def parse_sizes(text: str) -> list[int]:
    sizes = sorted({int(s) for s in text.split(",") if s.strip()})
    if not sizes or sizes[0] < 1:
        raise ValueError(text)
    return sizes


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    parser.add_argument("--dtype", default=None, help="default: float32 on CPU, bf16 on GPU")
    parser.add_argument("--batch-sizes", default=None,
                        help=f"comma-separated B (default: {','.join(map(str, CPU_SIZES))} on "
                             f"a CPU, {','.join(map(str, GPU_SIZES))} on a GPU); B = 1 is "
                             f"always added (the ratios' baseline)")
    parser.add_argument("--prompts", type=int, default=None,
                        help="prompts per batch size, a multiple of every B (default: 8, or the "
                             "least common multiple of the B if larger)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--random-prompts", action="store_true",
                        help="random token prompts of 4-24 tokens instead of HumanEval (tests)")
    parser.add_argument("--prompt-file", default=None,
                        help="JSON file of token id lists (or {label: ids}) instead of HumanEval")
    parser.add_argument("--static", choices=("auto", "eager", "off"), default="auto",
                        help="hf_greedy with the static cache: as transformers runs it "
                             "(auto: compiled on a GPU), eager (disable_compile), or off")
    parser.add_argument("--engine-input", choices=("list", "tensor"), default="list",
                        help="give the engine the batch as token lists (default) or as the "
                             "left-padded tensor with its attention mask")
    parser.add_argument("--no-tune", action="store_true",
                        help="the engine with the 'ouroboros' preset instead of the default "
                             "tuned configuration")
    parser.add_argument("--no-prepack", action="store_true",
                        help="CPU: keep transformers' stock linear kernels")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: 1 on a CPU, torch's default on a GPU)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="start no further batch size once the time spent (loading "
                             "included) plus the next one's expected cost would pass this")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: B = 1, 2, 2 prompts, 16 new tokens")
    parser.add_argument("--target", default=None,
                        help="target model (HF dir or .gguf; default: embedded SmolLM2)")
    parser.add_argument("--draft", default=None,
                        help="draft model (HF dir or .gguf; default: the distilled draft; "
                             "'truncated:N': the target's first N layers)")
    parser.add_argument("--out", default=str(HERE / "results"),
                        help="directory for batch_<device>.md/.json/.png")
    parser.add_argument("--tag", default=None,
                        help="suffix of the output names (batch_<device>[_<tag>].md)")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch_sizes, args.max_new_tokens = "1,2", 16
        args.prompts = 2 if args.prompts is None else args.prompts
    if args.batch_sizes is not None:
        try:
            args.batch_sizes = sorted(set(parse_sizes(args.batch_sizes)) | {1})
        except ValueError:
            parser.error(f"--batch-sizes: expected comma-separated integers >= 1, got "
                         f"{args.batch_sizes!r}")
    if args.prompts is not None and args.prompts < 1:
        parser.error("--prompts must be >= 1")
    if args.max_new_tokens < 1:
        parser.error("--max-new-tokens must be >= 1")
    if args.random_prompts and args.prompt_file:
        parser.error("--random-prompts and --prompt-file exclude each other")
    args.methods = []  # bench_e2e.load_models: no stock copy of the target
    return args


def finish_args(args: argparse.Namespace, device: torch.device) -> None:
    """The defaults that depend on the device."""
    if args.batch_sizes is None:
        args.batch_sizes = list(GPU_SIZES if device.type == "cuda" else CPU_SIZES)
    if args.prompts is None:  # 8, or the smallest multiple of every B above that
        common = math.lcm(*args.batch_sizes)
        args.prompts = common * -(-8 // common)
    # Whole batches only: a smaller last batch would change transformers' static cache
    # (reallocated, and recompiled on a GPU) inside the timed calls.
    misfits = [b for b in args.batch_sizes if args.prompts % b]
    if misfits:
        raise SystemExit(f"bench_batch.py: error: --prompts {args.prompts} is not a multiple "
                         f"of the batch sizes {misfits} (every B decodes the same prompts in "
                         f"whole batches)")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    from ouroboros.models import resolve_device

    device = resolve_device(args.device)
    finish_args(args, device)

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    if args.threads:
        torch.set_num_threads(args.threads)
    elif device.type == "cpu":
        torch.set_num_threads(1)
    load_start = os.getloadavg()
    log(f"bench_batch: loading models on {device} ...")
    target, draft, tokenizer, _ = e2e.load_models(args, device)
    pad, eos = pad_id(target), eos_ids(target)
    if args.random_prompts:
        prompts = random_prompts(args.prompts, target.config.vocab_size)
        prompt_text = f"{len(prompts)} random token prompts of 4-24 tokens"
    elif args.prompt_file:
        prompts = file_prompts(args.prompt_file, args.prompts)
        prompt_text = f"{len(prompts)} prompts from {args.prompt_file}"
    else:
        prompts = e2e.prompt_set("heldout", args.prompts, tokenizer)
        prompt_text = (f"{len(prompts)} held-out HumanEval prompts (82-163, evenly spaced; "
                       f"never the tuning prompts 0-81)")
    if len(prompts) != args.prompts:
        raise SystemExit(f"bench_batch.py: error: only {len(prompts)} prompts available, "
                         f"--prompts asks for {args.prompts}")

    log(f"bench_batch: batch-1 greedy references of {len(prompts)} prompts (untimed) ...")
    refs = references(target, prompts, args.max_new_tokens, pad, eos, log)
    log("bench_batch: building the engine's decoder"
        + ("" if args.no_tune else " (the default tunes once per device and pair)") + " ...")
    engine = Engine(target, draft, not args.no_tune, pad, args.engine_input)
    methods: list = [HFGreedy("hf_dynamic", target, "dynamic", pad, eos)]
    if args.static != "off":
        methods.append(HFGreedy("hf_static", target, "static", pad, eos,
                                compile_static=args.static == "auto"))
    methods.append(engine)

    results: dict[int, dict[str, Cell]] = {}
    skipped: list[int] = []
    last_cost = last_batches = None
    for size in args.batch_sizes:
        batches = len(groups(prompts, size))
        spent = time.perf_counter() - started
        if args.budget_s is not None and last_cost is not None:
            expected = last_cost * (batches + 1) / (last_batches + 1)  # + 1: the warm-up
            if spent + expected > args.budget_s:
                skipped.append(size)
                log(f"bench_batch: B={size} skipped (budget: {spent:.0f} s spent, "
                    f"~{expected:.0f} s expected, budget {args.budget_s:.0f} s)")
                continue
        log(f"== B={size}: {batches} batches, {args.max_new_tokens} new tokens, methods "
            + ", ".join(m.name for m in methods))
        begin = time.perf_counter()
        results[size] = run_size(methods, size, prompts, refs, args.max_new_tokens, log,
                                 diagnose=lambda *a: e2e.logit_gap(target, *a))
        last_cost, last_batches = time.perf_counter() - begin, batches
    elapsed = time.perf_counter() - started
    load_end = os.getloadavg()

    call = ("OuroborosDecoder(target, draft)" if not args.no_tune else
            'OuroborosDecoder(target, draft, "ouroboros")')
    header = e2e.machine_lines(device, torch.get_num_threads())
    header[2] += f", {versions_line()}"
    header += [
        f"target: {type(target).__name__} ({sum(p.numel() for p in target.parameters()) / 1e6:.1f}"
        f"M parameters, {args.target or 'embedded SmolLM2-135M-Instruct'}), draft: "
        f"{args.draft or 'distilled SmolLM2 draft (ouroboros/assets)'} "
        f"({sum(p.numel() for p in draft.parameters()) / 1e6:.1f}M); dtype "
        f"{next(target.parameters()).dtype}; linear weights prepacked: "
        f"{not args.no_prepack and device.type == 'cpu'}",
        f"prompts: {prompt_text}, the same for every B and method, in consecutive groups of "
        f"B; greedy, {args.max_new_tokens} new tokens at most (EOS ends a row earlier); pad "
        f"id {pad}; {elapsed / 60:.1f} min in all",
        f"ouroboros: `{call}` ({e2e.describe(engine.config)}); batch given as "
        f"{'token lists' if args.engine_input == 'list' else 'left-padded tensor + attention_mask'}"
        f"; pool cleared at the start of every B, kept across its batches",
        "hf_greedy: `target.generate(input_ids, attention_mask, do_sample=False, "
        "max_new_tokens, pad_token_id)` on the left-padded batch, dynamic cache and "
        "`cache_implementation=\"static\"` "
        + {"auto": "(transformers' default: " + ("compiled" if device.type == "cuda" else
                                                  "not compiled on a CPU") + ")",
           "eager": "(disable_compile=True: not compiled)", "off": "(not run: --static off)"}
        [args.static] + "; the faster of the two at each B is the baseline",
        f"threads: {torch.get_num_threads()}; load average at start {load_start[0]:.1f} / end "
        f"{load_end[0]:.1f} (1-min; a shared machine makes absolute tokens/s noisy, the "
        f"rotated order keeps the ratios fair)",
        "tokens/s: new tokens of all rows / summed wall time of the calls (prefill "
        "included), after one untimed warm-up per method and B; greedy B=1: the faster "
        "hf_greedy at B = 1; tokens per target pass: the rows' new tokens / the "
        "verification passes each row took part in; target passes per batch: batched "
        "forward passes (ouroboros: verification passes, the prefill not counted; hf: one "
        "per generated position, the prefill included)",
    ]
    notes = []
    for size, cells in results.items():
        for name in ("hf_dynamic", "hf_static"):
            if name in cells and cells[name].mismatches:
                notes.append(f"* Note: transformers' left-padded batch greedy "
                             f"({LABELS[name]}) at B={size} differs from its batch-1 greedy on "
                             f"{len(cells[name].mismatches)} of {cells[name].rows} rows "
                             f"({', '.join(cells[name].mismatches)}): float rounding of "
                             f"padded batches, not an error of this benchmark.")
        shapes = cells["ouroboros"].shapes if "ouroboros" in cells else {}
        if len(shapes) > 1:
            common = sorted(shapes.items(), key=lambda item: -item[1])[:5]
            notes.append(f"* Tree shapes of ouroboros at B={size} (steps): "
                         + ", ".join(f"{s}: {n}" for s, n in common)
                         + f" ({len(shapes)} shapes in all).")
    has_matplotlib = importlib.util.find_spec("matplotlib") is not None
    if not has_matplotlib:
        notes.append("* No plot: matplotlib is not installed (pip install matplotlib).")
    if skipped:
        notes.append(f"* Not run (--budget-s {args.budget_s:.0f} s spent): B = "
                     + ", ".join(map(str, skipped)) + ".")
    text = markdown(results, header, notes)
    print(text)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"batch_{device.type}" + (f"_{args.tag}" if args.tag else "")
    (out / f"{stem}.md").write_text(text + "\n")
    raw = {
        "header": header,
        "notes": notes,
        "batch_sizes": list(results),
        "skipped": skipped,
        "prompts": [label for label, _ in prompts],
        "max_new_tokens": args.max_new_tokens,
        "greedy_b1_tokens_per_second": greedy_b1(results),
        "results": {str(size): {name: {**vars(cell),
                                       "tokens_per_second": cell.tokens_per_second,
                                       "tokens_per_pass": cell.tokens_per_pass}
                                for name, cell in cells.items()}
                    for size, cells in results.items()},
        "baseline": {str(size): best_hf(cells) for size, cells in results.items()},
    }
    (out / f"{stem}.json").write_text(json.dumps(raw, indent=1))
    written = [f"{stem}.md", f"{stem}.json"]
    if results and has_matplotlib:
        plot(results, out / f"{stem}.png",
             f"Batched greedy decoding, {header[1].split(';')[0]}; {header[0]}")
        written.append(f"{stem}.png")
    elif not has_matplotlib:
        log("matplotlib is not installed: no PNG (pip install matplotlib)")
    log(f"wrote {', '.join(str(out / name) for name in written)}")

    failures = {size: cells["ouroboros"].mismatches for size, cells in results.items()
                if "ouroboros" in cells and cells["ouroboros"].mismatches}
    if failures:
        log("\n!!! EXACTNESS FAILURE: ouroboros rows differ from batch-1 greedy:")
        for size, labels in failures.items():
            log(f"!!!   B={size}: {', '.join(labels)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
