"""The static-shape decoding step (``OuroborosConfig(step="device")``): one host read per step.

The host step (`ouroboros.generate.decode_step`) builds each tree on the host from pool
lookups read back with ``.tolist()`` and reads every acceptance; a GPU then idles at every
read. This step keeps the step on the device (docs/architecture.md §9):

* **One target tree per shape** (`TreeLayout`, built once per γ, R, K). Column 0 is the pending
  token (the last committed one); then γ draft slots as a chain; then R root phrases of L
  tokens hanging from the pending token; then K suffixes of L tokens hanging from the
  row's last draft token; then the target's Jacobi window (lookahead decoding's branch,
  L rows of ``window_size`` columns) hanging from the pending token. Every pass of every
  step has the same shapes ``[B, T]`` (per batch size). A missing phrase, a draft slot past
  the row's draft, and a node past the row's last position (near ``max_new_tokens``) are
  fed as token 0 at a clamped position and offered as -1: never accepted.
* **The draft on the device.** Token by token (``draft_phrases == 0``): γ passes of one
  token (the first also catches up on the row's pending tokens, padded to L + 2 columns).
  Phrase by phrase (``draft_phrases == P``): each pass feeds the row's last token and the P
  pool phrases keyed by it (one batched lookup) [and the draft's Jacobi window], keeps the
  longest path the draft agrees with and the draft's next token, so a row advances by one
  or more tokens per pass,
  all decided on the device (`StaticKVCache.commit_on_device`). Without a read the step
  cannot stop when every row has its γ tokens, so it runs a number of passes chosen on the
  host from the advance measured in earlier steps (`DeviceStepper.passes`): rows that
  advance less than expected verify a shorter draft, never a wrong one.
* **On the device as well:** the pool lookups of the target tree, the target's choices
  (argmax, or sampling with each column's uniform gathered on the device), the
  acceptance, the KV compaction, the window's next iterate, and the pool updates
  (refinement, inspiration, window n-grams and n-grams of the committed text, built as
  padded tensors: the pool skips rows holding -1).
* **One host read** (`ouroboros.generate.host_read`): the accepted lengths, the bonus
  tokens, the accepted nodes and tokens of every row, and each row's draft length and
  draft counters, for stopping, streaming, the caches' host lengths and the stats.

Supported: every preset (greedy, speculative, lookahead, ouroboros), the Jacobi window in
the target (without a draft model) or in the draft's passes, adaptive trees (each row's
planner picks its plan on the host from what earlier reads told it; the step's layout is
the widest plan of the batch, built once per shape, and each row offers -1 where it wants
less), greedy decoding or sampling (the same uniform per output position as the host step:
a seed gives the same text with both steps). Not supported (`unsupported` says so):
generation-config rules. Exactness is the same argument as for the host step: a token is
emitted only when the target chose it in exactly that context.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

import ouroboros_kernels
from ouroboros.adaptive import StepObservation
from ouroboros.generate import Session, _call, _Timer, host_read, plan_step
from ouroboros.sampling import choose_tokens

__all__ = ["DeviceStepper", "TreeLayout", "unsupported"]


def unsupported(rules: bool) -> str | None:
    """Why the device step cannot run a call (None: it can); ``rules``: whether a row applies
    generation-config rules."""
    if rules:
        return ("it applies no generation-config rules (repetition penalty, suppressed "
                "tokens, ...)")
    return None


def _chain_parents(start: int, count: int, parent: int) -> list[int]:
    """Parents of ``count`` nodes forming a chain under ``parent``, numbered from ``start``."""
    return [parent if j == 0 else start + j - 1 for j in range(count)]


def _window_parents(start: int, size: int, rows: int) -> list[int]:
    """Parents of a Jacobi window of ``rows`` x ``size`` cells numbered row by row from
    ``start``: row 0 a chain under the pending end (-1), cell ``[j][c]`` under ``[j-1][c]``."""
    parents = _chain_parents(start, size, -1)
    for j in range(1, rows):
        parents += [start + (j - 1) * size + c for c in range(size)]
    return parents


@dataclass
class TreeLayout:
    """The fixed target tree: γ draft slots, R root phrases and K suffixes of L tokens, and
    a Jacobi window of L rows by S columns.

    Node numbering (the acceptance's, column = node + 1): draft slots ``[0, γ)``, root
    phrases ``[γ, γ + RL)``, suffixes ``[γ + RL, γ + (R + K)L)``, then the window row by row
    (cell ``[j][c]`` at node ``window_start + j S + c``; row 0 is a chain under the pending
    token, cell ``[j][c]`` hangs from ``[j - 1][c]``).

    The suffixes are laid out hanging from the last draft slot; a row whose draft is
    shorter (``c < γ`` tokens) gets them under its slot ``c - 1`` (`for_rows`).

    Attributes (on ``device``):
        parents: ``int64[N]`` parent of tree node i (-1: the pending token), N = T - 1.
        depths: ``int64[T]`` depth of every column (the pending token: 0), T = 1 + N.
        visible: ``bool[T, T]`` column i sees column j (itself and its ancestors).
        tree_mask: ``int32[1, T, ceil(T/32)]`` packed `visible`.
        choice_of_parent: ``int64[(R + K) L]`` index into the choices ``[B, T]`` of the choice
            after each phrase node's parent (the target's version of that node's token).
        suffix_columns: ``bool[T]`` the columns of the suffixes.
    """

    gamma: int
    roots: int
    suffixes: int
    length: int
    window_size: int
    parents: torch.Tensor
    depths: torch.Tensor
    visible: torch.Tensor
    tree_mask: torch.Tensor
    choice_of_parent: torch.Tensor
    suffix_columns: torch.Tensor

    @classmethod
    def build(cls, gamma: int, roots: int, suffixes: int, length: int, device: torch.device,
              window_size: int = 0) -> TreeLayout:
        parents = _chain_parents(0, gamma, -1)
        for _ in range(roots):
            parents += _chain_parents(len(parents), length, -1)
        for _ in range(suffixes):
            parents += _chain_parents(len(parents), length, gamma - 1)
        if window_size:
            parents += _window_parents(len(parents), window_size, length)
        columns = [-1] + [p + 1 for p in parents]  # the pending token is column 0
        mask, depths = ouroboros_kernels.build_tree(torch.tensor(columns, dtype=torch.int32,
                                                                 device=device),
                                                    validate=False)  # valid by construction
        phrase_parents = parents[gamma:gamma + (roots + suffixes) * length]
        suffix_columns = torch.zeros(len(columns), dtype=torch.bool, device=device)
        first = 1 + gamma + roots * length
        suffix_columns[first:first + suffixes * length] = True
        return cls(gamma, roots, suffixes, length, window_size,
                   torch.tensor(parents, dtype=torch.int64, device=device),
                   depths.to(torch.int64),
                   ouroboros_kernels.unpack_tree_mask(mask, len(columns)), mask[None],
                   torch.tensor([p + 1 for p in phrase_parents], dtype=torch.int64,
                                device=device),
                   suffix_columns)

    @property
    def num_columns(self) -> int:
        return len(self.depths)

    @property
    def window_start(self) -> int:
        """The node of the window's cell ``[0][0]``."""
        return self.gamma + (self.roots + self.suffixes) * self.length

    @property
    def window_depth(self) -> int:
        """Levels the window spans below the pending token (0: no window)."""
        return self.window_size + self.length - 1 if self.window_size else 0

    def for_rows(self, drafted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                       torch.Tensor]:
        """Per-row ``(parents [B, N], depths [B, T], tree_mask [B, T, W])`` for rows whose
        drafts hold ``drafted: int64[B]`` tokens (the suffixes hang from slot
        ``drafted - 1``, or from the pending token without a draft)."""
        batch = drafted.shape[0]
        shift = (self.gamma - drafted)[:, None]  # levels the suffixes move up
        depths = self.depths[None] - shift * self.suffix_columns[None]
        roots = torch.zeros_like(self.parents, dtype=torch.bool)
        first = self.gamma + self.roots * self.length
        roots[first:first + self.suffixes * self.length:self.length] = True
        parents = torch.where(roots[None], (drafted - 1)[:, None], self.parents[None])
        slot = torch.arange(self.num_columns, device=drafted.device) - 1  # draft slot of col
        unused = (slot[None] >= drafted[:, None]) & (slot[None] < self.gamma) & \
            (slot[None] >= 0)  # [B, T]: draft columns past the row's draft
        visible = self.visible[None] & ~(self.suffix_columns[None, :, None] & unused[:, None])
        return parents.expand(batch, -1), depths, ouroboros_kernels.pack_tree_mask(visible)


class DeviceStepper:
    """Runs `step` for the live rows of a session; keeps on the device every live row's
    tokens ``tokens: int64[B, S_max]`` (rows follow the caches' batch order) and, with a
    window, its Jacobi iterate ``window: int64[B, L, S]``."""

    # Draft passes per step when drafting phrase by phrase: ceil(γ / advance), with the
    # advance (tokens per pass) measured over the batch and smoothed with this weight.
    ADVANCE_WEIGHT = 0.5

    def __init__(self, session: Session) -> None:
        config, device = session.config, session.device
        self.session = session
        self._window_size = config.window_size if config.window and session.draft is None \
            else 0
        self._layouts: dict[tuple[int, int, int], TreeLayout] = {}
        self._pass_trees: dict[int, tuple] = {}
        self._use_layout(config.gamma, config.root_phrases, config.num_suffixes)
        rows = session.live
        width = max(len(row.tokens) + row.max_new_tokens for row in rows) + 1
        tokens = torch.zeros(len(rows), width, dtype=torch.int64)
        for b, row in enumerate(rows):
            tokens[b, :len(row.tokens)] = torch.tensor(row.tokens)
        self.tokens = tokens.to(device)
        self.last_positions = torch.tensor([row.last_position for row in rows],
                                           dtype=torch.int64, device=device)
        self.pending_width = config.phrase_len + 2  # most tokens the draft catches up on
        # Sampling: every row's uniforms u_p (one per output position), [B, U].
        self.uniforms = torch.stack([row.uniforms for row in rows]) \
            if session.sampling.do_sample else None
        drafting = session.draft is not None
        self.window = torch.tensor([row.target_window.rows for row in rows],
                                   dtype=torch.int64).to(device) \
            if config.window and not drafting else None
        self.draft_window = torch.tensor([row.draft_window.rows for row in rows],
                                         dtype=torch.int64).to(device) \
            if config.window and drafting else None
        self._use_pass_tree(config.draft_phrases if drafting else 0)
        self._phrase_mask: torch.Tensor | None = None  # [B, P]: phrases each row tries
        self.advance = 1.0  # draft tokens per pass, as measured so far (phrase drafting)

    def keep(self, rows: list[int]) -> None:
        """The live rows ``rows`` remain (as `StaticKVCache.keep_rows`)."""
        index = torch.tensor(rows, dtype=torch.int64, device=self.tokens.device)
        self.tokens = self.tokens.index_select(0, index)
        self.last_positions = self.last_positions.index_select(0, index)
        if self.uniforms is not None:
            self.uniforms = self.uniforms.index_select(0, index)
        if self.window is not None:
            self.window = self.window.index_select(0, index)
        if self.draft_window is not None:
            self.draft_window = self.draft_window.index_select(0, index)

    def passes(self, budget: int) -> int:
        """Draft passes of this step: ``budget`` (the most draft tokens a row may use) token
        by token; phrase by phrase, enough for ``budget`` tokens at the measured advance."""
        if not self.phrases and self.draft_window is None:
            return max(budget, 1)
        return max(1, min(budget, math.ceil(budget / self.advance - 1e-9)))

    # ------------------------------------------------------------------ the draft

    def _use_layout(self, gamma: int, roots: int, suffixes: int) -> None:
        """Make `layout` the target tree of this shape (built once per shape)."""
        key = (gamma, roots, suffixes)
        if key not in self._layouts:
            self._layouts[key] = TreeLayout.build(gamma, roots, suffixes,
                                                  self.session.config.phrase_len,
                                                  self.session.device, self._window_size)
        self.layout = self._layouts[key]

    def _use_pass_tree(self, phrases: int) -> None:
        """Make the draft passes hang ``phrases`` pool phrases (built once per count)."""
        if phrases not in self._pass_trees:
            self._pass_trees[phrases] = self._pass_tree(phrases)
        (self.phrases, self.pass_parents, self.pass_visible, self.pass_depths,
         self.pass_window_start, self.pass_window_size, self.pass_window_depth) = \
            self._pass_trees[phrases]

    def _pass_tree(self, phrases: int) -> tuple:
        """The nodes every draft pass hangs from its last fed token: ``phrases`` pool phrases
        of L tokens (chains), then the draft's Jacobi window (cells as in `TreeLayout`).
        Returns ``(phrases, parents int64[N], visible bool[N, N] (node i sees node j), depths
        int64[N] (1: a child of the fed token), window start, window size, window depth)``."""
        config = self.session.config
        device, length = self.session.device, config.phrase_len
        parents: list[int] = []
        for _ in range(phrases):
            parents += _chain_parents(len(parents), length, -1)
        window_start = len(parents)
        size = config.window_size if config.window and self.session.draft is not None else 0
        if size:
            parents += _window_parents(window_start, size, length)
        tensor = torch.tensor(parents, dtype=torch.int64, device=device)
        if parents:
            mask, depths = ouroboros_kernels.build_tree(tensor.to(torch.int32), validate=False)
            visible = ouroboros_kernels.unpack_tree_mask(mask, len(parents))
            depths = depths.to(torch.int64) + 1
        else:
            visible = torch.zeros(0, 0, dtype=torch.bool, device=device)
            depths = torch.zeros(0, dtype=torch.int64, device=device)
        return (phrases, tensor, visible, depths, window_start, size,
                size + length - 1 if size else 0)

    def _head(self, runner, counts: list[int] | None, last: torch.Tensor | None) -> tuple:
        """What a draft pass feeds before its tree: the first pass, each row's ``counts[b]``
        pending tokens (committed, not yet in the draft cache) padded to L + 2 columns or a
        wider bucket; a later one (``counts`` None), the row's last draft token ``last
        [B]``. Returns ``(input_ids [B, H], positions [B, H], visible [B, H, H], fed [B, H],
        count [B])``."""
        device = self.tokens.device
        starts = runner.cache.lengths.to(torch.int64)
        if counts is None:
            ones = torch.ones(last.shape[0], 1, dtype=torch.bool, device=device)
            return last[:, None], starts[:, None], ones[:, :, None], ones, ones[:, 0].long()
        width = self.pending_width
        while width < max(counts):  # rows that skipped the draft for a while: a wider bucket
            width *= 2
        # ... but no wider than the cache has room for (then exactly the widest row's).
        room = runner.cache.max_length - max(runner.cache.host_lengths) - len(self.pass_parents)
        width = max(min(width, room), max(counts))
        count = torch.tensor(counts, dtype=torch.int64, device=device)
        columns = torch.arange(width, device=device)
        fed = columns[None, :] < count[:, None]
        index = (starts[:, None] + columns[None, :]).clamp(max=self.tokens.shape[1] - 1)
        input_ids = torch.where(fed, self.tokens.gather(1, index), 0)
        positions = torch.where(fed, starts[:, None] + columns[None, :], starts[:, None])
        # Each fed token sees the fed ones before it; a padding column only itself.
        visible = (columns[None, None, :] <= columns[None, :, None]) & fed[:, :, None] | \
            torch.eye(width, dtype=torch.bool, device=device)[None]
        return input_ids, positions, visible, fed, count

    def _with_tree(self, head: tuple, end_token: torch.Tensor) -> tuple:
        """A draft pass's whole input: the ``head`` (`_head`) and, hanging from its last fed
        token ``end_token [B]``, the pool phrases keyed by it and the draft's window. Returns
        ``(input_ids [B, T], positions [B, T], tree_mask [B, T, W], nodes [B, N] (-1: none,
        or past the row's last position), window_fits [B])``."""
        input_ids, positions, visible, fed, count = head
        device = self.tokens.device
        batch, width = input_ids.shape
        parts = []
        if self.phrases:
            found = self._lookup(end_token, self.phrases)
            if self._phrase_mask is not None:  # rows that try fewer phrases this step
                found = torch.where(self._phrase_mask[:, :, None], found, -1)
            parts.append(found.flatten(1))
        if self.draft_window is not None:
            parts.append(self.draft_window.flatten(1))
        nodes = torch.cat(parts, dim=1)
        num_nodes = nodes.shape[1]
        end = positions.gather(1, (count - 1)[:, None])  # [B, 1]: the last fed token's
        node_positions = end + self.pass_depths[None]
        nodes = torch.where(node_positions > self.last_positions[:, None], -1, nodes)
        total = width + num_nodes
        full = torch.zeros(batch, total, total, dtype=torch.bool, device=device)
        full[:, :width, :width] = visible
        full[:, width:, width:] = self.pass_visible[None]
        full[:, width:, :width] = fed[:, None, :]  # every node sees the fed tokens
        window_fits = end[:, 0] + self.pass_window_depth <= self.last_positions
        return (torch.cat([input_ids, nodes.clamp(min=0)], dim=1),
                torch.cat([positions, node_positions], dim=1),
                ouroboros_kernels.pack_tree_mask(full), nodes, window_fits)

    def _lookup(self, keys: torch.Tensor, count: int) -> torch.Tensor:
        """The ``count`` newest pool phrases of each key ``int64[B]``: ``int64[B, count, L]``,
        -1 where there is none."""
        with _Timer(self.session.stats, "time_pool"):
            found, _, _ = self.session.pool.lookup(keys, count)
        return found.to(torch.int64)

    def _advance_draft_window(self, choices: torch.Tensor, head: int, moves: torch.Tensor
                              ) -> None:
        """After a draft pass: the window's n-grams into the pool and its next iterate, for
        the rows where ``moves [B]`` (drafting, and the whole window fitted)."""
        size, length = self.pass_window_size, self.layout.length
        start = head + self.pass_window_start + (length - 1) * size
        outputs = choices[:, start:start + size]  # the draft's choices after the last row
        grams = torch.cat([self.draft_window, outputs[:, None]], dim=1).transpose(1, 2)
        grams = torch.where(moves[:, None, None], grams, -1).flatten(0, 1)
        with _Timer(self.session.stats, "time_pool"):
            self.session.pool.insert(grams[:, 0], grams[:, 1:])
        following = torch.cat([self.draft_window[:, 1:], outputs[:, None]], dim=1)
        self.draft_window = torch.where(moves[:, None, None], following, self.draft_window)

    def _draft_tokens(self, budgets: list[int], pending: list[int]
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each row's draft: ``(draft int64[B, γ] (-1 past the row's draft), drafted int64[B],
        counters int64[B, 3] (passes the row took part in, tree tokens it accepted, window
        n-grams it made))``; ``budgets[b]`` (host) is the most draft tokens row b may use,
        ``pending[b]`` its committed tokens not yet in the draft cache."""
        session, layout = self.session, self.layout
        runner, device = session.draft, self.tokens.device
        gamma = layout.gamma
        num_rows = len(budgets)
        budget = torch.tensor(budgets, dtype=torch.int64, device=device)
        passes = self.passes(max(budgets))
        tree = len(self.pass_parents) > 0
        longest = max(self.layout.length, self.pass_window_depth)  # most tokens a pass adds
        # Draft tokens so far, one spare column past γ for the writes that fall beyond.
        draft = torch.full((num_rows, gamma + longest + 2), -1, dtype=torch.int64,
                           device=device)
        spare = draft.shape[1] - 1
        drafted = torch.zeros(num_rows, dtype=torch.int64, device=device)
        counters = torch.zeros(num_rows, 3, dtype=torch.int64, device=device)
        # Every row catches up in the first pass; drafting rows then hold less than their
        # text and budget (cached: the text and all but the last draft token).
        bounds = [len(row.tokens) + max(b - 1, 0) for row, b in zip(session.live, budgets)]
        for step in range(passes):
            active = drafted < budget  # [B]
            last = None if step == 0 else \
                draft.gather(1, (drafted - 1).clamp(min=0)[:, None])[:, 0].clamp(min=0)
            head = self._head(runner, pending if step == 0 else None, last)
            input_ids, positions, visible, fed, count = head
            width = input_ids.shape[1]
            if tree:
                end_token = input_ids.gather(1, (count - 1)[:, None])[:, 0]
                input_ids, positions, mask, nodes, window_fits = self._with_tree(head,
                                                                                 end_token)
                causal = False
            else:
                mask = None if step else ouroboros_kernels.pack_tree_mask(visible)
                causal = step > 0
            positions = torch.minimum(positions, self.last_positions[:, None])
            logits = _call(runner, input_ids, positions, mask, causal, input_ids.shape[1])
            choices = logits.argmax(dim=-1)  # the draft's greedy choices [B, T]
            end_choice = choices.gather(1, (count - 1)[:, None])  # after the last fed token
            if tree:
                accepted_idx, accepted_len, bonus = ouroboros_kernels.accept_greedy(
                    nodes, self.pass_parents, torch.cat([end_choice, choices[:, width:]], dim=1))
                path = nodes.gather(1, accepted_idx.clamp(min=0).to(torch.int64))
                accepted = accepted_len.to(torch.int64)
                if self.draft_window is not None:
                    moves = active & window_fits
                    self._advance_draft_window(choices, width, moves)
                    counters[:, 2] += moves.to(torch.int64) * self.pass_window_size
            else:
                bonus, accepted = end_choice[:, 0], torch.zeros_like(drafted)
                path = draft[:, :0]
            # New draft tokens: the accepted tree path, then the draft's own next token; cut
            # at the row's budget (the K/V kept: all but the last new token).
            take = torch.where(active, torch.minimum(accepted + 1, budget - drafted), 0)
            new = torch.cat([path, torch.zeros_like(drafted)[:, None]], dim=1)
            new = new.scatter(1, accepted[:, None], bonus[:, None])
            offsets = torch.arange(new.shape[1], device=device)
            columns = torch.where(offsets[None] < take[:, None], drafted[:, None] + offsets,
                                  spare)
            draft.scatter_(1, columns, new)
            draft[:, spare] = -1
            keep = (take - 1).clamp(min=0)  # accepted tree tokens whose K/V stay
            if tree:
                shifted = torch.where(accepted_idx >= 0, accepted_idx.to(torch.int64)
                                      + (width - count)[:, None], -1)
                fed_rows = active | (step == 0)  # the first pass catches every row up
                runner.cache.commit_on_device(torch.where(fed_rows, count, 0), shifted, keep,
                                              bounds, runner.backend)
            else:  # one token per pass: the host knows every row's count
                runner.cache.commit([pending[b] if step == 0 else int(row_budget > step)
                                     for b, row_budget in enumerate(budgets)])
            counters[:, 0] += active.to(torch.int64)
            counters[:, 1] += keep
            drafted = drafted + take
        session.stats.draft_passes += passes
        return draft[:, :gamma], drafted, counters

    # ------------------------------------------------------------------ the step

    def __call__(self, session: Session) -> list[list[int]]:
        """One step of every live row; returns each row's accepted tokens (path + bonus)."""
        stats, rows = session.stats, session.live
        config, device = session.config, self.tokens.device
        num_rows = len(rows)
        committed_from = [len(row.tokens) for row in rows]
        # Each row's tree: its planner's choice (adaptive trees) or the configuration's; the
        # step's layout is the widest of them, and each row offers -1 where it wants less.
        plans = [plan_step(row, config, num_rows) for row in rows]
        remaining = [row.max_new_tokens - (len(row.tokens) - row.prompt_length) - 1
                     for row in rows]  # tokens a step may emit besides the bonus
        drafting = session.draft is not None
        budgets = [min(plan.gamma, left) if drafting else 0
                   for plan, left in zip(plans, remaining)]
        roots = [plan.root_phrases if budget > 0 else 0 for plan, budget in zip(plans, budgets)]
        suffixes = [plan.num_suffixes for plan in plans]
        self._use_layout(max(plan.gamma for plan in plans) if drafting else 0,
                         max(plan.root_phrases for plan in plans), max(suffixes))
        phrase_counts = [plan.draft_phrases for plan in plans] if drafting else [0] * num_rows
        self._use_pass_tree(max(phrase_counts))
        self._phrase_mask = None if min(phrase_counts) == self.phrases else \
            torch.arange(self.phrases)[None] < torch.tensor(phrase_counts)[:, None]
        if self._phrase_mask is not None:
            self._phrase_mask = self._phrase_mask.to(device)
        layout = self.layout
        gamma = layout.gamma
        before = session.target.cache.lengths.to(torch.int64)  # = committed - 1
        last_token = self.tokens.gather(1, before[:, None])  # [B, 1], the pending token
        # Rows that skip the draft leave pending tokens behind; when no row drafts and some
        # are more than the first pass's columns, one pass only catches every row up (so
        # the first pass's width stays bounded).
        draft_before = list(session.draft.cache.host_lengths) if drafting else []  # exact
        pending = [len(row.tokens) - cached for row, cached in zip(rows, draft_before)]
        caught_up = drafting and (max(budgets) > 0 or max(pending) > self.pending_width)
        if caught_up:
            with _Timer(stats, "time_draft"):
                drafted, drafted_len, counters = self._draft_tokens(budgets, pending)
        else:
            drafted = torch.full((num_rows, gamma), -1, dtype=torch.int64, device=device)
            drafted_len = torch.zeros(num_rows, dtype=torch.int64, device=device)
            counters = torch.zeros(num_rows, 3, dtype=torch.int64, device=device)
        # The suffixes' key: the row's last draft token, else its last committed token.
        end_token = last_token[:, 0]
        if gamma:
            end_token = torch.where(drafted_len > 0, drafted.gather(
                1, (drafted_len - 1).clamp(min=0)[:, None])[:, 0], end_token)
        phrases_wanted = max(layout.roots, layout.suffixes)
        parts = [drafted]
        slots = found = None
        if phrases_wanted:
            with _Timer(stats, "time_pool"):
                keys = torch.cat([last_token[:, 0], end_token])
                found, _, slots = session.pool.lookup(keys, phrases_wanted)
                found, slots = found.to(torch.int64), slots.to(torch.int64)
            found = torch.cat([found[:num_rows, :layout.roots],
                               found[num_rows:, :layout.suffixes]], dim=1)  # [B, R+K, L]
            slots = torch.cat([slots[:num_rows, :layout.roots],
                               slots[num_rows:, :layout.suffixes]], dim=1)
            if min(roots) < layout.roots or min(suffixes) < layout.suffixes:
                wanted = torch.tensor(
                    [[r < row_roots for r in range(layout.roots)] +
                     [k < row_suffixes for k in range(layout.suffixes)]
                     for row_roots, row_suffixes in zip(roots, suffixes)]).to(device)
                found = torch.where(wanted[:, :, None], found, -1)
                slots = torch.where(wanted, slots, -1)
            parts.append(found.flatten(1))
        if self.window is not None:
            parts.append(self.window.flatten(1))
        with _Timer(stats, "time_verify"):
            nodes = torch.cat(parts, dim=1)  # [B, N], -1: no token
            if gamma and layout.suffixes:
                parents, depths, tree_mask = layout.for_rows(drafted_len)
            else:
                parents, depths, tree_mask = layout.parents, layout.depths[None], \
                    layout.tree_mask
            positions = before[:, None] + depths
            beyond = positions > self.last_positions[:, None]
            positions = torch.minimum(positions, self.last_positions[:, None])
            input_ids = torch.cat([last_token, nodes.clamp(min=0)], dim=1)
            chain = layout.num_columns == 1 + gamma  # no phrases, no window: causal
            logits = _call(session.target, input_ids, positions, None if chain else tree_mask,
                           chain, layout.num_columns)
            sampled = session.sampling.do_sample
            if sampled:  # the choice after column c decides new token `generated + depth(c)`
                generated = torch.tensor([len(row.tokens) - row.prompt_length for row in rows],
                                         dtype=torch.int64).to(device)
                index = (generated[:, None] + depths).clamp(max=self.uniforms.shape[1] - 1)
                choices = choose_tokens(logits.flatten(0, 1), session.sampling,
                                        self.uniforms.gather(1, index).flatten())
                choices = choices.view(num_rows, -1)
            else:
                choices = logits.argmax(dim=-1)  # [B, T]
            candidates = torch.where(beyond[:, 1:], -1, nodes)
            rule = ouroboros_kernels.accept_sampled if sampled \
                else ouroboros_kernels.accept_greedy
            if nodes.shape[1]:
                accepted_idx, accepted_len, bonus = rule(candidates, parents, choices)
            else:  # greedy decoding: the tree is the pending token alone
                accepted_idx = nodes.to(torch.int32)
                accepted_len = torch.zeros(num_rows, dtype=torch.int32, device=device)
                bonus = choices[:, 0]
            path_tokens = nodes.gather(1, accepted_idx.clamp(min=0).to(torch.int64))
            num_nodes = nodes.shape[1]
            host = host_read(torch.cat([accepted_len.to(torch.int64), bonus, drafted_len,
                                        counters.flatten(),
                                        accepted_idx.flatten().to(torch.int64),
                                        path_tokens.flatten()]), stats)  # the one read
        lengths, bonuses = host[:num_rows], host[num_rows:2 * num_rows]
        draft_lengths = host[2 * num_rows:3 * num_rows]
        row_counters = host[3 * num_rows:6 * num_rows]
        base = 6 * num_rows
        paths = [host[base + b * num_nodes:base + b * num_nodes + lengths[b]]
                 for b in range(num_rows)]
        base += num_rows * num_nodes
        chunks = [host[base + b * num_nodes:base + b * num_nodes + lengths[b]] + [bonuses[b]]
                  for b in range(num_rows)]
        stats.target_passes += 1
        accepted_draft = [sum(1 for j, n in enumerate(path) if n == j < gamma)
                          for path in paths]
        session.target.cache.commit(1, accepted_idx, accepted_len, lengths,
                                    session.target.backend)
        if session.draft is not None:
            session.draft.cache.truncate(  # after a first pass every row is caught up
                [start + min(count - 1, accepted) if budget > 0 else
                 (start if caught_up else old)
                 for start, count, accepted, budget, old in
                 zip(committed_from, draft_lengths, accepted_draft, budgets, draft_before)])
            self._measure_advance(draft_lengths, row_counters[0::3], budgets)
        # The device copy of the tokens: the chunks written behind each row's text.
        widest = max(len(chunk) for chunk in chunks)
        table = torch.tensor([chunk + [chunk[-1]] * (widest - len(chunk)) for chunk in chunks],
                             dtype=torch.int64).to(device)
        columns = torch.tensor([[start + min(j, len(chunk) - 1) for j in range(widest)]
                                for start, chunk in zip(committed_from, chunks)],
                               dtype=torch.int64).to(device)
        self.tokens.scatter_(1, columns, table)
        for b, row in enumerate(rows):
            row.tokens.extend(chunks[b])
            counters = row_counters[3 * b:3 * b + 3]
            from_suffixes, from_roots = self._count(row, paths[b], accepted_draft[b],
                                                    draft_lengths[b], counters)
            if row.planner is not None:
                row.planner.observe(plans[b], StepObservation(
                    drafted=draft_lengths[b], accepted_draft=accepted_draft[b],
                    suffix_tokens=from_suffixes,
                    suffixes_in_context=accepted_draft[b] == draft_lengths[b] < remaining[b],
                    root_tokens=from_roots, draft_passes=counters[0],
                    phrase_tokens=counters[1]))
        window_fits = self._window_fits(committed_from, rows)
        if session.pool is not None:
            with _Timer(stats, "time_pool"):
                self._update_pool(config, drafted, drafted_len, last_token, end_token, choices,
                                  found, slots, beyond, accepted_idx, accepted_len,
                                  committed_from, window_fits)
            self._tally(config, committed_from, chunks, accepted_draft, draft_lengths,
                        window_fits)
        return chunks

    def _window_fits(self, committed_from: list[int], rows) -> list[bool]:
        """Per row: whether the whole window lay within the row's last position (then it
        yields n-grams and moves to its next iterate; a cut window only offers tokens)."""
        depth = self.layout.window_depth
        return [bool(depth) and start - 1 + depth <= row.last_position
                for start, row in zip(committed_from, rows)]

    def _measure_advance(self, draft_lengths: list[int], passes: list[int],
                         budgets: list[int]) -> None:
        """Update the draft tokens per pass from the rows that drafted this step."""
        if not self.phrases and self.draft_window is None:
            return
        total = sum(passes)
        if total:
            observed = sum(n for n, budget in zip(draft_lengths, budgets) if budget) / total
            weight = self.ADVANCE_WEIGHT
            self.advance = max(1.0, (1 - weight) * self.advance + weight * observed)

    def _count(self, row, path: list[int], accepted_draft: int, drafted: int,
               counters: list[int]) -> tuple[int, int]:
        """Tally the row's step in its stats; returns the tokens it accepted from the
        suffixes and from the root phrases."""
        layout = self.layout
        stats = row.stats
        gamma, length = layout.gamma, layout.length
        root_end = gamma + layout.roots * length
        window_start = layout.window_start
        stats.target_passes += 1
        if self.session.draft is not None:
            stats.draft_passes += counters[0]
            stats.draft_tokens += drafted
            stats.draft_phrase_tokens += counters[1]
            stats.window_ngrams += counters[2]
        stats.accepted_draft_tokens += accepted_draft
        from_roots = sum(1 for n in path if gamma <= n < root_end)
        from_suffixes = sum(1 for n in path if root_end <= n < window_start)
        stats.suffix_tokens += from_roots + from_suffixes
        stats.root_phrase_tokens += from_roots
        stats.window_tokens += sum(1 for n in path if n >= window_start)
        return from_suffixes, from_roots

    def _update_pool(self, config, drafted, drafted_len, last_token, end_token, choices, found,
                     slots, beyond, accepted_idx, accepted_len, committed_from,
                     window_fits) -> None:
        """Refinement, inspiration, window n-grams and committed-text n-grams as padded
        tensors (rows with -1 are skipped by the pool), written as the host step writes
        them: every refinement, then each row's inserts in row order."""
        session, layout = self.session, self.layout
        pool, device = session.pool, self.tokens.device
        gamma, length = layout.gamma, layout.length
        num_rows = drafted.shape[0]
        steps = torch.arange(gamma, device=device)
        on_chain = (accepted_idx[:, :gamma].to(torch.int64) == steps) & \
            (steps < accepted_len[:, None])
        accepted_draft = on_chain.to(torch.int64).cumprod(dim=1).sum(dim=1)  # [B]
        phrases = layout.roots + layout.suffixes
        if config.refinement and phrases:
            corrected = self._phrase_choices(choices, drafted_len).view(num_rows, phrases,
                                                                        length)
            first = 1 + gamma
            in_tree = ~beyond[:, first:first + phrases * length].view(
                num_rows, phrases, length).any(dim=2)
            at_root = torch.arange(phrases, device=device) < layout.roots
            in_context = at_root[None, :] | (accepted_draft == drafted_len)[:, None]
            changed = (corrected != found).any(dim=2)
            refine = (found[:, :, 0] >= 0) & in_tree & in_context & changed
            keys = torch.cat([last_token.expand(-1, layout.roots),
                              end_token[:, None].expand(-1, layout.suffixes)], dim=1)
            keys = torch.where(refine, keys, -1)
            pool.refine(keys.flatten(), torch.where(refine, slots, -1).flatten(),
                        corrected.flatten(0, 1))
        inserts = []
        if config.inspiration and gamma and gamma + 2 > length:  # else no n-gram fits
            # [token before the rejection, the target's choices from there to the draft's end].
            texts = torch.cat([last_token, drafted.clamp(min=0)], dim=1)  # [B, 1 + γ]
            before = texts.gather(1, accepted_draft[:, None])
            columns = accepted_draft[:, None] + torch.arange(gamma + 1, device=device)
            valid = (columns <= drafted_len[:, None]) & ~beyond[:, :1 + gamma].gather(
                1, columns.clamp(max=gamma))
            followed = torch.where(valid, choices.gather(1, columns.clamp(max=gamma)), -1)
            sequence = torch.cat([before, followed], dim=1)  # [B, γ + 2]
            windows = sequence.unfold(1, length + 1, 1)  # [B, γ + 2 - L, L + 1]
            rejected = (accepted_draft < drafted_len)[:, None, None]
            inserts.append(torch.where(rejected, windows, -1))
        if self.window is not None:
            # Column c's n-gram: its L guesses and the target's choice after the last one;
            # those choices are the next iterate's last row.
            start = 1 + layout.window_start
            size = layout.window_size
            last_row = choices[:, start + (length - 1) * size:start + length * size]
            grams = torch.cat([self.window, last_row[:, None]], dim=1).transpose(1, 2)
            fits = torch.tensor(window_fits, dtype=torch.bool).to(device)
            inserts.append(torch.where(fits[:, None, None], grams, -1))
            following = torch.cat([self.window[:, 1:], last_row[:, None]], dim=1)
            self.window = torch.where(fits[:, None, None], following, self.window)
        if config.pool_from_output:
            # The n-grams ending in the new tokens: keys at committed_from - L + i.
            count = layout.num_columns
            start = torch.tensor(committed_from, dtype=torch.int64, device=device) - length
            keys = start[:, None] + torch.arange(count, device=device)
            new_end = start + length + accepted_len.to(torch.int64) + 1  # new text length
            valid = (keys >= 0) & (keys + length < new_end[:, None])
            index = (keys[:, :, None] + torch.arange(length + 1, device=device)).clamp(
                min=0, max=self.tokens.shape[1] - 1)
            grams = self.tokens.gather(1, index.flatten(1)).view(num_rows, count, length + 1)
            inserts.append(torch.where(valid[:, :, None], grams, -1))
        if inserts:
            table = torch.cat(inserts, dim=1).flatten(0, 1)  # row-major: row order
            pool.insert(table[:, 0], table[:, 1:])

    def _phrase_choices(self, choices: torch.Tensor, drafted_len: torch.Tensor) -> torch.Tensor:
        """``[B, (R + K) L]``: the target's choice after each phrase node's parent; a row's
        suffixes hang from its last draft token (column ``drafted``)."""
        layout = self.layout
        index = layout.choice_of_parent[None].expand(choices.shape[0], -1)
        if layout.gamma and layout.suffixes:
            roots = layout.roots * layout.length
            column = torch.arange(layout.suffixes * layout.length, device=choices.device)
            first = (column % layout.length == 0)[None]
            index = torch.cat([index[:, :roots], torch.where(first, drafted_len[:, None],
                                                             index[:, roots:])], dim=1)
        return choices.gather(1, index)

    def _tally(self, config, committed_from, chunks, accepted_draft, draft_lengths,
               window_fits) -> None:
        """Pool counters of the stats from what the host knows (no read): the committed-text
        n-grams, the window's n-grams and, with a rejected draft, the inspiration n-grams
        (refinements are not counted: that would take a read)."""
        length = self.layout.length
        for b, (row, start, chunk) in enumerate(zip(self.session.live, committed_from, chunks)):
            if config.pool_from_output:
                row.stats.output_ngrams += start + len(chunk) - max(0, start - length) - length
            drafted = draft_lengths[b]
            if config.inspiration and drafted and accepted_draft[b] < drafted:
                row.stats.inspiration_ngrams += max(0, drafted - accepted_draft[b] + 2 - length)
            if window_fits[b]:
                row.stats.window_ngrams += self.layout.window_size
