"""Training the draft on the teacher's records: the packed stream, the output vocabulary,
the loss, and a resumable, deterministic training loop (`train`)."""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tools.distill.common import log, save_atomic
from tools.distill.student import DraftStudent
from tools.distill.teacher import TeacherRecord

__all__ = ["Stream", "TrainConfig", "build_stream", "choose_output_vocab", "distill_loss",
           "train"]


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
    """Settings of `train`: ``steps`` (<= 0: as many as fit before the deadline), a batch
    of ``batch_size`` windows of ``seq_len`` tokens, AdamW at ``lr`` with ``warmup`` linear
    steps then a cosine down to ``min_lr_ratio * lr``, loss = CE(teacher argmax) +
    ``soft_weight`` * CE(teacher top-k), a checkpoint every ``save_every`` steps, a log
    line every ``log_every``; ``seed`` fixes the data order."""

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
            log(f"resuming with changed training settings {changed}")
        log(f"resumed from {ckpt_path} at step {start_step}")

    def save(step: int) -> None:
        save_atomic({"student": student.state_dict(), "optimizer": optimizer.state_dict(),
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
        log(f"automatic step count: {cfg.steps}")
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

