"""tree_attention: the reference against a naive model, the kernel against the reference."""

import os
import random

import pytest
import torch

from ouroboros_kernels.tree import build_tree, unpack_tree_mask
from ouroboros_kernels.tree_attention import tree_attention_reference

ON_GPU = os.environ.get("OUROBOROS_TEST_GPU", "0") == "1" and torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"


def random_parents(num_nodes, rng, kind="random"):
    if kind == "chain":
        return [i - 1 for i in range(num_nodes)]
    if kind == "star":
        return [-1] + [0] * (num_nodes - 1)
    return [rng.randrange(-1, i) for i in range(num_nodes)]


def make_case(batch, num_new, num_q_heads, num_kv_heads, head_dim, prefix_lens, *,
              dtype=torch.float64, kind="random", per_sequence_tree=True, seed=0, slack=3):
    """Random q, cache (every slot random, also the unused tail) and tree mask."""
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    max_len = max(prefix_lens) + num_new + slack
    q = torch.randn(batch, num_new, num_q_heads, head_dim, generator=gen, dtype=torch.float64)
    k_cache = torch.randn(batch, num_kv_heads, max_len, head_dim, generator=gen,
                          dtype=torch.float64)
    v_cache = torch.randn(batch, num_kv_heads, max_len, head_dim, generator=gen,
                          dtype=torch.float64)
    trees = batch if per_sequence_tree else 1
    parents = torch.tensor([random_parents(num_new, rng, kind) for _ in range(trees)])
    tree_mask, _ = build_tree(parents)
    prefix = torch.tensor(prefix_lens, dtype=torch.int32)
    to = lambda t: t.to(dtype).to(DEVICE)
    return to(q), to(k_cache), to(v_cache), prefix.to(DEVICE), tree_mask.to(DEVICE)


def naive_attention(q, k_cache, v_cache, prefix_lens, visible, scale=None):
    """Row by row, in float64: softmax over the prefix columns and the visible tree columns."""
    batch, num_new, num_q_heads, head_dim = q.shape
    group = num_q_heads // k_cache.shape[1]
    scale = head_dim ** -0.5 if scale is None else scale
    out = torch.empty(q.shape, dtype=torch.float64)
    for b in range(batch):
        prefix = int(prefix_lens[b])
        for i in range(num_new):
            cols = list(range(prefix)) + [prefix + j for j in range(num_new) if visible[b][i][j]]
            for h in range(num_q_heads):
                keys = k_cache[b, h // group, cols].double()
                values = v_cache[b, h // group, cols].double()
                weights = torch.softmax(keys @ q[b, i, h].double() * scale, 0)
                out[b, i, h] = weights @ values
    return out


@pytest.mark.parametrize("batch, num_new, heads, head_dim, prefix_lens, kind, causal", [
    (1, 1, (1, 1), 16, [0], "chain", False),
    (2, 6, (4, 1), 8, [3, 0], "random", False),
    (3, 9, (8, 2), 16, [5, 1, 12], "star", False),
    (2, 5, (6, 3), 8, [2, 7], "chain", True),
    (2, 40, (2, 1), 8, [4, 9], "random", False),
])
def test_reference_matches_naive(batch, num_new, heads, head_dim, prefix_lens, kind, causal):
    q, k_cache, v_cache, prefix, tree_mask = make_case(batch, num_new, *heads, head_dim,
                                                       prefix_lens, kind=kind)
    q, k_cache, v_cache, prefix, tree_mask = (t.cpu() for t in (q, k_cache, v_cache, prefix,
                                                                tree_mask))
    if causal:
        visible = torch.ones(batch, num_new, num_new, dtype=torch.bool).tril()
        result = tree_attention_reference(q, k_cache, v_cache, prefix, causal=True, scale=0.3)
        want = naive_attention(q, k_cache, v_cache, prefix, visible, scale=0.3)
    else:
        visible = unpack_tree_mask(tree_mask, num_new)
        result = tree_attention_reference(q, k_cache, v_cache, prefix, tree_mask)
        want = naive_attention(q, k_cache, v_cache, prefix, visible)
    assert result.dtype == torch.float64 and result.shape == q.shape
    torch.testing.assert_close(result, want, rtol=1e-10, atol=1e-10)


def test_reference_shared_mask_and_out():
    q, k_cache, v_cache, prefix, tree_mask = make_case(3, 7, 4, 2, 8, [2, 5, 0],
                                                       per_sequence_tree=False)
    q, k_cache, v_cache, prefix, tree_mask = (t.cpu() for t in (q, k_cache, v_cache, prefix,
                                                                tree_mask))
    out = torch.full_like(q, float("nan"))
    result = tree_attention_reference(q, k_cache, v_cache, prefix, tree_mask, out=out)
    assert result is out
    visible = unpack_tree_mask(tree_mask, 7).expand(3, 7, 7)
    torch.testing.assert_close(out, naive_attention(q, k_cache, v_cache, prefix, visible),
                               rtol=1e-10, atol=1e-10)
    # A 2-D mask [T, W] is the same as [1, T, W].
    torch.testing.assert_close(
        tree_attention_reference(q, k_cache, v_cache, prefix, tree_mask[0]), out)
