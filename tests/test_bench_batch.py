"""Smoke run of benchmarks/bench_batch.py on tiny random models: batched transformers
greedy (dynamic and static cache) against the batched engine, the table, the JSON, the plot
and the row-by-row exactness gate."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from engine_models import (  # noqa: F401  (single_thread is a fixture)
    benchmark_module,
    save_pair,
    single_thread,
    tiny_llama,
    word_tokenizer,
)

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def bench():
    with benchmark_module("bench_batch") as module:
        yield module


@pytest.fixture(scope="module")
def pair_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench_batch")
    tokenizer = word_tokenizer(48)
    target = tiny_llama(0, max_positions=512)
    return save_pair(root, tokenizer, target)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("OUROBOROS_CACHE_DIR", str(tmp_path / "cache"))


def bench_args(pair_dirs, out, *extra):
    target, draft = pair_dirs
    return ["--target", str(target), "--draft", str(draft), "--device", "cpu",
            "--max-new-tokens", "10", "--out", str(out), "--threads", "1", *extra]


def test_smoke_run_every_batch_size_exact(bench, pair_dirs, tmp_path, capsys):
    args = bench_args(pair_dirs, tmp_path, "--random-prompts", "--batch-sizes", "2,4",
                      "--prompts", "4")
    assert bench.main(args) == 0
    captured = capsys.readouterr()
    text = (tmp_path / "batch_cpu.md").read_text()
    assert text.strip() in captured.out
    assert "B=4 [1/1] 4 rows" in captured.err  # progress on stderr
    for column in ("hf_greedy tok/s: dynamic / static", "baseline (faster hf)",
                   "ouroboros / best hf (same B)", "ouroboros / greedy B=1",
                   "tokens per target pass (ouroboros, per row)"):
        assert column in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and
            line.split("|")[1].strip().isdigit()]
    assert [int(line.split("|")[1]) for line in rows] == [1, 2, 4]  # B = 1 always added
    for line in rows:
        cells = [c.strip() for c in line.split("|")[1:-1]]
        assert cells[4] != "-" and cells[5].endswith("x") and cells[6].endswith("x")
        assert cells[10] == "4/4"  # every ouroboros row equals batch-1 greedy
    assert "**MISMATCH**" not in text
    assert "card: none" in text and "load average at start" in text
    assert "torch " in text and "transformers " in text and "triton" in text
    raw = json.loads((tmp_path / "batch_cpu.json").read_text())
    assert raw["batch_sizes"] == [1, 2, 4] and raw["skipped"] == []
    for size in ("1", "2", "4"):
        ours = raw["results"][size]["ouroboros"]
        assert ours["exact_rows"] == ours["rows"] == 4 and ours["mismatches"] == []
        assert ours["batches"] == 4 // int(size)
        assert ours["tokens"] == raw["results"][size]["hf_dynamic"]["tokens"] == 40
        assert ours["tokens_per_pass"] >= 1.0
        assert raw["baseline"][size] in ("hf_dynamic", "hf_static")
    assert raw["greedy_b1_tokens_per_second"] > 0
    assert (tmp_path / "batch_cpu.png").stat().st_size > 1000


def test_tensor_input_prompt_file_and_preset(bench, pair_dirs, tmp_path):
    prompts = {"a": [5, 6, 7], "b": [8, 9, 10, 11, 12, 13, 14], "c": [20], "d": [30, 31]}
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps(prompts))
    args = bench_args(pair_dirs, tmp_path, "--prompt-file", str(path), "--prompts", "4",
                      "--batch-sizes", "4", "--engine-input", "tensor", "--no-tune",
                      "--static", "off", "--tag", "t")
    assert bench.main(args) == 0
    raw = json.loads((tmp_path / "batch_cpu_t.json").read_text())
    assert raw["prompts"] == ["a", "b", "c", "d"]
    assert set(raw["results"]["4"]) == {"hf_dynamic", "ouroboros"}
    assert raw["results"]["4"]["ouroboros"]["exact_rows"] == 4
    text = (tmp_path / "batch_cpu_t.md").read_text()
    assert 'OuroborosDecoder(target, draft, "ouroboros")' in text
    assert "left-padded tensor + attention_mask" in text


def test_a_wrong_row_fails_the_run(bench, pair_dirs, tmp_path, monkeypatch, capsys):
    original = bench.Engine.run

    def wrong(self, prompts, max_new_tokens):
        run = original(self, prompts, max_new_tokens)
        if len(prompts) == 2:  # the second row of every batch of 2
            run.rows[1][-1] = (run.rows[1][-1] + 1) % 48
        return run

    monkeypatch.setattr(bench.Engine, "run", wrong)
    args = bench_args(pair_dirs, tmp_path, "--random-prompts", "--batch-sizes", "2",
                      "--prompts", "2", "--static", "off", "--no-tune")
    assert bench.main(args) == 1
    captured = capsys.readouterr()
    assert "MISMATCH: ouroboros row 1 (random/1) of a batch of 2" in captured.err
    assert "target logit gap" in captured.err
    assert "EXACTNESS FAILURE" in captured.err
    text = (tmp_path / "batch_cpu.md").read_text()
    assert "1/2 **MISMATCH**" in text and "2/2 |" in text  # B=2 fails, B=1 does not


def test_helpers(bench):
    ids, mask = bench.left_pad([[5, 6, 7], [8]], 0, torch.device("cpu"))
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert bench.until_eos([4, 2, 0, 0], [2]) == [4, 2]
    assert bench.until_eos([4, 5], []) == [4, 5]
    assert bench.groups([0, 1, 2, 3], 2) == [[0, 1], [2, 3]]
    prompts = bench.random_prompts(6, 48)
    assert prompts == bench.random_prompts(6, 48)  # seeded
    assert all(4 <= len(ids) <= 24 and min(ids) >= 3 and max(ids) < 48 for _, ids in prompts)
    model = tiny_llama(0)
    assert bench.pad_id(model) == 0 and bench.eos_ids(model) == []


def test_arguments(bench):
    quick = bench.parse_args(["--quick"])
    assert (quick.batch_sizes, quick.prompts, quick.max_new_tokens) == ([1, 2], 2, 16)
    args = bench.parse_args(["--batch-sizes", "8,2"])
    assert args.batch_sizes == [1, 2, 8]
    bench.finish_args(args, torch.device("cpu"))
    assert args.prompts == 8
    gpu = bench.parse_args([])
    bench.finish_args(gpu, torch.device("cuda"))
    assert gpu.batch_sizes == [1, 2, 4, 8, 16, 32] and gpu.prompts == 32
    cpu = bench.parse_args([])
    bench.finish_args(cpu, torch.device("cpu"))
    assert cpu.batch_sizes == [1, 2, 4, 8] and cpu.prompts == 8
    odd = bench.parse_args(["--batch-sizes", "3", "--prompts", "4"])
    with pytest.raises(SystemExit, match="not a multiple"):
        bench.finish_args(odd, torch.device("cpu"))
    for bad in (["--batch-sizes", "0,2"], ["--batch-sizes", "x"], ["--prompts", "0"],
                ["--random-prompts", "--prompt-file", "p.json"]):
        with pytest.raises(SystemExit):
            bench.parse_args(bad)
