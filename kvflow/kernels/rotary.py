"""Rotary position embedding, applied in place to query [T, H, D] and key [T, KV, D].

cos_sin_cache [max_position, rot] holds cat(cos, sin) (rot/2 values each) per position; the
first rot <= D dims of every head rotate (rot < D: partial rotary), the rest pass through.
  neox (Llama/Qwen HF checkpoints): pairs (i, i + rot/2)  -- "rotate halves"
  GPT-J (is_neox=False):            pairs (2i, 2i + 1)

One program per token: it reads that token's cos/sin row once and rotates all its query and key
heads, BLOCK_H heads per step; math in fp32, one rounding per stored element. query/key may be
strided views (e.g. slices of a fused QKV output) with a contiguous head dim.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from kvflow.kernels.pdl import pdl_launch, pdl_launch_dependents, pdl_wait

_MAX_TILE = 4096            # (heads x rot/2) elements per step


@triton.jit
def _rotate_heads(base_ptr, stride_h, num_heads, cos, sin, i1, i2, d_ok,
                  BLOCK_H: tl.constexpr):
    """Rotate heads [0, num_heads) at base_ptr (one token); cos/sin/i1/i2 [HALF_PAD]."""
    for h0 in range(0, num_heads, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        mask = (h < num_heads)[:, None] & d_ok[None, :]
        row = base_ptr + h[:, None] * stride_h
        x1 = tl.load(row + i1[None, :], mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(row + i2[None, :], mask=mask, other=0.0).to(tl.float32)
        o1 = x1 * cos[None, :] - x2 * sin[None, :]
        o2 = x2 * cos[None, :] + x1 * sin[None, :]
        tl.store(row + i1[None, :], o1.to(base_ptr.dtype.element_ty), mask=mask)
        tl.store(row + i2[None, :], o2.to(base_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(pos_ptr, q_ptr, k_ptr, cs_ptr,
                   stride_qt, stride_qh, stride_kt, stride_kh, stride_cs,
                   NUM_Q: tl.constexpr, NUM_K: tl.constexpr, HALF: tl.constexpr,
                   HALF_PAD: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
                   IS_NEOX: tl.constexpr, HAS_KEY: tl.constexpr, USE_PDL: tl.constexpr):
    pdl_wait(USE_PDL)
    pdl_launch_dependents(USE_PDL)
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    offs = tl.arange(0, HALF_PAD)
    d_ok = offs < HALF
    cos = tl.load(cs_ptr + pos * stride_cs + offs, mask=d_ok, other=0.0).to(tl.float32)
    sin = tl.load(cs_ptr + pos * stride_cs + HALF + offs, mask=d_ok, other=0.0).to(tl.float32)
    if IS_NEOX:
        i1 = offs
        i2 = offs + HALF
    else:
        i1 = 2 * offs
        i2 = 2 * offs + 1
    _rotate_heads(q_ptr + t * stride_qt, stride_qh, NUM_Q, cos, sin, i1, i2, d_ok, BLOCK_HQ)
    if HAS_KEY:
        _rotate_heads(k_ptr + t * stride_kt, stride_kh, NUM_K, cos, sin, i1, i2, d_ok,
                      BLOCK_HK)


def rotary_embedding(positions: torch.Tensor, query: torch.Tensor, key: Optional[torch.Tensor],
                     cos_sin_cache: torch.Tensor, is_neox: bool = True) -> None:
    """In place. positions [n] (int32/int64) for the first n rows of query [T, H, D] and
    key [T, KV, D] (or None); cos_sin_cache [max_position, rot], rot even and <= D."""
    n = min(positions.shape[0], query.shape[0])
    if n == 0:
        return
    rot = cos_sin_cache.shape[-1]
    assert rot % 2 == 0 and rot <= query.shape[-1]
    assert query.stride(-1) == 1 and cos_sin_cache.stride(-1) == 1
    half = rot // 2
    half_pad = triton.next_power_of_2(half)
    num_q = query.shape[1]
    num_k = key.shape[1] if key is not None else 1
    if key is not None:
        assert key.stride(-1) == 1 and key.shape[-1] == query.shape[-1]
    cap = max(1, _MAX_TILE // half_pad)
    block_hq = min(triton.next_power_of_2(num_q), cap)
    block_hk = min(triton.next_power_of_2(num_k), cap)
    k = key if key is not None else query
    _rotary_kernel[(n,)](
        positions, query, k, cos_sin_cache,
        query.stride(0), query.stride(1), k.stride(0), k.stride(1), cos_sin_cache.stride(0),
        NUM_Q=num_q, NUM_K=num_k, HALF=half, HALF_PAD=half_pad, BLOCK_HQ=block_hq,
        BLOCK_HK=block_hk, IS_NEOX=is_neox, HAS_KEY=key is not None, num_warps=4,
        **pdl_launch(query.device))


def compute_cos_sin_cache(rotary_dim: int, max_position: int, base: float = 10000.0,
                          dtype: torch.dtype = torch.float32,
                          device: Optional[torch.device] = None) -> torch.Tensor:
    """Plain (unscaled) RoPE table [max_position, rotary_dim] = cat(cos, sin); models with
    scaled RoPE (Llama 3, YaRN) build their own table in the same layout."""
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32,
                                            device=device) / rotary_dim))
    t = torch.arange(max_position, dtype=torch.float32, device=device)
    freqs = torch.outer(t, inv_freq)
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(dtype)
