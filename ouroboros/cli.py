"""Command line: ``ouroboros <command> ...``.

``ouroboros generate --target PATH --draft PATH --prompt TEXT [--method ...]`` loads the
models (a Hugging Face directory or a ``.gguf`` file each), streams the generated text to
stdout and prints the decoding statistics to stderr.

``ouroboros demo`` runs the embedded pair on built-in prompts (``ouroboros.demo``).

A user error (missing or unreadable model, bad flag value, invalid ``--set``, a model pair
or architecture the engine refuses) is one line on stderr, ``ouroboros: error: <message>``,
with exit status 2; ``--debug`` (before or after the command) adds the traceback.

The commands are the entries of `COMMANDS` (name -> `Command`: help, the function that
declares its options, the function that runs it). Adding one: write its two functions
(in its own module if large, as ``ouroboros.demo``; it may use this module's public
helpers, imported inside its functions) and add an entry.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ouroboros import demo

__all__ = ["COMMANDS", "CLIError", "Command", "TextStream", "build_parser",
           "check_model_path", "check_threads", "config_from_flags", "main",
           "resolve_device_dtype"]

# The spelling of ``force_architecture`` on the command line (``generate`` and ``demo``).
FORCE_FLAG = "--force-architecture"


class CLIError(SystemExit):
    """A user error: `main` prints ``ouroboros: error: <message>`` (one line on stderr) and
    exits with status 2, like argparse's own usage errors. ``str(err)`` is the message."""

    def __init__(self, message: str) -> None:
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message


# Exceptions the package raises for bad input, reported in one line without a traceback:
# ValueError covers its subclasses (ouroboros_kernels.PoolFileError for an unreadable pool
# file, ouroboros.cache.CacheOverflowError, ...); FileNotFoundError the missing packaged
# models (ouroboros.models.load_target / load_draft).
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError)


def cli_message(err: BaseException) -> str:
    """The one-line message of a user error, with API spellings mapped to the CLI's flags
    (the architecture refusal's ``force=True`` becomes ``--force-architecture``)."""
    message = str(err) or type(err).__name__
    if "force=True" in message:
        message = re.sub(r"force=True \(or OuroborosConfig\(force_architecture=True\)\)",
                         FORCE_FLAG, message)
        message = message.replace("force=True", FORCE_FLAG)
    return " ".join(message.split())  # one line


@dataclass(frozen=True)
class Command:
    """One ``ouroboros <name>`` command: ``help`` (one line), ``add_arguments(parser)``
    declares its options, ``run(args)`` executes it and returns the exit status (a user
    error raises `CLIError` or one of `USER_ERRORS`)."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# ----------------------------------------------------------------------------- generate


def _add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    from ouroboros.config import PRESETS

    parser.add_argument("--target", required=True,
                        help="target model: a Hugging Face directory or a .gguf file")
    parser.add_argument("--draft", default=None,
                        help="draft model (same tokenizer): a directory or a .gguf file; "
                             "needed by --method speculative and ouroboros")
    parser.add_argument("--prompt", required=True, help="the prompt text")
    parser.add_argument("--chat", action="store_true",
                        help="wrap the prompt in the tokenizer's chat template")
    parser.add_argument("--method", choices=PRESETS, default="ouroboros",
                        help="decoding method (default: ouroboros)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="0 (default): greedy, identical to the target's own greedy text")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: auto)")
    parser.add_argument("--dtype", default=None,
                        help="float32, bfloat16, float16 (default: float32 on CPU, bf16 on GPU)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override an OuroborosConfig field, e.g. --set gamma=8 "
                             "(repeatable)")
    parser.add_argument("--no-stream", action="store_true",
                        help="print the text at the end instead of streaming it")
    parser.add_argument("--no-tune", action="store_true",
                        help="the method's plain preset (default: tuned for this device and "
                             "model pair, once and cached, with adaptive trees; also "
                             "OUROBOROS_TUNING=off)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (torch.set_num_threads, set before "
                             "loading; default: torch's own choice)")
    parser.add_argument(FORCE_FLAG, action="store_true",
                        help="run an architecture the engine is not verified for (same as "
                             "--set force_architecture=true), at your own risk")


def config_from_flags(method: str, items: Sequence[str], *,
                      force_architecture: bool = False):
    """``OuroborosConfig.from_overrides(items, method=method)`` (plus
    ``force_architecture=True`` for ``--force-architecture``), with its errors as user
    errors: ``--set <problem>`` for an item that does not parse (``--set gamma: expected an
    integer, got 'x'``), ``--set: <message>`` for a value the configuration refuses."""
    from ouroboros.config import OuroborosConfig, OverrideError

    fields = {"force_architecture": True} if force_architecture else {}
    try:
        return OuroborosConfig.from_overrides(items, method=method, **fields)
    except OverrideError as err:
        raise CLIError(f"--set {err}") from err
    except (ValueError, TypeError) as err:
        raise CLIError(f"--set: {err}" if items or fields else str(err)) from err


def check_threads(threads: int | None) -> None:
    """A user error unless ``threads`` is None or >= 1 (``--threads``)."""
    if threads is not None and threads < 1:
        raise CLIError(f"--threads must be >= 1, got {threads}")


def resolve_device_dtype(device: str | None, dtype: str | None):
    """``(torch.device, torch.dtype)`` from --device / --dtype, as user errors."""
    from ouroboros.models import resolve_device, resolve_dtype

    try:
        resolved = resolve_device(device)
    except ValueError as err:
        raise CLIError(f"--device: {err}") from err
    try:
        return resolved, resolve_dtype(dtype, resolved)
    except ValueError as err:
        raise CLIError(f"--dtype: {err}") from err


def check_model_path(flag: str, path: str) -> None:
    """A user error unless ``path`` exists (the message names the flag)."""
    if not os.path.exists(os.path.expanduser(path)):
        raise CLIError(f"{flag}: no model at {path}")


def _load(path: str, device, dtype, flag: str = "--target"):
    """(model, tokenizer) from a directory or a .gguf file, with ouroboros.models; a path
    that is missing or cannot be read is a user error naming ``flag``."""
    from ouroboros.models import load_pretrained

    check_model_path(flag, path)
    is_gguf = os.path.isfile(path) and path.lower().endswith(".gguf")
    # A GGUF file that cannot be parsed fails anywhere in the reader (ValueError, struct
    # errors, KeyError, ...): all of them mean a bad file. A directory: bad or missing files.
    errors = (Exception,) if is_gguf else (ValueError, OSError)
    try:
        return load_pretrained(path, device=device, dtype=dtype, progress=True)
    except errors as err:
        what = "cannot read the GGUF file" if is_gguf else "cannot load the model at"
        raise CLIError(f"{flag}: {what} {path}: {cli_message(err)}") from err


class TextStream:
    """Writes the decoded text of token chunks as they arrive (whole characters only).

    Called with ``list[int]`` chunks (the engine's streamer callback); `for_transformers`
    wraps it for ``generate(streamer=...)``."""

    def __init__(self, tokenizer, out) -> None:
        self.tokenizer, self.out = tokenizer, out
        self.tokens: list[int] = []
        self.printed = 0

    def __call__(self, chunk: list[int]) -> None:
        self.tokens += list(chunk)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for more tokens
            return
        self.out.write(text[self.printed:])
        self.out.flush()
        self.printed = len(text)

    def end(self) -> None:
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        self.out.write(text[self.printed:] + "\n")
        self.out.flush()


def _run_generate(args: argparse.Namespace) -> int:
    import torch

    from ouroboros.config import OuroborosConfig
    from ouroboros.decoder import OuroborosDecoder
    from ouroboros.models import chat_prompt_ids

    config = config_from_flags(args.method, args.set, force_architecture=args.force_architecture)
    if config.use_draft and args.draft is None:
        raise CLIError(f"--method {args.method} needs --draft (or use --method lookahead "
                       "or greedy)")
    if args.max_new_tokens < 1:
        raise CLIError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if not args.temperature >= 0:  # also NaN
        raise CLIError(f"--temperature must be >= 0 (0: greedy), got {args.temperature}")
    if args.temperature == 0:
        sampling_flags = [flag for flag, value in (("--top-k", args.top_k),
                                                   ("--top-p", args.top_p))
                          if value is not None]
        if sampling_flags:
            raise CLIError(f"{' and '.join(sampling_flags)} need(s) sampling: give "
                           "--temperature > 0 (--temperature 0, the default, decodes greedily)")
    if args.top_k is not None and args.top_k < 0:
        raise CLIError(f"--top-k must be >= 0, got {args.top_k}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise CLIError(f"--top-p must lie in (0, 1], got {args.top_p}")
    check_threads(args.threads)
    if args.draft is not None and config.use_draft:
        check_model_path("--draft", args.draft)
    device, dtype = resolve_device_dtype(args.device, args.dtype)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    target, tokenizer = _load(args.target, device, dtype, "--target")
    draft = None
    if config.use_draft:
        draft, _ = _load(args.draft, device, dtype, "--draft")
    if args.chat:
        try:
            ids = chat_prompt_ids(tokenizer, args.prompt, require_template=True)
        except ValueError as err:
            raise CLIError(f"--chat: {err} (give the prompt without --chat)") from err
    else:
        ids = tokenizer(args.prompt).input_ids
    device = next(target.parameters()).device
    input_ids = torch.tensor([ids], dtype=torch.int64, device=device)
    if not args.no_tune and config.name != "greedy":
        from ouroboros.tuning import tuned_config

        overrides = OuroborosConfig.parse_overrides(args.set)
        if args.force_architecture:
            overrides["force_architecture"] = True
        config = tuned_config(target, draft, tokenizer, method=args.method, progress=True,
                              adaptive=True, **overrides)
    decoder = OuroborosDecoder(target, draft, config)
    streamer = None if args.no_stream else TextStream(tokenizer, sys.stdout)
    temperature = args.temperature if args.temperature > 0 else None  # 0: greedy
    result = decoder.generate(input_ids, args.max_new_tokens, temperature=temperature,
                              top_k=args.top_k, top_p=args.top_p, seed=args.seed, streamer=streamer)
    if streamer is None:
        print(tokenizer.decode(result.new_tokens, skip_special_tokens=True))
    else:
        streamer.end()
    print(f"[{config.name}] {result.stats.summary()}", file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------- commands


COMMANDS: dict[str, Command] = {
    "generate": Command("generate text with a target (and draft) model",
                        _add_generate_arguments, _run_generate),
    "demo": Command(demo.HELP, demo.add_arguments, demo.run),
}


# ----------------------------------------------------------------------------- entry point


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every command of `COMMANDS`."""
    parser = argparse.ArgumentParser(
        prog="ouroboros",
        description="Lossless Ouroboros speculative decoding for Hugging Face Llama models.")
    debug_help = "on an error, show the Python traceback (default: one line on stderr)"
    parser.add_argument("--debug", action="store_true", help=debug_help)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in sorted(COMMANDS.items()):
        sub = commands.add_parser(name, help=command.help, description=command.help)
        command.add_arguments(sub)
        # Accepted after the command too; SUPPRESS keeps a top-level --debug.
        sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                         help=debug_help)
        sub.set_defaults(run=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ouroboros`` console script.

    A user error (a bad flag value, a missing or unreadable model, a configuration the
    engine refuses, ...) prints ``ouroboros: error: <message>`` on one line of stderr and
    raises `CLIError` (``SystemExit`` with status 2); ``--debug`` adds the traceback. Other
    exceptions (bugs) propagate with their traceback."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except CLIError as err:
        _report(err, err.message, args)
        raise
    except USER_ERRORS as err:
        message = cli_message(err)
        _report(err, message, args)
        raise CLIError(message) from err


def _report(err: BaseException, message: str, args: argparse.Namespace) -> None:
    if getattr(args, "debug", False):
        traceback.print_exception(err, file=sys.stderr)
    print(f"ouroboros: error: {' '.join(message.split())}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    # Run the package's module, not this __main__ copy: the commands (ouroboros.demo) import
    # CLIError and the helpers from ouroboros.cli, and main must catch that CLIError.
    from ouroboros.cli import main as package_main

    sys.exit(package_main())
