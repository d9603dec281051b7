"""Launch-settings sweep of the tree-attention kernel on the memory-bound shapes.

`ouroboros_kernels.tree_attention` picks its tiles and split count with a heuristic
(`default_config`: no autotuning at run time, a decoding step must not benchmark). This
script measures, for each memory-bound target shape of `bench_tree_attention.py` (T <= 64,
prefix >= 2048, bf16), the heuristic's choice and a grid of alternatives, and reports the
best one found, its time and its % of the card's copy bandwidth next to the heuristic's:
the data to re-fit the heuristic on a card (run it wherever a GPU is at hand).

Grid: block_m in {16, 32, 64, 128} (>= the GQA group, at most the stacked rows rounded up),
block_n in {32, 64, 128}, num_warps in {4, 8}, num_stages 3 (2 for block_n = 128),
num_splits in {1, 2, 4, 8, 16, 32} (at least one column tile per split), each split config also
with the experimental fused merge (the last split program merges: one launch less); configs
that do not fit the shared memory or fail to compile are skipped. Timing as in bench_tree_attention
(CUDA graphs, inputs rotated past the L2 cache).

Usage: ``python benchmarks/sweep_tree_attention.py [--quick] [--out DIR] [--budget-s S]``.
Writes ``tree_attention_sweep_<card>.md`` and ``.json`` (the best config per shape). Prints
"needs a GPU" and exits 0 without CUDA.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import sys
import time
from dataclasses import replace

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_tree_attention import (  # noqa: E402
    DTYPE,
    Case,
    Shape,
    all_shapes,
    copy_bandwidth_gbs,
    time_call,
)

BLOCK_M = (16, 32, 64, 128)
BLOCK_N = (32, 64, 128)
WARPS = (4, 8)
SPLITS = (1, 2, 4, 8, 16, 32)


def candidates(shape: Shape):
    """The grid of TreeAttentionConfig for one shape (before the shared-memory check)."""
    from triton import next_power_of_2

    from ouroboros_kernels.tree_attention import TreeAttentionConfig

    num_q_heads, num_kv_heads, _ = shape.heads
    group = num_q_heads // num_kv_heads
    rows = next_power_of_2(shape.num_new * group)
    max_len = shape.prefix + shape.num_new
    for block_m, block_n, warps, splits in itertools.product(BLOCK_M, BLOCK_N, WARPS, SPLITS):
        if block_m < max(16, group) or block_m > max(16, rows):
            continue
        if splits > 1 and splits * block_n > max_len:
            continue
        config = TreeAttentionConfig(block_m, block_n, warps, 2 if block_n >= 128 else 3, splits)
        yield config
        if splits > 1:  # the experimental single-launch merge, measured beside the two-kernel one
            yield replace(config, fused_merge=True)


def fits(config, head_dim: int) -> bool:
    from triton import next_power_of_2

    from ouroboros_kernels.tree_attention import _device_limits, _shared_bytes

    _, limit = _device_limits(torch.cuda.current_device())
    return _shared_bytes(config, max(16, next_power_of_2(head_dim)), DTYPE.itemsize) <= limit


def device_index() -> int | None:
    return torch.cuda.current_device()


def sweep_shape(shape: Shape, deadline: float) -> dict:
    """Time the heuristic's config and every candidate that fits (until ``deadline``);
    each candidate's output must match the heuristic's within bf16 rounding."""
    from ouroboros_kernels.tree_attention import default_config, tree_attention_triton

    num_q_heads, num_kv_heads, head_dim = shape.heads
    case = Case(shape)
    heuristic = default_config(shape.num_new, num_q_heads // num_kv_heads, head_dim,
                               case.q[0].dtype, shape.batch, num_kv_heads,
                               shape.prefix + shape.num_new, device_index())

    def runner(config):
        def call(i):
            cache = case.caches[i]
            return tree_attention_triton(case.q[i], cache[0], cache[1], case.prefix_lens,
                                         case.tree_mask, out=case.out, config=config)
        return call

    reference = runner(heuristic)(0).float().clone()
    results = {heuristic: time_call(runner(heuristic), case.rotations)[0]}
    tried = failed = 0
    for config in candidates(shape):
        if time.time() > deadline:
            break
        if config in results or not fits(config, head_dim):
            continue
        tried += 1
        call = runner(config)
        try:
            got = call(0).float()
        except Exception:  # noqa: BLE001 - a config that does not compile or launch: skipped
            failed += 1
            continue
        diff = (got - reference).abs().max().item()
        if not diff <= 0.05:  # a config must not change the result beyond bf16 rounding
            raise AssertionError(f"{shape}: config {config} gives max|d| {diff:.2e} against "
                                 "the heuristic's output")
        results[config] = time_call(call, case.rotations)[0]
    best = min(results, key=results.get)
    return {"shape": shape, "heuristic": heuristic, "heuristic_us": results[heuristic],
            "best": best, "best_us": results[best], "tried": tried, "failed": failed,
            "top": sorted(results.items(), key=lambda item: item[1])[:3]}


def config_text(config) -> str:
    return (f"m{config.block_m} n{config.block_n} w{config.num_warps} s{config.num_stages} "
            f"x{config.num_splits}{' fused' if config.fused_merge else ''}")


def report(rows, skipped, card, copy_bw, seconds, budget_s) -> list[str]:
    """The markdown table of a sweep (one row per shape)."""
    import triton

    def pct(row, key):
        return 100 * row["shape"].bytes_moved() / row[key] / 1e3 / copy_bw

    lines = [
        f"# Tree-attention launch settings on {card}",
        "",
        f"Measured {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')} by "
        f"`benchmarks/sweep_tree_attention.py` in {seconds:.0f} s: torch "
        f"{torch.__version__}, triton {triton.__version__}, CUDA {torch.version.cuda}, Python "
        f"{platform.python_version()}. bf16; copy bandwidth {copy_bw:.0f} GB/s (this run). "
        "Config = m block_m, n block_n, w warps, s stages, x splits (fused: the last split "
        "program merges, no second kernel). `% BW` = bytes "
        "(prefix + tree K/V once per KV head, q, out, mask) / time / copy bandwidth.",
        "",
        "| model | B | T | prefix | heuristic | us | % BW | best found | us | % BW | "
        "speed-up | configs tried |",
        "|---|--:|--:|--:|---|--:|--:|---|--:|--:|--:|--:|",
    ]
    for row in rows:
        s = row["shape"]
        lines.append(
            f"| {s.model} | {s.batch} | {s.num_new} | {s.prefix} | "
            f"{config_text(row['heuristic'])} | {row['heuristic_us']:.1f} | "
            f"{pct(row, 'heuristic_us'):.0f} | {config_text(row['best'])} | "
            f"{row['best_us']:.1f} | {pct(row, 'best_us'):.0f} | "
            f"{row['heuristic_us'] / row['best_us']:.2f}x | {row['tried']} |")
    if rows:
        best_bw = sorted(pct(r, "best_us") for r in rows)
        lines += ["", f"* best found: % copy BW min {best_bw[0]:.0f}, median "
                  f"{best_bw[len(best_bw) // 2]:.0f}, max {best_bw[-1]:.0f}; >= 80 in "
                  f"{sum(b >= 80 for b in best_bw)} of {len(best_bw)} shapes."]
    if skipped:
        lines += ["", f"Not swept (budget of {budget_s:.0f} s spent): "
                  + ", ".join(f"{s.model} B{s.batch} T{s.num_new} P{s.prefix}" for s in skipped)]
    return lines


def json_rows(rows) -> list[dict]:
    """Per shape: the heuristic's config and time and the three fastest configs found."""
    return [{"model": r["shape"].model, "batch": r["shape"].batch,
             "num_new": r["shape"].num_new, "prefix": r["shape"].prefix,
             "heuristic": vars(r["heuristic"]), "heuristic_us": r["heuristic_us"],
             "top": [{"config": vars(c), "us": us} for c, us in r["top"]]} for r in rows]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="the quick grid's shapes (Llama-3-8B and SmolLM2-135M)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"),
                        help="directory for tree_attention_sweep_<card>.{md,json}")
    parser.add_argument("--budget-s", type=float, default=240.0,
                        help="stop sweeping after this many seconds (default 240)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("sweep_tree_attention: needs a GPU (CUDA not available); nothing measured.")
        return 0
    began = time.time()
    deadline = began + args.budget_s
    card = torch.cuda.get_device_name()
    copy_bw = copy_bandwidth_gbs()
    shapes = [s for s in all_shapes(args.quick) if s.memory_bound_target()]
    rows, skipped = [], []
    for shape in shapes:
        if time.time() > deadline:
            skipped.append(shape)
            continue
        row = sweep_shape(shape, deadline)
        torch.cuda.empty_cache()
        rows.append(row)
        print(f"{shape.model:13s} B{shape.batch} T{shape.num_new:<3d} P{shape.prefix:<6d} "
              f"heuristic {row['heuristic_us']:7.1f} us ({config_text(row['heuristic'])}), "
              f"best {row['best_us']:7.1f} us ({config_text(row['best'])}), "
              f"{row['tried']} tried", flush=True)

    lines = report(rows, skipped, card, copy_bw, time.time() - began, args.budget_s)
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs(args.out, exist_ok=True)
    slug = "".join(c if c.isalnum() else "_" for c in card.lower()).strip("_")
    path = os.path.join(args.out, f"tree_attention_sweep_{slug}")
    with open(path + ".md", "w") as handle:
        handle.write(text)
    with open(path + ".json", "w") as handle:
        json.dump(json_rows(rows), handle, indent=1)
    print(f"wrote {path}.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
