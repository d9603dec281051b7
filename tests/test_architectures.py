"""Verified architectures: exactness of every preset against ``generate(do_sample=False)``
on tiny random models of each class, and clear refusals of what the tree attention does not
implement (sliding windows that take effect, attention logit soft-capping)."""

from __future__ import annotations

import pytest
import torch
import transformers
from engine_models import perturbed, random_prompt, single_thread  # noqa: F401

from ouroboros import OuroborosConfig, OuroborosDecoder
from ouroboros.attention import VERIFIED_ARCHITECTURES

pytestmark = pytest.mark.usefixtures("single_thread")
VOCAB = 48
PRESETS = ["greedy", "speculative", "lookahead", "ouroboros"]

COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              initializer_range=0.2, bos_token_id=1, eos_token_id=2, pad_token_id=0,
              tie_word_embeddings=False)

# class name -> (config class, extra config fields)
ARCHITECTURES = {
    "LlamaForCausalLM": ("LlamaConfig", {}),
    "MistralForCausalLM": ("MistralConfig", {"sliding_window": None}),
    "Qwen2ForCausalLM": ("Qwen2Config", {}),
    "Qwen3ForCausalLM": ("Qwen3Config", {"head_dim": 16}),
    "GemmaForCausalLM": ("GemmaConfig", {"head_dim": 16}),
    "Phi3ForCausalLM": ("Phi3Config", {"num_key_value_heads": 2}),
}

REFUSED = {"Gemma2ForCausalLM": ("Gemma2Config", {}),
           "Gemma3ForCausalLM": ("Gemma3TextConfig", {})}


def tiny(architecture: str, seed: int, dtype=torch.float32, **overrides):
    config_name, extra = {**ARCHITECTURES, **REFUSED}[architecture]
    config_class = getattr(transformers, config_name)
    config = config_class(**{**COMMON, **extra, **overrides})
    # Gemma2 has no SDPA path in transformers (soft-capping): eager.
    config._attn_implementation = "eager" if architecture == "Gemma2ForCausalLM" else "sdpa"
    torch.manual_seed(seed)
    model = getattr(transformers, architecture)(config).to(dtype).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def greedy(model, prompt, new):
    with torch.no_grad():
        return model.generate(prompt, max_new_tokens=new, do_sample=False).tolist()


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_verified_architecture_is_exact(architecture, preset, dtype):
    assert architecture in VERIFIED_ARCHITECTURES
    target = tiny(architecture, 0, dtype)
    draft = perturbed(target, 0.05, seed=1)
    for seed in range(2):
        prompt = random_prompt(5 + 9 * seed, VOCAB, seed)
        prompt = torch.cat([prompt, prompt], dim=1)  # repeated text feeds the pool
        expected = greedy(target, prompt, 24)
        config = OuroborosConfig.preset(preset, attention_backend="reference")
        decoder = OuroborosDecoder(target, draft if config.use_draft else None, config)
        assert decoder.generate(prompt, 24).sequences.tolist() == expected
    # The model's own decoding is unchanged after the engine ran.
    assert greedy(target, prompt, 24) == expected


def test_mistral_window_longer_than_the_text_is_exact():
    target = tiny("MistralForCausalLM", 2, sliding_window=64)
    prompt = random_prompt(20, VOCAB, 3)
    expected = greedy(target, prompt, 30)
    decoder = OuroborosDecoder(target, perturbed(target, 0.05, seed=2), "ouroboros")
    assert decoder.generate(prompt, 30).sequences.tolist() == expected


def test_sliding_window_that_takes_effect_is_refused():
    target = tiny("MistralForCausalLM", 2, sliding_window=16)
    decoder = OuroborosDecoder(target, perturbed(target, 0.05, seed=2), "ouroboros")
    with pytest.raises(ValueError, match="sliding_window"):
        decoder.generate(random_prompt(10, VOCAB, 3), 10)


@pytest.mark.parametrize("architecture", ["Gemma2ForCausalLM", "Gemma3ForCausalLM"])
def test_gemma2_and_3_are_refused_and_left_untouched(architecture):
    overrides = {"head_dim": 16, "sliding_window": 8}
    if architecture == "Gemma3ForCausalLM":
        overrides["layer_types"] = ["sliding_attention", "full_attention"]
    target = tiny(architecture, 0, **overrides)
    prompt = random_prompt(12, VOCAB, 0)
    expected = greedy(target, prompt, 8)
    with pytest.raises(ValueError, match="sliding_window|softcapping|verified"):
        OuroborosDecoder(target, None, OuroborosConfig.preset(
            "lookahead", force_architecture=True)).generate(prompt, 8)
    with pytest.raises(ValueError):
        OuroborosDecoder(target, None, "lookahead")
    assert greedy(target, prompt, 8) == expected


def test_attention_softcapping_is_refused_even_when_forced():
    target = tiny("Gemma2ForCausalLM", 0, head_dim=16, sliding_window=None,
                  layer_types=["full_attention", "full_attention"],
                  attn_logit_softcapping=50.0)
    with pytest.raises(ValueError, match="attn_logit_softcapping"):
        OuroborosDecoder(target, None, OuroborosConfig.preset(
            "lookahead", force_architecture=True))
    assert target.config._attn_implementation == "eager"
