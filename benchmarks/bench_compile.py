"""Captured passes against the eager device step (issue 12, item 2): tokens/s of
``OuroborosConfig(step="device", compile=...)`` and of the same configuration eager, with
the compile time reported apart.

For every configuration of ``--configs`` (device-step configurations, `CONFIGS`) two
decoders are made on the same models (default: SmolLM2-135M-Instruct and the shipped
draft): the eager device step and the compiled one (``--mode``, default ``True``: CUDA
graphs on CUDA, inductor on the CPU). Both first decode the batch with the longest prompts
untimed: for the compiled decoder this call compiles the pass shapes of the run (each shape
compiles on its first use and says so on stderr; a batch also compiles the smaller batch
sizes it shrinks to as rows end); its compile seconds (`ouroboros.compiled.compile_times`)
and its wall time are reported. Then both decode every prompt (default: held-out HumanEval
problems 82-163, evenly spaced; never the tuning prompts 0-81) in consecutive batches of
``--batch-size`` (default 1), greedy, ``--max-new-tokens`` at most, their order alternating
per batch; tokens/s = new tokens / summed wall time of the calls (prefill included, eager
in both). Each decoder keeps its pool across the prompts (the same prompts in the same
order: the same pools, the same trees).

Exactness: the compiled decoder's tokens must equal the eager decoder's on every prompt;
any difference is an error (exit status 1 after the results are written). Graphs compiled
during the timed calls (recompiles, or a batch size first reached there) are counted and
reported.

Outputs (``--out``, default ``benchmarks/results``): ``compile_<device>[_<tag>].md`` (table,
machine, versions, date, threads) and ``.json``.

Usage::

    python benchmarks/bench_compile.py --device cpu --prompts 3 --max-new-tokens 64 \
        --threads 1 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tools/ (prompt sets)
sys.path.insert(0, str(HERE))  # bench_e2e: model loading, prompt sets, machine lines

import bench_e2e as e2e  # noqa: E402
import torch  # noqa: E402

from ouroboros.config import OuroborosConfig  # noqa: E402

# Device-step configurations (what `ouroboros.device_step` runs).
CONFIGS = {
    "greedy": lambda: OuroborosConfig.preset("greedy", step="device"),
    "speculative": lambda: OuroborosConfig.preset("speculative", gamma=4, step="device"),
    "suffixes": lambda: OuroborosConfig(gamma=3, draft_phrases=0, num_suffixes=3,
                                        step="device"),
    "roots": lambda: OuroborosConfig(gamma=3, draft_phrases=0, num_suffixes=2,
                                     root_phrases=2, step="device"),
    "suffixes-only": lambda: OuroborosConfig.preset("lookahead", window=False,
                                                    num_suffixes=4, step="device"),
    "ouroboros": lambda: OuroborosConfig.preset("ouroboros", step="device"),
    "lookahead": lambda: OuroborosConfig.preset("lookahead", step="device"),
}
DEFAULT_CONFIGS = ("speculative", "suffixes")


@dataclass
class Result:
    """One configuration: eager and compiled totals over the timed prompts."""

    config: str
    description: str
    eager_tokens: int = 0
    eager_seconds: float = 0.0
    compiled_tokens: int = 0
    compiled_seconds: float = 0.0
    compile_seconds: float = 0.0  # sum of the first calls of every pass shape
    shapes: list = field(default_factory=list)  # (pass, shape, seconds)
    first_call_seconds: float = 0.0  # the compiled decoder's untimed warm-up call
    recompiles: int = 0  # graphs compiled during the timed calls
    mismatches: list = field(default_factory=list)  # prompt labels

    @property
    def eager_rate(self) -> float:
        return self.eager_tokens / self.eager_seconds if self.eager_seconds else 0.0

    @property
    def compiled_rate(self) -> float:
        return self.compiled_tokens / self.compiled_seconds if self.compiled_seconds else 0.0


def _timed(decoder, prompts: list[list[int]], max_new_tokens: int, device,
           ) -> tuple[list[list[int]], float]:
    """Every row's new tokens and the wall time of one call (a batch of ``len(prompts)``)."""
    e2e._synchronize(device)
    start = time.perf_counter()
    result = decoder.generate(prompts, max_new_tokens)
    e2e._synchronize(device)
    return result.new_tokens, time.perf_counter() - start


def run_config(name: str, target, draft, prompts: list[tuple[str, list[int]]],
               max_new_tokens: int, mode, device, batch_size: int = 1) -> Result:
    from ouroboros import compiled
    from ouroboros.decoder import OuroborosDecoder

    config = CONFIGS[name]()
    use = draft if config.use_draft else None
    eager = OuroborosDecoder(target, use, config)
    fast = OuroborosDecoder(target, use, config.replace(compile=mode))
    result = Result(name, e2e.describe(config))
    batches = [prompts[i:i + batch_size] for i in range(0, len(prompts), batch_size)]
    longest = max(batches, key=lambda batch: max(len(ids) for _, ids in batch))
    longest = [ids for _, ids in longest]
    _timed(eager, longest, max_new_tokens, device)
    times_before = len(compiled.compile_times())
    _, result.first_call_seconds = _timed(fast, longest, max_new_tokens, device)
    new = compiled.compile_times()[times_before:]
    result.shapes = [(label, list(shape), round(seconds, 2)) for label, shape, seconds in new]
    result.compile_seconds = sum(seconds for _, _, seconds in new)
    graphs = compiled.graph_count()
    for index, batch in enumerate(batches):
        order = (("eager", eager), ("compiled", fast))
        outputs = {}
        for kind, decoder in order if index % 2 == 0 else order[::-1]:
            rows, seconds = _timed(decoder, [ids for _, ids in batch], max_new_tokens, device)
            outputs[kind] = rows
            count = sum(len(row) for row in rows)
            setattr(result, f"{kind}_tokens", getattr(result, f"{kind}_tokens") + count)
            setattr(result, f"{kind}_seconds", getattr(result, f"{kind}_seconds") + seconds)
        for (label, _), eager_row, compiled_row in zip(batch, outputs["eager"],
                                                       outputs["compiled"]):
            if eager_row != compiled_row:
                result.mismatches.append(label)
        print(f"bench_compile: {name} {', '.join(label for label, _ in batch)}: eager "
              f"{sum(map(len, outputs['eager']))} tokens, compiled "
              f"{sum(map(len, outputs['compiled']))} tokens", file=sys.stderr, flush=True)
    result.recompiles = compiled.graph_count() - graphs
    return result


def markdown(results: list[Result], header: list[str], mode: str) -> str:
    lines = ["# Captured passes: compiled vs eager device step", ""]
    lines += [f"* {h}" for h in header]
    lines += ["", f"| config | eager tok/s | compiled ({mode}) tok/s | compiled / eager | "
              "compile s (shapes) | first call s | recompiles | exact |",
              "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        ratio = r.compiled_rate / r.eager_rate if r.eager_rate else 0.0
        exact = "yes" if not r.mismatches else f"NO ({', '.join(r.mismatches)})"
        lines.append(f"| `{r.config}` | {r.eager_rate:.2f} | {r.compiled_rate:.2f} | "
                     f"{ratio:.2f}x | {r.compile_seconds:.1f} ({len(r.shapes)}) | "
                     f"{r.first_call_seconds:.1f} | {r.recompiles} | {exact} |")
    lines += ["", "Configurations and compiled pass shapes (seconds each took to compile):", ""]
    for r in results:
        shapes = ", ".join(f"{label.split()[0]} {shape} {seconds:.1f} s"
                           for label, shape, seconds in r.shapes) or "none (compiled earlier)"
        lines.append(f"* `{r.config}`: {r.description}; {shapes}")
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    parser.add_argument("--dtype", default=None, help="default: float32 on CPU, bf16 on GPU")
    parser.add_argument("--prompts", type=int, default=3,
                        help="held-out HumanEval prompts (82-163, evenly spaced; default 3)")
    parser.add_argument("--random-prompts", action="store_true",
                        help="random token prompts instead (tests on tiny models)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=1,
                        help="prompts per call, consecutive groups (default 1)")
    parser.add_argument("--configs", default=",".join(DEFAULT_CONFIGS),
                        help=f"comma-separated device-step configurations (default: "
                             f"{','.join(DEFAULT_CONFIGS)}; all: {','.join(CONFIGS)})")
    parser.add_argument("--mode", default="true",
                        help="OuroborosConfig.compile: true (default), default, "
                             "reduce-overhead or aot_eager")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--target", default=None,
                        help="target model (HF dir or .gguf; default: embedded SmolLM2)")
    parser.add_argument("--draft", default=None,
                        help="draft model (HF dir or .gguf; default: the distilled draft)")
    parser.add_argument("--out", default=str(HERE / "results"),
                        help="directory for compile_<device>[_<tag>].md/.json")
    parser.add_argument("--tag", default=None, help="suffix of the output names")
    args = parser.parse_args(argv)
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = sorted(set(args.configs) - set(CONFIGS))
    if unknown:
        parser.error(f"unknown configs {unknown}; choose from {', '.join(CONFIGS)}")
    args.mode = {"true": True, "on": True}.get(args.mode.lower(), args.mode)
    try:
        OuroborosConfig(step="device", compile=args.mode)
    except ValueError as err:
        parser.error(f"--mode: {err}")
    if min(args.max_new_tokens, args.prompts, args.threads, args.batch_size) < 1:
        parser.error("--max-new-tokens, --prompts, --threads and --batch-size must be >= 1")
    args.no_prepack, args.methods = True, []  # e2e.load_models: the models as loaded
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    from ouroboros.compiled import resolve_mode
    from ouroboros.models import resolve_device

    device = resolve_device(args.device)
    torch.set_num_threads(args.threads)
    target, draft, tokenizer, _ = e2e.load_models(args, device)
    if args.random_prompts:
        from bench_batch import random_prompts

        prompts = random_prompts(args.prompts, target.config.vocab_size)
    else:
        prompts = e2e.prompt_set("heldout", args.prompts, tokenizer)
    mode = resolve_mode(args.mode, device)
    results = []
    for name in args.configs:
        results.append(run_config(name, target, draft, prompts, args.max_new_tokens,
                                  args.mode, device, args.batch_size))
    header = e2e.machine_lines(device, args.threads) + [
        f"models: {args.target or 'SmolLM2-135M-Instruct'} / {args.draft or 'shipped draft'}"
        f" ({next(target.parameters()).dtype}, linear weights not prepacked)",
        f"prompts: {len(prompts)} ({'random' if args.random_prompts else 'held-out HumanEval'}"
        f"), greedy, at most {args.max_new_tokens} new tokens, batches of {args.batch_size}",
        "tok/s: new tokens / wall time of the calls (eager prefill included), after one "
        "untimed call on the batch with the longest prompt; compile s: the first calls of "
        "every pass shape (in the untimed call), apart",
    ]
    text = markdown(results, header, mode)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"compile_{device.type}" + (f"_{args.tag}" if args.tag else "")
    (out / f"{stem}.md").write_text(text)
    (out / f"{stem}.json").write_text(json.dumps(
        {"header": header, "mode": mode,
         "results": [{**asdict(r), "eager_rate": r.eager_rate, "compiled_rate": r.compiled_rate}
                     for r in results]}, indent=2) + "\n")
    print(text)
    failed = [r.config for r in results if r.mismatches]
    if failed:
        print(f"bench_compile: compiled tokens differ from the eager step's: {failed}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
