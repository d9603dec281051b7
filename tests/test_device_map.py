"""Targets whose layers run on several devices (accelerate's ``device_map``, issue 14).

CPU: the grouping of layers into per-device buffers, reading each layer's execution device
from accelerate's hooks, per-device byte counts, and exactness of every preset when the
cache is forced into several groups (each with its own lengths and step tensors, the
bookkeeping groups on other devices get) and when the model runs under accelerate's hooks.
GPU (``-m gpu``, run with ``OUROBOROS_TEST_GPU=1``): a real ``device_map`` over the GPUs
present, or over one GPU plus CPU offload, and one GPU plus layers executing on the CPU.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from engine_models import greedy_reference, perturbed, random_prompt, single_thread  # noqa: F401
from engine_models import tiny_llama

from ouroboros import OuroborosConfig, OuroborosDecoder
from ouroboros.cache import StaticKVCache
from ouroboros.distributed import device_groups, layer_devices

PRESETS = ("greedy", "speculative", "lookahead", "ouroboros")
CPU, CUDA0, CUDA1 = torch.device("cpu"), torch.device("cuda", 0), torch.device("cuda", 1)


def test_device_groups_are_runs_of_consecutive_layers():
    assert device_groups([CPU] * 4) == [(CPU, 0, 4)]
    assert device_groups([CUDA0, CUDA0, CUDA1, CUDA1, CUDA1, CUDA0]) == [
        (CUDA0, 0, 2), (CUDA1, 2, 5), (CUDA0, 5, 6)]  # a device seen again: a new group
    assert device_groups(["cuda:0", "cuda:0", "cpu"]) == [(CUDA0, 0, 2), (CPU, 2, 3)]
    assert device_groups([CPU] * 5, max_layers=2) == [(CPU, 0, 2), (CPU, 2, 4), (CPU, 4, 5)]
    assert device_groups([CUDA0, CUDA0, CUDA1], max_layers=1) == [
        (CUDA0, 0, 1), (CUDA0, 1, 2), (CUDA1, 2, 3)]
    with pytest.raises(ValueError, match="max_layers"):
        device_groups([CPU], max_layers=0)


def test_layer_devices_follow_accelerate_hooks():
    model = tiny_llama(0, layers=4)
    assert layer_devices(model, 4, CPU) == [CPU] * 4  # no hooks: the weights' device
    layers = model.model.layers
    # accelerate's hooks (stand-ins: only their execution_device is read): on a decoder
    # layer, on the attention itself (nearer wins), inside a SequentialHook, as an index.
    layers[1]._hf_hook = SimpleNamespace(execution_device=1)
    layers[2]._hf_hook = SimpleNamespace(execution_device="cuda:1")
    layers[2].self_attn._hf_hook = SimpleNamespace(execution_device=0)
    layers[3]._hf_hook = SimpleNamespace(hooks=[SimpleNamespace(), SimpleNamespace(
        execution_device=torch.device("cuda", 1))])
    assert layer_devices(model, 4, CPU) == [CPU, CUDA1, CUDA0, CUDA1]
    per_device = StaticKVCache.bytes_per_device(model, 10)
    one_layer = 2 * 1 * 2 * 10 * 16 * 4  # K and V, B, Hkv, rows, D, float32
    assert per_device == {CPU: one_layer, CUDA1: 2 * one_layer, CUDA0: one_layer}
    assert StaticKVCache.bytes_for(model, 10) == 4 * one_layer
    model.model._hf_hook = SimpleNamespace(execution_device=0)  # an ancestor: the rest
    assert layer_devices(model, 4, CPU)[0] == CUDA0


def test_cache_groups_layout_and_bookkeeping():
    cache = StaticKVCache(3, 2, 8, 20, layer_devices=[CPU] * 3, max_group_layers=2,
                          mirror_groups=True)
    assert [tuple(b.shape) for b in cache.buffers] == [(2, 2, 1, 2, 20, 8), (1, 2, 1, 2, 20, 8)]
    assert cache.nbytes == 3 * 2 * 2 * 20 * 8 * 4 and cache.multi_device
    assert cache.layers[2].keys.data_ptr() == cache.buffers[1][0, 0].data_ptr()
    keys = torch.randn(1, 2, 4, 8)
    for layer in range(3):
        cache.update(keys + layer, keys - layer, layer)
    cache.commit(1, torch.tensor([[1, 2]], dtype=torch.int32),
                 torch.tensor([2], dtype=torch.int32), 2)  # keep row 0, move rows 2, 3
    assert cache.host_lengths == [3]
    for group in cache.groups:
        assert group.lengths is not cache.lengths and group.lengths.tolist() == [3]
    for layer, buffer, index in ((0, 0, 0), (1, 0, 1), (2, 1, 0)):
        expected = (keys + layer)[:, :, [0, 2, 3]]
        assert torch.equal(cache.buffers[buffer][index, 0, :, :, :3], expected)
    cache.truncate(1)
    assert all(group.lengths.tolist() == [1] for group in cache.groups)
    assert "on cpu" in repr(cache)


def grouped(monkeypatch, **kwargs):
    """Make every cache the decoder builds a grouped one."""
    original = StaticKVCache.for_model.__func__

    def for_model(cls, model, max_length, batch_size=1, **_):
        return original(cls, model, max_length, batch_size, **kwargs)

    monkeypatch.setattr(StaticKVCache, "for_model", classmethod(for_model))


@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_preset_exact_with_the_cache_in_several_groups(monkeypatch, dtype):
    grouped(monkeypatch, max_group_layers=1, mirror_groups=True)
    target = tiny_llama(1, layers=3, dtype=dtype)
    draft = perturbed(target, 0.1, seed=2)
    for length, seed in ((11, 0), (6, 3)):
        prompt = random_prompt(length, 48, seed)
        expected = greedy_reference(target, prompt, 20)
        for preset in PRESETS:
            config = OuroborosConfig.preset(preset)
            decoder = OuroborosDecoder(target, draft if config.use_draft else None, config)
            result = decoder.generate(prompt, 20, eos_token_id=[])
            assert torch.equal(result.sequences, expected), (preset, length)
            cache = decoder._caches["target"]
            assert len(cache.groups) == 3 and cache.multi_device


@pytest.mark.usefixtures("single_thread")
def test_exact_under_accelerate_hooks(monkeypatch):
    """accelerate's hooks (as ``device_map`` dispatch installs them) pass the engine's tree
    step through untouched; every preset stays exact."""
    from accelerate import dispatch_model

    target = tiny_llama(4, layers=3)
    draft = perturbed(target, 0.1, seed=5)
    prompt = random_prompt(10, 48, 1)
    expected = greedy_reference(target, prompt, 18)
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "cpu",
                  "model.layers.2": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu",
                  "lm_head": "cpu"}
    dispatch_model(target, device_map=device_map, force_hooks=True)
    assert hasattr(target.model.layers[1], "_hf_hook")
    grouped(monkeypatch, max_group_layers=2, mirror_groups=True)
    for preset in PRESETS:
        config = OuroborosConfig.preset(preset)
        decoder = OuroborosDecoder(target, draft if config.use_draft else None, config)
        assert torch.equal(decoder.generate(prompt, 18, eos_token_id=[]).sequences, expected)


def test_a_model_moved_after_the_cache_was_made_is_refused():
    cache = StaticKVCache(2, 2, 8, 10, layer_devices=[CPU, torch.device("meta")])
    with pytest.raises(RuntimeError, match="placed on meta"):
        cache.update(torch.zeros(1, 2, 1, 8), torch.zeros(1, 2, 1, 8), 1)


def test_a_draft_on_another_gpu_than_the_target_is_refused():
    target = tiny_llama(0)
    draft = perturbed(target, 0.1, seed=1)
    OuroborosDecoder(target, draft, "speculative")  # same device: fine
    fake = SimpleNamespace(device=CUDA1)
    parameters = draft.parameters

    def on_gpu():  # the draft's first parameter reports cuda:1
        first = next(parameters())
        yield SimpleNamespace(device=fake.device, dtype=first.dtype)

    draft.parameters = on_gpu
    with pytest.raises(ValueError, match="put the draft on that device or on the CPU"):
        OuroborosDecoder(target, draft, "speculative")


# ============================================================================ GPU


def _save(tmp_path, layers=4):
    target = tiny_llama(6, layers=layers)
    draft = perturbed(target, 0.1, seed=7)
    target.save_pretrained(tmp_path / "target")
    draft.save_pretrained(tmp_path / "draft")
    return tmp_path / "target", tmp_path / "draft"


def _check_exact(target, draft, device):
    prompt = random_prompt(12, 48, 2).to(device)
    expected = greedy_reference(target, prompt, 24)
    for preset in PRESETS:
        config = OuroborosConfig.preset(preset)
        decoder = OuroborosDecoder(target, draft if config.use_draft else None, config)
        result = decoder.generate(prompt, 24, eos_token_id=[])
        assert torch.equal(result.sequences.cpu(), expected.cpu()), preset
    return decoder


def _layer_map(devices):
    device_map = {"model.embed_tokens": devices[0], "model.rotary_emb": devices[0]}
    device_map.update({f"model.layers.{i}": d for i, d in enumerate(devices)})
    device_map.update({"model.norm": devices[-1], "lm_head": devices[-1]})
    return device_map


gpu = pytest.mark.gpu


@gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_device_map_over_the_gpus_or_with_cpu_offload(tmp_path):
    """Layers spread over every GPU present (two or more), else one GPU with layers 1 and 2
    offloaded to ``"cpu"`` (they execute on the GPU: their cache rows live there)."""
    from transformers import AutoModelForCausalLM

    target_path, draft_path = _save(tmp_path)
    count = torch.cuda.device_count()
    if count >= 2:
        devices = [i * count // 4 for i in range(4)]
    else:
        devices = [0, "cpu", "cpu", 0]
    target = AutoModelForCausalLM.from_pretrained(target_path, device_map=_layer_map(devices),
                                                  dtype=torch.float32).eval()
    draft = AutoModelForCausalLM.from_pretrained(draft_path, dtype=torch.float32).to("cuda:0")
    decoder = _check_exact(target, draft, "cuda:0")
    cache = decoder._caches["target"]
    expected = [torch.device("cuda", d if isinstance(d, int) else 0) for d in devices]
    assert [buffer.device for buffer in cache.buffers for _ in range(buffer.shape[0])] == \
        expected
    assert torch.cuda.current_device() == 0


@gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_layers_split_between_the_gpu_and_the_cpu(tmp_path):
    """accelerate with ``main_device="cpu"``: layers 2 and 3 really execute on the CPU, 0 and
    1 on the GPU; the cache has a GPU group and a CPU group (Triton on one, the reference on
    the other), and a CPU draft beside it."""
    from accelerate import dispatch_model
    from transformers import AutoModelForCausalLM

    target_path, draft_path = _save(tmp_path)
    target = AutoModelForCausalLM.from_pretrained(target_path, dtype=torch.float32).eval()
    dispatch_model(target, device_map=_layer_map([0, 0, "cpu", "cpu"]), main_device="cpu")
    draft = AutoModelForCausalLM.from_pretrained(draft_path, dtype=torch.float32).eval()
    decoder = _check_exact(target, draft, "cuda:0")
    cache = decoder._caches["target"]
    assert [b.device.type for b in cache.buffers] == ["cuda", "cpu"]


@gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_memory_check_counts_each_device(tmp_path):
    from transformers import AutoModelForCausalLM

    target_path, _ = _save(tmp_path)
    target = AutoModelForCausalLM.from_pretrained(
        target_path, device_map=_layer_map([0, 0, "cpu", "cpu"]), dtype=torch.float32).eval()
    need = StaticKVCache.bytes_per_device(target, 100)
    assert set(need) == {torch.device("cuda", 0)}  # offloaded layers run on the GPU
