"""A target bigger than one GPU: tensor parallel under torchrun, or layers over GPUs.

A 70B target on 8 GPUs, tensor parallel (every GPU holds 1/8 of every layer, one process
per GPU, the 7B draft replicated on each)::

    torchrun --nproc_per_node 8 examples/tp_generate.py --tp \\
        --target /models/Llama-2-70b-chat-hf --draft /models/Llama-2-7b-chat-hf \\
        --prompt "Write a binary search in Python." --max-new-tokens 256

The same target with its layers spread over the GPUs of one process (accelerate's
``device_map="auto"``; slower per token than tensor parallelism, no launcher needed)::

    python examples/tp_generate.py --device-map auto \\
        --target /models/Llama-2-70b-chat-hf --draft /models/Llama-2-7b-chat-hf --prompt "..."

What the package expects of the launcher (tensor parallel):

* one process per GPU, started by ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
  ``MASTER_ADDR``/``MASTER_PORT`` in the environment); transformers' ``tp_plan="auto"``
  initialises ``torch.distributed`` (NCCL on GPUs, gloo on CPUs) and makes
  ``cuda:LOCAL_RANK`` each process's device;
* the number of processes divides the target's KV heads (Llama-2-70B: 8 KV heads, so 2, 4
  or 8 GPUs); each rank's KV cache then holds only its own heads;
* every rank calls ``generate`` with the same prompt and arguments (here: rank 0 reads the
  prompt and broadcasts it) and gets the same tokens back; ranks stay in lock-step
  through the model's own collectives, and after each call a small all-reduce checks that
  they agree;
* the draft is loaded on every rank, on that rank's GPU (replicated: no collective in the
  draft passes); ``save_pool`` is called on every rank (rank 0 writes, the others wait).

Without weights at hand, ``--random-tiny`` makes a tiny random Llama pair and runs it (on
the CPU: ``torchrun --nproc_per_node 2 examples/tp_generate.py --tp --random-tiny``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    placement = parser.add_mutually_exclusive_group()
    placement.add_argument("--tp", action="store_true",
                           help="tensor parallel over the torchrun processes")
    placement.add_argument("--device-map", default=None,
                           help='accelerate placement of the target ("auto", "balanced", ...)')
    parser.add_argument("--target", help="target model folder (Hugging Face format)")
    parser.add_argument("--draft", help="draft model folder (same tokenizer)")
    parser.add_argument("--prompt", default="def fibonacci(n):")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16",
                        choices=["bfloat16", "float16", "float32"],
                        help="float32 for outputs identical to greedy (see the README)")
    parser.add_argument("--method", default="ouroboros",
                        choices=["ouroboros", "speculative", "lookahead", "greedy"])
    parser.add_argument("--save-pool", type=Path, default=None,
                        help="write the candidate pool here afterwards (rank 0 writes)")
    parser.add_argument("--random-tiny", action="store_true",
                        help="a tiny random Llama pair instead of --target/--draft")
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM

    import ouroboros

    distributed = "RANK" in os.environ
    if distributed and not args.tp:
        parser.error("started by torchrun: pass --tp (or run with python for --device-map)")
    if args.tp and not distributed:
        parser.error("--tp needs torchrun: torchrun --nproc_per_node N examples/tp_generate.py "
                     "--tp ...")
    dtype = getattr(torch, args.dtype)
    if args.random_tiny:
        folder = Path(tempfile.gettempdir()) / "ouroboros_tiny_pair"
        args.target, args.draft = make_tiny_pair(folder), None
        dtype = torch.float32
    elif not args.target:
        parser.error("--target is required (or --random-tiny)")

    if args.tp:
        # Every rank: 1/world of every layer of the target, on cuda:LOCAL_RANK (or the CPU).
        target = AutoModelForCausalLM.from_pretrained(args.target, tp_plan="auto", dtype=dtype)
    else:
        target = AutoModelForCausalLM.from_pretrained(
            args.target, dtype=dtype, device_map=args.device_map or "auto")
    target.eval()
    rank = torch.distributed.get_rank() if args.tp else 0
    # The device of the target's first layer (the engine's own tensors live there).
    device = next(target.parameters()).device
    draft = None
    if args.method in ("ouroboros", "speculative"):
        if args.draft:  # replicated: a whole copy on this rank's device
            draft = AutoModelForCausalLM.from_pretrained(args.draft, dtype=dtype).to(device)
        else:
            draft = target  # no draft given: the target drafts for itself (a smoke test)
        draft.eval()

    prompt_ids = tokenize(args, rank)
    decoder = ouroboros.OuroborosDecoder(target, draft, args.method)
    result = decoder.generate(torch.tensor([prompt_ids], device=device), args.max_new_tokens)
    if args.save_pool is not None and decoder.pool is not None:
        decoder.save_pool(args.save_pool)  # every rank calls it; rank 0 writes
    if rank == 0:
        print(detokenize(args, result.new_tokens.tolist()))
        print(result.stats.summary(), file=sys.stderr)
    if args.tp:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return 0


def tokenize(args: argparse.Namespace, rank: int) -> list[int]:
    """The prompt's ids, read on rank 0 and broadcast (every rank must decode the same)."""
    ids = None
    if rank == 0:
        if args.random_tiny:
            ids = [3 + (7 * i) % 40 for i in range(12)]
        else:
            from transformers import AutoTokenizer

            ids = AutoTokenizer.from_pretrained(args.target)(args.prompt).input_ids
    if torch.distributed.is_initialized():
        box = [ids]
        torch.distributed.broadcast_object_list(box, src=0)
        ids = box[0]
    return ids


def detokenize(args: argparse.Namespace, tokens: list[int]) -> str:
    if args.random_tiny:
        return " ".join(map(str, tokens))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(args.target).decode(tokens, skip_special_tokens=True)


def make_tiny_pair(folder: Path) -> str:
    """A tiny random Llama (4 heads, 2 KV heads: splits over 2 ranks) saved once."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = folder / "target"
    if not (path / "config.json").exists():
        config = LlamaConfig(vocab_size=48, hidden_size=64, intermediate_size=128,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             initializer_range=0.2, bos_token_id=1, eos_token_id=2,
                             pad_token_id=0)
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
        model.generation_config.eos_token_id = None
        temporary = folder / f"target.{os.getpid()}"  # each rank its own, then one rename
        model.save_pretrained(temporary)
        try:
            temporary.rename(path)
        except OSError:  # another rank was first: same seed, same weights
            shutil.rmtree(temporary, ignore_errors=True)
    return str(path)


if __name__ == "__main__":
    sys.exit(main())
