"""Tensor-parallel benchmark (issue 14): greedy decoding vs Ouroboros on a target loaded with
transformers' ``tp_plan="auto"`` under ``torchrun``, on the CPU (gloo), and the time spent
in collectives per step.

    python benchmarks/bench_tp.py                         # 2 ranks; tiny + SmolLM2-sized
    python benchmarks/bench_tp.py --models tiny --quick   # smoke run
    python benchmarks/bench_tp.py --out benchmarks/results  # also writes tp_cpu.md / .json

Without ``RANK`` in the environment the script is the launcher: it saves random models
(a tiny Llama with a perturbed copy as the draft; a SmolLM2-135M-shaped Llama, 12 query /
4 KV heads of 48 so that 2 ranks split the heads, untied head, with its own first 6 layers
as the draft)
and runs itself under ``python -m torch.distributed.run --standalone``. Each rank loads the
target tensor parallel and the draft replicated (every rank runs the whole draft: see the
broadcast column for what rank 0 drafting alone would add per step), runs transformers'
greedy ``generate``, the engine's ``greedy`` preset and ``ouroboros`` (cold pool) on the same
prompts, and times every ``torch.distributed.all_reduce`` (the row-parallel layers) and
every DTensor redistribution (the gathered ``lm_head``). Weights are random, so the
acceptance says nothing about real pairs; the point is the cost of tensor parallelism per
pass and that outputs stay identical.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

MODELS = {
    # name: (LlamaConfig kwargs, draft: "perturbed" or number of the target's layers kept)
    "tiny": (dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2),
             "perturbed"),
    "smollm2-sized": (dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                           num_hidden_layers=30, num_attention_heads=12, num_key_value_heads=4,
                           head_dim=48, initializer_range=0.06),
                      6),
}


# ============================================================================ timing


class CollectiveTimer:
    """Wall time of the collectives transformers' tensor parallelism issues at inference:
    ``torch.distributed.all_reduce`` (row-parallel linears) and the redistribution of DTensor
    outputs (the column-parallel ``lm_head`` gathered), each waited for before the clock
    stops."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.calls = 0
        self._patches: list = []

    def _timed(self, function, wait=False):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            result = function(*args, **kwargs)
            if wait and hasattr(result, "wait") and type(result).__name__ == \
                    "AsyncCollectiveTensor":
                result = result.wait()
            self.seconds += time.perf_counter() - start
            self.calls += 1
            return result
        return wrapper

    def __enter__(self) -> CollectiveTimer:
        from torch.distributed.tensor import DTensor

        for owner, name, wait in ((torch.distributed, "all_reduce", False),
                                  (DTensor, "redistribute", True)):
            original = getattr(owner, name)
            self._patches.append((owner, name, original))
            setattr(owner, name, self._timed(original, wait))
        return self

    def __exit__(self, *exc) -> None:
        for owner, name, original in reversed(self._patches):
            setattr(owner, name, original)
        self._patches.clear()


def broadcast_cost(tokens: int, repeats: int = 200) -> float:
    """Median seconds of one ``broadcast`` of ``int64[tokens]`` from rank 0 (what drafting on
    rank 0 only would add per step)."""
    tensor = torch.zeros(tokens, dtype=torch.int64)
    times = []
    for _ in range(repeats):
        torch.distributed.barrier()
        start = time.perf_counter()
        torch.distributed.broadcast(tensor, src=0)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# ============================================================================ worker


def repetitive_prompt(length: int, vocab: int, seed: int) -> torch.Tensor:
    """A random phrase repeated with small changes (text with n-gram structure)."""
    generator = torch.Generator().manual_seed(seed)
    phrase = torch.randint(3, vocab, (8,), generator=generator)
    tokens = phrase.repeat(length // 8 + 1)[:length].clone()
    flips = torch.randint(0, length, (length // 10,), generator=generator)
    tokens[flips] = torch.randint(3, vocab, (len(flips),), generator=generator)
    return tokens[None]


def worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from ouroboros import OuroborosConfig, OuroborosDecoder
    from ouroboros.cache import StaticKVCache

    torch.set_num_threads(1)
    rows = []
    for name in args.models:
        path = Path(args.model_dir) / name
        target = AutoModelForCausalLM.from_pretrained(path / "target", tp_plan="auto",
                                                      dtype=torch.float32).eval()
        draft = AutoModelForCausalLM.from_pretrained(path / "draft",
                                                     dtype=torch.float32).eval()
        vocab = target.config.vocab_size
        prompts = [repetitive_prompt(args.prompt_length, vocab, seed)
                   for seed in range(args.prompts)]
        config = OuroborosConfig.preset("ouroboros")
        decoders = {"greedy (engine)": OuroborosDecoder(target, None, "greedy"),
                    "ouroboros": OuroborosDecoder(target, draft, config)}
        with torch.inference_mode():  # warm-up (allocations, first-call costs)
            target.generate(prompts[0][:, :8], max_new_tokens=4, do_sample=False)
            for decoder in decoders.values():
                decoder.generate(prompts[0][:, :8], 4, eos_token_id=[])
        totals = {method: dict(tokens=0, seconds=0.0, passes=0, collective=0.0, calls=0,
                               draft=0.0, identical=True)
                  for method in ("greedy (transformers)", *decoders)}
        for prompt in prompts:
            reference = None
            for method in totals:
                dist.barrier()
                with CollectiveTimer() as timer:
                    start = time.perf_counter()
                    if method == "greedy (transformers)":
                        with torch.inference_mode():
                            output = target.generate(prompt, max_new_tokens=args.max_new_tokens,
                                                     do_sample=False, eos_token_id=None)
                        passes = output.shape[1] - prompt.shape[1]
                        draft_time = 0.0
                    else:
                        result = decoders[method].generate(prompt, args.max_new_tokens,
                                                           eos_token_id=[])
                        output = result.sequences
                        passes = result.stats.target_passes + result.stats.prefill_passes
                        draft_time = result.stats.time_draft
                    seconds = time.perf_counter() - start
                new = output.shape[1] - prompt.shape[1]
                if reference is None:
                    reference = output
                entry = totals[method]
                entry["tokens"] += new
                entry["seconds"] += seconds
                entry["passes"] += passes
                entry["collective"] += timer.seconds
                entry["calls"] += timer.calls
                entry["draft"] += draft_time
                entry["identical"] &= bool(torch.equal(output, reference))
        gamma = config.gamma
        broadcast = broadcast_cost(gamma + 1)
        cache = decoders["ouroboros"]._caches["target"]
        layers, local_heads, head_dim = StaticKVCache.geometry(target)
        full_bytes = 2 * layers * target.config.num_key_value_heads * cache.max_length * \
            head_dim * 4  # one process: every KV head, float32
        for method, entry in totals.items():
            steps = max(entry["passes"], 1)
            rows.append(dict(
                model=name, method=method, tokens=entry["tokens"],
                tok_s=entry["tokens"] / entry["seconds"],
                tokens_per_pass=entry["tokens"] / steps, passes=entry["passes"],
                collective_ms_per_step=1e3 * entry["collective"] / steps,
                collectives_per_step=entry["calls"] / steps,
                collective_share=entry["collective"] / entry["seconds"],
                draft_ms_per_step=1e3 * entry["draft"] / steps,
                broadcast_us=1e6 * broadcast if method == "ouroboros" else None,
                identical=entry["identical"],
                cache_bytes_rank=cache.nbytes if method == "ouroboros" else None,
                cache_bytes_single=full_bytes if method == "ouroboros" else None))
        del target, draft, decoders
    if dist.get_rank() == 0:
        Path(args.result).write_text(json.dumps(rows))
    dist.barrier()
    dist.destroy_process_group()


# ============================================================================ launcher


def save_models(names: list[str], directory: Path) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    from engine_models import perturbed
    from transformers import LlamaConfig, LlamaForCausalLM

    for name in names:
        kwargs, draft_kind = MODELS[name]
        config = LlamaConfig(max_position_embeddings=2048, bos_token_id=1, eos_token_id=2,
                             pad_token_id=0, **{"tie_word_embeddings": False, **kwargs})
        torch.manual_seed(0)
        target = LlamaForCausalLM(config).eval()
        target.generation_config.eos_token_id = None
        target.generation_config.pad_token_id = 0
        if draft_kind == "perturbed":
            draft = perturbed(target, 0.05, seed=1)
        else:  # the target's first layers, its norm and head: a cheap self-draft
            draft_config = copy.deepcopy(config)
            draft_config.num_hidden_layers = draft_kind
            draft = LlamaForCausalLM(draft_config).eval()
            draft.load_state_dict(target.state_dict(), strict=False)
            draft.generation_config = target.generation_config
        target.save_pretrained(directory / name / "target")
        draft.save_pretrained(directory / name / "draft")


def machine() -> str:
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    return f"{name}, {os.cpu_count()} cores"


def versions() -> str:
    import transformers

    parts = [f"torch {torch.__version__}", f"transformers {transformers.__version__}"]
    with contextlib.suppress(ImportError):
        import accelerate

        parts.append(f"accelerate {accelerate.__version__}")
    parts.append(f"Python {platform.python_version()}")
    return ", ".join(parts)


def table(rows: list[dict]) -> str:
    lines = ["| model | method | tok/s | tokens/pass | target passes | collectives/step | "
             "collective ms/step | share of time | draft ms/step | identical |",
             "|---|---|--:|--:|--:|--:|--:|--:|--:|---|"]
    for row in rows:
        lines.append(
            f"| {row['model']} | {row['method']} | {row['tok_s']:.1f} | "
            f"{row['tokens_per_pass']:.2f} | {row['passes']} | "
            f"{row['collectives_per_step']:.1f} | {row['collective_ms_per_step']:.2f} | "
            f"{100 * row['collective_share']:.0f}% | {row['draft_ms_per_step']:.2f} | "
            f"{'yes' if row['identical'] else 'NO'} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--world", type=int, default=2, help="ranks (default 2)")
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--prompt-length", type=int, default=48)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--quick", action="store_true", help="1 prompt, 16 new tokens")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for tp_cpu.md and tp_cpu.json")
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.prompts, args.max_new_tokens = 1, 16
    if "RANK" in os.environ:
        worker(args)
        return 0

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        save_models(args.models, tmp)
        result = tmp / "result.json"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={args.world}", __file__, "--models", *args.models,
                   "--prompts", str(args.prompts), "--prompt-length", str(args.prompt_length),
                   "--max-new-tokens", str(args.max_new_tokens), "--model-dir", str(tmp),
                   "--result", str(result)]
        env = dict(os.environ, OMP_NUM_THREADS="1", TRITON_INTERPRET="0",
                   PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        start = time.time()
        subprocess.run(command, env=env, check=True)
        rows = json.loads(result.read_text())
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    ouroboros_rows = [r for r in rows if r["method"] == "ouroboros"]
    notes = [f"- {r['model']}: rank 0 drafting alone, tokens broadcast: +{r['broadcast_us']:.0f} "
             f"µs per step (one broadcast of γ+1 tokens, median of 200), against "
             f"{r['draft_ms_per_step']:.2f} ms of replicated draft per step that every rank "
             f"spends at the same time" for r in ouroboros_rows]
    notes += [f"- {r['model']}: target KV cache per rank {r['cache_bytes_rank']} bytes"
              + (f" = 1/{args.world} of one process's {r['cache_bytes_single']}"
                 if r["cache_bytes_single"] else "") for r in ouroboros_rows]
    text = "\n".join([
        f"# Tensor parallel on the CPU ({args.world} ranks, gloo)", "",
        f"- date: {datetime.date.today().isoformat()}; machine: {machine()}; load average "
        f"at the end: {load}; {time.time() - start:.0f} s",
        f"- {versions()}; float32, one thread per rank, random weights",
        f"- command: `python benchmarks/bench_tp.py --models {' '.join(args.models)} "
        f"--prompts {args.prompts} --prompt-length {args.prompt_length} --max-new-tokens "
        f"{args.max_new_tokens}`",
        "- per step: per target pass (prefill included); collectives: every "
        "`torch.distributed.all_reduce` and DTensor redistribution, waited for", "",
        table(rows), "", *notes, ""])
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "tp_cpu.md").write_text(text)
        (args.out / "tp_cpu.json").write_text(json.dumps(
            {"date": datetime.date.today().isoformat(), "machine": machine(),
             "versions": versions(), "world": args.world, "rows": rows}, indent=1))
    return 0 if all(r["identical"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
