"""Trees near the end of the context: no node gets a position greedy decoding would not
use, so position-dependent rotary embeddings (``rope_type="dynamic"``) and learned position
tables see exactly greedy's positions (issue: trees overshooting the context)."""

from __future__ import annotations

import dataclasses

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
VOCAB = 48
CONTEXT = 32


def dynamic_rope_llama(seed: int):
    model = tiny_llama(seed, vocab=VOCAB, max_positions=CONTEXT)
    config = model.config
    params = {"rope_type": "dynamic", "factor": 2.0,
              "rope_theta": getattr(config, "rope_theta", None) or 10000.0}
    config.rope_parameters = params
    torch.manual_seed(seed)
    rebuilt = type(model)(config).to(torch.float32).eval()
    rebuilt.load_state_dict(model.state_dict())
    rebuilt.generation_config.eos_token_id = None
    rebuilt.generation_config.pad_token_id = 0
    assert rebuilt.model.rotary_emb.rope_type == "dynamic"
    return rebuilt


@pytest.fixture(scope="module")
def target():
    return dynamic_rope_llama(3)


CONFIGS = {
    "lookahead": lambda: OuroborosConfig.preset("lookahead"),
    "ouroboros-root-phrases": lambda: OuroborosConfig.preset(
        "ouroboros", gamma=4, root_phrases=2, num_suffixes=3, window=True),
    "ouroboros": lambda: OuroborosConfig.preset("ouroboros"),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("seed", range(10))
def test_dynamic_rope_at_the_end_of_the_context(target, name, seed):
    prompt_len, new = 20, CONTEXT - 20
    # A repetitive prompt fills the pool, so long phrases are proposed near the end.
    base = random_prompt(4, VOCAB, seed)
    prompt = base.repeat(1, prompt_len // 4)[:, :prompt_len]
    draft = perturbed(target, 0.02, seed=seed) if name != "lookahead" else None
    expected = greedy_reference(target, prompt, new)
    decoder = OuroborosDecoder(target, draft, CONFIGS[name]())
    result = decoder.generate(prompt, new)
    assert result.sequences.tolist() == expected.tolist()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_learned_positions_at_the_end_of_the_context(name):
    """GPT-2 (forced; learned position table of 32 rows): a node past the table was an
    IndexError."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=VOCAB, n_positions=CONTEXT, n_embd=64, n_layer=2, n_head=4,
                        initializer_range=0.2, bos_token_id=1, eos_token_id=2)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    target = GPT2LMHeadModel(config).eval()
    target.generation_config.eos_token_id = None
    target.generation_config.pad_token_id = 0
    for seed in range(3):
        base = random_prompt(4, VOCAB, seed)
        prompt = base.repeat(1, 5)
        expected = greedy_reference(target, prompt, CONTEXT - 20)
        draft = perturbed(target, 0.02, seed=seed) if name != "lookahead" else None
        config = dataclasses.replace(CONFIGS[name](), force_architecture=True)
        decoder = OuroborosDecoder(target, draft, config)
        assert decoder.generate(prompt, CONTEXT - 20).sequences.tolist() == expected.tolist()
