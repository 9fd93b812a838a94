"""RMSNorm and fused residual-add + RMSNorm (HF Llama/Qwen semantics).

    rms_norm(x, w)                 = (x * rsqrt(mean(x^2) + eps)).to(dtype) * w
    fused_add_rms_norm(x, r, w)    -> (rms_norm(x + r, w), x + r)   (x + r rounded to dtype)

One program per row. Rows up to _MAX_SINGLE elements stay in registers (one read, one write
per tensor: the memory-bound optimum); longer rows take two passes over column chunks. The
reduction is in fp32. Inputs may have any leading shape [..., N] with a contiguous last dim.

    fused_add_rms_norm_parts(p, r, w) = fused_add_rms_norm(sum_s p[s] (rounded to r.dtype), r, w)

takes the fp32 K-slice partial products of the projection before the norm (S x [M, N]) and
sums them as it loads x, in slice order: the split-K reduction a GEMM library would run as a
kernel of its own (layers/split_k_norm.py says where that pays).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvflow.kernels.pdl import pdl_launch, pdl_launch_dependents, pdl_wait

_MAX_SINGLE = 32768       # widest row kept in registers
_CHUNK = 8192             # column chunk of the two-pass path


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr,
    stride_x, stride_r, stride_o, stride_ro, N, eps, stride_part,
    BLOCK: tl.constexpr, SINGLE: tl.constexpr, HAS_RES: tl.constexpr, EVEN: tl.constexpr,
    USE_PDL: tl.constexpr, PARTS: tl.constexpr = 1, ROUND_X: tl.constexpr = False,
):
    pdl_wait(USE_PDL)
    pdl_launch_dependents(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    r_row = res_ptr + row * stride_r
    o_row = out_ptr + row * stride_o
    ro_row = res_out_ptr + row * stride_ro
    dtype = out_ptr.dtype.element_ty
    cols = tl.arange(0, BLOCK)
    if SINGLE:
        if EVEN:
            x = tl.load(x_row + cols).to(tl.float32)
        else:
            x = tl.load(x_row + cols, mask=cols < N, other=0.0).to(tl.float32)
        # With PARTS > 1, x is slice 0 of fp32 partial products: add the others in slice
        # order. An fp32 x (ROUND_X) is rounded once to the output dtype, as the product's
        # own output would be.
        for s in tl.static_range(1, PARTS):
            x += tl.load(x_row + s * stride_part + cols, mask=cols < N, other=0.0)
        if ROUND_X:
            x = x.to(dtype).to(tl.float32)
        if HAS_RES:
            if EVEN:
                x += tl.load(r_row + cols).to(tl.float32)
            else:
                x += tl.load(r_row + cols, mask=cols < N, other=0.0).to(tl.float32)
            x = x.to(dtype)                                   # HF rounds the sum
            tl.store(ro_row + cols, x, mask=cols < N)
            x = x.to(tl.float32)
        rstd = tl.math.rsqrt(tl.sum(x * x, 0) / N + eps)
        w = tl.load(w_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
        y = (x * rstd).to(dtype).to(tl.float32) * w
        tl.store(o_row + cols, y.to(dtype), mask=cols < N)
    else:
        # Pass 1: sum of squares (and the residual sum, written out for pass 2).
        sq = tl.zeros([BLOCK], tl.float32)
        for c0 in range(0, N, BLOCK):
            c = c0 + cols
            x = tl.load(x_row + c, mask=c < N, other=0.0).to(tl.float32)
            if HAS_RES:
                x += tl.load(r_row + c, mask=c < N, other=0.0).to(tl.float32)
                x = x.to(dtype)
                tl.store(ro_row + c, x, mask=c < N)
                x = x.to(tl.float32)
            sq += x * x
        rstd = tl.math.rsqrt(tl.sum(sq, 0) / N + eps)
        # Pass 2: normalise. The sum is recomputed rather than re-read from res_out: another
        # thread of this program may have written that element, with no barrier in between.
        for c0 in range(0, N, BLOCK):
            c = c0 + cols
            x = tl.load(x_row + c, mask=c < N, other=0.0).to(tl.float32)
            if HAS_RES:
                x += tl.load(r_row + c, mask=c < N, other=0.0).to(tl.float32)
                x = x.to(dtype).to(tl.float32)
            w = tl.load(w_ptr + c, mask=c < N, other=0.0).to(tl.float32)
            y = (x * rstd).to(dtype).to(tl.float32) * w
            tl.store(o_row + c, y.to(dtype), mask=c < N)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """[..., N] -> [M, N] with a contiguous last dim; a view whenever possible (a 2-D input
    with a row stride, e.g. a column slice, is used as is)."""
    n = x.shape[-1]
    x2 = x if x.dim() == 2 else x.reshape(-1, n)
    return x2 if x2.stride(1) == 1 else x2.contiguous()


def _launch(x2, r2, weight, out, res_out, eps, has_res, num_warps=None, parts: int = 1,
            stride_part: int = 0):
    """num_warps: an override of the heuristic (benchmarks/norm_rows.py). parts > 1: x2 is
    the first of `parts` fp32 partials, stride_part elements apart."""
    M, N = x2.shape
    if M == 0:
        return
    single = N <= _MAX_SINGLE
    round_x = x2.dtype != out.dtype
    assert not round_x or single, "partial products: rows of <= _MAX_SINGLE elements only"
    block = triton.next_power_of_2(N) if single else _CHUNK
    if num_warps is None:
        num_warps = min(16, max(1, block // 512)) if single else 8
    _rms_norm_kernel[(M,)](
        x2, r2, weight, out, res_out, x2.stride(0), r2.stride(0), out.stride(0),
        res_out.stride(0), N, eps, stride_part, BLOCK=block, SINGLE=single, HAS_RES=has_res,
        EVEN=(block == N), PARTS=parts, ROUND_X=round_x, num_warps=num_warps,
        **pdl_launch(x2.device))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., N], weight [N] -> [..., N] in x.dtype."""
    assert weight.shape == (x.shape[-1],)
    x2 = _rows(x)
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    _launch(x2, x2, weight, out, out, eps, False)
    return out.view(x.shape)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual [..., N] -> (normed, new_residual) with new_residual = x + residual."""
    assert x.shape == residual.shape and weight.shape == (x.shape[-1],)
    x2, r2 = _rows(x), _rows(residual)
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    res_out = torch.empty_like(out)
    _launch(x2, r2, weight, out, res_out, eps, True)
    return out.view(x.shape), res_out.view(x.shape)


def fused_add_rms_norm_parts(parts: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                             eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """parts [S, M, N] fp32 (row-contiguous slices), residual [M, N] -> (normed, new_residual)
    in residual.dtype, with x = sum_s parts[s] (fp32, in order s = 0..S-1) rounded to
    residual.dtype, then as fused_add_rms_norm(x, residual)."""
    S, M, N = parts.shape
    assert parts.dtype == torch.float32 and parts.stride(2) == 1
    assert residual.shape == (M, N) and weight.shape == (N,)
    r2 = _rows(residual)
    out = torch.empty(r2.shape, dtype=residual.dtype, device=residual.device)
    res_out = torch.empty_like(out)
    _launch(parts[0], r2, weight, out, res_out, eps, True, parts=S,
            stride_part=parts.stride(0))
    return out, res_out
