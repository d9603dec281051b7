"""Measuring what the cost model needs, once per device and model pair, and caching it.

`tuned_config(target, draft, tokenizer)` measures, once per device and model pair:

* the **cost curve** of each model: seconds of one engine forward pass over T fed tokens
  (one pending token and a tree laid out as a step's, `ouroboros.geometry.measurement_tree`)
  after a 200-token cached prefix, for T in `TARGET_SIZES` / `DRAFT_SIZES`
  (`measure_cost_curve`);
* the draft's **agreement** α with the target: the fraction of the target's own greedy
  tokens the draft predicts (top-1, teacher forced) on two short calibration prompts
  (`measure_agreement`).

It caches them as JSON under ``$OUROBOROS_CACHE_DIR/tuning/`` (default
``~/.cache/ouroboros/tuning/``), keyed by a fingerprint of the device, the thread count,
the torch version and both models (`Measurements`, `measure`), and hands them to the pure
cost model (`ouroboros.tuning.cost_model.choose_from`). Choosing is cheap; only the
measurement (a few seconds on a CPU, under a second on a GPU) is cached.

Overriding: every field passed to `tuned_config` as a keyword (``gamma=8``) wins over the
tuned value; ``OUROBOROS_TUNING=off`` (or ``tune=False``) returns the plain preset;
``refresh=True`` measures again. The CLI's ``--set FIELD=VALUE`` and ``--no-tune`` do the
same.

On a CPU, `choose_num_threads` picks torch's thread count by measurement (on cores shared
with other busy processes one thread can be several times faster than all of them).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ouroboros.config import OuroborosConfig
from ouroboros.geometry import MEASUREMENT_SHAPE, TreeShape, measurement_tree
from ouroboros.models import PrepackedLinear
from ouroboros.tuning.cost_model import CostCurve, choose_from

__all__ = [
    "CALIBRATION_PROMPTS",
    "DRAFT_SIZES",
    "PREFIX_LEN",
    "TARGET_SIZES",
    "Measurements",
    "choose_num_threads",
    "device_description",
    "measure",
    "measure_agreement",
    "measure_cost_curve",
    "model_fingerprint",
    "tuned_config",
    "tuning_enabled",
]

TARGET_SIZES: tuple[int, ...] = (1, 4, 8, 16, 32, 64)
DRAFT_SIZES: tuple[int, ...] = (1, 4, 8, 16, 32)
PREFIX_LEN = 200
# A second, shorter curve after a long prefix: how the attention's share grows with the
# context (adaptive trees shrink on long contexts, see `ouroboros.adaptive.ContextCosts`).
LONG_PREFIX_LEN = 1024
LONG_SIZES: tuple[int, ...] = (1, 8, 32)
# Bump when the measurement changes meaning; old cache entries are then ignored. Format 1:
# `measurement_tree` of `MEASUREMENT_SHAPE` (a chain of 6 and branches of 3 tokens);
# format 2 adds the long-prefix curves (``extra["long_target_curve"]`` etc.).
_FORMAT = 2

CALIBRATION_PROMPTS: tuple[str, ...] = (
    'def running_mean(values: list[float]) -> list[float]:\n    """Return the mean of the '
    'first i + 1 values for every i.\n    >>> running_mean([1.0, 3.0, 5.0])\n    [1.0, '
    '2.0, 3.0]\n    """\n',
    "Explain in a few sentences why the sky looks blue during the day and red at sunset.",
)


# ============================================================================ measuring


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def measure_cost_curve(model: nn.Module, sizes: Sequence[int] = TARGET_SIZES, *,
                       prefix_len: int = PREFIX_LEN, repeats: int = 3,
                       backend: str | None = None, seed: int = 0,
                       shape: TreeShape = MEASUREMENT_SHAPE) -> CostCurve:
    """Seconds of one engine forward pass over T fed tokens, for each T in ``sizes``.

    Runs the engine's own pass (`ouroboros.generate.forward_tree` with a static cache, the
    ``"ouroboros"`` attention) over one pending token and the tree
    `ouroboros.geometry.measurement_tree` lays out for ``shape`` with T - 1 nodes (a chain
    up to γ + 1 tokens, then branches under a tree mask), after a cached prefix of
    ``prefix_len`` random tokens, batch 1: one warm-up round over all sizes, then
    ``repeats`` timed rounds (CUDA synchronised); per size the fastest round, made
    non-decreasing in T. The model runs the ``"ouroboros"`` attention during the
    measurement only.
    """
    from ouroboros.attention import ouroboros_attention, resolve_backend

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
    with ouroboros_attention(model, force=True):
        return _time_passes(model, sizes, prefix_len, repeats, backend, seed, shape, device)


def _time_passes(model, sizes, prefix_len, repeats, backend, seed, shape, device) -> CostCurve:
    """`measure_cost_curve` once the model is switched (arguments validated)."""
    from ouroboros.cache import StaticKVCache, cache_kwarg_name
    from ouroboros.generate import ModelRunner, forward_tree, prefill

    cache = StaticKVCache.for_model(model, prefix_len + max(sizes) + 8)
    runner = ModelRunner(model, cache, cache_kwarg_name(model), backend)
    generator = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    prefix = torch.randint(3, vocab, (prefix_len,), generator=generator).tolist()
    prefill(runner, prefix)
    trees = {size: measurement_tree(size, vocab, shape) for size in sizes}
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
    from ouroboros.models import chat_prompt_ids

    device = next(target.parameters()).device
    if prompts is None:
        if tokenizer is None:
            raise ValueError("measure_agreement needs a tokenizer or explicit token prompts")
        prompts = [tokenizer(CALIBRATION_PROMPTS[0]).input_ids, chat_prompt_ids(
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


def _long_prefix_curves(target: nn.Module, draft: nn.Module | None) -> dict:
    """``extra`` entries with both models' `LONG_SIZES` curves after `LONG_PREFIX_LEN`
    cached rows (a shorter prefix when a model's context is smaller; none below 2x
    `PREFIX_LEN`)."""
    models = [target] + ([draft] if draft is not None else [])
    limits = [getattr(m.config, "max_position_embeddings", None) or 10**9 for m in models]
    long_prefix = min([LONG_PREFIX_LEN] + [limit - max(LONG_SIZES) - 8 for limit in limits])
    if long_prefix < 2 * PREFIX_LEN:
        return {}
    extra = {"prefix": PREFIX_LEN, "long_prefix": long_prefix,
             "long_target_curve": measure_cost_curve(target, LONG_SIZES,
                                                     prefix_len=long_prefix,
                                                     repeats=2).to_dict()}
    if draft is not None:
        extra["long_draft_curve"] = measure_cost_curve(draft, LONG_SIZES,
                                                       prefix_len=long_prefix,
                                                       repeats=2).to_dict()
    return extra


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
        extra = _long_prefix_curves(target, draft)
    else:
        target_curve, draft_curve = cached.target_curve, cached.draft_curve
        extra = dict(cached.extra)
    if can_measure_alpha:
        if progress:
            print("[ouroboros] measuring the draft's agreement with the target...",
                  file=sys.stderr, flush=True)
        alphas[key] = measure_agreement(target, draft, tokenizer, prompts=prompts)
    spent = time.perf_counter() - start + (cached.seconds_spent if cached else 0.0)
    result = Measurements(device_description(device), target_curve, draft_curve,
                          alphas.get(key), time.strftime("%Y-%m-%d %H:%M:%S"), spent,
                          {**extra, "alphas": alphas})
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
                 progress: bool = False, adaptive: bool = False,
                 **overrides) -> OuroborosConfig:
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
        adaptive: return the envelope of adaptive trees around the tuned configuration
            (`ouroboros.adaptive.adaptive_config`; what ``OuroborosDecoder(target, draft)``
            uses) instead of the fixed tuned tree.
        overrides: `OuroborosConfig` fields that win over the tuned values (held fixed
            during the search; with ``adaptive`` they also cap the envelope).

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
    config = choose_from(measurements, method, **overrides)
    if adaptive:
        from ouroboros.adaptive import adaptive_config

        config = adaptive_config(measurements, config, **overrides)
    return config
