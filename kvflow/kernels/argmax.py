"""Row argmax of [B, V] logits (greedy sampling; random sampling is kernels/sampling.py).

torch.argmax on a [1, 128256] float32 row is one reduce_kernel with grid [1, 1, 1]: one block
walks 500 KB (27.8 us on an H200, longer than a whole decode layer). Here two launches:
  stage 1, grid (B, V / CHUNK): each program reduces one chunk of a row to (max, first index);
  stage 2, grid (B,): the row's chunk results -> the first index of the row's maximum.
Chunks are sized so that B x chunks is a few hundred programs (one DRAM round trip each).

Semantics are torch.argmax's, exactly: ties -> the lowest index (each chunk keeps its first
maximum, stage 2 the lowest index among chunks holding the maximum); NaN counts as larger than
everything, so a row with a NaN returns its first NaN (what torch returns on CPU and CUDA); a
row of -inf returns 0. Sizes come from shapes (no host sync): CUDA-graph safe.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvflow.compilation.eager import eager_only
from kvflow.kernels.pdl import pdl_launch, pdl_launch_dependents, pdl_wait

ARGMAX_MAX_ROWS = 64          # above: torch (its grid then covers the rows; no gain to chase)
_TARGET_PROGRAMS = 256        # stage-1 programs to aim for (~2 per SM of an H100/H200)
_MIN_CHUNK, _MAX_CHUNK = 1024, 8192
_BIG = tl.constexpr(2147483647)


@triton.jit
def _first_max(x, idx, valid):
    """x [N] fp32, idx [N] int32 (the candidates' vocabulary indices), valid [N] ->
    (value, index): the first NaN if any (value NaN), else the maximum and the lowest index
    holding it."""
    nan = valid & (x != x)
    first_nan = tl.min(tl.where(nan, idx, _BIG), axis=0)
    xv = tl.where(valid & (x == x), x, float("-inf"))
    m = tl.max(xv, axis=0)
    first = tl.min(tl.where(valid & (xv == m), idx, _BIG), axis=0)
    has_nan = first_nan < _BIG
    return tl.where(has_nan, float("nan"), m), tl.where(has_nan, first_nan, first)


@triton.jit
def _argmax_chunks_kernel(x_ptr, val_ptr, idx_ptr, V, stride_xb, num_chunks,
                          CHUNK: tl.constexpr, USE_PDL: tl.constexpr):
    pdl_wait(USE_PDL)                  # the logits are the predecessor's output
    pdl_launch_dependents(USE_PDL)
    row, c = tl.program_id(0).to(tl.int64), tl.program_id(1)
    cols = c * CHUNK + tl.arange(0, CHUNK)
    ok = cols < V
    x = tl.load(x_ptr + row * stride_xb + cols, mask=ok, other=float("-inf")).to(tl.float32)
    value, index = _first_max(x, cols, ok)
    tl.store(val_ptr + row * num_chunks + c, value)
    tl.store(idx_ptr + row * num_chunks + c, index)


@triton.jit
def _argmax_final_kernel(val_ptr, idx_ptr, out_ptr, num_chunks, NC_PAD: tl.constexpr,
                         USE_PDL: tl.constexpr):
    pdl_wait(USE_PDL)                  # stage 1's partials
    pdl_launch_dependents(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    cs = tl.arange(0, NC_PAD)
    ok = cs < num_chunks
    vals = tl.load(val_ptr + row * num_chunks + cs, mask=ok, other=float("-inf"))   # [NC_PAD]
    idxs = tl.load(idx_ptr + row * num_chunks + cs, mask=ok, other=_BIG)
    _, index = _first_max(vals, idxs, ok)
    tl.store(out_ptr + row, index.to(tl.int64))


CHUNKS = (1024, 2048, 4096, 8192)   # every stage-1 chunk argmax_chunk can pick (warm-up)


def argmax_chunk(rows: int, vocab: int) -> int:
    """Stage-1 chunk: ~_TARGET_PROGRAMS programs in all, each 1K..8K elements."""
    want = triton.cdiv(rows * vocab, _TARGET_PROGRAMS)
    return min(_MAX_CHUNK, max(_MIN_CHUNK, triton.next_power_of_2(want)))


@eager_only  # launched eagerly (not a traceable op)
def argmax_rows(x: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """x [B, V] floating -> [B] int64, exactly x.argmax(dim=-1) (see the module docstring).
    chunk: stage-1 chunk override (a power of two; tests)."""
    b, v = x.shape
    out = torch.empty((b,), dtype=torch.int64, device=x.device)               # [B]
    if b == 0:
        return out
    if v == 0:
        raise IndexError("argmax of an empty row")                            # as torch
    if x.stride(1) != 1:
        x = x.contiguous()
    chunk = chunk or argmax_chunk(b, v)
    assert chunk & (chunk - 1) == 0, chunk
    nc = triton.cdiv(v, chunk)
    vals = torch.empty((b, nc), dtype=torch.float32, device=x.device)         # [B, NC]
    idxs = torch.empty((b, nc), dtype=torch.int32, device=x.device)           # [B, NC]
    pdl = pdl_launch(x.device)
    _argmax_chunks_kernel[(b, nc)](x, vals, idxs, v, x.stride(0), nc, CHUNK=chunk,
                                   num_warps=8 if chunk > 2048 else 4, **pdl)
    _argmax_final_kernel[(b,)](vals, idxs, out, nc, NC_PAD=max(16, triton.next_power_of_2(nc)),
                               num_warps=4, **pdl)
    return out
