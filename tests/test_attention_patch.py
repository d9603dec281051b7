"""The "ouroboros" attention registration: ordinary use stays SDPA, engine steps run the
tree attention with no materialised mask, and tree logits equal linear logits."""

from __future__ import annotations

import pytest
import torch
from engine_models import random_prompt, single_thread, tiny_llama  # noqa: F401
from transformers import AttentionInterface, AutoModelForCausalLM
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

import ouroboros_kernels
from ouroboros.attention import (
    TreeStep,
    enable_ouroboros_attention,
    tree_attention_forward,
)
from ouroboros.cache import StaticKVCache, cache_kwarg_name
from ouroboros.generate import ModelRunner, TokenTree, forward_tree, prefill

pytestmark = pytest.mark.usefixtures("single_thread")


def test_registered_with_transformers():
    assert AttentionInterface._global_mapping["ouroboros"] is tree_attention_forward
    assert "ouroboros" in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping


def test_switched_model_generates_like_sdpa_with_padding():
    model = tiny_llama(0)
    prompts = torch.cat([random_prompt(9, 48, 1), random_prompt(9, 48, 2)])
    mask = torch.ones_like(prompts)
    mask[1, :4] = 0  # left padding in the second row
    prompts[1, :4] = 0
    with torch.no_grad():
        expected = model.generate(prompts, attention_mask=mask, max_new_tokens=15,
                                  do_sample=False)
        expected_logits = model(prompts, attention_mask=mask).logits
    assert enable_ouroboros_attention(model) == "sdpa"
    assert model.config._attn_implementation == "ouroboros"
    with torch.no_grad():
        got = model.generate(prompts, attention_mask=mask, max_new_tokens=15, do_sample=False)
        got_logits = model(prompts, attention_mask=mask).logits
    assert torch.equal(got, expected)
    assert torch.equal(got_logits, expected_logits)  # the very same SDPA computation


def test_from_pretrained_with_ouroboros_attention(tmp_path):
    tiny_llama(0).save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="ouroboros")
    assert model.config._attn_implementation == "ouroboros"
    prompt = random_prompt(5, 48, 0)
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa")
    with torch.no_grad():
        assert torch.equal(model(prompt).logits, reference(prompt).logits)


def test_engine_steps_build_no_mask():
    """transformers' mask builder must return None for tree steps (the kernel masks)."""
    seen = []

    def spy(module, query, key, value, attention_mask, **kwargs):
        seen.append((attention_mask, "ouroboros_tree" in kwargs))
        return tree_attention_forward(module, query, key, value, attention_mask, **kwargs)

    model = tiny_llama(0)
    enable_ouroboros_attention(model)
    AttentionInterface.register("ouroboros", spy)
    try:
        cache = StaticKVCache.for_model(model, 64)
        runner = ModelRunner(model, cache, cache_kwarg_name(model), "reference")
        with torch.no_grad():
            prefill(runner, [5, 6, 7, 8])
            tree = TokenTree()
            tree.add_path(-1, [9, 10])
            tree.add_path(-1, [11])
            forward_tree(runner, [12], tree)
    finally:
        AttentionInterface.register("ouroboros", tree_attention_forward)
    assert len(seen) == 2 * model.config.num_hidden_layers
    assert all(mask is None and has_tree for mask, has_tree in seen)


def random_parents(num_nodes: int, generator: torch.Generator) -> list[int]:
    return [int(torch.randint(-1, i, (1,), generator=generator)) for i in range(num_nodes)]


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("num_new,prefix", [(1, 0), (7, 5), (19, 33)])
def test_attention_function_matches_kernel_reference(backend, num_new, prefix):
    generator = torch.Generator().manual_seed(num_new)
    heads, kv_heads, head_dim, max_len = 4, 2, 16, 64
    query = torch.randn(1, heads, num_new, head_dim, generator=generator)
    k_cache = torch.randn(1, kv_heads, max_len, head_dim, generator=generator)
    v_cache = torch.randn(1, kv_heads, max_len, head_dim, generator=generator)
    parents = torch.tensor(random_parents(num_new, generator), dtype=torch.int32)
    tree_mask, _ = ouroboros_kernels.build_tree(parents)
    prefix_lens = torch.tensor([prefix], dtype=torch.int32)
    step = TreeStep(prefix_lens, tree_mask[None], False, backend, prefix)
    module = torch.nn.Module()
    got, _ = tree_attention_forward(module, query, k_cache, v_cache, None,
                                    scaling=head_dim ** -0.5, ouroboros_tree=step)
    expected = ouroboros_kernels.tree_attention_reference(
        query.double().transpose(1, 2), k_cache.double(), v_cache.double(), prefix_lens,
        tree_mask[None], scale=head_dim ** -0.5)
    assert got.shape == (1, num_new, heads, head_dim)
    torch.testing.assert_close(got.double(), expected, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 2e-5), (torch.float64, 1e-11)])
def test_tree_logits_equal_linear_logits(dtype, tolerance):
    """Each node's logits from one tree pass equal the logits of its root-to-node path run
    as an ordinary sequence (plain transformers forward, SDPA)."""
    model = tiny_llama(2, dtype=dtype)
    prompt = random_prompt(11, 48, 4)[0].tolist()
    generator = torch.Generator().manual_seed(3)
    tree = TokenTree()
    for _ in range(6):
        length = int(torch.randint(1, 5, (1,), generator=generator))
        tree.add_path(-1, torch.randint(3, 48, (length,), generator=generator).tolist())
    enable_ouroboros_attention(model)
    cache = StaticKVCache.for_model(model, 64)
    runner = ModelRunner(model, cache, cache_kwarg_name(model), "reference")
    with torch.no_grad():
        prefill(runner, prompt[:-1])
        tree_logits = forward_tree(runner, prompt[-1:], tree)
        for node in range(len(tree)):
            path, walk = [], node
            while walk >= 0:
                path.insert(0, tree.tokens[walk])
                walk = tree.parents[walk]
            linear = model(torch.tensor([prompt + path])).logits[0, -1]
            torch.testing.assert_close(tree_logits[node + 1], linear, atol=tolerance,
                                       rtol=tolerance)
        linear_root = model(torch.tensor([prompt])).logits[0, -1]
        torch.testing.assert_close(tree_logits[0], linear_root, atol=tolerance,
                                   rtol=tolerance)


@pytest.mark.parametrize("draft_first", [False, True])
def test_layers_shared_with_another_model_are_switched_and_restored(draft_first):
    """`truncated_draft` shares its parent's layers, which read the parent's config.
    Decoded as a target on its own (or beside its parent, switched in either order), it
    must still run the tree attention on engine steps, and every config is restored after."""
    from ouroboros import OuroborosDecoder
    from ouroboros.attention import ouroboros_attention
    from ouroboros.models import truncated_draft

    parent = tiny_llama(3, layers=4)
    target = truncated_draft(parent, 2)
    draft = tiny_llama(4, layers=1)
    decoder = OuroborosDecoder(target, draft, config="speculative")
    for seed in range(3):
        prompt = random_prompt(10, 48, seed)
        with torch.no_grad():
            expected = target.generate(prompt, max_new_tokens=20, do_sample=False)
        assert torch.equal(decoder.generate(prompt, max_new_tokens=20).sequences, expected)
    assert parent.config._attn_implementation == "sdpa"
    assert target.config._attn_implementation == "sdpa"

    first, second = (target, parent) if draft_first else (parent, target)
    with ouroboros_attention(first), ouroboros_attention(second):
        assert parent.config._attn_implementation == "ouroboros"
        assert target.config._attn_implementation == "ouroboros"
    assert parent.config._attn_implementation == "sdpa"
    assert target.config._attn_implementation == "sdpa"
