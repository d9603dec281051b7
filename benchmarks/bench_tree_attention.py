"""Tree-attention microbenchmark: our Triton kernel against the paths a tree takes today.

For each shape (attention of one layer: model heads, batch B, tree size T, prefix length P,
bf16) the T new tokens attend to the P cached tokens and to their tree ancestors:

* ``ours``: `ouroboros_kernels.tree_attention` (packed tree mask, GQA in the kernel,
  split-KV chosen by the heuristic; the chosen tiles are listed);
* ``sdpa``: what transformers does for a tree today: ``repeat_kv`` of the cache, then
  ``scaled_dot_product_attention`` with a materialised 4D additive mask (the mask itself is
  built once per forward, outside the timed call, as transformers shares it across layers);
* ``flex``: PyTorch FlexAttention (compiled) with a block mask built from the tree, on a
  subset of shapes (each new shape recompiles);
* ``flashinfer``: ``single_prefill_with_kv_cache`` with a custom mask, B = 1, if importable.

Measured in the same run: the card's copy bandwidth (1 GiB device-to-device copy, read +
write bytes) and bf16 matmul throughput (8192^3). Each of our timings is reported as % of
the roofline ``max(bytes / copy_bw, flops / matmul_flops)`` with bytes = the prefix and tree
K/V read once per KV head + q + out + mask, flops = ``4 B Hq T (P + T) D``, and as a ratio
to every baseline (``x sdpa`` > 1: ours is faster).

Timing: every call is captured in a CUDA graph (``inner`` calls per graph, replayed), so
launch overhead is excluded for all implementations alike; inputs rotate over enough copies
of the KV cache to exceed the L2 cache. A call that cannot be captured is timed eagerly and
marked ``*``. Outputs are checked against SDPA (``max|d|``).

Usage: ``python benchmarks/bench_tree_attention.py [--quick] [--out DIR] [--budget-s S]``.
Prints "needs a GPU" and exits 0 without CUDA. Shapes run in priority order (the
memory-bound targets first) until ``--budget-s`` is spent; skipped shapes are listed.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import sys
import time
from dataclasses import dataclass

import torch

MODELS = {  # name: (Hq, Hkv, D)
    "Llama-3-8B": (32, 8, 128),
    "Llama-2-7B": (32, 32, 128),
    "Llama-2-70B": (64, 8, 128),
    "SmolLM2-135M": (9, 3, 64),
}
TREE_SIZES = (1, 16, 64, 128, 256, 512)
PREFIXES = (512, 2048, 8192, 32768)
BATCHES = (1, 8)
# FlexAttention recompiles per shape (seconds each): measured on these only.
FLEX_SHAPES = {("Llama-3-8B", 1, 16, 2048), ("Llama-3-8B", 1, 64, 8192),
               ("Llama-3-8B", 8, 16, 8192), ("Llama-3-8B", 8, 64, 2048),
               ("Llama-3-8B", 1, 256, 2048), ("Llama-3-8B", 1, 1, 32768)}
L2_ROTATION_BYTES = 256 << 20
DTYPE = torch.bfloat16


@dataclass
class Shape:
    model: str
    batch: int
    num_new: int
    prefix: int

    @property
    def heads(self) -> tuple[int, int, int]:
        return MODELS[self.model]

    def memory_bound_target(self) -> bool:
        return self.num_new <= 64 and self.prefix >= 2048

    def bytes_moved(self) -> int:
        num_q_heads, num_kv_heads, head_dim = self.heads
        elem = DTYPE.itemsize
        kv = 2 * self.batch * num_kv_heads * (self.prefix + self.num_new) * head_dim * elem
        q_out = 2 * self.batch * self.num_new * num_q_heads * head_dim * elem
        mask = self.batch * self.num_new * math.ceil(self.num_new / 32) * 4
        return kv + q_out + mask

    def flops(self) -> int:
        num_q_heads, _, head_dim = self.heads
        return 4 * self.batch * num_q_heads * self.num_new * (self.prefix + self.num_new) * head_dim


def all_shapes(quick: bool) -> list[Shape]:
    models = ("Llama-3-8B", "SmolLM2-135M") if quick else tuple(MODELS)
    sizes = (1, 16, 64, 256) if quick else TREE_SIZES
    prefixes = (2048, 8192) if quick else PREFIXES
    shapes = [Shape(m, b, t, p) for m in models for b in BATCHES for t in sizes for p in prefixes]
    # Priority: the memory-bound targets, then by model order, then growing cost.
    model_rank = {m: i for i, m in enumerate(MODELS)}
    return sorted(shapes, key=lambda s: (not s.memory_bound_target(), model_rank[s.model],
                                         s.batch * s.num_new * (s.prefix + s.num_new)))


# ----------------------------------------------------------------------------- timing


def time_call(fn, rotations: int) -> tuple[float, bool]:
    """Microseconds per call of ``fn(i)`` (i = rotation index); (time, captured_in_graph)."""
    fn(0)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(3):
        fn(i % rotations)
    end.record()
    end.synchronize()
    estimate_ms = max(start.elapsed_time(end) / 3, 1e-3)
    inner = max(1, min(64, int(2.0 / estimate_ms)))
    replays = max(3, min(20, int(40.0 / (estimate_ms * inner))))
    try:
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn(0)  # warm up on the capture stream
            with torch.cuda.graph(graph, stream=stream):
                for i in range(inner):
                    fn(i % rotations)
        torch.cuda.current_stream().wait_stream(stream)
        graph.replay()
        torch.cuda.synchronize()
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) * 1e3 / (replays * inner), True
    except Exception:  # noqa: BLE001 - not capturable: time eagerly (launches included)
        torch.cuda.synchronize()
        start.record()
        for i in range(replays * inner):
            fn(i % rotations)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) * 1e3 / (replays * inner), False


def copy_bandwidth_gbs() -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    us, _ = time_call(lambda i: dst.copy_(src), 1)
    return 2 * (1 << 30) / (us * 1e-6) / 1e9


def launch_floor_us() -> float:
    """A one-element kernel per call in a CUDA graph: the time below which no kernel goes."""
    x = torch.zeros(1, device="cuda")
    us, _ = time_call(lambda i: x.add_(1), 1)
    return us


def matmul_tflops() -> float:
    a = torch.randn(8192, 8192, dtype=DTYPE, device="cuda")
    b = torch.randn(8192, 8192, dtype=DTYPE, device="cuda")
    us, _ = time_call(lambda i: a @ b, 1)
    return 2 * 8192**3 / (us * 1e-6) / 1e12


# ----------------------------------------------------------------------------- implementations


def random_tree(num_new: int, gen: torch.Generator) -> torch.Tensor:
    """A draft chain (up to 8 nodes) with random branches hanging from any earlier node."""
    parents = [i - 1 for i in range(min(num_new, 8))]
    for i in range(len(parents), num_new):
        parents.append(int(torch.randint(-1, i, (1,), generator=gen)))
    return torch.tensor(parents, dtype=torch.int32)


class Case:
    """Inputs of one shape, rotated over copies to defeat the L2 cache."""

    def __init__(self, shape: Shape) -> None:
        from ouroboros_kernels import build_tree, unpack_tree_mask

        gen = torch.Generator().manual_seed(shape.num_new * 7 + shape.prefix)
        num_q_heads, num_kv_heads, head_dim = shape.heads
        self.shape = shape
        max_len = shape.prefix + shape.num_new
        kv_bytes = 2 * shape.batch * num_kv_heads * max_len * head_dim * DTYPE.itemsize
        self.rotations = max(1, min(8, math.ceil(L2_ROTATION_BYTES / kv_bytes)))
        self.caches = [torch.randn(2, shape.batch, num_kv_heads, max_len, head_dim,
                                   dtype=DTYPE, device="cuda") for _ in range(self.rotations)]
        self.q = [torch.randn(shape.batch, shape.num_new, num_q_heads, head_dim, dtype=DTYPE,
                              device="cuda") for _ in range(self.rotations)]
        self.prefix_lens = torch.full((shape.batch,), shape.prefix, dtype=torch.int32,
                                      device="cuda")
        parents = random_tree(shape.num_new, gen)
        self.tree_mask, _ = build_tree(parents.cuda())
        self.tree_mask = self.tree_mask[None]  # one tree shared by the batch
        self.visible_tree = unpack_tree_mask(self.tree_mask[0], shape.num_new)  # [T, T] bool
        self.out = torch.empty_like(self.q[0])

    def full_visible(self) -> torch.Tensor:
        """bool [T, P + T]: the whole mask over the cache columns."""
        prefix = torch.ones(self.shape.num_new, self.shape.prefix, dtype=torch.bool,
                            device="cuda")
        return torch.cat([prefix, self.visible_tree], 1)


def run_ours(case: Case):
    from ouroboros_kernels import tree_attention

    def call(i):
        cache = case.caches[i]
        return tree_attention(case.q[i], cache[0], cache[1], case.prefix_lens, case.tree_mask,
                              out=case.out)
    return call


def run_sdpa(case: Case):
    num_q_heads, num_kv_heads, _ = case.shape.heads
    group = num_q_heads // num_kv_heads
    visible = case.full_visible()
    additive = torch.zeros(visible.shape, dtype=DTYPE, device="cuda")
    additive.masked_fill_(~visible, torch.finfo(DTYPE).min)
    additive = additive[None, None].expand(case.shape.batch, 1, -1, -1)

    def repeat_kv(x):  # as transformers does: [B, Hkv, S, D] -> [B, Hq, S, D]
        if group == 1:
            return x
        b, h, s, d = x.shape
        return x[:, :, None].expand(b, h, group, s, d).reshape(b, h * group, s, d)

    def call(i):
        cache = case.caches[i]
        out = torch.nn.functional.scaled_dot_product_attention(
            case.q[i].transpose(1, 2), repeat_kv(cache[0]), repeat_kv(cache[1]),
            attn_mask=additive)
        return out.transpose(1, 2)
    return call


_FLEX = None


def run_flex(case: Case):
    global _FLEX
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if _FLEX is None:
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        _FLEX = torch.compile(flex_attention, dynamic=False)
    prefix, num_new = case.shape.prefix, case.shape.num_new
    tree = case.visible_tree

    def mask_mod(b, h, q_idx, kv_idx):
        j = kv_idx - prefix
        in_tree = (j >= 0) & (j < num_new)
        return (kv_idx < prefix) | (in_tree & tree[q_idx, j.clamp(0, num_new - 1)])

    block_mask = create_block_mask(mask_mod, None, None, num_new, prefix + num_new,
                                   device="cuda")

    def call(i):
        cache = case.caches[i]
        out = _FLEX(case.q[i].transpose(1, 2), cache[0], cache[1], block_mask=block_mask,
                    enable_gqa=True)
        return out.transpose(1, 2)
    return call


def run_flashinfer(case: Case):
    import flashinfer

    if case.shape.batch != 1:
        raise NotImplementedError("single-request API: B = 1 only")
    custom_mask = case.full_visible()

    def call(i):
        cache = case.caches[i]
        out = flashinfer.single_prefill_with_kv_cache(
            case.q[i][0], cache[0, 0], cache[1, 0], custom_mask=custom_mask, kv_layout="HND")
        return out[None]
    return call


def have_flashinfer() -> bool:
    try:
        import flashinfer  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


# ----------------------------------------------------------------------------- main


def fmt_us(value: float | None, captured: bool = True) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" + ("" if captured else "*")


def measure(shape: Shape, with_flex: bool, with_flashinfer: bool) -> dict:
    from ouroboros_kernels.tree_attention import default_config

    case = Case(shape)
    row: dict = {"shape": shape}
    num_q_heads, num_kv_heads, head_dim = shape.heads
    row["config"] = default_config(shape.num_new, num_q_heads // num_kv_heads, head_dim, DTYPE,
                                   shape.batch, num_kv_heads, shape.prefix + shape.num_new,
                                   torch.cuda.current_device())
    ours = run_ours(case)
    row["ours"] = time_call(ours, case.rotations)
    reference = None
    try:
        sdpa = run_sdpa(case)
        row["sdpa"] = time_call(sdpa, case.rotations)
        reference = sdpa(0).float()
    except torch.cuda.OutOfMemoryError:
        row["sdpa"] = None
        row["note"] = "sdpa OOM"
    got = ours(0).float()
    if reference is not None:
        row["max_diff"] = (got - reference).abs().max().item()
    for name, enabled, runner in (("flex", with_flex, run_flex),
                                  ("flashinfer", with_flashinfer, run_flashinfer)):
        if not enabled:
            continue
        try:
            row[name] = time_call(runner(case), case.rotations)
        except Exception as error:  # noqa: BLE001 - a baseline failing must not stop the run
            row[name] = None
            row.setdefault("note", "")
            row["note"] += f" {name}: {type(error).__name__}: {str(error)[:80]}"
    del case
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="reduced grid")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"),
                        help="directory for tree_attention_<card>.md")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="stop starting new shapes after this many seconds "
                             "(default 150, quick 60)")
    parser.add_argument("--no-flex", action="store_true", help="skip FlexAttention")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_tree_attention: needs a GPU (CUDA not available); nothing measured.")
        return 0
    budget = args.budget_s if args.budget_s is not None else (60.0 if args.quick else 150.0)
    began = time.time()
    import triton

    import ouroboros_kernels

    card = torch.cuda.get_device_name()
    copy_bw = copy_bandwidth_gbs()
    mm_tflops = matmul_tflops()
    floor = launch_floor_us()
    print(f"{card}: copy {copy_bw:.0f} GB/s, bf16 matmul {mm_tflops:.0f} TFLOP/s, launch floor "
          f"{floor:.1f} us", flush=True)
    with_flashinfer = have_flashinfer()
    rows, skipped = [], []
    for shape in all_shapes(args.quick):
        if time.time() - began > budget:
            skipped.append(shape)
            continue
        key = (shape.model, shape.batch, shape.num_new, shape.prefix)
        with_flex = not args.no_flex and key in FLEX_SHAPES
        try:
            row = measure(shape, with_flex, with_flashinfer and shape.batch == 1)
        except torch.cuda.OutOfMemoryError:
            row = {"shape": shape, "ours": None, "note": "OOM"}
        torch.cuda.empty_cache()
        rows.append(row)
        print(format_row(row, copy_bw, mm_tflops), flush=True)

    lines = header(card, copy_bw, mm_tflops, with_flashinfer, ouroboros_kernels, triton,
                   time.time() - began, floor)
    lines += table(rows, copy_bw, mm_tflops)
    lines += summary(rows, copy_bw, floor)
    if skipped:
        lines.append("")
        lines.append(f"Not measured (time budget of {budget:.0f} s spent): "
                     + ", ".join(f"{s.model} B{s.batch} T{s.num_new} P{s.prefix}"
                                 for s in skipped))
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs(args.out, exist_ok=True)
    slug = "".join(c if c.isalnum() else "_" for c in card.lower()).strip("_")
    path = os.path.join(args.out, f"tree_attention_{slug}.md")
    with open(path, "w") as handle:
        handle.write(text)
    print(f"wrote {path}")
    failures = [r for r in rows if r.get("ours") is None
                or (r.get("max_diff") is not None and r["max_diff"] > 0.05)]
    return 1 if failures else 0


def roofline_us(shape: Shape, copy_bw: float, mm_tflops: float) -> float:
    return max(shape.bytes_moved() / (copy_bw * 1e9), shape.flops() / (mm_tflops * 1e12)) * 1e6


def format_row(row: dict, copy_bw: float, mm_tflops: float) -> str:
    s = row["shape"]
    ours = row.get("ours")
    text = f"{s.model:13s} B{s.batch} T{s.num_new:<4d} P{s.prefix:<6d}"
    if ours is None:
        return text + f" FAILED {row.get('note', '')}"
    us = ours[0]
    text += (f" ours {us:9.1f} us ({100 * roofline_us(s, copy_bw, mm_tflops) / us:5.1f}% roof,"
             f" {s.bytes_moved() / us / 1e3:6.0f} GB/s)")
    for name in ("sdpa", "flex", "flashinfer"):
        if row.get(name):
            text += f" {name} {row[name][0]:9.1f} us (x{row[name][0] / us:.2f})"
    if "max_diff" in row:
        text += f" max|d| {row['max_diff']:.1e}"
    return text + (f" [{row['note'].strip()}]" if row.get("note") else "")


def header(card, copy_bw, mm_tflops, with_flashinfer, package, triton, seconds,
           floor_us: float) -> list[str]:
    import transformers

    return [
        f"# Tree attention on {card}",
        "",
        f"Measured {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')} by "
        f"`benchmarks/bench_tree_attention.py` in {seconds:.0f} s: torch {torch.__version__}, "
        f"triton {triton.__version__}, transformers {transformers.__version__}, CUDA "
        f"{torch.version.cuda}, Python {platform.python_version()}, ouroboros_kernels "
        f"{package.__version__}. bf16, one layer's attention, one random tree (an 8-token "
        "chain plus random branches) shared by the batch.",
        "",
        f"Card: copy bandwidth **{copy_bw:.0f} GB/s** (1 GiB device-to-device copy), bf16 "
        f"matmul **{mm_tflops:.0f} TFLOP/s** (8192^3), launch floor **{floor_us:.1f} us** (a "
        "one-element kernel in a CUDA graph), all measured in this run.",
        "",
        "Times in microseconds per call (CUDA graphs, L2 defeated by rotating inputs; `*` = "
        "not capturable, timed eagerly). `roof%` = roofline time / our time, roofline = "
        "max(bytes / copy bandwidth, flops / matmul throughput) with the prefix K/V read once "
        "per KV head. `xSDPA` etc. = baseline time / our time (> 1: ours faster). SDPA = "
        "repeat_kv + a materialised 4D mask (transformers' path for a tree). FlexAttention "
        "on a subset of shapes (it recompiles per shape). FlashInfer custom-mask prefill: "
        + ("B = 1 shapes." if with_flashinfer else "not importable on this machine."),
        "",
    ]


def table(rows: list[dict], copy_bw: float, mm_tflops: float) -> list[str]:
    lines = ["| model | B | T | prefix | ours us | tiles (m,n,splits) | GB/s | % copy BW | "
             "roof% | SDPA us | xSDPA | Flex us | xFlex | FlashInfer us | xFI | max abs diff |",
             "|---|--:|--:|--:|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for row in rows:
        s = row["shape"]
        ours = row.get("ours")
        if ours is None:
            lines.append(f"| {s.model} | {s.batch} | {s.num_new} | {s.prefix} | failed: "
                         f"{row.get('note', '')} |" + " |" * 11)
            continue
        us = ours[0]
        config = row.get("config")
        tiles = f"{config.block_m},{config.block_n},{config.num_splits}" if config else "-"
        gbs = s.bytes_moved() / us / 1e3
        cells = [s.model, str(s.batch), str(s.num_new), str(s.prefix), fmt_us(*ours), tiles,
                 f"{gbs:.0f}", f"{100 * gbs / copy_bw:.0f}",
                 f"{100 * roofline_us(s, copy_bw, mm_tflops) / us:.0f}"]
        for name in ("sdpa", "flex", "flashinfer"):
            value = row.get(name)
            cells += [fmt_us(*value), f"{value[0] / us:.2f}"] if value else ["-", "-"]
        cells.append(f"{row['max_diff']:.1e}" if "max_diff" in row else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def summary(rows: list[dict], copy_bw: float, floor_us: float | None = None) -> list[str]:
    """The issue's targets for the memory-bound cases (T <= 64, prefix >= 2048)."""
    target = [r for r in rows if r.get("ours") and r["shape"].memory_bound_target()]
    if not target:
        return []

    def stats(subset: list[dict]) -> str:
        bw = sorted(r["shape"].bytes_moved() / r["ours"][0] / 1e3 / copy_bw for r in subset)
        return (f"{len(subset)} shapes; fraction of copy bandwidth: min {bw[0]:.0%}, median "
                f"{bw[len(bw) // 2]:.0%}, max {bw[-1]:.0%}; >= 80% in "
                f"{sum(b >= 0.8 for b in bw)} of {len(bw)}.")

    lines = ["", "## Memory-bound targets (T <= 64, prefix >= 2048)", "", f"* {stats(target)}"]
    if floor_us is not None:
        # 80% of the copy bandwidth means finishing in bytes / (0.8 x copy bandwidth); when
        # that is under two launch floors (the kernel and, when split, the merge) it cannot be
        # reached by any kernel pair, so the reachable shapes are also reported on their own.
        def budget_us(r):
            return r["shape"].bytes_moved() / (0.8 * copy_bw * 1e3)
        short = [r for r in target if budget_us(r) < 2 * floor_us]
        reachable = [r for r in target if budget_us(r) >= 2 * floor_us]
        lines.append(f"* {len(short)} of them would need less than two launch floors "
                     f"({2 * floor_us:.1f} us) at 80% of the copy bandwidth; on the other "
                     + (stats(reachable) if reachable else "none."))
    for name, goal in (("sdpa", 2.0), ("flex", 1.0), ("flashinfer", 1.0)):
        ratios = [r[name][0] / r["ours"][0] for r in target if r.get(name)]
        if ratios:
            lines.append(f"* vs {name}: speed-up min {min(ratios):.2f}x, median "
                         f"{sorted(ratios)[len(ratios) // 2]:.2f}x over {len(ratios)} shapes; "
                         f"goal > {goal:g}x met in {sum(x > goal for x in ratios)}.")
    return lines


if __name__ == "__main__":
    sys.exit(main())
