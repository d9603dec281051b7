"""Token trees: the packed ancestor mask and the depths, from a parent array.

A tree of ``T`` new tokens is given by ``parents[i]``: the index of node ``i``'s parent, or
``-1`` when node ``i`` hangs directly from the end of the committed prefix. Parents precede
their children (``parents[i] < i``), so node order is a topological order.

The packed mask is what `tree_attention` reads: ``int32[..., T, ceil(T/32)]``, bit ``j % 32``
of word ``j // 32`` in row ``i`` is set when node ``j`` is node ``i`` or one of its ancestors.

This module is plain PyTorch on purpose: building a tree is ``O(T^2 log T)`` bit operations
on at most a few thousand nodes, far below the cost of the attention it feeds, and it runs
the same on every device. The ancestor sets are found by pointer doubling (``log2(depth)``
vectorised steps), never by a Python loop over nodes.
"""

from __future__ import annotations

import torch

from ._utils import check_tensor

__all__ = ["build_tree", "pack_tree_mask", "unpack_tree_mask", "mask_words"]


def mask_words(num_nodes: int) -> int:
    """Number of int32 words per mask row for ``num_nodes`` tree nodes: ``ceil(T / 32)``."""
    return max(1, (int(num_nodes) + 31) // 32)


def pack_tree_mask(visible: torch.Tensor) -> torch.Tensor:
    """Pack a boolean mask ``[..., T, T]`` (``visible[..., i, j]``: node i sees node j)
    into ``int32[..., T, ceil(T/32)]`` (bit ``j % 32`` of word ``j // 32``)."""
    check_tensor("visible", visible, dtypes=(torch.bool,))
    if visible.dim() < 2:
        raise ValueError(f"visible must be [..., T, T], got shape {tuple(visible.shape)}")
    num_nodes = visible.shape[-1]
    words = mask_words(num_nodes)
    padded = torch.zeros(*visible.shape[:-1], words * 32, dtype=torch.int64,
                         device=visible.device)
    padded[..., :num_nodes] = visible.to(torch.int64)
    weights = torch.bitwise_left_shift(
        torch.ones(32, dtype=torch.int64, device=visible.device),
        torch.arange(32, dtype=torch.int64, device=visible.device))
    packed = (padded.view(*visible.shape[:-1], words, 32) * weights).sum(-1)
    # Bit 31 makes the word negative as an int32: wrap explicitly rather than rely on a cast.
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)
    return packed.to(torch.int32)


def unpack_tree_mask(tree_mask: torch.Tensor, num_nodes: int) -> torch.Tensor:
    """Inverse of `pack_tree_mask`: ``int32[..., T, W]`` -> ``bool[..., T, num_nodes]``."""
    check_tensor("tree_mask", tree_mask, dtypes=(torch.int32,))
    if tree_mask.shape[-1] * 32 < num_nodes:
        raise ValueError(f"tree_mask has {tree_mask.shape[-1]} words per row, too few for "
                         f"{num_nodes} nodes (needs {mask_words(num_nodes)})")
    node = torch.arange(num_nodes, device=tree_mask.device)
    words = tree_mask[..., node // 32].to(torch.int64)
    return ((words >> (node % 32)) & 1).bool()


def _check_parents(parents: torch.Tensor) -> None:
    num_nodes = parents.shape[-1]
    node = torch.arange(num_nodes, device=parents.device)
    # One host read for the whole validation (parents are small).
    bad_low = parents < -1
    bad_high = parents >= num_nodes
    self_loop = parents == node
    forward = (parents > node) & ~bad_high
    problems = torch.stack([bad_low | bad_high, self_loop, forward]).flatten(1).any(1).tolist()
    flat = parents.reshape(-1, num_nodes)
    if problems[0]:
        where = ((flat < -1) | (flat >= num_nodes)).nonzero()[0].tolist()
        raise ValueError(f"parents out of range: parents[{where[0]}, {where[1]}] = "
                         f"{int(flat[where[0], where[1]])}, expected -1 <= p < {num_nodes}")
    if problems[1]:
        where = (flat == node).nonzero()[0].tolist()
        raise ValueError(f"parents has a cycle: node {where[1]} (row {where[0]}) is its own "
                         "parent")
    if problems[2]:
        where = (flat > node).nonzero()[0].tolist()
        raise ValueError(f"parents has a forward reference: parents[{where[0]}, {where[1]}] = "
                         f"{int(flat[where[0], where[1]])} >= {where[1]} (parents must precede "
                         "their children, which also rules out cycles)")


def ancestor_tables(parents: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Binary-lifting tables for a batch of trees, by pointer doubling.

    ``parents: int64[B, T]`` (already validated). Nodes are extended with a sentinel ``T``
    (the end of the committed prefix) that is its own parent. Returns ``(up, depth)`` where
    ``up[k]: int64[B, T + 1]`` is the ``2^k``-th ancestor (the sentinel past the root) for
    ``k <= max(1, T.bit_length())`` and ``depth: int64[B, T + 1]`` is the node depth (roots 0,
    sentinel -1).
    """
    batch, num_nodes = parents.shape
    sentinel = torch.full((batch, 1), num_nodes, dtype=torch.int64, device=parents.device)
    up0 = torch.cat([torch.where(parents < 0, num_nodes, parents.to(torch.int64)), sentinel], 1)
    # count[i]: nodes on the path segment starting at i of length 2^k (sentinel excluded).
    count = torch.ones(batch, num_nodes + 1, dtype=torch.int64, device=parents.device)
    count[:, num_nodes] = 0
    up = [up0]
    for _ in range(max(1, num_nodes.bit_length())):
        count = count + count.gather(1, up[-1])
        up.append(up[-1].gather(1, up[-1]))
    return up, count - 1


def kth_ancestor(up: list[torch.Tensor], node: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """``steps``-th ancestor of ``node`` (both ``int64[B, N]``, steps >= 0) from the tables of
    `ancestor_tables`; walks past a root end on the sentinel."""
    for k, table in enumerate(up):
        node = torch.where((steps >> k) & 1 == 1, table.gather(1, node), node)
    return node


def build_tree(parents: torch.Tensor, *,
               validate: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed ancestor mask and depths of a token tree.

    Args:
        parents: ``int32`` or ``int64`` ``[T]`` or ``[B, T]``; ``parents[..., i]`` is the parent
            of node ``i`` or ``-1`` for a child of the prefix end. Must satisfy
            ``-1 <= parents[i] < i``.

    Returns:
        ``(tree_mask, depths)``: ``tree_mask: int32[..., T, ceil(T/32)]`` with bit j of row i set
        iff j is i or an ancestor of i; ``depths: int32[..., T]`` with roots at depth 0 (the
        position id of node i is ``prefix_len + depths[i]``). Leading dims follow ``parents``.

    ``validate=False`` skips the checks of ``parents`` (they cost one host read: a caller
    that built ``parents`` itself, as the decoding engine does, need not pay it every pass).

    Raises:
        ValueError: on an out-of-range parent, a cycle (self parent) or a forward reference.
    """
    check_tensor("parents", parents, ndim=(1, 2), dtypes=(torch.int32, torch.int64))
    if parents.shape[-1] == 0:
        raise ValueError("parents must have at least one node (T >= 1)")
    if validate:
        _check_parents(parents)
    batched = parents.reshape(-1, parents.shape[-1])
    num_nodes = batched.shape[1]
    batch = batched.shape[0]
    up, depth = ancestor_tables(batched)
    # visible[b, i]: the 2^k nearest ancestors-or-self of i; doubling as in ancestor_tables.
    # Row T is the sentinel (sees nothing), so walking past a root adds nothing.
    visible = torch.zeros(batch, num_nodes + 1, num_nodes, dtype=torch.bool,
                          device=parents.device)
    visible[:, :num_nodes] = torch.eye(num_nodes, dtype=torch.bool, device=parents.device)
    batch_index = torch.arange(batch, device=parents.device)[:, None]
    for table in up[:-1]:
        visible = visible | visible[batch_index, table]
    visible = visible[:, :num_nodes]
    node_depth = depth[:, :num_nodes]
    tree_mask = pack_tree_mask(visible)
    lead = parents.shape[:-1]
    return (tree_mask.reshape(*lead, num_nodes, -1),
            node_depth.to(torch.int32).reshape(*lead, num_nodes))
