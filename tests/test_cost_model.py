"""The cost model and the choice (ouroboros/tuning/cost_model.py) on hand-made cost curves:
no models, no measurement."""

from __future__ import annotations

import random
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest

from ouroboros.config import OuroborosConfig
from ouroboros.geometry import TreeShape, draft_pass_tokens, draft_pending, target_pass_tokens
from ouroboros.tuning.cost_model import (
    GAMMAS,
    NGRAMS,
    PHRASES,
    ROOT_PHRASES,
    SUFFIXES,
    CostCurve,
    ThroughputModel,
    choose_config,
    choose_from,
    search_shapes,
)

# Shapes of the curves this project measured (s per pass over T fed tokens, 200 cached).
CPU = CostCurve((1, 8, 16, 32, 64), (0.041, 0.061, 0.075, 0.099, 0.154))  # SmolLM2, 2 cores
GPU = CostCurve((1, 8, 16, 32, 64), (0.012, 0.0121, 0.0122, 0.0124, 0.013))  # flat
CPU_DRAFT = CostCurve((1, 8, 16, 32), (0.004, 0.005, 0.006, 0.008))
GPU_DRAFT = CostCurve((1, 8, 16, 32), (0.0015, 0.0015, 0.0015, 0.0015))


def tree_size(config: OuroborosConfig) -> int:
    return config.largest_target_tree


def random_config(rng: random.Random) -> OuroborosConfig:
    use_draft = rng.random() < 0.75
    return OuroborosConfig(use_draft=use_draft, gamma=rng.randint(1, 12) if use_draft else 0,
                           draft_phrases=rng.choice((0, 1, 2, 4, 8)),
                           window=rng.random() < 0.4, window_size=rng.randint(1, 8),
                           ngram=rng.randint(2, 6), num_suffixes=rng.choice((0, 1, 3, 4, 16)),
                           root_phrases=rng.choice((0, 1, 2, 4)))


@dataclass(frozen=True)
class RecordingCurve(CostCurve):
    """A cost curve that records the sizes it is asked about."""

    calls: list = field(default_factory=list, compare=False)

    def __call__(self, num_tokens: float) -> float:
        self.calls.append(num_tokens)
        return CostCurve.__call__(self, num_tokens)


# ------------------------------------------------------------------ cost curves


def test_cost_curve_interpolates_and_extrapolates():
    curve = CostCurve((1, 4, 8), (1.0, 2.0, 4.0))
    assert curve(1) == 1.0 and curve(0) == 1.0
    assert curve(2) == pytest.approx(1 + 1 / 3)
    assert curve(4) == pytest.approx(2.0)
    assert curve(6) == pytest.approx(3.0)
    assert curve(12) == pytest.approx(6.0)  # the last segment's slope
    assert curve.relative(8) == 4.0
    assert CostCurve((1,), (2.0,))(50) == 2.0
    assert CostCurve((1, 2), (2.0, 1.0))(10) == 2.0  # never below the smallest cost
    assert CostCurve.from_dict(curve.to_dict()) == curve


@pytest.mark.parametrize("sizes, seconds", [((), ()), ((1, 2), (1.0,)), ((2, 1), (1.0, 2.0)),
                                            ((0, 1), (1.0, 2.0)), ((1, 2), (1.0, -1.0)),
                                            ((1,), (float("nan"),))])
def test_cost_curve_rejects_bad_input(sizes, seconds):
    with pytest.raises(ValueError):
        CostCurve(sizes, seconds)


# ------------------------------------------------------------------ the model


def test_throughput_model_counts_what_a_step_emits():
    model = ThroughputModel(alpha=0.5, coverage=0.0)
    shape = TreeShape(True, 3, 4, 4)
    assert model.tokens_per_step(shape) == pytest.approx(1 + 0.5 + 0.25 + 0.125)
    flat = CostCurve((1,), (1.0,))
    assert model.seconds_per_step(shape, flat, flat) == pytest.approx(
        model.step_overhead + 3 * (1.0 + model.pass_overhead) + 1.0)
    assert model.tokens_per_second(shape, flat, flat) == pytest.approx(
        model.tokens_per_step(shape) / model.seconds_per_step(shape, flat, flat))
    with pytest.raises(ValueError, match="draft"):
        model.seconds_per_step(shape, flat, None)
    # Without a draft: the bonus plus what the pool phrases find.
    lookahead = TreeShape(False, 0, 4, 2, window=True)
    assert model.seconds_per_step(lookahead, flat, None) == pytest.approx(
        model.step_overhead + 1.0)
    pool = ThroughputModel(coverage=0.5, recency=0.0, continuation=1.0, window_boost=0.0)
    assert pool.tokens_per_step(lookahead) == pytest.approx(1 + 0.5 * 3)


def test_phrase_tokens_is_the_geometric_sum():
    model = ThroughputModel(recency=0.3, continuation=0.8, length_decay=1.0)
    expected = 0.6 * (1 - 0.3 ** 2) * sum(0.8 ** j for j in range(5))
    assert model.phrase_tokens(2, 5, 0.6, False) == pytest.approx(expected)
    assert model.phrase_tokens(0, 5, 0.6, False) == 0.0


def test_the_tree_the_model_charges_is_the_configs_real_tree():
    """For many random configurations the target pass the model charges is exactly
    `OuroborosConfig.largest_target_tree` (the rows the KV cache is sized for), and no
    draft pass it charges feeds more than `largest_draft_tree`."""
    rng = random.Random(0)
    model = ThroughputModel()
    for _ in range(500):
        config = random_config(rng)
        shape = TreeShape.of(config)
        assert shape.apply(config) == config
        assert model.target_tokens(shape) == config.largest_target_tree \
            == target_pass_tokens(shape)
        assert draft_pass_tokens(shape) == config.largest_draft_tree
        target = RecordingCurve((1, 64), (1.0, 2.0))
        draft = RecordingCurve((1, 64), (0.1, 0.2))
        model.seconds_per_step(shape, target, draft)
        assert target.calls == [config.largest_target_tree]
        if not config.use_draft:
            assert draft.calls == [] and config.largest_draft_tree == 0
            continue
        assert 1 <= len(draft.calls) <= 2
        assert all(size <= config.largest_draft_tree for size in draft.calls)
        pending = model.first_draft_pending(shape)
        assert 1 <= pending <= draft_pending(shape)
        assert draft.calls[0] == pytest.approx(draft_pass_tokens(shape, pending))
        if len(draft.calls) == 2:  # the later passes feed one pending token
            assert draft.calls[1] == draft_pass_tokens(shape, 1)


def test_evaluating_the_model_is_cheap():
    model, shape = ThroughputModel(), TreeShape(True, 4, 4, 2, 2, 1)
    model.tokens_per_second(shape, CPU, CPU_DRAFT)
    start = time.perf_counter()
    for _ in range(2000):
        model.tokens_per_second(shape, CPU, CPU_DRAFT)
    assert (time.perf_counter() - start) / 2000 < 200e-6  # ~5 µs on one idle core


# ------------------------------------------------------------------ the choice


def test_a_cheap_big_pass_buys_bigger_trees_than_an_expensive_one():
    model = ThroughputModel(alpha=0.7)
    on_cpu = choose_config(CPU, CPU_DRAFT, "ouroboros", model)
    on_gpu = choose_config(GPU, GPU_DRAFT, "ouroboros", model)
    assert tree_size(on_gpu) > tree_size(on_cpu)
    assert on_gpu.num_suffixes >= on_cpu.num_suffixes
    # Both beat the preset under the model that chose them.
    preset = OuroborosConfig.preset("ouroboros")
    for curve, draft, chosen in ((CPU, CPU_DRAFT, on_cpu), (GPU, GPU_DRAFT, on_gpu)):
        assert model.tokens_per_second(chosen, curve, draft) >= \
            model.tokens_per_second(preset, curve, draft)
    # Making only the big passes dearer shrinks the tree.
    steep = CostCurve((1, 8, 16, 32, 64), (0.012, 0.03, 0.06, 0.12, 0.24))
    assert tree_size(choose_config(steep, GPU_DRAFT, "ouroboros", model)) < tree_size(on_gpu)


def test_lookahead_window_and_suffixes_grow_on_a_flat_curve():
    model = ThroughputModel()
    on_cpu = choose_config(CPU, None, "lookahead", model)
    on_gpu = choose_config(GPU, None, "lookahead", model)
    assert not on_cpu.use_draft and not on_gpu.use_draft and on_gpu.gamma == 0
    assert tree_size(on_gpu) > tree_size(on_cpu)


@pytest.mark.parametrize("method", ["speculative", "ouroboros"])
def test_draft_length_follows_agreement(method):
    gammas = [choose_config(CPU, CPU_DRAFT, method, ThroughputModel(alpha=a)).gamma
              for a in (0.3, 0.6, 0.9)]
    assert gammas == sorted(gammas) and gammas[0] < gammas[-1]
    # A draft that costs as much as the target is not worth long drafts.
    expensive = choose_config(CPU, CPU, method, ThroughputModel(alpha=0.6))
    assert expensive.gamma <= gammas[1]


def test_overrides_are_held_fixed_and_greedy_is_the_preset():
    chosen = choose_config(GPU, GPU_DRAFT, "ouroboros", ThroughputModel(), gamma=3, ngram=5)
    assert chosen.gamma == 3 and chosen.ngram == 5 and chosen.name == "ouroboros"
    assert choose_config(CPU, None, "greedy") == OuroborosConfig.preset("greedy")
    speculative = choose_config(CPU, CPU_DRAFT, "speculative")
    assert speculative.num_suffixes == 0 and speculative.draft_phrases == 0 \
        and not speculative.uses_pool
    # Non-tree fields pass through untouched.
    assert choose_config(CPU, CPU_DRAFT, "ouroboros", pool_capacity=5).pool_capacity == 5


def test_the_choice_is_the_best_shape_with_the_overrides_fixed():
    rng = random.Random(1)
    model = ThroughputModel(alpha=0.65)
    grids = {"gamma": GAMMAS, "ngram": NGRAMS, "num_suffixes": SUFFIXES,
             "draft_phrases": PHRASES, "root_phrases": ROOT_PHRASES}
    for _ in range(6):
        fixed = {name: rng.choice(grid) for name, grid in rng.sample(sorted(grids.items()), 2)}
        chosen = choose_config(CPU, CPU_DRAFT, "ouroboros", model, **fixed)
        assert all(getattr(chosen, name) == value for name, value in fixed.items())
        best = model.tokens_per_second(chosen, CPU, CPU_DRAFT)
        shapes = list(search_shapes(OuroborosConfig.preset("ouroboros", **fixed), fixed))
        assert all(all(getattr(s, name) == value for name, value in fixed.items())
                   for s in shapes)
        for shape in rng.sample(shapes, 200):
            assert model.tokens_per_second(shape, CPU, CPU_DRAFT) <= best * (1 + 1e-9)


def test_choose_from_uses_the_measured_agreement():
    low = SimpleNamespace(target_curve=CPU, draft_curve=CPU_DRAFT, alpha=0.2)
    high = SimpleNamespace(target_curve=CPU, draft_curve=CPU_DRAFT, alpha=0.95)
    prior = SimpleNamespace(target_curve=CPU, draft_curve=CPU_DRAFT, alpha=None)
    assert choose_from(low, "speculative").gamma < choose_from(high, "speculative").gamma
    assert choose_from(prior, "speculative") == choose_config(CPU, CPU_DRAFT, "speculative")
    assert choose_from(high, "speculative", gamma=2).gamma == 2


def test_the_cost_model_imports_without_torch():
    """geometry and cost_model are pure: loaded with torch made unimportable."""
    root = Path(__file__).resolve().parents[1]
    code = f"""
import sys, types
sys.modules["torch"] = None  # any import of torch now fails
package = types.ModuleType("ouroboros"); package.__path__ = [{str(root / 'ouroboros')!r}]
sys.modules["ouroboros"] = package
tuning = types.ModuleType("ouroboros.tuning")
tuning.__path__ = [{str(root / 'ouroboros' / 'tuning')!r}]
sys.modules["ouroboros.tuning"] = tuning
from ouroboros.tuning.cost_model import CostCurve, choose_config
curve = CostCurve((1, 64), (1.0, 2.0))
print(choose_config(curve, curve, "speculative").gamma >= 1)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "True"
