"""Tree-masked attention of T new tokens over a static KV cache (Triton + reference).

The T new tokens of sequence ``b`` have their K/V already written at cache positions
``[prefix_lens[b], prefix_lens[b] + T)``. New token ``i`` attends to every position before
``prefix_lens[b]`` and to new token ``j`` iff bit ``j`` of row ``i`` of the packed tree mask is
set (`ouroboros_kernels.tree.build_tree` makes it), or iff ``j <= i`` with ``causal=True``.

Kernel layout (one program = one KV head x a block of tree rows x one split of the columns):

* GQA inside the kernel: the ``G = Hq / Hkv`` query heads of a KV head are stacked into the M
  dimension of the tile (row ``m`` = tree row ``m // G``, head ``m % G``), so each K/V tile is
  read once per KV head and feeds one tensor-core dot for all of them.
* Online softmax in fp32 with ``exp2``; ``scale * log2(e)`` is folded into the scores.
* Columns are walked as tiles: first the prefix (full tiles read with no mask at all, then the
  one partial tile), then the tree part, where the packed bits are read (or ``j <= i`` is
  computed for ``causal``) and tiles in which no row sees anything are skipped.
* Split-KV: when ``B x Hkv x row blocks`` programs cannot fill the GPU (small tree, long
  prefix), the column tiles are shared out over ``num_splits`` programs that write partial
  results and log-sum-exps; a second small kernel merges them (or, with the experimental
  ``fused_merge``, the last split program of each tile merges them: one launch less).

Roofline: with a small tree the kernel reads the prefix K/V once per KV head and is bound by
HBM bandwidth; with a large tree (prefill) it is bound by tensor-core throughput.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from ._utils import INTERPRET, check_same_device, check_tensor, next_power_of_2, use_triton
from .tree import unpack_tree_mask

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

__all__ = ["TreeAttentionConfig", "tree_attention", "tree_attention_reference",
           "tree_attention_triton"]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INDEX = (torch.int32, torch.int64)


def _check_args(q, k_cache, v_cache, prefix_lens, tree_mask, causal, scale, out,
                check_bounds):
    check_tensor("q", q, ndim=4, dtypes=_FLOATS)
    check_tensor("k_cache", k_cache, ndim=4, dtypes=_FLOATS)
    check_tensor("v_cache", v_cache, ndim=4, dtypes=_FLOATS)
    check_tensor("prefix_lens", prefix_lens, ndim=1, dtypes=_INDEX)
    tensors = {"q": q, "k_cache": k_cache, "v_cache": v_cache, "prefix_lens": prefix_lens}
    batch, num_new, num_q_heads, head_dim = q.shape
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise TypeError(f"k_cache and v_cache must have q's dtype {q.dtype}, got "
                        f"{k_cache.dtype} and {v_cache.dtype}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache shape {tuple(v_cache.shape)} differs from k_cache shape "
                         f"{tuple(k_cache.shape)}")
    kv_batch, num_kv_heads, max_len, kv_dim = k_cache.shape
    if kv_batch != batch:
        raise ValueError(f"k_cache has batch size {kv_batch}, q has {batch}")
    if kv_dim != head_dim:
        raise ValueError(f"k_cache has head dim {kv_dim}, q has {head_dim}")
    if num_kv_heads == 0 or num_q_heads % num_kv_heads != 0:
        raise ValueError(f"q's head count {num_q_heads} must be a multiple of k_cache's "
                         f"{num_kv_heads} (grouped-query attention)")
    if prefix_lens.shape[0] != batch:
        raise ValueError(f"prefix_lens has {prefix_lens.shape[0]} entries, q has batch {batch}")
    if num_new == 0:
        raise ValueError("q must have at least one new token (T >= 1)")
    if num_new > max_len:
        raise ValueError(f"T = {num_new} new tokens do not fit k_cache's S_max = {max_len}")
    if causal and tree_mask is not None:
        raise ValueError("causal=True reads no mask: pass tree_mask=None")
    if tree_mask is not None:
        check_tensor("tree_mask", tree_mask, ndim=(2, 3), dtypes=(torch.int32,))
        tensors["tree_mask"] = tree_mask
        if tree_mask.dim() == 2:
            tree_mask = tree_mask.unsqueeze(0)
        if tree_mask.shape[0] not in (1, batch) or tree_mask.shape[1] != num_new:
            raise ValueError(f"tree_mask must be [B or 1, T, ceil(T/32)] = [{batch} or 1, "
                             f"{num_new}, {(num_new + 31) // 32}], got {tuple(tree_mask.shape)}")
        if tree_mask.shape[2] * 32 < num_new:
            raise ValueError(f"tree_mask has {tree_mask.shape[2]} words per row: too few for "
                             f"T = {num_new} (needs ceil(T/32) = {(num_new + 31) // 32})")
    elif not causal and num_new > 1:
        raise ValueError(f"tree_mask is required for T = {num_new} > 1 new tokens unless "
                         "causal=True")
    if scale is not None and not (isinstance(scale, (float, int)) and math.isfinite(scale)):
        raise TypeError(f"scale must be a finite float or None, got {scale!r}")
    if out is not None:
        check_tensor("out", out, ndim=4)
        tensors["out"] = out
        if out.shape != q.shape or out.dtype != q.dtype:
            raise ValueError(f"out must be [B, T, Hq, D] = {tuple(q.shape)} of dtype {q.dtype}, "
                             f"got {tuple(out.shape)} of {out.dtype}")
    check_same_device(**tensors)
    if check_bounds is None:
        check_bounds = prefix_lens.device.type == "cpu"
    if check_bounds:
        low, high = (int(x) for x in torch.aminmax(prefix_lens))
        if low < 0:
            raise ValueError(f"prefix_lens must be >= 0, got {low}")
        if high + num_new > max_len:
            raise ValueError(f"prefix_lens + T = {high} + {num_new} exceeds the cache length "
                             f"S_max = {max_len} (k_cache dim 2)")
    return tree_mask


def tree_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                             prefix_lens: torch.Tensor, tree_mask: torch.Tensor | None = None,
                             *, causal: bool = False, scale: float | None = None,
                             out: torch.Tensor | None = None,
                             check_bounds: bool | None = None) -> torch.Tensor:
    """Plain PyTorch `tree_attention` (same contract), also the CPU path of the engine.

    The mask is unpacked once to ``bool[B, T, T]`` and spread over the columns
    ``[0, max(prefix_lens) + T)`` of the cache; one `scaled_dot_product_attention` call does the
    rest (grouped-query heads via ``enable_gqa``). Computes in the input dtype (float64 inputs
    give a float64 result). Reads ``min/max(prefix_lens)`` on the host. With unequal prefix
    lengths, columns past a sequence's own ``prefix_len + T`` (up to the longest) are masked
    but still multiplied by zero weights, so they must hold finite values (a zeroed cache
    does; the Triton kernel never reads them).
    """
    tree_mask = _check_args(q, k_cache, v_cache, prefix_lens, tree_mask, causal, scale, out,
                            check_bounds)
    batch, num_new, num_q_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    device = q.device
    prefix = prefix_lens.to(torch.int64)
    shortest, longest = (int(x) for x in torch.aminmax(prefix))
    span = longest + num_new
    gqa = num_q_heads != num_kv_heads
    if num_new == 1 and shortest == longest and (causal or tree_mask is None):
        # Plain decoding step: every sequence sees exactly columns [0, span), no mask needed.
        result = F.scaled_dot_product_attention(
            q.transpose(1, 2), k_cache[:, :, :span], v_cache[:, :, :span], scale=scale,
            enable_gqa=gqa).transpose(1, 2)
        return result.contiguous() if out is None else out.copy_(result)
    # rel[b, c]: cache column c relative to sequence b's first new token.
    rel = torch.arange(span, device=device)[None, :] - prefix[:, None]
    in_tree = (rel >= 0) & (rel < num_new)
    rows = torch.arange(num_new, device=device)
    if causal or tree_mask is None:  # no mask: causal, or T == 1 (the token sees itself)
        tree_visible = rel[:, None, :] <= rows[None, :, None]
    else:
        bits = unpack_tree_mask(tree_mask, num_new).expand(batch, num_new, num_new)
        tree_visible = bits.gather(2, rel.clamp(0, num_new - 1)[:, None, :]
                                   .expand(batch, num_new, span))
    mask = (rel < 0)[:, None, :] | (tree_visible & in_tree[:, None, :])
    result = F.scaled_dot_product_attention(
        q.transpose(1, 2), k_cache[:, :, :span], v_cache[:, :, :span],
        attn_mask=mask[:, None], scale=scale, enable_gqa=gqa,
    ).transpose(1, 2)
    return result.contiguous() if out is None else out.copy_(result)


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------

_LOG2E = 1.4426950408889634

if triton is not None:

    @triton.jit
    def _scores(q, k, qk_scale, FP32: tl.constexpr):
        # Scores in log2 units: exp2(s - m) == exp(scale * q.k - m'), one multiply per score.
        # k is a [BLOCK_N, BLOCK_D] tile; the transpose is a view of it for the dot.
        if FP32:  # 3xTF32: fp32-level accuracy on tensor cores
            s = tl.dot(q, tl.trans(k), input_precision="tf32x3")
        else:
            s = tl.dot(q, tl.trans(k))
        return s * qk_scale

    @triton.jit
    def _online_softmax(acc, m_i, l_i, s, v, FP32: tl.constexpr):
        # A row whose columns are all masked so far keeps m = -inf; m_safe keeps exp2 off NaN.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if FP32:  # 3xTF32: fp32-level accuracy on tensor cores
            pv = tl.dot(p.to(v.dtype), v, input_precision="tf32x3")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        return acc * alpha[:, None] + pv, m_new, l_i

    # Sizes that change from step to step are not specialised on (divisibility by 16, == 1):
    # a new tree size or cache length must not trigger a recompile in the decoding loop.
    @triton.jit(do_not_specialize=["num_new", "num_kv_heads", "max_len", "head_dim", "num_rows",
                                   "num_splits"])
    def _tree_attention_kernel(
        q_ptr, k_ptr, v_ptr, prefix_lens_ptr, mask_ptr, out_ptr, part_o_ptr, part_lse_ptr,
        counter_ptr,
        stride_qb, stride_qt, stride_qh, stride_qd,
        stride_kb, stride_kh, stride_ks, stride_kd,
        stride_vb, stride_vh, stride_vs, stride_vd,
        stride_mb, stride_mt, stride_mw,
        stride_ob, stride_ot, stride_oh, stride_od,
        num_new, num_kv_heads, max_len, head_dim, num_rows, num_splits, qk_scale,
        GROUP: tl.constexpr, ROWS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        SPLIT: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr,
        FP32: tl.constexpr, EVEN_D: tl.constexpr, FUSED_MERGE: tl.constexpr,
    ):
        row_block = tl.program_id(0)
        batch_head = tl.program_id(1)
        split = tl.program_id(2)
        b = batch_head // num_kv_heads
        kv_head = batch_head % num_kv_heads
        b64 = b.to(tl.int64)

        # Tile row m is query head (kv_head * GROUP + m % GROUP) of tree row (m // GROUP).
        offs_m = tl.arange(0, BLOCK_M)
        tree_row = row_block * ROWS + offs_m // GROUP
        q_head = kv_head * GROUP + offs_m % GROUP
        row_ok = (offs_m < ROWS * GROUP) & (tree_row < num_new)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < head_dim
        offs_n = tl.arange(0, BLOCK_N)

        q_ptrs = (q_ptr + b64 * stride_qb + tree_row[:, None].to(tl.int64) * stride_qt
                  + q_head[:, None] * stride_qh + offs_d[None, :] * stride_qd)
        q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:  # the interpreter computes bf16 dots on bit patterns
            q = q.to(tl.float32)

        k_base = k_ptr + b64 * stride_kb + kv_head.to(tl.int64) * stride_kh
        v_base = v_ptr + b64 * stride_vb + kv_head.to(tl.int64) * stride_vh
        prefix = tl.minimum(tl.load(prefix_lens_ptr + b).to(tl.int32), max_len)

        # This split's share of the column tiles: prefix tiles first, then tree tiles.
        num_prefix_tiles = tl.cdiv(prefix, BLOCK_N)
        if CAUSAL:  # rows of this block see new tokens up to their own index only
            tree_cols = tl.minimum(num_new, (row_block + 1) * ROWS)
        else:
            tree_cols = num_new
        num_tiles = num_prefix_tiles + tl.cdiv(tree_cols, BLOCK_N)
        per_split = tl.cdiv(num_tiles, num_splits)
        first = split * per_split
        last = tl.minimum(first + per_split, num_tiles)

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

        # Prefix, full tiles: every row sees every column, so no mask is read or applied.
        full_end = tl.minimum(last, prefix // BLOCK_N)
        for tile in tl.range(first, full_end):
            cols = tile * BLOCK_N + offs_n
            k_ptrs = k_base + cols[:, None] * stride_ks + offs_d[None, :] * stride_kd
            v_ptrs = v_base + cols[:, None] * stride_vs + offs_d[None, :] * stride_vd
            if EVEN_D:
                k = tl.load(k_ptrs)
                v = tl.load(v_ptrs)
            else:
                k = tl.load(k_ptrs, mask=d_ok[None, :], other=0.0)
                v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
            if UPCAST:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            s = _scores(q, k, qk_scale, FP32)
            acc, m_i, l_i = _online_softmax(acc, m_i, l_i, s, v, FP32)

        # Prefix, the partial last tile (if it falls in this split).
        tail = prefix // BLOCK_N
        if (prefix % BLOCK_N != 0) & (tail >= first) & (tail < last):
            cols = tail * BLOCK_N + offs_n
            col_ok = cols < prefix
            k = tl.load(k_base + cols[:, None] * stride_ks + offs_d[None, :] * stride_kd,
                        mask=col_ok[:, None] & d_ok[None, :], other=0.0)
            v = tl.load(v_base + cols[:, None] * stride_vs + offs_d[None, :] * stride_vd,
                        mask=col_ok[:, None] & d_ok[None, :], other=0.0)
            if UPCAST:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            s = _scores(q, k, qk_scale, FP32)
            s = tl.where(col_ok[None, :], s, float("-inf"))
            acc, m_i, l_i = _online_softmax(acc, m_i, l_i, s, v, FP32)

        # Tree part: new token j sits at cache position prefix + j.
        tree_first = tl.maximum(first, num_prefix_tiles) - num_prefix_tiles
        tree_last = last - num_prefix_tiles
        mask_rows = mask_ptr + b64 * stride_mb + tree_row.to(tl.int64) * stride_mt
        for tile in tl.range(tree_first, tree_last):
            new_col = tile * BLOCK_N + offs_n
            pos = prefix + new_col
            col_ok = (new_col < tree_cols) & (pos < max_len)
            if CAUSAL:
                visible = (new_col[None, :] <= tree_row[:, None]) & col_ok[None, :]
                any_visible = True
            else:
                words = tl.load(mask_rows[:, None] + (new_col // 32)[None, :] * stride_mw,
                                mask=row_ok[:, None] & col_ok[None, :], other=0)
                visible = ((words >> (new_col % 32)[None, :]) & 1) != 0
                any_visible = tl.max(visible.to(tl.int32)) > 0
            if any_visible:  # a tree tile no row of this block sees costs only its mask read
                k = tl.load(k_base + pos[:, None] * stride_ks + offs_d[None, :] * stride_kd,
                            mask=col_ok[:, None] & d_ok[None, :], other=0.0)
                v = tl.load(v_base + pos[:, None] * stride_vs + offs_d[None, :] * stride_vd,
                            mask=col_ok[:, None] & d_ok[None, :], other=0.0)
                if UPCAST:
                    k = k.to(tl.float32)
                    v = v.to(tl.float32)
                s = _scores(q, k, qk_scale, FP32)
                s = tl.where(visible, s, float("-inf"))
                acc, m_i, l_i = _online_softmax(acc, m_i, l_i, s, v, FP32)

        if not SPLIT:
            # A row that saw nothing gives 0/0 = NaN, as softmax over nothing does in the
            # reference; padding rows (never stored) divide by 1.
            out = acc / tl.where(row_ok, l_i, 1.0)[:, None]
            out_ptrs = (out_ptr + b64 * stride_ob + tree_row[:, None].to(tl.int64) * stride_ot
                        + q_head[:, None] * stride_oh + offs_d[None, :] * stride_od)
            tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty),
                     mask=row_ok[:, None] & d_ok[None, :])
        else:
            # Partial result of this split, normalised, with its log2-sum-exp2 for the merge.
            has_any = l_i > 0.0
            partial = acc / tl.where(has_any, l_i, 1.0)[:, None]
            lse = tl.where(has_any, m_i + tl.log2(tl.where(has_any, l_i, 1.0)), float("-inf"))
            flat_row = ((split * num_rows).to(tl.int64) + (b64 * num_new + tree_row)
                        * (num_kv_heads * GROUP) + q_head)
            tl.store(part_lse_ptr + flat_row, lse, mask=row_ok)
            tl.store(part_o_ptr + flat_row[:, None] * head_dim + offs_d[None, :], partial,
                     mask=(row_ok & has_any)[:, None] & d_ok[None, :])
            if FUSED_MERGE:
                # Take a ticket once this program's partials are written (the barrier orders
                # every thread's stores before the release); the last of the tile's splits
                # merges them all and resets the counter for the next launch.
                tl.debug_barrier()
                tile = batch_head * tl.num_programs(0) + row_block
                ticket = tl.atomic_add(counter_ptr + tile, 1, sem="acq_rel", scope="gpu")
                if ticket == num_splits - 1:
                    row0 = flat_row - (split * num_rows).to(tl.int64)  # split 0's row
                    m_run = tl.full([BLOCK_M], float("-inf"), tl.float32)
                    l_run = tl.zeros([BLOCK_M], tl.float32)
                    o_run = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
                    for other in tl.range(0, num_splits):
                        at = row0 + (other * num_rows).to(tl.int64)
                        lse_s = tl.load(part_lse_ptr + at, mask=row_ok, other=float("-inf"),
                                        cache_modifier=".cg")
                        m_new = tl.maximum(m_run, lse_s)
                        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                        alpha = tl.exp2(m_run - m_safe)
                        weight = tl.exp2(lse_s - m_safe)
                        part = tl.load(part_o_ptr + at[:, None] * head_dim + offs_d[None, :],
                                       mask=(row_ok & (weight > 0.0))[:, None] & d_ok[None, :],
                                       other=0.0, cache_modifier=".cg")
                        o_run = o_run * alpha[:, None] + weight[:, None] * part
                        l_run = l_run * alpha + weight
                        m_run = m_new
                    # Rows that saw nothing in any split: 0/0 = NaN, as without splits.
                    out = o_run / tl.where(row_ok, l_run, 1.0)[:, None]
                    out_ptrs = (out_ptr + b64 * stride_ob
                                + tree_row[:, None].to(tl.int64) * stride_ot
                                + q_head[:, None] * stride_oh + offs_d[None, :] * stride_od)
                    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty),
                             mask=row_ok[:, None] & d_ok[None, :])
                    tl.atomic_xchg(counter_ptr + tile, 0, sem="relaxed", scope="gpu")

    @triton.jit(do_not_specialize=["num_rows", "num_new", "num_q_heads", "head_dim",
                                   "num_splits"])
    def _merge_splits_kernel(
        part_o_ptr, part_lse_ptr, out_ptr,
        stride_ob, stride_ot, stride_oh, stride_od,
        num_rows, num_new, num_q_heads, head_dim, num_splits,
        BLOCK_D: tl.constexpr, SPLITS_POW2: tl.constexpr,
    ):
        # One program per output row, all splits in one [splits, D] tile: a single wave of
        # loads, and as many programs as rows to spread the (small) partials over the SMs.
        row = tl.program_id(0).to(tl.int64)
        splits = tl.arange(0, SPLITS_POW2)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < head_dim
        lse = tl.load(part_lse_ptr + splits * num_rows + row, mask=splits < num_splits,
                      other=float("-inf"))
        top = tl.max(lse, 0)
        top = tl.where(top == float("-inf"), 0.0, top)
        weight = tl.exp2(lse - top)
        # Splits that saw nothing wrote no partial output: never read it.
        partial = tl.load(part_o_ptr + (splits * num_rows + row)[:, None] * head_dim
                          + offs_d[None, :],
                          mask=(weight > 0.0)[:, None] & d_ok[None, :], other=0.0)
        out = tl.sum(weight[:, None] * partial, 0) / tl.sum(weight, 0)
        b = row // (num_new * num_q_heads)
        t = (row // num_q_heads) % num_new
        h = row % num_q_heads
        tl.store(out_ptr + b * stride_ob + t * stride_ot + h * stride_oh + offs_d * stride_od,
                 out.to(out_ptr.dtype.element_ty), mask=d_ok)


# --------------------------------------------------------------------------------------------
# Launch configuration
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TreeAttentionConfig:
    """Tile sizes and launch settings of the tree-attention kernel.

    ``block_m``: tile rows (tree rows x the query heads of one KV head, stacked; >= 16 and a
    power of two); ``block_n``: cache columns per tile (>= 16, power of two); ``num_splits``:
    programs sharing the columns of one (row block, KV head), merged by log-sum-exp.
    ``fused_merge`` (experimental, off by default; it has not yet been measured on a GPU): the
    last split program of each tile merges the partials itself (an atomic ticket per tile in
    a per-device counter buffer) instead of a second kernel. One launch at a time per device
    (the counters are shared): do not run two such launches concurrently on two streams.
    """

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    num_splits: int = 1
    fused_merge: bool = False


_MAX_SPLITS = 32  # keeps the merge kernel's [splits, D] tile at <= 32 registers per thread


@functools.lru_cache(maxsize=8)
def _device_limits(index: int) -> tuple[int, int]:
    props = torch.cuda.get_device_properties(index)
    shared = getattr(props, "shared_memory_per_block_optin", 0) or 99 * 1024
    return props.multi_processor_count, int(shared)


def _shared_bytes(config: TreeAttentionConfig, block_d: int, elem_size: int) -> int:
    # Q tile + pipelined K and V tiles + the probabilities tile fed to the second dot; fp32
    # (3xTF32 dots) measured ~25% above this count when compiled for sm_90, hence the margin.
    tiles = (config.block_m * block_d + config.num_stages * 2 * config.block_n * block_d
             + config.block_m * config.block_n)
    return elem_size * tiles * (13 if elem_size == 4 else 10) // 10


@functools.lru_cache(maxsize=1024)
def default_config(num_new: int, group: int, head_dim: int, dtype: torch.dtype, batch: int,
                   num_kv_heads: int, max_len: int, device_index: int | None
                   ) -> TreeAttentionConfig:
    """Heuristic launch settings (no autotuning: it needs a driver, and a decoding step must
    not benchmark). ``device_index`` None means the interpreter (one split).

    * ``block_m``: the stacked rows ``T x G`` rounded up to a power of two, from 16 up to 128
      (64 for ``D > 128`` or fp32). When even that leaves fewer than ``2 x SMs`` programs
      (the memory-bound regime) it is capped at 64 (32 for ``D > 128``): more programs, and the
      split epilogue then fits the registers.
    * ``block_n``: 64 (32 for ``D > 128`` or fp32) with 3 (2) pipelined stages, shrunk until
      the Q tile, the K/V stages and the P tile fit the device's shared memory.
    * ``num_warps``: 4 for ``block_m <= 16`` (an mma.sync tile), else 8. Compiled for sm_90
      with triton 3.9 these settings use <= 255 registers without spills in fp16/bf16
      (``D = 128``: 188-255; fp32 runs 3xTF32 dots and spills a little: it is the test dtype).
    * ``num_splits``: with fewer than ``2 x SMs`` programs, split the column tiles to reach
      about that count, keeping >= 2 tiles of the cache capacity per split (the actual prefix
      length lives on the device: reading it would cost a sync per layer), at most 32.
    """
    block_d = max(16, next_power_of_2(head_dim))
    elem_size = dtype.itemsize
    wide = block_d > 128 or elem_size == 4
    min_block_m = max(16, next_power_of_2(group))
    block_m = max(min_block_m, min(next_power_of_2(num_new * group), 64 if wide else 128))
    block_n = 32 if wide else 64
    num_stages = 2 if wide else 3
    sms, shared_limit = (1 << 30, 1 << 30) if device_index is None else \
        _device_limits(device_index)

    def programs(rows_m: int) -> int:
        return triton.cdiv(num_new, max(1, rows_m // group)) * batch * num_kv_heads

    if programs(block_m) < 2 * sms:
        block_m = max(min_block_m, min(block_m, 32 if block_d > 128 else 64))
    config = TreeAttentionConfig(block_m, block_n, 4 if block_m <= 16 else 8, num_stages)
    if device_index is None:
        return config
    while _shared_bytes(config, block_d, elem_size) > shared_limit and config.num_stages > 1:
        config = replace(config, num_stages=config.num_stages - 1)
    while _shared_bytes(config, block_d, elem_size) > shared_limit and config.block_n > 16:
        config = replace(config, block_n=config.block_n // 2)
    count = programs(block_m)
    if count < 2 * sms:
        splits = min(triton.cdiv(2 * sms, count), max(1, max_len // (2 * config.block_n)),
                     _MAX_SPLITS)
        config = replace(config, num_splits=splits)
    return config


# --------------------------------------------------------------------------------------------
# Launcher and public function
# --------------------------------------------------------------------------------------------


_COUNTERS: dict[torch.device, torch.Tensor] = {}


def _merge_counters(device: torch.device, count: int) -> torch.Tensor:
    """``count`` zeroed int32 tickets for the fused split merge, from a buffer kept per device
    (every launch leaves them zero again). Allocated outside CUDA-graph capture: warm up
    (one eager call) before capturing."""
    buffer = _COUNTERS.get(device)
    if buffer is None or buffer.numel() < count:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("tree_attention with fused_merge: call it once before CUDA "
                               "graph capture (its ticket counters are allocated then)")
        buffer = torch.zeros(max(count, 1024), dtype=torch.int32, device=device)
        _COUNTERS[device] = buffer
    return buffer[:count]


def _launch(q, k_cache, v_cache, prefix_lens, tree_mask, causal, scale, out,
            config: TreeAttentionConfig) -> torch.Tensor:
    batch, num_new, num_q_heads, head_dim = q.shape
    num_kv_heads, max_len = k_cache.shape[1], k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    block_d = max(16, next_power_of_2(head_dim))
    if config.block_m < 16 or config.block_m & (config.block_m - 1):
        raise ValueError(f"config.block_m must be a power of two >= 16, got {config.block_m}")
    if config.block_n < 16 or config.block_n & (config.block_n - 1):
        raise ValueError(f"config.block_n must be a power of two >= 16, got {config.block_n}")
    if config.block_m < group:
        raise ValueError(f"config.block_m = {config.block_m} must be >= Hq / Hkv = {group}")
    if not 1 <= config.num_splits <= _MAX_SPLITS:
        raise ValueError(f"config.num_splits must be in [1, {_MAX_SPLITS}], got "
                         f"{config.num_splits}")
    rows_per_block = config.block_m // group
    num_rows = batch * num_new * num_q_heads
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if tree_mask is None:  # causal (or T == 1, where the only new token sees itself)
        if not causal:
            causal = True
        mask_arg, mask_strides = prefix_lens, (0, 0, 0)
    else:
        mask_arg = tree_mask
        mask_strides = (tree_mask.stride(0) if tree_mask.shape[0] > 1 else 0,
                        tree_mask.stride(1), tree_mask.stride(2))
    if config.num_splits > 1:
        part_o = torch.empty((config.num_splits, num_rows, head_dim), dtype=torch.float32,
                             device=q.device)
        part_lse = torch.empty((config.num_splits, num_rows), dtype=torch.float32,
                               device=q.device)
    else:
        part_o = part_lse = out  # unused
    scale = head_dim ** -0.5 if scale is None else float(scale)
    grid = (triton.cdiv(num_new, rows_per_block), batch * num_kv_heads, config.num_splits)
    fused = config.fused_merge and config.num_splits > 1
    counters = _merge_counters(q.device, grid[0] * grid[1]) if fused else prefix_lens
    _tree_attention_kernel[grid](
        q, k_cache, v_cache, prefix_lens, mask_arg, out, part_o, part_lse, counters,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *mask_strides, *out.stride(),
        num_new, num_kv_heads, max_len, head_dim, num_rows, config.num_splits, scale * _LOG2E,
        GROUP=group, ROWS=rows_per_block,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_D=block_d,
        SPLIT=config.num_splits > 1, CAUSAL=causal,
        UPCAST=INTERPRET and q.dtype == torch.bfloat16, FP32=q.dtype == torch.float32,
        EVEN_D=block_d == head_dim, FUSED_MERGE=fused,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    if config.num_splits > 1 and not fused:
        splits_pow2 = next_power_of_2(config.num_splits)
        _merge_splits_kernel[(num_rows,)](
            part_o, part_lse, out, *out.stride(),
            num_rows, num_new, num_q_heads, head_dim, config.num_splits,
            BLOCK_D=block_d, SPLITS_POW2=splits_pow2,
            num_warps=max(1, min(8, splits_pow2 * block_d // 1024)),
        )
    return out


def tree_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          prefix_lens: torch.Tensor, tree_mask: torch.Tensor | None = None, *,
                          causal: bool = False, scale: float | None = None,
                          out: torch.Tensor | None = None, check_bounds: bool | None = None,
                          config: TreeAttentionConfig | None = None) -> torch.Tensor:
    """`tree_attention` forced onto the Triton kernel, optionally with an explicit config
    (tests and benchmarks). Tensors must be on CUDA, or on the CPU under TRITON_INTERPRET=1;
    fp16, bf16 or fp32; head dim <= 256."""
    if triton is None:
        raise RuntimeError("tree_attention_triton needs triton installed")
    tree_mask = _check_args(q, k_cache, v_cache, prefix_lens, tree_mask, causal, scale, out,
                            check_bounds)
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"the Triton kernel takes q of dtype float16, bfloat16 or float32, got "
                        f"{q.dtype} (float64 runs on tree_attention_reference)")
    if q.shape[3] > 256:
        raise ValueError(f"the Triton kernel takes head dims up to 256, got {q.shape[3]}")
    if not use_triton(q, k_cache, v_cache, prefix_lens):
        raise ValueError(f"the Triton kernel needs CUDA tensors or TRITON_INTERPRET=1 set before "
                         f"import; q is on {q.device}")
    if config is None:
        config = default_config(q.shape[1], q.shape[2] // k_cache.shape[1], q.shape[3], q.dtype,
                                q.shape[0], k_cache.shape[1], k_cache.shape[2],
                                q.device.index if q.is_cuda else None)
    try:
        return _launch(q, k_cache, v_cache, prefix_lens, tree_mask, causal, scale, out, config)
    except _OUT_OF_RESOURCES as error:
        # A card with less shared memory than the heuristic assumed: retry once, leaner.
        lean = replace(config, num_stages=1, block_n=max(16, config.block_n // 2))
        if lean == config:
            raise
        try:
            return _launch(q, k_cache, v_cache, prefix_lens, tree_mask, causal, scale, out, lean)
        except _OUT_OF_RESOURCES:
            raise RuntimeError(f"tree_attention: out of GPU resources with {config} and "
                               f"{lean} for q {tuple(q.shape)} {q.dtype}") from error


try:
    from triton.runtime.errors import OutOfResources as _OUT_OF_RESOURCES
except ImportError:  # pragma: no cover - older/newer triton layouts
    _OUT_OF_RESOURCES = RuntimeError


def tree_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   prefix_lens: torch.Tensor, tree_mask: torch.Tensor | None = None, *,
                   causal: bool = False, scale: float | None = None,
                   out: torch.Tensor | None = None,
                   check_bounds: bool | None = None) -> torch.Tensor:
    """Attention of T new tokens per sequence over a static KV cache, masked by a token tree.

    Args:
        q: ``[B, T, Hq, D]`` queries of the new tokens, any strides (e.g. a transposed
            ``[B, Hq, T, D]`` view).
        k_cache, v_cache: ``[B, Hkv, S_max, D]`` (e.g. views ``cache[layer, 0]``,
            ``cache[layer, 1]``) with the new tokens' K/V already written at
            ``[prefix_lens[b], prefix_lens[b] + T)``; ``Hq % Hkv == 0``; q's dtype.
        prefix_lens: ``int32[B]`` committed length of each sequence (may differ; 0 allowed).
        tree_mask: ``int32[B or 1, T, ceil(T/32)]`` (or ``[T, ceil(T/32)]``): bit ``j % 32`` of
            word ``j // 32`` in row ``i`` set when new token ``i`` sees new token ``j`` (row i
            must have bit i). Required for ``T > 1`` unless ``causal``.
        causal: the ordinary causal mask among the new tokens (prefill); reads no mask.
        scale: softmax scale, default ``D ** -0.5``.
        out: optional ``[B, T, Hq, D]`` output buffer (any strides).
        check_bounds: check ``0 <= prefix_lens`` and ``prefix_lens + T <= S_max`` on the host;
            default: only when ``prefix_lens`` is on the CPU (on CUDA it would cost a sync; the
            kernel then still never reads past ``S_max``).

    Returns:
        ``[B, T, Hq, D]`` in q's dtype (``out`` if given).

    Dispatch: the Triton kernel for fp16/bf16/fp32 tensors on CUDA or under
    ``TRITON_INTERPRET=1``; otherwise (CPU, or float64) `tree_attention_reference`.
    """
    tensors = (q, k_cache, v_cache, prefix_lens)
    if (not all(isinstance(t, torch.Tensor) for t in tensors) or q.dtype == torch.float64
            or not use_triton(*tensors) or q.shape[-1] > 256):
        return tree_attention_reference(q, k_cache, v_cache, prefix_lens, tree_mask,
                                        causal=causal, scale=scale, out=out,
                                        check_bounds=check_bounds)
    return tree_attention_triton(q, k_cache, v_cache, prefix_lens, tree_mask, causal=causal,
                                 scale=scale, out=out, check_bounds=check_bounds)
