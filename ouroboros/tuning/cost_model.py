"""The cost model of one decoding step and the choice of a configuration from it.

Pure: cost curves in, expected tokens per second and a configuration out; no models, no
torch, no I/O (the measurement lives in `ouroboros.tuning.measurement`). Evaluating the
model for one shape is a few dozen float operations, cheap enough to run every step.
The tree sizes come from `ouroboros.geometry` (the same counts that size the KV caches).
See docs/architecture.md §2 for the step itself.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, replace

from ouroboros.config import OuroborosConfig
from ouroboros.geometry import TreeShape, draft_pass_tokens, target_pass_tokens

__all__ = [
    "GAMMAS",
    "NGRAMS",
    "PHRASES",
    "ROOT_PHRASES",
    "SUFFIXES",
    "WINDOW_SIZES",
    "CostCurve",
    "ThroughputModel",
    "choose_config",
    "choose_from",
    "search_shapes",
]


@dataclass(frozen=True)
class CostCurve:
    """Seconds of one forward pass over ``sizes[i]`` fed tokens: ``seconds[i]``.

    Calling it interpolates linearly between the measured sizes and extrapolates the last
    segment's slope beyond the largest one (never below the smallest measured cost).
    """

    sizes: tuple[int, ...]
    seconds: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.sizes) != len(self.seconds) or not self.sizes:
            raise ValueError(f"sizes and seconds must be non-empty and of equal length, got "
                             f"{len(self.sizes)} and {len(self.seconds)}")
        if list(self.sizes) != sorted(set(self.sizes)) or self.sizes[0] < 1:
            raise ValueError(f"sizes must be increasing ints >= 1, got {self.sizes}")
        if any(not (s > 0 and math.isfinite(s)) for s in self.seconds):
            raise ValueError(f"seconds must be positive and finite, got {self.seconds}")

    def __call__(self, num_tokens: float) -> float:
        sizes, seconds = self.sizes, self.seconds
        if len(sizes) == 1 or num_tokens <= sizes[0]:
            return seconds[0]
        last = len(sizes) - 1
        i = 1
        while i < last and num_tokens > sizes[i]:
            i += 1
        slope = (seconds[i] - seconds[i - 1]) / (sizes[i] - sizes[i - 1])
        return max(seconds[0], seconds[i - 1] + slope * (num_tokens - sizes[i - 1]))

    def relative(self, num_tokens: float) -> float:
        """Cost of a pass over ``num_tokens`` relative to a one-token pass."""
        return self(num_tokens) / self(1)

    def to_dict(self) -> dict:
        return {"sizes": list(self.sizes), "seconds": list(self.seconds)}

    @classmethod
    def from_dict(cls, data: dict) -> CostCurve:
        return cls(tuple(int(s) for s in data["sizes"]), tuple(float(s) for s in data["seconds"]))


@dataclass(frozen=True)
class ThroughputModel:
    """Expected tokens per second of one decoding step, from the cost curves and priors.

    One step with draft length γ, ``P = draft_phrases`` pool phrases tried per draft pass,
    K suffixes and R root phrases of L = N - 1 tokens, and an optional Jacobi window of
    ``window_size`` columns:

    * emitted tokens: ``1 + sum(α^i, i = 1..γ) + α^γ * s(K) + (1 - α) * r(R)``: the bonus
      token, the accepted draft prefix (each draft token accepted with probability α given
      its predecessors), the suffixes when the whole draft is accepted and the root phrases
      when the draft's first token is rejected. ``s(n) = coverage * (1 - recency^n) * g(L)``:
      the pool holds the target's continuation with probability ``coverage``, usually among
      its most recent phrases (each further phrase finds a ``1 - recency`` share of the rest),
      and a phrase that starts right is accepted for ``g(L) = sum(continuation^j, j < L)``
      tokens on average; coverages shrink by ``length_decay`` per token beyond L = 3
      (longer n-grams recur less often). ``r`` likewise with ``root_coverage`` and
      ``root_recency`` (a token the draft got wrong is a hard one);
    * draft passes: ``max(1, γ / (1 + m))``, ``m = s(P)`` the pool phrase length one draft
      pass accepts. The first pass of a step feeds the tokens the draft has no K/V for
      (expected: the emitted tokens minus the accepted draft prefix, plus the draft's last
      token when the whole draft was accepted), every later pass one pending token, each
      plus ``(P + window columns) * L`` tree tokens (`ouroboros.geometry.draft_pass_tokens`);
      each pass also costs ``pass_overhead`` seconds of host work;
    * one target pass over `ouroboros.geometry.target_pass_tokens` tokens (``1 + γ +
      (K + R) * L``, or ``1 + K * L + window cells`` without a draft), the tree the
      KV cache is sized for, and ``step_overhead`` seconds of host work per step.

    The window adds ``window_boost`` to the coverages (fresh n-grams). The priors only rank
    configurations; the measured cost curves decide how large a tree the device affords.
    α is measured for the pair (`ouroboros.tuning.measure_agreement`); the pool priors were
    fitted to the engine's statistics (accepted suffix / root-phrase tokens per step for
    K, R = 1, 2, 4) for SmolLM2-135M with its distilled draft on HumanEval prompts (code:
    the pool's best case; on chat the pool finds less, which costs little because K and R
    stay small on a CPU).
    """

    alpha: float = 0.7
    coverage: float = 0.6
    recency: float = 0.2
    root_coverage: float = 0.4
    root_recency: float = 0.5
    continuation: float = 0.85
    length_decay: float = 0.9
    window_boost: float = 0.01
    step_overhead: float = 0.003
    pass_overhead: float = 0.0005

    def with_alpha(self, alpha: float) -> ThroughputModel:
        """The same priors with another agreement α."""
        return replace(self, alpha=alpha)

    def phrase_tokens(self, count: int, length: int, coverage: float, window: bool,
                      recency: float | None = None) -> float:
        """Expected tokens accepted from ``count`` pool phrases of ``length`` tokens."""
        if count <= 0 or length <= 0:
            return 0.0
        recency = self.recency if recency is None else recency
        coverage *= self.length_decay ** (length - 3)  # longer n-grams recur less often
        coverage = min(max(coverage + (self.window_boost if window else 0.0), 0.0), 1.0)
        found = coverage * (1 - recency ** count)
        c = self.continuation
        accepted = length if c == 1 else (1 - c ** length) / (1 - c)  # sum(c^j, j < length)
        return found * accepted

    def _alpha(self) -> float:
        return min(max(self.alpha, 0.0), 0.999)

    def _parts(self, shape: TreeShape) -> tuple[float, float, float]:
        """(accepted draft prefix, suffix tokens, root-phrase tokens) expected per step."""
        length = shape.ngram - 1
        if not shape.use_draft:
            return 0.0, self.phrase_tokens(shape.num_suffixes, length, self.coverage,
                                           shape.window), 0.0
        alpha = self._alpha()
        whole = alpha ** shape.gamma  # the whole draft accepted
        accepted = alpha * (1 - whole) / (1 - alpha)  # sum(α^i, i = 1..γ)
        suffixes = self.phrase_tokens(shape.num_suffixes, length, self.coverage, shape.window)
        roots = self.phrase_tokens(shape.root_phrases, length, self.root_coverage,
                                   shape.window, self.root_recency)
        return accepted, whole * suffixes, (1 - alpha) * roots

    def tokens_per_step(self, shape: TreeShape) -> float:
        """Expected tokens emitted by one step."""
        accepted, suffixes, roots = self._parts(shape)
        return 1 + accepted + suffixes + roots

    def target_tokens(self, shape: TreeShape) -> int:
        """Tokens the step's target pass is charged for (`geometry.target_pass_tokens`)."""
        return target_pass_tokens(shape)

    def draft_passes(self, shape: TreeShape) -> float:
        """Expected draft passes of one step (0 without a draft)."""
        if not shape.use_draft:
            return 0.0
        matched = self.phrase_tokens(shape.draft_phrases, shape.ngram - 1, self.coverage,
                                     shape.window)
        return max(1.0, shape.gamma / (1 + matched))

    def first_draft_pending(self, shape: TreeShape) -> float:
        """Expected pending tokens of a step's first draft pass: what the previous step
        emitted past the draft's cached rows (bonus, pool tokens, and the draft's last
        token when the whole draft was accepted); at most `geometry.draft_pending`."""
        _, suffixes, roots = self._parts(shape)
        return 1 + self._alpha() ** shape.gamma + suffixes + roots

    def _seconds(self, shape: TreeShape, target: CostCurve, draft: CostCurve | None,
                 suffixes: float, roots: float) -> float:
        seconds = self.step_overhead + target(target_pass_tokens(shape))
        if not shape.use_draft:
            return seconds
        if draft is None:
            raise ValueError("a configuration with a draft model needs the draft's cost curve")
        passes = self.draft_passes(shape)
        pending = 1 + self._alpha() ** shape.gamma + suffixes + roots  # first_draft_pending
        first = draft(draft_pass_tokens(shape, pending))
        later = draft(draft_pass_tokens(shape, 1)) if passes > 1 else 0.0
        return seconds + first + (passes - 1) * later + passes * self.pass_overhead

    def seconds_per_step(self, shape: TreeShape, target: CostCurve,
                         draft: CostCurve | None) -> float:
        """Expected seconds of one step."""
        _, suffixes, roots = self._parts(shape)
        return self._seconds(shape, target, draft, suffixes, roots)

    def tokens_per_second(self, config: OuroborosConfig | TreeShape, target: CostCurve,
                          draft: CostCurve | None) -> float:
        """Expected emitted tokens per second of a configuration."""
        shape = config if isinstance(config, TreeShape) else TreeShape.of(config)
        accepted, suffixes, roots = self._parts(shape)
        return (1 + accepted + suffixes + roots) / self._seconds(shape, target, draft,
                                                                 suffixes, roots)


GAMMAS = tuple(range(1, 13))
SUFFIXES = (0, 1, 2, 3, 4, 6, 8, 12, 16)
PHRASES = (0, 1, 2, 4, 8)
ROOT_PHRASES = (0, 1, 2, 4)
NGRAMS = (3, 4, 5)
WINDOW_SIZES = (2, 4, 8)


def search_shapes(base: OuroborosConfig, fixed: dict) -> Iterable[TreeShape]:
    """The grid `choose_config` searches for a preset; fields in ``fixed`` are not varied."""
    def values(name, grid):
        return (fixed[name],) if name in fixed else grid

    windows = [(False, base.window_size)] + [(True, size) for size in
                                             values("window_size", WINDOW_SIZES)]
    if "window" in fixed:
        windows = [(w, size) for w, size in windows if w == fixed["window"]]
    if base.name == "speculative":
        for gamma in values("gamma", GAMMAS):
            yield TreeShape(True, gamma, base.ngram, 0)
        return
    if not base.use_draft:  # lookahead
        if not (base.seed_pool_from_prompt or base.pool_from_output):
            windows = [(w, size) for w, size in windows if w]  # the window feeds the pool
        for ngram in values("ngram", NGRAMS):
            for suffixes in values("num_suffixes", SUFFIXES):
                for window, size in windows:
                    yield TreeShape(False, 0, ngram, suffixes, 0, 0, window, size)
        return
    for gamma in values("gamma", GAMMAS):
        for ngram in values("ngram", NGRAMS):
            for suffixes in values("num_suffixes", SUFFIXES):
                for phrases in values("draft_phrases", PHRASES):
                    for roots in values("root_phrases", ROOT_PHRASES):
                        for window, size in windows:
                            yield TreeShape(True, gamma, ngram, suffixes, phrases, roots,
                                            window, size)


def choose_config(target: CostCurve, draft: CostCurve | None, method: str = "ouroboros",
                  model: ThroughputModel | None = None, **overrides) -> OuroborosConfig:
    """The configuration of ``method`` that `ThroughputModel` expects to be fastest under
    the cost curves, with ``overrides`` (any `OuroborosConfig` field) applied on top.

    ``greedy`` has nothing to tune (its preset is returned). Fields given in ``overrides``
    are held fixed during the search, so the rest is chosen around them.
    """
    base = OuroborosConfig.preset(method, **overrides)
    if method == "greedy":
        return base
    model = model or ThroughputModel()
    best, best_rate = None, -1.0
    for shape in search_shapes(base, overrides):
        rate = model.tokens_per_second(shape, target, draft if shape.use_draft else None)
        if rate > best_rate * (1 + 1e-9):
            best, best_rate = shape, rate
    return best.apply(base).replace(**overrides) if best is not None else base


def choose_from(measurements, method: str = "ouroboros", **overrides) -> OuroborosConfig:
    """`choose_config` with the measured curves and α of a `Measurements` (anything with
    ``target_curve``, ``draft_curve`` and ``alpha``; the prior where α is None)."""
    model = ThroughputModel()
    if measurements.alpha is not None:
        model = model.with_alpha(measurements.alpha)
    return choose_config(measurements.target_curve, measurements.draft_curve, method, model,
                         **overrides)
