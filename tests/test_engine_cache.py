"""StaticKVCache: in-place writes, compaction, rollback, overflow, and the transformers
``Cache`` protocol the Llama forward relies on (the installed transformers version)."""

from __future__ import annotations

import inspect

import pytest
import torch
from engine_models import random_prompt, single_thread, tiny_llama  # noqa: F401
from transformers import DynamicCache
from transformers.masking_utils import create_causal_mask

from ouroboros.attention import enable_ouroboros_attention
from ouroboros.cache import CacheOverflowError, StaticKVCache, cache_kwarg_name
from ouroboros.generate import ModelRunner, TokenTree, accept, forward_tree, prefill

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture()
def model():
    model = tiny_llama(0)
    enable_ouroboros_attention(model)
    return model


def runner_for(model, rows=64, backend="reference"):
    cache = StaticKVCache.for_model(model, rows)
    return ModelRunner(model, cache, cache_kwarg_name(model), backend)


def test_geometry_and_transformers_protocol(model):
    cache = StaticKVCache.for_model(model, 40)
    assert cache.buffer.shape == (2, 2, 1, 2, 40, 16)  # [layers, K/V, B, Hkv, S_max, D]
    assert len(cache) == 2 and cache.is_sliding == [False, False]
    assert cache.get_seq_length() == 0 and cache.get_max_length() == 40
    assert cache_kwarg_name(model) in inspect.signature(model.forward).parameters
    keys = torch.randn(1, 2, 3, 16)
    returned_k, returned_v = cache.update(keys, keys + 1, 1)
    assert returned_k.data_ptr() == cache.buffer[1, 0].data_ptr()  # the buffer, not a copy
    assert torch.equal(cache.buffer[1, 0, :, :, :3], keys)
    assert torch.equal(cache.buffer[1, 1, :, :, :3], keys + 1)
    cache.commit(3)
    assert cache.get_seq_length() == 3 and cache.lengths.tolist() == [3]
    cache.update(keys * 2, keys, 0)
    assert torch.equal(cache.buffer[0, 0, :, :, 3:6], keys * 2)
    cache.truncate(1)
    assert cache.host_lengths == [1] and cache.lengths.tolist() == [1]
    with pytest.raises(ValueError, match="length must lie"):
        cache.truncate(41)


def test_mask_builder_skips_the_mask(model):
    cache = StaticKVCache.for_model(model, 40)
    cache.commit(10)
    embeds = torch.zeros(1, 7, model.config.hidden_size)
    kwarg = "cache" if "cache" in inspect.signature(create_causal_mask).parameters \
        else "past_key_values"
    mask = create_causal_mask(config=model.config, inputs_embeds=embeds, attention_mask=None,
                              position_ids=torch.arange(10, 17)[None], **{kwarg: cache})
    assert mask is None


def test_overflow_is_a_clear_error(model):
    runner = runner_for(model, rows=12)
    with torch.no_grad():
        prefill(runner, list(range(3, 13)))
        with pytest.raises(CacheOverflowError, match="context overflow: 10 cached \\+ 3 new"):
            forward_tree(runner, [3, 4, 5], TokenTree())


def test_chain_forward_matches_dynamic_cache(model):
    prompt = random_prompt(13, 48, 0)[0].tolist()
    runner = runner_for(model)
    buffer_address = runner.cache.buffer.data_ptr()
    with torch.no_grad():
        prefill(runner, prompt[:8])
        ours = forward_tree(runner, prompt[8:], TokenTree())  # logits after the last token
        dynamic = DynamicCache(config=model.config)
        kwarg = cache_kwarg_name(model)
        model(torch.tensor([prompt[:8]]), use_cache=True, **{kwarg: dynamic})
        theirs = model(torch.tensor([prompt[8:]]), use_cache=True, **{kwarg: dynamic}).logits
    torch.testing.assert_close(ours[0], theirs[0, -1], atol=2e-5, rtol=2e-5)
    assert runner.cache.buffer.data_ptr() == buffer_address  # never reallocated


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_commit_compacts_the_accepted_path(model, backend):
    """After accepting a branch of a tree, the cache rows are exactly those of running the
    accepted tokens as a chain (so the next step sees a consistent prefix)."""
    prompt = random_prompt(9, 48, 1)[0].tolist()
    tree = TokenTree()
    tree.add_path(-1, [20, 21, 22])
    branch = tree.add_path(-1, [30, 31, 32, 33])
    tree.add_path(branch[1], [40])
    runner = runner_for(model, backend=backend)
    with torch.no_grad():
        prefill(runner, prompt[:-1])
        forward_tree(runner, prompt[-1:], tree)
        # Accept nodes 30, 31, 40 (indices 3, 4, 7): fake choices that make them correct.
        choices = torch.full((len(tree) + 1,), 1, dtype=torch.int64)
        choices[0], choices[3 + 1], choices[4 + 1] = 30, 31, 40
        outcome = accept(tree, choices, sampled=False)
        assert outcome.path == [3, 4, 7] and outcome.bonus == 1
        runner.cache.commit(1, outcome.accepted_idx, outcome.accepted_len, len(outcome.path))
        assert runner.length == len(prompt) + 3
        linear = runner_for(model)
        prefill(linear, prompt + [30, 31, 40])
    rows = len(prompt) + 3
    torch.testing.assert_close(runner.cache.buffer[..., :rows, :],
                               linear.cache.buffer[..., :rows, :], atol=1e-5, rtol=1e-5)


def _filled(cache, seed):
    """Random K/V in every row of every buffer (fresh, never zeros)."""
    generator = torch.Generator().manual_seed(seed)
    for buffer in cache.buffers:
        buffer.copy_(torch.randn(buffer.shape, generator=generator))


@pytest.mark.parametrize("mirror", [False, True])
def test_per_row_commit_truncate_and_keep_rows(model, mirror):
    # Three sequences of different lengths; with `mirror` every layer is its own device
    # group with its own copies of the lengths (what layers on other devices get).
    kwargs = {"max_group_layers": 1, "mirror_groups": True} if mirror else {}
    cache = StaticKVCache.for_model(model, 40, 3, **kwargs)
    _filled(cache, 0)
    cache.commit([5, 2, 7])
    assert cache.host_lengths == [5, 2, 7] and cache.lengths.tolist() == [5, 2, 7]
    for group in cache.groups:
        assert group.lengths.tolist() == [5, 2, 7]
    before = [buffer.clone() for buffer in cache.buffers]
    # Row b accepts nodes idx[b, :len[b]] of the tree written behind its pending rows.
    idx = torch.tensor([[2, 3, -1], [0, -1, -1], [1, 2, 4]], dtype=torch.int32)
    length = torch.tensor([2, 1, 3], dtype=torch.int32)
    cache.commit([1, 1, 0], idx, length, [2, 1, 3])
    assert cache.host_lengths == [8, 4, 10] and cache.lengths.tolist() == [8, 4, 10]
    for old, new in zip(before, cache.buffers):
        for b, (start, nodes) in enumerate([(6, [2, 3]), (3, [0]), (7, [1, 2, 4])]):
            for a, node in enumerate(nodes):
                assert torch.equal(new[:, :, b, :, start + a], old[:, :, b, :, start + node])
            assert torch.equal(new[:, :, b, :, :start], old[:, :, b, :, :start])
    cache.truncate([3, 4, 9])
    assert cache.host_lengths == [3, 4, 9] and cache.lengths.tolist() == [3, 4, 9]
    with pytest.raises(ValueError, match="3 sequences"):
        cache.truncate([1, 2])
    kept = [buffer.clone() for buffer in cache.buffers]
    cache.keep_rows([0, 2])  # row 1 ended: row 2 moves down to row 1
    assert cache.live == 2 and cache.host_lengths == [3, 9]
    assert cache.lengths.tolist() == [3, 9]
    for group in cache.groups:
        assert group.lengths.tolist() == [3, 9]
    for old, new in zip(kept, cache.buffers):
        assert torch.equal(new[:, :, 0, :, :3], old[:, :, 0, :, :3])
        assert torch.equal(new[:, :, 1, :, :9], old[:, :, 2, :, :9])
    keys = torch.randn(2, 2, 4, 16)
    returned, _ = cache.update(keys, keys, 0)
    assert returned.shape[0] == 2  # the live rows only
    assert torch.equal(cache.buffer[0, 0, 0, :, 3:7], keys[0])
    assert torch.equal(cache.buffer[0, 0, 1, :, 9:13], keys[1])
    with pytest.raises(ValueError, match="increasing"):
        cache.keep_rows([1, 0])
    cache.reset()
    assert cache.live == 3 and cache.host_lengths == [0, 0, 0]


def test_a_batched_forward_matches_each_row_alone(model):
    """Rows of different lengths and trees in one pass give each row's logits alone."""
    from ouroboros.generate import forward_rows, prefill_rows

    prompts = [random_prompt(n, 48, seed=n)[0].tolist() for n in (9, 3, 14)]
    trees = []
    for seed in range(3):
        tree = TokenTree()
        generator = torch.Generator().manual_seed(seed)
        tree.add_path(-1, torch.randint(3, 48, (3,), generator=generator).tolist())
        tree.add_path(0, torch.randint(3, 48, (2,), generator=generator).tolist())
        trees.append(tree)
    trees[1] = TokenTree()  # a row with nothing but its pending token
    batch = ModelRunner(model, StaticKVCache.for_model(model, 64, 3),
                        cache_kwarg_name(model), "reference")
    prefill_rows(batch, [p[:-2] for p in prompts])
    logits = forward_rows(batch, [(p[-2:], tree) for p, tree in zip(prompts, trees)])
    assert logits.shape == (3, 1 + 5, 48)
    for b, (prompt, tree) in enumerate(zip(prompts, trees)):
        alone = runner_for(model)
        prefill(alone, prompt[:-2])
        expected = forward_tree(alone, prompt[-2:], tree)
        torch.testing.assert_close(logits[b, :len(tree) + 1], expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mirror", [False, True])
def test_commit_on_device_keeps_bounds_until_a_truncate(model, mirror):
    """`commit_on_device` does what `commit` does, from device counts only: the host then
    holds upper bounds (``host_exact`` False), a forward over the inexact cache still sees
    exactly each row's committed rows, and `truncate` makes the lengths exact again."""
    from ouroboros.generate import _call

    kwargs = {"max_group_layers": 1, "mirror_groups": True} if mirror else {}
    device_cache = StaticKVCache.for_model(model, 40, 3, **kwargs)
    host_cache = StaticKVCache.for_model(model, 40, 3, **kwargs)
    for cache in (device_cache, host_cache):
        _filled(cache, 0)
        cache.commit([5, 2, 7])
    idx = torch.tensor([[2, 3, -1], [0, -1, -1], [1, 2, 4]], dtype=torch.int32)
    length = torch.tensor([2, 1, 3], dtype=torch.int32)
    host_cache.commit([1, 1, 0], idx, length, [2, 1, 3])
    device_cache.commit_on_device(torch.tensor([1, 1, 0]), idx, length, [9, 30, 12])
    assert device_cache.lengths.tolist() == host_cache.lengths.tolist() == [8, 4, 10]
    assert device_cache.host_lengths == [9, 30, 12] and not device_cache.host_exact
    for group in device_cache.groups:
        assert group.lengths.tolist() == [8, 4, 10]
    for device_buffer, host_buffer in zip(device_cache.buffers, host_cache.buffers):
        assert torch.equal(device_buffer, host_buffer)
    # One pass of 2 new tokens per row over both caches: the same logits.
    ids = torch.randint(3, 48, (3, 2), generator=torch.Generator().manual_seed(3))
    positions = torch.tensor([[8, 9], [4, 5], [10, 11]])
    with torch.no_grad():
        outputs = [_call(ModelRunner(model, cache, cache_kwarg_name(model), "reference"), ids,
                         positions, None, True, 2) for cache in (device_cache, host_cache)]
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="exact host lengths"):
        device_cache.commit(1)
    with pytest.raises(RuntimeError, match="exact host lengths"):
        device_cache.keep_rows([0, 1])
    with pytest.raises(ValueError, match="3 sequences"):
        device_cache.commit_on_device(torch.tensor([1, 1, 0]), idx, length, [9, 9])
    device_cache.truncate([6, 4, 9])
    assert device_cache.host_exact and device_cache.host_lengths == [6, 4, 9]
    assert device_cache.lengths.tolist() == [6, 4, 9]
