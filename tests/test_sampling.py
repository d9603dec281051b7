"""Sampling: the logits processing matches transformers', and the engine's samples have
the target's joint distribution (chi-square over the first three tokens, many seeds)."""

from __future__ import annotations

import pytest
import torch
from engine_models import perturbed, random_prompt, single_thread, tiny_llama  # noqa: F401
from scipy.stats import chi2
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from ouroboros import OuroborosConfig, OuroborosDecoder
from ouroboros.sampling import SamplingParams, choose_tokens, process_logits

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (1.0, None, None), (0.7, 5, None), (1.3, None, 0.8), (0.9, 20, 0.6), (2.0, 1, None),
    (0.5, None, 0.01)])
def test_processing_matches_transformers_warpers(temperature, top_k, top_p):
    logits = torch.randn(16, 64, generator=torch.Generator().manual_seed(0)) * 3
    logits[3, :10] = logits[3, 10]  # ties at the top-k boundary
    expected = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k:
        expected = TopKLogitsWarper(top_k)(None, expected)
    if top_p is not None:
        expected = TopPLogitsWarper(top_p)(None, expected)
    got = process_logits(logits, SamplingParams(True, temperature, top_k, top_p))
    assert torch.equal(torch.isinf(got), torch.isinf(expected))
    kept = ~torch.isinf(expected)
    torch.testing.assert_close(got[kept], expected[kept])


def test_choose_tokens_greedy_and_inverse_cdf():
    logits = torch.randn(5, 30, generator=torch.Generator().manual_seed(1))
    assert torch.equal(choose_tokens(logits, SamplingParams()), logits.argmax(-1))
    params = SamplingParams(True, 1.0, None, None)
    probs = logits.double().softmax(-1)
    cdf = probs.cumsum(-1)
    uniforms = torch.tensor([0.0, 0.3, 0.5, 0.77, 0.999999], dtype=torch.float64)
    got = choose_tokens(logits, params, uniforms)
    for row, u in enumerate(uniforms.tolist()):  # smallest token whose CDF exceeds u
        assert got[row] == int((cdf[row] > u * cdf[row, -1]).nonzero()[0])
    top1 = choose_tokens(logits, SamplingParams(True, 1.0, 1, None), uniforms)
    assert torch.equal(top1, logits.argmax(-1))  # top-k 1 leaves only the argmax
    masked = choose_tokens(logits, SamplingParams(True, 1.0, 3, None),
                           torch.linspace(0, 0.999, 5, dtype=torch.float64))
    top3 = logits.topk(3, dim=-1).indices
    assert all(masked[r] in top3[r] for r in range(5))  # zero-probability tokens never
    with pytest.raises(ValueError, match="one uniform per row"):
        choose_tokens(logits, params)


def test_sampling_arguments():
    assert SamplingParams.from_arguments().do_sample is False
    assert SamplingParams.from_arguments(temperature=0).do_sample is False
    assert SamplingParams.from_arguments(temperature=0.8).temperature == 0.8
    assert SamplingParams.from_arguments(do_sample=True).temperature == 1.0
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(True, 1.0, None, 1.5)
    with pytest.raises(ValueError, match="top_k"):
        SamplingParams(True, 1.0, -2, None)


# ------------------------------------------------------------------------ distribution

VOCAB = 8
DEPTH = 3


def exact_joint(model, prompt: list[int], params: SamplingParams) -> dict[tuple, float]:
    """P(first DEPTH tokens) under the target's processed distribution, by enumeration."""
    probs = {(): 1.0}
    for _ in range(DEPTH):
        prefixes = list(probs)
        with torch.no_grad():
            logits = model(torch.tensor([prompt + list(p) for p in prefixes])).logits[:, -1]
        step = process_logits(logits.double(), params).softmax(-1).tolist()
        probs = {p + (t,): probs[p] * step[i][t] for i, p in enumerate(prefixes)
                 for t in range(VOCAB) if step[i][t] > 0}
    return probs


def chi_square_pvalue(counts: dict[tuple, int], probs: dict[tuple, float]) -> float:
    """Goodness of fit; cells with an expected count below 5 are pooled into one."""
    total = sum(counts.values())
    assert set(counts) <= set(probs), "a sample the target gives probability 0"
    statistic, cells, pooled_observed, pooled_expected = 0.0, 0, 0, 0.0
    for outcome, p in probs.items():
        expected, observed = p * total, counts.get(outcome, 0)
        if expected < 5:
            pooled_observed += observed
            pooled_expected += expected
            continue
        statistic += (observed - expected) ** 2 / expected
        cells += 1
    if pooled_expected > 0:
        statistic += (pooled_observed - pooled_expected) ** 2 / pooled_expected
        cells += 1
    return float(chi2.sf(statistic, cells - 1))


@pytest.fixture(scope="module")
def sampling_pair():
    target = tiny_llama(5, vocab=VOCAB, init=0.4)
    return target, perturbed(target, 0.05, seed=2)


@pytest.mark.parametrize("method,temperature,top_k,top_p", [
    ("ouroboros", 1.0, None, None),
    ("speculative", 0.8, 6, None),
    ("lookahead", 1.2, None, 0.9),
    ("adaptive", 1.0, None, 0.95),  # the tree of each step chosen by the planner
])
def test_sampled_joint_distribution_matches_target(sampling_pair, method, temperature, top_k,
                                                   top_p):
    target, draft = sampling_pair
    prompt = random_prompt(5, VOCAB, 9)[0].tolist()
    params = SamplingParams(True, temperature, top_k, top_p)
    probs = exact_joint(target, prompt, params)
    measurements = None
    if method == "adaptive":
        from ouroboros.adaptive import adaptive_config
        from ouroboros.tuning import CostCurve, Measurements

        measurements = Measurements("test", CostCurve((1, 8, 64), (0.02, 0.021, 0.03)),
                                    CostCurve((1, 8, 64), (0.002, 0.0021, 0.003)), 0.6)
        config = adaptive_config(measurements, OuroborosConfig(ngram=3, pool_capacity=8))
    else:
        config = OuroborosConfig.preset(method, ngram=3, pool_capacity=8)
    decoder = OuroborosDecoder(target, draft if config.use_draft else None, config)
    decoder.measurements = measurements or decoder.measurements
    shapes: set = set()
    counts: dict[tuple, int] = {}
    accepted_beyond_first = 0
    runs = 1500
    for seed in range(runs):
        result = decoder.generate(prompt, DEPTH, do_sample=True, temperature=temperature,
                                  top_k=top_k, top_p=top_p, seed=seed, eos_token_id=[])
        outcome = tuple(result.new_tokens.tolist())
        counts[outcome] = counts.get(outcome, 0) + 1
        accepted_beyond_first += result.stats.target_passes < DEPTH
        shapes |= set(result.stats.shapes)
    if method == "adaptive":
        assert len(shapes) > 1  # the planner did vary the trees
    # Tokens produced by accepted branches are covered, not only first tokens.
    assert accepted_beyond_first > runs // 10
    assert chi_square_pvalue(counts, probs) > 1e-3
    # The test can fail: the same samples are far from a slightly different distribution.
    wrong = exact_joint(target, prompt, SamplingParams(True, temperature * 1.25, top_k, top_p))
    for outcome in counts:
        wrong.setdefault(outcome, 1e-12)
    assert chi_square_pvalue(counts, wrong) < 1e-3


def test_a_seed_gives_the_same_text_with_every_method(sampling_pair):
    """Draws are keyed by output position, not by tree shape: the same seed gives the same
    sample whatever the method, the draft or the pool state."""
    target, draft = sampling_pair
    prompt = random_prompt(4, VOCAB, 1)
    decoders = [OuroborosDecoder(target, draft, OuroborosConfig(gamma=3)),
                OuroborosDecoder(target, draft, "speculative"),
                OuroborosDecoder(target, None, "lookahead"),
                OuroborosDecoder(target, None, "greedy")]
    for seed in (5, 123):
        outputs = {tuple(d.generate(prompt, 14, do_sample=True, top_p=0.95, seed=seed,
                                    eos_token_id=[]).new_tokens.tolist()) for d in decoders}
        again = decoders[0].generate(prompt, 14, do_sample=True, top_p=0.95, seed=seed,
                                     eos_token_id=[])  # warm pool now: same text
        assert len(outputs) == 1 and tuple(again.new_tokens.tolist()) in outputs
    with_generator = decoders[1].generate(prompt, 14, do_sample=True, top_p=0.95,
                                          generator=torch.Generator().manual_seed(123),
                                          eos_token_id=[])
    assert tuple(with_generator.new_tokens.tolist()) in outputs
    samples = {tuple(decoders[0].generate(prompt, 14, do_sample=True, seed=s)
                     .new_tokens.tolist()) for s in range(8)}
    assert len(samples) > 1
