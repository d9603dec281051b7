"""Batched decoding (issue 11): every row of a batch is, token for token, what
``target.generate(that prompt alone, do_sample=False)`` gives, for every preset, dtype, batch
size and input form (list of lists; left-padded tensor + attention_mask); rows end on their
own (EOS, ``stop``, max_new_tokens, the model's context) while the others go on; a seeded row
samples what the same prompt alone samples with that seed; bad input is refused by name.

The contract is the batched API of issue 11 (``BatchGenerationResult``). Tiny random Llama
pairs (vocab 48, 2 layers), CPU; references are cached per (model, prompt, budget, EOS).
"""

from __future__ import annotations

import copy
import os
import resource

import pytest
import torch
from engine_models import (  # noqa: F401  (single_thread is a fixture)
    greedy_reference,
    perturbed,
    random_prompt,
    single_thread,
    tiny_llama,
)

import ouroboros
from ouroboros import BatchGenerationResult, GenerationResult, OuroborosConfig, OuroborosDecoder
from ouroboros.config import PRESETS

VOCAB = 48
pytestmark = pytest.mark.usefixtures("single_thread")

# (method, draft): the presets, plus one configuration with every pool mechanism on. Drafts:
# "same" (= target: whole chunks accepted), "close" (a little noise: rows accept different
# lengths in the same step), "perturbed" (perturbed(target, 0.3): mostly rejected).
METHODS = [("greedy", None), ("speculative", "same"), ("speculative", "close"),
           ("speculative", "perturbed"), ("lookahead", None), ("ouroboros", "same"),
           ("ouroboros", "close"), ("ouroboros", "perturbed"), ("full", "close")]
METHOD_IDS = [f"{m}-{p or 'nodraft'}" for m, p in METHODS]
# Prompt lengths per batch size: mixed, 1 to 40 tokens.
LENGTHS = {1: [11], 2: [5, 29], 3: [40, 1, 17], 5: [13, 1, 38, 4, 21],
           8: [1, 40, 7, 23, 2, 15, 33, 9]}


def test_the_grid_covers_every_preset():
    assert {m for m, _ in METHODS} >= set(PRESETS)


# ---------------------------------------------------------------------------- models


def _pairs(target: torch.nn.Module, seed: int) -> dict:
    return {"target": target, "same": target, "close": perturbed(target, 0.05, seed=seed + 1),
            "perturbed": perturbed(target, 0.3, seed=seed), None: None}


@pytest.fixture(scope="module")
def f32() -> dict:
    return _pairs(tiny_llama(0, vocab=VOCAB), seed=7)


@pytest.fixture(scope="module")
def f64() -> dict:
    """float64, small logit gaps: no argmax tie can hide behind rounding."""
    return _pairs(tiny_llama(3, vocab=VOCAB, dtype=torch.float64, init=0.05), seed=1)


@pytest.fixture(scope="module")
def short() -> dict:
    """A 48-token context (max_position_embeddings = 48) for the target and the draft."""
    return _pairs(tiny_llama(4, vocab=VOCAB, max_positions=48), seed=2)


def config_of(method: str, **overrides) -> OuroborosConfig:
    if method == "full":
        return OuroborosConfig(**{"gamma": 4, "num_suffixes": 3, "root_phrases": 2,
                                  "window": True, "window_size": 3, **overrides})
    return OuroborosConfig.preset(method, **overrides)


def decoder_of(models: dict, method: str, pair: str | None, **overrides) -> OuroborosDecoder:
    return OuroborosDecoder(models["target"], models[pair], config_of(method, **overrides))


# ---------------------------------------------------------------------------- references

_REFERENCES: dict = {}


def reference(model, prompt: list[int], max_new_tokens: int,
              eos: list[int] | None = None) -> list[int]:
    """New tokens of ``model.generate(prompt alone, do_sample=False)`` (cached; the cache
    holds the model, so its id is not reused)."""
    if max_new_tokens == 0:
        return []
    key = (id(model), tuple(prompt), max_new_tokens, tuple(eos) if eos else None)
    if key not in _REFERENCES:
        out = greedy_reference(model, torch.tensor([prompt]), max_new_tokens,
                               list(eos) if eos else None)
        _REFERENCES[key] = (model, out[0, len(prompt):].tolist())
    return _REFERENCES[key][1]


def prompts_of(lengths: list[int], seed: int) -> list[list[int]]:
    return [random_prompt(n, VOCAB, 1000 * seed + 17 * i + n)[0].tolist()
            for i, n in enumerate(lengths)]


def batch_input(prompts: list[list[int]], form: str, pad: int = 0):
    """``(input_ids, kwargs)`` of a batch: ``"list"`` (list of lists), ``"tensor"``
    (left-padded with ``pad``, int64 mask) or ``"junk"`` (left padding holding real token
    ids, which the mask must hide; bool mask)."""
    if form == "list":
        return [list(p) for p in prompts], {}
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.int64)
    mask = torch.zeros((len(prompts), width), dtype=torch.int64)
    for b, p in enumerate(prompts):
        ids[b, width - len(p):] = torch.tensor(p)
        mask[b, width - len(p):] = 1
    if form == "junk":
        junk = torch.randint(3, VOCAB, ids.shape, generator=torch.Generator().manual_seed(5))
        ids = torch.where(mask.bool(), ids, junk)
        mask = mask.bool()
    return ids, {"attention_mask": mask}


def first_difference(got: list[int], want: list[int]) -> str:
    for i, (g, w) in enumerate(zip(got, want)):
        if g != w:
            return f"first differs at new token {i}: got {got[i:i + 6]}, want {want[i:i + 6]}"
    return f"lengths differ: got {len(got)} tokens, want {len(want)}"


def expected_rows(model, prompts, max_new_tokens, eos=None, stops=None):
    """``(tokens, reasons)`` per row: ``reasons[b]`` is the set of acceptable finish reasons
    (two when two criteria hit at the same token, e.g. an EOS as the last budgeted token)."""
    limit = model.config.max_position_embeddings
    stops = stops or {}
    tokens, reasons = [], []
    for b, prompt in enumerate(prompts):
        budget = min(max_new_tokens, limit - len(prompt))
        run = reference(model, prompt, budget, eos)
        hit: set[str] = set()
        if b in stops and stops[b] <= len(run):
            run = run[:stops[b]]
            hit.add("stop")
        if eos and run and run[-1] in eos:
            hit.add("eos")
        if len(run) == budget:
            hit.add("length" if budget == max_new_tokens else "context")
        tokens.append(run)
        reasons.append(hit)
    return tokens, reasons


def check_batch(result, model, prompts, inputs, max_new_tokens, eos=None, pad=0, stops=None,
                label=""):
    """Every row exact, and the layout of `BatchGenerationResult` as the contract says."""
    tokens, reasons = expected_rows(model, prompts, max_new_tokens, eos, stops)
    assert isinstance(result, BatchGenerationResult), type(result)
    batch = len(prompts)
    assert len(result.new_tokens) == batch and len(result.rows) == batch
    for b in range(batch):
        got = list(result.new_tokens[b])
        assert got == tokens[b], (f"{label} row {b} (prompt length {len(prompts[b])}, "
                                  f"prompt {prompts[b]}): {first_difference(got, tokens[b])}")
    assert result.prompt_lengths == [len(p) for p in prompts]
    assert result.pad_token_id == pad
    for b in range(batch):
        assert result.finish_reasons[b] in reasons[b], (label, b, result.finish_reasons,
                                                       reasons)
    # sequences: the input as given, then each row's tokens, right-padded with the pad id.
    sequences = result.sequences
    width = inputs.shape[1] if isinstance(inputs, torch.Tensor) else max(map(len, prompts))
    longest = max(len(t) for t in tokens)
    assert sequences.dtype == torch.int64
    assert tuple(sequences.shape) == (batch, width + longest), label
    if isinstance(inputs, torch.Tensor):
        assert torch.equal(sequences[:, :width].cpu(), inputs.cpu()), label
    else:
        head = [[pad] * (width - len(p)) + p for p in prompts]
        assert sequences[:, :width].tolist() == head, label
    for b in range(batch):
        tail = sequences[b, width:].tolist()
        assert tail == tokens[b] + [pad] * (longest - len(tokens[b])), (label, b)
    # rows[b]: row b as if decoded alone.
    for b, row in enumerate(result.rows):
        assert isinstance(row, GenerationResult)
        assert row.sequences.tolist() == [prompts[b] + tokens[b]], (label, b)
        assert row.prompt_length == len(prompts[b])
        assert row.new_tokens.tolist() == tokens[b]
        assert row.stats.new_tokens == len(tokens[b])
        assert row.stats.finish_reason == result.finish_reasons[b]
    assert result.stats.new_tokens == sum(len(t) for t in tokens)
    # batched passes: at least the longest-running row's, at most all rows' passes
    passes = [row.stats.target_passes for row in result.rows]
    assert max(passes) <= result.stats.target_passes <= sum(passes), (label, passes,
                                                                     result.stats.target_passes)
    return tokens


def eos_for(runs: list[list[int]], early: int, keep_running: set[int] | None = None) -> int:
    """A token that some rows emit within their first ``early`` tokens (at different steps
    where possible) and at least one row never emits (one of ``keep_running`` if given):
    rows end at different steps."""
    best, best_score = None, -1
    for token in range(3, VOCAB):
        firsts = [run.index(token) if token in run else None for run in runs]
        stopping = {f for f in firsts if f is not None and f < early}
        running = {b for b, f in enumerate(firsts) if f is None}
        if not stopping or not running or (keep_running is not None and
                                           not running & keep_running):
            continue
        score = len(stopping) * 10 + len(running)
        if score > best_score:
            best, best_score = token, score
    assert best is not None, "no token ends some rows early and leaves others running"
    return best


# ---------------------------------------------------------------------------- the grids


@pytest.mark.parametrize("form", ["list", "tensor"])
@pytest.mark.parametrize("batch", sorted(LENGTHS))
@pytest.mark.parametrize("method,pair", METHODS, ids=METHOD_IDS)
def test_rows_equal_greedy_float32(f32, method, pair, batch, form):
    prompts = prompts_of(LENGTHS[batch], seed=batch + 10 * METHODS.index((method, pair)))
    inputs, kwargs = batch_input(prompts, form)
    result = decoder_of(f32, method, pair).generate(inputs, 24, **kwargs)
    check_batch(result, f32["target"], prompts, inputs, 24, label=f"{method} B={batch} {form}")


@pytest.mark.parametrize("form", ["list", "junk"])
@pytest.mark.parametrize("batch", [3, 8])
@pytest.mark.parametrize("method,pair", [m for m in METHODS if m[1] != "same"],
                         ids=[i for m, i in zip(METHODS, METHOD_IDS) if m[1] != "same"])
def test_rows_equal_greedy_float64(f64, method, pair, batch, form):
    prompts = prompts_of(LENGTHS[batch], seed=50 + batch)
    inputs, kwargs = batch_input(prompts, form)
    decoder = decoder_of(f64, method, pair, attention_backend="reference")
    result = decoder.generate(inputs, 26, **kwargs)
    check_batch(result, f64["target"], prompts, inputs, 26, label=f"f64 {method} B={batch}")


@pytest.mark.parametrize("max_new_tokens", [1, 2])
@pytest.mark.parametrize("method,pair", METHODS, ids=METHOD_IDS)
def test_short_budgets(f32, method, pair, max_new_tokens):
    prompts = prompts_of([6, 1, 30], seed=3)
    inputs, kwargs = batch_input(prompts, "tensor")
    result = decoder_of(f32, method, pair).generate(inputs, max_new_tokens, **kwargs)
    check_batch(result, f32["target"], prompts, inputs, max_new_tokens)
    assert result.finish_reasons == ["length"] * 3


@pytest.fixture(scope="module")
def long() -> dict:
    """A 1,024-token context: prefixes past 512 cached tokens take the split-attention path
    once the batch is down to one row."""
    return _pairs(tiny_llama(0, vocab=VOCAB, max_positions=1024), seed=7)


@pytest.mark.parametrize("form", ["list", "tensor"])
@pytest.mark.parametrize("method,pair", METHODS, ids=METHOD_IDS)
def test_long_row_goes_on_alone_past_512_cached_tokens(long, method, pair, form):
    """Rows of 30, 300 and 1 tokens stop early; the 505-token row goes on alone past 512
    cached tokens (batch 1 again, long prefix)."""
    prompts = prompts_of([505, 30, 300, 1], seed=21)
    stops = {1: 3, 2: 5, 3: 2}
    inputs, kwargs = batch_input(prompts, form)
    result = decoder_of(long, method, pair).generate(
        inputs, 30, stop=lambda row, new: len(new) == stops.get(row, -1), **kwargs)
    check_batch(result, long["target"], prompts, inputs, 30, stops=stops, label=method)
    assert result.finish_reasons == ["length", "stop", "stop", "stop"]


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="CPU tensors reach the Triton kernels only under TRITON_INTERPRET=1 "
                           "(set by conftest.py unless OUROBOROS_TEST_GPU=1)")
def test_batch_through_triton_kernels():
    """The Triton tree attention and KV compaction (interpreted) with per-row prefixes and
    rows leaving the batch (a small case: the interpreter is slow)."""
    target = tiny_llama(0, vocab=16)
    models = {"target": target, "perturbed": perturbed(target, 0.05, seed=7)}
    prompts = [random_prompt(n, 16, n)[0].tolist() for n in (5, 1, 12)]
    runs = [reference(target, p, 8) for p in prompts]
    eos = next(t for t in runs[0][1:5] if t not in runs[0][:1] and t not in runs[2])
    decoder = OuroborosDecoder(target, models["perturbed"],
                               OuroborosConfig(gamma=3, num_suffixes=2,
                                               attention_backend="triton"))
    assert decoder.backend == "triton"
    inputs, kwargs = batch_input(prompts, "tensor")
    result = decoder.generate(inputs, 8, eos_token_id=eos, **kwargs)
    check_batch(result, target, prompts, inputs, 8, eos=[eos])
    assert result.finish_reasons[0] == "eos" and result.finish_reasons[2] == "length"


def test_input_forms_and_result_types(f32):
    """``[1, S]`` without a mask is one sequence; a list of one list, a ``[B > 1, S]`` tensor
    without a mask and any tensor with a mask are batches; `ouroboros.generate` too."""
    target = f32["target"]
    prompt = prompts_of([9], seed=4)[0]
    decoder = OuroborosDecoder(target, f32["perturbed"], "ouroboros")
    single = decoder.generate(torch.tensor([prompt]), 12)
    assert isinstance(single, GenerationResult) and not isinstance(single,
                                                                   BatchGenerationResult)
    assert single.new_tokens.tolist() == reference(target, prompt, 12)
    assert single.stats.finish_reason == "length"
    one = decoder.generate([prompt], 12)
    check_batch(one, target, [prompt], [prompt], 12)
    masked = decoder.generate(torch.tensor([prompt]), 12,
                              attention_mask=torch.ones(1, len(prompt), dtype=torch.int64))
    check_batch(masked, target, [prompt], torch.tensor([prompt]), 12)
    same_length = prompts_of([7, 7, 7], seed=5)
    ids = torch.tensor(same_length)
    check_batch(decoder.generate(ids, 15), target, same_length, ids, 15)
    from ouroboros.generate import BatchGenerationResult as from_module
    assert from_module is BatchGenerationResult
    for config in ("speculative", None):
        result = ouroboros.generate(target, f32["perturbed"], same_length, 15, config=config)
        check_batch(result, target, same_length, same_length, 15)


# ---------------------------------------------------------------------------- rows ending


@pytest.mark.parametrize("form", ["list", "tensor"])
@pytest.mark.parametrize("method,pair", METHODS, ids=METHOD_IDS)
def test_rows_end_at_their_own_eos(f32, method, pair, form):
    target = f32["target"]
    prompts = prompts_of([6, 19, 1, 33, 12], seed=6)
    runs = [reference(target, p, 30) for p in prompts]
    eos = [eos_for(runs, early=12)]
    if form == "tensor":  # a set of EOS ids: the first hit ends the row
        running = {b for b, r in enumerate(runs) if eos[0] not in r}
        eos.append(eos_for([r[:r.index(eos[0])] if eos[0] in r else r for r in runs], 25,
                           keep_running=running))
    inputs, kwargs = batch_input(prompts, form)
    decoder = decoder_of(f32, method, pair)
    result = decoder.generate(inputs, 30, eos_token_id=eos if len(eos) > 1 else eos[0],
                              **kwargs)
    tokens = check_batch(result, target, prompts, inputs, 30, eos=eos, label=method)
    assert "eos" in result.finish_reasons and "length" in result.finish_reasons
    assert len({len(t) for t in tokens}) >= 3  # rows did end at different steps


@pytest.mark.parametrize("method", ["speculative", "ouroboros", "full"])
def test_eos_inside_an_accepted_chunk(f32, method):
    """draft = target: whole chunks are accepted; an EOS in the middle of one ends that row
    right after the EOS (the chunk is cut there), the other rows go on."""
    target = f32["target"]
    gamma = 8
    for seed in range(40):
        prompts = prompts_of([9, 3, 21, 14], seed=100 + seed)
        runs = [reference(target, p, 30) for p in prompts]
        found = None
        for token in range(3, VOCAB):
            firsts = [r.index(token) if token in r else None for r in runs]
            inside = [b for b, f in enumerate(firsts) if f is not None and 2 <= f <= gamma - 2]
            if inside and None in firsts:
                found = token, inside[0]
                break
        if found:
            break
    assert found, "no prompt set with an EOS candidate inside the first chunk"
    eos, row = found
    chunks: dict[int, list[list[int]]] = {b: [] for b in range(len(prompts))}
    decoder = OuroborosDecoder(target, target, config_of(method, gamma=gamma))
    result = decoder.generate(prompts, 30, eos_token_id=eos,
                              streamer=lambda b, chunk: chunks[b].append(list(chunk)))
    tokens = check_batch(result, target, prompts, prompts, 30, eos=[eos], label=method)
    assert result.finish_reasons[row] == "eos" and "length" in result.finish_reasons
    last = chunks[row][-1]
    assert last[-1] == eos and len(last) >= 2, chunks[row]  # cut inside a multi-token chunk
    assert [t for c in chunks[row] for t in c] == tokens[row]


@pytest.mark.parametrize("form", ["list", "tensor"])
@pytest.mark.parametrize("method,pair", METHODS, ids=METHOD_IDS)
def test_row_overflowing_the_context_ends_alone(short, method, pair, form):
    """Context 48: rows of 30, 44 and 47 tokens + 20 new overflow and end with "context" at
    48 tokens; the others (their own positions: the left padding does not count) go on."""
    target = short["target"]
    prompts = prompts_of([30, 5, 44, 12, 47], seed=7)
    inputs, kwargs = batch_input(prompts, form)
    result = decoder_of(short, method, pair).generate(inputs, 20, **kwargs)
    tokens = check_batch(result, target, prompts, inputs, 20, label=method)
    assert result.finish_reasons == ["context", "length", "context", "length", "context"]
    assert [len(t) for t in tokens] == [18, 20, 4, 20, 1]
    with pytest.raises(ValueError, match="context"):  # one sequence still raises
        decoder_of(short, method, pair).generate(prompts[0], 20)


def test_every_finish_reason_in_one_batch(short):
    """Row 0 stopped by ``stop``, row 1 by its EOS, row 2 by max_new_tokens, row 3 by the
    context; pool, draft and caches shared."""
    target = short["target"]
    for seed in range(40):
        prompts = prompts_of([8, 11, 3, 40], seed=200 + seed)
        runs = [reference(target, p, 24)[:n] for p, n in zip(prompts, (5, 24, 24, 8))]
        candidates = [t for t in runs[1][3:12] if t not in runs[1][:3] and t not in runs[0]
                      and t not in runs[2] and t not in runs[3]]
        if candidates:
            break
    assert candidates, "no EOS candidate for row 1"
    eos = candidates[0]
    for method, pair in [("ouroboros", "perturbed"), ("speculative", "same"),
                         ("lookahead", None)]:
        decoder = decoder_of(short, method, pair)
        inputs, kwargs = batch_input(prompts, "tensor")
        result = decoder.generate(inputs, 24, eos_token_id=eos, **kwargs,
                                  stop=lambda row, new: row == 0 and len(new) == 5)
        check_batch(result, target, prompts, inputs, 24, eos=[eos], stops={0: 5}, label=method)
        assert result.finish_reasons == ["stop", "eos", "length", "context"], method


@pytest.mark.parametrize("method,pair", [("greedy", None), ("speculative", "same"),
                                         ("lookahead", None), ("ouroboros", "perturbed")])
def test_stop_per_row(f32, method, pair):
    target = f32["target"]
    prompts = prompts_of([7, 2, 26, 13], seed=9)
    stop_after = {0: 5, 2: 11}
    seen: dict[int, list[list[int]]] = {b: [] for b in range(4)}

    def stop(row: int, new_tokens: list[int]) -> bool:
        seen[row].append(list(new_tokens))
        return len(new_tokens) == stop_after.get(row, -1)

    result = decoder_of(f32, method, pair).generate(prompts, 20, stop=stop)
    tokens = check_batch(result, target, prompts, prompts, 20, stops=stop_after, label=method)
    assert result.finish_reasons == ["stop", "length", "stop", "length"]
    for b in range(4):  # once per emitted token of that row, in order, with its own tokens
        assert seen[b] == [tokens[b][:n] for n in range(1, len(tokens[b]) + 1)], (method, b)


@pytest.mark.parametrize("form", ["list", "junk"])
@pytest.mark.parametrize("method,pair", [("greedy", None), ("speculative", "same"),
                                         ("lookahead", None), ("ouroboros", "perturbed"),
                                         ("full", "close")])
def test_streaming_per_row(f32, method, pair, form):
    target = f32["target"]
    prompts = prompts_of([4, 31, 1, 15, 9], seed=10)
    eos = eos_for([reference(target, p, 25) for p in prompts], early=15)
    calls: list[tuple[int, list[int]]] = []

    def streamer(row, chunk):
        assert isinstance(row, int) and 0 <= row < len(prompts), row
        calls.append((row, list(chunk)))

    inputs, kwargs = batch_input(prompts, form)
    result = decoder_of(f32, method, pair).generate(inputs, 25, eos_token_id=eos,
                                                    streamer=streamer, **kwargs)
    tokens = check_batch(result, target, prompts, inputs, 25, eos=[eos], label=method)
    for b in range(len(prompts)):
        chunks = [chunk for row, chunk in calls if row == b]
        assert all(chunks), (b, chunks)  # no empty chunk
        assert [t for c in chunks for t in c] == tokens[b] == result.new_tokens[b], b


# ---------------------------------------------------------------------------- state


@pytest.mark.parametrize("method", ["ouroboros-window", "lookahead"])
def test_warm_pool_across_batched_calls(f32, method):
    target = f32["target"]
    if method == "lookahead":
        decoder = OuroborosDecoder(target, None, OuroborosConfig.preset(
            "lookahead", warm_start=True, pool_from_output=True))
    else:
        decoder = OuroborosDecoder(target, f32["close"], OuroborosConfig(
            gamma=4, num_suffixes=3, window=True, warm_start=True))
    first = prompts_of([10, 3, 25], seed=11)
    check_batch(decoder.generate(first, 30), target, first, first, 30, label="first call")
    assert decoder.pool.num_phrases() > 0
    second = prompts_of([7, 18, 1, 12, 33], seed=12)
    inputs, kwargs = batch_input(second, "tensor")
    check_batch(decoder.generate(inputs, 30, **kwargs), target, second, inputs, 30,
                label="second call")
    single = decoder.generate(second[1], 30)  # a single call on the warm pool
    assert single.new_tokens.tolist() == reference(target, second[1], 30)
    again = first + second[:2]  # prompts whose continuations the pool has seen
    check_batch(decoder.generate(again, 30), target, again, again, 30, label="third call")


@pytest.mark.parametrize("method,pair", METHODS, ids=METHOD_IDS)
def test_rows_equal_single_calls(f32, method, pair):
    """``rows[b]`` is what a single call with prompt b returns (sequences, new tokens,
    prompt length, finish reason)."""
    target = f32["target"]
    prompts = prompts_of([9, 1, 30, 16], seed=13)
    eos = eos_for([reference(target, p, 20) for p in prompts], early=10)
    inputs, kwargs = batch_input(prompts, "tensor")
    batch = decoder_of(f32, method, pair).generate(inputs, 20, eos_token_id=eos, **kwargs)
    check_batch(batch, target, prompts, inputs, 20, eos=[eos])
    for b, prompt in enumerate(prompts):
        single = decoder_of(f32, method, pair).generate(prompt, 20, eos_token_id=eos)
        assert torch.equal(batch.rows[b].sequences, single.sequences), b
        assert torch.equal(batch.rows[b].new_tokens, single.new_tokens), b
        assert batch.rows[b].prompt_length == single.prompt_length
        assert batch.rows[b].stats.finish_reason == single.stats.finish_reason, b
        assert batch.rows[b].stats.new_tokens == single.stats.new_tokens


def test_adaptive_trees_in_a_batch(f32):
    """The planner's trees (fixed measurements: tuning is off in the tests)."""
    from ouroboros.adaptive import adaptive_config
    from ouroboros.tuning import CostCurve, Measurements

    target = f32["target"]
    measurements = Measurements("test", CostCurve((1, 8, 64), (0.030, 0.040, 0.120)),
                                CostCurve((1, 8, 64), (0.003, 0.0035, 0.008)), 0.8)
    config = adaptive_config(measurements, OuroborosConfig(ngram=3))
    assert config.adaptive
    decoder = OuroborosDecoder(target, f32["close"], config)
    decoder.measurements = measurements
    prompts = prompts_of([5, 22, 1, 13, 40], seed=14)
    for form in ("list", "tensor"):
        inputs, kwargs = batch_input(prompts, form)
        result = decoder.generate(inputs, 40, eos_token_id=5, **kwargs)
        check_batch(result, target, prompts, inputs, 40, eos=[5], label=form)


def test_tuned_default_in_a_batch(f32, tmp_path, monkeypatch):
    """``config=None`` with tuning on (a temporary cache): tuned, adaptive, exact."""
    monkeypatch.setenv("OUROBOROS_TUNING", "on")
    monkeypatch.setenv("OUROBOROS_CACHE_DIR", str(tmp_path))
    target = f32["target"]
    decoder = OuroborosDecoder(target, f32["perturbed"])
    assert decoder.config.adaptive
    prompts = prompts_of([12, 2, 27], seed=15)
    inputs, kwargs = batch_input(prompts, "tensor")
    check_batch(decoder.generate(inputs, 36, eos_token_id=[], **kwargs), target, prompts,
                inputs, 36)


def test_pad_id_choice(f32):
    """The pad id: the argument, else generation_config.pad_token_id, else
    config.pad_token_id, else the first EOS id, else 0 (list input: the prompts are
    left-padded with it too)."""
    model = copy.deepcopy(f32["target"])  # its configs are edited below
    prompts = prompts_of([5, 1, 12], seed=16)
    stops = {0: 3}

    def run(expected_pad, eos=None, **kwargs):
        decoder = OuroborosDecoder(model, None, "greedy")
        result = decoder.generate(prompts, 9, stop=lambda row, new: row == 0 and len(new) == 3,
                                  **({} if eos is None else {"eos_token_id": eos}), **kwargs)
        check_batch(result, model, prompts, prompts, 9, pad=expected_pad, stops=stops,
                    eos=None if not eos else list(eos))
        return result

    run(0)
    run(7, pad_token_id=7)
    model.generation_config.pad_token_id = 11
    run(11)
    run(7, pad_token_id=7)
    model.generation_config.pad_token_id = None
    model.config.pad_token_id = 13
    run(13)
    model.config.pad_token_id = None
    model.config.eos_token_id = None
    run(0)
    model.generation_config.eos_token_id = [41, 43]
    result = run(41, eos=[41, 43])
    assert result.pad_token_id == 41


# ---------------------------------------------------------------------------- sampling

SAMPLING_VOCAB = 8


@pytest.fixture(scope="module")
def sampling_pair():
    target = tiny_llama(5, vocab=SAMPLING_VOCAB, init=0.4)
    return target, perturbed(target, 0.05, seed=2)


def _sampling_decoder(pair, method):
    target, draft = pair
    if method == "adaptive":  # the planner's trees, fixed measurements (as test_sampling)
        from ouroboros.adaptive import adaptive_config
        from ouroboros.tuning import CostCurve, Measurements

        measurements = Measurements("test", CostCurve((1, 8, 64), (0.02, 0.021, 0.03)),
                                    CostCurve((1, 8, 64), (0.002, 0.0021, 0.003)), 0.6)
        config = adaptive_config(measurements, OuroborosConfig(ngram=3, pool_capacity=8))
        decoder = OuroborosDecoder(target, draft, config)
        decoder.measurements = measurements
        return decoder
    config = OuroborosConfig.preset(method, ngram=3, pool_capacity=8)
    return OuroborosDecoder(target, draft if config.use_draft else None, config)


@pytest.mark.parametrize("method", ["ouroboros", "speculative", "lookahead", "adaptive"])
def test_seeded_rows_sample_what_single_calls_sample(sampling_pair, method):
    decoder = _sampling_decoder(sampling_pair, method)
    prompts = [random_prompt(n, SAMPLING_VOCAB, 30 + n)[0].tolist() for n in (4, 9, 1)]
    kwargs = {"do_sample": True, "top_p": 0.95, "eos_token_id": []}

    def alone(prompt, **seeding):
        return decoder.generate(prompt, 14, **kwargs, **seeding).new_tokens.tolist()

    inputs, masks = batch_input(prompts, "tensor")
    # one int seed: every row uses it
    batch = decoder.generate(inputs, 14, seed=123, **masks, **kwargs)
    assert batch.new_tokens == [alone(p, seed=123) for p in prompts]
    # a list of seeds, one per row
    seeds = [5, 6, 7]
    batch = decoder.generate(prompts, 14, seed=seeds, **kwargs)
    assert batch.new_tokens == [alone(p, seed=s) for p, s in zip(prompts, seeds)]
    # a list of generators, one per row
    batch = decoder.generate(prompts, 14, generator=[torch.Generator().manual_seed(s)
                                                     for s in seeds], **kwargs)
    assert batch.new_tokens == [alone(p, seed=s) for p, s in zip(prompts, seeds)]
    # one generator: the rows' uniforms drawn from it in row order, as consecutive calls do
    batch = decoder.generate(prompts, 14, generator=torch.Generator().manual_seed(99),
                             **kwargs)
    shared = torch.Generator().manual_seed(99)
    assert batch.new_tokens == [alone(p, generator=shared) for p in prompts]
    # identical prompts: one seed gives identical rows, different seeds different ones
    same = [prompts[0]] * 4
    assert len({tuple(r) for r in decoder.generate(same, 14, seed=3, **kwargs).new_tokens}) == 1
    distinct = decoder.generate(same, 14, seed=[0, 1, 2, 3], **kwargs).new_tokens
    assert len({tuple(r) for r in distinct}) > 1
    # rows ending at different steps (an EOS, a stop callback) while the others sample on
    ending = {"do_sample": True, "top_p": 0.95, "eos_token_id": 4}
    stop = lambda new: len(new) == 6  # noqa: E731
    seeds = [11, 12, 13]
    batch = decoder.generate(prompts, 14, seed=seeds, **ending,
                             stop=lambda row, new: row == 1 and stop(new))
    assert batch.new_tokens == [
        decoder.generate(p, 14, seed=s, **ending, stop=stop if b == 1 else None)
        .new_tokens.tolist() for b, (p, s) in enumerate(zip(prompts, seeds))]


def test_seeded_row_at_the_context_samples_what_it_samples_alone():
    """Context 20: the 15-token row ends alone at 20 tokens ("context"), sampling what that
    prompt samples alone with the same seed and the budget that fits."""
    target = tiny_llama(5, vocab=SAMPLING_VOCAB, init=0.4, max_positions=20)
    decoder = OuroborosDecoder(target, perturbed(target, 0.05, seed=3),
                               OuroborosConfig(gamma=3, ngram=3))
    prompts = [random_prompt(n, SAMPLING_VOCAB, 40 + n)[0].tolist() for n in (4, 15, 1)]
    kwargs = {"do_sample": True, "eos_token_id": []}
    batch = decoder.generate(prompts, 10, seed=7, **kwargs)
    assert batch.finish_reasons == ["length", "context", "length"]
    assert batch.new_tokens == [decoder.generate(p, min(10, 20 - len(p)), seed=7, **kwargs)
                                .new_tokens.tolist() for p in prompts]


def test_sampled_rows_have_the_targets_distribution(sampling_pair):
    """Chi-square over the first three tokens of 1,200 rows per prompt (two prompts of
    different lengths in every batch: the padding must not shift the distribution)."""
    from test_sampling import DEPTH, chi_square_pvalue, exact_joint

    from ouroboros.sampling import SamplingParams

    target, _ = sampling_pair
    decoder = _sampling_decoder(sampling_pair, "ouroboros")
    prompts = [random_prompt(5, SAMPLING_VOCAB, 9)[0].tolist(),
               random_prompt(2, SAMPLING_VOCAB, 4)[0].tolist()]
    params = SamplingParams(True, 1.0, None, None)
    per_batch, batches = 60, 40  # 30 rows of each prompt per call
    counts: list[dict[tuple, int]] = [{}, {}]
    for call in range(batches):
        rows = [prompts[b % 2] for b in range(per_batch)]
        seeds = list(range(call * per_batch, (call + 1) * per_batch))
        result = decoder.generate(rows, DEPTH, do_sample=True, seed=seeds, eos_token_id=[])
        for b, tokens in enumerate(result.new_tokens):
            outcome = tuple(tokens)
            counts[b % 2][outcome] = counts[b % 2].get(outcome, 0) + 1
    for which, prompt in enumerate(prompts):
        probs = exact_joint(target, prompt, params)
        assert chi_square_pvalue(counts[which], probs) > 1e-3, which
        wrong = exact_joint(target, prompt, SamplingParams(True, 1.25, None, None))
        for outcome in counts[which]:
            wrong.setdefault(outcome, 1e-12)
        assert chi_square_pvalue(counts[which], wrong) < 1e-3, which  # the test has power


# ---------------------------------------------------------------------------- bad input


def _raises(exc, call, *words):
    """``call()`` raises ``exc`` whose message holds every word; a tuple of words: any."""
    with pytest.raises(exc) as info:
        call()
    message = str(info.value).lower()
    missing = [w for w in words if not any(a.lower() in message for a in
                                           (w if isinstance(w, tuple) else (w,)))]
    assert not missing, f"{exc.__name__} message {str(info.value)!r} lacks {missing}"


class _PutEndStreamer:  # transformers' streamer protocol: put()/end()
    def put(self, value):
        pass

    def end(self):
        pass


_IDS = torch.randint(3, VOCAB, (2, 5), generator=torch.Generator().manual_seed(0))
_LISTS = [[3, 4], [5], [6, 7, 8]]
_NO_TOKENS = ("no tokens", "no token", "empty")  # the contract: "row b" ... no tokens
BAD_BATCHES = {
    "mask-columns": (ValueError, dict(input_ids=_IDS, attention_mask=torch.ones(2, 4)),
                     ["attention_mask"]),
    "mask-rows": (ValueError, dict(input_ids=_IDS, attention_mask=torch.ones(3, 5)),
                  ["attention_mask"]),
    "mask-1d": (ValueError, dict(input_ids=_IDS, attention_mask=torch.ones(5)),
                ["attention_mask"]),
    "right-padding": (ValueError, dict(input_ids=_IDS, attention_mask=torch.tensor(
        [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])), ["attention_mask", "left padding"]),
    "hole": (ValueError, dict(input_ids=_IDS, attention_mask=torch.tensor(
        [[0, 1, 0, 1, 1], [1, 1, 1, 1, 1]])), ["attention_mask", "left padding"]),
    "hole-bool": (ValueError, dict(input_ids=_IDS, attention_mask=torch.tensor(
        [[1, 1, 1, 1, 1], [0, 1, 1, 0, 1]]).bool()), ["attention_mask", "left padding"]),
    "all-padding-row": (ValueError, dict(input_ids=_IDS, attention_mask=torch.tensor(
        [[1, 1, 1, 1, 1], [0, 0, 0, 0, 0]])), ["row 1", _NO_TOKENS]),
    "empty-list-row": (ValueError, dict(input_ids=[[3, 4], [], [5]]), ["row 1", _NO_TOKENS]),
    "seed-list-short": (ValueError, dict(input_ids=_LISTS, do_sample=True, seed=[1, 2]),
                        ["seed"]),
    "seed-list-long": (ValueError, dict(input_ids=_LISTS, do_sample=True, seed=[1, 2, 3, 4]),
                       ["seed"]),
    "generator-list": (ValueError, dict(input_ids=_LISTS, do_sample=True,
                                        generator=[torch.Generator(), torch.Generator()]),
                       ["generator"]),
    "put-end-streamer": (TypeError, dict(input_ids=_LISTS, streamer=_PutEndStreamer()),
                         ["streamer"]),
    "out-of-vocabulary": (ValueError, dict(input_ids=[[3, 4], [5, VOCAB]]), ["input_ids"]),
}


@pytest.mark.parametrize("case", list(BAD_BATCHES))
def test_bad_batches_are_refused_by_name(f32, case):
    exc, kwargs, words = BAD_BATCHES[case]
    decoder = OuroborosDecoder(f32["target"], f32["perturbed"], "ouroboros")
    _raises(exc, lambda: decoder.generate(max_new_tokens=4, **kwargs), *words)
    # The decoder still works after the refusal.
    check_batch(decoder.generate(_LISTS, 6), f32["target"], _LISTS, _LISTS, 6)


def test_a_batch_too_large_for_memory_is_refused():
    """Each row's caches fit (5 GB), the batch's do not (64 rows): a ValueError naming the
    batch before anything is allocated (an address-space limit guards this machine if the
    engine tried to allocate anyway)."""
    model = tiny_llama(6, vocab=VOCAB, max_positions=2 * 10**7)
    decoder = OuroborosDecoder(model, None, "greedy")
    prompts = [[3 + b % 40] for b in range(64)]
    with open("/proc/self/status") as status:
        used = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize"))
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (used + 2 * 2**30, hard))
    try:
        _raises(ValueError, lambda: decoder.generate(prompts, 10**7), "batch")
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", ["speculative", "lookahead", "ouroboros"])
def test_batch_on_gpu_rows_match_generate(method):
    """A batch of four on CUDA through the compiled kernels (float32, head dim 64)."""
    from engine_models import perturbed as perturbed_model
    from engine_models import tiny_llama as tiny

    target = tiny(0, vocab=64, hidden=256, heads=4, kv_heads=2).cuda()
    draft = perturbed_model(target, 0.05, seed=7) if method != "lookahead" else None
    prompts = [torch.randint(3, 64, (n,), generator=torch.Generator().manual_seed(n)).tolist()
               for n in (17, 4, 33, 9)]
    decoder = OuroborosDecoder(target, draft, method)
    result = decoder.generate(prompts, 40)
    for row, prompt in enumerate(prompts):
        with torch.no_grad():
            expected = target.generate(torch.tensor([prompt]).cuda(), max_new_tokens=40,
                                       do_sample=False)
        assert result.new_tokens[row] == expected[0, len(prompt):].tolist(), row
