"""GPTQ GEMM with fused dequantization: out[M, N] = x[M, K] @ dequant(qweight)[K, N].

Weights stay packed in HBM (4 or 8 bits) and are unpacked in registers right before the dot, so
a decode step reads ~bits/16 of the bytes of an fp16 GEMV (the point of W4A16). Layout and zero
conventions are those of kvflow.layers.quantization.gptq (see its docstring); this kernel is
tested against gptq_gemm_ref there.

Grid (M blocks, N blocks, K splits). Each program walks its K range in BLOCK_K steps, loading
each packed word once as [BLOCK_K / PACK, BLOCK_N] and unpacking it in registers to [BK, BN]:
  * ONE_GROUP (no act-order and GROUP % BLOCK_K == 0): a block lies inside one group g, so
        sum_k x[m,k] (q[k,n] - z[g,n]) s[g,n] = s[g,n] * (sum_k x[m,k] q[k,n] - z[g,n] sum_k x[m,k])
    and the inner product runs on the raw integers q (exact in fp16/bf16); scale and zero are
    applied once per block and column instead of once per weight. This is the hot decode path.
  * otherwise (act-order g_idx, or groups smaller than a block): per-weight dequantization
    w = (q - zero[grp, n]) * scale[grp, n], rounded once to x's dtype, then the dot.
  * GEMV (M <= 8): the dot is a broadcast multiply + reduction over K instead of tl.dot, which
    would pad the rows to a 16-row tensor-core tile and shuffle the unpacked weights into the
    MMA layout; the weights are read once per program for all BLOCK_M rows.
Small-M (decode) shapes have few (M, N) tiles, so K is split across programs (SPLIT_K > 1): each
writes an fp32 partial [SPLIT_K, M, N] that one reduction kernel (kernels/split_k.py, shared
with the skinny GEMM) sums and casts — deterministic, unlike atomics, and one launch instead of
torch's sum + cast.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from kvflow.kernels.device import device_properties
from kvflow.kernels.pdl import pdl_launch, pdl_launch_dependents, pdl_wait
from kvflow.kernels.split_k import reduce_splits
from kvflow.kernels.stage_fit import launch_fitting_stages


@triton.jit
def _gptq_gemm_kernel(x_ptr, qw_ptr, qz_ptr, s_ptr, g_ptr, out_ptr,
                      M, N, K, K_PER_SPLIT, stride_xm,
                      BITS: tl.constexpr, GROUP: tl.constexpr, ZP_OFF: tl.constexpr,
                      USE_G_IDX: tl.constexpr, ONE_GROUP: tl.constexpr, IEEE: tl.constexpr,
                      GEMV: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      USE_PDL: tl.constexpr):
    pdl_wait(USE_PDL)
    pdl_launch_dependents(USE_PDL)
    PACK: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    BKP: tl.constexpr = BLOCK_K // PACK                  # packed rows per block
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    shifts = tl.arange(0, PACK) * BITS                   # [PACK] bit offset of row k % PACK
    zshift = (offs_n % PACK) * BITS                      # [BN] bit offset of each zero
    nz = N // PACK                                      # qzeros row length (N % PACK == 0)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_lo = pid_k * K_PER_SPLIT                          # K_PER_SPLIT % BLOCK_K == 0
    k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        offs_kp = k0 // PACK + tl.arange(0, BKP)
        k_mask = offs_k < k_hi
        x = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :],
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0)           # [BM, BK]
        # K is a multiple of PACK, and k_hi of BLOCK_K or K: a packed row is all in or all out.
        qw = tl.load(qw_ptr + offs_kp[:, None].to(tl.int64) * N + offs_n[None, :],
                     mask=(offs_kp[:, None] * PACK < k_hi) & n_mask[None, :], other=0)
        q = (qw[:, None, :] >> shifts[None, :, None]) & MASK                     # [BKP,PACK,BN]
        q = tl.reshape(q, (BLOCK_K, BLOCK_N))                                     # row k = r*PACK+j
        if ONE_GROUP:
            g = k0 // GROUP
            s = tl.load(s_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
            zw = tl.load(qz_ptr + g * nz + offs_n // PACK, mask=n_mask, other=0)
            z = (((zw >> zshift) & MASK) + ZP_OFF).to(tl.float32)                 # [BN]
            if GEMV:
                if BLOCK_M == 1:
                    xf = tl.sum(x.to(tl.float32), axis=0)                         # [BK] (row 0)
                    d = tl.sum(xf[:, None] * q.to(tl.float32), axis=0)[None, :]   # [1, BN]
                else:
                    xf = x.to(tl.float32)
                    d = tl.sum(xf[:, :, None] * q.to(tl.float32)[None, :, :], axis=1)  # [BM, BN]
                xs = tl.sum(x.to(tl.float32), axis=1)                             # [BM]
                acc += (d - xs[:, None] * z[None, :]) * s[None, :]
            else:
                if IEEE:
                    d = tl.dot(x, q.to(x.dtype), input_precision="ieee")
                else:
                    d = tl.dot(x, q.to(x.dtype))                                  # [BM, BN]
                xs = tl.sum(x.to(tl.float32), axis=1)                             # [BM]
                acc += (d - xs[:, None] * z[None, :]) * s[None, :]
        else:
            if USE_G_IDX:
                g = tl.load(g_ptr + offs_k, mask=k_mask, other=0)
            else:
                g = offs_k // GROUP
            g = g.to(tl.int64)
            wk_mask = k_mask[:, None] & n_mask[None, :]
            s = tl.load(s_ptr + g[:, None] * N + offs_n[None, :], mask=wk_mask,
                        other=0.0).to(tl.float32)
            zw = tl.load(qz_ptr + g[:, None] * nz + (offs_n // PACK)[None, :], mask=wk_mask,
                         other=0)
            z = ((zw >> zshift[None, :]) & MASK) + ZP_OFF                         # [BK, BN]
            w = ((q - z).to(tl.float32) * s).to(x.dtype)
            if GEMV:
                acc += tl.sum(x.to(tl.float32)[:, :, None] * w.to(tl.float32)[None, :, :], axis=1)
            elif IEEE:
                acc = tl.dot(x, w, acc, input_precision="ieee")
            else:
                acc = tl.dot(x, w, acc)
    out_ptrs = (out_ptr + pid_k.to(tl.int64) * M * N + offs_m[:, None].to(tl.int64) * N
                + offs_n[None, :])
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def choose_config(m: int, n: int, k: int, group: int, num_sms: int = 132) -> dict:
    """Tile sizes by shape, picked from benchmarks/w4a16_tune.py on an H200 (Qwen2.5-7B
    projections, group 128; results in benchmarks/results/w4a16-tune-nvidia-h200.json):
    up to 4 rows the GEMV form (weights read once for all rows), up to 16 rows 16-row
    tensor-core tiles, larger tiles for prefill. Decode shapes are memory-bound and want many
    programs in flight, so K is split (powers of two, at most 16, each split at least two
    BLOCK_K steps) until the grid reaches ~8 programs per SM (GEMV) or ~4 (tensor cores)."""
    if m == 1:
        cfg = dict(BLOCK_M=1, BLOCK_N=128, BLOCK_K=128, num_warps=4, num_stages=4, GEMV=True)
    elif m <= 4:
        cfg = dict(BLOCK_M=m, BLOCK_N=128, BLOCK_K=128 if m <= 2 else 64,
                   num_warps=4 if m <= 2 else 2, num_stages=3, GEMV=True)
    elif m <= 16:
        cfg = dict(BLOCK_M=16, BLOCK_N=256, BLOCK_K=128, num_warps=4, num_stages=3)
    elif m <= 64:
        cfg = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3)
    else:
        cfg = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, num_warps=8, num_stages=3)
    if group > 0 and group % cfg["BLOCK_K"] and cfg["BLOCK_K"] > 32:
        cfg["BLOCK_K"] = 32          # keep blocks inside one group when the group is small
    if m > 64:
        cfg["SPLIT_K"] = 1           # enough (M, N) tiles already
        return cfg
    tiles = triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"])
    target = (8 if cfg.get("GEMV") else 4) * num_sms
    split = 1
    while tiles * split < target and split < 16 and k // (split * 2) >= 2 * cfg["BLOCK_K"]:
        split *= 2
    cfg["SPLIT_K"] = split
    return cfg




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
        sms = device_properties(x.device).multi_processor_count if x.is_cuda else 132
        config = choose_config(m, n, k, group, sms)
    cfg = dict(config)
    split = cfg.pop("SPLIT_K", 1)
    gemv = cfg.pop("GEMV", False) and m <= 8
    if gemv:
        cfg["BLOCK_M"] = triton.next_power_of_2(m)
    elif cfg["BLOCK_M"] < 16:
        cfg["BLOCK_M"] = 16          # tl.dot needs 16-row tiles
    bk = cfg["BLOCK_K"]
    # Each split covers a whole number of BLOCK_K blocks, so blocks never straddle splits.
    k_per_split = triton.cdiv(triton.cdiv(k, split), bk) * bk
    split = triton.cdiv(k, k_per_split)
    one_group = g_idx is None and group % bk == 0
    part = torch.empty((split, m, n), device=x.device,
                       dtype=x.dtype if split == 1 else torch.float32)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"]), split)
    consts = dict(BITS=bits, GROUP=group, ZP_OFF=zero_offset, USE_G_IDX=g_idx is not None,
                  ONE_GROUP=one_group, IEEE=x.dtype == torch.float32, GEMV=gemv)
    # Act-order gathers per-row scales and zeros in every stage: fit the stages to the GPU.
    num_stages = cfg.pop("num_stages")
    launch_fitting_stages(
        _gptq_gemm_kernel, grid, (x.device.index, x.dtype, tuple(cfg.items()),
                                  tuple(consts.items())), num_stages,
        x, qweight, qzeros, scales, g_idx if g_idx is not None else qweight, part,
        m, n, k, k_per_split, x.stride(0), **consts, **cfg, **pdl_launch(x.device))
    if split == 1:
        return part[0]
    return reduce_splits(part, torch.empty((m, n), device=x.device, dtype=x.dtype))
