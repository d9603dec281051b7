"""The tree-attention launch-settings sweep (benchmarks/sweep_tree_attention.py): its grid
is valid for the kernel, and without a GPU it says so and exits 0."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))

sweep = pytest.importorskip("sweep_tree_attention")


@pytest.mark.parametrize("model, batch, num_new, prefix", [
    ("Llama-3-8B", 1, 1, 2048), ("Llama-3-8B", 8, 64, 8192), ("SmolLM2-135M", 1, 16, 2048),
    ("Llama-2-70B", 1, 64, 32768)])
def test_grid_is_valid_for_the_kernel(model, batch, num_new, prefix):
    shape = sweep.Shape(model, batch, num_new, prefix)
    num_q_heads, num_kv_heads, _ = shape.heads
    group = num_q_heads // num_kv_heads
    configs = list(sweep.candidates(shape))
    assert configs and len(set(configs)) == len(configs)
    for config in configs:
        assert config.block_m >= max(16, group) and config.block_m & (config.block_m - 1) == 0
        assert config.block_m <= max(16, 1 << (num_new * group - 1).bit_length())
        assert 1 <= config.num_splits <= 32
        assert config.num_splits == 1 or config.num_splits * config.block_n <= prefix + num_new
    # The grid spans the alternatives the heuristic chooses among.
    assert {c.num_splits for c in configs} >= {1, 2, 4, 8}
    assert {c.block_n for c in configs} == {32, 64, 128}
    fused = {c for c in configs if c.fused_merge}
    assert fused and all(c.num_splits > 1 for c in fused)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_without_a_gpu_it_exits_0(capsys, tmp_path):
    assert sweep.main(["--out", str(tmp_path)]) == 0
    assert "needs a GPU" in capsys.readouterr().out
    assert not list(tmp_path.iterdir())


class _CpuCase:
    """bench_tree_attention.Case on the CPU (the kernel runs under the interpreter)."""

    def __init__(self, shape):
        from ouroboros_kernels import build_tree

        gen = torch.Generator().manual_seed(0)
        num_q_heads, num_kv_heads, head_dim = shape.heads
        max_len = shape.prefix + shape.num_new
        self.rotations = 1
        self.caches = [torch.randn(2, shape.batch, num_kv_heads, max_len, head_dim,
                                   generator=gen).to(torch.bfloat16)]
        self.q = [torch.randn(shape.batch, shape.num_new, num_q_heads, head_dim,
                              generator=gen).to(torch.bfloat16)]
        self.prefix_lens = torch.full((shape.batch,), shape.prefix, dtype=torch.int32)
        parents = torch.tensor([-1] + list(range(shape.num_new - 1)), dtype=torch.int32)
        self.tree_mask = build_tree(parents)[0][None]
        self.out = torch.empty_like(self.q[0])


def test_sweep_of_one_shape_on_the_interpreter(monkeypatch, tmp_path):
    """The sweep's loop, checks and report, run on a tiny shape with the kernel under the
    interpreter and a stand-in timer (no GPU here): every candidate gives the heuristic's
    output, the fastest (by the stand-in time) is reported, the JSON round-trips."""
    import json

    import bench_tree_attention

    monkeypatch.setitem(bench_tree_attention.MODELS, "tiny", (4, 2, 16))  # Shape.heads reads it
    monkeypatch.setattr(sweep, "Case", _CpuCase)
    monkeypatch.setattr(sweep, "fits", lambda config, head_dim: True)
    monkeypatch.setattr(sweep, "device_index", lambda: None)
    timings = {}

    def fake_time(call, rotations):  # deterministic "time" per config: prefers wide tiles
        call(0)
        from ouroboros_kernels.tree_attention import TreeAttentionConfig

        config, = [cell.cell_contents for cell in call.__closure__
                   if isinstance(cell.cell_contents, TreeAttentionConfig)]
        timings[config] = 100.0 / config.block_n + config.num_warps
        return timings[config], True

    monkeypatch.setattr(sweep, "time_call", fake_time)
    shape = sweep.Shape("tiny", 2, 3, 40)
    row = sweep.sweep_shape(shape, deadline=float("inf"))
    expected = {c for c in sweep.candidates(shape)} | {row["heuristic"]}
    assert set(timings) == expected and row["tried"] == len(expected - {row["heuristic"]})
    assert row["best"] == min(timings, key=timings.get)
    assert row["best_us"] == min(timings.values())
    lines = sweep.report([row], [shape], "a card", 1000.0, 1.0, 5.0)
    assert any(line.startswith("| tiny | 2 | 3 | 40 |") for line in lines)
    assert "Not swept" in lines[-1]
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps(sweep.json_rows([row])))
    top = json.loads(path.read_text())[0]["top"]
    assert top[0]["config"]["block_n"] == row["best"].block_n and len(top) <= 3


def test_bench_summary_splits_out_shapes_below_the_launch_floor():
    """bench_tree_attention's summary: shapes whose 80%-of-copy-bandwidth time is under two
    launch floors are counted apart, and the bandwidth stats are repeated for the rest."""
    import bench_tree_attention as bench

    rows = [{"shape": bench.Shape("SmolLM2-135M", 1, 1, 2048), "ours": (7.4, True)},
            {"shape": bench.Shape("Llama-3-8B", 8, 1, 8192), "ours": (107.4, True)},
            {"shape": bench.Shape("Llama-3-8B", 1, 64, 2048), "ours": (30.2, True)},
            {"shape": bench.Shape("Llama-3-8B", 1, 256, 2048), "ours": (70.6, True)}]
    lines = bench.summary(rows, 2443.0, 2.0)
    assert "3 shapes;" in lines[3] and ">= 80% in 1 of 3" in lines[3]  # T = 256 is no target
    assert lines[4].startswith("* 1 of them would need less than two launch floors (4.0 us)")
    assert "on the other 2 shapes" in lines[4] and ">= 80% in 1 of 2" in lines[4]
    assert not any("launch floors" in line for line in bench.summary(rows, 2443.0))
