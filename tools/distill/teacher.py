"""The teacher's data: texts with the target's top-k next-token logits at every position.

* `teacher_generate`: the target continues a batch of prompts (greedy or sampled) and
  records its top-k at every position of prompt and continuation;
* `teacher_label`: the target reads given text (teacher forcing) and records its top-k;
* `save_records` / `load_records` / `load_record_shards`: the record files
  (``torch.save`` of tensors, loaded with ``weights_only=True``: a crafted file cannot
  run code).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ouroboros.cache import cache_kwarg_name
from tools.distill.common import save_atomic

__all__ = [
    "TeacherRecord",
    "load_record_shards",
    "load_records",
    "save_records",
    "teacher_generate",
    "teacher_label",
    "teacher_stop_ids",
]


def _new_cache(config):
    """An empty transformers ``DynamicCache`` for a model of ``config``."""
    from transformers import DynamicCache

    try:
        return DynamicCache(config=config)
    except TypeError:
        return DynamicCache()



@dataclass
class TeacherRecord:
    """One text with the teacher's predictions at every position.

    tokens: int32 [n]; topk_ids: int32 [n, k] and topk_logits: float16 [n, k] are the
    teacher's k best next tokens after ``tokens[: t + 1]`` (best first); valid: bool [n]
    (False where the teacher's prediction was not computed, e.g. the final token);
    n_prompt: how many leading tokens were given (the rest the teacher wrote);
    source: a tag ("humaneval", "chat", "stdlib-code", ...).
    """

    tokens: torch.Tensor
    topk_ids: torch.Tensor
    topk_logits: torch.Tensor
    valid: torch.Tensor
    n_prompt: int
    source: str

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _topk_of_hidden(lm_head: nn.Module, hidden: torch.Tensor, k: int, chunk: int = 16):
    """Top-k of ``lm_head(hidden)`` for hidden: [B, T, d], computed in chunks of T so the
    [B, T, V] logits never exist at once. Returns (values fp32 [B, T, k], ids int64)."""
    values, ids = [], []
    for start in range(0, hidden.shape[1], chunk):
        logits = lm_head(hidden[:, start:start + chunk]).float()
        v, i = logits.topk(k, dim=-1)
        values.append(v)
        ids.append(i)
    return torch.cat(values, 1), torch.cat(ids, 1)


@torch.no_grad()
def teacher_generate(
    model,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    k: int = 8,
    eos_ids: tuple[int, ...] = (),
    pad_id: int = 0,
    generator: torch.Generator | None = None,
    sources: list[str] | None = None,
) -> list[TeacherRecord]:
    """Continue a batch of prompts with ``model`` (a ``LlamaForCausalLM``), recording its
    top-k logits at every position of prompt and continuation.

    prompts: token id lists (left-padded internally). temperature 0 is greedy; otherwise
    tokens are sampled from softmax(logits / temperature) with ``generator``. A sequence
    stops after an id in ``eos_ids`` (the eos token is kept) or ``max_new_tokens``.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty token lists")
    cache_kw = cache_kwarg_name(model.model)  # the trunk's forward is called below
    device = next(model.parameters()).device
    batch, longest = len(prompts), max(len(p) for p in prompts)
    input_ids = torch.full((batch, longest), pad_id, dtype=torch.long)
    mask = torch.zeros((batch, longest), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, longest - len(prompt):] = torch.tensor(prompt)
        mask[row, longest - len(prompt):] = 1
    input_ids, mask = input_ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = _new_cache(model.config)
    hidden = model.model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                         use_cache=True, **{cache_kw: cache}).last_hidden_state
    prompt_values, prompt_ids = _topk_of_hidden(model.lm_head, hidden, k)
    step_values, step_ids, new_tokens = [], [], []
    last_logits = model.lm_head(hidden[:, -1]).float()
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    lengths = torch.zeros(batch, dtype=torch.long)
    eos = torch.tensor(list(eos_ids) or [-1], device=device)
    position = positions[:, -1]
    for step in range(max_new_tokens):
        if temperature > 0:
            probs = torch.softmax(last_logits / temperature, dim=-1)
            token = torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1).to(device)
        else:
            token = last_logits.argmax(-1)
        new_tokens.append(token)
        lengths += (~finished).long().cpu()
        finished |= torch.isin(token, eos)
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones((batch, 1), dtype=mask.dtype, device=device)], 1)
        position = position + 1
        hidden = model.model(input_ids=token[:, None], attention_mask=mask,
                             position_ids=position[:, None], use_cache=True,
                             **{cache_kw: cache}).last_hidden_state
        last_logits = model.lm_head(hidden[:, -1]).float()
        values, ids = last_logits.topk(k, dim=-1)
        step_values.append(values)
        step_ids.append(ids)
    records = []
    generated = torch.stack(new_tokens, 1).cpu()
    gen_values = torch.stack(step_values, 1).cpu() if step_values else None
    gen_ids = torch.stack(step_ids, 1).cpu() if step_ids else None
    for row, prompt in enumerate(prompts):
        n_new = int(lengths[row])
        tokens = torch.cat([torch.tensor(prompt), generated[row, :n_new]])
        # Predictions after prompt positions, then after each generated token but the last.
        ids = [prompt_ids[row, longest - len(prompt):].cpu()]
        values = [prompt_values[row, longest - len(prompt):].cpu()]
        if n_new > 1:
            ids.append(gen_ids[row, :n_new - 1])
            values.append(gen_values[row, :n_new - 1])
        ids.append(torch.zeros((1, k), dtype=torch.long))
        values.append(torch.zeros((1, k)))
        valid = torch.ones(len(tokens), dtype=torch.bool)
        valid[-1] = False
        records.append(TeacherRecord(
            tokens=tokens.to(torch.int32), topk_ids=torch.cat(ids).to(torch.int32),
            topk_logits=torch.cat(values).to(torch.float16), valid=valid,
            n_prompt=len(prompt), source=sources[row] if sources else "",
        ))
    return records


@torch.no_grad()
def teacher_label(
    model, chunks: list[list[int]], *, k: int = 8, source: str = ""
) -> list[TeacherRecord]:
    """Teacher forcing: the model's top-k next-token logits at every position of each
    chunk (all chunks of one call have the same length). Every position is valid: a
    label is the teacher's prediction, not the next token of the chunk."""
    lengths = {len(c) for c in chunks}
    if len(lengths) != 1 or 0 in lengths:
        raise ValueError("chunks must be non-empty and of equal length")
    device = next(model.parameters()).device
    ids = torch.tensor(chunks, dtype=torch.long, device=device)
    hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state
    values, top = _topk_of_hidden(model.lm_head, hidden, k)
    return [
        TeacherRecord(tokens=ids[row].cpu().to(torch.int32),
                      topk_ids=top[row].cpu().to(torch.int32),
                      topk_logits=values[row].cpu().to(torch.float16),
                      valid=torch.ones(ids.shape[1], dtype=torch.bool), n_prompt=ids.shape[1],
                      source=source)
        for row in range(ids.shape[0])
    ]


def save_records(records: list[TeacherRecord], path: Path) -> None:
    """Write ``records`` to ``path`` (atomically; tensors, ints and strings only)."""
    save_atomic([r.to_dict() for r in records], path)


def load_records(path: Path) -> list[TeacherRecord]:
    """The records of one file written by `save_records`. Loaded with
    ``torch.load(weights_only=True)``: a file holding anything but tensors and plain data
    raises ``pickle.UnpicklingError`` instead of running code."""
    return [TeacherRecord(**r) for r in torch.load(path, weights_only=True)]


def load_record_shards(folder: Path) -> list[TeacherRecord]:
    """The records of every ``shard-*.pt`` in ``folder``, in file-name order."""
    records = []
    for path in sorted(folder.glob("shard-*.pt")):
        records.extend(load_records(path))
    return records


def teacher_stop_ids(tokenizer, model) -> tuple[int, ...]:
    """The ids that end a teacher continuation: the model's generation-config EOS (where
    ``model.generate`` stops), the tokenizer's ``eos_token_id`` and SmolLM2's end markers
    ``<|endoftext|>`` / ``<|im_end|>`` where the vocabulary has them; sorted.

    A superset of the runtime's EOS set (``ouroboros.decoder``, which follows the
    generation config only, as ``generate`` does): training text should end at any end
    marker, while the engine must stop exactly where ``generate`` stops.
    """
    ids = {tokenizer.eos_token_id}
    eos = model.generation_config.eos_token_id
    ids |= set(eos if isinstance(eos, list) else [eos])
    for token in ("<|endoftext|>", "<|im_end|>"):
        if token in tokenizer.get_vocab():
            ids.add(tokenizer.convert_tokens_to_ids(token))
    return tuple(sorted(i for i in ids if i is not None))
