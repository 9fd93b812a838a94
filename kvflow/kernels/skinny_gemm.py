"""Skinny GEMM for decode: y[M, N] = x[M, K] @ W[N, K]^T (+ bias), M <= 256, fp16/bf16.

At decode batch sizes a dense layer is a weight stream: every byte of W is read once and used for
at most a handful of FMAs, so the kernel is judged by how close it gets to HBM bandwidth. cuBLAS's
M=1 kernels reach only ~1.4 TB/s on the 4-12 MB matrices of a 0.6B model (H200); this kernel
exists to do better there. Whether it beats torch on a given shape is decided on the device by
benchmarks/skinny_gemm_tune.py, whose table (kvflow/kernels/configs/skinny_gemm_<device>.json)
both picks tiles and says where to leave the product to cuBLAS (see `choose_config`).

Grid (N blocks, K splits). A program owns a BLOCK_N slab of W's rows (row-major [N, K], K
contiguous) and one K range. It walks the range in BLOCK_K steps, loading each [BLOCK_N, BLOCK_K]
tile of W exactly once with contiguous, vectorised loads along K, and multiplies it by all M rows
of x (a few KB, served from L1/L2), accumulating in fp32:
  * GEMV form (USE_DOT=False, the default for M <= 4): broadcast multiply on the CUDA cores. With
    a small accumulator (<= 64 fp32 registers a thread) the products are summed elementwise into a
    [BLOCK_M, BLOCK_N, BLOCK_K] accumulator and reduced over K once after the loop (no shuffles in
    the loop); larger tiles reduce over K every step into [BLOCK_M, BLOCK_N].
  * dot form (USE_DOT=True, default for M > 4, the only form above GEMV_MAX_M rows): tensor
    cores with the operands swapped, out^T[BLOCK_N, BLOCK_M] = W[BLOCK_N, BLOCK_K] @
    x^T[BLOCK_K, BLOCK_M]: W is the MMA's M side (any multiple of 16, K-major as stored) and the
    rows of x, zero-padded to a power of two >= 16, the N side. At M = 8 the CUDA-core form
    needs 8 FMAs per weight, close to the FP32 peak at HBM rate. Up to a few hundred rows a
    decode step's products are still mostly weight streams (Llama-3.1-8B's gate|up at M=128:
    cuBLAS 65 us against a 55 us HBM floor; Qwen3-0.6B's at 6.5 us against 2.9, launch- and
    tail-bound), which is what this kernel's PDL prefetch and split-K are for.
Decode shapes have few N blocks, so K is split until the grid has a few programs per SM. Split
partials go to an fp32 buffer [SPLIT_K, M, N] that a second small kernel (kernels/split_k.py)
sums in split order, adds the bias and casts: deterministic (atomics would make the sum order, hence the rounding of
the output, vary run to run) and CUDA-graph safe (the buffer's shape depends only on M, N and
the config). With SPLIT_K == 1 the main kernel adds the bias and writes x.dtype itself. Either
way the result is rounded once, from fp32, like `skinny_gemm_ref`.
"""
from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from kvflow import envs
from kvflow.kernels.device import device_properties
from kvflow.kernels.pdl import pdl_launch, pdl_launch_dependents, pdl_wait
from kvflow.kernels.split_k import reduce_splits
from kvflow.kernels.stage_fit import launch_fitting_stages

MAX_M = 256                # rows the kernel takes; more rows go to cuBLAS (compute-bound GEMM)
GEMV_MAX_M = 16            # rows the CUDA-core form takes (its accumulator grows with M)
_ACC_REGS = 64             # deferred-reduction accumulator budget (fp32 registers per thread)
CONFIG_DIR = os.path.join(os.path.dirname(__file__), "configs")


@triton.jit
def _load_w(w_rows, k0, k_hi, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    """One [BLOCK_N, BLOCK_K] tile of W at column k0 (zeros past k_hi unless EVEN_K)."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    if EVEN_K:
        return tl.load(w_rows + offs_k[None, :], eviction_policy="evict_first")
    return tl.load(w_rows + offs_k[None, :], mask=offs_k[None, :] < k_hi, other=0.0,
                   eviction_policy="evict_first")


@triton.jit
def _load_x(ptrs, mask, K, SILU_MUL: tl.constexpr):
    """x at `ptrs`; with SILU_MUL the input row is gate | up ([2K]) and x = silu(gate) * up,
    computed in fp32 and rounded once, exactly as kernels/activation.py's silu_and_mul."""
    if SILU_MUL:
        g = tl.load(ptrs, mask=mask, other=0.0)
        u = tl.load(ptrs + K, mask=mask, other=0.0).to(tl.float32)
        gf = g.to(tl.float32)
        return (gf * tl.sigmoid(gf) * u).to(g.dtype)
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def _step(acc, w, x_ptr, offs_m, m_mask, stride_xm, k0, k_hi, K,
          USE_DOT: tl.constexpr, DEFER: tl.constexpr, EVEN_K: tl.constexpr, IEEE: tl.constexpr,
          BLOCK_K: tl.constexpr, SILU_MUL: tl.constexpr):
    """acc += x[:, k0:k0+BLOCK_K] . w (w: [BLOCK_N, BLOCK_K], the tile at k0)."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    if USE_DOT:
        x_mask = m_mask[None, :] if EVEN_K else m_mask[None, :] & (offs_k[:, None] < k_hi)
        xt = _load_x(x_ptr + offs_m[None, :] * stride_xm + offs_k[:, None], x_mask, K,
                     SILU_MUL)                                                 # [BK, BM]
        if IEEE:
            acc = tl.dot(w, xt, acc, input_precision="ieee")
        else:
            acc = tl.dot(w, xt, acc)
    else:
        x_mask = m_mask[:, None] if EVEN_K else m_mask[:, None] & (offs_k[None, :] < k_hi)
        x = _load_x(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], x_mask, K,
                    SILU_MUL)                                                  # [BM, BK]
        prod = x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]    # [BM, BN, BK]
        if DEFER:
            acc += prod
        else:
            acc += tl.sum(prod, axis=2)
    return acc


@triton.jit
def _finish(acc, USE_DOT: tl.constexpr, DEFER: tl.constexpr):
    """The accumulator as the [BLOCK_M, BLOCK_N] fp32 product."""
    if USE_DOT:
        return tl.trans(acc)
    elif DEFER:
        return tl.sum(acc, axis=2)
    else:
        return acc


@triton.jit
def _skinny_gemm_kernel(x_ptr, w_ptr, b_ptr, out_ptr,
                        M, N, K, K_PER_SPLIT, stride_xm, stride_wn,
                        HAS_BIAS: tl.constexpr, USE_DOT: tl.constexpr, DEFER: tl.constexpr,
                        EVEN_K: tl.constexpr, IEEE: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        SILU_MUL: tl.constexpr, USE_PDL: tl.constexpr,
                        r_ptr=None, h_ptr=None, g_ptr=None, sq_ptr=None, n_sq=0, inv_k=1.0,
                        eps=0.0, ADD_NORM: tl.constexpr = False,
                        ROW_SCALE: tl.constexpr = False, SQ_PAD: tl.constexpr = 1,
                        GLU: tl.constexpr = False):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    # Rows past N read row N-1 instead of being masked: the loads stay unpredicated along the
    # slab and those outputs are never stored. W is streamed once (evict_first: it should not
    # push x or the split partials out of L2).
    w_rows = w_ptr + tl.minimum(offs_n, N - 1).to(tl.int64)[:, None] * stride_wn   # [BN, 1]
    k_lo = pid_k * K_PER_SPLIT                           # K_PER_SPLIT % BLOCK_K == 0
    k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)
    # W is static: its first tile is requested before waiting for the previous kernel (PDL),
    # so the DRAM round trip overlaps that kernel's tail. x is read only after the wait.
    w = _load_w(w_rows, k_lo, k_hi, BLOCK_K, EVEN_K)                              # [BN, BK]
    if GLU:
        # W is gate | up ([2N, K]): this program also owns the up rows of its columns.
        w_rows_u = w_rows + N.to(tl.int64) * stride_wn
        w_u = _load_w(w_rows_u, k_lo, k_hi, BLOCK_K, EVEN_K)
    pdl_wait(USE_PDL)
    pdl_launch_dependents(USE_PDL)
    out_mask = m_mask[:, None] & n_mask[None, :]
    out_offs = offs_m[:, None] * N + offs_n[None, :]
    # The folded norm's operands are requested here, not after the loop: they are ready once the
    # previous kernel is (the wait), and their round trips then hide under the W stream instead
    # of lengthening the tail that the next kernel waits on.
    if ROW_SCALE:
        # The consumer half of a folded RMSNorm: x is h * g; the producer stored each of its
        # programs' sum of h^2 for every row; rstd per row scales the fp32 product.
        offs_s = tl.arange(0, SQ_PAD)
        sq = tl.load(sq_ptr + offs_m[:, None] * n_sq + offs_s[None, :],
                     mask=m_mask[:, None] & (offs_s[None, :] < n_sq), other=0.0)  # [BM, SQ]
        rstd = tl.math.rsqrt(tl.sum(sq, axis=1) * inv_k + eps)                   # [BM]
    if ADD_NORM:
        r = tl.load(r_ptr + out_offs, mask=out_mask, other=0.0)                   # [BM, BN]
        g = tl.load(g_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)       # [BN]
    if USE_DOT:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)                      # out^T
    elif DEFER:
        acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = acc
    acc = _step(acc, w, x_ptr, offs_m, m_mask, stride_xm, k_lo, k_hi, K,
                USE_DOT, DEFER, EVEN_K, IEEE, BLOCK_K, SILU_MUL)
    if GLU:
        acc_u = _step(acc_u, w_u, x_ptr, offs_m, m_mask, stride_xm, k_lo, k_hi, K,
                      USE_DOT, DEFER, EVEN_K, IEEE, BLOCK_K, SILU_MUL)
    for k0 in range(k_lo + BLOCK_K, k_hi, BLOCK_K):
        w = _load_w(w_rows, k0, k_hi, BLOCK_K, EVEN_K)
        if GLU:
            w_u = _load_w(w_rows_u, k0, k_hi, BLOCK_K, EVEN_K)
        acc = _step(acc, w, x_ptr, offs_m, m_mask, stride_xm, k0, k_hi, K,
                    USE_DOT, DEFER, EVEN_K, IEEE, BLOCK_K, SILU_MUL)
        if GLU:
            acc_u = _step(acc_u, w_u, x_ptr, offs_m, m_mask, stride_xm, k0, k_hi, K,
                          USE_DOT, DEFER, EVEN_K, IEEE, BLOCK_K, SILU_MUL)
    res = _finish(acc, USE_DOT, DEFER)                                            # [BM, BN]
    if ROW_SCALE:
        res = res * rstd[:, None]
    if HAS_BIAS:        # only set when there is a single split: the reduce kernel adds it
        res += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    y = res.to(out_ptr.dtype.element_ty)
    if GLU:
        # silu(gate) * up from the two products, each rounded to the output dtype first:
        # exactly the unfused gate/up product followed by kernels/activation.py's silu_and_mul.
        res_u = _finish(acc_u, USE_DOT, DEFER)
        if ROW_SCALE:
            res_u = res_u * rstd[:, None]
        if HAS_BIAS:
            res_u += tl.load(b_ptr + N + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        gf = y.to(tl.float32)
        uf = res_u.to(out_ptr.dtype.element_ty).to(tl.float32)
        y = (gf * tl.sigmoid(gf) * uf).to(out_ptr.dtype.element_ty)
    if ADD_NORM:
        # The producer half of a folded residual add + RMSNorm (single split): h = y + r,
        # rounded as the norm kernel rounds it, is the new residual stream; the output is
        # h * g, and this program's sum of h^2 per row goes to sq[row, pid_n].
        h = (y.to(tl.float32) + r.to(tl.float32)).to(y.dtype)
        tl.store(h_ptr + out_offs, h, mask=out_mask)
        hf = tl.where(out_mask, h.to(tl.float32), 0.0)
        tl.store(sq_ptr + offs_m * n_sq + pid_n, tl.sum(hf * hf, axis=1), mask=m_mask)
        y = (hf * g[None, :]).to(y.dtype)
    tl.store(out_ptr + pid_k.to(tl.int64) * M * N + out_offs, y, mask=out_mask)


def skinny_gemm_ref(x: torch.Tensor, w: torch.Tensor,
                    bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """fp32 product (+ bias), rounded once to x.dtype."""
    y = x.float() @ w.float().T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


# ------------------------------------------------------------------------------- configs
def m_bucket(m: int) -> int:
    """Rows are tuned in power-of-two buckets: 1, 2, 4, ..., 256."""
    return triton.next_power_of_2(m)


def default_config(m: int, n: int, k: int, num_sms: int = 132) -> dict:
    """Shape heuristic (used where the tuned table has no entry). GEMV tiles: 16 rows x 256
    columns (a warp reads 512 contiguous bytes of a row, 16 bytes a thread), 4 warps: 8 KB of W
    per step, and enough programs per SM to keep ~64 KB in flight. Dot tiles: 64 x 128 with a
    4-stage pipeline. K is split (powers of two, at most 16, >= one BLOCK_K step per split) until
    the grid has ~4 programs per SM."""
    if m <= 4:
        cfg = dict(block_n=16 if m <= 2 else 8, block_k=256, num_warps=4, num_stages=2,
                   use_dot=False)
    else:
        cfg = dict(block_n=64, block_k=128, num_warps=4, num_stages=4, use_dot=True)
    blocks = triton.cdiv(n, cfg["block_n"])
    split = 1
    while blocks * split < 4 * num_sms and split < 16 and k >= 2 * split * cfg["block_k"]:
        split *= 2
    cfg["split_k"] = split
    return cfg


def _device_file(device_name: str) -> str:
    safe = "".join(c if c.isalnum() or c in "-." else "_" for c in device_name)
    return os.path.join(CONFIG_DIR, f"skinny_gemm_{safe}.json")


@functools.lru_cache(maxsize=None)
def load_table(device_name: str) -> dict:
    """The tuned table for a GPU model, {(n, k, m_bucket): config or None}; None means torch
    (cuBLAS) was faster there. File format (written by benchmarks/skinny_gemm_tune.py):
    {"device": name, "configs": {"N,K": {"M": config | null}}}. Missing file: empty table.
    KVFLOW_SKINNY_TABLE=path reads that file instead (tuning A/Bs; read once a process)."""
    path = envs.skinny_table() or _device_file(device_name)
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        data = json.load(f)
    table = {}
    for nk, per_m in data["configs"].items():
        n, k = (int(v) for v in nk.split(","))
        for m, cfg in per_m.items():
            table[(n, k, int(m))] = cfg
    return table


def choose_config(m: int, n: int, k: int, device: Optional[torch.device] = None) -> Optional[dict]:
    """The config for an (M, N, K) product on a GPU: the tuned table's entry for (N, K, M
    bucket) on this GPU model; None (use cuBLAS) where the table says cuBLAS wins or has no
    entry -- measured on the H200, the untuned heuristic loses to cuBLAS on about half the
    shapes, so only measured wins are taken. Without a CUDA device (interpreter tests): the
    default for 132 SMs."""
    if m > MAX_M:
        return None
    if device is None or device.type != "cuda":
        return default_config(m, n, k)
    return load_table(device_properties(device).name).get((n, k, m_bucket(m)))


# --------------------------------------------------------------------------------- launch
@dataclass(frozen=True)
class FoldedNorm:
    """An RMSNorm split across two skinny GEMMs instead of its own launch (decode): the
    producer (`add_norm=`) stored, per row, each of its programs' sum of h^2 in `sq`
    [M, programs] fp32 and emitted h * g; the consumer (`row_scale=`) multiplies by h * g and
    scales each row of its fp32 product by rsqrt(sum(sq) / K + eps)."""
    sq: torch.Tensor
    eps: float


def foldable(m: int, n: int, k: int, device: torch.device, consumer: bool = False) -> bool:
    """Whether the product can be a half of a FoldedNorm: its tuned config (the one
    `skinny_gemm` would take) runs one K split, so one program owns whole output rows' slices
    and the epilogues see the final sums. A consumer must also run the GEMV form: the
    tensor-core form pads the rows to 16, and its [16, producer programs] tile of partial
    sums (512 for a 4096-wide o_proj) costs ~128 registers a thread in its 2 warps. Measured
    on the H200 (Llama-3.1-8B decode1, its gate/up product): +0.22 ms a step folded, where
    the GEMV consumers (q/k/v) gained 0.08 ms."""
    cfg = choose_config(m, n, k, device) if 1 <= m <= MAX_M else None
    if cfg is None or (consumer and (cfg.get("use_dot", False) or m > GEMV_MAX_M)):
        return False
    return _k_splits(k, cfg)[1] == 1


def _k_splits(k: int, config: dict) -> tuple[int, int]:
    """(K per split, number of splits) that `config` gives a K-long product. Each split covers
    a whole number of BLOCK_K steps, so steps never straddle splits."""
    k_per_split = triton.cdiv(triton.cdiv(k, max(1, config.get("split_k", 1))),
                              config["block_k"]) * config["block_k"]
    return k_per_split, triton.cdiv(k, k_per_split)


def glu_config(m: int, n2: int, k: int, device: torch.device) -> Optional[dict]:
    """The config of a gate | up product ([2N, K] weight, N = n2 / 2) that emits silu(gate) *
    up from its epilogue (`skinny_gemm(glu=True)`), or None where it cannot run: the tuned
    product must be a single K split (the activation needs final sums). Each program takes
    half the columns it would for the plain product, and their up rows, so the grid and the
    bytes a program streams stay the same."""
    cfg = choose_config(m, n2, k, device) if 1 <= m <= MAX_M else None
    if cfg is None or _k_splits(k, cfg)[1] != 1 or n2 % 2:
        return None
    return glu_tile(cfg)


def glu_tile(cfg: dict) -> dict:
    """The glu launch's config for a plain gate | up product's `cfg`: half its columns per
    program (at least the 16 rows of the tensor-core form's MMA)."""
    return dict(cfg, block_n=max(16 if cfg.get("use_dot", False) else 1, cfg["block_n"] // 2))


def skinny_gemm(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor] = None,
                config: Optional[dict] = None, silu_mul_input: bool = False,
                add_norm: Optional[tuple] = None, row_scale: Optional[FoldedNorm] = None,
                glu: bool = False):
    """x [M, K] @ w[N, K]^T (+ bias [N]) -> [M, N] in x.dtype, fp32 accumulation, M <= MAX_M.
    config: dict(block_n, block_k, split_k, num_warps, num_stages[, use_dot]); default
    `choose_config` (the default heuristic where the table says cuBLAS wins: the caller decides
    whether to call this at all). silu_mul_input: x is [M, 2K] = gate | up and the product
    is silu_and_mul(x) @ w^T, the activation applied as x is loaded (a gated MLP's down
    projection without the activation's own launch; same rounding).

    add_norm = (residual [M, N], g [N], eps): also the producer half of a FoldedNorm, the
    fused residual add + RMSNorm that follows this product: returns (h * g, h, FoldedNorm)
    where h = round(y + residual) is the new residual stream. row_scale: this product is the
    consumer half (x = h * g); each output row is scaled by its rstd before the bias. Both
    need a single K split (`foldable`).

    glu: w is gate | up ([2N, K], bias [2N]) and the result is silu(gate) * up [M, N], each
    product rounded to x.dtype before the activation (= the product, then silu_and_mul);
    needs a single K split (`glu_config`)."""
    k = w.shape[1]
    assert x.dim() == 2 and w.dim() == 2 and x.shape[1] == (2 * k if silu_mul_input else k), \
        (x.shape, w.shape, silu_mul_input)
    m = x.shape[0]
    n = w.shape[0] // 2 if glu else w.shape[0]
    assert 1 <= m <= MAX_M, f"skinny_gemm takes 1..{MAX_M} rows, got {m}"
    assert not glu or (w.shape[0] % 2 == 0 and add_norm is None), "glu: [2N, K] weight, a consumer"
    x = x if x.stride(1) == 1 else x.contiguous()
    w = w if w.stride(1) == 1 else w.contiguous()
    if config is None:
        config = ((glu_config(m, 2 * n, k, x.device) if glu else choose_config(m, n, k, x.device))
                  or default_config(m, n, k))
    use_dot = bool(config.get("use_dot", False)) or m > GEMV_MAX_M
    bn, bk = config["block_n"], config["block_k"]
    k_per_split, split = _k_splits(k, config)
    block_m = max(16, triton.next_power_of_2(m)) if use_dot else triton.next_power_of_2(m)
    warps = config.get("num_warps", 4)
    defer = not use_dot and block_m * bn * bk * (2 if glu else 1) <= _ACC_REGS * 32 * warps
    out = torch.empty((m, n), device=x.device, dtype=x.dtype)
    part = out if split == 1 else torch.empty((split, m, n), device=x.device,
                                              dtype=torch.float32)
    has_bias = bias is not None
    consts = dict(HAS_BIAS=has_bias and split == 1, USE_DOT=use_dot, DEFER=defer,
                  EVEN_K=k % bk == 0, IEEE=x.dtype == torch.float32,
                  BLOCK_M=block_m, BLOCK_N=bn, BLOCK_K=bk, SILU_MUL=silu_mul_input,
                  num_warps=warps)
    fold = {}
    if glu:
        assert split == 1, "glu needs a single K split (see glu_config)"
        consts.update(GLU=True)
    if add_norm is not None or row_scale is not None:
        assert split == 1, "a folded RMSNorm needs a single K split (see foldable)"
        assert add_norm is None or row_scale is None, "one half of a FoldedNorm per product"
    if row_scale is not None:
        sq = row_scale.sq
        assert sq.shape[0] == m and sq.dtype == torch.float32 and sq.is_contiguous()
        consts.update(ROW_SCALE=True, SQ_PAD=triton.next_power_of_2(sq.shape[1]))
        fold.update(sq_ptr=sq, n_sq=sq.shape[1], inv_k=1.0 / k, eps=row_scale.eps)
    if add_norm is not None:
        residual, g, eps = add_norm
        assert residual.shape == (m, n) and residual.is_contiguous() and g.shape == (n,)
        programs = triton.cdiv(n, bn)
        sq_out = torch.empty((m, programs), device=x.device, dtype=torch.float32)
        h = torch.empty_like(out)
        consts.update(ADD_NORM=True)
        fold.update(r_ptr=residual, h_ptr=h, g_ptr=g, sq_ptr=sq_out, n_sq=programs)
    # The first W tile is held across the loop (requested before the PDL wait): on top of
    # the pipeline's buffers, so tuned stage counts may need one stage less to fit.
    launch_fitting_stages(
        _skinny_gemm_kernel, (triton.cdiv(n, bn), split),
        (x.device.index, x.dtype, tuple(consts.items())), config.get("num_stages", 2),
        x, w, bias if has_bias else w, part, m, n, k, k_per_split, x.stride(0), w.stride(0),
        **fold, **consts, **pdl_launch(x.device))
    if split > 1:
        reduce_splits(part, out, bias)
    if add_norm is not None:
        return out, h, FoldedNorm(sq_out, float(add_norm[2]))
    return out
