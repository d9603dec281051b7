"""Adaptive trees: every step verifies the tree that the running statistics of the sequence
expect to be fastest (docs/architecture.md §2, "Adaptive trees").

A configuration fixes an *envelope*: the largest draft length γ, number of suffixes K,
root phrases R and draft pool phrases P a step may use (the caches are sized for it). An
`AdaptivePlanner` picks, before every step, a `StepPlan` inside that envelope by the
expected tokens per second of `ouroboros.tuning.ThroughputModel`'s step model, with its
priors replaced by what this sequence has shown so far:

* α, the draft's per-token acceptance: accepted draft tokens / (accepted + rejections);
* the yield of the suffixes hanging from the draft's end (or from the committed end without
  a draft), of the root phrases beside the draft, and of the pool phrases tried during
  drafting, each as a coverage: accepted tokens / the tokens the step model expects per
  unit of coverage for that many phrases;

all as exponentially decayed sums (``decay`` per step) seeded with the tuned priors, so old
steps fade, and a mechanism the planner stopped using drifts back to its prior and is tried
again. The costs are the measured cost curves at the current context length (interpolated
between the two prefixes they were measured after).

γ = 0 is a step without the draft model (the pool's phrases keyed by the last token, or a
plain one-token step when K = 0 too). The choice reads only token counts and the cached
measurements, so it is deterministic; it is a few vectorised array operations over the
envelope's plans (tens of microseconds). Whatever it chooses, the output is exactly the
target's greedy output (or its distribution when sampling): the plan only decides which
candidate tokens are verified.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from ouroboros.config import OuroborosConfig
from ouroboros.geometry import draft_pass_tokens, draft_pending, target_pass_tokens

__all__ = ["AdaptivePlanner", "ContextCosts", "SchedulePlanner", "StepObservation", "StepPlan",
           "envelope_plans", "fixed_plan"]

SUFFIX_STEPS = (0, 1, 2, 3, 4, 6, 8, 12, 16)
ROOT_STEPS = (0, 1, 2, 4)
PHRASE_STEPS = (0, 1, 2, 4, 8)


@dataclass(frozen=True)
class StepPlan:
    """The tree of one step: γ draft tokens (0: no draft pass), K suffixes, R root phrases
    beside the draft, P pool phrases per draft pass."""

    gamma: int
    num_suffixes: int
    root_phrases: int = 0
    draft_phrases: int = 0

    def shape(self, config: OuroborosConfig):
        """The `ouroboros.geometry.TreeShape` of this plan under ``config`` (N, window): a
        step without a draft (γ = 0) is a lookahead-like step without a window."""
        from ouroboros.geometry import TreeShape

        if self.gamma == 0:
            return TreeShape(False, 0, config.ngram, self.num_suffixes,
                             window=config.window and not config.use_draft,
                             window_size=config.window_size)
        return TreeShape(True, self.gamma, config.ngram, self.num_suffixes,
                         self.draft_phrases, self.root_phrases, config.window,
                         config.window_size)

    @property
    def label(self) -> str:
        """``"g3 K2 R0 P1"``: how `GenerationStats.shapes` names it."""
        return f"g{self.gamma} K{self.num_suffixes} R{self.root_phrases} P{self.draft_phrases}"


def fixed_plan(config: OuroborosConfig) -> StepPlan:
    """The plan of a configuration without adaptation: its own fields, every step."""
    return StepPlan(config.gamma, config.num_suffixes,
                    config.root_phrases if config.use_draft else 0,
                    config.draft_phrases if config.use_draft else 0)


def _steps(grid: Sequence[int], largest: int) -> list[int]:
    return sorted({value for value in grid if value <= largest} | {largest})


def envelope_plans(config: OuroborosConfig) -> list[StepPlan]:
    """Every plan an adaptive step may take under ``config``'s envelope: γ in 0..gamma (only
    0 without a draft), K, R, P on coarse grids up to the configuration's values (R and P
    only with γ >= 1). The configuration's own plan is among them."""
    plans = []
    gammas = range(config.gamma + 1) if config.use_draft else (0,)
    for gamma in gammas:
        roots = _steps(ROOT_STEPS, config.root_phrases) if gamma else [0]
        phrases = _steps(PHRASE_STEPS, config.draft_phrases) if gamma else [0]
        for suffixes in _steps(SUFFIX_STEPS, config.num_suffixes):
            for root in roots:
                for phrase in phrases:
                    plans.append(StepPlan(gamma, suffixes, root, phrase))
    return plans


@dataclass(frozen=True)
class ContextCosts:
    """Seconds of a forward pass over T new tokens after ``context`` cached ones.

    ``short(T)`` was measured after ``short_prefix`` rows, ``long(T)`` (optional) after
    ``long_prefix``; in between and beyond, the cost grows linearly with the context (the
    attention's share), never below ``short``.
    """

    short: Callable[[float], float]
    long: Callable[[float], float] | None = None
    short_prefix: int = 200
    long_prefix: int = 1024

    def __call__(self, num_tokens: float, context: int) -> float:
        base = self.short(num_tokens)
        if self.long is None or context <= self.short_prefix:
            return base
        slope = (self.long(num_tokens) - base) / (self.long_prefix - self.short_prefix)
        return base + max(slope, 0.0) * (context - self.short_prefix)


@dataclass
class StepObservation:
    """What one step showed, for `AdaptivePlanner.observe`.

    ``drafted`` / ``accepted_draft``: draft tokens verified and accepted; ``suffix_tokens``:
    accepted from the suffixes after the draft (or after the committed end without a draft),
    counted only when they were verified in their context (``suffixes_in_context``);
    ``root_tokens``: accepted from root phrases; ``draft_passes`` / ``phrase_tokens``: the
    draft passes of the step and the pool-phrase tokens they accepted.
    """

    drafted: int
    accepted_draft: int
    suffix_tokens: int
    suffixes_in_context: bool
    root_tokens: int
    draft_passes: int
    phrase_tokens: int


class _Estimate:
    """``(successes + prior * weight) / (trials + weight)`` over exponentially decayed sums."""

    def __init__(self, prior: float, weight: float) -> None:
        self.prior, self.weight = prior, weight
        self.successes = self.trials = 0.0

    def decay(self, factor: float) -> None:
        self.successes *= factor
        self.trials *= factor

    def add(self, successes: float, trials: float) -> None:
        self.successes += successes
        self.trials += trials

    @property
    def value(self) -> float:
        return (self.successes + self.prior * self.weight) / (self.trials + self.weight)


class AdaptivePlanner:
    """Chooses each step's `StepPlan` inside ``config``'s envelope (see the module doc).

    Args:
        config: the envelope (and N, the window).
        model: a `ouroboros.tuning.ThroughputModel` (its priors seed the estimates; its
            α should be the pair's measured agreement).
        target, draft: `ContextCosts` of the target's and the draft's passes (draft: None
            without a draft model).
        decay: factor applied to the statistics before each step's observation (0.85: the
            last ~7 steps weigh the most).
        probe_every: steps after which a switched-off draft or suffix is tried once.
        margin: how much faster (expected) a plan must be than the priors' choice to be
            taken instead.
        plans: the candidate plans (default `envelope_plans(config)`).
    """

    def __init__(self, config: OuroborosConfig, model, target: ContextCosts,
                 draft: ContextCosts | None, *, decay: float = 0.85, probe_every: int = 8,
                 margin: float = 0.1,
                 plans: Sequence[StepPlan] | None = None) -> None:
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"decay must lie in (0, 1], got {decay!r}")
        self.config, self.model, self.decay = config, model, decay
        self.target, self.draft = target, draft
        self.plans = list(plans) if plans is not None else envelope_plans(config)
        if not config.use_draft or draft is None:
            self.plans = [plan for plan in self.plans if plan.gamma == 0]
        if not self.plans:
            raise ValueError("no candidate plan inside the configuration's envelope")
        length = config.phrase_len
        self._gamma = np.array([p.gamma for p in self.plans], dtype=np.float64)
        suffixes = np.array([p.num_suffixes for p in self.plans], dtype=np.float64)
        roots = np.array([p.root_phrases for p in self.plans], dtype=np.float64)
        phrases = np.array([p.draft_phrases for p in self.plans], dtype=np.float64)
        # Tokens accepted per unit of coverage for n phrases: (1 - recency^n) * g(L), for
        # the plans (arrays) and for the observations (one count).
        continuation = sum(model.continuation ** j for j in range(length))
        self._pool_unit = lambda n: (1 - model.recency ** n) * continuation  # noqa: E731
        self._root_unit_of = lambda n: (1 - model.root_recency ** n) * continuation  # noqa: E731
        self._suffix_unit = self._pool_unit(suffixes)
        self._root_unit = self._root_unit_of(roots)
        self._phrase_unit = self._pool_unit(phrases)
        shapes = [plan.shape(config) for plan in self.plans]
        # Tokens of the target pass, of the step's first draft pass and of each later one.
        self._target_tokens = [target_pass_tokens(shape) for shape in shapes]
        self._first_draft_tokens = [draft_pass_tokens(shape) for shape in shapes]
        self._later_draft_tokens = [draft_pass_tokens(shape, draft_pending(shape, False))
                                    for shape in shapes]
        self._drafting = self._gamma > 0
        boost = model.window_boost if config.window else 0.0
        decay_len = model.length_decay ** (length - 3)
        cover = lambda c: min(max(c * decay_len + boost, 0.0), 1.0)  # noqa: E731
        self.alpha = _Estimate(min(max(model.alpha, 0.0), 0.99), 4.0)
        self.suffix_cover = _Estimate(cover(model.coverage), 2.0)
        self.root_cover = _Estimate(cover(model.root_coverage), 2.0)
        self.phrase_cover = _Estimate(cover(model.coverage), 2.0)
        self._costs: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self.probe_every, self.margin = probe_every, margin
        self._anchors: dict[int, int] = {}
        self._since_draft = self._since_suffix = 0
        self._can_draft = any(plan.gamma for plan in self.plans)
        self._can_suffix = any(plan.num_suffixes for plan in self.plans)
        self._bucket = 64  # context rows per cost bucket

    # ------------------------------------------------------------------ costs

    def _cost_arrays(self, context: int,
                     batch: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per plan: seconds of the target pass, of the step's first draft pass and of each
        later one (0 without a draft), at the context's bucket (once per bucket and batch).

        In a batch of ``batch`` rows a pass is shared: a row's part of it is the cost of a
        pass over ``batch`` times its tokens, divided by ``batch`` (as if every row fed as
        many; the fixed cost of a pass is spread, the per-token cost is not)."""
        key = (context // self._bucket, batch)
        arrays = self._costs.get(key)
        if arrays is None:
            rows = key[0] * self._bucket + self._bucket // 2

            def seconds(costs, counts, overhead):
                if costs is None:
                    return np.zeros(len(counts))
                table = {t: (costs(t * batch, rows) + overhead) / batch
                         for t in set(counts) if t}
                return np.array([table[t] if t else 0.0 for t in counts])

            overhead = self.model.pass_overhead
            arrays = self._costs[key] = (
                seconds(self.target, self._target_tokens, 0.0),
                seconds(self.draft, self._first_draft_tokens, overhead),
                seconds(self.draft, self._later_draft_tokens, overhead))
        return arrays

    # ------------------------------------------------------------------ the choice

    def rates(self, context: int, estimates: Sequence[float] | None = None,
              batch: int = 1) -> np.ndarray:
        """Expected tokens per second of every candidate plan after ``context`` tokens,
        under the current estimates (or ``estimates``: α and the suffix, root and phrase
        coverages), for one row of a batch of ``batch`` (its share of each pass)."""
        if estimates is None:
            estimates = (self.alpha.value, self.suffix_cover.value, self.root_cover.value,
                         self.phrase_cover.value)
        alpha, suffix_cover, root_cover, phrase_cover = estimates
        alpha = min(max(alpha, 0.0), 0.999)
        gamma = self._gamma
        power = alpha ** gamma
        accepted = alpha * (1 - power) / (1 - alpha)  # sum of alpha^i, i = 1..gamma
        suffixes = suffix_cover * self._suffix_unit
        roots = root_cover * self._root_unit
        tokens = np.where(self._drafting,
                          1 + accepted + power * suffixes + (1 - alpha) * roots,
                          1 + suffixes)
        matched = phrase_cover * self._phrase_unit
        passes = np.where(self._drafting, np.maximum(1.0, gamma / (1 + matched)), 0.0)
        target_cost, first_draft, later_draft = self._cost_arrays(context, batch)
        seconds = self.model.step_overhead / batch + target_cost + np.where(
            self._drafting, first_draft + (passes - 1) * later_draft, 0.0)
        return tokens / seconds

    def plan(self, context: int, batch: int = 1) -> StepPlan:
        """The plan with the highest expected rate (the first such, deterministically), for
        a row after ``context`` tokens in a batch of ``batch`` live rows.

        The plan the priors (the tuned values) would choose is kept unless another one is
        expected to be ``margin`` faster under the current estimates: a few steps of noisy
        statistics do not move the tree. A mechanism the estimates switched off is probed
        again every ``probe_every`` steps (one draft token, or one suffix), so that a
        sequence on which it starts to pay is noticed: an estimate only moves when its
        mechanism runs.
        """
        rates = self.rates(context, batch=batch)
        best = int(np.argmax(rates))
        anchor = self._anchor(context, batch)
        if rates[best] < rates[anchor] * (1 + self.margin):
            best = anchor
        best = self.plans[best]
        self._since_draft = 0 if best.gamma else self._since_draft + 1
        self._since_suffix = 0 if best.num_suffixes else self._since_suffix + 1
        if self._can_draft and self._since_draft >= self.probe_every:
            best, self._since_draft = replace(best, gamma=1), 0
        if self._can_suffix and self._since_suffix >= self.probe_every:
            best, self._since_suffix = replace(best, num_suffixes=1), 0
        return best

    def _anchor(self, context: int, batch: int = 1) -> int:
        """Index of the plan the priors choose at the context's bucket."""
        key = (context // self._bucket, batch)
        anchor = self._anchors.get(key)
        if anchor is None:
            priors = (self.alpha.prior, self.suffix_cover.prior, self.root_cover.prior,
                      self.phrase_cover.prior)
            anchor = self._anchors[key] = int(np.argmax(self.rates(context, priors, batch)))
        return anchor

    def observe(self, plan: StepPlan, seen: StepObservation) -> None:
        """Fold one step's outcome into the estimates (decaying the older ones)."""
        for estimate in (self.alpha, self.suffix_cover, self.root_cover, self.phrase_cover):
            estimate.decay(self.decay)
        if seen.drafted:
            rejected = 1.0 if seen.accepted_draft < seen.drafted else 0.0
            self.alpha.add(seen.accepted_draft, seen.accepted_draft + rejected)
        if plan.num_suffixes and seen.suffixes_in_context:
            self.suffix_cover.add(seen.suffix_tokens, self._pool_unit(plan.num_suffixes))
        if plan.root_phrases and seen.drafted and seen.accepted_draft == 0:
            self.root_cover.add(seen.root_tokens, self._root_unit_of(plan.root_phrases))
        if plan.draft_phrases and seen.draft_passes:
            unit = self._pool_unit(plan.draft_phrases)
            self.phrase_cover.add(seen.phrase_tokens, seen.draft_passes * unit)

    def estimates(self) -> dict[str, float]:
        """The current estimates (for stats and debugging)."""
        return {"alpha": self.alpha.value, "suffix_coverage": self.suffix_cover.value,
                "root_coverage": self.root_cover.value,
                "phrase_coverage": self.phrase_cover.value}


class SchedulePlanner:
    """Plans from a fixed cycle (tests force every shape through it; nothing adapts)."""

    def __init__(self, plans: Iterable[StepPlan]) -> None:
        self.plans = list(plans)
        if not self.plans:
            raise ValueError("plans must not be empty")
        self._step = 0

    def plan(self, context: int, batch: int = 1) -> StepPlan:
        plan = self.plans[self._step % len(self.plans)]
        self._step += 1
        return plan

    def observe(self, plan: StepPlan, seen: StepObservation) -> None:
        """Nothing to learn."""


# ============================================================================ from measurements


def _throughput_model(measurements):
    from ouroboros.tuning import ThroughputModel

    model = ThroughputModel()
    alpha = measurements.alpha
    if alpha is None:  # not measured on this sample: the mean of the samples measured
        alphas = list((measurements.extra or {}).get("alphas", {}).values())
        alpha = sum(alphas) / len(alphas) if alphas else None
    return model.with_alpha(alpha) if alpha is not None else model


def context_costs(measurements) -> tuple[ContextCosts, ContextCosts | None]:
    """`ContextCosts` of the target and the draft from `ouroboros.tuning.Measurements`
    (the long-prefix curves where they were measured)."""
    from ouroboros.tuning import CostCurve

    extra = measurements.extra or {}
    long_prefix = int(extra.get("long_prefix", 1024))
    short_prefix = int(extra.get("prefix", 200))

    def costs(curve, name):
        if curve is None:
            return None
        long_curve = extra.get(name)
        if isinstance(long_curve, dict):
            long_curve = CostCurve.from_dict(long_curve)
        return ContextCosts(curve, long_curve, short_prefix, long_prefix)

    return (costs(measurements.target_curve, "long_target_curve"),
            costs(measurements.draft_curve, "long_draft_curve"))


def planner_for(config: OuroborosConfig, measurements) -> AdaptivePlanner:
    """The planner of one ``generate`` call under ``config``'s envelope."""
    target, draft = context_costs(measurements)
    return AdaptivePlanner(config, _throughput_model(measurements), target,
                           draft if config.use_draft else None)


# The statistics an envelope must serve: from a draft that is rarely right to one that
# nearly always is, from an empty pool to one that holds every continuation.
_ENVELOPE_ALPHAS = (0.3, 0.5, 0.7, 0.85, 0.95)
_ENVELOPE_COVERAGES = (0.1, 0.4, 0.7, 1.0)
_ENVELOPE_CONTEXTS = (256, 2048)
_ENVELOPE_LIMITS = {"gamma": 12, "num_suffixes": 16, "root_phrases": 4, "draft_phrases": 8}


def adaptive_config(measurements, base: OuroborosConfig, **overrides) -> OuroborosConfig:
    """The envelope of adaptive trees for a device and model pair: ``base`` (the tuned fixed
    configuration: its N, window, pool settings) with γ, K, R and P raised to the largest
    values the planner chooses for any plausible statistics (`_ENVELOPE_ALPHAS` x
    `_ENVELOPE_COVERAGES`) at short and long contexts, and ``adaptive=True``. ``overrides``
    (any field) win and cap the envelope."""
    # What each method may vary: its own mechanisms only (speculative decoding stays
    # poolless, lookahead stays draftless).
    varied = {"speculative": ("gamma",), "lookahead": ("num_suffixes",)}.get(
        base.name, tuple(_ENVELOPE_LIMITS))
    limits = {name: _ENVELOPE_LIMITS[name] for name in varied}
    if not base.use_draft:
        limits = {name: value for name, value in limits.items() if name == "num_suffixes"}
    for name in limits:
        if name in overrides:
            limits[name] = overrides[name]
    largest = base.replace(**limits, adaptive=True)
    planner = planner_for(largest, measurements)
    chosen: list[StepPlan] = []
    for alpha in _ENVELOPE_ALPHAS:
        for coverage in _ENVELOPE_COVERAGES:
            estimates = (alpha, coverage, coverage, coverage)
            chosen += [planner.plans[int(np.argmax(planner.rates(context, estimates)))]
                       for context in _ENVELOPE_CONTEXTS]
    # The tuned tree itself is always inside the envelope.
    chosen.append(fixed_plan(base) if base.use_draft else StepPlan(0, base.num_suffixes))
    envelope = {name: max(getattr(plan, name) for plan in chosen) for name in limits}
    if base.use_draft:
        envelope["gamma"] = max(envelope["gamma"], 1)
    return base.replace(**{**envelope, "adaptive": True, **overrides})
