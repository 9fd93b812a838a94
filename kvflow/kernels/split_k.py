"""Second pass of a split-K GEMM, shared by the skinny GEMM and the W4A16 (GPTQ) GEMM.

A split-K launch writes fp32 partials [SPLIT, M, N]; this kernel sums them in split order,
adds an optional bias and rounds once to the output dtype. Deterministic, unlike fp32 atomics
(whose order, hence the output's rounding, varies run to run), and CUDA-graph safe.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from kvflow.kernels.pdl import pdl_launch, pdl_launch_dependents, pdl_wait

_BLOCK = 1024


@triton.jit
def _reduce_splits_kernel(part_ptr, b_ptr, out_ptr, MN, N, HAS_BIAS: tl.constexpr,
                          SPLIT: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    """out[i] = sum_s part[s, i] (+ bias[i % N]) in fp32, in split order; cast to out's dtype."""
    pdl_wait(USE_PDL)
    pdl_launch_dependents(USE_PDL)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(SPLIT):
        acc += tl.load(part_ptr + s * MN + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def reduce_splits(part: torch.Tensor, out: torch.Tensor,
                  bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """part [S, M, N] fp32 (contiguous) -> out [M, N] (contiguous, its own dtype), + bias [N]."""
    split, m, n = part.shape
    has_bias = bias is not None
    _reduce_splits_kernel[(triton.cdiv(m * n, _BLOCK),)](
        part, bias if has_bias else part, out, m * n, n, HAS_BIAS=has_bias, SPLIT=split,
        BLOCK=_BLOCK, num_warps=4, **pdl_launch(out.device))
    return out
