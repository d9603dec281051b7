"""build_tree / pack_tree_mask against a plain Python model of the tree."""

import random

import pytest
import torch

from ouroboros_kernels.tree import build_tree, mask_words, pack_tree_mask, unpack_tree_mask


def random_parents(num_nodes: int, rng: random.Random, kind: str = "random") -> list[int]:
    if kind == "chain":
        return [i - 1 for i in range(num_nodes)]
    if kind == "star":
        return [-1] + [0] * (num_nodes - 1)
    if kind == "roots":
        return [-1] * num_nodes
    return [rng.randrange(-1, i) for i in range(num_nodes)]


def python_tree(parents: list[int]) -> tuple[list[list[bool]], list[int]]:
    """Ancestor-or-self sets and depths by walking up from every node."""
    num_nodes = len(parents)
    visible = [[False] * num_nodes for _ in range(num_nodes)]
    depths = []
    for i in range(num_nodes):
        node, depth = i, -1
        while node != -1:
            visible[i][node] = True
            node = parents[node]
            depth += 1
        depths.append(depth)
    return visible, depths


def python_pack(visible: list[list[bool]]) -> list[list[int]]:
    words = mask_words(len(visible))
    packed = []
    for row in visible:
        out = []
        for w in range(words):
            value = sum(1 << b for b in range(32) if w * 32 + b < len(row) and row[w * 32 + b])
            out.append(value - (1 << 32) if value >= 1 << 31 else value)
        packed.append(out)
    return packed


@pytest.mark.parametrize("num_nodes", [1, 2, 31, 32, 33, 70, 130])
@pytest.mark.parametrize("kind", ["random", "chain", "star", "roots"])
def test_build_tree_matches_python(num_nodes, kind):
    rng = random.Random(num_nodes * 7 + len(kind))
    parents = random_parents(num_nodes, rng, kind)
    tree_mask, depths = build_tree(torch.tensor(parents, dtype=torch.int32))
    visible, want_depths = python_tree(parents)
    assert tree_mask.dtype == torch.int32 and depths.dtype == torch.int32
    assert tree_mask.shape == (num_nodes, mask_words(num_nodes))
    assert tree_mask.tolist() == python_pack(visible)
    assert depths.tolist() == want_depths
    unchecked_mask, unchecked_depths = build_tree(torch.tensor(parents, dtype=torch.int32),
                                                  validate=False)  # the engine's call
    assert torch.equal(unchecked_mask, tree_mask) and torch.equal(unchecked_depths, depths)


def test_build_tree_batched_int64():
    rng = random.Random(3)
    batch = [random_parents(45, rng) for _ in range(4)]
    tree_mask, depths = build_tree(torch.tensor(batch, dtype=torch.int64))
    assert tree_mask.shape == (4, 45, 2) and depths.shape == (4, 45)
    for b, parents in enumerate(batch):
        visible, want_depths = python_tree(parents)
        assert tree_mask[b].tolist() == python_pack(visible)
        assert depths[b].tolist() == want_depths


def test_pack_unpack_roundtrip():
    gen = torch.Generator().manual_seed(0)
    visible = torch.rand(3, 67, 67, generator=gen) < 0.5
    visible[:, :, 31] = True  # bit 31: a negative int32 word
    packed = pack_tree_mask(visible)
    assert packed.shape == (3, 67, 3) and packed.dtype == torch.int32
    assert (packed[:, :, 0] < 0).all()
    assert torch.equal(unpack_tree_mask(packed, 67), visible)
    assert packed[0].tolist() == python_pack(visible[0].tolist())


@pytest.mark.parametrize("parents, message", [
    ([-1, 1], "cycle"),
    ([-1, 2, 0], "forward reference"),
    ([-1, 0, 5], "out of range"),
    ([-2, 0], "out of range"),
])
def test_build_tree_rejects_bad_parents(parents, message):
    with pytest.raises(ValueError, match=message):
        build_tree(torch.tensor(parents))


def test_build_tree_rejects_bad_types():
    with pytest.raises(TypeError, match="parents"):
        build_tree(torch.tensor([-1.0, 0.0]))
    with pytest.raises(TypeError, match="parents"):
        build_tree([-1, 0])
    with pytest.raises(ValueError, match="parents"):
        build_tree(torch.zeros(2, 2, 2, dtype=torch.int32))
