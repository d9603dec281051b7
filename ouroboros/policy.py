"""The candidate-pool policy of a decoding step, apart from the loop that runs the models.

What this module decides (docs/architecture.md §2), for every sequence of a batch:

* which pool phrases a draft pass tries and which suffixes and root phrases the target's
  tree verifies (`lookup_phrases`: one batched pool lookup for all sequences;
  `draft_pass_tree`, `verification_tree`: the trees, as tries);
* what the target's verification teaches the pool (`pool_update`: refinement, inspiration,
  window n-grams, n-grams of the committed text) and in which order it is written
  (`apply_pool_updates`: every sequence's refinements, then every sequence's inserts, in row
  order, so a batch gives one deterministic pool whatever its size).

Everything here works on token lists, the pool and the configuration; nothing calls a
model. `ouroboros.generate` runs the models and calls these functions once per step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

__all__ = [
    "JacobiWindow",
    "PoolUpdate",
    "Suffix",
    "TokenTree",
    "VerificationTree",
    "apply_pool_updates",
    "draft_pass_tree",
    "lookup_phrases",
    "pool_update",
    "sequence_ngrams",
    "verification_tree",
]

Phrases = list[tuple[int, list[int]]]  # [(slot, tokens)] of one key, newest first


# ============================================================================ trees


@dataclass
class TokenTree:
    """Tree nodes hanging from the end of the pending chain (parent -1), built as a trie:
    a token under a parent that already has a child with that token reuses that child, so
    identical paths are verified once and siblings always carry distinct tokens."""

    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    depths: list[int] = field(default_factory=list)  # roots (children of the end): 0
    _children: dict[tuple[int, int], int] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.tokens)

    def add_path(self, parent: int, path: Sequence[int]) -> list[int]:
        """Hang ``path`` under node ``parent`` (-1: the pending end); returns its nodes."""
        nodes = []
        for token in path:
            node = self._children.get((parent, token))
            if node is None:
                node = len(self.tokens)
                self.tokens.append(token)
                self.parents.append(parent)
                self.depths.append(self.depths[parent] + 1 if parent >= 0 else 0)
                self._children[(parent, token)] = node
            nodes.append(node)
            parent = node
        return nodes

    @property
    def is_chain(self) -> bool:
        """Every node hangs from the one before it (no mask needed)."""
        return all(p == i - 1 for i, p in enumerate(self.parents))


class JacobiWindow:
    """The lookahead branch of lookahead decoding (Fu et al., 2024), as tree nodes.

    ``rows[j][c]`` (L rows, ``size`` columns) is a guess of the token ``c + j + 1`` places
    after the current last token. Row 0 is a chain (each column sees the columns before it),
    and row j of column c hangs from row j - 1 of column c: every node sees exactly the
    guesses before it along its column's diagonal, so the window is an ordinary token tree
    and needs no special mask (and a row-0 chain the model agrees with is even accepted).

    After each pass, column c yields the n-gram ``rows[0][c], ..., rows[L-1][c], out[c]``
    (``out``: the model's choice after the last row) for the pool; the rows then shift up
    by one level and the outputs become the new last row (the next Jacobi iterate).
    """

    def __init__(self, rows: list[list[int]]) -> None:
        self.rows = rows

    @classmethod
    def from_prompt(cls, prompt: Sequence[int], num_rows: int, size: int,
                    seed: int) -> JacobiWindow:
        """Initial guesses drawn (seeded) from the prompt's tokens."""
        generator = torch.Generator().manual_seed(seed)
        picks = torch.randint(len(prompt), (num_rows, size), generator=generator).tolist()
        return cls([[prompt[i] for i in row] for row in picks])

    @property
    def depth(self) -> int:
        """Tree levels the window spans below its parent (row j of column c: level c + j)."""
        return len(self.rows[0]) + len(self.rows) - 1

    def attach(self, tree: TokenTree, parent: int,
               levels: int | None = None) -> list[list[int]] | None:
        """Add the window under ``parent``; returns the node of every cell ``[row][col]``.

        With ``levels`` (tree levels available below ``parent``) only the cells of level
        < ``levels`` are added (cell ``[j][c]`` is at level ``c + j``), and when that cuts
        any cell None is returned: the partial window is verified (its accepted tokens
        count) but gives no n-grams and does not advance.
        """
        if levels is not None and levels < self.depth:
            nodes = [tree.add_path(parent, self.rows[0][:max(levels, 0)])]
            for j, row in enumerate(self.rows[1:], start=1):
                nodes.append([tree.add_path(above, [token])[0]
                              for c, (above, token) in enumerate(zip(nodes[-1], row))
                              if c + j < levels])
            return None
        first = tree.add_path(parent, self.rows[0])
        nodes = [first]
        for row in self.rows[1:]:
            nodes.append([tree.add_path(above, [token])[0]
                          for above, token in zip(nodes[-1], row, strict=True)])
        return nodes

    def advance(self, nodes: list[list[int]],
                choice_after: Callable[[int], int]) -> list[list[int]]:
        """Take the pass's outputs; return the n-grams (``[key, phrase...]`` lists) and shift
        the rows. ``choice_after(node)`` is the model's choice after a node."""
        outputs = [choice_after(node) for node in nodes[-1]]
        ngrams = [[row[c] for row in self.rows] + [outputs[c]] for c in range(len(outputs))]
        self.rows = self.rows[1:] + [outputs]
        return ngrams


# ============================================================================ lookups


def lookup_phrases(pool, keys: Sequence[int], count: int, buffers: dict,
                   device: torch.device,
                   read: Callable[[torch.Tensor], list] = torch.Tensor.tolist) -> list[Phrases]:
    """The ``count`` most recent pool phrases of each key, newest first, in one batched
    lookup: ``[[(slot, tokens), ...] per key]`` (a key of -1 finds nothing).

    ``buffers`` keeps the lookup's result buffers (`CandidatePool.empty_lookup`) and the key
    tensor per ``(keys, count)`` shape between calls, so a step allocates nothing. ``read``
    turns the result into host lists (one read; the engine counts it)."""
    if pool is None or count <= 0 or not keys:
        return [[] for _ in keys]
    shape = (len(keys), count)
    entry = buffers.get(shape)
    if entry is None:
        entry = buffers[shape] = (pool.empty_lookup(len(keys), count),
                                  torch.empty(len(keys), dtype=torch.int64, device=device))
    out, key_tensor = entry
    if len(keys) == 1:
        key_tensor.fill_(keys[0])
    else:
        key_tensor.copy_(torch.tensor(keys, dtype=torch.int64))
    phrases, counts, slots = pool.lookup(key_tensor, count, out=out)
    found = read(torch.cat([counts.to(torch.int64), slots.flatten().to(torch.int64),
                            phrases.flatten().to(torch.int64)]))  # the one host read
    num_keys, length = len(keys), pool.phrase_len
    result = []
    for i in range(num_keys):
        slot_base = num_keys + i * count
        phrase_base = num_keys + num_keys * count + i * count * length
        result.append([(found[slot_base + j],
                        found[phrase_base + j * length:phrase_base + (j + 1) * length])
                       for j in range(found[i])])
    return result


# ============================================================================ the trees of a step


def draft_pass_tree(phrases: Phrases, first: int, fits: Callable[[int, int], bool],
                    window: JacobiWindow | None,
                    levels: int) -> tuple[TokenTree, list[list[int]] | None]:
    """The tree of one draft pass: the pool ``phrases`` keyed by the last token (those that
    fit from position ``first``) and the draft's Jacobi window; returns the tree and the
    window's nodes (None: no window, or a cut one)."""
    tree = TokenTree()
    for _, phrase in phrases:
        if fits(first, len(phrase)):
            tree.add_path(-1, phrase)
    window_nodes = window.attach(tree, -1, levels) if window is not None else None
    return tree, window_nodes


@dataclass
class Suffix:
    """A pool phrase in the target's tree: its key and slot (for refinement), its tokens,
    its tree nodes, and whether it hangs from the committed end (``at_root``: verified in
    its true context whatever the draft does) or from the draft's end."""

    key: int
    slot: int
    phrase: list[int]
    nodes: list[int]
    at_root: bool


@dataclass
class VerificationTree:
    """The target's tree of one step and what each node is: ``draft_nodes`` the draft chain
    (nodes ``0 .. γ-1``), ``suffixes`` the pool phrases in it, ``window_nodes`` the target's
    Jacobi window (lookahead)."""

    tree: TokenTree
    draft_nodes: list[int]
    suffixes: list[Suffix]
    window_nodes: list[list[int]] | None


def suffix_key(tokens: Sequence[int], draft_tokens: Sequence[int]) -> int:
    """The key of a step's suffixes: the last draft token, else the last committed one."""
    return draft_tokens[-1] if draft_tokens else tokens[-1]


def verification_tree(tokens: Sequence[int], draft_tokens: list[int], budget: int,
                      num_suffixes: int, root_found: Phrases, suffix_found: Phrases,
                      fits: Callable[[int, int], bool], window: JacobiWindow | None,
                      levels: int) -> VerificationTree:
    """Pending end -> draft chain -> ``num_suffixes`` pool suffixes (``suffix_found``, keyed
    by `suffix_key`); beside the draft, the root phrases ``root_found`` (keyed by the last
    committed token, only with a draft) [and the target's Jacobi window]. No suffixes when the
    draft already reaches ``budget`` (nothing after it could be emitted). ``fits(first,
    depth)`` says whether a phrase of ``depth`` tokens starting at position ``first`` stays
    within the sequence's last position; ``levels`` the levels left from the root."""
    tree = TokenTree()
    draft_nodes = tree.add_path(-1, draft_tokens)  # len(draft_tokens) <= budget: fits
    first = len(tokens)  # the position of a root node
    suffixes = []
    if draft_tokens:
        last = tokens[-1]
        for slot, phrase in root_found:
            if fits(first, len(phrase)):
                suffixes.append(Suffix(last, slot, phrase, tree.add_path(-1, phrase), True))
    anchor = draft_nodes[-1] if draft_nodes else -1
    key = suffix_key(tokens, draft_tokens)
    if len(draft_tokens) < budget:
        for slot, phrase in suffix_found[:num_suffixes]:
            if fits(first + len(draft_tokens), len(phrase)):
                suffixes.append(Suffix(key, slot, phrase, tree.add_path(anchor, phrase),
                                       anchor < 0))
    window_nodes = window.attach(tree, -1, levels) if window is not None else None
    return VerificationTree(tree, draft_nodes, suffixes, window_nodes)


# ============================================================================ what the pool learns


@dataclass
class PoolUpdate:
    """What one sequence's step writes into the pool: ``refine_*`` slots to overwrite (key,
    slot, corrected phrase), ``ngrams`` ``[key, phrase...]`` rows to insert, then the
    ``sequence`` whose every n-gram is inserted. The counts are the stats' (inspiration,
    window, committed-text n-grams)."""

    refine_keys: list[int] = field(default_factory=list)
    refine_slots: list[int] = field(default_factory=list)
    refine_phrases: list[list[int]] = field(default_factory=list)
    ngrams: list[list[int]] = field(default_factory=list)
    sequence: list[int] = field(default_factory=list)
    inspiration_ngrams: int = 0
    window_ngrams: int = 0
    output_ngrams: int = 0


def sequence_ngrams(tokens: Sequence[int], phrase_len: int) -> int:
    """How many n-grams (key + ``phrase_len`` tokens) a sequence holds."""
    return max(0, len(tokens) - phrase_len)


def pool_update(config, tokens: Sequence[int], verification: VerificationTree,
                choices: list[int], accepted_draft: int, committed_from: int,
                window_ngrams: list[list[int]]) -> PoolUpdate:
    """What the verification of one sequence revealed (docs/architecture.md §2).

    * refinement: each suffix verified in its true context (hanging from the committed end,
      or from a fully accepted draft) is overwritten in place by the target's choices along
      it;
    * inspiration: with a rejected tail, the n-grams of ``[last accepted token, bonus,
      target's choices after each rejected draft node]``;
    * ``window_ngrams``: the target's Jacobi window's (lookahead);
    * the n-grams ending in newly committed tokens (``committed_from`` on; ``tokens``
      already holds the step's accepted tokens).

    ``choices``: the target's choice after the pending end (index 0) and after each tree
    node ``i`` (index ``1 + i``).
    """
    update = PoolUpdate()
    num_draft = len(verification.draft_nodes)
    parents = verification.tree.parents
    if config.refinement:
        for suffix in verification.suffixes:
            if not (suffix.at_root or accepted_draft == num_draft):
                continue  # its context (the draft) was wrong: nothing verified
            corrected = [choices[parents[n] + 1] for n in suffix.nodes]
            if corrected != suffix.phrase:
                update.refine_keys.append(suffix.key)
                update.refine_slots.append(suffix.slot)
                update.refine_phrases.append(corrected)
    if config.inspiration and accepted_draft < num_draft:
        before = verification.tree.tokens[accepted_draft - 1] if accepted_draft else \
            tokens[committed_from - 1]
        predicted = [choices[accepted_draft]] + [choices[n + 1] for n in
                                                 verification.draft_nodes[accepted_draft:]]
        sequence = [before] + predicted
        length = config.phrase_len
        inspired = [sequence[i:i + length + 1] for i in range(len(sequence) - length)]
        update.ngrams += inspired
        update.inspiration_ngrams = len(inspired)
    update.ngrams += window_ngrams
    update.window_ngrams = len(window_ngrams)
    if config.pool_from_output:
        start = max(0, committed_from - config.phrase_len)
        update.sequence = list(tokens[start:])
        update.output_ngrams = sequence_ngrams(update.sequence, config.phrase_len)
    return update


def apply_pool_updates(pool, updates: Sequence[PoolUpdate], device: torch.device) -> int:
    """Write the updates of a step's sequences: every refinement first (row order; they
    name slots found before any insert moved them), then one insert of every sequence's
    n-grams followed by its committed-text n-grams, in row order (the pool inserts in
    order: the same as inserting row by row). Returns the number of refinements written."""
    keys = [k for update in updates for k in update.refine_keys]
    if keys:
        slots = [s for update in updates for s in update.refine_slots]
        phrases = [p for update in updates for p in update.refine_phrases]
        pool.refine(torch.tensor(keys, dtype=torch.int64, device=device),
                    torch.tensor(slots, dtype=torch.int64, device=device),
                    torch.tensor(phrases, dtype=torch.int64, device=device))
    rows: list[list[int]] = []
    length = pool.phrase_len
    for update in updates:
        rows += update.ngrams
        sequence = update.sequence
        rows += [sequence[i:i + length + 1] for i in range(update.output_ngrams)]
    if rows:
        table = torch.tensor(rows, dtype=torch.int64, device=device)
        pool.insert(table[:, 0], table[:, 1:])
    return len(keys)
