"""The tree geometry (ouroboros/geometry.py): the counts on hand-computed shapes, the
measurement tree, and the engine's real passes on tiny random Llama pairs, which never
feed more than the geometry says and reach it."""

from __future__ import annotations

import copy
import importlib

import pytest
import torch
from engine_models import (  # noqa: F401  (single_thread: a fixture)
    greedy_reference,
    perturbed,
    single_thread,
    tiny_llama,
)

from ouroboros import OuroborosDecoder
from ouroboros.config import OuroborosConfig
from ouroboros.geometry import (
    MEASUREMENT_SHAPE,
    TreeShape,
    draft_pass_tokens,
    draft_pending,
    measurement_tree,
    target_pass_tokens,
)

generate_module = importlib.import_module("ouroboros.generate")


@pytest.mark.parametrize("method, target, draft", [
    ("greedy", 1, 0),
    ("speculative", 1 + 4, 2),  # pending + γ = 4; draft: the bonus and the last draft token
    ("lookahead", 1 + 4 * 3 + 4 * 3, 0),  # pending + K = 4 phrases of 3 + window 4 x 3
    ("ouroboros", 1 + 6 + 4 * 3, (2 + 3) + 4 * 3),  # draft: pending 2 + L, P = 4 phrases
])
def test_the_presets_trees(method, target, draft):
    config = OuroborosConfig.preset(method)
    assert target_pass_tokens(config) == config.largest_target_tree == target
    assert draft_pass_tokens(config) == config.largest_draft_tree == draft


def test_the_counts_by_part():
    # Root phrases count only with a draft; the target's window only without one.
    shape = TreeShape(True, 3, 5, 2, draft_phrases=1, root_phrases=2, window=True,
                      window_size=3)
    assert target_pass_tokens(shape) == 1 + 3 + (2 + 2) * 4
    assert draft_pending(shape) == 2 + 4 and draft_pending(shape, first=False) == 1
    assert draft_pass_tokens(shape) == 6 + (1 + 3) * 4
    assert draft_pass_tokens(shape, 1) == 1 + (1 + 3) * 4
    no_pool = TreeShape(True, 3, 5, 0, draft_phrases=2)
    assert draft_pending(no_pool) == 2  # nothing past the draft to catch up on
    lookahead = TreeShape(False, 0, 4, 3, root_phrases=2, window=True, window_size=2)
    assert target_pass_tokens(lookahead) == 1 + 3 * 3 + 2 * 3
    assert draft_pass_tokens(lookahead) == 0 and draft_pending(lookahead) == 0
    assert TreeShape.of(OuroborosConfig.preset("ouroboros")) == MEASUREMENT_SHAPE


def test_the_measurement_tree():
    # The default layout: a chain of 6, then branches of 3 under its end (cache format 1).
    tree = measurement_tree(14, 48)
    assert len(tree) == 13
    assert tree.parents == [-1, 0, 1, 2, 3, 4, 5, 6, 7, 5, 9, 10, 5]
    assert tree.tokens[:6] == [10, 11, 12, 13, 14, 15] and tree.tokens[6:9] == [3, 8, 13]
    assert len(measurement_tree(1, 48)) == 0
    chain = measurement_tree(7, 48)
    assert chain.parents == list(range(-1, 5))  # up to γ + 1 tokens: a chain, no mask
    # Root phrases beside the chain, suffixes under its end, every node distinct.
    shape = TreeShape(True, 2, 3, 1, root_phrases=2)
    tree = measurement_tree(1 + 2 + 2 * 2 + 4, 48, shape)
    assert tree.parents == [-1, 0, -1, 2, -1, 4, 1, 6, 1, 8]
    assert len(measurement_tree(40, 5, shape)) == 39  # a tiny vocabulary: still 39 nodes
    lookahead = measurement_tree(9, 48, TreeShape(False, 0, 4, 2))
    assert lookahead.parents == [-1, 0, 1, -1, 3, 4, -1, 6]  # phrases from the root
    with pytest.raises(ValueError):
        measurement_tree(0, 48)


def run_recording(monkeypatch, target, draft, config, prompt, new_tokens):
    """Generate, recording every forward pass: ``(is_target, pending, tree nodes)``."""
    passes = []
    real = generate_module.forward_rows

    def recording(runner, items, logits=True):
        for pending, tree in items:  # batch 1: one row per pass
            passes.append((runner.model is target, len(pending), len(tree)))
        return real(runner, items, logits)

    monkeypatch.setattr(generate_module, "forward_rows", recording)
    result = OuroborosDecoder(target, draft, config).generate(prompt, new_tokens)
    monkeypatch.setattr(generate_module, "forward_rows", real)
    assert torch.equal(result.sequences, greedy_reference(target, prompt, new_tokens))
    return passes


CONFIGS = [
    OuroborosConfig.preset("speculative", gamma=3),
    OuroborosConfig.preset("ouroboros", gamma=3, draft_phrases=2, num_suffixes=3, ngram=3),
    OuroborosConfig.preset("ouroboros", gamma=2, num_suffixes=2, root_phrases=2),
    OuroborosConfig.preset("ouroboros", gamma=4, draft_phrases=1, num_suffixes=0, window=True,
                           window_size=2, ngram=3),
    OuroborosConfig.preset("ouroboros", gamma=1, draft_phrases=2, num_suffixes=4,
                           root_phrases=1, ngram=5, window=True, window_size=3),
    OuroborosConfig.preset("lookahead", num_suffixes=3, window_size=3),
]


@pytest.mark.usefixtures("single_thread")
def test_the_engines_passes_follow_the_geometry(monkeypatch):
    target = tiny_llama(0, vocab=16)
    drafts = [perturbed(target, 0.05, seed=1), copy.deepcopy(target)]  # α < 1 and α = 1
    prompt = torch.tensor([[3, 4, 5, 6, 7, 8, 3, 4, 5, 6, 7, 8, 3, 4, 5, 6, 9, 10, 3, 4, 5]])
    reached_pending = False
    for config in CONFIGS:
        largest_target = largest_draft = 0
        for draft in drafts if config.use_draft else [None]:
            passes = run_recording(monkeypatch, target, draft, config, prompt, 60)
            steps = [p for p in passes if p[0]][1:]  # after the prefill
            assert steps and all(pending == 1 for _, pending, _ in steps)
            sizes = [pending + nodes for _, pending, nodes in steps]
            assert max(sizes) <= config.largest_target_tree
            largest_target = max(largest_target, max(sizes))
            if draft is None:
                assert len(passes) == len(steps) + 1
                continue
            first_of_step = True
            for is_target, pending, nodes in passes[2:]:  # after both prefills
                if is_target:
                    first_of_step = True
                    continue
                assert pending <= draft_pending(config, first_of_step)
                assert pending + nodes <= draft_pass_tokens(config, pending) \
                    <= config.largest_draft_tree
                if first_of_step and pending == draft_pending(config):
                    reached_pending = True
                largest_draft = max(largest_draft, pending + nodes)
                first_of_step = False
        assert largest_target == config.largest_target_tree, config
        if config.use_draft and config.draft_phrases == 0:
            assert largest_draft == config.largest_draft_tree  # the pending tokens only
    assert reached_pending  # the first draft pass of a step did catch up on 2 + L tokens
