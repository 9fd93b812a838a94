"""SiLU-and-mul (the gated MLP activation of Llama/Qwen): x [..., 2I] -> silu(x[:I]) * x[I:].

Grid (rows, column chunks of BLOCK). Purely memory-bound: each element of x is read once and
each output written once; math in fp32, one rounding at the store. The mask is compiled in only
when I is not a multiple of BLOCK.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvflow.kernels.pdl import pdl_launch, pdl_launch_dependents, pdl_wait


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, I,
                         BLOCK: tl.constexpr, EVEN: tl.constexpr, USE_PDL: tl.constexpr):
    pdl_wait(USE_PDL)
    pdl_launch_dependents(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    g_ptr = x_ptr + row * stride_x + cols
    if EVEN:
        g = tl.load(g_ptr).to(tl.float32)
        u = tl.load(g_ptr + I).to(tl.float32)
    else:
        g = tl.load(g_ptr, mask=cols < I, other=0.0).to(tl.float32)
        u = tl.load(g_ptr + I, mask=cols < I, other=0.0).to(tl.float32)
    y = g * tl.sigmoid(g) * u
    o_ptr = out_ptr + row * stride_o + cols
    if EVEN:
        tl.store(o_ptr, y.to(out_ptr.dtype.element_ty))
    else:
        tl.store(o_ptr, y.to(out_ptr.dtype.element_ty), mask=cols < I)


def silu_and_mul(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., 2I] (last dim contiguous) -> out [..., I] in x.dtype."""
    two_i = x.shape[-1]
    assert two_i % 2 == 0
    inter = two_i // 2
    x2 = x if x.dim() == 2 else x.reshape(-1, two_i)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    if out is None:
        out = torch.empty(x.shape[:-1] + (inter,), dtype=x.dtype, device=x.device)
    o2 = out.view(-1, inter)
    M = x2.shape[0]
    if M == 0:
        return out
    block = min(1024, triton.next_power_of_2(inter))
    grid = (M, triton.cdiv(inter, block))
    _silu_and_mul_kernel[grid](x2, o2, x2.stride(0), o2.stride(0), inter, BLOCK=block,
                               EVEN=(inter % block == 0), num_warps=4, **pdl_launch(x2.device))
    return out
