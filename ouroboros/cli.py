"""Command line: ``ouroboros <command> ...``.

``ouroboros generate --target PATH --draft PATH --prompt TEXT [--method ...]`` loads the
models (a Hugging Face directory or a ``.gguf`` file each), streams the generated text to
stdout and prints the decoding statistics to stderr.

Adding a command (e.g. ``ouroboros demo``): in its module, call
``register_command(name, help, add_arguments, run)`` at import time and list the module in
``COMMAND_MODULES`` below; ``main`` imports the listed modules that exist.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import fields

__all__ = ["COMMAND_MODULES", "TextStream", "main", "register_command"]

# Modules that register extra commands when imported (missing ones are skipped).
COMMAND_MODULES = ("ouroboros.demo",)

_COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None],
                           Callable[[argparse.Namespace], int]]] = {}


def register_command(name: str, help: str,
                     add_arguments: Callable[[argparse.ArgumentParser], None],
                     run: Callable[[argparse.Namespace], int]) -> None:
    """Make ``ouroboros <name>`` available: ``add_arguments(parser)`` declares its options,
    ``run(args)`` executes it and returns the exit status."""
    _COMMANDS[name] = (help, add_arguments, run)


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


def _parse_overrides(items: Sequence[str]) -> dict:
    from ouroboros.config import OuroborosConfig

    types = {f.name: f.type for f in fields(OuroborosConfig)}
    overrides = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or name not in types:
            raise SystemExit(f"--set expects FIELD=VALUE with FIELD one of "
                             f"{', '.join(sorted(types))}; got {item!r}")
        kind = str(types[name])
        if "bool" in kind:
            if value.lower() not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                raise SystemExit(f"--set {name}: expected true/false, got {value!r}")
            overrides[name] = value.lower() in ("true", "1", "yes", "on")
        elif "int" in kind:
            try:
                overrides[name] = int(value)
            except ValueError:
                raise SystemExit(f"--set {name}: expected an integer, got {value!r}") from None
        else:
            overrides[name] = None if value.lower() == "none" else value
    return overrides


def _load(path: str, device, dtype):
    """(model, tokenizer) from a directory or a .gguf file, with ouroboros.models."""
    from ouroboros.models import load_pretrained

    return load_pretrained(path, device=device, dtype=dtype, progress=True)


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

    config = OuroborosConfig.preset(args.method, **_parse_overrides(args.set))
    if config.use_draft and args.draft is None:
        raise SystemExit(f"--method {args.method} needs --draft (or use --method lookahead "
                         "or greedy)")
    target, tokenizer = _load(args.target, args.device, args.dtype)
    draft = None
    if config.use_draft:
        draft, _ = _load(args.draft, args.device, args.dtype)
    if args.chat:
        input_ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": args.prompt}], add_generation_prompt=True,
            return_tensors="pt", return_dict=True)["input_ids"]
    else:
        input_ids = tokenizer(args.prompt, return_tensors="pt").input_ids
    device = next(target.parameters()).device
    input_ids = input_ids.to(device=device, dtype=torch.int64)
    decoder = OuroborosDecoder(target, draft, config)
    streamer = None if args.no_stream else TextStream(tokenizer, sys.stdout)
    result = decoder.generate(input_ids, args.max_new_tokens,
                              temperature=args.temperature or None, top_k=args.top_k,
                              top_p=args.top_p, seed=args.seed, streamer=streamer)
    if streamer is None:
        print(tokenizer.decode(result.new_tokens, skip_special_tokens=True))
    else:
        streamer.end()
    print(f"[{config.name}] {result.stats.summary()}", file=sys.stderr)
    return 0


register_command("generate", "generate text with a target (and draft) model",
                 _add_generate_arguments, _run_generate)


# ----------------------------------------------------------------------------- entry point


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every registered command."""
    for module in COMMAND_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name != module:  # the module exists but one of its imports is missing
                raise
    parser = argparse.ArgumentParser(
        prog="ouroboros",
        description="Lossless Ouroboros speculative decoding for Hugging Face Llama models.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, add_arguments, run) in sorted(_COMMANDS.items()):
        sub = commands.add_parser(name, help=help_text, description=help_text)
        add_arguments(sub)
        sub.set_defaults(run=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ouroboros`` console script."""
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    # Run the package's module (not this __main__ copy) so that commands registered by other
    # modules land in the same registry.
    from ouroboros.cli import main as package_main

    sys.exit(package_main())
