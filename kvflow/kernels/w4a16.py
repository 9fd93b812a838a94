"""GPTQ GEMM with fused dequantization: out[M, N] = x[M, K] @ dequant(qweight)[K, N].

Weights stay packed in HBM (4 or 8 bits) and are unpacked in registers right before tl.dot, so a
decode step reads ~bits/16 of the bytes of an fp16 GEMV (the point of W4A16). Layout and zero
conventions are those of kvflow.layers.quantization.gptq (see its docstring); this kernel is
tested against gptq_gemm_ref there.

Grid (M blocks, N blocks, K splits). Each program walks its K range in BLOCK_K steps:
  * q   = (qweight[k // PACK, n] >> (k % PACK) * BITS) & MASK                [BK, BN]
  * grp = g_idx[k] (act-order) or k // GROUP; when no act-order and GROUP % BLOCK_K == 0 a
    block lies inside one group, so one scale / zero row [BN] is loaded per block (ONE_GROUP)
  * w   = (q - zero[grp, n]) * scale[grp, n], rounded once to x's dtype, then tl.dot (fp32 acc)
Small-M (decode) shapes have few (M, N) tiles, so K is split across programs (SPLIT_K > 1):
each writes an fp32 partial [SPLIT_K, M, N] summed afterwards — deterministic, unlike atomics.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl


@triton.jit
def _gptq_gemm_kernel(x_ptr, qw_ptr, qz_ptr, s_ptr, g_ptr, out_ptr,
                      M, N, K, K_PER_SPLIT, stride_xm,
                      BITS: tl.constexpr, GROUP: tl.constexpr, ZP_OFF: tl.constexpr,
                      USE_G_IDX: tl.constexpr, ONE_GROUP: tl.constexpr, IEEE: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    PACK: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    zshift = (offs_n % PACK) * BITS                      # [BN] bit offset of each zero
    nz = N // PACK                                      # qzeros row length (N % PACK == 0)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_lo = pid_k * K_PER_SPLIT
    k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < k_hi
        x = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :],
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0)           # [BM, BK]
        wk_mask = k_mask[:, None] & n_mask[None, :]
        qw = tl.load(qw_ptr + (offs_k[:, None] // PACK).to(tl.int64) * N + offs_n[None, :],
                     mask=wk_mask, other=0)                                       # [BK, BN]
        q = (qw >> ((offs_k[:, None] % PACK) * BITS)) & MASK
        if ONE_GROUP:
            g = k0 // GROUP
            s = tl.load(s_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
            zw = tl.load(qz_ptr + g * nz + offs_n // PACK, mask=n_mask, other=0)
            z = ((zw >> zshift) & MASK) + ZP_OFF                                  # [BN]
            w = (q - z[None, :]).to(tl.float32) * s[None, :]
        else:
            if USE_G_IDX:
                g = tl.load(g_ptr + offs_k, mask=k_mask, other=0)
            else:
                g = offs_k // GROUP
            g = g.to(tl.int64)
            s = tl.load(s_ptr + g[:, None] * N + offs_n[None, :], mask=wk_mask,
                        other=0.0).to(tl.float32)
            zw = tl.load(qz_ptr + g[:, None] * nz + (offs_n // PACK)[None, :], mask=wk_mask,
                         other=0)
            z = ((zw >> zshift[None, :]) & MASK) + ZP_OFF                         # [BK, BN]
            w = (q - z).to(tl.float32) * s
        w = w.to(x.dtype)
        if IEEE:
            acc = tl.dot(x, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(x, w, acc)
    out_ptrs = (out_ptr + pid_k.to(tl.int64) * M * N + offs_m[:, None].to(tl.int64) * N
                + offs_n[None, :])
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def choose_config(m: int, n: int, k: int, group: int, num_sms: int = 132) -> dict:
    """Tile sizes by shape (hand-picked, not autotuned): decode uses M tiles of 16 and splits K
    until there are ~2 programs per SM; prefill uses larger tiles and no split."""
    if m <= 16:
        cfg = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=3)
    elif m <= 64:
        cfg = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3)
    else:
        cfg = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, num_warps=8, num_stages=3)
    if group > 0 and group % cfg["BLOCK_K"] and cfg["BLOCK_K"] > 32:
        cfg["BLOCK_K"] = 32          # keep blocks inside one group when the group is small
    tiles = triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"])
    split = 1
    while tiles * split * 2 <= 2 * num_sms and k // (split * 2) >= 4 * cfg["BLOCK_K"]:
        split *= 2
    cfg["SPLIT_K"] = split
    return cfg


_NUM_SMS: dict = {}


def gptq_gemm(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor,
              scales: torch.Tensor, g_idx: Optional[torch.Tensor], bits: int, group_size: int,
              zero_offset: int, config: Optional[dict] = None) -> torch.Tensor:
    """x [M, K] (fp16/bf16/fp32), qweight [K/pack, N] int32, qzeros [G, N/pack] int32,
    scales [G, N], g_idx [K] int32 or None (then group = k // group_size; -1: one group)
    -> [M, N] in x.dtype."""
    assert x.dim() == 2 and bits in (4, 8)
    x = x if x.stride(1) == 1 else x.contiguous()
    m, k = x.shape
    n = scales.shape[1]
    assert qweight.shape == (k * bits // 32, n) and n % (32 // bits) == 0
    group = k if group_size == -1 else group_size
    if config is None:
        dev = x.device
        if dev.type == "cuda" and dev.index not in _NUM_SMS:
            _NUM_SMS[dev.index] = torch.cuda.get_device_properties(dev).multi_processor_count
        config = choose_config(m, n, k, group, _NUM_SMS.get(dev.index, 132))
    cfg = dict(config)
    split = cfg.pop("SPLIT_K", 1)
    bk = cfg["BLOCK_K"]
    # Each split covers a whole number of BLOCK_K blocks, so blocks never straddle splits.
    k_per_split = triton.cdiv(triton.cdiv(k, split), bk) * bk
    split = triton.cdiv(k, k_per_split)
    one_group = g_idx is None and group % bk == 0
    out = torch.empty((split, m, n), device=x.device,
                      dtype=x.dtype if split == 1 else torch.float32)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"]), split)
    _gptq_gemm_kernel[grid](
        x, qweight, qzeros, scales, g_idx if g_idx is not None else qweight, out,
        m, n, k, k_per_split, x.stride(0),
        BITS=bits, GROUP=group, ZP_OFF=zero_offset, USE_G_IDX=g_idx is not None,
        ONE_GROUP=one_group, IEEE=x.dtype == torch.float32, **cfg)
    return out[0] if split == 1 else out.sum(0).to(x.dtype)
