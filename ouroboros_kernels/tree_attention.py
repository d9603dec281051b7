"""Tree-masked attention of T new tokens over a static KV cache.

PLACEHOLDER: reference only, Triton kernel follows.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._utils import check_same_device, check_tensor, use_triton
from .tree import unpack_tree_mask

__all__ = ["tree_attention", "tree_attention_reference"]

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
    give a float64 result). Reads ``max(prefix_lens)`` on the host.
    """
    tree_mask = _check_args(q, k_cache, v_cache, prefix_lens, tree_mask, causal, scale, out,
                            check_bounds)
    batch, num_new, num_q_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    device = q.device
    prefix = prefix_lens.to(torch.int64)
    span = int(prefix.max()) + num_new
    # rel[b, c]: cache column c relative to sequence b's first new token.
    rel = torch.arange(span, device=device)[None, :] - prefix[:, None]
    in_tree = (rel >= 0) & (rel < num_new)
    rows = torch.arange(num_new, device=device)
    if causal:
        tree_visible = rel[:, None, :] <= rows[None, :, None]
    else:
        bits = unpack_tree_mask(tree_mask, num_new).expand(batch, num_new, num_new)
        tree_visible = bits.gather(2, rel.clamp(0, num_new - 1)[:, None, :]
                                   .expand(batch, num_new, span))
    mask = (rel < 0)[:, None, :] | (tree_visible & in_tree[:, None, :])
    result = F.scaled_dot_product_attention(
        q.transpose(1, 2), k_cache[:, :, :span], v_cache[:, :, :span],
        attn_mask=mask[:, None], scale=scale, enable_gqa=num_q_heads != num_kv_heads,
    ).transpose(1, 2)
    if out is None:
        return result.contiguous()
    out.copy_(result)
    return out


def tree_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   prefix_lens: torch.Tensor, tree_mask: torch.Tensor | None = None, *,
                   causal: bool = False, scale: float | None = None,
                   out: torch.Tensor | None = None,
                   check_bounds: bool | None = None) -> torch.Tensor:
    """Attention of T new tokens per sequence over a static KV cache, masked by a token tree."""
    if True or not use_triton(q, k_cache, v_cache, prefix_lens):  # kernel: next commit
        return tree_attention_reference(q, k_cache, v_cache, prefix_lens, tree_mask,
                                        causal=causal, scale=scale, out=out,
                                        check_bounds=check_bounds)
