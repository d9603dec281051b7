"""Tree acceptance on the device: which drafted nodes the target agrees with.

After one target forward over a token tree we know, for every node, the token the target
chooses *after* it (its argmax, or a sample from its processed distribution), and the choice
after the last committed token (the parent of every root). A node is *correct* when its
token equals the choice at its parent.

Everything here is vectorised torch over ``log2(T)`` pointer-doubling steps: no Python loop
over nodes and no host read, so a decoding step can keep the results on the device and read
them once (e.g. ``accepted_len.tolist()``) when it must.
"""

from __future__ import annotations

import torch

from ._utils import check_same_device, check_tensor
from .tree import ancestor_tables, kth_ancestor

__all__ = ["accept_greedy", "accept_sampled"]

_INT = (torch.int32, torch.int64)


def _prepare(tree_tokens: torch.Tensor, parents: torch.Tensor, choices: torch.Tensor,
             choices_name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    check_tensor("tree_tokens", tree_tokens, ndim=(1, 2), dtypes=_INT)
    check_tensor("parents", parents, ndim=(1, 2), dtypes=_INT)
    check_tensor(choices_name, choices, ndim=(1, 2), dtypes=_INT)
    check_same_device(tree_tokens=tree_tokens, parents=parents, **{choices_name: choices})
    num_nodes = tree_tokens.shape[-1]
    if num_nodes == 0:
        raise ValueError("tree_tokens must have at least one node (T >= 1)")
    if parents.shape[-1] != num_nodes:
        raise ValueError(f"parents has {parents.shape[-1]} nodes but tree_tokens has {num_nodes}")
    if choices.shape[-1] != num_nodes + 1:
        raise ValueError(f"{choices_name} must have T + 1 = {num_nodes + 1} columns (column 0: "
                         f"the choice at the last committed token), got {choices.shape[-1]}")
    sizes = {t.shape[0] for t in (tree_tokens, parents, choices) if t.dim() == 2}
    sizes.discard(1)
    if len(sizes) > 1:
        raise ValueError(f"batch sizes disagree: tree_tokens {tuple(tree_tokens.shape)}, parents "
                         f"{tuple(parents.shape)}, {choices_name} {tuple(choices.shape)}")
    batch = sizes.pop() if sizes else 1
    tree_tokens = tree_tokens.to(torch.int64).reshape(-1, num_nodes).expand(batch, -1)
    parents = parents.to(torch.int64).reshape(-1, num_nodes).expand(batch, -1)
    choices = choices.to(torch.int64).reshape(-1, num_nodes + 1).expand(batch, -1)
    return tree_tokens, parents, choices


def _accept(tree_tokens: torch.Tensor, parents: torch.Tensor, choices: torch.Tensor,
            first_match_only: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batch, num_nodes = tree_tokens.shape
    device = tree_tokens.device
    node = torch.arange(num_nodes, device=device)
    parent_ext = torch.where(parents < 0, num_nodes, parents)  # sentinel T = prefix end
    # Choice at the parent: column parent + 1, or column 0 for a root.
    parent_column = torch.where(parents < 0, 0, parents + 1)
    correct = tree_tokens == choices.gather(1, parent_column)
    if first_match_only:
        # Among siblings that match, keep only the lowest index, decided from the parent's
        # choice alone (never from the samples deeper down, which would bias the sampling).
        first = torch.full((batch, num_nodes + 1), num_nodes, dtype=torch.int64, device=device)
        candidate = torch.where(correct, node, num_nodes).expand(batch, -1)
        first = first.scatter_reduce(1, parent_ext, candidate, reduce="amin")
        correct = correct & (first.gather(1, parent_ext) == node)

    up, depth = ancestor_tables(parents)
    # bad[i]: an incorrect node among i's 2^k nearest ancestors-or-self (sentinel: none).
    bad = torch.cat([~correct, torch.zeros(batch, 1, dtype=torch.bool, device=device)], 1)
    for table in up[:-1]:
        bad = bad | bad.gather(1, table)
    path_ok = ~bad[:, :num_nodes]
    node_depth = depth[:, :num_nodes]
    # Deepest fully correct node; among equally deep ones the lowest index.
    key = torch.where(path_ok, node_depth * num_nodes + (num_nodes - 1 - node), -1)
    best_key, best = key.max(1)
    any_ok = best_key >= 0
    accepted_len = torch.where(any_ok, node_depth.gather(1, best[:, None])[:, 0] + 1, 0)

    # Path node at depth s is the (depth(best) - s)-th ancestor of best.
    step = accepted_len[:, None] - 1 - node[None, :]
    valid = step >= 0
    path = kth_ancestor(up, best[:, None].expand(batch, num_nodes).contiguous(),
                        step.clamp(min=0))
    accepted_idx = torch.where(valid, path, -1).to(torch.int32)
    bonus_column = torch.where(any_ok, best + 1, 0)
    bonus_token = choices.gather(1, bonus_column[:, None])[:, 0]
    return accepted_idx, accepted_len.to(torch.int32), bonus_token


def accept_greedy(tree_tokens: torch.Tensor, parents: torch.Tensor,
                  target_argmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Greedy acceptance of a token tree.

    Args:
        tree_tokens: ``int64[B, T]`` (or ``[T]``, shared by the batch) drafted token of each node.
        parents: ``int32/int64[T]`` or ``[B, T]``, -1 for a child of the prefix end; parents
            precede children (not re-validated here: `build_tree` checks them).
        target_argmax: ``int64[B, T + 1]``; column 0 is the target's argmax at the last
            committed token, column ``1 + i`` its argmax at node ``i``.

    Returns:
        ``(accepted_idx, accepted_len, bonus_token)``: ``accepted_idx: int32[B, T]`` the
        accepted path root-first (node indices), padded with -1; ``accepted_len: int32[B]``;
        ``bonus_token: int64[B]`` the target's choice after the last accepted node (column 0 if
        none was accepted). The accepted node is the deepest one whose whole path from the root
        is correct; ties between equally deep nodes go to the lowest index.
    """
    tree_tokens, parents, target_argmax = _prepare(tree_tokens, parents, target_argmax,
                                                   "target_argmax")
    return _accept(tree_tokens, parents, target_argmax, first_match_only=False)


def accept_sampled(tree_tokens: torch.Tensor, parents: torch.Tensor,
                   target_samples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lossless sampled acceptance of a token tree (same shapes as `accept_greedy`).

    ``target_samples: int64[B, T + 1]`` holds one token sampled from the target's processed
    distribution (temperature / top-k / top-p applied) at the last committed token (column 0)
    and at every node (column ``1 + i``). Starting at the prefix end, the walk follows the child
    whose token equals the sample at the current node, and stops when no child matches; the
    bonus token is the sample at the last accepted node. Each emitted token is thus exactly a
    draw from the target's distribution in its context.

    Difference from `accept_greedy`: when several siblings carry the sampled token (a tree
    that is not a trie), the lowest-index one is followed, decided before looking at any
    sample below it. Picking the deepest matching branch instead would choose among the
    siblings' independent samples after seeing them, which biases the output distribution.
    On trees whose siblings have distinct tokens the two rules coincide.
    """
    tree_tokens, parents, target_samples = _prepare(tree_tokens, parents, target_samples,
                                                    "target_samples")
    return _accept(tree_tokens, parents, target_samples, first_match_only=True)
