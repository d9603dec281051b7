"""The decoding loop: greedy, speculative, lookahead and Ouroboros on one code path, for one
sequence or a batch.

One step of Ouroboros (docs/architecture.md §2), as `decode_step` runs it over the live
rows of a batch (each row its own sequence, plan, tree and stop rules):

1. `draft_phase`: the draft model extends each row's committed text by γ tokens, phrase by
   phrase: each draft pass feeds every row's pending tokens, the pool phrases keyed by its
   current last token and (optionally) a Jacobi window; `accept` keeps the longest phrase
   the draft agrees with plus the draft's own next token. The draft text is the draft's
   greedy text.
2. `ouroboros.policy.verification_tree`: pending token -> draft chain -> K pool suffixes
   keyed by the last draft token (trie-merged, so identical paths are verified once) [+ pool
   phrases keyed by the last committed token beside the draft, + the target's Jacobi window
   in lookahead decoding].
3. `forward_rows` on the target: one pass over every row's tree (`choose_tokens` gives the
   target's choice, argmax or sample, after every node).
4. `accept_rows`: per row, the deepest node whose path is all correct, plus the target's
   bonus token.
5. `ouroboros.policy.pool_update`: refinement of the verified suffixes, inspiration from the
   rejected tail, window n-grams, n-grams of the committed text; written in row order.
6. `compact_caches`: the accepted rows move into place in the target's static cache (one
   ``compact_kv`` over all layers and rows), the draft's cache is rolled back to what is
   still valid.

Plain speculative decoding is that step with token-by-token drafting and no pool, lookahead
decoding is that step without a draft model (γ = 0, a window in the target), greedy decoding
is that step with an empty tree. Every variant is exact: a token is emitted only when the
target chose it in exactly that context.

Batches (docs/architecture.md §8): a forward pass packs each row as ``[pending, tree,
padding]`` behind that row's own committed length in the static cache; padding tokens see
only themselves and are never committed. A row that ends leaves the batch (`StaticKVCache.
keep_rows`), so finished rows stop costing compute.
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
from ouroboros.policy import (
    JacobiWindow,
    TokenTree,
    VerificationTree,
    apply_pool_updates,
    draft_pass_tree,
    lookup_phrases,
    pool_update,
    sequence_ngrams,
    suffix_key,
    verification_tree,
)
from ouroboros.sampling import SamplingParams, choose_tokens

__all__ = [
    "BatchGenerationResult",
    "GenerationResult",
    "GenerationStats",
    "JacobiWindow",
    "LogitRules",
    "ModelRunner",
    "Row",
    "Session",
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
    written. ``host_reads``: reads of the device the steps made (`host_read`: one per pool
    lookup and one per acceptance, for the batch as a whole). Times in seconds: draft model
    passes, target verification (forward, choice,
    acceptance), pool operations, and the rest; ``time_prefill`` is the part of the total
    spent prefilling the prompt into both caches (the draft's share also counts as draft
    time), so ``time_total - time_prefill`` is the decoding phase.

    In a batch (`BatchGenerationResult`) every row has its own counters (the passes it took
    part in, its tokens and pool traffic); its times are those of the whole batch until the
    row ended (``time_total``: when its last token came). ``finish_reason``: ``"eos"``,
    ``"length"`` (``max_new_tokens``), ``"stop"`` (the stop callback) or ``"context"`` (the
    row reached the model's context in a batch, where it ends alone).
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
    host_reads: int = 0
    finish_reason: str = ""
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

    def add(self, other: GenerationStats) -> None:
        """Add ``other``'s token and pool counters (not passes or times) to these."""
        for name in ("new_tokens", "draft_tokens", "accepted_draft_tokens", "suffix_tokens",
                     "window_tokens", "draft_phrase_tokens", "prompt_ngrams", "output_ngrams",
                     "inspiration_ngrams", "window_ngrams", "refinements",
                     "root_phrase_tokens"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for label, count in other.shapes.items():
            self.shapes[label] = self.shapes.get(label, 0) + count


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


@dataclass
class BatchGenerationResult:
    """Output of ``generate`` for a batch of B prompts.

    Attributes:
        sequences: ``int64[B, S + N]``: the input as given (a tensor with its left padding;
            lists left-padded with ``pad_token_id`` to the longest prompt), then each row's
            new tokens, right-padded with ``pad_token_id`` after the row ended; N is the
            longest row's count of new tokens.
        new_tokens: row b's generated tokens (``list[int]``, unpadded).
        rows: row b as if decoded alone: a `GenerationResult` with its own ``sequences
            [1, S_b + n_b]``, ``prompt_length`` and `GenerationStats`.
        stats: totals of the batch: tokens and pool traffic summed over rows; passes are
            batched forward passes; times are wall times of the call.
        prompt_lengths: ``S_b``, tokens of each prompt without padding.
        pad_token_id: the id the padding uses.
    """

    sequences: torch.Tensor
    new_tokens: list[list[int]]
    rows: list[GenerationResult]
    stats: GenerationStats
    prompt_lengths: list[int]
    pad_token_id: int

    @property
    def finish_reasons(self) -> list[str]:
        """Why each row ended (`GenerationStats.finish_reason`)."""
        return [row.stats.finish_reason for row in self.rows]

    def __len__(self) -> int:
        return len(self.rows)


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


# ============================================================================ model passes


@dataclass
class ModelRunner:
    """A model with its static cache and how to call it (``compiled``: the captured passes
    `_call` runs instead of the eager forward, `ouroboros.compiled.CompiledPasses`)."""

    model: torch.nn.Module
    cache: StaticKVCache
    cache_kwarg: str
    backend: str
    compiled: Callable | None = None

    @property
    def length(self) -> int:
        """Committed rows in the cache of the first sequence (batch 1: the only one)."""
        return self.cache.host_lengths[0]


def _call(runner: ModelRunner, input_ids: torch.Tensor, positions: torch.Tensor,
          tree_mask: torch.Tensor | None, causal: bool, keep: int) -> torch.Tensor:
    """One forward of ``input_ids [R, T]`` behind the cache's committed rows; the logits of
    the last ``keep`` columns ``[R, keep, V]``."""
    if runner.compiled is not None:
        return runner.compiled(runner, input_ids, positions, tree_mask, causal, keep)
    step = runner.cache.tree_step(input_ids.shape[1], tree_mask, causal, runner.backend)
    with runner.cache.forward_context():  # layers on several GPUs: restores the current one
        output = runner.model(input_ids=input_ids, position_ids=positions, use_cache=True,
                              logits_to_keep=keep, ouroboros_tree=step,
                              **{runner.cache_kwarg: runner.cache})
    return output.logits


def forward_tree(runner: ModelRunner, pending: Sequence[int], tree: TokenTree) -> torch.Tensor:
    """One forward pass of a batch-1 cache over ``pending`` (committed tokens not yet in the
    cache, a chain, at least one) followed by ``tree`` (hanging from the last pending token).

    Returns the logits ``[len(tree) + 1, V]`` after the last pending token (row 0) and after
    every tree node (row 1 + i). The K/V of all fed tokens are written behind the cache's
    committed rows; `ModelRunner.cache.commit` decides what stays.
    """
    return forward_rows(runner, [(pending, tree)])[0]


def forward_rows(runner: ModelRunner, items: Sequence[tuple[Sequence[int], TokenTree]],
                 logits: bool = True) -> torch.Tensor | None:
    """One forward pass over every live sequence of the runner's cache: ``items[b] =
    (pending_b, tree_b)`` (pending: committed tokens not yet cached, a chain; the tree hangs
    from its last token; a row with nothing to feed gives ``([], TokenTree())``).

    Layout: row b is ``[pending_b, tree_b, padding]``, T columns (the longest row; batch 1:
    no padding). Padding tokens are roots that see only the committed prefix and themselves,
    at the row's first position; their K/V are written but never committed. When every row
    is a chain the pass is causal (no mask).

    Returns ``[R, 1 + t_max, V]``: row b's logits after its last pending token (index 0) and
    after each of its tree nodes (index 1 + i; past ``len(tree_b)``: meaningless), or None
    with ``logits=False`` (a prefill).
    """
    cache = runner.cache
    device = cache.device
    starts = cache.host_lengths
    counts = [len(pending) for pending, _ in items]
    sizes = [len(tree) for _, tree in items]
    if len(items) != cache.live:
        raise ValueError(f"forward_rows got {len(items)} rows for {cache.live} live sequences")
    width = max(n + t for n, t in zip(counts, sizes))
    num_out = max(sizes) + 1
    fed = [n for n in counts if n]
    if not fed:
        raise ValueError("forward_rows: no row has a token to feed")
    keep = 1 if not logits else width - min(fed) + 1
    chain = all(tree.is_chain for _, tree in items)
    tokens, parents, positions = [], [], []
    for (pending, tree), n, start in zip(items, counts, starts):
        row = list(pending) + tree.tokens
        pad = width - len(row)
        tokens.append(row + [0] * pad)
        if chain:  # padding after the chain, at the row's first position
            positions.append(list(range(start, start + len(row))) + [start] * pad)
        else:
            parents.append(list(range(-1, n - 1)) +
                           [p + n if p >= 0 else n - 1 for p in tree.parents] + [-1] * pad)
    input_ids = torch.tensor(tokens, dtype=torch.int64, device=device)
    if chain:
        tree_mask = None
        position_ids = torch.tensor(positions, dtype=torch.int64, device=device)
    else:
        tree_mask, depths = ouroboros_kernels.build_tree(  # parents built here: valid
            torch.tensor(parents, dtype=torch.int32, device=device), validate=False)
        position_ids = depths.to(torch.int64) + torch.tensor(starts, dtype=torch.int64,
                                                             device=device)[:, None]
    out = _call(runner, input_ids, position_ids, tree_mask, chain, keep)
    if not logits:
        return None
    offset = width - keep  # column of out[:, 0]
    if all(n == counts[0] for n in counts) and counts[0] - 1 - offset == 0 and \
            out.shape[1] == num_out:
        return out
    index = [[min(max(n - 1 + j - offset, 0), keep - 1) for j in range(num_out)]
             for n in counts]
    index = torch.tensor(index, dtype=torch.int64, device=out.device)
    return out.gather(1, index[:, :, None].expand(-1, -1, out.shape[2]))


def prefill(runner: ModelRunner, tokens: Sequence[int]) -> None:
    """Write the K/V of ``tokens`` (all committed) into a batch-1 cache, one causal pass."""
    prefill_rows(runner, [tokens])


def prefill_rows(runner: ModelRunner, prompts: Sequence[Sequence[int]]) -> None:
    """Write the K/V of each live sequence's ``prompts[b]`` (all committed, any lengths)
    into the runner's cache in one causal pass."""
    if any(prompts):
        forward_rows(runner, [(tokens, TokenTree()) for tokens in prompts], logits=False)
        counts = [len(tokens) for tokens in prompts]
        runner.cache.commit(counts)


@dataclass
class Acceptance:
    """Outcome of `accept`: the accepted path (tree node indices, root first) with its
    tokens, the bonus token, the choices at every node (host copies), and the device
    tensors `StaticKVCache.commit` consumes (batch 1)."""

    path: list[int]
    path_tokens: list[int]
    bonus: int
    choices: list[int]
    accepted_idx: torch.Tensor | None
    accepted_len: torch.Tensor | None


def host_read(tensor: torch.Tensor, stats: GenerationStats | None = None) -> list:
    """``tensor.tolist()``, counted in ``stats.host_reads``: every read of the device the
    decoding step makes goes through here (a read waits for the device to finish)."""
    if stats is not None:
        stats.host_reads += 1
    return tensor.tolist()


def accept(tree: TokenTree, choices: torch.Tensor, sampled: bool,
           stats: GenerationStats | None = None) -> Acceptance:
    """Accept the deepest correct path of ``tree`` given ``choices: int64[len(tree) + 1]`` (the
    model's choice after the pending end, then after each node). One host read (counted in
    ``stats``)."""
    if len(tree) == 0:
        host = host_read(choices, stats)
        return Acceptance([], [], host[0], host, None, None)
    device = choices.device
    tree_tokens = torch.tensor([tree.tokens], dtype=torch.int64, device=device)
    parents = torch.tensor(tree.parents, dtype=torch.int32, device=device)
    rule = ouroboros_kernels.accept_sampled if sampled else ouroboros_kernels.accept_greedy
    accepted_idx, accepted_len, bonus = rule(tree_tokens, parents, choices[None])
    host = host_read(torch.cat([accepted_len.to(torch.int64), bonus,
                                accepted_idx[0].to(torch.int64), choices]), stats)
    length, bonus_token = host[0], host[1]
    path = host[2:2 + length]
    return Acceptance(path, [tree.tokens[n] for n in path], bonus_token, host[2 + len(tree):],
                      accepted_idx, accepted_len)


def accept_rows(trees: Sequence[TokenTree], choices: torch.Tensor, sampled: bool,
                stats: GenerationStats | None = None
                ) -> tuple[list[Acceptance], torch.Tensor | None, torch.Tensor | None]:
    """`accept` for every row: ``choices: int64[R, 1 + t_max]`` (row b: after its pending end,
    then after each of its nodes). Returns the rows' outcomes and the batched
    ``(accepted_idx int32[R, t_max], accepted_len int32[R])`` for `StaticKVCache.commit`
    (None when no row has a tree). One host read."""
    if len(trees) == 1:
        outcome = accept(trees[0], choices[0, :len(trees[0]) + 1], sampled, stats)
        return [outcome], outcome.accepted_idx, outcome.accepted_len
    num_rows = len(trees)
    widest = max(len(tree) for tree in trees)
    if widest == 0:
        host = host_read(choices[:, 0], stats)
        return [Acceptance([], [], token, [token], None, None) for token in host], None, None
    # Padding nodes carry token -1: never equal to a choice, never accepted.
    tokens = [tree.tokens + [-1] * (widest - len(tree)) for tree in trees]
    parents = [tree.parents + [-1] * (widest - len(tree)) for tree in trees]
    device = choices.device
    rule = ouroboros_kernels.accept_sampled if sampled else ouroboros_kernels.accept_greedy
    accepted_idx, accepted_len, bonus = rule(
        torch.tensor(tokens, dtype=torch.int64, device=device),
        torch.tensor(parents, dtype=torch.int32, device=device), choices)
    host = host_read(torch.cat([accepted_len.to(torch.int64), bonus,
                                accepted_idx.flatten().to(torch.int64), choices.flatten()]),
                     stats)
    outcomes = []
    for b, tree in enumerate(trees):
        length = host[b]
        path_base = 2 * num_rows + b * widest
        choice_base = 2 * num_rows + num_rows * widest + b * (widest + 1)
        path = host[path_base:path_base + length]
        outcomes.append(Acceptance(path, [tree.tokens[n] for n in path], host[num_rows + b],
                                   host[choice_base:choice_base + len(tree) + 1], None, None))
    return outcomes, accepted_idx, accepted_len


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

    def apply(self, logits: torch.Tensor, row: Row, tree: TokenTree) -> torch.Tensor:
        """``logits: [1 + len(tree), V]`` (row 0: after the pending end, row 1 + i: after
        node i) -> the processed logits (a copy; removed tokens at ``-inf``)."""
        logits = logits.clone()
        if self.needs_context:
            self._apply_context_rules(logits, row.tokens, tree)
        if self.suppress:
            logits[:, self.suppress] = float("-inf")
        generated = len(row.tokens) - row.prompt_length
        if self.begin_suppress and generated == 0:
            logits[0, self.begin_suppress] = float("-inf")
        if self.eos and self.min_new_tokens > generated:
            rows = [r for r, p in enumerate(row_outputs(row, tree))
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
class StopRules:
    """When to stop: ``max_new_tokens``, any id of ``eos_token_ids``, or ``stop(new_tokens)``
    returning True (called after each emitted token with the new tokens so far)."""

    max_new_tokens: int
    eos_token_ids: frozenset[int]
    stop: Callable[[list[int]], bool] | None = None

    def clip(self, generated: list[int], chunk: list[int]) -> tuple[list[int], bool]:
        """The part of ``chunk`` to emit after ``generated``, and whether generation ends."""
        emitted, reason = self.clip_reason(generated, chunk)
        return emitted, reason is not None

    def clip_reason(self, generated: list[int], chunk: list[int]) -> tuple[list[int], str | None]:
        """The part of ``chunk`` to emit after ``generated``, and why generation ends there
        (``"eos"``, ``"stop"``, ``"length"``) or None."""
        room = self.max_new_tokens - len(generated)
        emitted = []
        for token in chunk[:room]:
            emitted.append(token)
            if token in self.eos_token_ids:
                return emitted, "eos"
            if self.stop is not None and self.stop(generated + emitted):
                return emitted, "stop"
        done = len(generated) + len(emitted) >= self.max_new_tokens
        return emitted, "length" if done else None


@dataclass
class Row:
    """One sequence of a batch: its text so far and everything that is its own.

    ``max_new_tokens`` is the row's: the caller's, or fewer when the model's context ends
    first (``context_limited``: the row then ends with reason ``"context"``)."""

    index: int  # in the caller's batch
    tokens: list[int]
    prompt_length: int
    max_new_tokens: int
    stop_rules: StopRules
    stats: GenerationStats
    uniforms: torch.Tensor | None = None  # float64 [max_new_tokens + tree depth]: u_p
    rules: LogitRules | None = None  # the target's generation-config processors, if any
    planner: object | None = None  # ouroboros.adaptive.AdaptivePlanner: per-step trees
    draft_window: JacobiWindow | None = None
    target_window: JacobiWindow | None = None
    context_limited: bool = False
    generated: list[int] = field(default_factory=list)
    done: bool = False

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


@dataclass
class Session:
    """Everything one ``generate`` call works on, passed explicitly to each phase:
    ``rows`` (all of the batch, in the caller's order) and ``live`` (those still decoding,
    in the order of the caches' batch dimension); ``stats`` counts batched passes and times."""

    config: OuroborosConfig
    target: ModelRunner
    draft: ModelRunner | None
    pool: object | None  # ouroboros_kernels.CandidatePool
    sampling: SamplingParams
    rows: list[Row]
    stats: GenerationStats = field(default_factory=GenerationStats)
    live: list[Row] = field(default_factory=list)
    # Reused pool lookup buffers, per (keys, count) shape (`ouroboros.policy.lookup_phrases`).
    lookup_buffers: dict = field(default_factory=dict, repr=False)

    @property
    def device(self) -> torch.device:
        return self.target.cache.device

    def lookup(self, keys: Sequence[int], count: int) -> list:
        """`ouroboros.policy.lookup_phrases`, timed as pool time."""
        if self.pool is None or count <= 0:
            return [[] for _ in keys]
        with _Timer(self.stats, "time_pool"):
            return lookup_phrases(self.pool, keys, count, self.lookup_buffers, self.device,
                                  lambda tensor: host_read(tensor, self.stats))

    def insert_ngrams(self, ngrams: list[list[int]]) -> int:
        """Insert ``[key, phrase...]`` n-grams into the pool; returns how many."""
        if self.pool is None or not ngrams:
            return 0
        with _Timer(self.stats, "time_pool"):
            rows = torch.tensor(ngrams, dtype=torch.int64, device=self.device)
            self.pool.insert(rows[:, 0], rows[:, 1:])
        return len(ngrams)

    def insert_sequence_ngrams(self, tokens: Sequence[int]) -> int:
        """Insert every n-gram of a token sequence; returns how many."""
        count = sequence_ngrams(tokens, self.config.phrase_len)
        if self.pool is None or not count:
            return 0
        with _Timer(self.stats, "time_pool"):
            self.pool.insert_ngrams(torch.tensor(list(tokens), dtype=torch.int64,
                                                 device=self.device))
        return count


# ============================================================================ phases


def draft_phase(session: Session, budgets: list[int],
                phrases: list[int]) -> list[tuple[list[int], int | None]]:
    """Draft ``budgets[b]`` (at most γ) tokens for each live row with the draft model,
    phrase by phrase (docs/architecture.md §2), trying ``phrases[b]`` pool phrases per pass.

    Each pass feeds every drafting row's pending tokens, the pool phrases keyed by its last
    token and its Jacobi window (rows done drafting ride along with nothing to feed); it
    keeps the longest phrase the draft agrees with and the draft's own next token, so each
    row's draft text is exactly the draft's greedy continuation.

    Returns per row ``(draft_tokens, cached)``: the draft tokens and how many of them have
    their K/V in the draft cache (all but the last produced); ``([], None)`` for a row that
    did not draft.
    """
    runner, stats, rows = session.draft, session.stats, session.live
    pending = [row.tokens[length:] for row, length in zip(rows, runner.cache.host_lengths)]
    drafted: list[list[int]] = [[] for _ in rows]
    active = [budget > 0 for budget in budgets]
    with _Timer(stats, "time_draft"):
        while any(active):
            count = max(p for p, a in zip(phrases, active) if a)
            found = session.lookup([pending[b][-1] if active[b] and phrases[b] else -1
                                    for b in range(len(rows))], count)
            items, windows = [], []
            for b, row in enumerate(rows):
                if not active[b]:
                    items.append(([], TokenTree()))
                    windows.append(None)
                    continue
                first = len(row.tokens) + len(drafted[b])  # the position of a root node
                tree, window_nodes = draft_pass_tree(found[b][:phrases[b]], first, row.fits,
                                                     row.draft_window, row.levels(first))
                items.append((pending[b], tree))
                windows.append(window_nodes)
            logits = forward_rows(runner, items)
            trees = [tree for _, tree in items]
            outcomes, accepted_idx, accepted_len = accept_rows(trees, logits.argmax(dim=-1),
                                                               False, stats)
            counts = [len(p) for p, _ in items]
            runner.cache.commit(counts, accepted_idx, accepted_len,
                                [len(o.path) for o in outcomes], runner.backend)
            stats.draft_passes += 1
            for b, row in enumerate(rows):
                if not active[b]:
                    continue
                outcome = outcomes[b]
                row.stats.draft_passes += 1
                row.stats.draft_phrase_tokens += len(outcome.path)
                drafted[b] += outcome.path_tokens + [outcome.bonus]
                pending[b] = [outcome.bonus]
                if windows[b] is not None:
                    ngrams = row.draft_window.advance(
                        windows[b], lambda node, c=outcome.choices: c[node + 1])
                    row.stats.window_ngrams += session.insert_ngrams(ngrams)
                active[b] = len(drafted[b]) < budgets[b]
    return [(drafted[b][:budget], min(len(drafted[b]) - 1, budget)) if budget > 0
            else ([], None) for b, budget in enumerate(budgets)]


def build_trees(session: Session, drafts: list[list[int]], budgets: list[int],
                plans: list[StepPlan]) -> list[VerificationTree]:
    """Every live row's verification tree (`ouroboros.policy.verification_tree`), with one
    pool lookup for all rows' root phrases and suffixes."""
    rows = session.live
    roots = [plan.root_phrases if draft else 0 for plan, draft in zip(plans, drafts)]
    wanted = [plan.num_suffixes if len(draft) < budget else 0
              for plan, draft, budget in zip(plans, drafts, budgets)]
    keys = [row.tokens[-1] if count else -1 for row, count in zip(rows, roots)] + \
        [suffix_key(row.tokens, draft) if count else -1
         for row, draft, count in zip(rows, drafts, wanted)]
    found = session.lookup(keys, max(roots + wanted))
    trees = []
    for b, row in enumerate(rows):
        trees.append(verification_tree(row.tokens, drafts[b], budgets[b], wanted[b],
                                       found[b][:roots[b]], found[len(rows) + b], row.fits,
                                       row.target_window, row.levels(len(row.tokens))))
    return trees


def row_outputs(row: Row, tree: TokenTree) -> list[int]:
    """The index (0-based, among the new tokens) of the token each choice row decides:
    row 0 (after the pending end) the next new token, row 1 + i the one after node i."""
    generated = len(row.tokens) - row.prompt_length
    return [generated] + [generated + depth + 1 for depth in tree.depths]


def node_uniforms(row: Row, tree: TokenTree) -> torch.Tensor | None:
    """The uniform of each choice row (sampling only): row 0 decides the next new token,
    row 1 + i the token after node i; a row deciding new token p uses ``u_p``."""
    if row.uniforms is None:
        return None
    last = row.uniforms.shape[0] - 1
    index = torch.tensor([min(r, last) for r in row_outputs(row, tree)],
                         device=row.uniforms.device)
    return row.uniforms[index]


def verify(session: Session, verifications: list[VerificationTree]
           ) -> tuple[list[Acceptance], torch.Tensor | None, torch.Tensor | None]:
    """One target pass over every live row's pending token + tree, the target's choice at
    every node (its generation-config rules and sampling applied per row), acceptance."""
    stats, rows = session.stats, session.live
    trees = [verification.tree for verification in verifications]
    with _Timer(stats, "time_verify"):
        items = [(row.tokens[length:], tree)
                 for row, length, tree in zip(rows, session.target.cache.host_lengths, trees)]
        logits = forward_rows(session.target, items)
        if not session.sampling.do_sample and all(row.rules is None for row in rows):
            choices = logits.argmax(dim=-1)
        else:
            choices = torch.zeros(logits.shape[:2], dtype=torch.int64, device=logits.device)
            for b, (row, tree) in enumerate(zip(rows, trees)):
                row_logits = logits[b, :len(tree) + 1]
                if row.rules is not None:
                    row_logits = row.rules.apply(row_logits, row, tree)
                choices[b, :len(tree) + 1] = choose_tokens(row_logits, session.sampling,
                                                           node_uniforms(row, tree))
        result = accept_rows(trees, choices, session.sampling.do_sample, stats)
    stats.target_passes += 1
    for row in rows:
        row.stats.target_passes += 1
    return result


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


def compact_caches(session: Session, outcomes: list[Acceptance],
                   accepted_idx: torch.Tensor | None, accepted_len: torch.Tensor | None,
                   committed_from: list[int], accepted_draft: list[int],
                   drafts: list[tuple[list[int], int | None]]) -> None:
    """Keep each row's accepted path's K/V in the target cache (moved behind its pending
    token in one ``compact_kv`` over all layers and rows); roll each row's draft cache back
    to the draft tokens the target accepted (a row whose draft did not run this step keeps
    its draft cache, all committed tokens, until the next draft pass catches up)."""
    target = session.target
    pending = [start - length for start, length in zip(committed_from,
                                                       target.cache.host_lengths)]
    target.cache.commit(pending, accepted_idx, accepted_len,
                        [len(outcome.path) for outcome in outcomes], target.backend)
    if session.draft is not None and any(cached is not None for _, cached in drafts):
        lengths = [start + min(cached, accepted) if cached is not None else length
                   for start, accepted, (_, cached), length in
                   zip(committed_from, accepted_draft, drafts, session.draft.cache.host_lengths)]
        session.draft.cache.truncate(lengths)


# ============================================================================ the loop


def plan_step(row: Row, config: OuroborosConfig, batch: int = 1) -> StepPlan:
    """The tree of the row's next step: its planner's choice for a row of a batch of
    ``batch`` live rows (adaptive trees), else the configuration's; counted in the row's
    ``stats.shapes``."""
    plan = row.planner.plan(len(row.tokens), batch) if row.planner is not None \
        else fixed_plan(config)
    shapes = row.stats.shapes
    shapes[plan.label] = shapes.get(plan.label, 0) + 1
    return plan


def decode_step(session: Session) -> list[list[int]]:
    """One Ouroboros step of every live row; returns each row's accepted tokens (path +
    bonus)."""
    rows, config = session.live, session.config
    plans = [plan_step(row, config, len(rows)) for row in rows]
    committed_from = [len(row.tokens) for row in rows]
    # Tokens a step may still emit besides the bonus: drafting further is wasted work.
    budgets = [row.max_new_tokens - (len(row.tokens) - row.prompt_length) - 1 for row in rows]
    draft_budgets = [min(plan.gamma, budget) for plan, budget in zip(plans, budgets)]
    before = [(row.stats.draft_passes, row.stats.draft_phrase_tokens) for row in rows]
    drafts = draft_phase(session, draft_budgets, [plan.draft_phrases for plan in plans]) \
        if session.draft is not None and any(b > 0 for b in draft_budgets) \
        else [([], None)] * len(rows)
    verifications = build_trees(session, [tokens for tokens, _ in drafts], budgets, plans)
    outcomes, accepted_idx, accepted_len = verify(session, verifications)
    counted = [count_accepted(row.stats, verification, outcome)
               for row, verification, outcome in zip(rows, verifications, outcomes)]
    compact_caches(session, outcomes, accepted_idx, accepted_len, committed_from,
                   [accepted for accepted, _, _ in counted], drafts)
    chunks, updates = [], []
    for b, (row, verification, outcome) in enumerate(zip(rows, verifications, outcomes)):
        chunk = outcome.path_tokens + [outcome.bonus]
        row.tokens.extend(chunk)
        chunks.append(chunk)
        if session.pool is not None:
            window_ngrams = row.target_window.advance(
                verification.window_nodes, lambda node, c=outcome.choices: c[node + 1]) \
                if verification.window_nodes is not None else []
            updates.append(pool_update(config, row.tokens, verification, outcome.choices,
                                       counted[b][0], committed_from[b], window_ngrams))
    if updates:
        with _Timer(session.stats, "time_pool"):
            apply_pool_updates(session.pool, updates, session.device)
        for row, update in zip(rows, updates):
            row.stats.refinements += len(update.refine_keys)
            row.stats.inspiration_ngrams += update.inspiration_ngrams
            row.stats.window_ngrams += update.window_ngrams
            row.stats.output_ngrams += update.output_ngrams
    for b, row in enumerate(rows):
        if row.planner is None:
            continue
        accepted_draft, from_suffixes, from_roots = counted[b]
        drafted = len(drafts[b][0])
        row.planner.observe(plans[b], StepObservation(
            drafted=drafted, accepted_draft=accepted_draft, suffix_tokens=from_suffixes,
            suffixes_in_context=accepted_draft == drafted < budgets[b],
            root_tokens=from_roots, draft_passes=row.stats.draft_passes - before[b][0],
            phrase_tokens=row.stats.draft_phrase_tokens - before[b][1]))
    return chunks


def _finish(session: Session, row: Row, reason: str, start: float) -> None:
    row.done = True
    del row.tokens[row.prompt_length + len(row.generated):]
    stats, total = row.stats, session.stats
    stats.finish_reason = "context" if reason == "length" and row.context_limited else reason
    stats.new_tokens = len(row.generated)
    stats.prefill_passes = total.prefill_passes
    stats.host_reads = total.host_reads
    for name in ("time_draft", "time_verify", "time_pool", "time_prefill"):
        setattr(stats, name, getattr(total, name))
    stats.time_total = time.perf_counter() - start


def run_generation(session: Session,
                   streamer: Callable[[int, list[int]], None] | None = None,
                   make_step: Callable | None = None) -> None:
    """Prefill both models with every row's prompt, then `decode_step` until each row's
    stop rules fire; a finished row leaves the caches' batch. ``streamer(row.index, chunk)``
    gets each row's emitted tokens as soon as they are committed. ``make_step(session)``
    (after the prefill) gives another step function (`ouroboros.device_step.DeviceStepper`:
    called like `decode_step`, told by ``keep(rows)`` which rows remain). Fills each row's
    ``tokens`` (prompt + new), ``generated`` and ``stats``, and the session's totals."""
    stats = session.stats
    start = time.perf_counter()
    session.live = [row for row in session.rows if not row.done]
    prompts = [row.tokens[:row.prompt_length - 1] for row in session.live]
    if any(prompts):
        prefill_rows(session.target, prompts)
        stats.prefill_passes += 1
        if session.draft is not None:
            with _Timer(stats, "time_draft"):
                prefill_rows(session.draft, prompts)
    stats.time_prefill = time.perf_counter() - start
    step = make_step(session) if make_step is not None and session.live else decode_step
    while session.live:
        chunks = step(session)
        for row, chunk in zip(session.live, chunks):
            emitted, reason = row.stop_rules.clip_reason(row.generated, chunk)
            row.generated += emitted
            if streamer is not None and emitted:
                streamer(row.index, emitted)
            if reason is not None:
                _finish(session, row, reason, start)
        if any(row.done for row in session.live):
            keep = [b for b, row in enumerate(session.live) if not row.done]
            session.target.cache.keep_rows(keep)
            if session.draft is not None:
                session.draft.cache.keep_rows(keep)
            if step is not decode_step:
                step.keep(keep)
            session.live = [session.live[b] for b in keep]
    stats.time_total = time.perf_counter() - start
    for row in session.rows:
        stats.add(row.stats)
