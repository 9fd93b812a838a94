"""Row argmax of [B, V] logits, plain (greedy sampling) or of logits / T + Gumbel noise (random
sampling in one pass over the logits).

torch.argmax on a [1, 128256] float32 row is one reduce_kernel with grid [1, 1, 1]: one block
walks 500 KB (27.8 us on an H200, longer than a whole decode layer). Here two launches:
  stage 1, grid (B, V / CHUNK): each program reduces one chunk of a row to (max, first index);
  stage 2, grid (B,): the row's chunk results -> the first index of the row's maximum.
Chunks are sized so that B x chunks is a few hundred programs (one DRAM round trip each).

Semantics are torch.argmax's, exactly: ties -> the lowest index (each chunk keeps its first
maximum, stage 2 the lowest index among chunks holding the maximum); NaN counts as larger than
everything, so a row with a NaN returns its first NaN (what torch returns on CPU and CUDA); a
row of -inf returns 0. Sizes come from shapes (no host sync): CUDA-graph safe.

Random sampling (`sample_rows`): argmax_j (x_j / T - log(-log U_j)), U_j ~ iid Uniform(0, 1)
from Philox4x32 (keyed by seed + row; counter k gives the four positions 4k..4k+3), is a draw from
softmax(x / T): -log U is Exponential(1), and argmax_j p_j / E_j picks j with probability
p_j / sum(p) (the exponential race the torch sampler runs in five [B, V] passes; here logits
are read once, the noise never stored). Masked tokens (-inf) are never drawn.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

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


@triton.jit(do_not_specialize=["seed"])
def _argmax_chunks_kernel(x_ptr, val_ptr, idx_ptr, temp_ptr, V, stride_xb, num_chunks, seed,
                          CHUNK: tl.constexpr, GUMBEL: tl.constexpr, USE_PDL: tl.constexpr):
    pdl_wait(USE_PDL)                  # the logits are the predecessor's output
    pdl_launch_dependents(USE_PDL)
    row, c = tl.program_id(0).to(tl.int64), tl.program_id(1)
    cols = c * CHUNK + tl.arange(0, CHUNK)
    ok = cols < V
    x = tl.load(x_ptr + row * stride_xb + cols, mask=ok, other=float("-inf")).to(tl.float32)
    if GUMBEL:
        # One Philox stream per row (key seed + row). Philox4x32 yields four words per
        # counter and the noise is compute-bound (tl.rand computes all four and keeps one:
        # 0.52 ms a step at 512 x 152K on an H200), so counter k serves vocabulary positions
        # 4k..4k+3 (word j -> 4k + j). Counters are global vocabulary groups (CHUNK is a
        # multiple of 4): a row's draw does not depend on the chunking.
        ctr = c * (CHUNK // 4) + tl.arange(0, CHUNK // 4)
        u0, u1, u2, u3 = tl.rand4x(seed + row, ctr)
        u = tl.reshape(tl.join(tl.join(u0, u1), tl.join(u2, u3)), [CHUNK])     # [CHUNK]
        x = x / tl.load(temp_ptr + row) - tl.log(-tl.log(u))
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


@torch.compiler.disable  # launched eagerly (not a traceable op)
def argmax_rows(x: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """x [B, V] floating -> [B] int64, exactly x.argmax(dim=-1) (see the module docstring).
    chunk: stage-1 chunk override (a power of two; tests)."""
    return _launch(x, None, 0, chunk)


@torch.compiler.disable
def sample_rows(logits: torch.Tensor, temperature: torch.Tensor, seed: int,
                chunk: int | None = None) -> torch.Tensor:
    """One token per row drawn from softmax(logits / temperature) (see the module docstring).
    logits [B, V] floating; temperature [B] float32 > 0 on the logits' device; seed: the Philox
    key of row 0 (row r uses seed + r), an int in [0, 2**31) (one argument type, so one
    compiled variant). Returns [B] int64."""
    assert temperature.shape == (logits.shape[0],) and temperature.dtype == torch.float32
    assert 0 <= seed < 2 ** 31, seed
    return _launch(logits, temperature, seed, chunk)


def _launch(x, temperature, seed, chunk):
    b, v = x.shape
    out = torch.empty((b,), dtype=torch.int64, device=x.device)               # [B]
    if b == 0:
        return out
    if v == 0:
        raise IndexError("argmax of an empty row")                            # as torch
    if x.stride(1) != 1:
        x = x.contiguous()
    chunk = chunk or argmax_chunk(b, v)
    assert chunk >= 4 and chunk & (chunk - 1) == 0, chunk   # the noise's counters: 4 per word
    nc = triton.cdiv(v, chunk)
    vals = torch.empty((b, nc), dtype=torch.float32, device=x.device)         # [B, NC]
    idxs = torch.empty((b, nc), dtype=torch.int32, device=x.device)           # [B, NC]
    pdl = pdl_launch(x.device)
    gumbel = temperature is not None
    _argmax_chunks_kernel[(b, nc)](x, vals, idxs, temperature if gumbel else vals, v,
                                   x.stride(0), nc, seed, CHUNK=chunk, GUMBEL=gumbel,
                                   num_warps=8 if chunk > 2048 else 4, **pdl)
    _argmax_final_kernel[(b,)](vals, idxs, out, nc, NC_PAD=max(16, triton.next_power_of_2(nc)),
                               num_warps=4, **pdl)
    return out
