"""Adaptive trees: the planner's choice (pure, hand-made costs), and exactness on every path
it can take (each shape forced through a schedule, and the adaptive planner itself)."""

from __future__ import annotations

import pytest
import torch
from engine_models import greedy_reference, perturbed, random_prompt, single_thread, \
    tiny_llama  # noqa: F401

from ouroboros import OuroborosConfig, OuroborosDecoder
from ouroboros.adaptive import (
    AdaptivePlanner,
    ContextCosts,
    SchedulePlanner,
    StepObservation,
    StepPlan,
    adaptive_config,
    envelope_plans,
    fixed_plan,
)
from ouroboros.tuning import CostCurve, Measurements, ThroughputModel

VOCAB = 48
pytestmark = pytest.mark.usefixtures("single_thread")

# A CPU-like device: a pass over 64 tokens costs 4x one token; a GPU-like one: 1.1x.
CPU = CostCurve((1, 8, 64), (0.030, 0.040, 0.120))
GPU = CostCurve((1, 8, 64), (0.020, 0.0202, 0.022))
DRAFT = CostCurve((1, 8, 64), (0.003, 0.0035, 0.008))
ENVELOPE = OuroborosConfig(gamma=8, num_suffixes=8, root_phrases=2, draft_phrases=4,
                           adaptive=True)


def planner(curve=CPU, alpha=0.7, draft=DRAFT, config=ENVELOPE, **kwargs):
    model = ThroughputModel(alpha=alpha)
    return AdaptivePlanner(config, model, ContextCosts(curve),
                           ContextCosts(draft) if draft is not None else None, **kwargs)


def feed(plan_source, plan, steps, accepted_draft, suffix_tokens=0):
    for _ in range(steps):
        plan_source.observe(plan, StepObservation(
            drafted=plan.gamma, accepted_draft=min(accepted_draft, plan.gamma),
            suffix_tokens=suffix_tokens, suffixes_in_context=accepted_draft >= plan.gamma,
            root_tokens=0, draft_passes=max(plan.gamma, 1) if plan.gamma else 0,
            phrase_tokens=0))


def test_envelope_plans_cover_the_fixed_plan_and_stay_inside():
    plans = envelope_plans(ENVELOPE)
    assert fixed_plan(ENVELOPE) in plans
    assert StepPlan(0, 0) in plans  # the plain one-token step
    assert all(p.gamma <= 8 and p.num_suffixes <= 8 and p.root_phrases <= 2
               and p.draft_phrases <= 4 for p in plans)
    assert all(p.root_phrases == p.draft_phrases == 0 for p in plans if p.gamma == 0)
    assert len(set(plans)) == len(plans)
    lookahead = envelope_plans(OuroborosConfig.preset("lookahead", num_suffixes=3))
    assert {p.gamma for p in lookahead} == {0} and StepPlan(0, 3) in lookahead


def test_cheap_big_passes_get_long_drafts_and_many_suffixes():
    gpu, cpu = planner(GPU, alpha=0.8).plan(300), planner(CPU, alpha=0.8).plan(300)
    size = lambda p: p.gamma + 3 * (p.num_suffixes + p.root_phrases)  # noqa: E731
    assert gpu.gamma >= cpu.gamma and size(gpu) > size(cpu)
    # A draft as slow as the target is not worth running on a CPU.
    assert planner(CPU, alpha=0.8, draft=CPU).plan(300).gamma == 0


def test_the_plan_follows_the_sequence():
    source = planner(CPU, alpha=0.5)
    start = source.plan(300)
    for _ in range(40):  # every draft token accepted (found by the probes if need be)
        feed(source, source.plan(300), 1, accepted_draft=99)
    confident = source.plan(300)
    assert source.alpha.value > 0.9 and confident.gamma > max(start.gamma, 1)
    for _ in range(40):  # every first draft token rejected
        feed(source, source.plan(300), 1, accepted_draft=0)
    doubtful = source.plan(300)
    assert source.alpha.value < 0.35 and doubtful.gamma < confident.gamma
    # Without observations (the draft no longer runs), the estimate drifts back to its
    # prior, so the draft is tried again later.
    for _ in range(60):
        source.observe(StepPlan(0, 0), StepObservation(0, 0, 0, True, 0, 0, 0))
    assert abs(source.alpha.value - 0.5) < 0.02


def test_long_contexts_favour_smaller_trees():
    # The attention share: a pass over 64 tokens after 2,048 rows costs 3x what it costs
    # after 200; a one-token pass only 1.3x.
    long = CostCurve((1, 8, 64), (0.039, 0.060, 0.360))
    costs = ContextCosts(CPU, long, 200, 2048)
    assert costs(8, 200) == pytest.approx(0.040) and costs(8, 2048) == pytest.approx(0.060)
    assert costs(8, 100) == pytest.approx(0.040)  # never below the short prefix's cost
    source = AdaptivePlanner(ENVELOPE, ThroughputModel(alpha=0.75), costs,
                             ContextCosts(DRAFT))
    short, late = source.plan(256), source.plan(4000)
    size = lambda p: p.gamma + 3 * (p.num_suffixes + p.root_phrases)  # noqa: E731
    assert size(late) < size(short)


def test_choice_is_deterministic_and_a_no_draft_envelope_never_drafts():
    a, b = planner(), planner()
    for step in range(20):
        plan_a, plan_b = a.plan(200 + 7 * step), b.plan(200 + 7 * step)
        assert plan_a == plan_b
        feed(a, plan_a, 1, accepted_draft=step % 3, suffix_tokens=step % 2)
        feed(b, plan_b, 1, accepted_draft=step % 3, suffix_tokens=step % 2)
    no_draft = planner(draft=None, config=OuroborosConfig.preset("lookahead", adaptive=True))
    assert no_draft.plan(300).gamma == 0


def test_adaptive_config_envelope_and_overrides():
    measurements = Measurements("test", GPU, DRAFT, 0.7)
    base = OuroborosConfig.preset("ouroboros", gamma=2, num_suffixes=1)
    envelope = adaptive_config(measurements, base)
    assert envelope.adaptive and envelope.gamma >= 4 and envelope.num_suffixes >= 2
    assert envelope.ngram == base.ngram
    capped = adaptive_config(measurements, base, gamma=3, num_suffixes=2)
    assert capped.gamma == 3 and capped.num_suffixes == 2
    cpu = adaptive_config(Measurements("test", CPU, DRAFT, 0.7), base)
    assert cpu.largest_target_tree <= envelope.largest_target_tree


# ============================================================================ exactness


@pytest.fixture(scope="module")
def pair():
    target = tiny_llama(11, vocab=VOCAB)
    return target, perturbed(target, 0.1, seed=4)


def _forced(decoder, plans):
    decoder._planner = lambda: SchedulePlanner(plans)
    return decoder


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("window", [False, True])
def test_every_shape_of_the_envelope_is_exact(dtype, window):
    """Steps cycle through every plan of the envelope (γ = 0 steps included, so the draft
    cache falls behind and catches up): output equals transformers' greedy."""
    target = tiny_llama(12, vocab=VOCAB, dtype=dtype)
    draft = perturbed(target, 0.1, seed=5)
    config = OuroborosConfig(gamma=3, num_suffixes=2, root_phrases=1, draft_phrases=2,
                             ngram=3, window=window, adaptive=True)
    plans = envelope_plans(config)
    decoder = _forced(OuroborosDecoder(target, draft, config), plans)
    shapes = set()
    for seed in range(3):
        prompt = random_prompt(6 + 5 * seed, VOCAB, seed)
        expected = greedy_reference(target, prompt, 60)
        result = decoder.generate(prompt, 60, eos_token_id=[])
        assert torch.equal(result.sequences, expected), seed
        assert sum(result.stats.shapes.values()) == result.stats.target_passes
        shapes |= set(result.stats.shapes)
    assert len(shapes) == min(len(plans), len(shapes)) and len(shapes) > 10


def test_lookahead_envelope_shapes_are_exact(pair):
    target, _ = pair
    config = OuroborosConfig.preset("lookahead", num_suffixes=4, adaptive=True)
    decoder = _forced(OuroborosDecoder(target, None, config), envelope_plans(config))
    prompt = random_prompt(9, VOCAB, 3)
    assert torch.equal(decoder.generate(prompt, 50, eos_token_id=[]).sequences,
                       greedy_reference(target, prompt, 50))


def test_adaptive_planner_is_exact_and_reports_shapes(pair):
    target, draft = pair
    measurements = Measurements("test", CPU, DRAFT, 0.8)
    config = adaptive_config(measurements, OuroborosConfig(ngram=3))
    decoder = OuroborosDecoder(target, draft, config)
    decoder.measurements = measurements
    for seed in range(4):
        prompt = random_prompt(5 + seed, VOCAB, 20 + seed)
        expected = greedy_reference(target, prompt, 48, eos_token_id=5)
        result = decoder.generate(prompt, 48, eos_token_id=5)
        assert torch.equal(result.sequences, expected), seed
        assert sum(result.stats.shapes.values()) == result.stats.target_passes


def test_default_config_is_tuned_and_adaptive(pair, tmp_path, monkeypatch, capsys):
    """``config=None`` measures once (progress on stderr), caches, and decodes exactly."""
    monkeypatch.setenv("OUROBOROS_TUNING", "on")
    monkeypatch.setenv("OUROBOROS_CACHE_DIR", str(tmp_path))
    target, draft = pair
    decoder = OuroborosDecoder(target, draft)
    assert decoder.config.adaptive and decoder.measurements is not None
    assert "measuring" in capsys.readouterr().err
    assert list((tmp_path / "tuning").glob("*.json"))
    prompt = random_prompt(7, VOCAB, 2)
    assert torch.equal(decoder.generate(prompt, 40, eos_token_id=[]).sequences,
                       greedy_reference(target, prompt, 40))
    again = OuroborosDecoder(target, draft)  # from the cache: nothing measured
    assert "measuring" not in capsys.readouterr().err
    assert again.config == decoder.config
    monkeypatch.setenv("OUROBOROS_TUNING", "off")
    assert OuroborosDecoder(target, draft).config == OuroborosConfig()
    assert OuroborosDecoder(target, None).config == OuroborosConfig.preset("lookahead")


def test_each_method_adapts_only_its_own_mechanisms():
    measurements = Measurements("test", GPU, DRAFT, 0.7)
    speculative = adaptive_config(measurements, OuroborosConfig.preset("speculative", gamma=2))
    assert speculative.gamma >= 2 and not speculative.uses_pool
    lookahead = adaptive_config(measurements, OuroborosConfig.preset("lookahead"))
    assert not lookahead.use_draft and lookahead.num_suffixes >= 1 and lookahead.adaptive


def test_bad_adaptive_settings_are_refused():
    with pytest.raises(TypeError, match="adaptive must be a bool"):
        OuroborosConfig(adaptive="yes")
    with pytest.raises(ValueError, match="decay must lie in"):
        planner(decay=0.0)
    with pytest.raises(ValueError, match="no candidate plan"):
        planner(plans=[])
