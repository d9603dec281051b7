"""KV compaction after tree acceptance: move the accepted path's rows into place.

The whole model's KV cache is one tensor ``[num_layers, 2, B, Hkv, S_max, D]`` (index 0 of
dim 1 is K, 1 is V). After verification the accepted nodes of sequence ``b`` sit at
``prefix_lens[b] + accepted_idx[b, a]``; they must end up at ``prefix_lens[b] + a``. One
launch moves them for every layer, K and V, batch row and head.

In-place safety: a destination may be the source of another accepted row (``a < idx[a]``
both in the same range). Each program loads all of its accepted rows (for a slice of the head
dimension) before storing any, and the programs touch disjoint (layer, K/V, b, head, column)
slices, so no program reads what another writes.
"""

from __future__ import annotations

import torch

from ._utils import check_same_device, check_tensor, next_power_of_2, use_triton

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

__all__ = ["compact_kv", "compact_kv_reference"]

_INDEX = (torch.int32, torch.int64)


if triton is not None:

    @triton.jit(do_not_specialize=["stride_idx_b", "num_heads", "head_dim", "num_accepted"])
    def _compact_kv_kernel(
        cache_ptr, prefix_lens_ptr, accepted_idx_ptr, accepted_len_ptr,
        stride_plane, stride_b, stride_h, stride_s,  # plane = (layer, K/V) flattened
        stride_idx_b,
        num_heads, head_dim, num_accepted,
        BLOCK_A: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        plane = tl.program_id(0)
        bh = tl.program_id(1)
        d_block = tl.program_id(2)
        b = bh // num_heads
        h = bh % num_heads
        prefix = tl.load(prefix_lens_ptr + b).to(tl.int64)
        length = tl.load(accepted_len_ptr + b)
        rows = tl.arange(0, BLOCK_A)
        cols = d_block * BLOCK_D + tl.arange(0, BLOCK_D)
        row_ok = (rows < length) & (rows < num_accepted)
        node = tl.load(accepted_idx_ptr + b * stride_idx_b + rows, mask=row_ok, other=0)
        base = cache_ptr + plane.to(tl.int64) * stride_plane + b.to(tl.int64) * stride_b \
            + h.to(tl.int64) * stride_h
        ok = row_ok[:, None] & (cols[None, :] < head_dim)
        src = base + (prefix + node.to(tl.int64))[:, None] * stride_s + cols[None, :]
        moved = tl.load(src, mask=ok)
        # All loads of this tile complete before the stores below (they feed them).
        dst = base + (prefix + rows.to(tl.int64))[:, None] * stride_s + cols[None, :]
        tl.store(dst, moved, mask=ok)


def _check(cache: torch.Tensor, prefix_lens: torch.Tensor, accepted_idx: torch.Tensor,
           accepted_len: torch.Tensor) -> None:
    check_tensor("cache", cache, ndim=6)
    check_tensor("prefix_lens", prefix_lens, ndim=1, dtypes=_INDEX)
    check_tensor("accepted_idx", accepted_idx, ndim=2, dtypes=_INDEX)
    check_tensor("accepted_len", accepted_len, ndim=1, dtypes=_INDEX)
    check_same_device(cache=cache, prefix_lens=prefix_lens, accepted_idx=accepted_idx,
                      accepted_len=accepted_len)
    if cache.shape[1] != 2:
        raise ValueError(f"cache must be [num_layers, 2, B, Hkv, S_max, D] (dim 1: K and V), "
                         f"got shape {tuple(cache.shape)}")
    batch = cache.shape[2]
    for name, t in (("prefix_lens", prefix_lens), ("accepted_idx", accepted_idx),
                    ("accepted_len", accepted_len)):
        if t.shape[0] != batch:
            raise ValueError(f"{name} has batch size {t.shape[0]}, cache has {batch}")


def compact_kv_reference(cache: torch.Tensor, prefix_lens: torch.Tensor,
                         accepted_idx: torch.Tensor, accepted_len: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch `compact_kv` (same contract): gather all accepted rows, then scatter.

    Vectorised indexing, no loop over rows; entries past ``accepted_len[b]`` are ignored.
    """
    _check(cache, prefix_lens, accepted_idx, accepted_len)
    batch, num_accepted = accepted_idx.shape
    if num_accepted == 0:
        return cache
    max_row = cache.shape[4] - 1
    device = cache.device
    slot = torch.arange(num_accepted, device=device)
    length = accepted_len.to(torch.int64)[:, None]
    prefix = prefix_lens.to(torch.int64)[:, None]
    # Padding entries repeat the last valid move (same value to the same place), or, with
    # nothing accepted, copy a row onto itself: every write is then harmless.
    slot_eff = torch.minimum(slot[None, :], (length - 1).clamp(min=0))
    node = accepted_idx.to(torch.int64).gather(1, slot_eff)
    src = torch.where(length > 0, prefix + node, prefix).clamp(max=max_row)
    dst = torch.where(length > 0, prefix + slot_eff, prefix).clamp(max=max_row)
    batch_index = torch.arange(batch, device=device)[:, None].expand(batch, num_accepted)
    rows = cache[:, :, batch_index, :, src]  # [B, A, layers, 2, Hkv, D], a copy
    cache[:, :, batch_index, :, dst] = rows
    return cache


def compact_kv(cache: torch.Tensor | list[torch.Tensor] | tuple[torch.Tensor, ...],
               prefix_lens: torch.Tensor, accepted_idx: torch.Tensor,
               accepted_len: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
    """Copy the accepted tree rows of every layer's K and V to consecutive positions, in place.

    Args:
        cache: ``[num_layers, 2, B, Hkv, S_max, D]`` (any float dtype; the last dim must be
            contiguous for the kernel), or a list of per-layer ``[2, B, Hkv, S_max, D]``
            tensors (one launch per layer).
        prefix_lens: ``int32[B]`` committed length of each sequence (tree node 0 sat there).
        accepted_idx: ``int32[B, A]`` accepted node indices relative to ``prefix_lens[b]``;
            entries at ``a >= accepted_len[b]`` are ignored (e.g. -1 padding).
        accepted_len: ``int32[B]``, ``0 <= accepted_len[b] <= A``.

    Effect: ``cache[l, kv, b, :, prefix_lens[b] + a] = old cache[l, kv, b, :, prefix_lens[b] +
    accepted_idx[b, a]]`` for ``a < accepted_len[b]``; other rows keep their values. Sources
    may overlap destinations. Indices are trusted (not range-checked on the device: that would
    need a host read); keep ``prefix_lens[b] + max(idx, a) < S_max``.

    Returns the cache (same object). Dispatch: Triton on CUDA or under ``TRITON_INTERPRET=1``,
    else `compact_kv_reference`.
    """
    if isinstance(cache, (list, tuple)):
        if not cache:
            raise ValueError("cache list is empty")
        for layer, layer_cache in enumerate(cache):
            check_tensor(f"cache[{layer}]", layer_cache, ndim=5)
            compact_kv(layer_cache.unsqueeze(0), prefix_lens, accepted_idx, accepted_len)
        return list(cache)
    _check(cache, prefix_lens, accepted_idx, accepted_len)
    num_layers, _, batch, num_heads, _, head_dim = cache.shape
    num_accepted = accepted_idx.shape[1]
    if num_accepted == 0 or cache.numel() == 0:
        return cache
    if not use_triton(cache, prefix_lens, accepted_idx, accepted_len):
        return compact_kv_reference(cache, prefix_lens, accepted_idx, accepted_len)
    if cache.stride(5) != 1:
        raise ValueError(f"cache must have a contiguous last (head) dimension, got strides "
                         f"{cache.stride()}")
    if accepted_idx.stride(1) != 1:
        accepted_idx = accepted_idx.contiguous()
    # The layer and K/V dims are flattened into one "plane" index: needs stride(0) = 2 *
    # stride(1), true for any contiguous-in-dims-0-1 layout; otherwise launch per layer.
    if num_layers > 1 and cache.stride(0) != 2 * cache.stride(1):
        for layer in range(num_layers):
            compact_kv(cache[layer:layer + 1], prefix_lens, accepted_idx, accepted_len)
        return cache
    block_a = next_power_of_2(num_accepted)
    block_d = min(next_power_of_2(head_dim), max(16, 8192 // block_a))
    grid = (num_layers * 2, batch * num_heads, triton.cdiv(head_dim, block_d))
    _compact_kv_kernel[grid](
        cache, prefix_lens, accepted_idx, accepted_len,
        cache.stride(1), cache.stride(2), cache.stride(3), cache.stride(4),
        accepted_idx.stride(0),
        num_heads, head_dim, num_accepted,
        BLOCK_A=block_a, BLOCK_D=block_d, num_warps=4,
    )
    return cache
