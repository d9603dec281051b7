"""accept_greedy / accept_sampled against plain Python models on random trees."""

import os
import random

import pytest
import torch

from ouroboros_kernels.acceptance import accept_greedy, accept_sampled

ON_GPU = os.environ.get("OUROBOROS_TEST_GPU", "0") == "1" and torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"


def random_tree(num_nodes: int, rng: random.Random) -> list[int]:
    return [rng.randrange(-1, i) for i in range(num_nodes)]


def python_greedy(tokens, parents, choices):
    """Deepest node whose path is all correct; ties to the lowest index."""
    best, best_depth = None, -1
    for i in range(len(tokens)):
        path, node, ok = [], i, True
        while node != -1:
            parent = parents[node]
            ok &= tokens[node] == choices[parent + 1 if parent >= 0 else 0]
            path.append(node)
            node = parent
        if ok and len(path) - 1 > best_depth:
            best, best_depth, best_path = i, len(path) - 1, path[::-1]
    if best is None:
        return [], choices[0]
    return best_path, choices[best + 1]


def python_sampled(tokens, parents, samples):
    """Walk from the prefix end, following the lowest-index child equal to the sample."""
    path, current = [], -1
    while True:
        sample = samples[current + 1 if current >= 0 else 0]
        children = [i for i in range(len(tokens)) if parents[i] == current and tokens[i] == sample]
        if not children:
            return path, sample
        current = children[0]
        path.append(current)


def check(result, batch_expected, num_nodes):
    accepted_idx, accepted_len, bonus = result
    assert accepted_idx.dtype == torch.int32 and accepted_idx.shape == (len(batch_expected),
                                                                        num_nodes)
    assert accepted_len.dtype == torch.int32 and bonus.dtype == torch.int64
    for b, (path, bonus_token) in enumerate(batch_expected):
        assert accepted_len[b].item() == len(path)
        assert accepted_idx[b].tolist() == path + [-1] * (num_nodes - len(path))
        assert bonus[b].item() == bonus_token


@pytest.mark.parametrize("num_nodes", [1, 2, 9, 33, 100])
@pytest.mark.parametrize("vocab", [2, 5])
def test_accept_random_trees(num_nodes, vocab):
    rng = random.Random(num_nodes * 31 + vocab)
    batch = 5
    parents = [random_tree(num_nodes, rng) for _ in range(batch)]
    tokens = [[rng.randrange(vocab) for _ in range(num_nodes)] for _ in range(batch)]
    choices = [[rng.randrange(vocab) for _ in range(num_nodes + 1)] for _ in range(batch)]
    to = lambda x, dtype=torch.int64: torch.tensor(x, dtype=dtype, device=DEVICE)
    greedy = accept_greedy(to(tokens), to(parents, torch.int32), to(choices))
    cases = list(zip(tokens, parents, choices, strict=True))
    check(greedy, [python_greedy(*case) for case in cases], num_nodes)
    sampled = accept_sampled(to(tokens), to(parents, torch.int32), to(choices))
    check(sampled, [python_sampled(*case) for case in cases], num_nodes)


def test_accept_duplicate_siblings_rules_differ():
    # Nodes 1 and 2 both carry token 7 under node 0; only node 2's branch continues.
    parents = [-1, 0, 0, 2]
    tokens = [5, 7, 7, 9]
    choices = [5, 7, 3, 9, 4]  # choice at prefix end, at node 0, 1, 2, 3
    check(accept_greedy(torch.tensor(tokens), torch.tensor(parents), torch.tensor([choices])),
          [([0, 2, 3], 4)], 4)
    check(accept_sampled(torch.tensor(tokens), torch.tensor(parents), torch.tensor([choices])),
          [([0, 1], 3)], 4)


def test_accept_shared_tree_and_no_match():
    parents = torch.tensor([-1, 0, 1, -1])
    tokens = torch.tensor([4, 5, 6, 8])
    choices = torch.tensor([[4, 5, 6, 1, 2], [9, 5, 6, 1, 2], [8, 0, 0, 0, 3]])
    check(accept_greedy(tokens, parents, choices),
          [([0, 1, 2], 1), ([], 9), ([3], 3)], 4)


def test_accept_chain_is_longest_prefix_match():
    rng = random.Random(11)
    num_nodes = 64
    tokens = [rng.randrange(1000) for _ in range(num_nodes)]
    for cut in (0, 1, 30, 64):
        rest = [rng.randrange(1000) for _ in range(num_nodes - cut)]
        choices = tokens[:cut] + [1000 + cut] + rest
        result = accept_greedy(torch.tensor(tokens), torch.arange(-1, num_nodes - 1),
                               torch.tensor([choices]))
        check(result, [(list(range(cut)), 1000 + cut)], num_nodes)


def test_accept_rejects_bad_shapes():
    tokens = torch.tensor([[1, 2, 3]])
    parents = torch.tensor([-1, 0, 1])
    with pytest.raises(ValueError, match="target_argmax"):
        accept_greedy(tokens, parents, torch.zeros(1, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="parents"):
        accept_greedy(tokens, parents[:2], torch.zeros(1, 4, dtype=torch.int64))
    with pytest.raises(TypeError, match="target_samples"):
        accept_sampled(tokens, parents, torch.zeros(1, 4))
    with pytest.raises(ValueError, match="batch sizes"):
        accept_greedy(torch.zeros(2, 3, dtype=torch.int64), parents,
                      torch.zeros(3, 4, dtype=torch.int64))


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs CUDA and OUROBOROS_TEST_GPU=1")
def test_gpu_accept_matches_cpu():
    gen = torch.Generator().manual_seed(0)
    batch, num_nodes = 8, 300
    parents = torch.stack([torch.tensor([-1] + [int(torch.randint(-1, i, (1,), generator=gen))
                                                for i in range(1, num_nodes)])
                           for _ in range(batch)])
    tokens = torch.randint(0, 3, (batch, num_nodes), generator=gen)
    choices = torch.randint(0, 3, (batch, num_nodes + 1), generator=gen)
    for accept in (accept_greedy, accept_sampled):
        on_cpu = accept(tokens, parents, choices)
        on_gpu = accept(tokens.cuda(), parents.cuda(), choices.cuda())
        for cpu_part, gpu_part in zip(on_cpu, on_gpu, strict=True):
            assert torch.equal(cpu_part, gpu_part.cpu())
