"""benchmarks/bench_pool.py on a tiny configuration: every pool replays the same steps and
must agree (the benchmark checks it), and the report has a row per configuration."""

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))

import bench_pool  # noqa: E402


def test_tiny_configuration_runs_and_pools_agree():
    row = bench_pool.bench_config(500, 3, warm_tokens=3000, num_warmup=5, num_timed=30,
                                  use_cuda=False)
    assert row.vocab_size == 500 and row.phrase_len == 3
    assert min(row.python_us, row.python_lists_us, row.cpu_us, row.cpu_alloc_us) > 0
    assert len(row.cpu_parts_us) == 3 and min(row.cpu_parts_us) > 0
    assert 0 < row.phrases_stored <= 500 * bench_pool.CAPACITY
    table = bench_pool.table([row], use_cuda=False)
    assert table.splitlines()[2].startswith("| 500 | 3 |")


def test_dict_pool_matches_the_compiled_pool_semantics():
    """The Python baseline implements the same LRU semantics as CandidatePool (both
    insert paths: the tuned batch loop and the published-style per-n-gram calls)."""
    from ouroboros_kernels import CandidatePool

    text, steps = bench_pool.make_stream(200, 2, 2000, 20, seed=3)
    tuned, published = bench_pool.DictListPool(4), bench_pool.DictListPool(4)
    pool = CandidatePool(200, 4, 2)
    bench_pool.python_warm_start(tuned, text, 2)
    bench_pool.python_warm_start(published, text, 2)
    pool.insert_ngrams(torch.from_numpy(text))
    for step in steps:
        tensors = bench_pool.to_tensors(step, "cpu")
        bench_pool.run_python_step(tuned, step)
        bench_pool.run_published_style_step(published, tensors)
        bench_pool.run_compiled_step(pool, tensors)
    keys = sorted({k for s in steps for k in s.insert_keys})
    bench_pool.check_agreement(pool, tuned, keys)
    bench_pool.check_agreement(pool, published, keys)


def test_table_with_cuda_columns():
    """The CUDA columns (both insert paths) render from a row as a GPU run fills it."""
    row = bench_pool.Row(32000, 4, 190.0, 270.0, 20.0, 21.0, (4.0, 1.7, 9.0), 40.0, 45.0,
                         30.0, 35.0, 17.6, 17.0, 86000)
    lines = bench_pool.table([row], use_cuda=True).splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    assert len(header) == len(cells) == 15
    assert cells[header.index("CUDA µs/step (host wall)")] == "45.0"
    assert cells[header.index("CUDA speed-up (wall, vs published style)")] == "6.0x"
    assert cells[header.index("CUDA, cached insert µs/step (events / wall)")] == "30.0 / 35.0"
