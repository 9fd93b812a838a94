"""reshape_and_cache: scatter the new tokens' K/V into the paged KV cache.

Cache layout (see kvflow/attention/backend.py): kv_cache [2, num_blocks, block_size, KV, D];
callers pass key_cache = kv_cache[0], value_cache = kv_cache[1]. Token t goes to slot
slot_mapping[t] = block * block_size + offset; slot -1 marks padding and is skipped.

One program per (token, chunk of KV heads) copies a [BLOCK_H, D] tile of K and of V; each
head's D values are contiguous on both sides, so loads/stores are wide and coalesced. It is a
copy (plus a scale and an e4m3 cast for fp8 caches): memory-bound, 4 warps, no pipelining.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvflow.kernels.pdl import pdl_launch, pdl_launch_dependents, pdl_wait

_MAX_TILE = 4096          # elements per program tile (K and V each)


@triton.jit
def _round_to_e4m3(x):
    """Round fp32 x (|x| <= 448) to the nearest e4m3 value, ties to even, in fp32 arithmetic.

    The cast that follows is then exact, so the cache holds bit-for-bit what the torch
    reference writes on every platform (Triton's CPU interpreter drops the carry when rounding
    up into the next binade, e.g. 1.97 -> 1.0)."""
    bits = x.to(tl.int32, bitcast=True)
    e = ((bits >> 23) & 0xFF) - 127                               # binade of x
    e = tl.maximum(e, -6)                                         # subnormals: quantum 2^-9
    quantum = ((e - 3 + 127) << 23).to(tl.float32, bitcast=True)  # 3 mantissa bits
    y = tl.abs(x) / quantum                                       # exact (power of two)
    y = (y + 12582912.0) - 12582912.0                             # 1.5 * 2^23: round to even
    r = (y * quantum).to(tl.int32, bitcast=True)
    sign = (bits >> 31) << 31                                     # the sign bit of x
    return (r | sign).to(tl.float32, bitcast=True)   # signed, also when rounding to zero


@triton.jit
def _reshape_and_cache_kernel(
    key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, k_scale_ptr, v_scale_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,      # key/value [T, KV, D]
    stride_cb, stride_ct, stride_ch,                 # caches [num_blocks, block_size, KV, D]
    NUM_KV: tl.constexpr, HEAD: tl.constexpr, HEAD_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_H: tl.constexpr, FP8: tl.constexpr, USE_PDL: tl.constexpr,
):
    pdl_wait(USE_PDL)                                # before the padding early return, too
    pdl_launch_dependents(USE_PDL)
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
    else:
        mask = (h < NUM_KV)[:, None] & (d < HEAD)[None, :]
        k = tl.load(src_k, mask=mask)
        v = tl.load(src_v, mask=mask)
    if FP8:
        # Same rounding as the torch reference (quantize_fp8): divide in fp32, saturate to the
        # e4m3 range explicitly (the cast alone would turn overflow into NaN), round to nearest.
        k = _round_to_e4m3(tl.clamp(k.to(tl.float32) / tl.load(k_scale_ptr), -448.0, 448.0))
        v = _round_to_e4m3(tl.clamp(v.to(tl.float32) / tl.load(v_scale_ptr), -448.0, 448.0))
    if (NUM_KV % BLOCK_H == 0) and (HEAD == HEAD_PAD):
        tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty))
        tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty))
    else:
        tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def reshape_and_cache(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
                      value_cache: torch.Tensor, slot_mapping: torch.Tensor,
                      k_scale: torch.Tensor | None = None,
                      v_scale: torch.Tensor | None = None) -> None:
    """Write key/value [T, KV, D] into key_cache/value_cache [num_blocks, block_size, KV, D]
    at slot_mapping [>= n] (int32/int64; -1 = skip), for the first
    n = min(T, len(slot_mapping)) tokens. Key/value may be strided views (e.g. slices of a
    fused QKV output) as long as the head dim is contiguous. An fp8 (float8_e4m3fn) cache
    stores key / k_scale and value / v_scale (float32 scalar tensors, default 1.0)."""
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
    fp8 = key_cache.dtype == torch.float8_e4m3fn
    if fp8 and (k_scale is None or v_scale is None):
        one = torch.ones((), dtype=torch.float32, device=key.device)
        k_scale = one if k_scale is None else k_scale
        v_scale = one if v_scale is None else v_scale
    _reshape_and_cache_kernel[grid](
        key, value, key_cache, value_cache, slot_mapping,
        k_scale if fp8 else slot_mapping, v_scale if fp8 else slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        NUM_KV=num_kv, HEAD=head, HEAD_PAD=head_pad, BLOCK_SIZE=block_size, BLOCK_H=block_h,
        FP8=fp8, num_warps=4, **pdl_launch(key.device))
