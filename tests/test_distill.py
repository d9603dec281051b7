"""The distillation pipeline (``tools.distill``, repository tooling) on tiny random models
(seconds): teacher records, the training loop (loss falls, checkpoints resume to the same
weights), export and load, evaluation helpers and the command line."""

import dataclasses
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ouroboros.models import SubsetLMHead, load_draft
from tools.distill import (
    STAGES,
    DraftConfig,
    DraftStudent,
    TrainConfig,
    agreement_on_records,
    build_stream,
    choose_output_vocab,
    distill_loss,
    export_draft,
    macs_per_token,
    pass_seconds,
    render_report,
    teacher_generate,
    teacher_label,
    teacher_stop_ids,
    train,
)

VOCAB = 96


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=12, max_position_embeddings=256,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config).eval()
    # Sharpen the teacher so its choices are learnable and not near-uniform.
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(8.0)
    return model


def _prompts(seed: int, count: int, low: int = 3, high: int = 12) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high, (count,), generator=g)
    return [torch.randint(3, VOCAB, (int(n),), generator=g).tolist() for n in lengths]


def test_teacher_generate_greedy_matches_hf_generate_and_labels(teacher):
    prompts = _prompts(1, 4)
    records = teacher_generate(teacher, prompts, max_new_tokens=7, k=4, pad_id=0, eos_ids=(2,))
    for prompt, record in zip(prompts, records, strict=True):
        reference = teacher.generate(torch.tensor([prompt]), max_new_tokens=7, do_sample=False,
                                     eos_token_id=2, pad_token_id=0)[0]
        assert torch.equal(record.tokens.long(), reference)
        assert record.n_prompt == len(prompt)
        # The label after position t is the teacher's top-1 = the next greedy token.
        generated_labels = record.topk_ids[record.n_prompt - 1:-1, 0].long()
        assert torch.equal(generated_labels, reference[record.n_prompt:])
        # Prompt labels equal a plain forward pass's top-k.
        logits = teacher(torch.tensor([prompt])).logits[0]
        assert torch.equal(record.topk_ids[:len(prompt)].long(), logits.topk(4).indices)
        assert record.valid[:-1].all() and not record.valid[-1]
        assert record.topk_logits.dtype == torch.float16


def test_teacher_generate_stops_at_eos_and_samples_reproducibly(teacher):
    prompts = _prompts(2, 3)
    first = teacher_generate(teacher, prompts, max_new_tokens=9, temperature=1.0, pad_id=0,
                             generator=torch.Generator().manual_seed(5))
    again = teacher_generate(teacher, prompts, max_new_tokens=9, temperature=1.0, pad_id=0,
                             generator=torch.Generator().manual_seed(5))
    assert all(torch.equal(a.tokens, b.tokens) for a, b in zip(first, again, strict=True))
    # Declare the first sampled token of row 0 an EOS id: that row must stop there.
    eos = int(first[0].tokens[len(prompts[0])])
    stopped = teacher_generate(teacher, prompts, max_new_tokens=9, temperature=1.0, pad_id=0,
                               eos_ids=(eos,), generator=torch.Generator().manual_seed(5))
    assert len(stopped[0].tokens) == len(prompts[0]) + 1
    for record in stopped:
        new = record.tokens[record.n_prompt:-1]
        assert not (new == eos).any()


def test_teacher_label_and_bad_input(teacher):
    chunks = [list(range(3, 19)), list(range(20, 36))]
    records = teacher_label(teacher, chunks, k=3)
    logits = teacher(torch.tensor(chunks)).logits
    for row, record in enumerate(records):
        assert torch.equal(record.topk_ids.long(), logits[row].topk(3).indices)
        assert record.valid.all()
    with pytest.raises(ValueError, match="equal length"):
        teacher_label(teacher, [[3, 4], [5]])
    with pytest.raises(ValueError, match="non-empty"):
        teacher_generate(teacher, [[3], []], max_new_tokens=2)


def _tiny_student(teacher, stream, seed=0, output_vocab=48):
    torch.manual_seed(seed)
    config = DraftConfig(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                         intermediate_size=64, embed_rank=8, output_vocab=output_vocab)
    subset = choose_output_vocab(stream, output_vocab, always=(1, 2))
    return DraftStudent(config, teacher.config, subset)


@pytest.fixture(scope="module")
def stream_and_eval(teacher):
    records = teacher_generate(teacher, _prompts(3, 12), max_new_tokens=24, k=4, pad_id=0)
    held_out = teacher_generate(teacher, _prompts(4, 4), max_new_tokens=16, k=1, pad_id=0)
    return build_stream(records), held_out


def test_choose_output_vocab_keeps_frequent_and_forced_tokens(stream_and_eval):
    stream, _ = stream_and_eval
    subset = choose_output_vocab(stream, 10, always=(1, 2))
    assert subset.tolist() == sorted(subset.tolist()) and len(subset) == 10
    assert {1, 2} <= set(subset.tolist())
    counts = torch.bincount(stream.topk_ids[stream.valid, 0], minlength=VOCAB)
    most = int(counts.argmax())
    assert most in subset.tolist()


def test_distill_loss_counts_out_of_subset_argmax_as_miss():
    full_to_sub = torch.full((10,), -1)
    full_to_sub[torch.tensor([2, 5, 7])] = torch.arange(3)
    logits = torch.tensor([[[0.0, 5.0, 0.0], [0.0, 5.0, 0.0], [9.0, 0.0, 0.0]]])  # [1, 3, 3]
    topk_ids = torch.tensor([[[5, 2], [3, 5], [2, 7]]])  # argmax 5 (hit), 3 (outside), 2 (hit)
    topk_logits = torch.zeros(1, 3, 2)
    valid = torch.tensor([[True, True, True]])
    loss, agree = distill_loss(logits, topk_ids, topk_logits, valid, full_to_sub)
    assert math.isclose(float(agree), 2 / 3, rel_tol=1e-6)
    log_probs = logits.log_softmax(-1)[0]
    hard = -(log_probs[0, 1] + log_probs[2, 0]) / 2
    soft = -(0.5 * (log_probs[0, 1] + log_probs[0, 0]) + 0.5 * log_probs[1, 1]
             + 0.5 * (log_probs[2, 0] + log_probs[2, 2])) / 3
    assert math.isclose(float(loss), float(hard + soft), rel_tol=1e-5)


def _cfg(**overrides):
    base = dict(steps=8, batch_size=4, seq_len=16, lr=3e-3, warmup=2, save_every=3,
                log_every=0, seed=1)
    return TrainConfig(**{**base, **overrides})


@pytest.mark.parametrize("bf16_autocast", [False, True])
def test_training_checkpoints_and_resumes_to_identical_weights(
    teacher, stream_and_eval, tmp_path, bf16_autocast
):
    stream, _ = stream_and_eval
    cfg = _cfg(bf16_autocast=bf16_autocast)
    straight = _tiny_student(teacher, stream)
    train(straight, stream, cfg, tmp_path / "straight", progress=False)

    interrupted = _tiny_student(teacher, stream)
    summary = train(interrupted, stream, cfg, tmp_path / "resumed", stop_after=3,
                    progress=False)
    assert summary["steps"] == 3
    saved = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)
    assert saved["step"] == 3
    resumed = _tiny_student(teacher, stream, seed=99)  # different init: must be overwritten
    summary = train(resumed, stream, cfg, tmp_path / "resumed", resume=True, progress=False)
    assert summary["steps"] == 8
    for (name, a), (_, b) in zip(straight.state_dict().items(),
                                 resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_training_learns_the_teacher(teacher, stream_and_eval, tmp_path):
    stream, held_out = stream_and_eval
    student = _tiny_student(teacher, stream)
    before = agreement_on_records(student, held_out)["agreement"]
    summary = train(student, stream, _cfg(steps=40, save_every=0, log_every=10, lr=1e-2),
                    tmp_path, progress=False)
    losses = [h["loss"] for h in summary["history"] if "loss" in h]
    assert losses[-1] < 0.7 * losses[0]
    after = agreement_on_records(student, held_out)["agreement"]
    assert after > before + 0.1, (before, after)


def test_export_loads_as_llama_with_subset_head(teacher, stream_and_eval, tmp_path):
    stream, held_out = stream_and_eval
    student = _tiny_student(teacher, stream, output_vocab=40)
    with torch.no_grad():  # make the factors non-trivial
        for p in student.parameters():
            p.add_(0.1 * torch.randn_like(p))
    student.eval()
    out = export_draft(student, teacher.config, tmp_path / "draft", {"note": "test"},
                       dtype=torch.float32)
    draft = load_draft(path=out, device="cpu", dtype="float32", progress=False)
    assert isinstance(draft, LlamaForCausalLM)
    assert isinstance(draft.lm_head, SubsetLMHead)
    assert draft.config.vocab_size == VOCAB
    assert (draft.config.bos_token_id, draft.config.eos_token_id) == (1, 2)
    ids = held_out[0].tokens[None].long()
    logits = draft(ids).logits
    assert logits.shape == (1, ids.shape[1], VOCAB)
    subset = student.output_token_ids
    with torch.no_grad():
        expected = student(ids)
    torch.testing.assert_close(logits[..., subset], expected, rtol=1e-4, atol=1e-4)
    outside = torch.ones(VOCAB, dtype=torch.bool)
    outside[subset] = False
    assert (logits[..., outside] == torch.finfo(logits.dtype).min).all()
    assert agreement_on_records(draft, held_out) == agreement_on_records(student, held_out)
    # fp16 storage (the shipped format) changes little.
    out16 = export_draft(student, teacher.config, tmp_path / "draft16", dtype=torch.float16)
    draft16 = load_draft(path=out16, progress=False, device="cpu")
    torch.testing.assert_close(draft16(ids).logits[..., subset], expected, rtol=0.05, atol=0.05)


def test_export_config_round_trip(teacher, stream_and_eval, tmp_path):
    stream, _ = stream_and_eval
    student = _tiny_student(teacher, stream)
    config = student.llama_config(teacher.config)
    assert config.vocab_size == teacher.config.vocab_size
    assert config.num_hidden_layers == student.config.num_layers
    assert dataclasses.asdict(student.config)["embed_rank"] == 8


def test_records_file_cannot_run_code(tmp_path):
    """Records and checkpoints are loaded with weights_only=True: a crafted pickle that would
    run code on load is refused instead."""
    import pickle

    from tools.distill import load_records

    class Exploit:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "records.pt"
    torch.save([Exploit()], path)
    with pytest.raises(pickle.UnpicklingError):
        load_records(path)


def test_teacher_stop_ids_add_the_tokenizers_end_markers(teacher):
    from types import SimpleNamespace

    vocab = {"<|endoftext|>": 0, "<|im_end|>": 2, "x": 5}
    tokenizer = SimpleNamespace(eos_token_id=7, get_vocab=lambda: vocab,
                                convert_tokens_to_ids=vocab.__getitem__)
    model = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=[2, 9]))
    assert teacher_stop_ids(tokenizer, model) == (0, 2, 7, 9)
    model.generation_config.eos_token_id = None
    tokenizer.eos_token_id = None
    assert teacher_stop_ids(tokenizer, model) == (0, 2)


def test_pass_seconds_and_macs_of_a_truncated_draft(teacher):
    import copy

    from ouroboros.models import truncated_draft

    target = copy.deepcopy(teacher)  # the measurement switches its attention
    first = truncated_draft(target, 1)
    seconds = pass_seconds({"target": target, "first1": first}, (8, 1), rounds=1, repeats=1)
    assert set(seconds) == {"target", "first1"}
    assert all(set(d) == {1, 8} and all(v > 0 for v in d.values()) for d in seconds.values())
    assert macs_per_token(first, context=0) < macs_per_token(target, context=0)
    with pytest.raises(ValueError, match="rounds"):
        pass_seconds({"target": target}, rounds=0)


def test_render_report_of_an_evaluate_result():
    agree = {"agreement": 0.5, "positions": 10}
    per_model = {"humaneval-heldout": agree, "chat-heldout": agree, "all": agree,
                 "parameters": 2_000_000}
    result = {"date": "2026-01-01 00:00", "machine": "x86_64", "threads": 1, "torch": "2",
              "transformers": "5", "draft": per_model, "first2": per_model,
              "latency_ms": {n: {"1": 2.0, "8": 4.0} for n in ("target", "draft", "first2")},
              "cost_ratio": {n: {"1": 0.5, "8": 0.5} for n in ("draft", "first2")},
              "macs_per_token": {"target": 100, "draft": 10, "first2": 50},
              "draft_file_mb": 1.0}
    report = render_report(result, {})
    assert report.startswith("# Distilled draft") and "python -m tools.distill" in report
    assert "| distilled draft | 50.0% |" in report


def test_command_line_runs_from_the_repository_root():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-m", "tools.distill", "--help"], cwd=root,
                          capture_output=True, text=True, check=True)
    assert "python -m tools.distill" in done.stdout
    for stage in STAGES:
        assert stage in done.stdout
