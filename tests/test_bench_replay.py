"""The GPU replay benchmark on the CPU (issue 12, item 3): `benchmarks/record_traces.py`
records a tiny random pair's steps, `benchmarks/bench_replay.py --shapes tiny` replays them
end to end (table and JSON); the committed SmolLM2 traces parse and are consistent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from engine_models import (  # noqa: F401  (single_thread is a fixture)
    benchmark_module,
    perturbed,
    random_prompt,
    single_thread,
    tiny_llama,
)

pytestmark = pytest.mark.usefixtures("single_thread")

ROOT = Path(__file__).resolve().parents[1]
TRACES = ROOT / "benchmarks" / "results" / "traces"


@pytest.fixture(scope="module")
def record():
    with benchmark_module("record_traces") as module:
        yield module


@pytest.fixture(scope="module")
def replay():
    with benchmark_module("bench_replay") as module:
        yield module


@pytest.fixture(scope="module")
def tiny_traces(record, tmp_path_factory):
    """Traces of a tiny random pair: speculative, lookahead (target window), Ouroboros with
    a draft window, and a warm-pool Ouroboros; 2 prompts x 12 new tokens each."""
    from ouroboros.config import OuroborosConfig

    target = tiny_llama(0)
    draft = perturbed(target, 0.3, seed=1)
    prompts = [(f"random/{i}", random_prompt(10 + 5 * i, 48, seed=i)[0].tolist())
               for i in range(2)]
    configs = {
        "speculative": OuroborosConfig.preset("speculative", gamma=3),
        "lookahead": OuroborosConfig.preset("lookahead", ngram=3, window_size=3),
        "ouroboros_window": OuroborosConfig.preset("ouroboros", gamma=4, num_suffixes=3,
                                                   ngram=3, window=True, window_size=2,
                                                   warm_start=False),
        "ouroboros_warm": OuroborosConfig.preset("ouroboros", gamma=4, num_suffixes=4,
                                                 ngram=4, warm_start=True),
    }
    folder = tmp_path_factory.mktemp("traces")
    traces = {}
    for name, config in configs.items():
        trace = record.record_config(name, config, target, draft, prompts, 12,
                                     eos_token_id=[])
        record.write_trace(trace, folder)
        traces[name] = trace
    return folder, traces


def test_recorded_tiny_traces_are_consistent(record, replay, tiny_traces):
    folder, raw = tiny_traces
    assert sorted(p.name for p in folder.glob("*.json")) == sorted(f"{n}.json" for n in raw)
    for trace in replay.load_traces(folder):
        assert raw[trace.name]["derivation_errors"] == 0
        assert replay.check_trace(trace) == []
        assert len(trace.prompts) == 2
        for prompt in trace.prompts:
            assert prompt.new_tokens == 12 and prompt.steps
            assert prompt.record["target_passes"] == len(prompt.steps)
            drafted = sum(len(s.draft) for s in prompt.steps)
            assert prompt.record["draft_passes"] == drafted
        if trace.name == "speculative":
            assert all(s.tree_nodes == s.target["draft"] for p in trace.prompts
                       for s in p.steps)
        if trace.name == "lookahead":
            assert not trace.config["use_draft"]
            assert any(s.target["window"] == 2 * 3 for p in trace.prompts for s in p.steps)
        if trace.name == "ouroboros_window":
            assert any(w == 2 * 2 for p in trace.prompts for s in p.steps
                       for _, _, w, _ in s.draft)


def test_check_trace_finds_broken_steps(replay, tiny_traces):
    folder, _ = tiny_traces
    raw = json.loads((folder / "ouroboros_warm.json").read_text())
    trace = replay.parse_trace(raw)
    step = trace.prompts[0].steps[0]
    step.target["acc_draft"] = step.target["draft"] + 1
    problems = replay.check_trace(trace)
    assert any("accepted draft nodes" in p for p in problems)
    assert any("target cache ends" in p for p in problems)
    with pytest.raises(ValueError, match="format"):
        replay.parse_trace({**raw, "format": "other"})


def test_replay_tiny_shapes_end_to_end(replay, tiny_traces, tmp_path, capsys):
    folder, raw = tiny_traces
    args = ["--traces", str(folder), "--shapes", "tiny", "--device", "cpu", "--prompts", "2",
            "--threads", "1", "--out", str(tmp_path), "--budget-s", "60"]
    assert replay.main(args) == 0
    text = (tmp_path / "replay_cpu.md").read_text()
    assert text.strip() in capsys.readouterr().out
    assert "card: none" in text and "torch " in text and "transformers " in text
    assert "| configuration | tokens | steps |" in text
    report = json.loads((tmp_path / "replay_cpu.json").read_text())
    assert report["skipped"] == [] and report["shapes"] == "tiny"
    assert set(report["results"]) == set(raw)
    assert set(report["baselines"]) == {"eager", "static"}
    for name, row in report["results"].items():
        trace = raw[name]
        assert row["tokens"] == sum(p["new_tokens"] for p in trace["prompts"])
        assert row["steps"] == sum(len(p["steps"]) for p in trace["prompts"])
        assert row["speedup_eager"] > 0 and row["speedup_static"] > 0
        assert row["seconds"] > 0 and set(row["split"]) == {"draft", "verify", "pool", "host"}
        # Host reads: one per pass (acceptance) and one per pool lookup, nothing else.
        draft_passes = sum(len(s[0]) // max(len(trace["layout"]["draft"]), 1)
                           for p in trace["prompts"] for s in p["steps"])
        assert row["draft_passes"] == draft_passes
        lookups = sum(bool(s[2]) for p in trace["prompts"] for s in p["steps"])
        if trace["config"]["draft_phrases"] and trace["config"]["use_draft"]:
            lookups += draft_passes
        by = row["host_reads_by"]
        assert by["accept"] == row["steps"] + draft_passes
        assert by.get("lookup_phrases", 0) == lookups
        assert by.get("_check_parents", 0) <= row["steps"] + draft_passes  # tree masks
        assert set(by) <= {"accept", "lookup_phrases", "_check_parents", "_check_range"}
        assert row["host_reads"] == sum(by.values())
        assert f"| {name} | {row['tokens']} | {row['steps']} |" in text


def test_replay_budget_skips_configurations(replay, tiny_traces, tmp_path):
    folder, raw = tiny_traces
    args = ["--traces", str(folder), "--shapes", "tiny", "--device", "cpu", "--prompts", "1",
            "--threads", "1", "--out", str(tmp_path), "--budget-s", "0.001",
            "--configs", "speculative,lookahead"]
    assert replay.main(args) == 0
    report = json.loads((tmp_path / "replay_cpu.json").read_text())
    assert report["skipped"] == ["speculative", "lookahead"]
    text = (tmp_path / "replay_cpu.md").read_text()
    assert "| speculative | skipped: budget" in text and "skipped to stay within" in text
    assert set(report["baselines"]) == {"eager"} and "(skipped for the budget)" in text


def test_committed_traces_parse_and_are_consistent(replay, record):
    files = sorted(TRACES.glob("*.json"))
    assert files, f"no committed traces in {TRACES}"
    assert sum(f.stat().st_size for f in files) < 600_000  # compact
    names = set()
    for path in files:
        raw = json.loads(path.read_text())
        assert raw["derivation_errors"] == 0
        assert raw["name"] == path.stem and raw["name"] in record.CONFIGS
        trace = replay.parse_trace(raw)
        assert replay.check_trace(trace) == []
        labels = [p.label for p in trace.prompts]
        assert all(82 <= int(label.split("/")[1]) <= 163 for label in labels)  # held out
        config = record.make_config(trace.name)
        assert trace.config["gamma"] == config.gamma and \
            trace.config["num_suffixes"] == config.num_suffixes
        assert trace.warm_pool == config.warm_start
        for prompt in trace.prompts:
            tokens = sum(s.accepted + 1 for s in prompt.steps)
            assert tokens >= prompt.new_tokens
            assert prompt.record["target_passes"] == len(prompt.steps)
        names.add(trace.name)
    # The configurations of the issue: speculative, lookahead, Ouroboros and the ablations.
    assert {"speculative_g4", "lookahead_n4_k4_w4", "ouroboros_g8_k8_n5",
            "ablation_no_suffixes"} <= names
    # All committed traces share their prompts (the replay compares them on the same ones).
    prompt_sets = {tuple((p["label"], p["prompt_len"]) for p in
                         json.loads(f.read_text())["prompts"]) for f in files}
    assert len(prompt_sets) == 1


def test_run_gpu_replay_step_on_the_cpu(tmp_path):
    """``STEPS=replay bash benchmarks/run_gpu.sh`` with tiny shapes: the GPU step itself,
    over the committed traces, so that it cannot rot."""
    script = (ROOT / "benchmarks" / "run_gpu.sh").read_text()
    assert "if wants replay; then" in script
    assert "--budget-s" in script.split("if wants replay; then")[1].split("\nfi\n")[0]
    env = {**os.environ, "STEPS": "replay", "OUT": str(tmp_path), "PYTHON": sys.executable,
           "REPLAY_ARGS": "--shapes tiny --device cpu --prompts 1 --threads 1"}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "run_gpu.sh")], env=env,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    log = (tmp_path / "run_gpu.log").read_text()
    assert "=== bench_replay: rc=0" in log and "all steps passed (replay)" in log
    report = json.loads((tmp_path / "replay_cpu.json").read_text())
    assert report["skipped"] == [] and len(report["results"]) == len(list(TRACES.glob("*.json")))
