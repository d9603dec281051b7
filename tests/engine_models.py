"""Tiny randomly initialised Llama models for the engine tests (imported by test_engine_*.py).

The weights are drawn with a large ``initializer_range`` so that the logits have clear
gaps: a float32 argmax then does not flip between a one-token forward and a tree forward
(different matmul shapes round differently); float64 variants cover the rest.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

EOS = 2


def tiny_llama(seed: int, *, vocab: int = 48, layers: int = 2, hidden: int = 64,
               heads: int = 4, kv_heads: int = 2, init: float = 0.2,
               dtype: torch.dtype = torch.float32, max_positions: int = 512,
               attn: str = "sdpa") -> LlamaForCausalLM:
    """A 2-layer Llama with GQA (4 query heads, 2 KV heads), no EOS in its generation
    config (tests pass ``eos_token_id`` explicitly)."""
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, max_position_embeddings=max_positions,
                         initializer_range=init, bos_token_id=1, eos_token_id=EOS,
                         pad_token_id=0, tie_word_embeddings=False)
    config._attn_implementation = attn
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(dtype).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def word_tokenizer(vocab: int = 48, chat_template: str | None = None):
    """A word-level tokenizer for tiny models: ``<pad>`` = 0, ``<s>`` = 1, ``</s>`` = 2, then
    the words ``w0 .. w{vocab - 4}`` as ids ``3 .. vocab - 1``; text is split on whitespace."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [f"w{i}" for i in range(vocab - 3)]
    table = {"<pad>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(table, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>",
                                        bos_token="<s>", eos_token="</s>")
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


def perturbed(model: LlamaForCausalLM, scale: float, seed: int) -> LlamaForCausalLM:
    """A copy of ``model`` with Gaussian noise of ``scale`` times each tensor's std added:
    a draft that agrees with the target often but not always."""
    copy_ = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in copy_.parameters():
            noise = torch.randn(parameter.shape, generator=generator, dtype=torch.float64)
            noise = noise.to(parameter.device)
            parameter.add_((noise * scale * parameter.double().std()).to(parameter.dtype))
    return copy_


def random_prompt(length: int, vocab: int, seed: int) -> torch.Tensor:
    """``int64[1, length]`` of tokens in ``[3, vocab)`` (avoids pad/bos/eos)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (1, length), generator=generator)


def greedy_reference(model: LlamaForCausalLM, prompt: torch.Tensor, max_new_tokens: int,
                     eos_token_id: int | None = None) -> torch.Tensor:
    """transformers' own greedy decoding: ``int64[1, prompt + new]``."""
    kwargs = {} if eos_token_id is None else {"eos_token_id": eos_token_id}
    with torch.no_grad():
        return model.generate(prompt, max_new_tokens=max_new_tokens, do_sample=False,
                              **kwargs)


@pytest.fixture(scope="module", autouse=False)
def single_thread():
    """Run a module's tiny models on one thread: with two cores shared by other processes,
    torch's intra-op threads spin-wait on each tiny matmul (100x slower), and one thread is
    the fastest setting for 64-wide models anyway. Restores the previous count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def save_pair(root: Path, tokenizer, target) -> tuple[Path, Path]:
    """Save ``target`` and a perturbed copy of it (the draft, noise 0.3, seed 1), each with
    ``tokenizer``, as Hugging Face folders ``root/target`` and ``root/draft``; returns both
    paths (what the CLI, the demo and the benchmarks load)."""
    for name, model in (("target", target), ("draft", perturbed(target, 0.3, seed=1))):
        tokenizer.save_pretrained(root / name)
        model.save_pretrained(root / name)
    return root / "target", root / "draft"


@contextlib.contextmanager
def benchmark_module(name: str):
    """``benchmarks/<name>.py`` imported as module ``name`` (registered in ``sys.modules``
    while in use: dataclasses resolve their annotations through it), removed afterwards."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(name, None)
