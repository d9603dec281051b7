"""Hardware-aware defaults (ouroboros/tuning.py): the choice logic on fake cost curves, one
cheap real measurement on tiny models, the cache, and prepacked CPU linear layers."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from engine_models import (  # noqa: F401  (single_thread: a fixture)
    greedy_reference,
    perturbed,
    random_prompt,
    single_thread,
    tiny_llama,
)

from ouroboros import OuroborosDecoder
from ouroboros.config import OuroborosConfig
from ouroboros.tuning import (
    CostCurve,
    Measurements,
    PrepackedLinear,
    ThroughputModel,
    TreeShape,
    choose_config,
    choose_from,
    choose_num_threads,
    measure,
    measure_agreement,
    measure_cost_curve,
    prepack_linear_weights,
    tuned_config,
)

pytestmark = pytest.mark.usefixtures("single_thread")

# Shapes of the curves this project measured (ms per pass over T new tokens, 200 cached).
CPU = CostCurve((1, 8, 16, 32, 64), (0.041, 0.061, 0.075, 0.099, 0.154))  # SmolLM2, 2 cores
GPU = CostCurve((1, 8, 16, 32, 64), (0.012, 0.0121, 0.0122, 0.0124, 0.013))  # flat
CPU_DRAFT = CostCurve((1, 8, 16, 32), (0.004, 0.005, 0.006, 0.008))
GPU_DRAFT = CostCurve((1, 8, 16, 32), (0.0015, 0.0015, 0.0015, 0.0015))


def tree_size(config: OuroborosConfig) -> int:
    return config.largest_target_tree


# ------------------------------------------------------------------ cost curves


def test_cost_curve_interpolates_and_extrapolates():
    curve = CostCurve((1, 4, 8), (1.0, 2.0, 4.0))
    assert curve(1) == 1.0 and curve(0) == 1.0
    assert curve(2) == pytest.approx(1 + 1 / 3)
    assert curve(6) == pytest.approx(3.0)
    assert curve(12) == pytest.approx(6.0)  # the last segment's slope
    assert curve.relative(8) == 4.0
    assert CostCurve.from_dict(curve.to_dict()) == curve


@pytest.mark.parametrize("sizes, seconds", [((), ()), ((1, 2), (1.0,)), ((2, 1), (1.0, 2.0)),
                                            ((0, 1), (1.0, 2.0)), ((1, 2), (1.0, -1.0)),
                                            ((1,), (float("nan"),))])
def test_cost_curve_rejects_bad_input(sizes, seconds):
    with pytest.raises(ValueError):
        CostCurve(sizes, seconds)


# ------------------------------------------------------------------ the choice


def test_a_flat_gpu_curve_buys_bigger_trees_than_a_steep_cpu_curve():
    model = ThroughputModel(alpha=0.7)
    on_cpu = choose_config(CPU, CPU_DRAFT, "ouroboros", model)
    on_gpu = choose_config(GPU, GPU_DRAFT, "ouroboros", model)
    assert tree_size(on_gpu) > tree_size(on_cpu)
    assert on_gpu.num_suffixes >= on_cpu.num_suffixes
    # Both beat the presets under the model that chose them.
    preset = OuroborosConfig.preset("ouroboros")
    for curve, draft, chosen in ((CPU, CPU_DRAFT, on_cpu), (GPU, GPU_DRAFT, on_gpu)):
        assert model.tokens_per_second(chosen, curve, draft) >= \
            model.tokens_per_second(preset, curve, draft)


def test_lookahead_window_and_suffixes_grow_on_a_flat_curve():
    model = ThroughputModel()
    on_cpu = choose_config(CPU, None, "lookahead", model)
    on_gpu = choose_config(GPU, None, "lookahead", model)
    assert not on_cpu.use_draft and not on_gpu.use_draft and on_gpu.gamma == 0
    assert tree_size(on_gpu) > tree_size(on_cpu)


def test_draft_length_follows_agreement():
    gammas = [choose_config(CPU, CPU_DRAFT, "speculative", ThroughputModel(alpha=a)).gamma
              for a in (0.3, 0.6, 0.9)]
    assert gammas == sorted(gammas) and gammas[0] < gammas[-1]
    # A draft that costs as much as the target is not worth long drafts.
    expensive = choose_config(CPU, CPU, "speculative", ThroughputModel(alpha=0.6))
    assert expensive.gamma <= gammas[1]


def test_overrides_are_held_fixed_and_greedy_is_the_preset():
    chosen = choose_config(GPU, GPU_DRAFT, "ouroboros", ThroughputModel(), gamma=3, ngram=5)
    assert chosen.gamma == 3 and chosen.ngram == 5 and chosen.name == "ouroboros"
    assert choose_config(CPU, None, "greedy") == OuroborosConfig.preset("greedy")
    speculative = choose_config(CPU, CPU_DRAFT, "speculative")
    assert speculative.num_suffixes == 0 and speculative.draft_phrases == 0 \
        and not speculative.uses_pool


def test_throughput_model_counts_what_a_step_emits():
    model = ThroughputModel(alpha=0.5, coverage=0.0)
    shape = TreeShape(True, 3, 4, 4)
    assert model.tokens_per_step(shape) == pytest.approx(1 + 0.5 + 0.25 + 0.125)
    flat = CostCurve((1,), (1.0,))
    assert model.seconds_per_step(shape, flat, flat) == pytest.approx(
        model.step_overhead + 3 * (1.0 + model.pass_overhead) + 1.0)
    with pytest.raises(ValueError, match="draft"):
        model.seconds_per_step(shape, flat, None)


def test_choose_from_uses_the_measured_agreement():
    low = Measurements("cpu", CPU, CPU_DRAFT, alpha=0.2)
    high = Measurements("cpu", CPU, CPU_DRAFT, alpha=0.95)
    assert choose_from(low, "speculative").gamma < choose_from(high, "speculative").gamma
    assert Measurements.from_json(high.to_json()) == high


# ------------------------------------------------------------------ real measurements


def test_measure_and_cache_on_tiny_models(tmp_path, monkeypatch):
    target = tiny_llama(0)
    draft = perturbed(target, 0.3, seed=1)
    curve = measure_cost_curve(target, (1, 4, 16), prefix_len=24, repeats=2)
    assert curve.sizes == (1, 4, 16)
    assert all(s > 0 for s in curve.seconds)
    assert list(curve.seconds) == sorted(curve.seconds)  # non-decreasing by construction

    first = measure(target, draft, None, cache_dir=tmp_path)
    assert first.alpha is None  # no tokenizer: no agreement measurement
    files = list((tmp_path / "tuning").glob("*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["target_curve"]

    def fail(*args, **kwargs):
        raise AssertionError("measured again instead of reading the cache")

    monkeypatch.setattr("ouroboros.tuning.measure_cost_curve", fail)
    again = measure(target, draft, None, cache_dir=tmp_path)
    assert again.target_curve == first.target_curve
    # α on a prompt sample: measured once (the curves come from the cache), then cached.
    prompts = [random_prompt(10, 48, seed=s)[0].tolist() for s in (3, 4)]
    sampled = measure(target, draft, None, prompts=prompts, cache_dir=tmp_path)
    assert 0.0 <= sampled.alpha <= 1.0 and sampled.target_curve == first.target_curve
    monkeypatch.setattr("ouroboros.tuning.measure_agreement", fail)
    assert measure(target, draft, None, prompts=prompts, cache_dir=tmp_path).alpha == \
        sampled.alpha
    assert measure(target, draft, None, cache_dir=tmp_path).alpha is None
    with pytest.raises(AssertionError, match="measured again"):
        measure(target, draft, None, prompts=prompts[:1], cache_dir=tmp_path)
    files[0].write_text("{broken")
    with pytest.raises(AssertionError, match="measured again"):
        measure(target, draft, None, cache_dir=tmp_path)


def test_tuned_config_runs_exactly(tmp_path, monkeypatch):
    monkeypatch.setenv("OUROBOROS_CACHE_DIR", str(tmp_path))
    target = tiny_llama(0)
    draft = perturbed(target, 0.3, seed=1)
    config = tuned_config(target, draft)
    assert config.name == "ouroboros" and config.use_draft
    prompt = random_prompt(12, 48, seed=2)
    result = OuroborosDecoder(target, draft, config).generate(prompt, 24)
    assert torch.equal(result.sequences, greedy_reference(target, prompt, 24))
    fixed = tuned_config(target, draft, gamma=2, num_suffixes=1)
    assert fixed.gamma == 2 and fixed.num_suffixes == 1
    monkeypatch.setenv("OUROBOROS_TUNING", "off")
    assert tuned_config(target, draft) == OuroborosConfig.preset("ouroboros")
    assert tuned_config(target, None, method="lookahead", tune=False) == \
        OuroborosConfig.preset("lookahead")
    with pytest.raises(ValueError, match="needs a draft"):
        tuned_config(target, None, method="speculative", tune=True)


def test_agreement_of_a_model_with_itself_is_one():
    target = tiny_llama(0)
    prompts = [random_prompt(10, 48, seed=s)[0].tolist() for s in (3, 4)]
    assert measure_agreement(target, target, prompts=prompts, new_tokens=12) == 1.0
    other = tiny_llama(5)
    assert measure_agreement(target, other, prompts=prompts, new_tokens=12) < 1.0
    with pytest.raises(ValueError, match="tokenizer"):
        measure_agreement(target, target)


# ------------------------------------------------------------------ prepacked linears


def test_prepacked_linears_keep_the_model_and_its_greedy_text():
    model = tiny_llama(0)
    prompt = random_prompt(16, 48, seed=7)
    with torch.no_grad():
        before = model(prompt).logits
    reference = greedy_reference(model, prompt, 20)
    names = {name for name, _ in model.named_parameters()}
    replaced = prepack_linear_weights(model)
    if replaced == 0:
        pytest.fail("oneDNN prepacking unavailable on this CPU build of torch")
    assert replaced == 2 * 7 + 1  # q, k, v, o, gate, up, down per layer + the head
    assert isinstance(model.lm_head, PrepackedLinear)
    assert {name for name, _ in model.named_parameters()} == names
    with torch.no_grad():
        after = model(prompt).logits
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    assert torch.equal(greedy_reference(model, prompt, 20), reference)
    result = OuroborosDecoder(model, perturbed(model, 0.2, seed=3), "ouroboros").generate(
        prompt, 20)
    assert torch.equal(result.sequences, reference)
    assert prepack_linear_weights(tiny_llama(0, dtype=torch.float64)) == 0


def test_choose_num_threads_sets_the_faster_count():
    model = tiny_llama(0)
    previous = torch.get_num_threads()
    try:
        chosen = choose_num_threads(model, (1, 2), rounds=1)
        assert chosen in (1, 2) and torch.get_num_threads() == chosen
        assert choose_num_threads(model, (1,)) == 1 and torch.get_num_threads() == 1
        with pytest.raises(ValueError, match="counts"):
            choose_num_threads(model, (0,))
    finally:
        torch.set_num_threads(previous)


def test_prepacked_subset_head_matches_the_original():
    from ouroboros.models import SubsetLMHead

    generator = torch.Generator().manual_seed(0)
    token_ids = torch.randperm(48, generator=generator)[:20].sort().values
    head = SubsetLMHead(torch.randn(20, 64, generator=generator), token_ids, 48)
    model = torch.nn.Sequential(head)
    model.config = None
    hidden = torch.randn(2, 5, 64, generator=generator)
    expected = head(hidden)
    assert prepack_linear_weights(model) == 1
    assert type(head).__name__ == "PrepackedSubsetLMHead" and isinstance(head, SubsetLMHead)
    torch.testing.assert_close(head(hidden), expected, rtol=1e-5, atol=1e-5)
    copied = copy.deepcopy(model)
    torch.testing.assert_close(copied[0](hidden), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_tuning_on_gpu(tmp_path):
    """Cost curves through the compiled Triton kernels (CUDA-synchronised), a tuned
    configuration that runs exactly, and the CPU-only helpers doing nothing on a GPU."""
    target = tiny_llama(0, vocab=64, hidden=256, heads=4, kv_heads=2).cuda()
    draft = perturbed(target, 0.05, seed=7)
    curve = measure_cost_curve(target, (1, 8, 64), prefix_len=64, repeats=2)
    assert all(s > 0 for s in curve.seconds) and list(curve.seconds) == sorted(curve.seconds)
    prompts = [random_prompt(12, 64, seed=s)[0].tolist() for s in (1, 2)]
    measured = measure(target, draft, None, prompts=prompts, cache_dir=tmp_path)
    assert measured.device == torch.cuda.get_device_name() and measured.alpha > 0.5
    config = choose_from(measured)
    prompt = random_prompt(17, 64, seed=3).cuda()
    result = OuroborosDecoder(target, draft, config).generate(prompt, 40)
    assert result.sequences.tolist() == greedy_reference(target, prompt, 40).tolist()
    assert prepack_linear_weights(target) == 0
    assert choose_num_threads(target) == torch.get_num_threads()
