"""The static-shape decoding step (``OuroborosConfig(step="device")``): one host read per step.

The host step (`ouroboros.generate.decode_step`) builds each tree on the host from pool
lookups read back with ``.tolist()`` and reads every acceptance; a GPU then idles at every
read. This step keeps the step on the device (docs/architecture.md §9):

* **One fixed tree per configuration.** Column 0 is the pending token (the last committed
  one); then the γ draft tokens as a chain; then R root phrases of L tokens hanging from
  the pending token; then K suffixes of L tokens hanging from the last draft token. The
  parents, depths and the packed mask are built once (`TreeLayout`); a missing phrase is
  fed as token 0 and marked -1 for the acceptance (never accepted), and a node past the
  row's last position (near ``max_new_tokens``) is fed at a clamped position and marked
  -1 too. Every pass of every step has the same shapes ``[B, T]`` (per batch size).
* **On the device:** the draft chain (γ draft passes, each feeding the previous token; the
  first also catches up on the row's pending tokens, padded to L + 2), the pool lookups
  (one batched lookup for the root phrases and the suffixes), the target's choices, the
  acceptance, the KV compaction, and the pool updates (refinement, inspiration, n-grams
  of the committed text, built as padded tensors: the pool skips rows holding -1).
* **One host read** (`ouroboros.generate.host_read`): the accepted lengths, the bonus
  tokens and the accepted nodes and tokens of every row, for stopping, streaming and the
  host's copies of the lengths.

Supported: a draft model (γ >= 1) drafting token by token (``draft_phrases == 0``) or no
draft (γ = 0: greedy, or K suffixes keyed by the last committed token), K suffixes and R
root phrases, no window, greedy decoding or sampling (the same uniform per output position
as the host step: a seed gives the same text with both steps), fixed trees, no
generation-config rules (`unsupported` says what is not). Exactness is the same argument
as for the host step: a token is emitted only when the target chose it in exactly that
context.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import ouroboros_kernels
from ouroboros.generate import Session, _call, _Timer, host_read
from ouroboros.sampling import choose_tokens

__all__ = ["DeviceStepper", "TreeLayout", "unsupported"]


def unsupported(config, sampling, rules: bool, planner: bool) -> str | None:
    """Why the device step cannot run this call (None: it can)."""
    if config.use_draft and config.draft_phrases:
        return "it drafts token by token (draft_phrases=0)"
    if config.window:
        return "it has no Jacobi window (window=False)"
    if rules:
        return ("it applies no generation-config rules (repetition penalty, suppressed "
                "tokens, ...)")
    if planner:
        return "its tree is fixed (adaptive=False)"
    return None


@dataclass
class TreeLayout:
    """The fixed target tree of γ draft tokens, R root phrases and K suffixes of L tokens.

    Attributes (on ``device``):
        parents: ``int32[N]`` parent of tree node i (-1: the pending token), N = γ + (R + K) L.
        depths: ``int64[T]`` depth of every column (the pending token: 0), T = 1 + N.
        tree_mask: ``int32[1, T, W]`` packed ancestor mask of the columns.
        choice_of_parent: ``int64[(R + K) L]`` index into the choices ``[B, T]`` of the choice
            after each phrase node's parent (the target's version of that node's token).
    """

    gamma: int
    roots: int
    suffixes: int
    length: int
    parents: torch.Tensor
    depths: torch.Tensor
    tree_mask: torch.Tensor
    choice_of_parent: torch.Tensor

    @classmethod
    def build(cls, gamma: int, roots: int, suffixes: int, length: int,
              device: torch.device) -> TreeLayout:
        parents = list(range(-1, gamma - 1))
        for _ in range(roots):
            parents += [-1] + [len(parents) + j for j in range(length - 1)]
        for _ in range(suffixes):
            parents += [gamma - 1] + [len(parents) + j for j in range(length - 1)]
        columns = [-1] + [p + 1 for p in parents]  # the pending token is column 0
        mask, depths = ouroboros_kernels.build_tree(torch.tensor(columns, dtype=torch.int32,
                                                                 device=device))
        phrase_parents = parents[gamma:]
        return cls(gamma, roots, suffixes, length,
                   torch.tensor(parents, dtype=torch.int32, device=device),
                   depths.to(torch.int64), mask[None],
                   torch.tensor([p + 1 for p in phrase_parents], dtype=torch.int64,
                                device=device))

    @property
    def num_columns(self) -> int:
        return 1 + self.gamma + (self.roots + self.suffixes) * self.length


class DeviceStepper:
    """Runs `step` for the live rows of a session; keeps the device copy of every live row's
    tokens ``tokens: int64[B, S_max]`` (rows follow the caches' batch order)."""

    def __init__(self, session: Session) -> None:
        config, device = session.config, session.device
        self.session = session
        self.layout = TreeLayout.build(config.gamma, config.root_phrases, config.num_suffixes,
                                       config.phrase_len, device)
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

    def keep(self, rows: list[int]) -> None:
        """The live rows ``rows`` remain (as `StaticKVCache.keep_rows`)."""
        index = torch.tensor(rows, dtype=torch.int64, device=self.tokens.device)
        self.tokens = self.tokens.index_select(0, index)
        self.last_positions = self.last_positions.index_select(0, index)
        if self.uniforms is not None:
            self.uniforms = self.uniforms.index_select(0, index)

    # ------------------------------------------------------------------ the step

    def _draft_chain(self) -> torch.Tensor:
        """γ draft tokens per row ``int64[B, γ]``: the first pass catches up on each row's
        pending tokens (padded to L + 2 columns), the others feed the previous token."""
        session, layout = self.session, self.layout
        runner, device = session.draft, self.tokens.device
        rows = session.live
        starts = runner.cache.lengths.to(torch.int64)  # [B] on the device
        counts = [len(row.tokens) - length
                  for row, length in zip(rows, runner.cache.host_lengths)]
        width = self.pending_width
        if max(counts) > width:
            raise RuntimeError(f"device step: {max(counts)} pending draft tokens > {width}")
        count = torch.tensor(counts, dtype=torch.int64, device=device)
        columns = torch.arange(width, device=device)
        fed = columns[None, :] < count[:, None]
        index = (starts[:, None] + columns[None, :]).clamp(max=self.tokens.shape[1] - 1)
        input_ids = torch.where(fed, self.tokens.gather(1, index), 0)
        positions = torch.where(fed, starts[:, None] + columns[None, :], starts[:, None])
        positions = torch.minimum(positions, self.last_positions[:, None])
        # Each fed token sees the fed ones before it; a padding column only itself.
        visible = (columns[None, None, :] <= columns[None, :, None]) & fed[:, :, None] | \
            torch.eye(width, dtype=torch.bool, device=device)[None]
        mask = ouroboros_kernels.pack_tree_mask(visible)
        logits = _call(runner, input_ids, positions, mask, False, width)
        last = logits.gather(1, (count - 1)[:, None, None].expand(-1, 1, logits.shape[2]))
        drafted = [last[:, 0].argmax(dim=-1)]
        runner.cache.commit(counts)
        for _ in range(layout.gamma - 1):
            positions = torch.minimum(runner.cache.lengths.to(torch.int64),
                                      self.last_positions)[:, None]
            logits = _call(runner, drafted[-1][:, None], positions, None, True, 1)
            drafted.append(logits[:, 0].argmax(dim=-1))
            runner.cache.commit(1)
        session.stats.draft_passes += layout.gamma
        return torch.stack(drafted, dim=1)

    def __call__(self, session: Session) -> list[list[int]]:
        """One step of every live row; returns each row's accepted tokens (path + bonus)."""
        layout, stats, rows = self.layout, session.stats, session.live
        config, device = session.config, self.tokens.device
        gamma, length = layout.gamma, layout.length
        num_rows = len(rows)
        committed_from = [len(row.tokens) for row in rows]
        before = session.target.cache.lengths.to(torch.int64)  # = committed - 1
        last_token = self.tokens.gather(1, before[:, None])  # [B, 1], the pending token
        if session.draft is not None:
            with _Timer(stats, "time_draft"):
                drafted = self._draft_chain()
        else:  # no draft model: suffixes keyed by the last committed token
            drafted = last_token[:, :0]
        end_token = drafted[:, -1] if gamma else last_token[:, 0]
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
            parts.append(found.flatten(1))
        with _Timer(stats, "time_verify"):
            nodes = torch.cat(parts, dim=1)  # [B, N], -1: no phrase
            positions = before[:, None] + layout.depths[None]
            beyond = positions > self.last_positions[:, None]
            positions = torch.minimum(positions, self.last_positions[:, None])
            input_ids = torch.cat([last_token, nodes.clamp(min=0)], dim=1)
            logits = _call(session.target, input_ids, positions, layout.tree_mask, False,
                           layout.num_columns)
            sampled = session.sampling.do_sample
            if sampled:  # the choice after column c decides new token `generated + depth(c)`
                generated = torch.tensor([len(row.tokens) - row.prompt_length for row in rows],
                                         dtype=torch.int64).to(device)
                index = (generated[:, None] + layout.depths[None]).clamp(
                    max=self.uniforms.shape[1] - 1)
                choices = choose_tokens(logits.flatten(0, 1), session.sampling,
                                        self.uniforms.gather(1, index).flatten())
                choices = choices.view(num_rows, -1)
            else:
                choices = logits.argmax(dim=-1)  # [B, T]
            candidates = torch.where(beyond[:, 1:], -1, nodes)
            rule = ouroboros_kernels.accept_sampled if sampled \
                else ouroboros_kernels.accept_greedy
            if nodes.shape[1]:
                accepted_idx, accepted_len, bonus = rule(candidates, layout.parents, choices)
            else:  # greedy decoding: the tree is the pending token alone
                accepted_idx = nodes.to(torch.int32)
                accepted_len = torch.zeros(num_rows, dtype=torch.int32, device=device)
                bonus = choices[:, 0]
            path_tokens = nodes.gather(1, accepted_idx.clamp(min=0).to(torch.int64))
            num_nodes = nodes.shape[1]
            host = host_read(torch.cat([accepted_len.to(torch.int64), bonus,
                                        accepted_idx.flatten().to(torch.int64),
                                        path_tokens.flatten()]), stats)  # the one read
        lengths, bonuses = host[:num_rows], host[num_rows:2 * num_rows]
        base = 2 * num_rows
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
            session.draft.cache.truncate([start + min(gamma - 1, a)
                                          for start, a in zip(committed_from, accepted_draft)])
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
            self._count(row, paths[b], accepted_draft[b])
        if session.pool is not None:
            with _Timer(stats, "time_pool"):
                self._update_pool(config, drafted, last_token, end_token, choices, found,
                                  slots, beyond, accepted_idx, accepted_len, committed_from)
            self._tally(config, committed_from, chunks, accepted_draft)
        return chunks

    def _count(self, row, path: list[int], accepted_draft: int) -> None:
        layout = self.layout
        stats = row.stats
        gamma, root_end = layout.gamma, layout.gamma + layout.roots * layout.length
        stats.target_passes += 1
        if self.session.draft is not None:
            stats.draft_passes += gamma
            stats.draft_tokens += gamma
        stats.accepted_draft_tokens += accepted_draft
        from_roots = sum(1 for n in path if gamma <= n < root_end)
        from_suffixes = sum(1 for n in path if n >= root_end)
        stats.suffix_tokens += from_roots + from_suffixes
        stats.root_phrase_tokens += from_roots
        label = f"g{gamma} K{layout.suffixes} R{layout.roots} P0"
        stats.shapes[label] = stats.shapes.get(label, 0) + 1

    def _update_pool(self, config, drafted, last_token, end_token, choices, found, slots,
                     beyond, accepted_idx, accepted_len, committed_from) -> None:
        """Refinement, inspiration and committed-text n-grams as padded tensors (rows with
        -1 are skipped by the pool), written as the host step writes them: every
        refinement, then each row's inserts in row order."""
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
            corrected = choices[:, layout.choice_of_parent].view(num_rows, phrases, length)
            in_tree = ~beyond[:, 1 + gamma:].view(num_rows, phrases, length).any(dim=2)
            at_root = torch.arange(phrases, device=device) < layout.roots
            in_context = at_root[None, :] | (accepted_draft == gamma)[:, None]
            changed = (corrected != found).any(dim=2)
            refine = (found[:, :, 0] >= 0) & in_tree & in_context & changed
            keys = torch.cat([last_token.expand(-1, layout.roots),
                              end_token[:, None].expand(-1, layout.suffixes)], dim=1)
            keys = torch.where(refine, keys, -1)
            pool.refine(keys.flatten(), torch.where(refine, slots, -1).flatten(),
                        corrected.flatten(0, 1))
        inserts = []
        if config.inspiration and gamma:
            # [token before the rejection, the target's choices from there to the end].
            texts = torch.cat([last_token, drafted], dim=1)  # [B, 1 + γ]
            before = texts.gather(1, accepted_draft[:, None])
            columns = accepted_draft[:, None] + torch.arange(gamma + 1, device=device)
            valid = (columns <= gamma) & ~beyond[:, :1 + gamma].gather(
                1, columns.clamp(max=gamma))
            followed = torch.where(valid, choices.gather(1, columns.clamp(max=gamma)), -1)
            sequence = torch.cat([before, followed], dim=1)  # [B, γ + 2]
            windows = sequence.unfold(1, length + 1, 1)  # [B, γ + 2 - L, L + 1]
            rejected = (accepted_draft < gamma)[:, None, None]
            inserts.append(torch.where(rejected, windows, -1))
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

    def _tally(self, config, committed_from, chunks, accepted_draft) -> None:
        """Pool counters of the stats from what the host knows (no read): the committed-text
        n-grams and, with a rejected draft, the inspiration n-grams (refinements are not
        counted: that would take a read)."""
        gamma, length = self.layout.gamma, self.layout.length
        for row, start, chunk in zip(self.session.live, committed_from, chunks):
            if config.pool_from_output:
                row.stats.output_ngrams += start + len(chunk) - max(0, start - length) - length
        for row, accepted in zip(self.session.live, accepted_draft):
            if config.inspiration and gamma and accepted < gamma:
                row.stats.inspiration_ngrams += max(0, gamma - accepted + 2 - length)
