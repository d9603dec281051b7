"""The token-tree geometry of one decoding step, in one place (docs/architecture.md §2).

How many tokens one target (verification) pass and one draft pass feed for a tree shape,
as `ouroboros.generate.decode_step` builds them. The KV-cache sizes
(`OuroborosConfig.largest_target_tree` / `largest_draft_tree`), the throughput model
(`ouroboros.tuning.cost_model`) and the cost measurement (`measurement_tree`) all read it
from here. Pure arithmetic: no torch, no I/O (`measurement_tree` alone imports the
engine's `TokenTree`, lazily).

Notation: γ = ``gamma`` draft tokens, L = ``ngram - 1`` tokens per pool phrase,
K = ``num_suffixes``, R = ``root_phrases``, P = ``draft_phrases``, W = ``window_size``
(the Jacobi window has L rows of W columns: W·L cells).

**Target pass** (`ouroboros.generate.verify`): one pending token (the previous step's
bonus: the target cache holds everything else) + the draft chain (γ nodes) + K suffixes
of L tokens hanging from the draft's end (keyed by its last token; none when the draft
already reaches the token budget) + R root phrases of L tokens beside the draft (keyed by
the last committed token; only with a draft) + the target's window (W·L cells; only
without a draft, lookahead decoding)::

    1 + γ + (K + R)·L + [no draft and window] W·L

**Draft pass** (`ouroboros.generate.draft_phase`): the draft's pending tokens + P pool
phrases of L tokens keyed by the last pending token + the draft's window (W·L cells)::

    pending + (P + [window] W)·L

The pending tokens of the first pass of a step are the previous step's emitted tokens the
draft has no K/V for: with ``a`` accepted draft tokens (of which the draft cached all but
the last it produced), that is the bonus, plus the draft's last token when the whole
draft was accepted, plus the pool tokens accepted past the draft (at most L, only when
the target tree has pool phrases): at most ``2 + L`` (``2`` without pool phrases in the
target tree). Every later pass of the step feeds one pending token (its bonus).

The trie merges identical prefixes and near the end of the context the trees shrink, so
a real pass feeds at most these counts, and exactly these when the pool returns distinct
phrases (the typical case once it is warm).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # pragma: no cover
    from ouroboros.config import OuroborosConfig
    from ouroboros.generate import TokenTree

__all__ = [
    "MEASUREMENT_SHAPE",
    "TreeShape",
    "draft_pass_tokens",
    "draft_pending",
    "measurement_tree",
    "target_pass_tokens",
]


class ShapeLike(Protocol):
    """A `TreeShape` or an `OuroborosConfig`: the fields that size the trees."""

    use_draft: bool
    gamma: int
    ngram: int
    num_suffixes: int
    draft_phrases: int
    root_phrases: int
    window: bool
    window_size: int


@dataclass(frozen=True)
class TreeShape:
    """The fields of `OuroborosConfig` that size the trees (what the tuning searches)."""

    use_draft: bool
    gamma: int
    ngram: int
    num_suffixes: int
    draft_phrases: int = 0
    root_phrases: int = 0
    window: bool = False
    window_size: int = 4

    @classmethod
    def of(cls, config: ShapeLike) -> TreeShape:
        """The shape of a configuration."""
        return cls(config.use_draft, config.gamma, config.ngram, config.num_suffixes,
                   config.draft_phrases, config.root_phrases, config.window,
                   config.window_size)

    def apply(self, config: OuroborosConfig) -> OuroborosConfig:
        """``config`` with this shape's sizes (``use_draft`` is the config's own)."""
        return config.replace(gamma=self.gamma, ngram=self.ngram,
                              num_suffixes=self.num_suffixes, draft_phrases=self.draft_phrases,
                              root_phrases=self.root_phrases, window=self.window,
                              window_size=self.window_size)

    @property
    def phrase_len(self) -> int:
        """L = N - 1, tokens per pool phrase."""
        return self.ngram - 1


def _target_phrases(shape: ShapeLike) -> int:
    """Pool phrases in the target's tree: K suffixes, and R root phrases with a draft."""
    return shape.num_suffixes + (shape.root_phrases if shape.use_draft else 0)


def target_pass_tokens(shape: ShapeLike) -> int:
    """Most tokens one target verification pass feeds: ``1 + γ + (K + R)·L`` (R only with
    a draft), plus the target's Jacobi window ``W·L`` without a draft."""
    length = shape.ngram - 1
    window = shape.window_size * length if shape.window and not shape.use_draft else 0
    return 1 + shape.gamma + _target_phrases(shape) * length + window


def draft_pending(shape: ShapeLike, first: bool = True) -> int:
    """Most pending tokens a draft pass feeds: ``2 + L`` for the first pass of a step
    when the target's tree has pool phrases, else ``2``; ``1`` for every later pass of the
    step (``first=False``); ``0`` without a draft."""
    if not shape.use_draft:
        return 0
    if not first:
        return 1
    return 2 + (shape.ngram - 1 if _target_phrases(shape) > 0 else 0)


def draft_pass_tokens(shape: ShapeLike, pending: float | None = None) -> float:
    """Tokens one draft pass feeds: ``pending + (P + [window] W)·L``; ``pending`` defaults
    to the largest (`draft_pending` of the first pass), which makes the result an int.
    ``0`` without a draft."""
    if not shape.use_draft:
        return 0
    if pending is None:
        pending = draft_pending(shape)
    length = shape.ngram - 1
    window = shape.window_size if shape.window else 0
    return pending + (shape.draft_phrases + window) * length


# The shape whose layout `measurement_tree` uses by default: the ``ouroboros`` preset's
# (γ = 6, L = 3, K = 4, P = 4); the cost curves cached so far were measured with its layout.
MEASUREMENT_SHAPE = TreeShape(use_draft=True, gamma=6, ngram=4, num_suffixes=4,
                              draft_phrases=4)


def measurement_tree(num_tokens: int, vocab_size: int,
                     shape: ShapeLike = MEASUREMENT_SHAPE) -> TokenTree:
    """The tree of a target pass of ``shape`` grown or cut to ``num_tokens`` fed tokens
    (one pending token + ``num_tokens - 1`` nodes), for timing a pass over that many.

    Laid out as `ouroboros.generate.build_verification_tree` lays a step's tree: the draft
    chain (up to γ nodes), the R root phrases beside it, then phrases of L tokens hanging
    from the chain's end (the suffixes; beyond K more of them, until ``num_tokens``), each
    with a distinct first token so the trie keeps them apart. A pass of up to γ + 1 tokens
    is a chain (no mask), as in the engine. The window is not laid out: its cells are
    ordinary tree nodes, and the cost of a pass depends on how many tokens it feeds and on
    whether it needs a mask, not on the tree's form.
    """
    from ouroboros.generate import TokenTree

    if num_tokens < 1:
        raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
    tree = TokenTree()
    remaining = num_tokens - 1
    chain = min(remaining, shape.gamma)
    tree.add_path(-1, [(10 + i) % vocab_size for i in range(chain)])
    remaining -= chain
    length = max(shape.ngram - 1, 1)
    branch = 0

    def add_phrase(parent: int) -> None:
        nonlocal remaining, branch
        size = min(length, remaining)
        for _ in range(vocab_size):  # a first token no sibling has (the trie would merge)
            first = (3 + branch) % vocab_size
            if (parent, first) not in tree._children:
                break
            branch += 1
        else:  # every token is taken under ``parent`` (a tiny vocabulary): go one deeper
            parent, first = len(tree) - 1, 3 % vocab_size
        tree.add_path(parent, [first] + [(first + 5 * i) % vocab_size for i in range(1, size)])
        remaining -= size
        branch += 1

    for _ in range(shape.root_phrases if shape.use_draft and chain else 0):
        if remaining <= 0:
            break
        add_phrase(-1)
    while remaining > 0:
        add_phrase(chain - 1)
    return tree
