"""reshape_and_cache: scatter the new tokens' K/V into the paged KV cache.

Cache layout (see kvflow/attention/backend.py): kv_cache [2, num_blocks, block_size, KV, D];
callers pass key_cache = kv_cache[0], value_cache = kv_cache[1]. Token t goes to slot
slot_mapping[t] = block * block_size + offset; slot -1 marks padding and is skipped.

One program per (token, chunk of KV heads) copies a [BLOCK_H, D] tile of K and of V; each
head's D values are contiguous on both sides, so loads/stores are wide and coalesced. It is a
pure copy: memory-bound, 4 warps, no pipelining needed.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_MAX_TILE = 4096          # elements per program tile (K and V each)


@triton.jit
def _reshape_and_cache_kernel(
    key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,      # key/value [T, KV, D]
    stride_cb, stride_ct, stride_ch,                 # caches [num_blocks, block_size, KV, D]
    NUM_KV: tl.constexpr, HEAD: tl.constexpr, HEAD_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_H: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:                                     # padding token: nothing to write
        return
    blk = slot // BLOCK_SIZE
    off = slot % BLOCK_SIZE
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    d = tl.arange(0, HEAD_PAD)
    src_k = key_ptr + t * stride_kt + h[:, None] * stride_kh + d[None, :]
    src_v = value_ptr + t * stride_vt + h[:, None] * stride_vh + d[None, :]
    dst = blk * stride_cb + off * stride_ct + h[:, None] * stride_ch + d[None, :]
    if (NUM_KV % BLOCK_H == 0) and (HEAD == HEAD_PAD):
        k = tl.load(src_k)
        v = tl.load(src_v)
        tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty))
        tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty))
    else:
        mask = (h < NUM_KV)[:, None] & (d < HEAD)[None, :]
        k = tl.load(src_k, mask=mask)
        v = tl.load(src_v, mask=mask)
        tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def reshape_and_cache(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
                      value_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Write key/value [T, KV, D] into key_cache/value_cache [num_blocks, block_size, KV, D]
    at slot_mapping [>= n] (int32/int64; -1 = skip), for the first
    n = min(T, len(slot_mapping)) tokens. Key/value may be strided views (e.g. slices of a
    fused QKV output) as long as the head dim is contiguous."""
    n = min(key.shape[0], slot_mapping.shape[0])
    if n == 0:
        return
    _, block_size, num_kv, head = key_cache.shape
    assert key.shape[1:] == (num_kv, head) and value.shape[1:] == (num_kv, head)
    assert key_cache.stride() == value_cache.stride()
    assert key.stride(2) == 1 and value.stride(2) == 1 and key_cache.stride(3) == 1
    head_pad = triton.next_power_of_2(head)
    block_h = min(triton.next_power_of_2(num_kv), max(1, _MAX_TILE // head_pad))
    grid = (n, triton.cdiv(num_kv, block_h))
    _reshape_and_cache_kernel[grid](
        key, value, key_cache, value_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        NUM_KV=num_kv, HEAD=head, HEAD_PAD=head_pad, BLOCK_SIZE=block_size, BLOCK_H=block_h,
        num_warps=4)
