"""The CPU ("reference") attention's shape-dependent paths: each equals the plain PyTorch
reference (`tree_attention_reference`) on fresh random inputs, and the engine stays exactly
greedy when every step takes the split (unmasked prefix + masked tree, log-sum-exp merge)
path."""

from __future__ import annotations

import pytest
import torch
from engine_models import greedy_reference, perturbed, random_prompt, single_thread, \
    tiny_llama  # noqa: F401

import ouroboros_kernels
from ouroboros import OuroborosConfig, OuroborosDecoder
from ouroboros import attention as attention_module
from ouroboros.attention import TreeStep, _reference_attention

pytestmark = pytest.mark.usefixtures("single_thread")


def _random_parents(num_nodes: int, generator: torch.Generator) -> torch.Tensor:
    parents = [-1]
    for i in range(1, num_nodes):
        parents.append(int(torch.randint(-1, i, (1,), generator=generator)))
    return torch.tensor(parents, dtype=torch.int32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("prefix,num_new,causal", [
    (0, 7, True),      # prefill: causal SDPA
    (0, 1, True),
    (600, 1, True),    # one new token after a long prefix: split path
    (40, 1, True),     # one new token, short prefix: unmasked SDPA
    (600, 5, False),   # tree after a long prefix: split path
    (600, 9, True),    # chain after a long prefix: split path, causal tree part
    (700, 33, False),  # two mask words
    (30, 6, False),    # short prefix: dense mask
])
def test_reference_paths_match_plain_reference(dtype, prefix, num_new, causal):
    generator = torch.Generator().manual_seed(prefix * 100 + num_new)
    heads, kv_heads, dim, rows = 6, 2, 16, prefix + num_new + 5
    query = torch.randn(1, heads, num_new, dim, generator=generator, dtype=dtype)
    key = torch.randn(1, kv_heads, rows, dim, generator=generator, dtype=dtype)
    value = torch.randn(1, kv_heads, rows, dim, generator=generator, dtype=dtype)
    prefix_lens = torch.tensor([prefix], dtype=torch.int32)
    mask = None
    if not causal:
        mask, _ = ouroboros_kernels.build_tree(_random_parents(num_new, generator))
        mask = mask[None]
    step = TreeStep(prefix_lens=prefix_lens, tree_mask=mask, causal=causal,
                    backend="reference", max_prefix_len=prefix)
    got = _reference_attention(step, query, key, value, dim ** -0.5)
    expected = ouroboros_kernels.tree_attention_reference(
        query.transpose(1, 2), key, value, prefix_lens, mask, causal=causal, scale=dim ** -0.5)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(got, expected, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("preset", ["speculative", "lookahead", "ouroboros"])
def test_engine_exact_through_the_split_path(monkeypatch, dtype, preset):
    """Every step (prefill of a chain after a prefix, draft and target trees) goes through
    the split path when its threshold is 1: output still equals transformers' greedy."""
    monkeypatch.setattr(attention_module, "SPLIT_MIN_PREFIX", 1)
    target = tiny_llama(3, dtype=dtype)
    draft = perturbed(target, 0.3, 1)
    config = OuroborosConfig.preset(preset, root_phrases=2) if preset == "ouroboros" else \
        OuroborosConfig.preset(preset)
    decoder = OuroborosDecoder(target, draft if config.use_draft else None, config)
    for seed in range(3):
        prompt = random_prompt(20 + 7 * seed, 48, seed)
        expected = greedy_reference(target, prompt, 40)
        got = decoder.generate(prompt, 40, eos_token_id=[]).sequences
        assert torch.equal(got, expected), (preset, seed)


def test_engine_exact_after_a_long_prompt():
    """A prompt past the split threshold (the default path)."""
    target = tiny_llama(5, max_positions=1024)
    draft = perturbed(target, 0.3, 2)
    prompt = random_prompt(attention_module.SPLIT_MIN_PREFIX + 40, 48, 9)
    expected = greedy_reference(target, prompt, 48)
    decoder = OuroborosDecoder(target, draft, OuroborosConfig.preset("ouroboros",
                                                                     root_phrases=2))
    assert torch.equal(decoder.generate(prompt, 48, eos_token_id=[]).sequences, expected)
