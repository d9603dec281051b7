"""Hardware-aware defaults: size the token trees from measured forward-pass costs.

Speculative decoding trades target passes for bigger target passes. What a bigger pass
costs depends on the hardware: on a GPU a forward over 64 new tokens after a 200-token
prefix costs about what one token costs (the weights are read once either way); on a CPU it
costs several times more. So the best draft length γ, number of suffixes K, n-gram level N
and Jacobi window differ by device, and the presets of `OuroborosConfig` cannot be right
everywhere.

`tuned_config(target, draft, device)` measures, once per device and model pair:

* the **cost curve** of each model: seconds of one engine forward pass over T new tokens
  (a tree: a chain plus branches, as in a decoding step) after a 200-token cached prefix,
  for T in `TARGET_SIZES` / `DRAFT_SIZES` (`measure_cost_curve`);
* the draft's **agreement** α with the target: the fraction of the target's own greedy
  tokens the draft predicts (top-1, teacher forced) on two short calibration prompts
  (`measure_agreement`).

It caches them as JSON under ``$OUROBOROS_CACHE_DIR/tuning/`` (default
``~/.cache/ouroboros/tuning/``), keyed by a fingerprint of the device, the thread count,
the torch version and both models, and picks the configuration that maximises the expected
tokens per second under a simple model of one decoding step (`choose_config`, see
`ThroughputModel`). Choosing is cheap; only the measurement (a few seconds on a CPU,
under a second on a GPU) is cached.

Overriding: every field passed to `tuned_config` as a keyword (``gamma=8``) wins over the
tuned value; ``OUROBOROS_TUNING=off`` (or ``tune=False``) returns the plain preset;
``refresh=True`` measures again. The CLI's ``--set FIELD=VALUE`` and ``--no-tune`` do the
same.

On a CPU, `choose_num_threads` picks torch's thread count by measurement (on cores shared
with other busy processes one thread can be several times faster than all of them), and
`prepack_linear_weights` additionally stores every ``nn.Linear`` weight of a
model in oneDNN's blocked layout once, so that a forward over a few tokens does not pay
MKL's small-batch GEMM penalty (measured on 2 cores: SmolLM2's output layer over 8 tokens
30 ms -> 10 ms; a whole 8-token pass 180 ms -> 85 ms). The values change only by float
rounding (a different summation order), like any change of BLAS kernel.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ouroboros.config import OuroborosConfig

__all__ = [
    "DRAFT_SIZES",
    "TARGET_SIZES",
    "CostCurve",
    "Measurements",
    "PrepackedLinear",
    "ThroughputModel",
    "TreeShape",
    "choose_config",
    "choose_from",
    "choose_num_threads",
    "device_description",
    "measure_agreement",
    "measure_cost_curve",
    "model_fingerprint",
    "prepack_linear_weights",
    "tuned_config",
    "tuning_enabled",
]

TARGET_SIZES: tuple[int, ...] = (1, 4, 8, 16, 32, 64)
DRAFT_SIZES: tuple[int, ...] = (1, 4, 8, 16, 32)
PREFIX_LEN = 200
_FORMAT = 1  # bump when the measurement changes meaning; old cache entries are ignored

CALIBRATION_PROMPTS: tuple[str, ...] = (
    'def running_mean(values: list[float]) -> list[float]:\n    """Return the mean of the '
    'first i + 1 values for every i.\n    >>> running_mean([1.0, 3.0, 5.0])\n    [1.0, '
    '2.0, 3.0]\n    """\n',
    "Explain in a few sentences why the sky looks blue during the day and red at sunset.",
)


# ============================================================================ cost curves


@dataclass(frozen=True)
class CostCurve:
    """Seconds of one forward pass over ``sizes[i]`` new tokens: ``seconds[i]``.

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
        if len(sizes) == 1:
            return seconds[0]
        if num_tokens <= sizes[0]:
            return seconds[0]
        for i in range(1, len(sizes)):
            if num_tokens <= sizes[i] or i == len(sizes) - 1:
                slope = (seconds[i] - seconds[i - 1]) / (sizes[i] - sizes[i - 1])
                return max(seconds[0], seconds[i - 1] + slope * (num_tokens - sizes[i - 1]))
        raise AssertionError("unreachable")

    def relative(self, num_tokens: float) -> float:
        """Cost of a pass over ``num_tokens`` relative to a one-token pass."""
        return self(num_tokens) / self(1)

    def to_dict(self) -> dict:
        return {"sizes": list(self.sizes), "seconds": list(self.seconds)}

    @classmethod
    def from_dict(cls, data: dict) -> CostCurve:
        return cls(tuple(int(s) for s in data["sizes"]), tuple(float(s) for s in data["seconds"]))


def _measurement_tree(num_nodes: int, vocab_size: int):
    """A typical verification tree of ``num_nodes`` nodes: a chain of up to 6 (the draft)
    and branches of 3 tokens hanging from its end (the suffixes), with distinct first
    tokens (so the trie keeps them apart)."""
    from ouroboros.generate import TokenTree

    tree = TokenTree()
    chain = min(num_nodes, 6)
    tree.add_path(-1, [(10 + i) % vocab_size for i in range(chain)])
    remaining, branch = num_nodes - chain, 0
    while remaining > 0:
        length = min(3, remaining)
        first = (3 + branch) % vocab_size
        tree.add_path(chain - 1, [first] + [(first + 5 * i) % vocab_size
                                            for i in range(1, length)])
        remaining -= length
        branch += 1
    return tree


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def measure_cost_curve(model: nn.Module, sizes: Sequence[int] = TARGET_SIZES, *,
                       prefix_len: int = PREFIX_LEN, repeats: int = 3,
                       backend: str | None = None, seed: int = 0) -> CostCurve:
    """Seconds of one engine forward pass over T new tokens, for each T in ``sizes``.

    Runs the engine's own pass (`ouroboros.generate.forward_tree` with a static cache, the
    ``"ouroboros"`` attention, a tree-shaped mask for T > 1) after a cached prefix of
    ``prefix_len`` random tokens, batch 1: one warm-up round over all sizes, then
    ``repeats`` timed rounds (CUDA synchronised); per size the fastest round, made
    non-decreasing in T. The model is switched to the ``"ouroboros"`` attention (its
    ordinary use is unchanged, see `ouroboros.attention`).
    """
    from ouroboros.attention import enable_ouroboros_attention, resolve_backend
    from ouroboros.cache import StaticKVCache, cache_kwarg_name
    from ouroboros.generate import ModelRunner, TokenTree, forward_tree, prefill

    sizes = tuple(sorted(set(int(s) for s in sizes)))
    if not sizes or sizes[0] < 1:
        raise ValueError(f"sizes must be ints >= 1, got {sizes}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if prefix_len < 1:
        raise ValueError(f"prefix_len must be >= 1, got {prefix_len}")
    parameter = next(model.parameters())
    device = parameter.device
    backend = resolve_backend(backend, device)
    enable_ouroboros_attention(model, force=True)
    cache = StaticKVCache.for_model(model, prefix_len + max(sizes) + 8)
    runner = ModelRunner(model, cache, cache_kwarg_name(model), backend)
    generator = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    prefix = torch.randint(3, vocab, (prefix_len,), generator=generator).tolist()
    prefill(runner, prefix)
    trees = {size: _measurement_tree(size - 1, vocab) if size > 1 else TokenTree()
             for size in sizes}
    best = dict.fromkeys(sizes, math.inf)
    for attempt in range(repeats + 1):  # rounds over all sizes: drift hits every size alike
        for size in sizes:
            _synchronize(device)
            start = time.perf_counter()
            forward_tree(runner, [prefix[-1]], trees[size])
            _synchronize(device)
            if attempt:  # round 0 warms up every shape
                best[size] = min(best[size], time.perf_counter() - start)
    # The fastest of the repeats (other processes only ever add time), made non-decreasing
    # in T (a pass over more tokens never costs less; a noisy small size is clipped).
    seconds = [best[size] for size in sizes]
    for i in range(len(seconds) - 2, -1, -1):
        seconds[i] = min(seconds[i], seconds[i + 1])
    return CostCurve(sizes, tuple(seconds))


def choose_num_threads(model: nn.Module, counts: Sequence[int] | None = None, *,
                       rounds: int = 2) -> int:
    """CPU: set torch's intra-op thread count to the fastest of ``counts`` for ``model``
    and return it (on other devices: nothing to choose, returns the current count).

    On a machine whose cores are shared with other busy processes, more threads can be
    several times slower (each parallel region waits for its slowest, preempted thread);
    on a quiet machine all cores win. So it is measured: ``rounds`` alternating rounds of a
    1-token and a 16-token pass (`measure_cost_curve`, 64-token prefix) per count; the
    count with the smallest summed time wins. ``counts`` defaults to ``(1, os.cpu_count())``
    (or the current count, when larger). Takes about a second for SmolLM2.
    """
    if next(model.parameters()).device.type != "cpu":
        return torch.get_num_threads()
    if counts is None:
        counts = sorted({1, max(os.cpu_count() or 1, torch.get_num_threads())})
    counts = [int(c) for c in counts]
    if not counts or min(counts) < 1:
        raise ValueError(f"counts must be ints >= 1, got {counts}")
    best = dict.fromkeys(counts, math.inf)
    for _ in range(rounds):
        for count in counts:
            torch.set_num_threads(count)
            curve = measure_cost_curve(model, (1, 16), prefix_len=64, repeats=1)
            best[count] = min(best[count], sum(curve.seconds))
    chosen = min(counts, key=lambda c: (best[c], c))
    torch.set_num_threads(chosen)
    return chosen


@torch.inference_mode()
def measure_agreement(target: nn.Module, draft: nn.Module, tokenizer=None, *,
                      new_tokens: int = 48,
                      prompts: Sequence[Sequence[int]] | None = None) -> float:
    """Top-1 agreement α of ``draft`` with ``target`` on the target's own greedy text.

    The target's greedy continuation of each calibration prompt (``new_tokens`` tokens,
    generated with speculative decoding, which is exact) is scored by one teacher-forced
    draft forward: α is the fraction of continuation tokens the draft's argmax predicts.
    ``prompts`` are token id lists; by default `CALIBRATION_PROMPTS` encoded with
    ``tokenizer`` (the chat one with its chat template).
    """
    from ouroboros.decoder import OuroborosDecoder

    device = next(target.parameters()).device
    if prompts is None:
        if tokenizer is None:
            raise ValueError("measure_agreement needs a tokenizer or explicit token prompts")
        prompts = [tokenizer(CALIBRATION_PROMPTS[0]).input_ids, _chat_ids(
            tokenizer, CALIBRATION_PROMPTS[1])]
    decoder = OuroborosDecoder(target, draft, OuroborosConfig.preset("speculative"))
    hits = total = 0
    for prompt in prompts:
        result = decoder.generate(list(prompt), new_tokens, eos_token_id=[])
        sequence = result.sequences.to(device)
        predicted = draft(input_ids=sequence[:, :-1]).logits[0].argmax(-1)
        start = result.prompt_length - 1
        hits += int((predicted[start:] == sequence[0, start + 1:]).sum())
        total += sequence.shape[1] - result.prompt_length
    return hits / max(total, 1)


def _chat_ids(tokenizer, text: str) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                 tokenize=False, add_generation_prompt=True)
        return tokenizer(rendered, add_special_tokens=False).input_ids
    return tokenizer(text).input_ids


# ============================================================================ the choice


@dataclass(frozen=True)
class TreeShape:
    """The fields of `OuroborosConfig` that size the trees (what `choose_config` searches)."""

    use_draft: bool
    gamma: int
    ngram: int
    num_suffixes: int
    draft_phrases: int = 0
    root_phrases: int = 0
    window: bool = False
    window_size: int = 4

    @classmethod
    def of(cls, config: OuroborosConfig) -> TreeShape:
        return cls(config.use_draft, config.gamma, config.ngram, config.num_suffixes,
                   config.draft_phrases, getattr(config, "root_phrases", 0), config.window,
                   config.window_size)

    def apply(self, config: OuroborosConfig) -> OuroborosConfig:
        changes = {"gamma": self.gamma, "ngram": self.ngram, "num_suffixes": self.num_suffixes,
                   "draft_phrases": self.draft_phrases, "window": self.window,
                   "window_size": self.window_size}
        if hasattr(config, "root_phrases"):
            changes["root_phrases"] = self.root_phrases
        return config.replace(**changes)


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
    * draft passes: ``γ / (1 + m)``, ``m = s(P)`` the pool phrase length one draft pass
      accepts; each costs ``draft(2 + P * L + window cells) + pass_overhead``;
    * one target pass over ``2 + γ + (K + R) * L`` tokens (without a draft: ``1 + K * L +
      window cells``) and ``step_overhead`` seconds of host work per step.

    The window adds ``window_boost`` to the coverages (fresh n-grams). The priors only rank
    configurations; the measured cost curves decide how large a tree the device affords.
    α is measured for the pair (`measure_agreement`); the pool priors were fitted to the
    engine's statistics (accepted suffix / root-phrase tokens per step for K, R = 1, 2, 4)
    for SmolLM2-135M with its distilled draft on HumanEval prompts (code: the pool's best
    case; on chat the pool finds less, which costs little because K and R stay small on
    a CPU).
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

    def phrase_tokens(self, count: int, length: int, coverage: float, window: bool,
                      recency: float | None = None) -> float:
        """Expected tokens accepted from ``count`` pool phrases of ``length`` tokens."""
        if count <= 0:
            return 0.0
        recency = self.recency if recency is None else recency
        coverage *= self.length_decay ** (length - 3)  # longer n-grams recur less often
        coverage = min(max(coverage + (self.window_boost if window else 0.0), 0.0), 1.0)
        found = coverage * (1 - recency ** count)
        return found * sum(self.continuation ** j for j in range(length))

    def tokens_per_step(self, shape: TreeShape) -> float:
        """Expected tokens emitted by one step."""
        length = shape.ngram - 1
        if not shape.use_draft:
            return 1 + self.phrase_tokens(shape.num_suffixes, length, self.coverage,
                                          shape.window)
        alpha = min(max(self.alpha, 0.0), 0.999)
        accepted = sum(alpha ** i for i in range(1, shape.gamma + 1))
        suffixes = self.phrase_tokens(shape.num_suffixes, length, self.coverage, shape.window)
        roots = self.phrase_tokens(shape.root_phrases, length, self.root_coverage,
                                   shape.window, self.root_recency)
        return 1 + accepted + alpha ** shape.gamma * suffixes + (1 - alpha) * roots

    def seconds_per_step(self, shape: TreeShape, target: CostCurve,
                         draft: CostCurve | None) -> float:
        """Expected seconds of one step."""
        length = shape.ngram - 1
        window_cells = shape.window_size * length if shape.window else 0
        seconds = self.step_overhead
        if not shape.use_draft:
            return seconds + target(1 + shape.num_suffixes * length + window_cells)
        if draft is None:
            raise ValueError("a configuration with a draft model needs the draft's cost curve")
        matched = self.phrase_tokens(shape.draft_phrases, length, self.coverage, shape.window)
        passes = max(1.0, shape.gamma / (1 + matched))
        seconds += passes * (draft(2 + shape.draft_phrases * length + window_cells)
                             + self.pass_overhead)
        phrases = shape.num_suffixes + shape.root_phrases
        return seconds + target(2 + shape.gamma + phrases * length)

    def tokens_per_second(self, config: OuroborosConfig | TreeShape, target: CostCurve,
                          draft: CostCurve | None) -> float:
        """Expected emitted tokens per second of a configuration."""
        shape = config if isinstance(config, TreeShape) else TreeShape.of(config)
        return self.tokens_per_step(shape) / self.seconds_per_step(shape, target, draft)


GAMMAS = tuple(range(1, 13))
SUFFIXES = (0, 1, 2, 3, 4, 6, 8, 12, 16)
PHRASES = (0, 1, 2, 4, 8)
ROOT_PHRASES = (0, 1, 2, 4)
NGRAMS = (3, 4, 5)
WINDOW_SIZES = (2, 4, 8)


def _shapes(base: OuroborosConfig, fixed: dict) -> Iterable[TreeShape]:
    """The grid `choose_config` searches for a preset; fields in ``fixed`` are not varied."""
    def values(name, grid):
        return (fixed[name],) if name in fixed else grid

    has_roots = hasattr(base, "root_phrases")
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
                    for roots in values("root_phrases", ROOT_PHRASES if has_roots else (0,)):
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
    for shape in _shapes(base, overrides):
        rate = model.tokens_per_second(shape, target, draft if shape.use_draft else None)
        if rate > best_rate * (1 + 1e-9):
            best, best_rate = shape, rate
    return best.apply(base).replace(**overrides) if best is not None else base


# ============================================================================ caching


def device_description(device: torch.device | str) -> str:
    """A human-readable name of the device: the GPU's name, or the CPU model + threads."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def model_fingerprint(model: nn.Module) -> str:
    """A short hash of a model's architecture, dtype, size, first and last weights, and
    whether its linear layers are prepacked (all of which change its cost curve)."""
    config = model.config
    keys = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "vocab_size", "head_dim")
    parameters = list(model.parameters())
    description = {
        "class": type(model).__name__,
        "config": {k: getattr(config, k, None) for k in keys},
        "dtype": str(parameters[0].dtype),
        "numel": sum(p.numel() for p in parameters),
        "probe": [float(parameters[0].detach().flatten()[:64].double().sum()),
                  float(parameters[-1].detach().flatten()[-64:].double().sum())],
        "prepacked": sum(isinstance(m, PrepackedLinear) for m in model.modules()),
        "head": type(model.get_output_embeddings()).__name__
        if hasattr(model, "get_output_embeddings") else None,
    }
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class Measurements:
    """What `tuned_config` measures once per device and model pair (cached as JSON)."""

    device: str
    target_curve: CostCurve
    draft_curve: CostCurve | None
    alpha: float | None
    measured_at: str = ""
    seconds_spent: float = 0.0
    extra: dict = field(default_factory=dict)

    def to_json(self) -> str:
        data = asdict(self)
        data["target_curve"] = self.target_curve.to_dict()
        data["draft_curve"] = self.draft_curve.to_dict() if self.draft_curve else None
        data["format"] = _FORMAT
        return json.dumps(data, indent=1)

    @classmethod
    def from_json(cls, text: str) -> Measurements:
        data = json.loads(text)
        if data.pop("format", None) != _FORMAT:
            raise ValueError("tuning cache entry of another format")
        data["target_curve"] = CostCurve.from_dict(data["target_curve"])
        if data.get("draft_curve"):
            data["draft_curve"] = CostCurve.from_dict(data["draft_curve"])
        return cls(**data)

    def summary(self) -> str:
        """Two lines: both cost curves in milliseconds and α."""
        def line(name, curve):
            points = ", ".join(f"{s}: {1e3 * t:.1f}" for s, t in zip(curve.sizes, curve.seconds,
                                                                       strict=True))
            return f"{name} ms per pass by new tokens {{{points}}}"
        lines = [line("target", self.target_curve)]
        if self.draft_curve is not None:
            lines.append(line("draft", self.draft_curve))
        if self.alpha is not None:
            lines.append(f"draft agreement with the target (top-1, own greedy text): "
                         f"{self.alpha:.2f}")
        return "\n".join(lines)


def tuning_enabled() -> bool:
    """False when ``OUROBOROS_TUNING`` is ``0``/``off``/``false``/``no``."""
    return os.environ.get("OUROBOROS_TUNING", "on").strip().lower() not in \
        ("0", "off", "false", "no")


def _cache_path(target: nn.Module, draft: nn.Module | None, device: torch.device,
                cache_dir: str | os.PathLike | None) -> Path:
    from ouroboros.models import default_cache_dir

    key = {"device": device_description(device), "type": device.type, "torch": torch.__version__,
           "target": model_fingerprint(target),
           "draft": model_fingerprint(draft) if draft is not None else None,
           "format": _FORMAT}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root / "tuning" / f"{device.type}-{digest}.json"


def _prompts_key(prompts: Sequence[Sequence[int]] | None) -> str:
    if prompts is None:
        return "default"
    flat = json.dumps([list(map(int, p)) for p in prompts])
    return hashlib.sha256(flat.encode()).hexdigest()[:16]


def measure(target: nn.Module, draft: nn.Module | None, tokenizer=None, *,
            prompts: Sequence[Sequence[int]] | None = None,
            cache_dir: str | os.PathLike | None = None, refresh: bool = False,
            progress: bool = False) -> Measurements:
    """Cost curves and, with a draft, its agreement α for a model pair on its device.

    Read from the cache when present (``refresh=True`` measures again; see the module doc).
    α is measured on ``prompts`` (token id lists: a sample of the workload, e.g. two
    prompts of a benchmark set) or, by default, on `CALIBRATION_PROMPTS` (needs the
    ``tokenizer``); each prompt sample's α is cached separately. Without a tokenizer and
    prompts α stays None (`choose_from` then uses the prior).
    """
    device = next(target.parameters()).device
    path = _cache_path(target, draft, device, cache_dir)
    cached = None
    if not refresh and path.is_file():
        try:
            cached = Measurements.from_json(path.read_text())
        except (OSError, ValueError, KeyError, TypeError):
            cached = None  # a broken or outdated entry: measure again
    key = _prompts_key(prompts)
    can_measure_alpha = draft is not None and (prompts is not None or tokenizer is not None)
    alphas = dict(cached.extra.get("alphas", {})) if cached is not None else {}
    if cached is not None and (key in alphas or not can_measure_alpha):
        cached.alpha = alphas.get(key)
        return cached
    start = time.perf_counter()
    if cached is None:
        if progress:
            print("[ouroboros] measuring forward-pass costs on this device (once; cached)...",
                  file=sys.stderr, flush=True)
        target_curve = measure_cost_curve(target, TARGET_SIZES)
        draft_curve = measure_cost_curve(draft, DRAFT_SIZES) if draft is not None else None
    else:
        target_curve, draft_curve = cached.target_curve, cached.draft_curve
    if can_measure_alpha:
        if progress:
            print("[ouroboros] measuring the draft's agreement with the target...",
                  file=sys.stderr, flush=True)
        alphas[key] = measure_agreement(target, draft, tokenizer, prompts=prompts)
    spent = time.perf_counter() - start + (cached.seconds_spent if cached else 0.0)
    result = Measurements(device_description(device), target_curve, draft_curve,
                          alphas.get(key), time.strftime("%Y-%m-%d %H:%M:%S"), spent,
                          {"alphas": alphas})
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_suffix(f".{os.getpid()}.tmp")
        staging.write_text(result.to_json())
        os.replace(staging, path)
    except OSError:
        pass  # a read-only cache directory only costs a re-measurement next time
    if progress:
        print(f"[ouroboros] measured in {time.perf_counter() - start:.1f} s, cached at {path}",
              file=sys.stderr, flush=True)
    return result


def tuned_config(target: nn.Module, draft: nn.Module | None = None, tokenizer=None, *,
                 method: str = "ouroboros", tune: bool | None = None,
                 prompts: Sequence[Sequence[int]] | None = None,
                 refresh: bool = False, cache_dir: str | os.PathLike | None = None,
                 progress: bool = False, **overrides) -> OuroborosConfig:
    """`OuroborosConfig` of ``method`` tuned for the device the models are on.

    Args:
        target, draft: the model pair, loaded on their device (the draft may be None for
            ``greedy`` and ``lookahead``).
        tokenizer: enables the agreement measurement (α) on `CALIBRATION_PROMPTS`; without
            it (and without ``prompts``) α is the prior of `ThroughputModel`.
        method: a preset name (``greedy``, ``speculative``, ``lookahead``, ``ouroboros``).
        tune: False (or ``OUROBOROS_TUNING=off`` when None) returns the preset unchanged.
        prompts: token id lists, a sample of the workload to measure α on (instead of
            `CALIBRATION_PROMPTS`); α depends on the domain (code vs chat, text the draft
            was trained on or not).
        refresh: measure again even when the cache has an entry.
        cache_dir: root of the cache (default ``$OUROBOROS_CACHE_DIR`` or
            ``~/.cache/ouroboros``).
        progress: print a line while measuring.
        overrides: `OuroborosConfig` fields that win over the tuned values (held fixed
            during the search).

    Returns:
        the configuration (its ``name`` is the method's).
    """
    if tune is None:
        tune = tuning_enabled()
    if not tune or method == "greedy":
        return OuroborosConfig.preset(method, **overrides)
    uses_draft = OuroborosConfig.preset(method, **overrides).use_draft
    if uses_draft and draft is None:
        raise ValueError(f"method {method!r} needs a draft model to tune for")
    measurements = measure(target, draft if uses_draft else None, tokenizer, prompts=prompts,
                           refresh=refresh, cache_dir=cache_dir, progress=progress)
    return choose_from(measurements, method, **overrides)


def choose_from(measurements: Measurements, method: str = "ouroboros",
                **overrides) -> OuroborosConfig:
    """`choose_config` with the measured curves and α (the prior where α was not measured)."""
    model = ThroughputModel()
    if measurements.alpha is not None:
        model = ThroughputModel(**{**asdict(model), "alpha": measurements.alpha})
    return choose_config(measurements.target_curve, measurements.draft_curve, method, model,
                         **overrides)


# ============================================================================ CPU kernels


class _RepackOnUnpickle:
    """The packed weight (``self.packed``) is opaque (no storage): copies and pickles carry
    ``self.weight`` only and pack it again."""

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.pop("packed", None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), None)


class PrepackedLinear(_RepackOnUnpickle, nn.Module):
    """An ``nn.Linear`` whose weight is also kept in oneDNN's blocked layout (CPU).

    ``forward(x: [..., in_features]) -> [..., out_features]`` in the weight's dtype, computed
    by ``torch.ops.mkldnn._linear_pointwise`` with the prepacked weight. ``weight`` (and
    ``bias``) stay the original parameters, so tied embeddings, ``state_dict`` and
    ``parameters()`` are unchanged; the packed copy is an extra tensor of the same size.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), None)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, " \
               f"bias={self.bias is not None}, prepacked"

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        bias = self.bias.detach() if self.bias is not None else None
        return torch.ops.mkldnn._linear_pointwise(hidden, self.packed, bias, "none", [None], "")


def prepacking_available(model: nn.Module) -> bool:
    """Whether `prepack_linear_weights` can act: a CPU float32 model, oneDNN present."""
    parameter = next(model.parameters())
    return (parameter.device.type == "cpu" and parameter.dtype == torch.float32
            and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


def _subset_head_type():
    """The draft's `ouroboros.models.SubsetLMHead` and its prepacked variant (or None)."""
    try:
        from ouroboros.models import SubsetLMHead
    except ImportError:  # pragma: no cover - the models module always ships it
        return None, None

    class PrepackedSubsetLMHead(_RepackOnUnpickle, SubsetLMHead):
        """`SubsetLMHead` whose subset weight is also kept in oneDNN's layout (see
        `PrepackedLinear`); same ``forward`` contract: full-vocabulary logits, the lowest
        finite value outside the subset."""

        def forward(self, hidden: torch.Tensor) -> torch.Tensor:
            scores = torch.ops.mkldnn._linear_pointwise(hidden, self.packed, None, "none",
                                                        [None], "")
            full = scores.new_full((*scores.shape[:-1], self.vocab_size),
                                   torch.finfo(scores.dtype).min)
            return full.index_copy_(-1, self.token_ids, scores)

    return SubsetLMHead, PrepackedSubsetLMHead


def prepack_linear_weights(model: nn.Module) -> int:
    """Prepack the linear layers of a CPU float32 model for oneDNN (in place).

    Every ``nn.Linear`` becomes a `PrepackedLinear`; the distilled draft's
    ``SubsetLMHead`` (`ouroboros.models`) is switched to a prepacked variant. Returns how many
    layers were converted (0 when `prepacking_available` is False: on a GPU, in another
    dtype, or without oneDNN). Parameters, their names and tied weights are unchanged.
    Inference only: the packed copies do not follow later changes of the weights, nor
    ``model.to(...)``.
    """
    if not prepacking_available(model):
        return 0
    subset_head, prepacked_subset_head = _subset_head_type()
    replaced = 0
    for module in list(model.modules()):
        if subset_head is not None and type(module) is subset_head:
            module.__class__ = prepacked_subset_head
            module.packed = torch.ops.mkldnn._reorder_linear_weight(module.weight.detach(), None)
            replaced += 1
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                setattr(module, name, PrepackedLinear(child))
                replaced += 1
    return replaced
