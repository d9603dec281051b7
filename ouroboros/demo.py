"""``ouroboros demo``: the same text, faster. The README's main command.

Loads the embedded pair (SmolLM2-135M-Instruct and the distilled draft shipped in the
package), then for a few built-in prompts (code, and chat in the tokenizer's chat template)
generates with the target's own greedy decoding (``target.generate(do_sample=False)``) and
with Ouroboros, streams both texts, and prints a table: tokens per second, tokens accepted
per target pass, speed-up and whether the outputs are identical. A mismatch is printed
loudly and the command exits with status 1.

Options: ``--max-new-tokens``, ``--device``, ``--prompts N``, ``--method`` (``ouroboros``,
``speculative``, ``lookahead``), ``--no-stream``, ``--no-tune`` (the preset instead of the
configuration tuned for this device, see `ouroboros.tuning`), ``--set FIELD=VALUE``
(override one `OuroborosConfig` field), ``--target`` / ``--draft`` (other models).

The command's entry in ``ouroboros.cli.COMMANDS`` is `add_arguments` + `run`; they use the
CLI's public helpers, imported inside them (``ouroboros.cli`` imports this module).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ouroboros.cli import TextStream

__all__ = ["DEMO_PROMPTS", "HELP", "DemoRow", "add_arguments", "encode_prompt", "format_table",
           "run", "run_demo"]

HELP = ("generate from built-in prompts with greedy decoding and with Ouroboros, and compare "
        "speed and output")

# (kind, text): "code" prompts are raw text for the model to continue, "chat" prompts a
# user turn in the chat template. Written for the demo (not from any training set).
DEMO_PROMPTS: tuple[tuple[str, str], ...] = (
    ("code", 'def merge_intervals(intervals: list[tuple[int, int]]) -> list[tuple[int, int]]:'
             '\n    """Merge overlapping closed intervals and return them sorted by start.\n\n'
             '    >>> merge_intervals([(1, 3), (2, 6), (8, 10)])\n    [(1, 6), (8, 10)]\n'
             '    """\n'),
    ("chat", "Explain the difference between a list and a dictionary in Python, with a short "
             "example of each."),
    ("code", 'def word_frequencies(text: str, top: int = 3) -> list[tuple[str, int]]:\n'
             '    """Return the `top` most frequent lower-cased words of `text` with their '
             'counts,\n    most frequent first.\n\n'
             '    >>> word_frequencies("the cat and the hat and the bat", 2)\n'
             "    [('the', 3), ('and', 2)]\n"
             '    """\n'),
    ("chat", "Write a short, friendly note reminding my team that the office is closed on "
             "Friday."),
    ("code", 'class Stack:\n    """A last-in, first-out stack backed by a Python list."""\n\n'
             '    def __init__(self) -> None:\n'),
    ("chat", "What are three good habits for writing maintainable code?"),
)

METHODS = ("ouroboros", "speculative", "lookahead")


@dataclass
class DemoRow:
    """One prompt of the demo: tokens, seconds of both runs, target passes, identical."""

    label: str
    tokens: int
    greedy_seconds: float
    method_seconds: float
    target_passes: int
    identical: bool

    @property
    def speedup(self) -> float:
        return self.greedy_seconds / self.method_seconds


class _TransformersStreamer:
    """transformers' streamer protocol (``put`` / ``end``) over a `TextStream`; the first
    ``put`` carries the prompt and is skipped."""

    def __init__(self, stream: TextStream) -> None:
        self.stream, self.prompt_seen = stream, False

    def put(self, value) -> None:
        if self.prompt_seen:
            self.stream(value.reshape(-1).tolist())
        self.prompt_seen = True

    def end(self) -> None:
        self.stream.end()


def encode_prompt(tokenizer, kind: str, text: str) -> list[int]:
    """Token ids of a demo prompt: a ``chat`` prompt in the tokenizer's chat template (as one
    user turn, ready for the answer; plain text when it has none, see
    `ouroboros.models.chat_prompt_ids`), a ``code`` prompt as plain text."""
    from ouroboros.models import chat_prompt_ids

    if kind == "chat":
        return chat_prompt_ids(tokenizer, text)
    if kind != "code":
        raise ValueError(f"kind must be 'code' or 'chat', got {kind!r}")
    return tokenizer(text).input_ids


def _timed(device, call: Callable[..., object], *args, **kwargs) -> tuple[object, float]:
    """``(call(*args, **kwargs), seconds)``, CUDA synchronised."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = call(*args, **kwargs)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return result, time.perf_counter() - start


def run_demo(target, draft, tokenizer, config, prompts, max_new_tokens: int, *,
             stream: bool = True, out=None) -> list[DemoRow]:
    """Greedy (``target.generate``) then ``config``'s method on each ``(kind, text)`` prompt;
    returns one `DemoRow` per prompt. Streams both texts to ``out`` unless ``stream`` is
    False (then only the method's text is printed, once)."""
    import torch

    from ouroboros.cli import TextStream
    from ouroboros.decoder import OuroborosDecoder

    out = out if out is not None else sys.stdout
    device = next(target.parameters()).device
    decoder = OuroborosDecoder(target, draft if config.use_draft else None, config)
    rows = []
    for index, (kind, text) in enumerate(prompts):
        label = f"{index + 1}: {kind}"
        ids = encode_prompt(tokenizer, kind, text)
        first_line = text.strip().splitlines()[0]
        out.write(f"\n=== prompt {index + 1}/{len(prompts)} ({kind}): {first_line[:70]}\n")
        input_ids = torch.tensor([ids], dtype=torch.int64, device=device)
        if stream:
            out.write("--- greedy (target.generate):\n")
            out.flush()
        greedy_stream = _TransformersStreamer(TextStream(tokenizer, out)) if stream else None
        with torch.inference_mode():
            reference, greedy_seconds = _timed(
                device, target.generate, input_ids, attention_mask=torch.ones_like(input_ids),
                max_new_tokens=max_new_tokens, do_sample=False, streamer=greedy_stream)
        reference = reference[0, len(ids):].tolist()
        if stream:
            out.write(f"--- {config.name}:\n")
            out.flush()
        method_stream = TextStream(tokenizer, out) if stream else None
        result, method_seconds = _timed(device, decoder.generate, ids, max_new_tokens,
                                        streamer=method_stream)
        if method_stream is not None:
            method_stream.end()
        tokens = result.new_tokens.tolist()
        if not stream:
            out.write(tokenizer.decode(tokens, skip_special_tokens=True) + "\n")
        identical = tokens == reference
        if not identical:
            at = next((i for i, (a, b) in enumerate(zip(tokens, reference, strict=False))
                       if a != b), min(len(tokens), len(reference)))
            out.write(f"!!! MISMATCH on prompt {index + 1}: {config.name} differs from greedy "
                      f"at new token {at} ({len(tokens)} vs {len(reference)} tokens)\n")
        out.write(f"[{config.name}] {result.stats.summary()}\n")
        out.flush()
        rows.append(DemoRow(label, len(reference), greedy_seconds, method_seconds,
                            result.stats.target_passes, identical))
    return rows


def format_table(rows: list[DemoRow], method: str) -> str:
    """The summary table (one row per prompt and a total)."""
    header = (f"| prompt | new tokens | greedy tok/s | {method} tok/s | tokens per target pass "
              f"| speed-up | outputs identical |")
    lines = [header, "|" + "---|" * 7]
    for row in rows:
        lines.append(f"| {row.label} | {row.tokens} | {row.tokens / row.greedy_seconds:.1f} | "
                     f"{row.tokens / row.method_seconds:.1f} | "
                     f"{row.tokens / max(row.target_passes, 1):.2f} | {row.speedup:.2f}x | "
                     f"{'yes' if row.identical else 'NO'} |")
    tokens = sum(r.tokens for r in rows)
    greedy = sum(r.greedy_seconds for r in rows)
    method_seconds = sum(r.method_seconds for r in rows)
    passes = sum(r.target_passes for r in rows)
    identical = all(r.identical for r in rows)
    lines.append(f"| **all** | {tokens} | {tokens / greedy:.1f} | {tokens / method_seconds:.1f} "
                 f"| {tokens / max(passes, 1):.2f} | {greedy / method_seconds:.2f}x | "
                 f"{'yes' if identical else 'NO'} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare the options of ``ouroboros demo`` on ``parser``."""
    parser.add_argument("--max-new-tokens", type=int, default=128,
                        help="new tokens per prompt at most (default 128)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: auto)")
    parser.add_argument("--dtype", default=None,
                        help="float32, bfloat16, float16 (default: float32 on CPU, bf16 on GPU)")
    parser.add_argument("--prompts", type=int, default=3,
                        help=f"how many built-in prompts to run, 1-{len(DEMO_PROMPTS)} "
                             f"(default 3: code, chat, code)")
    parser.add_argument("--method", choices=METHODS, default="ouroboros",
                        help="the method compared with greedy (default: ouroboros)")
    parser.add_argument("--no-stream", action="store_true",
                        help="do not stream the texts (print the method's text once)")
    parser.add_argument("--no-tune", action="store_true",
                        help="use the method's preset instead of the configuration tuned for "
                             "this device (also: OUROBOROS_TUNING=off)")
    parser.add_argument("--no-prepack", action="store_true",
                        help="CPU: keep transformers' stock linear kernels (see "
                             "ouroboros.tuning.prepack_linear_weights)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: measured, see "
                             "ouroboros.tuning.choose_num_threads)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override an OuroborosConfig field, e.g. --set gamma=8 "
                             "(repeatable)")
    from ouroboros.cli import FORCE_FLAG

    parser.add_argument(FORCE_FLAG, action="store_true",
                        help="run an architecture the engine is not verified for (same as "
                             "--set force_architecture=true), at your own risk")
    parser.add_argument("--target", default=None,
                        help="another target (HF directory or .gguf; default: embedded "
                             "SmolLM2-135M-Instruct)")
    parser.add_argument("--draft", default=None,
                        help="another draft (HF directory or .gguf; default: the distilled "
                             "draft shipped with the package)")


def _load_pair(args):
    from ouroboros.models import (
        load_demo_pair,
        load_model,
        load_tokenizer,
        resolve_device,
        resolve_dtype,
    )

    if args.target is None and args.draft is None:
        return load_demo_pair(args.device, args.dtype, progress=True)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    if args.target is not None:
        target = load_model(args.target, device=device, dtype=dtype)
        tokenizer = load_tokenizer(args.target)
    else:
        from ouroboros.models import load_target

        target, tokenizer = load_target(device=device, dtype=dtype)
    if args.draft is not None:
        draft = load_model(args.draft, device=device, dtype=dtype)
    else:
        from ouroboros.models import load_draft

        draft = load_draft(device=device, dtype=dtype)
    return target, draft, tokenizer


def run(args: argparse.Namespace) -> int:
    """Run ``ouroboros demo``: 0 when every output equals greedy decoding's, 1 otherwise;
    a bad option raises ``ouroboros.cli.CLIError`` before any model is loaded."""
    from ouroboros.cli import (
        CLIError,
        check_model_path,
        check_threads,
        config_from_flags,
        resolve_device_dtype,
    )
    from ouroboros.config import OuroborosConfig

    if not 1 <= args.prompts <= len(DEMO_PROMPTS):
        raise CLIError(f"--prompts must lie in [1, {len(DEMO_PROMPTS)}], got {args.prompts}")
    if args.max_new_tokens < 1:
        raise CLIError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    # An invalid --set value is a user error before the loading; the fields it sets are
    # fixed in the tuning (the rest is tuned around them).
    config_from_flags(args.method, args.set, force_architecture=args.force_architecture)
    overrides = OuroborosConfig.parse_overrides(args.set)
    if args.force_architecture:
        overrides["force_architecture"] = True
    check_threads(args.threads)
    for flag, path in (("--target", args.target), ("--draft", args.draft)):
        if path is not None:
            check_model_path(flag, path)
    resolve_device_dtype(args.device, args.dtype)  # a bad --device / --dtype: user error
    import torch

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    print("[ouroboros] loading the target (SmolLM2-135M-Instruct) and the draft...",
          file=sys.stderr, flush=True)
    start = time.perf_counter()
    target, draft, tokenizer = _load_pair(args)
    from ouroboros.tuning import choose_num_threads, prepack_linear_weights, tuned_config

    if not args.no_prepack:
        prepack_linear_weights(target)
        prepack_linear_weights(draft)
    if args.threads:
        torch.set_num_threads(args.threads)
    elif not args.no_tune:
        choose_num_threads(target)
    prompts = DEMO_PROMPTS[:args.prompts]
    # The draft's agreement (which sizes the trees) is measured on a sample of this workload.
    sample = [encode_prompt(tokenizer, kind, text) for kind, text in prompts[:2]]
    config = tuned_config(target, draft, tokenizer, method=args.method, prompts=sample,
                          tune=False if args.no_tune else None, progress=True,
                          adaptive=True, **overrides)
    device = next(target.parameters()).device
    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    print(f"[ouroboros] ready in {time.perf_counter() - start:.1f} s on {device}{threads}; "
          f"{args.method} configuration: {_describe(config)}", file=sys.stderr, flush=True)
    rows = run_demo(target, draft, tokenizer, config, prompts, args.max_new_tokens,
                    stream=not args.no_stream)
    print()
    print(format_table(rows, args.method))
    if all(row.identical for row in rows):
        print(f"\noutputs identical: yes ({args.method} reproduced greedy decoding token for "
              f"token on all {len(rows)} prompts)")
        return 0
    bad = ", ".join(row.label for row in rows if not row.identical)
    print(f"\n!!! outputs identical: NO — {args.method} differs from greedy on prompt(s) {bad}. "
          "This is a bug: please report it.", file=sys.stderr)
    print("outputs identical: NO")
    return 1


def _describe(config) -> str:
    parts = []
    if config.use_draft:
        parts += [f"gamma={config.gamma}", f"draft_phrases={config.draft_phrases}"]
    if config.uses_pool:
        parts += [f"ngram={config.ngram}", f"num_suffixes={config.num_suffixes}"]
        if getattr(config, "root_phrases", 0):
            parts.append(f"root_phrases={config.root_phrases}")
    parts.append(f"window={config.window_size if config.window else 'off'}")
    if config.adaptive:
        parts.append("adaptive trees within these")
    return ", ".join(parts)
