"""Public API of the engine: results, stats, presets, and clear errors for bad input."""

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
from transformers import OlmoConfig, OlmoForCausalLM

import ouroboros
from ouroboros import OuroborosConfig, OuroborosDecoder
from ouroboros.attention import resolve_backend

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def target():
    return tiny_llama(0)


def test_generate_function_and_result(target):
    prompt = random_prompt(5, 48, 0)
    result = ouroboros.generate(target, target, prompt, max_new_tokens=17)
    assert isinstance(result, ouroboros.GenerationResult)
    assert result.sequences.shape == (1, 22) and result.sequences.dtype == torch.int64
    assert result.prompt_length == 5
    assert result.new_tokens.tolist() == result.sequences[0, 5:].tolist()
    assert result.sequences.tolist() == greedy_reference(target, prompt, 17).tolist()
    stats = result.stats
    assert stats.new_tokens == 17 and stats.target_passes >= 1 and stats.draft_passes >= 1
    assert stats.mean_accepted == pytest.approx(17 / stats.target_passes)
    assert stats.time_total >= stats.time_draft + stats.time_verify + stats.time_pool  # exclusive
    assert stats.tokens_per_second > 0 and "tokens/pass" in stats.summary()
    # A list prompt and a 1-D tensor give the same result.
    again = ouroboros.generate(target, target, prompt[0].tolist(), 17, config="ouroboros")
    assert again.sequences.tolist() == result.sequences.tolist()


def test_streamer_object_with_put_and_end(target):
    class Streamer:
        def __init__(self):
            self.chunks, self.ended = [], False

        def put(self, chunk):
            self.chunks.append(chunk.tolist())

        def end(self):
            self.ended = True

    streamer = Streamer()
    result = OuroborosDecoder(target, target).generate(random_prompt(4, 48, 1), 12,
                                                       streamer=streamer)
    assert streamer.ended
    assert sum(streamer.chunks, []) == result.new_tokens.tolist()


def test_presets_and_config_validation():
    assert OuroborosConfig.preset("greedy").uses_pool is False
    assert OuroborosConfig.preset("speculative").uses_pool is False
    assert OuroborosConfig.preset("lookahead").use_draft is False
    assert OuroborosConfig.preset("ouroboros", gamma=9).gamma == 9
    with pytest.raises(ValueError, match="method must be one of"):
        OuroborosConfig.preset("medusa")
    with pytest.raises(ValueError, match="gamma"):
        OuroborosConfig(gamma=0)
    with pytest.raises(ValueError, match="ngram"):
        OuroborosConfig(ngram=1)
    with pytest.raises(ValueError, match="num_suffixes"):
        OuroborosConfig(num_suffixes=-1)
    with pytest.raises(TypeError, match="window"):
        OuroborosConfig(window="yes")
    with pytest.raises(ValueError, match="attention_backend"):
        OuroborosConfig(attention_backend="cuda")
    with pytest.raises(ValueError, match="gamma must be 0 without a draft"):
        OuroborosConfig(use_draft=False, gamma=3)


def test_bad_inputs(target):
    decoder = OuroborosDecoder(target, target)
    with pytest.raises(ValueError, match=r"must be \[1, S\] or \[S\]"):
        decoder.generate(random_prompt(4, 48, 0)[None], 5)  # [1, 1, 4]
    with pytest.raises(ValueError, match="empty"):
        decoder.generate(torch.zeros(1, 0, dtype=torch.int64), 5)
    with pytest.raises(ValueError, match="empty"):
        decoder.generate([], 5)
    with pytest.raises(TypeError, match="integer token ids"):
        decoder.generate(torch.ones(1, 4), 5)
    with pytest.raises(ValueError, match=r"input_ids must lie in \[0, 48\)"):
        decoder.generate([1, 2, 48], 5)
    with pytest.raises(ValueError, match="max_new_tokens"):
        decoder.generate([1, 2, 3], 0)
    with pytest.raises(ValueError, match="exceeds the target's context of 512"):
        decoder.generate(random_prompt(500, 48, 0), 13)
    with pytest.raises(TypeError, match="stop must be callable"):
        decoder.generate([3, 4], 3, stop=5)
    with pytest.raises(ValueError, match="temperature"):
        decoder.generate([3, 4], 3, do_sample=True, temperature=-1.0)


def test_bad_model_pairs(target):
    with pytest.raises(ValueError, match="vocab sizes differ"):
        OuroborosDecoder(target, tiny_llama(1, vocab=40))
    other_eos = tiny_llama(1)
    other_eos.config.eos_token_id = 7
    with pytest.raises(ValueError, match="eos_token_id differs"):
        OuroborosDecoder(target, other_eos)
    with pytest.raises(TypeError, match="draft dtype torch.float64 differs"):
        OuroborosDecoder(target, tiny_llama(1, dtype=torch.float64))
    with pytest.raises(ValueError, match="draft is on meta"):
        OuroborosDecoder(target, tiny_llama(1).to("meta"))
    with pytest.raises(TypeError, match="not supported"):
        OuroborosDecoder(tiny_llama(1).to(torch.float8_e4m3fn), None, "greedy")
    with pytest.raises(ValueError, match="needs a draft model"):
        OuroborosDecoder(target, None, "ouroboros")
    with pytest.raises(TypeError, match="draft must be a torch.nn.Module"):
        OuroborosDecoder(target, "draft")
    with pytest.raises(TypeError, match="config must be"):
        OuroborosDecoder(target, target, {"gamma": 3})


def tiny_olmo():
    """An architecture outside the verified table (OLMo: Llama-like attention)."""
    config = OlmoConfig(vocab_size=48, hidden_size=64, intermediate_size=128,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        max_position_embeddings=512, initializer_range=0.2,
                        eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    model = OlmoForCausalLM(config).eval()
    model.generation_config.eos_token_id = None
    return model


def test_unverified_architecture_needs_force():
    model = tiny_olmo()
    with pytest.raises(ValueError, match="OlmoForCausalLM"):
        OuroborosDecoder(model, None, "lookahead")
    with pytest.raises(ValueError, match="OlmoForCausalLM"):
        ouroboros.enable_ouroboros_attention(model)
    # Forced, the same attention works (and stays exact) on OLMo.
    prompt = random_prompt(6, 48, 3)
    expected = greedy_reference(model, prompt, 20)
    decoder = OuroborosDecoder(model, model, OuroborosConfig(gamma=3, force_architecture=True))
    assert decoder.generate(prompt, 20).sequences.tolist() == expected.tolist()


def test_backend_resolution(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.delenv("OUROBOROS_ATTENTION_BACKEND", raising=False)
    assert resolve_backend(None, cpu) == "reference"
    assert resolve_backend(None, cuda) == "triton"
    assert resolve_backend("reference", cuda) == "reference"
    monkeypatch.setenv("OUROBOROS_ATTENTION_BACKEND", "reference")
    assert resolve_backend(None, cuda) == "reference"
    monkeypatch.setenv("OUROBOROS_ATTENTION_BACKEND", "flash")
    with pytest.raises(ValueError, match="OUROBOROS_ATTENTION_BACKEND"):
        resolve_backend(None, cpu)
    monkeypatch.delenv("OUROBOROS_ATTENTION_BACKEND")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs CUDA tensors or the Triton interpreter"):
        resolve_backend("triton", cpu)
    with pytest.raises(ValueError, match="attention backend must be one of"):
        resolve_backend("xformers", cpu)


@pytest.mark.parametrize("method", ["greedy", "speculative", "lookahead", "ouroboros"])
def test_host_reads_are_counted_per_pass(target, method):
    """Every read of the device goes through `host_read`: one per acceptance (draft and
    target passes) and one per batched pool lookup, never one per row of a batch."""
    config = OuroborosConfig.preset(method)
    decoder = OuroborosDecoder(target, perturbed(target, 0.3, seed=1) if config.use_draft
                               else None, config)
    prompts = [random_prompt(n, 48, seed=n)[0].tolist() for n in (6, 11, 3)]
    for batch in (prompts[:1], prompts):
        result = decoder.generate(batch, 20)
        stats = result.stats
        lookups_per_step = 0 if not config.uses_pool else 1
        lookups_per_draft_pass = 1 if config.uses_pool and config.draft_phrases else 0
        bound = stats.target_passes * (1 + lookups_per_step) + \
            stats.draft_passes * (1 + lookups_per_draft_pass)
        assert stats.target_passes <= stats.host_reads <= bound
        assert all(row.stats.host_reads <= stats.host_reads for row in result.rows)


def test_an_attention_mask_needs_a_batch_of_ids(target):
    decoder = OuroborosDecoder(target, None, "greedy")
    with pytest.raises(ValueError, match=r"with an attention_mask.*\[B, S\]"):
        decoder.generate(torch.tensor([3, 4, 5]), 4, attention_mask=torch.ones(3))
    with pytest.raises(ValueError, match="attention_mask goes with input_ids"):
        decoder.generate([3, 4, 5], 4, attention_mask=torch.ones(1, 3))
    with pytest.raises(ValueError, match="row 1 has no tokens"):
        decoder.generate([[3, 4], []], 4)
    one = decoder.generate(torch.tensor([[3, 4, 5]]), 4, attention_mask=torch.ones(1, 3))
    assert isinstance(one, ouroboros.BatchGenerationResult) and len(one) == 1
