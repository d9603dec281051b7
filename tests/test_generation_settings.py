"""The target's generation config, argument checks and concurrency: no silent differences
from ``target.generate`` and no deep errors (issue "no silent wrong answers")."""

from __future__ import annotations

import threading

import pytest
import torch
from engine_models import (  # noqa: F401  (single_thread is a fixture)
    EOS,
    greedy_reference,
    perturbed,
    random_prompt,
    single_thread,
    tiny_llama,
)

from ouroboros import OuroborosConfig, OuroborosDecoder

pytestmark = pytest.mark.usefixtures("single_thread")
VOCAB = 48
PRESETS = ["greedy", "speculative", "lookahead", "ouroboros"]


@pytest.fixture()
def pair():
    target = tiny_llama(11, vocab=VOCAB)
    return target, perturbed(target, 0.05, seed=4)


def decode(target, draft, preset, prompt, new, **kwargs):
    config = OuroborosConfig.preset(preset)
    decoder = OuroborosDecoder(target, draft if config.use_draft else None, config)
    return decoder.generate(prompt, new, **kwargs).sequences.tolist()


def frequent_tokens(target, prompt, new, count):
    """The tokens greedy decoding emits most: suppressing them changes the output."""
    out = greedy_reference(target, prompt, new)[0, prompt.shape[1]:].tolist()
    return sorted(set(out), key=out.count, reverse=True)[:count]


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("seed", range(3))
def test_suppress_tokens_as_generate(pair, preset, seed):
    target, draft = pair
    prompt = random_prompt(7, VOCAB, seed)
    target.generation_config.suppress_tokens = frequent_tokens(target, prompt, 24, 2)
    expected = greedy_reference(target, prompt, 24)
    assert decode(target, draft, preset, prompt, 24) == expected.tolist()


@pytest.mark.parametrize("preset", PRESETS)
def test_begin_suppress_tokens_as_generate(pair, preset):
    target, draft = pair
    prompt = random_prompt(6, VOCAB, 1)
    first = greedy_reference(target, prompt, 1)[0, -1].item()
    target.generation_config.begin_suppress_tokens = [first]
    expected = greedy_reference(target, prompt, 20)
    assert expected[0, prompt.shape[1]].item() != first
    assert decode(target, draft, preset, prompt, 20) == expected.tolist()


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("setting", ["min_new_tokens", "min_length"])
def test_min_new_tokens_as_generate(pair, preset, setting):
    target, draft = pair
    prompt = random_prompt(5, VOCAB, 2)
    # The EOS is the token greedy decoding emits first, so without the rule it ends at once.
    eos = greedy_reference(target, prompt, 1)[0, -1].item()
    value = 12 if setting == "min_new_tokens" else prompt.shape[1] + 12
    setattr(target.generation_config, setting, value)
    expected = greedy_reference(target, prompt, 30, eos_token_id=eos)
    assert expected.shape[1] - prompt.shape[1] > 12 - 1
    assert decode(target, draft, preset, prompt, 30, eos_token_id=eos) == expected.tolist()


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("name,value", [("repetition_penalty", 1.5),
                                        ("repetition_penalty", 0.7),
                                        ("no_repeat_ngram_size", 1),
                                        ("no_repeat_ngram_size", 2),
                                        ("no_repeat_ngram_size", 3),
                                        ("bad_words_ids", "frequent")])
def test_context_rules_as_generate(pair, preset, name, value):
    """Rules that read the text so far: each tree node is judged in its own context."""
    target, draft = pair
    changed = 0
    for seed in range(3):
        # Repetitive prompts: the pool proposes repeats, which the rules then forbid.
        prompt = random_prompt(4, VOCAB, seed).repeat(1, 4)
        setting = value
        if value == "frequent":
            out = greedy_reference(target, prompt, 24)[0, prompt.shape[1]:].tolist()
            setting = [[out[3]], [out[5], out[6]], [out[0], out[1], out[2]]]
        setattr(target.generation_config, name, setting)
        expected = greedy_reference(target, prompt, 24)
        setattr(target.generation_config, name, None)
        changed += expected.tolist() != greedy_reference(target, prompt, 24).tolist()
        setattr(target.generation_config, name, setting)
        assert decode(target, draft, preset, prompt, 24) == expected.tolist(), seed
    assert changed  # the setting mattered for at least one prompt


@pytest.mark.parametrize("name,value", [("sequence_bias", {(5,): 2.0}),
                                        ("guidance_scale", 1.5),
                                        ("forced_eos_token_id", EOS)])
def test_unsupported_settings_are_refused_by_name(pair, name, value):
    target, draft = pair
    setattr(target.generation_config, name, value)
    prompt = random_prompt(5, VOCAB, 3)
    with pytest.raises(ValueError, match=name):
        decode(target, draft, "ouroboros", prompt, 8)
    # The opt-in decodes as generate without the setting.
    out = decode(target, draft, "ouroboros", prompt, 8, ignore_generation_config=True)
    setattr(target.generation_config, name, None)
    assert out == greedy_reference(target, prompt, 8).tolist()


@pytest.mark.parametrize("kwargs,error,match", [
    ({"temperature": -1.0}, ValueError, "temperature"),
    ({"temperature": float("nan")}, ValueError, "temperature"),
    ({"do_sample": True, "temperature": 0.0}, ValueError, "temperature"),
    ({"do_sample": True, "seed": "a"}, TypeError, "seed"),
    ({"do_sample": True, "generator": 5}, TypeError, "generator"),
    ({"eos_token_id": 2.0}, TypeError, "eos_token_id"),
    ({"eos_token_id": "</s>"}, TypeError, "eos_token_id"),
    ({"eos_token_id": [2, "x"]}, TypeError, "eos_token_id"),
    ({"eos_token_id": [VOCAB]}, ValueError, "eos_token_id"),
    ({"eos_token_id": VOCAB}, ValueError, "eos_token_id"),
    ({"eos_token_id": -1}, ValueError, "eos_token_id"),
    ({"eos_token_id": torch.tensor(2.0)}, TypeError, "eos_token_id"),
])
def test_bad_arguments_name_themselves(pair, kwargs, error, match):
    target, draft = pair
    with pytest.raises(error, match=match):
        decode(target, draft, "speculative", random_prompt(4, VOCAB, 0), 4, **kwargs)


def test_integer_tensor_eos_is_accepted(pair):
    target, draft = pair
    prompt = random_prompt(5, VOCAB, 2)
    eos = greedy_reference(target, prompt, 3)[0, -1].item()
    expected = greedy_reference(target, prompt, 10, eos_token_id=eos).tolist()
    assert decode(target, draft, "ouroboros", prompt, 10,
                  eos_token_id=torch.tensor(eos)) == expected
    assert decode(target, draft, "ouroboros", prompt, 10,
                  eos_token_id=torch.tensor([eos])) == expected


def test_huge_max_new_tokens_fails_before_allocating():
    target = tiny_llama(1, vocab=VOCAB, max_positions=10**12)
    decoder = OuroborosDecoder(target, None, "greedy")
    with pytest.raises(ValueError, match="max_new_tokens"):
        decoder.generate([5, 6, 7], 10**11)


def in_two_threads(run, count: int, repeats: int = 3) -> dict[int, list]:
    """Thread ``index`` (0 or 1) calls ``run(index, j)`` ``repeats`` times for every ``j`` of
    its parity below ``count``; returns ``{j: [sequences as lists]}``, re-raising any error."""
    results: dict[int, list] = {}
    errors: list[BaseException] = []

    def work(index: int) -> None:
        try:
            for j in range(index, count, 2):
                for _ in range(repeats):
                    results.setdefault(j, []).append(run(index, j).sequences.tolist())
        except BaseException as err:  # noqa: BLE001  (re-raised below)
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


def test_two_threads_share_one_decoder(pair):
    target, draft = pair
    decoder = OuroborosDecoder(target, draft, "ouroboros")
    prompts = [random_prompt(6, VOCAB, s) for s in range(6)]
    expected = [greedy_reference(target, p, 16).tolist() for p in prompts]
    results = in_two_threads(lambda index, j: decoder.generate(prompts[j], 16), len(prompts))
    for j, outputs in results.items():
        assert outputs == [expected[j]] * 3


def test_reentrant_call_from_a_streamer_is_refused(pair):
    target, draft = pair
    decoder = OuroborosDecoder(target, draft, "ouroboros")
    prompt = random_prompt(5, VOCAB, 0)
    with pytest.raises(RuntimeError, match="streamer or stop callback"):
        decoder.generate(prompt, 8, streamer=lambda chunk: decoder.generate(prompt, 2))
    # The decoder is usable afterwards.
    assert decoder.generate(prompt, 8).sequences.tolist() == \
        greedy_reference(target, prompt, 8).tolist()


def test_sampling_takes_the_generation_config_warpers(pair):
    """Sampling arguments not given come from the target's generation config, as in
    ``target.generate(do_sample=True)``: top_k=1 there makes sampling greedy."""
    target, draft = pair
    prompt = random_prompt(6, VOCAB, 4)
    target.generation_config.top_k = 1
    expected = greedy_reference(target, prompt, 16).tolist()
    for seed in range(3):
        assert decode(target, draft, "ouroboros", prompt, 16, do_sample=True,
                      seed=seed) == expected
    # An explicit argument wins over the generation config.
    outputs = {tuple(decode(target, draft, "ouroboros", prompt, 16, do_sample=True,
                            top_k=0, seed=seed)[0]) for seed in range(4)}
    assert len(outputs) > 1


def test_unsupported_sampling_warper_is_refused(pair):
    target, draft = pair
    target.generation_config.min_p = 0.1
    prompt = random_prompt(6, VOCAB, 4)
    with pytest.raises(ValueError, match="min_p"):
        decode(target, draft, "ouroboros", prompt, 4, do_sample=True, seed=0)
    assert decode(target, draft, "ouroboros", prompt, 4) == \
        greedy_reference(target, prompt, 4).tolist()  # greedy is unaffected


def test_model_attention_is_restored_after_generate():
    """An eager model stays eager outside the engine (its numerics, output_attentions)."""
    target = tiny_llama(11, vocab=VOCAB, attn="eager")
    decoder = OuroborosDecoder(target, perturbed(target, 0.05, seed=4), "ouroboros")
    assert target.config._attn_implementation == "eager"
    prompt = random_prompt(6, VOCAB, 0)
    expected = greedy_reference(target, prompt, 12).tolist()
    assert decoder.generate(prompt, 12).sequences.tolist() == expected
    assert target.config._attn_implementation == "eager"
    with torch.no_grad():
        attentions = target(prompt, output_attentions=True).attentions
    assert len(attentions) == 2 and attentions[0].shape == (1, 4, 6, 6)


def test_two_decoders_on_one_model_in_two_threads(pair):
    """The attention switch is counted per model: one decoder ending does not switch the
    model back under another that is still running."""
    target, draft = pair
    prompts = [random_prompt(6, VOCAB, s) for s in range(4)]
    expected = [greedy_reference(target, p, 16).tolist() for p in prompts]
    decoders = [OuroborosDecoder(target, draft, "ouroboros") for _ in range(2)]
    results = in_two_threads(lambda index, j: decoders[index].generate(prompts[j], 16),
                             len(prompts))
    assert all(outputs == [expected[j]] * 3 for j, outputs in results.items())
    assert target.config._attn_implementation == "sdpa"
