"""Hardware-aware defaults (ouroboros/tuning/): one cheap real measurement on tiny models,
the cache, tuned configurations that run exactly, and prepacked CPU linear layers
(ouroboros/models.py). The cost model alone, without models: tests/test_cost_model.py."""

from __future__ import annotations

import copy
import json
import pickle

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
from ouroboros.models import PrepackedLinear, PrepackedSubsetLMHead, prepack_linear_weights
from ouroboros.tuning import (
    CostCurve,
    Measurements,
    choose_from,
    choose_num_threads,
    measure,
    measure_agreement,
    measure_cost_curve,
    tuned_config,
)

pytestmark = pytest.mark.usefixtures("single_thread")

CPU = CostCurve((1, 8, 16, 32, 64), (0.041, 0.061, 0.075, 0.099, 0.154))  # SmolLM2, 2 cores
CPU_DRAFT = CostCurve((1, 8, 16, 32), (0.004, 0.005, 0.006, 0.008))


def test_the_package_keeps_its_public_names():
    import ouroboros.models
    import ouroboros.tuning
    from ouroboros import geometry

    for name in ouroboros.tuning.__all__:
        assert hasattr(ouroboros.tuning, name), name
    assert ouroboros.tuning.TreeShape is geometry.TreeShape
    for name in ("PrepackedLinear", "PrepackedSubsetLMHead", "prepack_linear_weights",
                 "prepacking_available"):
        assert getattr(ouroboros.tuning, name) is getattr(ouroboros.models, name)


def test_measurements_round_trip_and_choose_from():
    low = Measurements("cpu", CPU, CPU_DRAFT, alpha=0.2)
    high = Measurements("cpu", CPU, CPU_DRAFT, alpha=0.95, extra={"alphas": {"default": 0.95}})
    assert choose_from(low, "speculative").gamma < choose_from(high, "speculative").gamma
    assert Measurements.from_json(high.to_json()) == high
    lookahead = Measurements("cpu", CPU, None, alpha=None)
    assert Measurements.from_json(lookahead.to_json()) == lookahead
    stale = json.loads(high.to_json())
    stale["format"] = 0
    with pytest.raises(ValueError, match="format"):
        Measurements.from_json(json.dumps(stale))


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

    monkeypatch.setattr("ouroboros.tuning.measurement.measure_cost_curve", fail)
    again = measure(target, draft, None, cache_dir=tmp_path)
    assert again.target_curve == first.target_curve
    # α on a prompt sample: measured once (the curves come from the cache), then cached.
    prompts = [random_prompt(10, 48, seed=s)[0].tolist() for s in (3, 4)]
    sampled = measure(target, draft, None, prompts=prompts, cache_dir=tmp_path)
    assert 0.0 <= sampled.alpha <= 1.0 and sampled.target_curve == first.target_curve
    monkeypatch.setattr("ouroboros.tuning.measurement.measure_agreement", fail)
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
    monkeypatch.setenv("OUROBOROS_TUNING", "on")
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
    pickled = pickle.loads(pickle.dumps(head))  # a module-level class: picklable
    assert type(pickled) is PrepackedSubsetLMHead
    torch.testing.assert_close(pickled(hidden), expected, rtol=1e-5, atol=1e-5)


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
