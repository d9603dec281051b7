"""compact_kv (Triton under the interpreter, and the reference) against a Python row loop."""

import os
import random

import pytest
import torch

from ouroboros_kernels.compact_kv import compact_kv, compact_kv_reference

ON_GPU = os.environ.get("OUROBOROS_TEST_GPU", "0") == "1" and torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"


def python_compact(cache, prefix_lens, accepted_idx, accepted_len):
    want = cache.clone()
    for b in range(cache.shape[2]):
        for a in range(int(accepted_len[b])):
            src = int(prefix_lens[b]) + int(accepted_idx[b, a])
            want[:, :, b, :, int(prefix_lens[b]) + a] = cache[:, :, b, :, src]
    return want


def random_case(rng, batch, num_nodes, max_len, monotone=True):
    prefix_lens, idx, lens = [], [], []
    for _ in range(batch):
        prefix = rng.randrange(0, max_len - num_nodes + 1)
        length = rng.randrange(0, num_nodes + 1)
        if monotone:  # a root-to-node path: increasing node indices
            nodes = sorted(rng.sample(range(num_nodes), length))
        else:  # any sources (repeats allowed): the kernel must still be in-place safe
            nodes = [rng.randrange(num_nodes) for _ in range(length)]
        prefix_lens.append(prefix)
        lens.append(length)
        idx.append(nodes + [-1] * (num_nodes - length))
    as_int = lambda x: torch.tensor(x, dtype=torch.int32, device=DEVICE)
    return as_int(prefix_lens), as_int(idx), as_int(lens)


@pytest.mark.parametrize("impl", [compact_kv, compact_kv_reference])
@pytest.mark.parametrize("dtype, head_dim, num_nodes, monotone", [
    (torch.float32, 64, 8, True),
    (torch.float16, 80, 17, False),
    (torch.bfloat16, 128, 5, True),
    (torch.float32, 16, 300, True),
])
def test_compact_kv_matches_python(impl, dtype, head_dim, num_nodes, monotone):
    rng = random.Random(head_dim + num_nodes)
    layers, batch, heads, max_len = 3, 3, 2, num_nodes + 40
    gen = torch.Generator().manual_seed(head_dim)
    cache = torch.randn(layers, 2, batch, heads, max_len, head_dim, generator=gen).to(dtype)
    cache = cache.to(DEVICE)
    prefix_lens, accepted_idx, accepted_len = random_case(rng, batch, num_nodes, max_len,
                                                          monotone)
    want = python_compact(cache.cpu(), prefix_lens.cpu(), accepted_idx.cpu(), accepted_len.cpu())
    result = impl(cache, prefix_lens, accepted_idx, accepted_len)
    assert result is cache
    assert torch.equal(cache.cpu(), want)


@pytest.mark.parametrize("impl", [compact_kv, compact_kv_reference])
def test_compact_kv_overlapping_chain(impl):
    # Accept nodes 1, 2, 3, 5: every destination 0..3 except the first is also a source.
    cache = torch.randn(2, 2, 1, 1, 12, 64, device=DEVICE)
    prefix_lens = torch.tensor([2], dtype=torch.int32, device=DEVICE)
    accepted_idx = torch.tensor([[1, 2, 3, 5, -1, -1]], dtype=torch.int32, device=DEVICE)
    accepted_len = torch.tensor([4], dtype=torch.int32, device=DEVICE)
    old = cache.clone()
    impl(cache, prefix_lens, accepted_idx, accepted_len)
    assert torch.equal(cache[..., 2:6, :], old[..., [3, 4, 5, 7], :])
    assert torch.equal(cache[..., :2, :], old[..., :2, :])
    assert torch.equal(cache[..., 6:, :], old[..., 6:, :])


def test_compact_kv_layer_list_and_strided_layers():
    rng = random.Random(5)
    cache = torch.randn(4, 2, 2, 3, 30, 64, device=DEVICE)
    prefix_lens, accepted_idx, accepted_len = random_case(rng, 2, 9, 30)
    want = python_compact(cache.cpu(), prefix_lens.cpu(), accepted_idx.cpu(), accepted_len.cpu())
    layers = list(cache.clone().unbind(0))
    compact_kv(layers, prefix_lens, accepted_idx, accepted_len)
    assert torch.equal(torch.stack(layers).cpu(), want)
    # Layers not uniformly spaced (every other layer of a bigger tensor): still correct.
    big = torch.zeros(8, 2, 2, 3, 30, 64, device=DEVICE)
    big[::2] = cache
    compact_kv(big[::2], prefix_lens, accepted_idx, accepted_len)
    assert torch.equal(big[::2].cpu(), want)


def test_compact_kv_rejects_bad_args():
    cache = torch.randn(2, 2, 2, 1, 8, 16)
    lens = torch.tensor([1, 1], dtype=torch.int32)
    idx = torch.zeros(2, 3, dtype=torch.int32)
    with pytest.raises(ValueError, match="cache"):
        compact_kv(torch.randn(2, 3, 2, 1, 8, 16), lens, idx, lens)
    with pytest.raises(ValueError, match="accepted_idx"):
        compact_kv(cache, lens, torch.zeros(3, 3, dtype=torch.int32), lens)
    with pytest.raises(TypeError, match="prefix_lens"):
        compact_kv(cache, lens.float(), idx, lens)
    with pytest.raises(ValueError, match="cache"):
        compact_kv(torch.randn(2, 2, 8, 16), lens, idx, lens)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs CUDA and OUROBOROS_TEST_GPU=1")
@pytest.mark.parametrize("num_nodes", [16, 700])
def test_gpu_compact_kv_large(num_nodes):
    rng = random.Random(num_nodes)
    layers, batch, heads, max_len, head_dim = 8, 4, 8, 4096, 128
    cache = torch.randn(layers, 2, batch, heads, max_len, head_dim, device=DEVICE,
                        dtype=torch.bfloat16)
    prefix_lens, accepted_idx, accepted_len = random_case(rng, batch, num_nodes, max_len)
    want = cache.clone()
    compact_kv_reference(want, prefix_lens, accepted_idx, accepted_len)
    compact_kv(cache, prefix_lens, accepted_idx, accepted_len)
    assert torch.equal(cache, want)
