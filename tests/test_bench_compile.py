"""Smoke run of benchmarks/bench_compile.py on tiny random models (``--mode aot_eager``:
the same graphs and guards as inductor, without its code generation, so the run takes
seconds): the table, the JSON, the exactness gate and no recompile in the timed calls."""

from __future__ import annotations

import json

import pytest
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
    with benchmark_module("bench_compile") as module:
        yield module


@pytest.fixture(scope="module")
def pair_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench_compile")
    tokenizer = word_tokenizer(48)
    # One layer: shapes of their own, which no other test compiled in this process.
    target = tiny_llama(0, layers=1, max_positions=512)
    return save_pair(root, tokenizer, target)


def test_smoke_run(bench, pair_dirs, tmp_path, capsys):
    target, draft = pair_dirs
    args = ["--target", str(target), "--draft", str(draft), "--device", "cpu",
            "--random-prompts", "--prompts", "2", "--max-new-tokens", "12", "--threads", "1",
            "--mode", "aot_eager", "--configs", "speculative,suffixes-only",
            "--out", str(tmp_path), "--tag", "tiny"]
    assert bench.main(args) == 0
    captured = capsys.readouterr()
    text = (tmp_path / "compile_cpu_tiny.md").read_text()
    assert text.strip() in captured.out
    assert "compiled the target pass" in captured.err  # the compile progress lines
    assert "| compiled / eager |" in text and "torch" in text
    data = json.loads((tmp_path / "compile_cpu_tiny.json").read_text())
    assert [r["config"] for r in data["results"]] == ["speculative", "suffixes-only"]
    for result in data["results"]:
        assert result["mismatches"] == [] and result["recompiles"] == 0
        assert result["eager_tokens"] == result["compiled_tokens"] == 24
        assert result["compiled_rate"] > 0


def test_batches(bench, pair_dirs, tmp_path):
    target, draft = pair_dirs
    args = ["--target", str(target), "--draft", str(draft), "--device", "cpu",
            "--random-prompts", "--prompts", "4", "--batch-size", "2", "--max-new-tokens", "8",
            "--mode", "aot_eager", "--configs", "roots", "--out", str(tmp_path)]
    assert bench.main(args) == 0
    data = json.loads((tmp_path / "compile_cpu.json").read_text())
    (result,) = data["results"]
    assert result["mismatches"] == [] and result["compiled_tokens"] == 32
    assert "batches of 2" in (tmp_path / "compile_cpu.md").read_text()


def test_bad_arguments(bench):
    with pytest.raises(SystemExit):
        bench.parse_args(["--configs", "jacobi"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--mode", "fastest"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--batch-size", "0"])
