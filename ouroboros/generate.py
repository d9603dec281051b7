"""The decoding loop: greedy, speculative, lookahead and Ouroboros on one code path.

One step of Ouroboros (docs/architecture.md §2), as `decode_step` runs it:

1. `draft_phase`: the draft model extends the committed text by γ tokens, phrase by
   phrase: each draft pass feeds the pending tokens, the pool phrases keyed by the current
   last token and (optionally) a Jacobi window; `accept` keeps the longest phrase the draft
   agrees with plus the draft's own next token. The draft text is the draft's greedy text.
2. `build_verification_tree`: pending token -> draft chain -> K pool suffixes keyed by the
   last draft token (trie-merged, so identical paths are verified once) [+ pool phrases
   keyed by the last committed token beside the draft, + the target's Jacobi window in
   lookahead decoding].
3. `forward_tree` on the target: one pass over the whole tree; `choose_tokens` gives the
   target's choice (argmax or sample) after every node.
4. `accept`: the deepest node whose path is all correct, plus the target's bonus token.
5. `update_pool`: refinement of the verified suffixes, inspiration from the rejected tail,
   window n-grams, n-grams of the committed text.
6. `compact_caches`: the accepted rows move into place in the target's static cache (one
   ``compact_kv`` over all layers), the draft's cache is rolled back to what is still valid.

Plain speculative decoding is that step with token-by-token drafting and no pool, lookahead
decoding is that step without a draft model (γ = 0, a window in the target), greedy decoding
is that step with an empty tree. Every variant is exact: a token is emitted only when the
target chose it in exactly that context.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

import ouroboros_kernels
from ouroboros.adaptive import StepObservation, StepPlan, fixed_plan
from ouroboros.cache import StaticKVCache
from ouroboros.config import OuroborosConfig
from ouroboros.sampling import SamplingParams, choose_tokens

__all__ = [
    "GenerationResult",
    "GenerationStats",
    "JacobiWindow",
    "LogitRules",
    "ModelRunner",
    "TokenTree",
    "run_generation",
]


# ============================================================================ results


@dataclass
class GenerationStats:
    """Counters and timings of one ``generate`` call.

    Passes: ``target_passes`` counts verification passes (one per step; the prompt's
    prefill is ``prefill_passes``), ``draft_passes`` the draft model's forward passes.
    Tokens: ``new_tokens`` emitted; ``draft_tokens`` proposed by the draft and
    ``accepted_draft_tokens`` of them accepted; ``suffix_tokens`` / ``window_tokens`` accepted
    from pool suffixes (root phrases included) / the target's Jacobi window;
    ``root_phrase_tokens`` of the suffix tokens those from root phrases beside the draft;
    ``draft_phrase_tokens`` draft tokens that came from pool phrases during drafting.
    ``shapes``: steps per tree shape (`ouroboros.adaptive.StepPlan.label`, e.g.
    ``"g3 K2 R0 P1"``: γ = 3 draft tokens, K = 2 suffixes, no root phrases, one pool phrase
    per draft pass); one shape unless the trees adapt. Pool traffic: ``prompt_ngrams``,
    ``output_ngrams``, ``inspiration_ngrams``, ``window_ngrams`` inserted, ``refinements``
    written. Times in seconds: draft model passes, target verification (forward, choice,
    acceptance), pool operations, and the rest; ``time_prefill`` is the part of the total
    spent prefilling the prompt into both caches (the draft's share also counts as draft
    time), so ``time_total - time_prefill`` is the decoding phase.
    """

    new_tokens: int = 0
    target_passes: int = 0
    prefill_passes: int = 0
    draft_passes: int = 0
    draft_tokens: int = 0
    accepted_draft_tokens: int = 0
    suffix_tokens: int = 0
    window_tokens: int = 0
    draft_phrase_tokens: int = 0
    prompt_ngrams: int = 0
    output_ngrams: int = 0
    inspiration_ngrams: int = 0
    window_ngrams: int = 0
    refinements: int = 0
    root_phrase_tokens: int = 0
    shapes: dict[str, int] = field(default_factory=dict)
    time_draft: float = 0.0
    time_verify: float = 0.0
    time_pool: float = 0.0
    time_prefill: float = 0.0
    time_total: float = 0.0
    _timers: list = field(default_factory=list, repr=False, compare=False)

    @property
    def mean_accepted(self) -> float:
        """Tokens emitted per target verification pass (greedy decoding: 1.0)."""
        return self.new_tokens / self.target_passes if self.target_passes else 0.0

    @property
    def time_other(self) -> float:
        return max(0.0, self.time_total - self.time_draft - self.time_verify - self.time_pool)

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.time_total if self.time_total > 0 else 0.0

    @property
    def time_decoding(self) -> float:
        """Seconds after the prefill."""
        return max(0.0, self.time_total - self.time_prefill)

    def summary(self) -> str:
        """One human-readable line."""
        return (f"{self.new_tokens} tokens in {self.time_total:.2f} s "
                f"({self.tokens_per_second:.1f} tok/s); {self.target_passes} target passes "
                f"({self.mean_accepted:.2f} tokens/pass), {self.draft_passes} draft passes; "
                f"time draft {self.time_draft:.2f} s, verify {self.time_verify:.2f} s, "
                f"pool {self.time_pool:.2f} s, other {self.time_other:.2f} s")


@dataclass
class GenerationResult:
    """Output of ``generate``: ``sequences: int64[1, prompt + new]`` on the models' device
    (like ``model.generate``), ``prompt_length``, and the `GenerationStats`."""

    sequences: torch.Tensor
    prompt_length: int
    stats: GenerationStats

    @property
    def new_tokens(self) -> torch.Tensor:
        """``int64[new]``: the generated tokens only."""
        return self.sequences[0, self.prompt_length:]


class _Timer:
    """Adds the wall time of a ``with`` block to a stats field, exclusive of nested timed
    blocks (a pool lookup inside the draft phase counts as pool time only)."""

    def __init__(self, stats: GenerationStats, name: str) -> None:
        self.stats, self.name = stats, name

    def __enter__(self) -> None:
        self.start = time.perf_counter()
        self.nested = 0.0
        self.stats._timers.append(self)

    def __exit__(self, *exc) -> None:
        elapsed = time.perf_counter() - self.start
        self.stats._timers.pop()
        if self.stats._timers:
            self.stats._timers[-1].nested += elapsed
        setattr(self.stats, self.name, getattr(self.stats, self.name) + elapsed - self.nested)


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


# ============================================================================ the window


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


# ============================================================================ model passes


@dataclass
class ModelRunner:
    """A model with its static cache and how to call it."""

    model: torch.nn.Module
    cache: StaticKVCache
    cache_kwarg: str
    backend: str

    @property
    def length(self) -> int:
        """Committed rows in the cache (batch 1)."""
        return self.cache.host_lengths[0]


def forward_tree(runner: ModelRunner, pending: Sequence[int], tree: TokenTree) -> torch.Tensor:
    """One forward pass over ``pending`` (committed tokens not yet in the cache, a chain,
    at least one) followed by ``tree`` (hanging from the last pending token).

    Returns the logits ``[len(tree) + 1, V]`` after the last pending token (row 0) and after
    every tree node (row 1 + i). The K/V of all fed tokens are written behind the cache's
    committed rows; `ModelRunner.cache.commit` decides what stays.
    """
    num_pending = len(pending)
    tokens = list(pending) + tree.tokens
    parents = list(range(-1, num_pending - 1)) + [
        p + num_pending if p >= 0 else num_pending - 1 for p in tree.parents]
    device = runner.cache.device
    start = runner.length
    input_ids = torch.tensor([tokens], dtype=torch.int64, device=device)
    is_chain = all(p == i - 1 for i, p in enumerate(parents))
    if is_chain:
        tree_mask = None
        positions = torch.arange(start, start + len(tokens), device=device)
    else:
        tree_mask, depths = ouroboros_kernels.build_tree(
            torch.tensor(parents, dtype=torch.int32, device=device))
        tree_mask = tree_mask[None]
        positions = depths.to(torch.int64) + start
    step = runner.cache.tree_step(len(tokens), tree_mask, is_chain, runner.backend)
    with runner.cache.forward_context():  # layers on several GPUs: restores the current one
        output = runner.model(input_ids=input_ids, position_ids=positions[None],
                              use_cache=True, logits_to_keep=len(tree) + 1,
                              ouroboros_tree=step, **{runner.cache_kwarg: runner.cache})
    return output.logits[0]


def prefill(runner: ModelRunner, tokens: Sequence[int]) -> None:
    """Write the K/V of ``tokens`` (all committed) into the runner's cache, one causal pass."""
    if tokens:
        forward_tree(runner, tokens, TokenTree())
        runner.cache.commit(len(tokens))


@dataclass
class Acceptance:
    """Outcome of `accept`: the accepted path (tree node indices, root first) with its
    tokens, the bonus token, the choices at every node (host copies), and the device
    tensors `StaticKVCache.commit` consumes."""

    path: list[int]
    path_tokens: list[int]
    bonus: int
    choices: list[int]
    accepted_idx: torch.Tensor | None
    accepted_len: torch.Tensor | None


def accept(tree: TokenTree, choices: torch.Tensor, sampled: bool) -> Acceptance:
    """Accept the deepest correct path of ``tree`` given ``choices: int64[len(tree) + 1]`` (the
    model's choice after the pending end, then after each node). One host read."""
    if len(tree) == 0:
        host = choices.tolist()
        return Acceptance([], [], host[0], host, None, None)
    device = choices.device
    tree_tokens = torch.tensor([tree.tokens], dtype=torch.int64, device=device)
    parents = torch.tensor(tree.parents, dtype=torch.int32, device=device)
    rule = ouroboros_kernels.accept_sampled if sampled else ouroboros_kernels.accept_greedy
    accepted_idx, accepted_len, bonus = rule(tree_tokens, parents, choices[None])
    host = torch.cat([accepted_len.to(torch.int64), bonus, accepted_idx[0].to(torch.int64),
                      choices]).tolist()  # the one read of the pass
    length, bonus_token = host[0], host[1]
    path = host[2:2 + length]
    return Acceptance(path, [tree.tokens[n] for n in path], bonus_token, host[2 + len(tree):],
                      accepted_idx, accepted_len)


# ============================================================================ the session


@dataclass
class LogitRules:
    """The logit processors of the target's generation config that greedy decoding applies
    and the engine honours, per tree row from the row's own output position (so the choice
    at every node is what ``target.generate`` would choose in that node's context).

    ``suppress``: token ids never chosen (``suppress_tokens``); ``begin_suppress``: ids not
    chosen as the first new token (``begin_suppress_tokens``); ``eos`` not chosen before
    ``min_new_tokens`` new tokens (``min_new_tokens`` / ``min_length``).
    """

    suppress: list[int] = field(default_factory=list)
    begin_suppress: list[int] = field(default_factory=list)
    min_new_tokens: int = 0
    eos: list[int] = field(default_factory=list)
    repetition_penalty: float | None = None
    no_repeat_ngram_size: int = 0
    bad_words: list[list[int]] = field(default_factory=list)

    @property
    def needs_context(self) -> bool:
        return bool(self.repetition_penalty or self.no_repeat_ngram_size or self.bad_words)

    def apply(self, logits: torch.Tensor, session: Session, tree: TokenTree) -> torch.Tensor:
        """``logits: [1 + len(tree), V]`` (row 0: after the pending end, row 1 + i: after
        node i) -> the processed logits (a copy; removed tokens at ``-inf``)."""
        logits = logits.clone()
        if self.needs_context:
            self._apply_context_rules(logits, session.tokens, tree)
        if self.suppress:
            logits[:, self.suppress] = float("-inf")
        generated = len(session.tokens) - session.prompt_length
        if self.begin_suppress and generated == 0:
            logits[0, self.begin_suppress] = float("-inf")
        if self.eos and self.min_new_tokens > generated:
            rows = [r for r, p in enumerate(row_outputs(session, tree))
                    if p < self.min_new_tokens]
            logits[torch.tensor(rows, device=logits.device)[:, None],
                   torch.tensor(self.eos, device=logits.device)] = float("-inf")
        return logits

    def _apply_context_rules(self, logits: torch.Tensor, committed: list[int],
                             tree: TokenTree) -> None:
        """The rules that read the text so far, each row with its own context: the committed
        tokens followed by the path to the row's node (in place, in transformers' order:
        repetition penalty, no-repeat n-grams, bad words)."""
        paths: list[list[int]] = []  # paths[i]: the tokens from the pending end to node i
        for token, parent in zip(tree.tokens, tree.parents):
            paths.append((paths[parent] if parent >= 0 else []) + [token])
        contexts = [[]] + paths  # row r's context is committed + contexts[r]
        if self.repetition_penalty:
            seen = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device)
            seen[:, torch.tensor(sorted(set(committed)), device=logits.device)] = True
            for row, path in enumerate(contexts):
                if path:
                    seen[row, torch.tensor(path, device=logits.device)] = True
            penalty = self.repetition_penalty
            penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
            logits.copy_(torch.where(seen, penalised, logits))
        n = self.no_repeat_ngram_size
        if n:
            following: dict[tuple, set] = {}
            for start in range(len(committed) - n + 1):
                gram = committed[start:start + n]
                following.setdefault(tuple(gram[:-1]), set()).add(gram[-1])
            for row, path in enumerate(contexts):
                if len(committed) + len(path) + 1 < n:  # as transformers: too short yet
                    continue
                # The last n - 1 committed tokens (none for n = 1), then the path.
                text = committed[max(0, len(committed) - n + 1):] + path
                prefix = tuple(text[len(text) - n + 1:])  # what the next token would extend
                banned = set(following.get(prefix, ()))
                # The n-grams that end inside the path (the others are in `following`).
                for end in range(max(len(text) - len(path), n - 1), len(text)):
                    if tuple(text[end - n + 1:end]) == prefix:
                        banned.add(text[end])
                if banned:
                    logits[row, sorted(banned)] = float("-inf")
        for word in self.bad_words:
            head, last = word[:-1], word[-1]
            for row, path in enumerate(contexts):
                tail = (committed[max(0, len(committed) - len(head)):] + path)[-len(head):] \
                    if head else []
                if tail == head:
                    logits[row, last] = float("-inf")


@dataclass
class Session:
    """Everything one ``generate`` call works on, passed explicitly to each phase."""

    config: OuroborosConfig
    target: ModelRunner
    draft: ModelRunner | None
    pool: object | None  # ouroboros_kernels.CandidatePool
    sampling: SamplingParams
    uniforms: torch.Tensor | None  # float64 [max_new_tokens + tree depth]: u_p per position
    tokens: list[int]
    prompt_length: int
    max_new_tokens: int
    stats: GenerationStats
    draft_window: JacobiWindow | None = None
    target_window: JacobiWindow | None = None
    rules: LogitRules | None = None  # the target's generation-config processors, if any
    planner: object | None = None  # ouroboros.adaptive.AdaptivePlanner: per-step trees
    # Reused pool lookup buffers (`CandidatePool.empty_lookup`) per phrase count, and the
    # one-key tensor they are looked up with: no allocation per lookup.
    lookup_buffers: dict = field(default_factory=dict, repr=False)
    lookup_key: torch.Tensor | None = field(default=None, repr=False)

    @property
    def device(self) -> torch.device:
        return self.target.cache.device

    @property
    def last_position(self) -> int:
        """The largest position greedy decoding feeds: the one of the token before the last
        new token (``prompt + max_new_tokens - 2``). No tree node, of the target's or the
        draft's, gets a later position: near the end of the context the trees shrink instead
        of overshooting, so a position-dependent rotary embedding (``rope_type="dynamic"``)
        or a learned position table sees exactly the positions greedy decoding uses."""
        return self.prompt_length + self.max_new_tokens - 2

    def levels(self, first_position: int) -> int:
        """Tree levels available from ``first_position`` to `last_position`."""
        return self.last_position - first_position + 1

    def fits(self, first_position: int, depth: int) -> bool:
        """Whether ``depth`` tree levels starting at ``first_position`` stay within
        `last_position`."""
        return first_position + depth - 1 <= self.last_position


def pool_phrases(session: Session, key: int, count: int) -> list[tuple[int, list[int]]]:
    """The ``count`` most recent pool phrases keyed by ``key``: ``[(slot, tokens)]``."""
    if session.pool is None or count == 0:
        return []
    with _Timer(session.stats, "time_pool"):
        buffers = session.lookup_buffers.get(count)
        if buffers is None:
            buffers = session.lookup_buffers[count] = session.pool.empty_lookup(1, count)
        if session.lookup_key is None:
            session.lookup_key = torch.empty(1, dtype=torch.int64, device=session.device)
        keys = session.lookup_key.fill_(key)
        phrases, counts, slots = session.pool.lookup(keys, count, out=buffers)
        found = torch.cat([counts.to(torch.int64), slots[0].to(torch.int64),
                           phrases[0].flatten().to(torch.int64)]).tolist()
    num = found[0]
    slot_list = found[1:1 + count]
    flat = found[1 + count:]
    length = session.pool.phrase_len
    return [(slot_list[i], flat[i * length:(i + 1) * length]) for i in range(num)]


def insert_ngrams(session: Session, ngrams: list[list[int]]) -> int:
    """Insert ``[key, phrase...]`` n-grams into the pool; returns how many."""
    if session.pool is None or not ngrams:
        return 0
    with _Timer(session.stats, "time_pool"):
        rows = torch.tensor(ngrams, dtype=torch.int64, device=session.device)
        session.pool.insert(rows[:, 0], rows[:, 1:])
    return len(ngrams)


def insert_sequence_ngrams(session: Session, tokens: Sequence[int]) -> int:
    """Insert every n-gram of a token sequence; returns how many."""
    length = session.config.phrase_len
    if session.pool is None or len(tokens) <= length:
        return 0
    with _Timer(session.stats, "time_pool"):
        session.pool.insert_ngrams(torch.tensor(list(tokens), dtype=torch.int64,
                                                device=session.device))
    return len(tokens) - length


# ============================================================================ phases


def draft_phase(session: Session, budget: int, phrases: int) -> tuple[list[int], int]:
    """Draft ``budget`` (at most γ) tokens with the draft model, phrase by phrase
    (docs/architecture.md §2), trying ``phrases`` pool phrases per pass.

    Each pass feeds the draft's pending tokens, the pool phrases keyed by the last token
    and the Jacobi window; it keeps the longest phrase the draft agrees with and the draft's
    own next token, so the draft text is exactly the draft's greedy continuation.

    Returns ``(draft_tokens, cached)``: the draft tokens and how many of them have their
    K/V in the draft cache (all but the last produced).
    """
    runner, stats = session.draft, session.stats
    pending = session.tokens[runner.length:]
    drafted: list[int] = []
    with _Timer(stats, "time_draft"):
        while len(drafted) < budget:
            tree = TokenTree()
            first = len(session.tokens) + len(drafted)  # the position of a root node
            for _, phrase in pool_phrases(session, pending[-1], phrases):
                if session.fits(first, len(phrase)):
                    tree.add_path(-1, phrase)
            window = session.draft_window
            window_nodes = window.attach(tree, -1, session.levels(first)) \
                if window is not None else None
            logits = forward_tree(runner, pending, tree)
            outcome = accept(tree, logits.argmax(dim=-1), sampled=False)
            runner.cache.commit(len(pending), outcome.accepted_idx, outcome.accepted_len,
                                len(outcome.path), runner.backend)
            stats.draft_passes += 1
            stats.draft_phrase_tokens += len(outcome.path)
            drafted += outcome.path_tokens + [outcome.bonus]
            pending = [outcome.bonus]
            if window_nodes is not None:
                ngrams = session.draft_window.advance(
                    window_nodes, lambda node, c=outcome.choices: c[node + 1])
                stats.window_ngrams += insert_ngrams(session, ngrams)
    return drafted[:budget], min(len(drafted) - 1, budget)


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


def build_verification_tree(session: Session, draft_tokens: list[int], budget: int,
                            plan: StepPlan) -> VerificationTree:
    """Pending end -> draft chain -> K pool suffixes keyed by the last draft token (the last
    committed token without a draft); beside the draft, ``root_phrases`` pool phrases keyed
    by the last committed token [and the target's Jacobi window]. No suffixes when the draft
    already reaches ``budget`` (nothing after it could be emitted). K and the root phrases
    are the ``plan``'s."""
    tree = TokenTree()
    draft_nodes = tree.add_path(-1, draft_tokens)  # len(draft_tokens) <= budget: fits
    first = len(session.tokens)  # the position of a root node
    suffixes = []
    if draft_tokens and plan.root_phrases:
        last = session.tokens[-1]
        for slot, phrase in pool_phrases(session, last, plan.root_phrases):
            if session.fits(first, len(phrase)):
                suffixes.append(Suffix(last, slot, phrase, tree.add_path(-1, phrase), True))
    anchor = draft_nodes[-1] if draft_nodes else -1
    key = draft_tokens[-1] if draft_tokens else session.tokens[-1]
    num_suffixes = plan.num_suffixes if len(draft_tokens) < budget else 0
    for slot, phrase in pool_phrases(session, key, num_suffixes):
        if session.fits(first + len(draft_tokens), len(phrase)):
            suffixes.append(Suffix(key, slot, phrase, tree.add_path(anchor, phrase),
                                   anchor < 0))
    window = session.target_window
    window_nodes = window.attach(tree, -1, session.levels(first)) if window is not None \
        else None
    return VerificationTree(tree, draft_nodes, suffixes, window_nodes)


def row_outputs(session: Session, tree: TokenTree) -> list[int]:
    """The index (0-based, among the new tokens) of the token each choice row decides:
    row 0 (after the pending end) the next new token, row 1 + i the one after node i."""
    generated = len(session.tokens) - session.prompt_length
    return [generated] + [generated + depth + 1 for depth in tree.depths]


def node_uniforms(session: Session, tree: TokenTree) -> torch.Tensor | None:
    """The uniform of each choice row (sampling only): row 0 decides the next new token,
    row 1 + i the token after node i; a row deciding new token p uses ``u_p``."""
    if session.uniforms is None:
        return None
    last = session.uniforms.shape[0] - 1
    index = torch.tensor([min(row, last) for row in row_outputs(session, tree)],
                         device=session.uniforms.device)
    return session.uniforms[index]


def verify(session: Session, verification: VerificationTree) -> Acceptance:
    """One target pass over pending + tree, the target's choice at every node, acceptance."""
    stats = session.stats
    with _Timer(stats, "time_verify"):
        pending = session.tokens[session.target.length:]
        logits = forward_tree(session.target, pending, verification.tree)
        if session.rules is not None:
            logits = session.rules.apply(logits, session, verification.tree)
        choices = choose_tokens(logits, session.sampling, node_uniforms(session,
                                                                          verification.tree))
        outcome = accept(verification.tree, choices, sampled=session.sampling.do_sample)
    stats.target_passes += 1
    return outcome


def update_pool(session: Session, verification: VerificationTree, outcome: Acceptance,
                accepted_draft: int, committed_from: int) -> None:
    """Feed what verification revealed into the pool (docs/architecture.md §2).

    * refinement: each suffix verified in its true context (hanging from the committed end,
      or from a fully accepted draft) is overwritten in place by the target's choices along
      it (first, before any insert moves slots);
    * inspiration: with a rejected tail, the n-grams of ``[last accepted token, bonus,
      target's choices after each rejected draft node]``;
    * the target's window n-grams (lookahead);
    * the n-grams ending in newly committed tokens (``committed_from`` on).
    """
    config, stats, choices = session.config, session.stats, outcome.choices
    if session.pool is None:
        return
    num_draft = len(verification.draft_nodes)
    parents = verification.tree.parents

    def choice_after(node: int) -> int:
        return choices[node + 1]

    if config.refinement and verification.suffixes:
        keys, slots, phrases = [], [], []
        for suffix in verification.suffixes:
            if not (suffix.at_root or accepted_draft == num_draft):
                continue  # its context (the draft) was wrong: nothing verified
            corrected = [choices[parents[n] + 1] for n in suffix.nodes]
            if corrected != suffix.phrase:
                keys.append(suffix.key)
                slots.append(suffix.slot)
                phrases.append(corrected)
        if keys:
            with _Timer(stats, "time_pool"):
                device = session.device
                session.pool.refine(torch.tensor(keys, dtype=torch.int64, device=device),
                                    torch.tensor(slots, dtype=torch.int64, device=device),
                                    torch.tensor(phrases, dtype=torch.int64, device=device))
            stats.refinements += len(keys)
    if config.inspiration and accepted_draft < num_draft:
        before = verification.tree.tokens[accepted_draft - 1] if accepted_draft else \
            session.tokens[committed_from - 1]
        predicted = [choices[accepted_draft]] + [choice_after(n) for n in
                                                 verification.draft_nodes[accepted_draft:]]
        sequence = [before] + predicted
        length = config.phrase_len
        ngrams = [sequence[i:i + length + 1] for i in range(len(sequence) - length)]
        stats.inspiration_ngrams += insert_ngrams(session, ngrams)
    if verification.window_nodes is not None:
        ngrams = session.target_window.advance(verification.window_nodes, choice_after)
        stats.window_ngrams += insert_ngrams(session, ngrams)
    if config.pool_from_output:
        start = max(0, committed_from - config.phrase_len)
        stats.output_ngrams += insert_sequence_ngrams(session, session.tokens[start:])


def compact_caches(session: Session, outcome: Acceptance, committed_from: int,
                   accepted_draft: int, draft_cached: int | None) -> None:
    """Keep the accepted path's K/V in the target cache (moved behind the pending token in
    one ``compact_kv`` over all layers); roll the draft cache back to the draft tokens the
    target accepted (``draft_cached`` None: the draft did not run this step, and its cache,
    all committed tokens, stays as it is until the next draft pass catches up)."""
    num_pending = committed_from - session.target.length
    session.target.cache.commit(num_pending, outcome.accepted_idx, outcome.accepted_len,
                                len(outcome.path), session.target.backend)
    if session.draft is not None and draft_cached is not None:
        session.draft.cache.truncate(committed_from + min(draft_cached, accepted_draft))


# ============================================================================ the loop


@dataclass
class StopRules:
    """When to stop: ``max_new_tokens``, any id of ``eos_token_ids``, or ``stop(new_tokens)``
    returning True (called after each emitted token with the new tokens so far)."""

    max_new_tokens: int
    eos_token_ids: frozenset[int]
    stop: Callable[[list[int]], bool] | None = None

    def clip(self, generated: list[int], chunk: list[int]) -> tuple[list[int], bool]:
        """The part of ``chunk`` to emit after ``generated``, and whether generation ends."""
        room = self.max_new_tokens - len(generated)
        emitted = []
        for token in chunk[:room]:
            emitted.append(token)
            if token in self.eos_token_ids:
                return emitted, True
            if self.stop is not None and self.stop(generated + emitted):
                return emitted, True
        return emitted, len(generated) + len(emitted) >= self.max_new_tokens


def count_accepted(stats: GenerationStats, verification: VerificationTree,
                   outcome: Acceptance) -> tuple[int, int, int]:
    """Tally where the accepted tokens came from; returns how many were draft tokens, how
    many came from the suffixes after the draft (after the committed end without a draft),
    and how many from root phrases beside the draft."""
    num_draft = len(verification.draft_nodes)
    accepted_draft = sum(1 for n in outcome.path if n < num_draft)  # a prefix of the path
    root_nodes, end_nodes = set(), set()
    for suffix in verification.suffixes:  # a phrase merged into the draft counts as draft
        beside = root_nodes if suffix.at_root and num_draft else end_nodes
        beside.update(n for n in suffix.nodes if n >= num_draft)
    from_roots = sum(1 for n in outcome.path if n in root_nodes)
    from_suffixes = sum(1 for n in outcome.path if n in end_nodes)
    stats.draft_tokens += num_draft
    stats.accepted_draft_tokens += accepted_draft
    stats.suffix_tokens += from_suffixes + from_roots
    stats.root_phrase_tokens += from_roots
    stats.window_tokens += len(outcome.path) - accepted_draft - from_suffixes - from_roots
    return accepted_draft, from_suffixes, from_roots


def plan_step(session: Session) -> StepPlan:
    """The tree of the next step: the planner's choice (adaptive trees), else the
    configuration's; counted in ``stats.shapes``."""
    if session.planner is not None:
        plan = session.planner.plan(len(session.tokens))
    else:
        plan = fixed_plan(session.config)
    shapes = session.stats.shapes
    shapes[plan.label] = shapes.get(plan.label, 0) + 1
    return plan


def decode_step(session: Session) -> list[int]:
    """One Ouroboros step; returns the tokens the target accepted (path + bonus)."""
    stats = session.stats
    plan = plan_step(session)
    committed_from = len(session.tokens)
    # Tokens a step may still emit besides the bonus: drafting further is wasted work.
    budget = session.max_new_tokens - (committed_from - session.prompt_length) - 1
    draft_budget = min(plan.gamma, budget)
    passes_before, phrases_before = stats.draft_passes, stats.draft_phrase_tokens
    draft_tokens, draft_cached = draft_phase(session, draft_budget, plan.draft_phrases) \
        if session.draft is not None and draft_budget > 0 else ([], None)
    verification = build_verification_tree(session, draft_tokens, budget, plan)
    outcome = verify(session, verification)
    accepted_draft, from_suffixes, from_roots = count_accepted(stats, verification, outcome)
    compact_caches(session, outcome, committed_from, accepted_draft, draft_cached)
    chunk = outcome.path_tokens + [outcome.bonus]
    session.tokens.extend(chunk)
    update_pool(session, verification, outcome, accepted_draft, committed_from)
    if session.planner is not None:
        session.planner.observe(plan, StepObservation(
            drafted=len(draft_tokens), accepted_draft=accepted_draft,
            suffix_tokens=from_suffixes,
            suffixes_in_context=accepted_draft == len(draft_tokens) < budget,
            root_tokens=from_roots, draft_passes=stats.draft_passes - passes_before,
            phrase_tokens=stats.draft_phrase_tokens - phrases_before))
    return chunk


def run_generation(session: Session, prompt_length: int, rules: StopRules,
                   streamer: Callable[[list[int]], None] | None = None) -> GenerationResult:
    """Prefill both models, then `decode_step` until a stop rule fires."""
    stats = session.stats
    start = time.perf_counter()
    prompt = session.tokens[:prompt_length]
    prefill(session.target, prompt[:-1])
    stats.prefill_passes += 1 if prompt_length > 1 else 0
    if session.draft is not None:
        with _Timer(stats, "time_draft"):
            prefill(session.draft, prompt[:-1])
    stats.time_prefill = time.perf_counter() - start
    generated: list[int] = []
    done = False
    while not done:
        chunk = decode_step(session)
        emitted, done = rules.clip(generated, chunk)
        generated += emitted
        if streamer is not None and emitted:
            streamer(emitted)
    del session.tokens[prompt_length + len(generated):]
    stats.new_tokens = len(generated)
    stats.time_total = time.perf_counter() - start
    sequences = torch.tensor([session.tokens], dtype=torch.int64, device=session.device)
    return GenerationResult(sequences, prompt_length, stats)
