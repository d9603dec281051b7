"""GPU end-to-end replay benchmark at real model shapes (issue 12, item 3b).

Real checkpoints cannot reach a GPU machine, so the two halves of an end-to-end number
are measured apart. `benchmarks/record_traces.py` recorded, on the CPU with the real
SmolLM2 pair, what every step of each configuration did (the tree shape each draft pass
and the target pass verified, the accepted lengths, the pool traffic). This script
replays those steps through the engine's own pieces on random-weight models with the
shapes of Llama-3-8B (target) and Llama-3.2-1B (draft), bf16, and times them against
transformers' greedy ``generate`` on the same target for the same number of tokens.

What a replayed step runs (batch 1; everything the engine's step runs except its tree
policy, whose trees are rebuilt from the recorded sizes):

* every recorded draft pass: a pool lookup of ``draft_phrases`` phrases
  (`ouroboros.policy.lookup_phrases`, its host read included), a `TokenTree` with the
  recorded numbers of pending tokens, phrase nodes and Jacobi-window nodes
  (`ouroboros.policy.JacobiWindow.attach` for a whole window), one
  `ouroboros.generate.forward_rows` pass of the draft model over it, the argmax, the
  engine's `accept_rows` (its host read), then `StaticKVCache.commit` with the recorded
  accepted length forced (the random model's own acceptance is ignored); the window's
  n-grams inserted into the pool;
* the verification tree's pool lookup, the target tree (draft chain, suffixes of L nodes
  from its end, root phrases, the window) with the recorded node counts, one
  `forward_rows` pass of the target, argmax, `accept_rows`, and the commit of the recorded
  accepted length (``compact_kv`` over all layers); the draft cache rolled back to the
  recorded length;
* the pool write-back of the recorded sizes: one ``refine`` and one ``insert`` (the
  inspiration / window n-grams and the committed-text n-grams together).

Time split per step: ``draft`` (draft passes, their acceptance and cache commits, the
roll-back), ``verify`` (target pass, acceptance, compaction), ``pool`` (lookups, inserts,
refinements), ``host`` (building the trees, random tokens, bookkeeping); on CUDA each
phase ends with a device synchronisation so the split is attributable (a sync is not a
host read). Host reads: every ``Tensor.tolist()`` / ``.item()`` the replay does (both are
counted while it runs). The cache lengths after every prompt are checked against the
trace.

Baselines on the same target, same prompt lengths (random tokens) and the same number of
new tokens (EOS disabled): ``eager`` (transformers' default dynamic cache) and ``static``
(``cache_implementation="static"``; on CUDA transformers compiles its decoding forward,
``--no-compile`` keeps it eager; when the compile warm-up would not fit the budget the
static baseline runs eager and the table says so). Projected speed-up = greedy time /
replay time for the same tokens, prefill included on both sides.

A hard time budget (``--budget-s``, default 240): the models, warm-ups, baselines and the
configurations, each configuration's cost predicted from the ones before; configurations
that would not fit are skipped and listed as skipped in the table.

Outputs (``--out``, default ``benchmarks/results``): ``replay_<device>.md`` and ``.json``
(card, versions, date, shapes, per-configuration split).

Usage::

    python benchmarks/bench_replay.py                     # CUDA: Llama-3-8B / 3.2-1B shapes
    python benchmarks/bench_replay.py --shapes tiny --device cpu --prompts 1
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import inspect
import json
import os
import platform
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

DEFAULT_TRACES = Path(__file__).resolve().parent / "results" / "traces"
TRACE_FORMAT = "ouroboros-trace-v1"
DRAFT_FIELDS = ("pending", "phrase", "window", "accepted")
TARGET_FIELDS = ("pending", "draft", "suffix", "root", "window", "acc_draft", "acc_suffix",
                 "acc_root", "acc_window")

# name -> (target, draft) LlamaConfig keywords
SHAPES = {
    "llama3": (
        {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
         "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 128256,
         "rope_theta": 500000.0, "tie_word_embeddings": False},
        {"hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32,
         "num_key_value_heads": 8, "intermediate_size": 8192, "vocab_size": 128256,
         "rope_theta": 500000.0, "tie_word_embeddings": True},
    ),
    "tiny": (
        {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 512,
         "tie_word_embeddings": False},
        {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4,
         "num_key_value_heads": 2, "intermediate_size": 64, "vocab_size": 512,
         "tie_word_embeddings": False},
    ),
}
SHAPE_TITLES = {
    "llama3": "Llama-3-8B target (hidden 4096, 32 layers, 32 heads / 8 KV, FFN 14336, vocab "
              "128256) + Llama-3.2-1B draft (hidden 2048, 16 layers, 32 / 8 KV, FFN 8192, "
              "tied embeddings); random weights",
    "tiny": "tiny random Llama pair (hidden 64 / 32, vocab 512): a smoke test, not a "
            "measurement",
}


# ============================================================================ traces


@dataclass
class Step:
    """One recorded step, every field expanded (`benchmarks/record_traces.py`)."""

    draft: list[tuple[int, int, int, int]]  # (pending, phrase, window, accepted) per pass
    target: dict[str, int]  # TARGET_FIELDS
    lookup: int
    refined: int
    ngram_rows: int
    output_ngrams: int
    gap: int

    @property
    def tree_nodes(self) -> int:
        t = self.target
        return t["draft"] + t["suffix"] + t["root"] + t["window"]

    @property
    def accepted(self) -> int:
        t = self.target
        return t["acc_draft"] + t["acc_suffix"] + t["acc_root"] + t["acc_window"]


@dataclass
class PromptTrace:
    label: str
    prompt_len: int
    new_tokens: int
    final_lengths: list[int]
    steps: list[Step]
    record: dict = field(repr=False, default_factory=dict)


@dataclass
class Trace:
    name: str
    config: dict
    warm_pool: bool
    prompts: list[PromptTrace]
    raw: dict = field(repr=False, default_factory=dict)

    @property
    def phrase_len(self) -> int:
        return self.config["ngram"] - 1


def parse_trace(raw: dict) -> Trace:
    """A trace file's dict -> `Trace` (layout fields expanded, the others 0). Raises
    ValueError for another format or a malformed step."""
    if raw.get("format") != TRACE_FORMAT:
        raise ValueError(f"not a {TRACE_FORMAT} trace: format {raw.get('format')!r}")
    layout = raw["layout"]
    draft_fields, target_fields = layout["draft"], layout["target"]
    for name in draft_fields:
        if name not in DRAFT_FIELDS:
            raise ValueError(f"unknown draft field {name!r}")
    for name in target_fields:
        if name not in TARGET_FIELDS:
            raise ValueError(f"unknown target field {name!r}")
    width = len(draft_fields)
    prompts = []
    for record in raw["prompts"]:
        steps = []
        for index, (draft, target, lookup, update, gap) in enumerate(record["steps"]):
            if width == 0 and draft or width and len(draft) % width:
                raise ValueError(f"{raw['name']} {record['label']} step {index}: draft list "
                                 f"of {len(draft)} numbers for {width} fields per pass")
            passes = []
            for start in range(0, len(draft), max(width, 1)):
                values = dict(zip(draft_fields, draft[start:start + width]))
                passes.append(tuple(values.get(name, 0) for name in DRAFT_FIELDS))
            if len(target) != len(target_fields):
                raise ValueError(f"{raw['name']} {record['label']} step {index}: target "
                                 f"list {target} for fields {target_fields}")
            values = dict(zip(target_fields, target))
            steps.append(Step(passes, {name: values.get(name, 0) for name in TARGET_FIELDS},
                              lookup, update[0], update[1], update[2], gap))
        prompts.append(PromptTrace(record["label"], record["prompt_len"],
                                   record["new_tokens"], list(record["final_lengths"]),
                                   steps, record))
    return Trace(raw["name"], raw["config"], bool(raw.get("warm_pool")), prompts, raw)


# The order a budget-limited run replays the committed traces in: the main configuration,
# the two classic methods, the paper's ablations, then the larger and smaller trees.
PRIORITY = ("ouroboros_g8_k8_n5", "speculative_g4", "lookahead_n4_k4_w4",
            "ablation_no_phrases", "ablation_no_suffixes", "ablation_no_inspiration",
            "ablation_no_refinement", "ouroboros_g8_k8_n5_warm", "ouroboros_g4_k4_n4",
            "ouroboros_g12_k16_n7", "speculative_g8", "lookahead_n5_k8_w8",
            "ouroboros_g8_k8_n5_window", "ouroboros_g12_k16_n7_window")


def load_traces(folder: Path, names: Sequence[str] | None = None) -> list[Trace]:
    """The traces of ``folder`` (``*.json``): in ``names``' order, else those of `PRIORITY`
    in its order, then the others by file name."""
    folder = Path(folder)
    if names:
        paths = [folder / f"{name}.json" for name in names]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"no trace file {', '.join(missing)}")
    else:
        rank = {name: i for i, name in enumerate(PRIORITY)}
        paths = sorted(folder.glob("*.json"),
                       key=lambda p: (rank.get(p.stem, len(rank)), p.stem))
    return [parse_trace(json.loads(path.read_text())) for path in paths]


def check_trace(trace: Trace) -> list[str]:
    """Consistency problems of a trace (empty: consistent): accepted nodes of every kind
    within the nodes verified, draft acceptance within each pass's tree, the cache
    lengths implied by the steps equal to those recorded, the draft's pending tokens
    equal to what its cache lacked, tokens emitted covering the new tokens."""
    problems = []
    cfg = trace.config
    for prompt in trace.prompts:
        where = f"{trace.name} {prompt.label}"
        target_len = draft_len = prompt.prompt_len - 1
        emitted = 0
        for i, step in enumerate(prompt.steps):
            t = step.target
            for kind in ("draft", "suffix", "root", "window"):
                if not 0 <= t[f"acc_{kind}"] <= t[kind]:
                    problems.append(f"{where} step {i}: {t[f'acc_{kind}']} accepted {kind} "
                                    f"nodes of {t[kind]}")
            if step.accepted > step.tree_nodes:
                problems.append(f"{where} step {i}: accepted {step.accepted} > tree "
                                f"{step.tree_nodes}")
            if t["draft"] > cfg["gamma"]:
                problems.append(f"{where} step {i}: {t['draft']} draft nodes > gamma")
            if t["acc_suffix"] and t["acc_draft"] != t["draft"]:
                problems.append(f"{where} step {i}: suffix tokens accepted after a rejected "
                                f"draft")
            if t["pending"] != 1:
                problems.append(f"{where} step {i}: target pending {t['pending']} != 1")
            for j, (pending, phrase, window, accepted) in enumerate(step.draft):
                if accepted > phrase + window:
                    problems.append(f"{where} step {i} draft pass {j}: accepted {accepted} "
                                    f"of {phrase + window} nodes")
                if j == 0 and cfg["use_draft"] and pending != target_len + 1 - draft_len:
                    problems.append(f"{where} step {i}: first draft pass feeds {pending} "
                                    f"pending tokens, its cache lacked "
                                    f"{target_len + 1 - draft_len}")
                draft_len += pending + accepted
            drafted = sum(accepted + 1 for _, _, _, accepted in step.draft)
            if t["draft"] > drafted:
                problems.append(f"{where} step {i}: {t['draft']} draft nodes from "
                                f"{drafted} drafted tokens")
            target_len += t["pending"] + step.accepted
            if cfg["use_draft"]:
                if step.gap < 0 or target_len - step.gap > draft_len:
                    problems.append(f"{where} step {i}: draft cache gap {step.gap} does not "
                                    f"fit its {draft_len} rows")
                draft_len = target_len - step.gap
            emitted += step.accepted + 1
        if prompt.final_lengths[0] != target_len:
            problems.append(f"{where}: target cache ends at {target_len}, recorded "
                            f"{prompt.final_lengths[0]}")
        if cfg["use_draft"] and prompt.final_lengths[1] != draft_len:
            problems.append(f"{where}: draft cache ends at {draft_len}, recorded "
                            f"{prompt.final_lengths[1]}")
        if emitted < prompt.new_tokens or emitted - prompt.new_tokens > \
                (prompt.steps[-1].accepted if prompt.steps else 0):
            problems.append(f"{where}: steps emit {emitted} tokens for {prompt.new_tokens}")
    return problems


# ============================================================================ models


def build_model(keywords: dict, device: torch.device, dtype: torch.dtype,
                seed: int) -> torch.nn.Module:
    """A random-weight ``LlamaForCausalLM`` built directly on ``device`` in ``dtype``;
    no EOS (every generation runs to its length), SDPA attention."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(max_position_embeddings=8192, bos_token_id=None, eos_token_id=None,
                         pad_token_id=0, initializer_range=0.02, **keywords)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model = model.to(device).eval()  # built in dtype (RoPE's inverse frequencies stay fp32)
    model.generation_config.eos_token_id = None
    model.generation_config.bos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ============================================================================ timing helpers


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class HostReads:
    """Counts every read of a tensor's data into Python while active: ``tolist()``,
    ``item()``, and ``bool()`` / ``int()`` / ``float()`` of a tensor (the class attributes
    patched; restored on exit), per calling function (`by_caller`)."""

    METHODS = ("tolist", "item", "__bool__", "__int__", "__float__")
    SKIP = frozenset({"host_read", "read", "<lambda>", "counted"})

    def __init__(self) -> None:
        self.count = 0
        self.by_caller: dict[str, int] = {}

    def _note(self) -> None:
        self.count += 1
        frame = sys._getframe(2)
        while frame is not None and frame.f_code.co_name in self.SKIP:
            frame = frame.f_back
        name = frame.f_code.co_name if frame is not None else "?"
        self.by_caller[name] = self.by_caller.get(name, 0) + 1

    def read(self, tensor: torch.Tensor) -> list:
        """``tensor.tolist()``, counted (for functions that take a reader)."""
        return tensor.tolist()

    @contextlib.contextmanager
    def active(self):
        originals = {name: getattr(torch.Tensor, name) for name in self.METHODS}
        counter = self

        def wrap(method):
            def counted(tensor, *args, **kwargs):
                counter._note()
                return method(tensor, *args, **kwargs)
            return counted

        for name, method in originals.items():
            setattr(torch.Tensor, name, wrap(method))
        try:
            yield self
        finally:
            for name, method in originals.items():
                setattr(torch.Tensor, name, method)


class Clock:
    """Wall time per phase; ``phase(name)`` ends with a device synchronisation."""

    PHASES = ("draft", "verify", "pool", "host")

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds = dict.fromkeys(self.PHASES, 0.0)

    @contextlib.contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            synchronize(self.device)
            self.seconds[name] += time.perf_counter() - start


# ============================================================================ the replay


class Replayer:
    """Replays traces through the engine's pieces on one target / draft pair."""

    def __init__(self, target, draft, device: torch.device, rows: dict[str, int],
                 seed: int = 0) -> None:
        from ouroboros.attention import register, resolve_backend
        from ouroboros.cache import StaticKVCache, cache_kwarg_name
        from ouroboros.generate import ModelRunner

        register()
        self.device = device
        self.backend = resolve_backend(None, device)
        self.target, self.draft = target, draft
        self.runners = {}
        for name, model in (("target", target), ("draft", draft)):
            cache = StaticKVCache.for_model(model, rows[name], 1)
            self.runners[name] = ModelRunner(model, cache, cache_kwarg_name(model),
                                             self.backend)
        self.vocab = target.config.vocab_size
        self.rng = random.Random(seed)
        self._next = self.rng.randrange(self.vocab)
        widest = max(rows.values())
        self.index = torch.arange(widest, dtype=torch.int32, device=device)[None]
        self.lengths = torch.arange(widest, dtype=torch.int32, device=device)
        self.pools: dict[tuple[int, int], object] = {}
        self.buffers: dict = {}
        self.reads = HostReads()
        from ouroboros.policy import lookup_phrases

        self._lookup = lookup_phrases
        self._lookup_read = "read" in inspect.signature(lookup_phrases).parameters

    # ------------------------------------------------------------------ pieces

    def pool(self, trace: Trace):
        from ouroboros_kernels import CandidatePool

        key = (trace.config["pool_capacity"], trace.phrase_len)
        pool = self.pools.get(key)
        if pool is None:
            self.pools.clear()  # one pool alive at a time (128k keys: tens of MB)
            pool = self.pools[key] = CandidatePool(self.vocab, key[0], key[1],
                                                   device=self.device)
            self.buffers = {}
        return pool

    def tokens(self, count: int) -> list[int]:
        """The next ``count`` token ids of a running counter (modulo the vocabulary): any
        tree of fewer nodes than the vocabulary gets distinct tokens, so its trie never
        merges two of the recorded nodes."""
        start = self._next
        self._next = (start + count) % self.vocab
        return [(start + i) % self.vocab for i in range(count)]

    def lookup(self, pool, keys: int, count: int) -> None:
        key_ids = [self.rng.randrange(self.vocab) for _ in range(keys)]
        if self._lookup_read:
            self._lookup(pool, key_ids, count, self.buffers, self.device, self.reads.read)
        else:
            self._lookup(pool, key_ids, count, self.buffers, self.device)

    def insert(self, pool, rows: int, length: int) -> None:
        if rows:
            table = torch.tensor([self.tokens(length + 1) for _ in range(rows)],
                                 dtype=torch.int64, device=self.device)
            pool.insert(table[:, 0], table[:, 1:])

    def refine(self, pool, count: int, length: int, capacity: int) -> None:
        if count:
            keys = torch.tensor([self.rng.randrange(self.vocab) for _ in range(count)],
                                dtype=torch.int64, device=self.device)
            slots = torch.tensor([self.rng.randrange(capacity) for _ in range(count)],
                                 dtype=torch.int64, device=self.device)
            phrases = torch.tensor([self.tokens(length) for _ in range(count)],
                                   dtype=torch.int64, device=self.device)
            pool.refine(keys, slots, phrases)

    def add_phrases(self, tree, parent: int, nodes: int, length: int) -> None:
        """``nodes`` nodes as phrases of ``length`` hanging from ``parent`` (the last
        one shorter)."""
        while nodes > 0:
            size = min(length, nodes)
            tree.add_path(parent, self.tokens(size))
            nodes -= size

    def add_window(self, tree, nodes: int, rows: int, columns: int) -> None:
        """A whole Jacobi window (``rows`` x ``columns`` cells) from the pending end, or
        ``nodes`` cells as phrases when the recorded window was cut."""
        from ouroboros.policy import JacobiWindow

        if nodes == rows * columns:
            JacobiWindow([self.tokens(columns) for _ in range(rows)]).attach(tree, -1)
        else:
            self.add_phrases(tree, -1, nodes, max(columns, 1))

    def commit(self, runner, pending: int, accepted: int) -> None:
        """``StaticKVCache.commit`` of ``pending`` rows plus ``accepted`` tree rows (the
        recorded length, forced; nodes 0 .. accepted - 1 moved)."""
        if accepted:
            runner.cache.commit(pending, self.index[:, :accepted],
                                self.lengths[accepted:accepted + 1], accepted, self.backend)
        else:
            runner.cache.commit(pending)

    def forward_accept(self, runner, pending: list[int], tree) -> None:
        """One engine pass over ``pending`` + ``tree``, its argmax and acceptance."""
        from ouroboros.generate import accept_rows, forward_rows

        logits = forward_rows(runner, [(pending, tree)])
        accept_rows([tree], logits.argmax(dim=-1), False)

    # ------------------------------------------------------------------ one prompt

    def replay_prompt(self, trace: Trace, prompt: PromptTrace, clock: Clock,
                      max_steps: int | None = None) -> dict:
        """Replay one prompt's steps; returns its counters (seconds include prefill)."""
        from ouroboros.generate import TokenTree, prefill_rows

        cfg = trace.config
        length, columns = trace.phrase_len, cfg["window_size"]
        use_draft = cfg["use_draft"]
        target, draft = self.runners["target"], self.runners["draft"]
        uses_pool = (use_draft and cfg["draft_phrases"] > 0) or cfg["num_suffixes"] > 0 or \
            cfg["root_phrases"] > 0 or cfg["window"]
        pool = self.pool(trace) if uses_pool else None
        device = self.device
        prompt_tokens = [self.rng.randrange(self.vocab) for _ in range(prompt.prompt_len)]
        reads_before = self.reads.count
        callers_before = dict(self.reads.by_caller)
        synchronize(device)
        start = time.perf_counter()
        with clock.phase("pool"):
            if pool is not None and not trace.warm_pool:
                pool.clear()
            if pool is not None and cfg["seed_pool_from_prompt"]:
                pool.insert_ngrams(torch.tensor(prompt_tokens, dtype=torch.int64,
                                                device=device))
        target.cache.reset()
        draft.cache.reset()
        with clock.phase("verify"):
            prefill_rows(target, [prompt_tokens[:-1]])
        if use_draft:
            with clock.phase("draft"):
                prefill_rows(draft, [prompt_tokens[:-1]])
        synchronize(device)
        prefill = time.perf_counter() - start
        steps = prompt.steps if max_steps is None else prompt.steps[:max_steps]
        draft_passes = 0
        for step in steps:
            t = step.target
            for pending, phrase, window, accepted in step.draft:
                if pool is not None and cfg["draft_phrases"]:
                    with clock.phase("pool"):
                        self.lookup(pool, 1, cfg["draft_phrases"])
                with clock.phase("host"):
                    tree = TokenTree()
                    self.add_phrases(tree, -1, phrase, length)
                    if window:
                        self.add_window(tree, window, length, columns)
                    fed = self.tokens(pending)
                with clock.phase("draft"):
                    self.forward_accept(draft, fed, tree)
                    self.commit(draft, pending, accepted)
                draft_passes += 1
                if pool is not None and cfg["window"] and window == columns * length:
                    with clock.phase("pool"):
                        self.insert(pool, columns, length)
            if pool is not None and step.lookup:
                with clock.phase("pool"):
                    self.lookup(pool, 2, step.lookup)
            with clock.phase("host"):
                tree = TokenTree()
                chain = tree.add_path(-1, self.tokens(t["draft"]))
                self.add_phrases(tree, -1, t["root"], length)
                self.add_phrases(tree, chain[-1] if chain else -1, t["suffix"], length)
                if t["window"]:
                    self.add_window(tree, t["window"], length, columns)
                if len(tree) != step.tree_nodes:
                    raise RuntimeError(f"replayed tree of {len(tree)} nodes for "
                                       f"{step.tree_nodes}")
                fed = self.tokens(t["pending"])
            with clock.phase("verify"):
                self.forward_accept(target, fed, tree)
                self.commit(target, t["pending"], step.accepted)
            if use_draft and step.draft:  # the engine rolls back only after a draft ran
                with clock.phase("draft"):
                    draft.cache.truncate(target.cache.host_lengths[0] - step.gap)
            if pool is not None and (step.refined or step.ngram_rows or step.output_ngrams):
                with clock.phase("pool"):
                    self.refine(pool, step.refined, length, cfg["pool_capacity"])
                    self.insert(pool, step.ngram_rows + step.output_ngrams, length)
        synchronize(device)
        seconds = time.perf_counter() - start
        lengths = [target.cache.host_lengths[0], draft.cache.host_lengths[0]]
        if max_steps is None:
            if lengths[0] != prompt.final_lengths[0] or \
                    (use_draft and lengths[1] != prompt.final_lengths[1]):
                raise RuntimeError(f"{trace.name} {prompt.label}: replay ended with cache "
                                   f"lengths {lengths}, the trace with {prompt.final_lengths}")
        return {"seconds": seconds, "prefill": prefill, "steps": len(steps),
                "tokens": prompt.new_tokens, "draft_passes": draft_passes,
                "target_tokens": sum(s.target["pending"] + s.tree_nodes for s in steps),
                "host_reads": self.reads.count - reads_before,
                "host_reads_by": {name: count - callers_before.get(name, 0)
                                  for name, count in self.reads.by_caller.items()
                                  if count != callers_before.get(name, 0)}}

    def replay(self, trace: Trace, prompts: Sequence[PromptTrace],
               max_steps: int | None = None) -> dict:
        """Replay ``prompts`` of ``trace`` (the attention switched to the engine's while
        it runs); totals and the time split."""
        from ouroboros.attention import ouroboros_attention

        clock = Clock(self.device)
        runs = []
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.inference_mode())
            stack.enter_context(ouroboros_attention(self.target))
            stack.enter_context(ouroboros_attention(self.draft))
            stack.enter_context(self.reads.active())
            for prompt in prompts:
                runs.append(self.replay_prompt(trace, prompt, clock, max_steps))
        totals = {key: sum(run[key] for run in runs) for key in runs[0]
                  if key != "host_reads_by"}
        totals["host_reads_by"] = {}
        for run in runs:
            for name, count in run["host_reads_by"].items():
                totals["host_reads_by"][name] = totals["host_reads_by"].get(name, 0) + count
        totals["per_prompt_seconds"] = [run["seconds"] for run in runs]
        totals["split"] = dict(clock.seconds)
        return totals


# ============================================================================ baselines


class Greedy:
    """transformers' greedy ``generate`` on the target, timed per (prompt length, new
    tokens); ``cache="static"`` with ``compile`` (CUDA) or eager."""

    def __init__(self, model, device: torch.device, cache: str, compile: bool,
                 seed: int = 0) -> None:
        self.model, self.device, self.cache, self.compile = model, device, cache, compile
        self.rng = random.Random(seed)
        self.seconds: dict[tuple[int, int], float] = {}

    def _kwargs(self) -> dict:
        if self.cache == "dynamic":
            return {}
        kwargs = {"cache_implementation": "static"}
        if not self.compile:
            kwargs["disable_compile"] = True
        return kwargs

    @torch.inference_mode()
    def run(self, prompt_len: int, new_tokens: int) -> float:
        ids = torch.tensor([[self.rng.randrange(self.model.config.vocab_size)
                             for _ in range(prompt_len)]], dtype=torch.int64,
                           device=self.device)
        synchronize(self.device)
        start = time.perf_counter()
        out = self.model.generate(ids, attention_mask=torch.ones_like(ids),
                                  max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                  do_sample=False, **self._kwargs())
        synchronize(self.device)
        seconds = time.perf_counter() - start
        if out.shape[1] != prompt_len + new_tokens:
            raise RuntimeError(f"greedy generated {out.shape[1] - prompt_len} tokens, asked "
                               f"for {new_tokens}")
        return seconds

    def time(self, prompt_len: int, new_tokens: int) -> float:
        key = (prompt_len, new_tokens)
        if key not in self.seconds:
            self.seconds[key] = self.run(prompt_len, new_tokens)
        return self.seconds[key]


# ============================================================================ report


def card_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "none"


def device_slug(device: torch.device) -> str:
    if device.type != "cuda":
        return device.type
    name = card_name(device).lower()
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def versions() -> str:
    import transformers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    cuda = f", CUDA {torch.version.cuda}" if torch.version.cuda else ""
    return (f"python {platform.python_version()}, torch {torch.__version__}{cuda}, "
            f"transformers {transformers.__version__}, triton {triton_version}")


def shown_path(path: Path) -> str:
    """``path`` relative to the repository when it lies inside it."""
    root = Path(__file__).resolve().parents[1]
    try:
        return str(Path(path).resolve().relative_to(root))
    except ValueError:
        return str(path)


def fmt(value: float | None, spec: str = ".2f", suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def markdown(report: dict) -> str:
    lines = [f"# Replay of recorded acceptance traces at real shapes ({report['device']})",
             "",
             f"* card: {report['card']}; {report['versions']}",
             f"* date: {report['date']}; machine: {report['machine']}",
             f"* shapes: {report['shapes_title']}; dtype {report['dtype']}; target "
             f"{report['target_params'] / 1e9:.2f} B parameters, draft "
             f"{report['draft_params'] / 1e9:.2f} B",
             f"* traces: {report['traces_from']} (recorded with {report['traces_pair']} on "
             f"{report['traces_prompts']}; {report['traces_machine']}); {report['prompts']} "
             f"prompt(s) per configuration, the same for every configuration and the "
             f"baselines",
             f"* baselines: transformers greedy `generate` on the same target, same prompt "
             f"lengths and new tokens: eager = dynamic cache; static = "
             f"`cache_implementation=\"static\"` {report['static_note']}",
             f"* budget: {report['budget_s']:.0f} s, used {report['elapsed_s']:.0f} s "
             f"(models {report['build_s']:.0f} s, warm-up {report['warmup_s']:.0f} s, "
             f"baselines {report['baseline_s']:.0f} s)",
             "",
             "Projected speed-up = greedy time / replay time for the same tokens (prefill "
             "included). Split: milliseconds per step (draft passes incl. their commits and "
             "the roll-back / target pass incl. acceptance and compaction / pool / host "
             "tree building), each phase ending in a device sync. The last column is the "
             "engine's time per decoding step outside its draft / verify / pool timers when "
             "the trace was recorded (its tree policy and bookkeeping in Python, on the "
             "recording CPU), which the replay's synthetic trees do not run.",
             "",
             "| configuration | tokens | steps | tokens/step | target tree | draft passes/step "
             "| ms/step: draft / verify / pool / host | host reads/step | ms/token | "
             "speed-up vs eager | vs static | engine other ms/step (recording CPU) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, row in report["results"].items():
        if row.get("skipped"):
            lines.append(f"| {name} | skipped: {row['skipped']} |" + " |" * 10)
            continue
        steps = max(row["steps"], 1)
        split = " / ".join(f"{1e3 * row['split'][p] / steps:.1f}" for p in Clock.PHASES)
        lines.append(
            f"| {name} | {row['tokens']} | {row['steps']} | {row['tokens'] / steps:.2f} | "
            f"{row['target_tokens'] / steps:.1f} | {row['draft_passes'] / steps:.2f} | "
            f"{split} | {row['host_reads'] / steps:.1f} | "
            f"{1e3 * row['seconds'] / max(row['tokens'], 1):.2f} | "
            f"{fmt(row.get('speedup_eager'), '.2f', 'x')} | "
            f"{fmt(row.get('speedup_static'), '.2f', 'x')} | "
            f"{fmt(row.get('recorded_other_ms_per_step'), '.1f')} |")
    reads = [f"{name}: " + ", ".join(f"{caller} {count / max(row['steps'], 1):.2f}"
                                     for caller, count in sorted(row["host_reads_by"].items()))
             for name, row in report["results"].items() if not row.get("skipped")]
    if reads:
        lines += ["", "Host reads per step by the function that made them (`accept`: the "
                  "engine's acceptance, one per pass; `lookup_phrases`: one per pool lookup; "
                  "`_check_parents`: `ouroboros_kernels.build_tree` validating a tree's "
                  "parents, one per pass with a tree mask; `_check_range`: the pool's "
                  "argument checks, CPU only):", ""] + [f"* {line}" for line in reads]
    base = report["baselines"]
    lines += ["", "Greedy baselines (same prompts): " + "; ".join(
        f"{name}: {fmt(1e3 * b['seconds'] / max(b['tokens'], 1), '.2f')} ms/token "
        f"({b['tokens']} tokens in {b['seconds']:.2f} s{', ' + b['note'] if b.get('note') else ''})"
        for name, b in base.items())]
    if report["notes"]:
        lines += [""] + [f"* {note}" for note in report["notes"]]
    return "\n".join(lines) + "\n"


# ============================================================================ main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--traces", type=Path, default=DEFAULT_TRACES)
    parser.add_argument("--configs", default="", help="comma-separated trace names "
                        "(default: every trace in --traces)")
    parser.add_argument("--shapes", choices=sorted(SHAPES), default="llama3")
    parser.add_argument("--device", default=None, help="default: cuda when present, else cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 "
                        "on the CPU")
    parser.add_argument("--prompts", type=int, default=3,
                        help="prompts of each trace replayed (the first ones; default 3)")
    parser.add_argument("--budget-s", type=float, default=240.0)
    parser.add_argument("--compile-estimate-s", type=float, default=75.0,
                        help="time the static baseline's compile warm-up is assumed to take "
                        "(75 s; it runs eager when that would not leave a third of the "
                        "budget to the replays)")
    parser.add_argument("--no-compile", action="store_true",
                        help="the static-cache baseline without torch.compile")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true",
                        help="1 prompt per configuration, a budget of at most 120 s")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    if args.quick:
        args.prompts = 1
        args.budget_s = min(args.budget_s, 120.0)
    if args.prompts < 1:
        parser.error("--prompts must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()

    def log(text: str) -> None:
        print(f"bench_replay [{time.perf_counter() - started:5.0f} s] {text}", file=sys.stderr,
              flush=True)

    def left() -> float:
        return args.budget_s - (time.perf_counter() - started)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype) if args.dtype else \
        (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    traces = load_traces(args.traces, names or None)
    if not traces:
        raise SystemExit(f"bench_replay.py: no traces in {args.traces}")
    problems = [p for trace in traces for p in check_trace(trace)]
    if problems:
        raise SystemExit("bench_replay.py: inconsistent traces:\n  " + "\n  ".join(problems))
    notes: list[str] = []

    # Cache rows: the longest prompt + its steps' largest pass + margin, over all traces.
    rows = {"target": 16, "draft": 16}
    for trace in traces:
        for prompt in trace.prompts[:args.prompts]:
            end = prompt.prompt_len + prompt.new_tokens + 16
            widest_target = max((s.target["pending"] + s.tree_nodes for s in prompt.steps),
                                default=1)
            widest_draft = max((p + ph + w for s in prompt.steps for p, ph, w, _ in s.draft),
                               default=1)
            rows["target"] = max(rows["target"], end + widest_target)
            rows["draft"] = max(rows["draft"], end + widest_draft + trace.config["gamma"])

    log(f"building {args.shapes} models on {device} ({dtype}) ...")
    target_kw, draft_kw = SHAPES[args.shapes]
    target = build_model(target_kw, device, dtype, args.seed)
    draft = build_model(draft_kw, device, dtype, args.seed + 1)
    synchronize(device)
    build_s = time.perf_counter() - started
    log(f"models built in {build_s:.0f} s (target {parameter_count(target) / 1e9:.2f} B, "
        f"draft {parameter_count(draft) / 1e9:.2f} B parameters)")
    replayer = Replayer(target, draft, device, rows, args.seed)

    # Warm-up (untimed): a few steps of every trace (kernels, allocator, every tree kind).
    warm_start = time.perf_counter()
    for trace in traces:
        replayer.replay(trace, trace.prompts[:1], max_steps=4)
    warmup_s = time.perf_counter() - warm_start
    log(f"replay warm-up {warmup_s:.1f} s")

    # Baselines: every prompt the replay uses (same lengths and token counts). Eager
    # first; the static-cache baseline (a compile warm-up on CUDA) runs after the replays,
    # so that a warm-up longer than expected cannot cost the replay's results (the report
    # is written after the replays and again at the end).
    base_start = time.perf_counter()
    wanted = sorted({(p.prompt_len, p.new_tokens) for trace in traces
                     for p in trace.prompts[:args.prompts]})
    eager = Greedy(target, device, "dynamic", compile=False, seed=args.seed)
    eager.run(wanted[0][0], min(8, wanted[0][1]))  # warm-up
    for key in wanted:
        eager.time(*key)
    eager_s = sum(eager.seconds.values())
    baseline_s = time.perf_counter() - base_start
    log(f"greedy eager: {eager_s:.2f} s for {len(wanted)} prompt(s)")
    compile_static = device.type == "cuda" and not args.no_compile
    # Kept for the static baseline at the end: its warm-up (two runs of the longest
    # prompt, compiling on CUDA) and its timed runs (about the eager time each).
    longest = max(wanted, key=lambda k: k[0] + k[1])
    one_run = eager.seconds[longest]
    static_eager_need = 3 * one_run + eager_s
    static_need = static_eager_need + (args.compile_estimate_s if compile_static else 0.0)
    if compile_static and left() - static_need < 0.35 * args.budget_s:
        compile_static = False
        static_need = static_eager_need
        notes.append(f"static baseline: the compile warm-up (assumed "
                     f"{args.compile_estimate_s:.0f} s) would not leave a third of the budget "
                     f"to the replays; the static cache is timed eager")
    static_note = "(eager: no compile on the CPU)" if device.type != "cuda" else \
        "(eager: --no-compile)" if args.no_compile else \
        "+ transformers' automatic torch.compile of the decoding forward (reduce-overhead)" \
        if compile_static else "(eager: the compile warm-up would not fit the budget)"

    results: dict[str, dict] = {}
    per_pass: list[float] = []  # seconds per (target pass + draft passes) of replays so far
    for trace in traces:
        prompts = trace.prompts[:args.prompts]
        passes = sum(len(s.draft) + 1 for p in prompts for s in p.steps)
        estimate = passes * (sum(per_pass) / len(per_pass)) if per_pass else 0.0
        room = left() - static_need
        if room <= 0 or (estimate and room < estimate * 1.1):
            why = f"budget (needs ~{estimate:.0f} s, {max(room, 0):.0f} s left)" if estimate \
                else "budget exhausted"
            results[trace.name] = {"skipped": why}
            log(f"{trace.name}: skipped ({why})")
            continue
        row = replayer.replay(trace, prompts)
        per_pass.append(row["seconds"] / max(passes, 1))
        keys = [(p.prompt_len, p.new_tokens) for p in prompts]
        row["greedy_eager_s"] = sum(eager.seconds[k] for k in keys)
        row["speedup_eager"] = row["greedy_eager_s"] / row["seconds"]
        row["config"] = trace.config
        row["prompt_labels"] = [p.label for p in prompts]
        row["prompt_keys"] = keys  # (prompt length, new tokens): the baselines' runs
        recorded = [p.record.get("step_seconds") for p in prompts]
        if all(isinstance(r, list) and len(r) == 2 for r in recorded):
            # The engine's time in its decoding steps outside its draft / verify / pool
            # timers when the trace was recorded (its tree policy and bookkeeping in
            # Python), per step: what the replay's synthetic trees stand in for.
            other = sum(r[1] for r in recorded)
            row["recorded_other_ms_per_step"] = 1e3 * other / max(row["steps"], 1)
        results[trace.name] = row
        log(f"{trace.name}: {row['tokens']} tokens in {row['seconds']:.2f} s, "
            f"{row['speedup_eager']:.2f}x eager")

    skipped = [name for name, row in results.items() if row.get("skipped")]
    if skipped:
        notes.append(f"{len(skipped)} configuration(s) skipped to stay within --budget-s "
                     f"{args.budget_s:.0f}: {', '.join(skipped)}")
    tokens = sum(k[1] for k in wanted)
    report = {
        "device": device.type, "card": card_name(device), "versions": versions(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.node() or 'machine'} ({os.cpu_count()} cores, "
                   f"{torch.get_num_threads()} torch threads)",
        "shapes": args.shapes, "shapes_title": SHAPE_TITLES[args.shapes],
        "dtype": str(dtype).replace("torch.", ""),
        "target_params": parameter_count(target), "draft_params": parameter_count(draft),
        "traces_from": shown_path(args.traces), "prompts": args.prompts,
        "traces_pair": traces[0].raw.get("pair", "an unnamed pair"),
        "traces_prompts": traces[0].raw.get("prompt_set", "unnamed prompts"),
        "traces_machine": traces[0].raw.get("machine", "an unnamed machine"),
        "static_note": "(not run yet)", "budget_s": args.budget_s,
        "elapsed_s": time.perf_counter() - started, "build_s": build_s,
        "warmup_s": warmup_s, "baseline_s": baseline_s,
        "baselines": {"eager": {"seconds": eager_s, "tokens": tokens}},
        "results": results, "skipped": skipped, "notes": notes, "cache_rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    slug = device_slug(device)

    def write() -> str:
        report["elapsed_s"] = time.perf_counter() - started
        text = markdown(report)
        (args.out / f"replay_{slug}.md").write_text(text)
        (args.out / f"replay_{slug}.json").write_text(json.dumps(report, indent=1,
                                                                 default=str))
        return text

    write()  # the replays with the eager baseline, in case the static one never ends

    if compile_static and left() < static_need:
        compile_static = False
        static_note = "(eager: the compile warm-up no longer fit the budget)"
        notes.append("static baseline: compile skipped, the budget ran short")
    static_start = time.perf_counter()
    static = Greedy(target, device, "static", compile=compile_static, seed=args.seed)
    try:
        if left() < static_eager_need:
            raise TimeoutError(f"skipped: {max(left(), 0):.0f} s of the budget left, it needs "
                               f"~{static_eager_need:.0f} s")
        warm = time.perf_counter()
        static.run(*longest)  # warm-up (compiles on CUDA) at the largest cache length
        static.run(*longest)
        log(f"greedy static warm-up {time.perf_counter() - warm:.1f} s "
            f"({'compiled' if compile_static else 'eager'})")
        for key in wanted:
            static.time(*key)
        static_s = sum(static.seconds.values())
        log(f"greedy static: {static_s:.2f} s")
        report["baselines"]["static"] = {"seconds": static_s, "tokens": tokens,
                                         "note": "compiled" if compile_static else "eager"}
        for row in results.values():
            if row.get("skipped"):
                continue
            row["greedy_static_s"] = sum(static.seconds[tuple(k)] for k in row["prompt_keys"])
            row["speedup_static"] = row["greedy_static_s"] / row["seconds"]
    except Exception as error:  # a transformers / compile failure must not sink the replay
        if isinstance(error, TimeoutError):
            notes.append(f"static baseline {error}")
            static_note = "(skipped for the budget)"
        else:
            notes.append(f"static baseline failed: {type(error).__name__}: {error}"[:300])
            static_note = "(failed, see the notes)"
        log(notes[-1])
    report["static_note"] = static_note
    report["baseline_s"] = baseline_s + time.perf_counter() - static_start
    text = write()
    print(text)
    log(f"wrote {args.out / f'replay_{slug}.md'} and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
