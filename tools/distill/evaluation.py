"""Evaluating a draft: top-1 agreement on recorded teacher text, cost per token, and the
markdown report of the ``evaluate`` stage.

Two agreement measures exist on purpose. `agreement_on_records` scores a model against a
*fixed* recorded set (the target's float32 greedy continuations of held-out prompts, each
ending at the target's end marker), so every evaluation during and after training sees
the same positions, and it also scores the training form (`DraftStudent`). The runtime's
``ouroboros.tuning.measure_agreement`` instead generates the target's text afresh (no EOS)
on a couple of calibration prompts, to size the trees on the machine at hand.
Cost is measured with the runtime's own ``ouroboros.tuning.measure_cost_curve``.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ouroboros.models import SubsetLMHead
from tools.distill.student import DraftStudent
from tools.distill.teacher import TeacherRecord

__all__ = ["agreement_on_records", "macs_per_token", "pass_seconds", "render_report"]


@torch.no_grad()
def agreement_on_records(model, records: list[TeacherRecord]) -> dict:
    """Top-1 agreement with the teacher's continuations in ``records``: at every
    generated position (after ``n_prompt``), does the model's argmax, teacher forced on the
    record's tokens, equal the token the teacher wrote?

    model: a causal LM whose output has ``.logits`` [1, T, V], or a `DraftStudent` (its
    subset logits are mapped back to full ids). Records without generated tokens are
    skipped. Returns ``{"agreement": float, "positions": int}`` (agreement 0 for none).
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


def pass_seconds(models: Mapping[str, nn.Module], sizes: Sequence[int] = (1, 8), *,
                 rounds: int = 5, repeats: int = 5) -> dict[str, dict[int, float]]:
    """Seconds of one engine pass over T new tokens after a 200-token cached prefix
    (batch 1), for each model and each T in ``sizes``: ``{name: {T: seconds}}``.

    Each of ``rounds`` rounds runs ``ouroboros.tuning.measure_cost_curve`` (the fastest of
    ``repeats`` passes) on every model in turn, so drift of the machine hits all models
    alike; the result is the median over the rounds. The models are switched to the
    ``"ouroboros"`` attention. List a target before a draft that shares its layers
    (``ouroboros.models.truncated_draft``): shared layers follow the target's setting.
    """
    from ouroboros.tuning import measure_cost_curve

    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    samples: dict[str, list[dict[int, float]]] = {name: [] for name in models}
    for round_ in range(rounds):
        for name, model in models.items():
            curve = measure_cost_curve(model, sizes, repeats=repeats, seed=round_)
            samples[name].append(dict(zip(curve.sizes, curve.seconds, strict=True)))
    return {name: {size: statistics.median([run[size] for run in runs]) for size in runs[0]}
            for name, runs in samples.items()}


def macs_per_token(model, context: int = 200) -> int:
    """Multiply-adds of one decoding step of a Llama model at ``context`` cached tokens:
    every linear layer (a ``SubsetLMHead`` counts its subset only) plus attention
    scores and values; embedding lookups are free."""
    config = model.config
    linear = sum(m.weight.numel() for m in model.modules()
                 if isinstance(m, (nn.Linear, SubsetLMHead)))
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
        "`python -m tools.distill evaluate --report ...`.",
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
        "Latency: the engine's own pass (`ouroboros.tuning.measure_cost_curve`, a tree-shaped",
        "pass with the `ouroboros` attention), the fastest of 5 passes per round, the median",
        "over interleaved rounds (target, draft, first-2 in turn).",
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

