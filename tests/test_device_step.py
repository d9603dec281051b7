"""The static-shape device step (``OuroborosConfig(step="device")``, `ouroboros.device_step`):
exact on one sequence and on batches, one host read per step, clear errors for what it
does not run."""

from __future__ import annotations

import pytest
import torch
from engine_models import (  # noqa: F401  (single_thread is a fixture)
    EOS,
    greedy_reference,
    perturbed,
    random_prompt,
    single_thread,
    tiny_llama,
)

import ouroboros_kernels
from ouroboros import OuroborosConfig, OuroborosDecoder
from ouroboros.adaptive import SchedulePlanner, StepPlan, adaptive_config, envelope_plans
from ouroboros.device_step import TreeLayout
from ouroboros.tuning import CostCurve, Measurements

pytestmark = pytest.mark.usefixtures("single_thread")

CONFIGS = {
    "speculative": OuroborosConfig.preset("speculative", gamma=4, step="device"),
    "suffixes": OuroborosConfig(gamma=3, draft_phrases=0, num_suffixes=3, step="device"),
    "roots": OuroborosConfig(gamma=2, draft_phrases=0, num_suffixes=2, root_phrases=2,
                             ngram=3, step="device"),
    "long-phrases": OuroborosConfig(gamma=5, draft_phrases=0, num_suffixes=4, ngram=6,
                                    step="device"),
    "no-updates": OuroborosConfig(gamma=3, draft_phrases=0, num_suffixes=2, inspiration=False,
                                  refinement=False, pool_from_output=False, step="device"),
    "greedy": OuroborosConfig.preset("greedy", step="device"),
    "suffixes-only": OuroborosConfig.preset("lookahead", window=False, num_suffixes=3,
                                            step="device"),
    # Every preset, and phrase drafting / the target's window in other shapes.
    "ouroboros": OuroborosConfig.preset("ouroboros", step="device"),
    "lookahead": OuroborosConfig.preset("lookahead", step="device"),
    "phrases-roots": OuroborosConfig(gamma=5, draft_phrases=2, num_suffixes=2, root_phrases=1,
                                     ngram=3, step="device"),
    "phrases-long": OuroborosConfig(gamma=3, draft_phrases=3, num_suffixes=1, ngram=6,
                                    step="device"),
    "window-wide": OuroborosConfig.preset("lookahead", window_size=7, ngram=3, num_suffixes=2,
                                          root_phrases=1, step="device"),
    # The Jacobi window in the draft's passes, beside its phrases (the tuned envelopes').
    "draft-window": OuroborosConfig(gamma=6, draft_phrases=2, window=True, window_size=2,
                                    ngram=3, num_suffixes=3, root_phrases=2, step="device"),
    "draft-window-only": OuroborosConfig(gamma=4, draft_phrases=0, window=True, window_size=3,
                                         num_suffixes=1, step="device"),
}


def _models(dtype, draft_kind):
    target = tiny_llama(0, dtype=dtype)
    draft = target if draft_kind == "target" else perturbed(target, 0.3, seed=1)
    return target, draft


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("draft_kind", ["target", "perturbed"])
def test_device_step_rows_are_exact(name, draft_kind):
    target, draft = _models(torch.float32, draft_kind)
    config = CONFIGS[name]
    decoder = OuroborosDecoder(target, draft if config.use_draft else None, config)
    prompts = [random_prompt(n, 48, seed=7 * n)[0].tolist() for n in (4, 19, 1, 33, 9)]
    result = decoder.generate(prompts, 30)
    for row, prompt in enumerate(prompts):
        expected = greedy_reference(target, torch.tensor([prompt]), 30)[0, len(prompt):]
        assert result.new_tokens[row] == expected.tolist(), (name, row)
    # One read of the device per step, for the whole batch.
    assert result.stats.host_reads == result.stats.target_passes
    alone = decoder.generate(prompts[3], 30)
    assert alone.new_tokens.tolist() == result.new_tokens[3]
    assert alone.stats.host_reads == alone.stats.target_passes
    if draft_kind == "target" and config.use_draft:  # the draft is always right
        assert alone.stats.mean_accepted > config.gamma


@pytest.mark.parametrize("name", ["suffixes", "roots", "ouroboros", "lookahead",
                                  "phrases-roots", "draft-window"])
def test_device_step_float64_with_eos_and_the_end_of_the_budget(name):
    target, draft = _models(torch.float64, "perturbed")
    config = CONFIGS[name].replace(attention_backend="reference")
    decoder = OuroborosDecoder(target, draft if config.use_draft else None, config)
    prompts = [random_prompt(n, 48, seed=n)[0].tolist() for n in (6, 13, 2)]
    for new_tokens in (1, 2, 7, 25):  # trees cut by the budget (nodes past the last position)
        result = decoder.generate(prompts, new_tokens, eos_token_id=EOS)
        for row, prompt in enumerate(prompts):
            expected = greedy_reference(target, torch.tensor([prompt]), new_tokens,
                                        eos_token_id=EOS)[0, len(prompt):]
            assert result.new_tokens[row] == expected.tolist(), (new_tokens, row)


def test_device_step_keeps_a_warm_pool_and_learns():
    target, draft = _models(torch.float32, "perturbed")
    decoder = OuroborosDecoder(target, draft, CONFIGS["suffixes"])
    prompt = [5, 6, 7, 8, 9, 10, 5, 6, 7, 8, 9, 10, 5, 6, 7]
    first = decoder.generate(prompt, 40)
    again = decoder.generate(prompt, 40)
    expected = greedy_reference(target, torch.tensor([prompt]), 40)[0, len(prompt):].tolist()
    assert first.new_tokens.tolist() == again.new_tokens.tolist() == expected
    assert first.stats.output_ngrams > 0 and first.stats.prompt_ngrams > 0
    assert decoder.pool.num_phrases() > 0
    assert again.stats.suffix_tokens >= first.stats.suffix_tokens  # the pool knows the text


def test_the_layout():
    layout = TreeLayout.build(gamma=2, roots=1, suffixes=2, length=2, device=torch.device("cpu"))
    # nodes: draft 0, 1; root phrase 2, 3 (from the pending token); suffixes 4, 5 and 6, 7
    assert layout.parents.tolist() == [-1, 0, -1, 2, 1, 4, 1, 6]
    assert layout.depths.tolist() == [0, 1, 2, 1, 2, 3, 4, 3, 4]
    assert layout.choice_of_parent.tolist() == [0, 3, 2, 5, 2, 7]
    assert layout.num_columns == 9
    # Rows whose drafts hold 2, 1 and 0 tokens: their suffixes hang from slot 1, slot 0 and
    # the pending token, one and two levels higher, and do not see the unused slots.
    parents, depths, mask = layout.for_rows(torch.tensor([2, 1, 0]))
    assert parents[:, 4].tolist() == parents[:, 6].tolist() == [1, 0, -1]
    assert parents[:, 5].tolist() == [4, 4, 4] and parents[:, 2].tolist() == [-1, -1, -1]
    assert depths[:, 5:].tolist() == [[3, 4, 3, 4], [2, 3, 2, 3], [1, 2, 1, 2]]
    visible = ouroboros_kernels.unpack_tree_mask(mask, 9)
    for row, drafted in enumerate([2, 1, 0]):
        for column in (5, 6, 7, 8):
            seen = visible[row, column].nonzero().flatten().tolist()
            own = [5, 6] if column <= 6 else [7, 8]
            assert seen == [0] + list(range(1, 1 + drafted)) + \
                [c for c in own if c <= column], (row, column)


def test_the_layout_with_a_window():
    """A Jacobi window of 2 rows by 3 columns under the pending token, after one suffix."""
    layout = TreeLayout.build(gamma=0, roots=0, suffixes=1, length=2,
                              device=torch.device("cpu"), window_size=3)
    assert layout.window_start == 2 and layout.window_depth == 4
    # suffix 0, 1; window row 0: 2, 3, 4 (a chain); row 1: 5, 6, 7 (each under row 0's cell)
    assert layout.parents.tolist() == [-1, 0, -1, 2, 3, 2, 3, 4]
    assert layout.depths.tolist() == [0, 1, 2, 1, 2, 3, 2, 3, 4]


def _rotating_schedules(decoder, plans):
    """Row r of a call cycles through ``plans`` from plan 3r: rows of one step want
    different trees (the step's layout is the widest, each row offers -1 past its own)."""
    made = []

    def factory():
        made.append(None)
        start = 3 * (len(made) - 1)
        return SchedulePlanner(plans[start % len(plans):] + plans[:start % len(plans)])

    def planner():
        return factory()
    decoder._planner = planner
    return made


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("window", [False, True])
def test_every_plan_of_an_envelope_is_exact_on_the_device(dtype, window):
    """Steps cycle through every plan of the envelope, a different one per row (γ = 0 steps
    included: the draft cache falls behind and catches up in a wider first pass), in a
    batch: each row equals its greedy output, one host read per step."""
    target = tiny_llama(12, vocab=48, dtype=dtype)
    draft = perturbed(target, 0.1, seed=5)
    config = OuroborosConfig(gamma=3, num_suffixes=2, root_phrases=1, draft_phrases=2,
                             ngram=3, window=window, window_size=2, adaptive=True,
                             step="device")
    plans = envelope_plans(config)
    decoder = OuroborosDecoder(target, draft, config)
    made = _rotating_schedules(decoder, plans)
    prompts = [random_prompt(n, 48, seed=n)[0].tolist() for n in (6, 11, 16)]
    result = decoder.generate(prompts, 60, eos_token_id=[])
    assert len(made) == 3
    for row, prompt in enumerate(prompts):
        expected = greedy_reference(target, torch.tensor([prompt]), 60)[0, len(prompt):]
        assert result.new_tokens[row] == expected.tolist(), row
        assert sum(result.rows[row].stats.shapes.values()) == \
            result.rows[row].stats.target_passes
    assert len(result.stats.shapes) > 10
    assert result.stats.host_reads == result.stats.target_passes


def test_a_draft_cache_far_behind_catches_up_in_a_wider_pass(monkeypatch):
    """Several steps without a draft pass (γ = 0 plans, suffixes accepted from a repetitive
    prompt) leave more pending tokens than the first pass's L + 2 columns: it widens to the
    next bucket, and the output stays exact."""
    from ouroboros import device_step

    target, _ = _models(torch.float32, "target")
    config = OuroborosConfig(gamma=3, num_suffixes=2, draft_phrases=2, ngram=3, adaptive=True,
                             step="device")
    skip, draft_step = StepPlan(0, 2), StepPlan(3, 0, 0, 2)
    decoder = OuroborosDecoder(target, target, config)
    decoder._planner = lambda: SchedulePlanner([skip] * 4 + [draft_step])
    widths = []
    head = device_step.DeviceStepper._head

    def recording(self, runner, first, last):
        out = head(self, runner, first, last)
        if first:
            widths.append(out[0].shape[1])
        return out
    monkeypatch.setattr(device_step.DeviceStepper, "_head", recording)
    prompts = [[5, 6, 7, 8, 9, 10, 11] * 4, [8, 9, 10, 11, 5, 6, 7] * 3]
    result = decoder.generate(prompts, 50, eos_token_id=[])
    for row, prompt in enumerate(prompts):
        expected = greedy_reference(target, torch.tensor([prompt]), 50)[0, len(prompt):]
        assert result.new_tokens[row] == expected.tolist(), row
    assert max(widths) > config.phrase_len + 2


def test_the_adaptive_planner_on_the_device():
    """The tuned default configuration (adaptive trees, here with a window in the draft)
    runs on the device step: exact, and samples what the host step samples."""
    target, draft = _models(torch.float32, "perturbed")
    # Pass costs of a CPU-like target and a cheap draft (seconds at 1, 8 and 64 tokens).
    measurements = Measurements("test", CostCurve((1, 8, 64), (0.030, 0.040, 0.120)),
                                CostCurve((1, 8, 64), (0.003, 0.0035, 0.008)), 0.8)
    config = adaptive_config(measurements, OuroborosConfig(ngram=3, window=True,
                                                           window_size=2)).replace(step="device")
    prompts = [random_prompt(n, 48, seed=2 * n)[0].tolist() for n in (5, 14)]
    outputs = []
    for step in ("device", "host"):
        decoder = OuroborosDecoder(target, draft, config.replace(step=step))
        decoder.measurements = measurements
        result = decoder.generate(prompts, 40, eos_token_id=EOS)
        for row, prompt in enumerate(prompts):
            expected = greedy_reference(target, torch.tensor([prompt]), 40,
                                        eos_token_id=EOS)[0, len(prompt):]
            assert result.new_tokens[row] == expected.tolist(), (step, row)
        if step == "device":
            assert result.stats.host_reads == result.stats.target_passes
        sampled = decoder.generate(prompts, 30, do_sample=True, temperature=1.2, seed=5)
        outputs.append(sampled.new_tokens)
    assert outputs[0] == outputs[1]


@pytest.mark.parametrize("config, kwargs, message", [
    (CONFIGS["suffixes"].replace(adaptive=True), {}, None),  # tuning off: a fixed tree
])
def test_what_the_device_step_refuses(config, kwargs, message):
    target, draft = _models(torch.float32, "perturbed")
    decoder = OuroborosDecoder(target, draft, config)
    if message is None:
        decoder.generate([3, 4, 5], 5, **kwargs)
        return
    with pytest.raises(ValueError, match=f"step='device' cannot run this call: .*{message}"):
        decoder.generate([3, 4, 5], 5, **kwargs)
    with pytest.raises(ValueError, match="step must be one of"):
        OuroborosConfig(step="gpu")


def test_the_device_step_refuses_generation_config_rules():
    target, draft = _models(torch.float32, "perturbed")
    target.generation_config.repetition_penalty = 1.3
    decoder = OuroborosDecoder(target, draft, CONFIGS["ouroboros"])
    with pytest.raises(ValueError, match="step='device' cannot run this call: .*generation-"):
        decoder.generate([3, 4, 5], 5)


@pytest.mark.parametrize("name", ["speculative", "roots", "suffixes-only", "ouroboros",
                                  "lookahead", "draft-window"])
def test_device_step_samples_what_the_host_step_samples(name):
    """Both steps draw the token of output position p from the same uniform u_p: with one
    seed, the same text (for one sequence and for every row of a batch)."""
    target, draft = _models(torch.float32, "perturbed")
    device_config = CONFIGS[name]
    host_config = device_config.replace(step="host")
    prompts = [random_prompt(n, 48, seed=3 * n)[0].tolist() for n in (5, 12, 2)]
    outputs = []
    for config in (device_config, host_config):
        decoder = OuroborosDecoder(target, draft if config.use_draft else None, config)
        batch = decoder.generate(prompts, 30, do_sample=True, temperature=1.3, top_k=20,
                                 seed=11)
        alone = decoder.generate(prompts[1], 30, do_sample=True, temperature=1.3, top_k=20,
                                 seed=11)
        assert alone.new_tokens.tolist() == batch.new_tokens[1]
        outputs.append(batch.new_tokens)
        if config.step == "device":
            assert batch.stats.host_reads == batch.stats.target_passes
    assert outputs[0] == outputs[1]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["speculative", "roots", "suffixes-only", "ouroboros",
                                  "lookahead"])
def test_device_step_on_gpu_matches_generate(name):
    """The compiled kernels on CUDA (head dim 64), a batch of three, float32: every row
    exact, one host read per step."""
    target = tiny_llama(0, vocab=64, hidden=256, heads=4, kv_heads=2).cuda()
    config = CONFIGS[name]
    draft = perturbed(target, 0.05, seed=7) if config.use_draft else None
    decoder = OuroborosDecoder(target, draft, config)
    assert decoder.backend == "triton"
    prompts = [random_prompt(n, 64, seed=n)[0].tolist() for n in (17, 5, 30)]
    result = decoder.generate(prompts, 40)
    for row, prompt in enumerate(prompts):
        expected = greedy_reference(target, torch.tensor([prompt]).cuda(), 40)
        assert result.new_tokens[row] == expected[0, len(prompt):].tolist(), row
    assert result.stats.host_reads == result.stats.target_passes


@pytest.mark.parametrize("name", ["roots", "ouroboros", "lookahead", "draft-window"])
def test_no_read_of_the_device_escapes_the_counter(monkeypatch, name):
    """Every ``tolist`` / ``item`` / ``bool`` of a tensor during the decoding steps is the
    counted one (`ouroboros.generate.host_read`), and there is one per step: nothing in the
    kernels' wrappers, the pool or the attention reads the device behind its back."""
    target, draft = _models(torch.float32, "perturbed")
    config = CONFIGS[name]
    decoder = OuroborosDecoder(target, draft if config.use_draft else None, config)
    prompts = [random_prompt(n, 48, seed=n)[0].tolist() for n in (7, 15)]
    counts = {"reads": 0, "stepping": False}
    real_step = {}

    def counting(name):
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, **kwargs):
            if counts["stepping"]:
                counts["reads"] += 1
            return original(self, *args, **kwargs)
        return wrapper

    for name in ("tolist", "item", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    from ouroboros import device_step

    real_step["call"] = device_step.DeviceStepper.__call__

    def stepping(self, session):
        counts["stepping"] = True
        try:
            return real_step["call"](self, session)
        finally:
            counts["stepping"] = False

    monkeypatch.setattr(device_step.DeviceStepper, "__call__", stepping)
    result = decoder.generate(prompts, 24)
    assert counts["reads"] == result.stats.host_reads == result.stats.target_passes
