"""Greedy exactness: every configuration of the engine gives, token for token, what
``target.generate(do_sample=False)`` gives (tiny random Llama pairs, CPU, reference backend)."""

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

VOCAB = 48
pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def models() -> dict:
    target = tiny_llama(0, vocab=VOCAB)
    return {
        "same": target,
        "unrelated": tiny_llama(1, vocab=VOCAB),
        "perturbed": perturbed(target, 0.05, seed=7),
        "target": target,
    }


def check_exact(target, draft, config, prompt, max_new_tokens, eos_token_id=None,
                decoder=None):
    expected = greedy_reference(target, prompt, max_new_tokens, eos_token_id)
    decoder = decoder or OuroborosDecoder(target, draft, config)
    kwargs = {} if eos_token_id is None else {"eos_token_id": eos_token_id}
    result = decoder.generate(prompt, max_new_tokens, **kwargs)
    assert result.sequences.tolist() == expected.tolist(), config
    assert result.stats.new_tokens == expected.shape[1] - prompt.shape[1]
    return result


# (gamma, ngram N, num_suffixes K, pool_capacity W, draft_phrases, window)
OUROBOROS_GRID = [
    (1, 2, 0, 1, 0, False),
    (4, 5, 1, 4, 4, True),
    (12, 7, 3, 20, 8, False),
    (4, 2, 8, 20, 2, True),
    (12, 5, 8, 1, 3, True),
    (1, 7, 3, 4, 1, True),
]


@pytest.mark.parametrize("pair", ["same", "unrelated", "perturbed"])
@pytest.mark.parametrize("prompt_len", [1, 6, 23])
@pytest.mark.parametrize("grid", OUROBOROS_GRID, ids=lambda g: "g{}-N{}-K{}-W{}-P{}-{}".format(
    *g[:5], "win" if g[5] else "nowin"))
def test_ouroboros_grid(models, pair, prompt_len, grid):
    gamma, ngram, suffixes, capacity, phrases, window = grid
    config = OuroborosConfig(gamma=gamma, ngram=ngram, num_suffixes=suffixes,
                             pool_capacity=capacity, draft_phrases=phrases, window=window,
                             window_size=3)
    prompt = random_prompt(prompt_len, VOCAB, seed=prompt_len + gamma)
    check_exact(models["target"], models[pair], config, prompt, 29)


@pytest.mark.parametrize("pair", ["same", "unrelated", "perturbed"])
@pytest.mark.parametrize("root_phrases,suffixes", [(1, 0), (3, 2), (8, 8)])
def test_root_phrases(models, pair, root_phrases, suffixes):
    """Pool phrases beside the draft chain (merged into it where they agree)."""
    config = OuroborosConfig(gamma=4, ngram=3, root_phrases=root_phrases,
                             num_suffixes=suffixes)
    check_exact(models["target"], models[pair], config, random_prompt(9, VOCAB, 5), 31)


@pytest.mark.parametrize("pair", ["same", "unrelated", "perturbed"])
@pytest.mark.parametrize("gamma", [1, 4, 12])
def test_speculative(models, pair, gamma):
    config = OuroborosConfig.preset("speculative", gamma=gamma)
    check_exact(models["target"], models[pair], config, random_prompt(7, VOCAB, gamma), 31)


@pytest.mark.parametrize("ngram,suffixes,capacity,window_size", [
    (2, 1, 1, 1), (5, 3, 4, 4), (7, 8, 20, 2), (4, 0, 4, 5)])
@pytest.mark.parametrize("prompt_len", [1, 12])
def test_lookahead(models, ngram, suffixes, capacity, window_size, prompt_len):
    config = OuroborosConfig.preset("lookahead", ngram=ngram, num_suffixes=suffixes,
                                    pool_capacity=capacity, window_size=window_size)
    check_exact(models["target"], None, config, random_prompt(prompt_len, VOCAB, ngram), 27)


@pytest.mark.parametrize("prompt_len", [1, 2, 15])
def test_greedy_preset(models, prompt_len):
    result = check_exact(models["target"], None, OuroborosConfig.preset("greedy"),
                         random_prompt(prompt_len, VOCAB, 3), 19)
    assert result.stats.target_passes == 19 and result.stats.mean_accepted == 1.0


@pytest.mark.parametrize("method", ["greedy", "speculative", "lookahead", "ouroboros"])
@pytest.mark.parametrize("max_new_tokens", [1, 2, 13])
def test_short_budgets_never_overshoot(models, method, max_new_tokens):
    draft = models["same"] if method in ("speculative", "ouroboros") else None
    config = OuroborosConfig.preset(method)
    result = check_exact(models["target"], draft, config, random_prompt(5, VOCAB, 11),
                         max_new_tokens)
    assert result.stats.new_tokens == max_new_tokens


@pytest.mark.parametrize("method", ["speculative", "lookahead", "ouroboros"])
def test_eos_inside_accepted_chunk(models, method):
    """With draft = target, the first step accepts a long chunk; an EOS in its middle must
    end generation right after the EOS, as transformers does."""
    target = models["target"]
    prompt = random_prompt(9, VOCAB, 21)
    free_run = greedy_reference(target, prompt, 12)[0, prompt.shape[1]:].tolist()
    eos = free_run[3]
    stop_at = free_run.index(eos)  # first occurrence
    draft = target if method != "lookahead" else None
    config = OuroborosConfig.preset(method, **({"gamma": 8} if draft is not None else {}))
    result = check_exact(target, draft, config, prompt, 40, eos_token_id=eos)
    assert result.new_tokens.tolist() == free_run[:stop_at + 1]
    if method != "lookahead":
        assert result.stats.target_passes == 1  # the EOS was inside the first accepted chunk


def test_eos_set_and_streaming(models):
    target = models["target"]
    prompt = random_prompt(4, VOCAB, 5)
    free_run = greedy_reference(target, prompt, 30)[0, prompt.shape[1]:].tolist()
    eos_set = [free_run[20], free_run[9]]
    chunks = []
    decoder = OuroborosDecoder(target, models["perturbed"], OuroborosConfig(gamma=5))
    result = decoder.generate(prompt, 30, eos_token_id=eos_set, streamer=chunks.append)
    first = min(free_run.index(t) for t in eos_set)
    assert result.new_tokens.tolist() == free_run[:first + 1]
    assert [t for chunk in chunks for t in chunk] == free_run[:first + 1]
    assert all(chunks)


def test_user_stop_criterion(models):
    target = models["target"]
    prompt = random_prompt(6, VOCAB, 8)
    free_run = greedy_reference(target, prompt, 25)[0, prompt.shape[1]:].tolist()
    calls = []

    def stop(new_tokens: list[int]) -> bool:
        calls.append(len(new_tokens))
        return len(new_tokens) == 11

    decoder = OuroborosDecoder(target, target, OuroborosConfig(gamma=6))
    result = decoder.generate(prompt, 25, stop=stop)
    assert result.new_tokens.tolist() == free_run[:11]
    assert calls == list(range(1, 12))  # once per emitted token, in order


def test_warm_pool_from_another_prompt(models):
    target = models["target"]
    decoder = OuroborosDecoder(target, models["perturbed"],
                               OuroborosConfig(gamma=4, num_suffixes=3, window=True))
    check_exact(target, None, None, random_prompt(10, VOCAB, 1), 30, decoder=decoder)
    assert decoder.pool.num_phrases() > 0
    for seed in (2, 3):
        check_exact(target, None, None, random_prompt(8, VOCAB, seed), 30, decoder=decoder)


@pytest.mark.parametrize("method", ["speculative", "lookahead", "ouroboros"])
def test_float64(method):
    """float64 models: no argmax tie can hide behind rounding."""
    target = tiny_llama(3, vocab=VOCAB, dtype=torch.float64, init=0.05)
    draft = perturbed(target, 0.2, seed=1) if method != "lookahead" else None
    config = OuroborosConfig.preset(method, **({"gamma": 5} if draft is not None else {}))
    check_exact(target, draft, config, random_prompt(11, VOCAB, 4), 33)
