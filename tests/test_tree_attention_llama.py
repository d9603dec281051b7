"""End to end: a tiny Llama verifying a token tree through `tree_attention` gives, at every
node, the logits of running that node's branch linearly with ordinary causal attention."""

import os
import random

import torch
from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM

from ouroboros_kernels import build_tree, tree_attention

ON_GPU = os.environ.get("OUROBOROS_TEST_GPU", "0") == "1" and torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
ATTENTION_NAME = "ouroboros_test_tree_attention"


class StaticCacheState:
    """What the attention function needs besides the layer's q/k/v: the static cache
    ``[layers, 2, B, Hkv, S, D]`` and where the new tokens go."""

    cache: torch.Tensor
    prefix_lens: torch.Tensor
    tree_mask: torch.Tensor | None
    causal: bool
    calls: int = 0


STATE = StaticCacheState()


def static_cache_tree_attention(module, query, key, value, attention_mask, scaling=None,
                                dropout=0.0, **kwargs):
    # query/key/value: [B, H, T, D] for the new tokens only (the model runs without its cache).
    STATE.calls += 1
    cache = STATE.cache[module.layer_idx]
    num_new = query.shape[2]
    for b, prefix in enumerate(STATE.prefix_lens.tolist()):
        cache[0, b, :, prefix:prefix + num_new] = key[b]
        cache[1, b, :, prefix:prefix + num_new] = value[b]
    out = tree_attention(query.transpose(1, 2), cache[0], cache[1], STATE.prefix_lens,
                         STATE.tree_mask, causal=STATE.causal, scale=scaling)
    return out, None


AttentionInterface.register(ATTENTION_NAME, static_cache_tree_attention)


def tiny_llama(attn_implementation: str) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=101, hidden_size=256, intermediate_size=384,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=64, max_position_embeddings=256)
    model = LlamaForCausalLM(config).to(DEVICE).eval()
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(attn_implementation)
    else:  # pragma: no cover - older transformers
        model.config._attn_implementation = attn_implementation
    return model


@torch.no_grad()
def test_tree_logits_match_linear_branches():
    rng = random.Random(0)
    tree_model = tiny_llama(ATTENTION_NAME)
    linear_model = tiny_llama("eager")
    assert torch.equal(tree_model.model.embed_tokens.weight, linear_model.model.embed_tokens.weight)
    vocab = tree_model.config.vocab_size
    num_layers, num_kv_heads = 2, 2
    prefix_lens = [37, 70]
    num_new = 13
    batch = len(prefix_lens)
    prompts = [[rng.randrange(vocab) for _ in range(n)] for n in prefix_lens]
    # Each tree: a draft chain of 5 with random branches hanging from anywhere.
    parents = [[-1, 0, 1, 2, 3] + [rng.randrange(-1, i) for i in range(5, num_new)]
               for _ in range(batch)]
    tokens = [[rng.randrange(vocab) for _ in range(num_new)] for _ in range(batch)]

    STATE.cache = torch.full((num_layers, 2, batch, num_kv_heads, max(prefix_lens) + num_new + 5,
                              64), float("nan"), device=DEVICE)
    # Prefill each prompt alone (causal), through the same attention path.
    full_cache = STATE.cache
    for b, prompt in enumerate(prompts):
        STATE.cache = full_cache[:, :, b:b + 1]
        STATE.prefix_lens = torch.zeros(1, dtype=torch.int32, device=DEVICE)
        STATE.tree_mask, STATE.causal = None, True
        tree_model(input_ids=torch.tensor([prompt], device=DEVICE), use_cache=False)
    STATE.cache = full_cache
    assert not full_cache[:, :, 0, :, :prefix_lens[0]].isnan().any()

    # Verify both trees in one forward: positions are prefix length + depth.
    tree_mask, depths = build_tree(torch.tensor(parents, dtype=torch.int32, device=DEVICE))
    STATE.prefix_lens = torch.tensor(prefix_lens, dtype=torch.int32, device=DEVICE)
    STATE.tree_mask, STATE.causal = tree_mask, False
    position_ids = STATE.prefix_lens[:, None].to(torch.int64) + depths.to(torch.int64)
    STATE.calls = 0
    tree_logits = tree_model(input_ids=torch.tensor(tokens, device=DEVICE),
                             position_ids=position_ids, use_cache=False).logits
    assert STATE.calls == num_layers  # the tree really went through tree_attention

    for b in range(batch):
        for node in range(num_new):
            path, current = [], node
            while current != -1:
                path.append(current)
                current = parents[b][current]
            branch = prompts[b] + [tokens[b][i] for i in reversed(path)]
            want = linear_model(input_ids=torch.tensor([branch], device=DEVICE),
                                use_cache=False).logits[0, -1]
            torch.testing.assert_close(tree_logits[b, node], want, atol=1e-4, rtol=1e-4,
                                       msg=lambda m, b=b, node=node: f"seq {b} node {node}: {m}")


@torch.no_grad()
def test_prefill_through_kernel_matches_model():
    """Causal prefill through the static cache equals the model's own attention."""
    model = tiny_llama(ATTENTION_NAME)
    reference = tiny_llama("eager")
    prompt = torch.randint(0, 101, (2, 45), generator=torch.Generator().manual_seed(1))
    prompt = prompt.to(DEVICE)
    STATE.cache = torch.full((2, 2, 2, 2, 50, 64), float("nan"), device=DEVICE)
    STATE.prefix_lens = torch.zeros(2, dtype=torch.int32, device=DEVICE)
    STATE.tree_mask, STATE.causal = None, True
    got = model(input_ids=prompt, use_cache=False).logits
    want = reference(input_ids=prompt, use_cache=False).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
