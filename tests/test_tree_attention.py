"""tree_attention: the reference against a naive model, the kernel against the reference."""

import dataclasses
import importlib
import os
import random

import pytest
import torch
import triton

from ouroboros_kernels.tree import build_tree, unpack_tree_mask
from ouroboros_kernels.tree_attention import (
    TreeAttentionConfig,
    default_config,
    tree_attention,
    tree_attention_reference,
    tree_attention_triton,
)

ON_GPU = os.environ.get("OUROBOROS_TEST_GPU", "0") == "1" and torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"


def random_parents(num_nodes, rng, kind="random"):
    if kind == "chain":
        return [i - 1 for i in range(num_nodes)]
    if kind == "star":
        return [-1] + [0] * (num_nodes - 1)
    return [rng.randrange(-1, i) for i in range(num_nodes)]


def make_case(batch, num_new, num_q_heads, num_kv_heads, head_dim, prefix_lens, *,
              dtype=torch.float64, kind="random", per_sequence_tree=True, seed=0, slack=3):
    """Random q, cache (every slot random, also the unused tail) and tree mask."""
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    max_len = max(prefix_lens) + num_new + slack
    q = torch.randn(batch, num_new, num_q_heads, head_dim, generator=gen, dtype=torch.float64)
    k_cache = torch.randn(batch, num_kv_heads, max_len, head_dim, generator=gen,
                          dtype=torch.float64)
    v_cache = torch.randn(batch, num_kv_heads, max_len, head_dim, generator=gen,
                          dtype=torch.float64)
    trees = batch if per_sequence_tree else 1
    parents = torch.tensor([random_parents(num_new, rng, kind) for _ in range(trees)])
    tree_mask, _ = build_tree(parents)
    prefix = torch.tensor(prefix_lens, dtype=torch.int32)
    to = lambda t: t.to(dtype).to(DEVICE)
    return to(q), to(k_cache), to(v_cache), prefix.to(DEVICE), tree_mask.to(DEVICE)


def naive_attention(q, k_cache, v_cache, prefix_lens, visible, scale=None):
    """Row by row, in float64: softmax over the prefix columns and the visible tree columns."""
    batch, num_new, num_q_heads, head_dim = q.shape
    group = num_q_heads // k_cache.shape[1]
    scale = head_dim ** -0.5 if scale is None else scale
    out = torch.empty(q.shape, dtype=torch.float64)
    for b in range(batch):
        prefix = int(prefix_lens[b])
        for i in range(num_new):
            cols = list(range(prefix)) + [prefix + j for j in range(num_new) if visible[b][i][j]]
            for h in range(num_q_heads):
                keys = k_cache[b, h // group, cols].double()
                values = v_cache[b, h // group, cols].double()
                weights = torch.softmax(keys @ q[b, i, h].double() * scale, 0)
                out[b, i, h] = weights @ values
    return out


@pytest.mark.parametrize("batch, num_new, heads, head_dim, prefix_lens, kind, causal", [
    (1, 1, (1, 1), 16, [0], "chain", False),
    (2, 6, (4, 1), 8, [3, 0], "random", False),
    (3, 9, (8, 2), 16, [5, 1, 12], "star", False),
    (2, 5, (6, 3), 8, [2, 7], "chain", True),
    (2, 40, (2, 1), 8, [4, 9], "random", False),
])
def test_reference_matches_naive(batch, num_new, heads, head_dim, prefix_lens, kind, causal):
    q, k_cache, v_cache, prefix, tree_mask = make_case(batch, num_new, *heads, head_dim,
                                                       prefix_lens, kind=kind)
    q, k_cache, v_cache, prefix, tree_mask = (t.cpu() for t in (q, k_cache, v_cache, prefix,
                                                                tree_mask))
    if causal:
        visible = torch.ones(batch, num_new, num_new, dtype=torch.bool).tril()
        result = tree_attention_reference(q, k_cache, v_cache, prefix, causal=True, scale=0.3)
        want = naive_attention(q, k_cache, v_cache, prefix, visible, scale=0.3)
    else:
        visible = unpack_tree_mask(tree_mask, num_new)
        result = tree_attention_reference(q, k_cache, v_cache, prefix, tree_mask)
        want = naive_attention(q, k_cache, v_cache, prefix, visible)
    assert result.dtype == torch.float64 and result.shape == q.shape
    torch.testing.assert_close(result, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("prefix_lens", [[9, 9], [9, 4]])
def test_reference_decode_step(prefix_lens):
    # T = 1 without a mask: with equal prefixes the reference skips the mask entirely.
    q, k_cache, v_cache, prefix, _ = make_case(2, 1, 6, 2, 16, prefix_lens)
    q, k_cache, v_cache, prefix = (t.cpu() for t in (q, k_cache, v_cache, prefix))
    visible = torch.ones(2, 1, 1, dtype=torch.bool)
    want = naive_attention(q, k_cache, v_cache, prefix, visible)
    torch.testing.assert_close(tree_attention_reference(q, k_cache, v_cache, prefix), want,
                               rtol=1e-10, atol=1e-10)
    out = torch.full_like(q, float("nan"))
    assert tree_attention_reference(q, k_cache, v_cache, prefix, causal=True, out=out) is out
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)


def test_reference_shared_mask_and_out():
    q, k_cache, v_cache, prefix, tree_mask = make_case(3, 7, 4, 2, 8, [2, 5, 0],
                                                       per_sequence_tree=False)
    q, k_cache, v_cache, prefix, tree_mask = (t.cpu() for t in (q, k_cache, v_cache, prefix,
                                                                tree_mask))
    out = torch.full_like(q, float("nan"))
    result = tree_attention_reference(q, k_cache, v_cache, prefix, tree_mask, out=out)
    assert result is out
    visible = unpack_tree_mask(tree_mask, 7).expand(3, 7, 7)
    torch.testing.assert_close(out, naive_attention(q, k_cache, v_cache, prefix, visible),
                               rtol=1e-10, atol=1e-10)
    # A 2-D mask [T, W] is the same as [1, T, W].
    torch.testing.assert_close(
        tree_attention_reference(q, k_cache, v_cache, prefix, tree_mask[0]), out)


# --------------------------------------------------------------------------------------------
# The kernel (Triton: interpreted on the CPU, compiled with OUROBOROS_TEST_GPU=1 on a GPU)
# against the float64 reference evaluated on the same (rounded) inputs.
# --------------------------------------------------------------------------------------------

# Max abs/rel error vs float64 on the rounded inputs. fp32: 3xTF32 dots on the GPU (about
# fp32 accuracy), numpy fp32 under the interpreter. fp16/bf16: the output is rounded to the
# dtype (2^-11 / 2^-8 relative) and, compiled, the probabilities are rounded to it before the
# P.V dot; |out| <= max |v| ~ 4.
TOLERANCE = {
    torch.float32: {"atol": 2e-5, "rtol": 2e-5},
    torch.float16: {"atol": 3e-3, "rtol": 3e-3},
    torch.bfloat16: {"atol": 2.5e-2, "rtol": 2.5e-2},
}


def run_kernel_case(batch, num_new, num_q_heads, num_kv_heads, head_dim, prefix_lens, kind,
                    dtype, *, causal=False, per_sequence_tree=True, config=None, seed=0,
                    strided=True):
    q, k_cache, v_cache, prefix, tree_mask = make_case(
        batch, num_new, num_q_heads, num_kv_heads, head_dim, prefix_lens, dtype=dtype,
        kind=kind, per_sequence_tree=per_sequence_tree, seed=seed)
    if strided:
        # q as the Llama attention hands it ([B, Hq, T, D] transposed), the caches as views of
        # one [layers, 2, B, Hkv, S, D] tensor, out as a transposed view.
        q = q.transpose(1, 2).contiguous().transpose(1, 2)
        cache = torch.stack([torch.stack([k_cache, v_cache])] * 2).clone()
        cache[0].uniform_(-1e4, 1e4)  # the other layer: never read
        k_cache, v_cache = cache[1, 0], cache[1, 1]
        out = torch.empty(batch, num_q_heads, num_new, head_dim, dtype=dtype,
                          device=q.device).transpose(1, 2)
    else:
        out = torch.empty_like(q)
    out.fill_(float("nan"))
    mask = None if causal else tree_mask
    want = tree_attention_reference(q.double(), k_cache.double(), v_cache.double(), prefix,
                                    mask, causal=causal)
    if config is None:
        result = tree_attention(q, k_cache, v_cache, prefix, mask, causal=causal, out=out)
    else:
        result = tree_attention_triton(q, k_cache, v_cache, prefix, mask, causal=causal, out=out,
                                       config=config)
    assert result is out
    assert not out.isnan().any(), "output not fully written"
    torch.testing.assert_close(out.double(), want, **TOLERANCE[dtype])


# Every listed value appears: B 1-3; Hq/Hkv 1/1, 4/1, 8/2, 32/8 (and 6/3: G not a power of
# two); D 64, 80, 128 (96, 256 once); T 1, 5, 17, 64, 130; prefix 0 and > block_n (64);
# chain, star and random trees; fp32, fp16, bf16.
KERNEL_CASES = [
    # batch, T, Hq, Hkv, D, prefix_lens, kind, dtype
    (1, 1, 1, 1, 64, [0], "chain", torch.float32),
    (2, 1, 32, 8, 128, [150, 7], "chain", torch.bfloat16),
    (3, 5, 4, 1, 64, [0, 70, 3], "random", torch.float16),
    (2, 17, 8, 2, 80, [65, 1], "star", torch.float32),
    (2, 17, 8, 2, 80, [130, 0], "random", torch.bfloat16),
    (1, 64, 4, 1, 128, [100], "chain", torch.float16),
    (2, 130, 1, 1, 64, [0, 77], "random", torch.float32),
    (1, 130, 8, 2, 80, [66], "star", torch.bfloat16),
    (2, 64, 32, 8, 64, [9, 140], "random", torch.float16),
    (1, 5, 6, 3, 96, [40], "random", torch.float32),
    (1, 3, 4, 2, 256, [33], "random", torch.bfloat16),
]


@pytest.mark.parametrize("batch, num_new, hq, hkv, head_dim, prefix_lens, kind, dtype",
                         KERNEL_CASES)
def test_kernel_tree(batch, num_new, hq, hkv, head_dim, prefix_lens, kind, dtype):
    run_kernel_case(batch, num_new, hq, hkv, head_dim, prefix_lens, kind, dtype)


@pytest.mark.parametrize("batch, num_new, hq, hkv, head_dim, prefix_lens, dtype", [
    (2, 64, 8, 2, 64, [0, 30], torch.float16),
    (1, 130, 4, 1, 128, [0], torch.bfloat16),
    (3, 17, 1, 1, 80, [5, 0, 90], torch.float32),
])
def test_kernel_causal(batch, num_new, hq, hkv, head_dim, prefix_lens, dtype):
    run_kernel_case(batch, num_new, hq, hkv, head_dim, prefix_lens, "chain", dtype, causal=True)


def test_kernel_shared_mask_contiguous():
    run_kernel_case(3, 17, 4, 2, 64, [0, 90, 12], "random", torch.float32,
                    per_sequence_tree=False, strided=False)


@pytest.mark.parametrize("fused_merge", [False, True])
@pytest.mark.parametrize("config, causal, prefix_lens", [
    (TreeAttentionConfig(16, 16, 4, 2, num_splits=3), False, [130, 3]),
    (TreeAttentionConfig(32, 32, 4, 2, num_splits=8), False, [0, 20]),  # most splits empty
    (TreeAttentionConfig(16, 32, 4, 2, num_splits=4), True, [70, 0]),
])
def test_kernel_split_kv(config, causal, prefix_lens, fused_merge):
    config = dataclasses.replace(config, fused_merge=fused_merge)
    run_kernel_case(2, 17, 6, 3, 64, prefix_lens, "random", torch.float16, causal=causal,
                    config=config)
    if fused_merge:  # every tile's ticket counter is back to zero for the next launch
        from ouroboros_kernels import tree_attention as module

        counters = importlib.import_module(module.__module__)._COUNTERS
        assert all(int(buffer.abs().sum()) == 0 for buffer in counters.values())


def test_kernel_fused_merge_repeated_launches_agree():
    """Back-to-back launches reuse the ticket counters: the fused merge gives the two-kernel
    merge's result every time (fp32, rows of every kind: seen, and seeing nothing)."""
    q, k_cache, v_cache, prefix, tree_mask = make_case(2, 5, 4, 2, 64, [40, 0],
                                                       dtype=torch.float32)
    two_kernels = TreeAttentionConfig(16, 16, 4, 2, num_splits=4)
    fused = dataclasses.replace(two_kernels, fused_merge=True)
    want = tree_attention_triton(q, k_cache, v_cache, prefix, tree_mask, config=two_kernels)
    for _ in range(3):
        got = tree_attention_triton(q, k_cache, v_cache, prefix, tree_mask, config=fused)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, equal_nan=True)


def test_kernel_decode_without_mask_and_default_out():
    q, k_cache, v_cache, prefix, _ = make_case(2, 1, 8, 2, 64, [100, 3], dtype=torch.float32)
    want = tree_attention_reference(q.double(), k_cache.double(), v_cache.double(), prefix)
    result = tree_attention(q, k_cache, v_cache, prefix)
    assert result.shape == q.shape and result.dtype == q.dtype and result.is_contiguous()
    torch.testing.assert_close(result.double(), want, **TOLERANCE[torch.float32])


def test_cpu_without_interpreter_uses_reference(monkeypatch):
    # The package re-exports the function under the module's name: fetch the module itself.
    module = importlib.import_module("ouroboros_kernels.tree_attention")
    calls = []
    monkeypatch.setattr(module, "use_triton", lambda *tensors: False)
    monkeypatch.setattr(module, "tree_attention_triton",
                        lambda *args, **kwargs: calls.append(1))
    q, k_cache, v_cache, prefix, tree_mask = make_case(1, 5, 4, 2, 64, [10],
                                                       dtype=torch.float32)
    result = module.tree_attention(q.cpu(), k_cache.cpu(), v_cache.cpu(), prefix.cpu(),
                                   tree_mask.cpu())
    assert not calls and result.shape == q.shape


def test_kernel_rejects_bad_arguments():
    q, k_cache, v_cache, prefix, tree_mask = make_case(2, 5, 4, 2, 64, [3, 4],
                                                       dtype=torch.float32, slack=0)
    good = dict(q=q, k_cache=k_cache, v_cache=v_cache, prefix_lens=prefix, tree_mask=tree_mask)

    def call(**changes):
        tree_attention(**{**good, **changes})

    call()  # sanity: the good arguments pass
    with pytest.raises(ValueError, match="q must have 4"):
        call(q=q[0])
    with pytest.raises(TypeError, match="k_cache and v_cache"):
        call(k_cache=k_cache.half())
    with pytest.raises(TypeError, match="q must have dtype"):
        call(q=q.int())
    with pytest.raises(ValueError, match="v_cache shape"):
        call(v_cache=v_cache[:, :, :-1])
    with pytest.raises(ValueError, match="batch"):
        call(k_cache=k_cache[:1], v_cache=v_cache[:1])
    with pytest.raises(ValueError, match="head dim"):
        call(k_cache=k_cache[..., :32], v_cache=v_cache[..., :32])
    with pytest.raises(ValueError, match="multiple"):
        call(q=torch.cat([q, q[:, :, :1]], 2))
    with pytest.raises(ValueError, match="prefix_lens has"):
        call(prefix_lens=prefix[:1])
    with pytest.raises(TypeError, match="prefix_lens"):
        call(prefix_lens=prefix.float())
    # Bounds are checked on the host by default only for CPU prefix_lens (no sync on CUDA).
    with pytest.raises(ValueError, match="exceeds the cache length"):
        call(prefix_lens=prefix + 1, check_bounds=True)
    with pytest.raises(ValueError, match=">= 0"):
        call(prefix_lens=prefix - 4, check_bounds=True)
    if prefix.device.type == "cpu":
        with pytest.raises(ValueError, match="exceeds the cache length"):
            call(prefix_lens=prefix + 1)
    with pytest.raises(ValueError, match="too few for"):
        big = torch.randn(2, 40, 4, 64, dtype=q.dtype, device=q.device)
        cache = torch.randn(2, 2, 60, 64, dtype=q.dtype, device=q.device)
        call(q=big, k_cache=cache, v_cache=cache, tree_mask=tree_mask[:, :1].expand(2, 40, 1))
    with pytest.raises(ValueError, match="tree_mask must be"):
        call(tree_mask=tree_mask[:, :4])
    with pytest.raises(TypeError, match="tree_mask"):
        call(tree_mask=tree_mask.long())
    with pytest.raises(ValueError, match="tree_mask is required"):
        call(tree_mask=None)
    with pytest.raises(ValueError, match="causal=True reads no mask"):
        tree_attention(q, k_cache, v_cache, prefix, tree_mask, causal=True)
    with pytest.raises(ValueError, match="out must be"):
        tree_attention(q, k_cache, v_cache, prefix, tree_mask, out=q[:, :4])
    with pytest.raises(ValueError, match="device"):
        call(prefix_lens=prefix.to("meta"))
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        call(q=q.tolist())
    with pytest.raises(TypeError, match="float64"):
        tree_attention_triton(q.double(), k_cache.double(), v_cache.double(), prefix, tree_mask)
    with pytest.raises(ValueError, match="block_m"):
        tree_attention_triton(q, k_cache, v_cache, prefix, tree_mask,
                              config=TreeAttentionConfig(24, 32, 4, 2))


# --------------------------------------------------------------------------------------------
# Compile check without a GPU: the kernels must lower to sm_90 code (as CI compile-checks the
# .cu files with nvcc), so that a compile error cannot hide behind the interpreter.
# --------------------------------------------------------------------------------------------

SM90_SHARED_LIMIT = 227 * 1024


def compile_for_sm90() -> list[dict]:
    """Compile the kernels for sm_90 with the heuristic configs of a few shapes. Runs in a
    subprocess without TRITON_INTERPRET (the interpreter decides at import time)."""
    import json

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module = importlib.import_module("ouroboros_kernels.tree_attention")
    module._device_limits = lambda index: (132, SM90_SHARED_LIMIT)  # an H100
    target = GPUTarget("cuda", 90, 32)
    names = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
    results = []
    shapes = [  # T, G, D, dtype, causal, fused split merge
        (1, 4, 128, torch.bfloat16, False, False),    # decode, split-KV, mma.sync tile
        (1, 4, 128, torch.bfloat16, False, True),     # ... merged by the last split program
        (64, 8, 80, torch.float16, False, False),     # tree, padded head dim, wgmma tile
        (2048, 1, 128, torch.bfloat16, True, False),  # prefill
        (16, 4, 256, torch.float32, False, False),    # fp32 3xTF32, widest head
    ]
    kernel = module._tree_attention_kernel
    for num_new, group, head_dim, dtype, causal, fused in shapes:
        config = module.default_config(num_new, group, head_dim, dtype, 1, 8, 8192, 0)
        block_d = max(16, triton.next_power_of_2(head_dim))
        split = config.num_splits > 1
        signature, constants = {}, {}
        for name in kernel.arg_names:
            signature[name] = "i32"
        for name in ("q_ptr", "k_ptr", "v_ptr", "out_ptr"):
            signature[name] = "*" + names[dtype]
        for name in ("prefix_lens_ptr", "mask_ptr", "counter_ptr"):
            signature[name] = "*i32"
        for name in ("part_o_ptr", "part_lse_ptr"):
            signature[name] = "*fp32" if split else "*" + names[dtype]
        signature["qk_scale"] = "fp32"
        constants = dict(GROUP=group, ROWS=max(1, config.block_m // group),
                         BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_D=block_d,
                         SPLIT=split, CAUSAL=causal, UPCAST=False,
                         FP32=dtype == torch.float32, EVEN_D=block_d == head_dim,
                         FUSED_MERGE=fused and split)
        for name in ("stride_qd", "stride_kd", "stride_vd", "stride_od", "stride_mw"):
            constants[name] = 1  # unit strides are specialised like this at run time
        for name in constants:
            signature[name] = "constexpr"
        aligned = [i for i, name in enumerate(kernel.arg_names) if name.endswith("_ptr")]
        attrs = {(i,): [["tt.divisibility", 16]] for i in aligned}
        compiled = triton.compile(ASTSource(kernel, signature, constants, attrs), target=target,
                                 options=dict(num_warps=config.num_warps,
                                              num_stages=config.num_stages))
        results.append(dict(shape=[num_new, group, head_dim, str(dtype), causal, fused],
                            config=repr(config), shared=compiled.metadata.shared))
    merge = module._merge_splits_kernel
    signature = {name: "i32" for name in merge.arg_names}
    signature.update(part_o_ptr="*fp32", part_lse_ptr="*fp32", out_ptr="*bf16")
    constants = dict(BLOCK_D=128, SPLITS_POW2=32, stride_od=1)
    signature.update({name: "constexpr" for name in constants})
    compiled = triton.compile(ASTSource(merge, signature, constants), target=target,
                              options=dict(num_warps=4))
    results.append(dict(shape="merge", shared=max(1, compiled.metadata.shared)))
    compact = importlib.import_module("ouroboros_kernels.compact_kv")._compact_kv_kernel
    signature = {name: "i32" for name in compact.arg_names}
    signature.update(cache_ptr="*bf16", prefix_lens_ptr="*i32", accepted_idx_ptr="*i32",
                     accepted_len_ptr="*i32")
    constants = dict(BLOCK_A=64, BLOCK_D=128)
    signature.update({name: "constexpr" for name in constants})
    compiled = triton.compile(ASTSource(compact, signature, constants), target=target,
                              options=dict(num_warps=4))
    results.append(dict(shape="compact_kv", shared=max(1, compiled.metadata.shared)))
    print(json.dumps(results))
    return results


@pytest.mark.skipif(ON_GPU, reason="the GPU run compiles the kernels for real")
def test_kernels_compile_for_sm90():
    import json
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    code = "import test_tree_attention as t; t.compile_for_sm90()"
    run = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(__file__), env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(results) == 7
    assert results[1]["shape"][-1] and "num_splits=1," not in results[1]["config"]
    for result in results:
        assert 0 < result["shared"] <= SM90_SHARED_LIMIT, result


# --------------------------------------------------------------------------------------------
# GPU only (OUROBOROS_TEST_GPU=1 on a CUDA machine): bigger shapes, compiled, with the
# default heuristic configs (split-KV included) and under CUDA-graph capture.
# --------------------------------------------------------------------------------------------

needs_gpu = pytest.mark.skipif(not ON_GPU, reason="needs CUDA and OUROBOROS_TEST_GPU=1")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("batch, num_new, hq, hkv, head_dim, prefix_lens, kind, dtype", [
    # Every head dim in both 16-bit dtypes, spread over decode (split-KV), small and large
    # trees, long prefixes and all the GQA ratios.
    (1, 1, 32, 8, 128, [3000], "chain", torch.bfloat16),
    (4, 1, 32, 8, 128, [3000, 17, 900, 4095], "chain", torch.float16),
    (4, 16, 9, 3, 64, [0, 517, 1024, 2049], "random", torch.bfloat16),
    (2, 16, 9, 3, 64, [4000, 33], "star", torch.float16),
    (2, 64, 64, 8, 80, [700, 1500], "random", torch.bfloat16),
    (1, 40, 8, 8, 80, [2500], "chain", torch.float16),
    (1, 300, 32, 32, 96, [129], "random", torch.float16),
    (2, 7, 16, 2, 96, [1, 3333], "random", torch.bfloat16),
    (1, 100, 16, 4, 256, [1200], "random", torch.bfloat16),
    (3, 3, 8, 1, 256, [2000, 0, 64], "star", torch.float16),
    (2, 33, 32, 8, 128, [5000, 6000], "random", torch.float32),
])
def test_gpu_kernel_shapes(batch, num_new, hq, hkv, head_dim, prefix_lens, kind, dtype):
    run_kernel_case(batch, num_new, hq, hkv, head_dim, prefix_lens, kind, dtype, seed=head_dim)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_causal_prefill_long(dtype):
    run_kernel_case(1, 1500, 32, 8, 128, [0], "chain", dtype, causal=True)


@pytest.mark.gpu
@needs_gpu
def test_gpu_default_config_splits_decode():
    config = default_config(1, 4, 128, torch.bfloat16, 1, 8, 8192, torch.cuda.current_device())
    assert config.num_splits > 1, config
    big = default_config(2048, 4, 128, torch.bfloat16, 1, 8, 8192, torch.cuda.current_device())
    assert big.num_splits == 1, big


@pytest.mark.gpu
@needs_gpu
def test_gpu_cuda_graph_capture():
    """No host sync on the CUDA path: the call can be captured in a CUDA graph and replayed."""
    q, k_cache, v_cache, prefix, tree_mask = make_case(2, 16, 32, 8, 128, [900, 2000],
                                                       dtype=torch.bfloat16)
    out = torch.empty_like(q)
    tree_attention(q, k_cache, v_cache, prefix, tree_mask, out=out)  # compile outside capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        tree_attention(q, k_cache, v_cache, prefix, tree_mask, out=out)
    q.copy_(torch.randn_like(q))
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    want = tree_attention_reference(q.double(), k_cache.double(), v_cache.double(), prefix,
                                    tree_mask)
    torch.testing.assert_close(out.double(), want, **TOLERANCE[torch.bfloat16])


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("num_new, splits", [(1, 32), (4, 16), (16, 7)])
def test_gpu_fused_merge_matches_and_replays(num_new, splits):
    """The experimental fused split merge (atomic tickets, the last split program merges),
    compiled: the two-kernel merge's result on many tiles at once, eagerly and replayed 20
    times from a CUDA graph with fresh queries (a missing fence would show as stale
    partials), and its counters left at zero."""
    q, k_cache, v_cache, prefix, tree_mask = make_case(4, num_new, 32, 8, 128,
                                                       [4000, 17, 2500, 4095],
                                                       dtype=torch.bfloat16)
    two_kernels = TreeAttentionConfig(16, 64, 4, 3, num_splits=splits)
    fused = dataclasses.replace(two_kernels, fused_merge=True)
    out = torch.empty_like(q)
    tree_attention_triton(q, k_cache, v_cache, prefix, tree_mask, out=out, config=fused)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        tree_attention_triton(q, k_cache, v_cache, prefix, tree_mask, out=out, config=fused)
    for _ in range(20):
        q.copy_(torch.randn_like(q))
        out.fill_(float("nan"))
        graph.replay()
        want = tree_attention_triton(q, k_cache, v_cache, prefix, tree_mask,
                                     config=two_kernels)
        torch.cuda.synchronize()
        torch.testing.assert_close(out, want, rtol=2e-2, atol=2e-2)
    counters = importlib.import_module("ouroboros_kernels.tree_attention")._COUNTERS
    assert all(int(buffer.abs().sum()) == 0 for buffer in counters.values())
