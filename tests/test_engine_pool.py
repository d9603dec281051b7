"""The pool paths of the engine actually run (tiny vocabularies, where phrases repeat), stay
exact, and the pool persists: warm start, save/load, draft = target acceptance floor."""

from __future__ import annotations

import pytest
import torch
from engine_models import (  # noqa: F401  (single_thread is a fixture)
    greedy_reference,
    perturbed,
    random_prompt,
    single_thread,
    tiny_llama,
)

from ouroboros import OuroborosConfig, OuroborosDecoder

pytestmark = pytest.mark.usefixtures("single_thread")


def run_exact(decoder, target, prompt, max_new_tokens):
    result = decoder.generate(prompt, max_new_tokens)
    expected = greedy_reference(target, prompt, max_new_tokens)
    assert result.sequences.tolist() == expected.tolist()
    return result.stats


@pytest.mark.parametrize("vocab", [16, 32])
def test_tiny_vocab_ouroboros_paths_run(vocab):
    target = tiny_llama(0, vocab=vocab)
    draft = perturbed(target, 0.05, seed=7)
    decoder = OuroborosDecoder(target, draft, OuroborosConfig(gamma=4, window=True))
    stats = run_exact(decoder, target, random_prompt(8, vocab, 1), 60)
    assert stats.draft_phrase_tokens > 0  # phrase-level drafting matched pool phrases
    assert stats.inspiration_ngrams > 0   # rejected tails fed the pool
    assert stats.refinements > 0          # verified suffixes were corrected in place
    assert stats.window_ngrams > 0        # the draft's Jacobi window fed the pool
    assert 0 < stats.accepted_draft_tokens < stats.draft_tokens  # partial acceptance
    assert stats.suffix_tokens > 0        # tokens accepted from candidate suffixes


def test_root_phrases_pay_off_with_an_unrelated_draft():
    """With a draft that is always wrong, suffixes after the draft are never reached, but
    phrases beside it still are (and are refined in place)."""
    target = tiny_llama(0, vocab=16)
    unrelated = tiny_llama(9, vocab=16)
    prompt = random_prompt(8, 16, 1)
    without = run_exact(OuroborosDecoder(target, unrelated, OuroborosConfig(gamma=2)), target,
                        prompt, 60)
    config = OuroborosConfig(gamma=2, root_phrases=3)
    stats = run_exact(OuroborosDecoder(target, unrelated, config), target, prompt, 60)
    assert stats.suffix_tokens > without.suffix_tokens and stats.refinements > 0
    assert stats.target_passes < without.target_passes


def test_tiny_vocab_lookahead_paths_run():
    target = tiny_llama(0, vocab=16)
    decoder = OuroborosDecoder(target, None, OuroborosConfig.preset("lookahead"))
    stats = run_exact(decoder, target, random_prompt(8, 16, 1), 60)
    assert stats.window_ngrams > 0 and stats.suffix_tokens > 0
    assert stats.draft_passes == 0 and stats.mean_accepted > 1.2


def test_draft_equals_target_with_warm_pool_accepts_long_chunks():
    target = tiny_llama(4, vocab=24)
    config = OuroborosConfig(gamma=6, num_suffixes=4)
    decoder = OuroborosDecoder(target, target, config)
    run_exact(decoder, target, random_prompt(12, 24, 2), 48)  # warms the pool
    stats = run_exact(decoder, target, random_prompt(12, 24, 3), 48)
    # Every draft token is the target's own choice: γ + 1 tokens per pass at least (the
    # last pass may be cut by max_new_tokens), more when a suffix is accepted too.
    assert stats.accepted_draft_tokens == stats.draft_tokens
    assert stats.mean_accepted >= config.gamma
    assert stats.target_passes <= 48 // (config.gamma + 1) + 1


def test_warm_start_off_clears_the_pool_each_call():
    target = tiny_llama(0, vocab=16)
    draft = perturbed(target, 0.05, seed=7)
    prompts = [random_prompt(8, 16, s) for s in (1, 2)]
    cold = OuroborosDecoder(target, draft, OuroborosConfig(gamma=4, warm_start=False))
    cold.generate(prompts[0], 30)
    second = cold.generate(prompts[1], 30).stats
    fresh = OuroborosDecoder(target, draft, OuroborosConfig(gamma=4)).generate(prompts[1], 30)
    assert (second.draft_passes, second.target_passes, second.suffix_tokens) == \
        (fresh.stats.draft_passes, fresh.stats.target_passes, fresh.stats.suffix_tokens)
    warm = OuroborosDecoder(target, draft, OuroborosConfig(gamma=4))
    warm.generate(prompts[0], 30)
    before = warm.pool.state_dict()["phrases"].clone()
    warm.generate(prompts[1], 30)
    assert before.ne(-1).any()  # the first call left phrases for the second


def test_save_and_load_pool(tmp_path):
    target = tiny_llama(0, vocab=16)
    draft = perturbed(target, 0.05, seed=7)
    config = OuroborosConfig(gamma=4, num_suffixes=3)
    first = OuroborosDecoder(target, draft, config)
    run_exact(first, target, random_prompt(9, 16, 5), 40)
    path = tmp_path / "pool.safetensors"
    first.save_pool(path)
    second = OuroborosDecoder(target, draft, config)
    second.load_pool(path)
    for name, tensor in first.pool.state_dict().items():
        assert torch.equal(second.pool.state_dict()[name], tensor), name
    prompt = random_prompt(9, 16, 6)
    a = run_exact(first, target, prompt, 40)
    b = run_exact(second, target, prompt, 40)
    assert (a.draft_passes, a.target_passes, a.suffix_tokens) == \
        (b.draft_passes, b.target_passes, b.suffix_tokens)
    other = OuroborosDecoder(target, draft, OuroborosConfig(gamma=4, ngram=3))
    with pytest.raises(ValueError, match="phrase_len"):
        other.load_pool(path)
    with pytest.raises(ValueError, match="keeps no candidate pool"):
        OuroborosDecoder(target, draft, "speculative").save_pool(path)


@pytest.mark.parametrize("ablation", [
    {"inspiration": False}, {"refinement": False}, {"num_suffixes": 0},
    {"window": True}, {"seed_pool_from_prompt": False, "pool_from_output": False},
    {"draft_phrases": 0}])
def test_ablations_stay_exact(ablation):
    target = tiny_llama(0, vocab=16)
    draft = perturbed(target, 0.05, seed=7)
    config = OuroborosConfig(gamma=4, **ablation)
    stats = run_exact(OuroborosDecoder(target, draft, config), target,
                      random_prompt(8, 16, 1), 40)
    if ablation.get("inspiration") is False:
        assert stats.inspiration_ngrams == 0
    if ablation.get("refinement") is False:
        assert stats.refinements == 0
    if ablation.get("num_suffixes") == 0:
        assert stats.suffix_tokens == 0 and stats.refinements == 0
    if ablation.get("draft_phrases") == 0:
        assert stats.draft_phrase_tokens == 0
