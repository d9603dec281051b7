"""Tensor parallel under torchrun (issue 14): every preset's output under a 2-rank gloo
``tp_plan="auto"`` target equals single-process greedy decoding, each rank's KV cache holds
1/world of the single-process cache's bytes, the candidate pool is the same on every rank
(and the same as in a single process), and ``save_pool`` writes from rank 0 only.

The test (pytest, one process) saves a tiny random Llama pair, computes the references
single-process, then runs this file as a script under ``python -m torch.distributed.run
--nproc_per_node 2``; each rank writes what it saw to ``rank<r>.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_models import perturbed, random_prompt, tiny_llama  # noqa: E402

WORLD = 2
VOCAB = 48
PRESETS = ("greedy", "speculative", "lookahead", "ouroboros")
PROMPTS = [(12, 0), (9, 1)]  # (length, seed)
MAX_NEW = 24
SAMPLING_SEED = 7


def pool_digest(pool) -> str:
    """A hash of the pool's whole state (every tensor, in name order)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(pool.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def run_cases(target, draft, tp_draft=None) -> dict:
    """What both sides compare: each preset's outputs on the prompts (one decoder per preset,
    its pool warm across the prompts), the warm pool's digest, a sampled run, and the
    target cache's rows and bytes."""
    from ouroboros import OuroborosConfig, OuroborosDecoder

    result: dict = {"outputs": {}, "cache": {}}
    for preset in PRESETS:
        config = OuroborosConfig.preset(preset, warm_start=True) if preset in (
            "ouroboros", "lookahead") else OuroborosConfig.preset(preset)
        decoder = OuroborosDecoder(target, draft if config.use_draft else None, config)
        outputs = []
        for length, seed in PROMPTS:
            prompt = random_prompt(length, VOCAB, seed)
            outputs.append(decoder.generate(prompt, MAX_NEW, eos_token_id=[])
                           .sequences[0].tolist())
        result["outputs"][preset] = outputs
        cache = decoder._caches["target"]
        result["cache"][preset] = [cache.max_length, cache.nbytes]
        if decoder.pool is not None:
            result.setdefault("pool", {})[preset] = pool_digest(decoder.pool)
    decoder = OuroborosDecoder(target, draft, "ouroboros")
    sampled = decoder.generate(random_prompt(10, VOCAB, 5), MAX_NEW, do_sample=True,
                               temperature=0.8, seed=SAMPLING_SEED, eos_token_id=[])
    result["sampled"] = sampled.sequences[0].tolist()
    if tp_draft is not None:  # the draft itself tensor parallel
        decoder = OuroborosDecoder(target, tp_draft, "ouroboros")
        result["tp_draft"] = decoder.generate(random_prompt(12, VOCAB, 0), MAX_NEW,
                                              eos_token_id=[]).sequences[0].tolist()
    return result


# ============================================================================ the test


@pytest.fixture(scope="module")
def pair_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp_pair")
    target = tiny_llama(3, layers=2, heads=4, kv_heads=2)
    draft = perturbed(target, 0.15, seed=4)
    target.save_pretrained(root / "target")
    draft.save_pretrained(root / "draft")
    return root


def test_tensor_parallel_matches_single_process(pair_dir, tmp_path):
    from engine_models import greedy_reference
    from transformers import AutoModelForCausalLM

    from ouroboros.cache import StaticKVCache

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        target = AutoModelForCausalLM.from_pretrained(pair_dir / "target").eval()
        draft = AutoModelForCausalLM.from_pretrained(pair_dir / "draft").eval()
        greedy = [greedy_reference(target, random_prompt(length, VOCAB, seed), MAX_NEW)
                  [0].tolist() for length, seed in PROMPTS]
        single = run_cases(target, draft)
    finally:
        torch.set_num_threads(previous)
    for preset in PRESETS:  # the single-process engine itself is exact (sanity)
        assert single["outputs"][preset] == greedy, preset

    env = dict(os.environ, OMP_NUM_THREADS="1", TRITON_INTERPRET="0",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                           os.environ.get("PYTHONPATH", "")]))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={WORLD}", __file__, str(pair_dir), str(tmp_path)]
    try:
        run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=170)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"torchrun did not finish in {err.timeout} s:\n{err.stdout}\n{err.stderr}")
    assert run.returncode == 0, f"torchrun failed:\n{run.stdout[-4000:]}\n{run.stderr[-8000:]}"

    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    for rank, seen in enumerate(ranks):
        assert seen["world"] == WORLD and seen["tp_size"] == WORLD
        assert seen["kv_heads"] == target.config.num_key_value_heads // WORLD
        for preset in PRESETS:
            assert seen["outputs"][preset] == greedy, (rank, preset)
            rows, nbytes = seen["cache"][preset]
            single_bytes = StaticKVCache.bytes_for(target, rows)
            assert nbytes * WORLD == single_bytes, (rank, preset, nbytes, single_bytes)
            assert single["cache"][preset][0] == rows
        assert seen["pool"] == single["pool"], rank  # same op sequence as one process
        assert seen["sampled"] == single["sampled"], rank
        assert seen["tp_draft"] == greedy[0], rank
        assert seen["pool_saves"] == (1 if rank == 0 else 0), rank
        assert seen["pool_file_seen"] and seen["pool_reloaded"] == single["pool"]["ouroboros"]


# ============================================================================ the worker


def worker(pair_dir: Path, out_dir: Path) -> None:
    """One rank: load the pair (target tensor parallel), run the cases, write rank<r>.json."""
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from ouroboros import OuroborosConfig, OuroborosDecoder, distributed
    from ouroboros.cache import StaticKVCache

    torch.set_num_threads(1)
    target = AutoModelForCausalLM.from_pretrained(pair_dir / "target", tp_plan="auto",
                                                  dtype=torch.float32).eval()
    draft = AutoModelForCausalLM.from_pretrained(pair_dir / "draft", dtype=torch.float32).eval()
    tp_draft = AutoModelForCausalLM.from_pretrained(pair_dir / "draft", tp_plan="auto",
                                                    dtype=torch.float32).eval()
    rank, world = dist.get_rank(), dist.get_world_size()
    seen = run_cases(target, draft, tp_draft)
    seen.update(world=world, tp_size=distributed.tensor_parallel_size(target),
                kv_heads=StaticKVCache.geometry(target)[1])

    # save_pool: rank 0 writes, every rank returns after the file is complete.
    decoder = OuroborosDecoder(target, draft, OuroborosConfig.preset("ouroboros",
                                                                     warm_start=True))
    for length, seed in PROMPTS:
        decoder.generate(random_prompt(length, VOCAB, seed), MAX_NEW, eos_token_id=[])
    saves = []
    original = decoder.pool.save
    decoder.pool.save = lambda path: (saves.append(path), original(path))
    path = out_dir / "pool.safetensors"
    decoder.save_pool(path)
    seen["pool_saves"] = len(saves)
    seen["pool_file_seen"] = path.exists()
    decoder.load_pool(path)
    seen["pool_reloaded"] = pool_digest(decoder.pool)
    (out_dir / f"rank{rank}.json").write_text(json.dumps(seen))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    worker(Path(sys.argv[1]), Path(sys.argv[2]))
