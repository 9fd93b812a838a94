"""One token per row drawn from softmax(logits / T): inverse-CDF sampling in two launches.

A draw needs one uniform number per row, not one per vocabulary entry: pick u ~ U(0, 1), and
return the first token j whose cumulative weight sum_{i <= j} exp(x_i / T - M) exceeds
u * S (S the row's total). That is exactly a draw from softmax(x / T) up to float32 rounding
of the cumulative sums and of u. The previous kernel (Gumbel-max: argmax_j x_j / T -
log(-log U_j)) generated Philox noise and took two logarithms for every entry and was
compute-bound. On an H200 (benchmarks/sample_bench.py, bf16 rows of Qwen3's 151,936 entries):
140 rows 84 -> 17 us (the logits' read at 4.3 TB/s: 10 us), 1000 rows 564 -> 102 us (71).

  stage 1, grid (B, V / CHUNK): each program reduces one chunk of a row to its maximum m_c of
    y = x / T and its weight s_c = sum exp(y - m_c) (in base 2: y is scaled by log2(e) / T
    and the weights are exp2, one MUFU op an entry); a NaN makes s_c NaN, and only then is
    the chunk searched for its first NaN.
  stage 2, grid (B,): the row's maximum M and chunk weights S_c = s_c * exp(m_c - M); u from
    Philox (key seed + row, so a row's draw does not depend on the batch); the chunk c where
    the running sum of S_c first exceeds u * S; then that chunk's entries again (one chunk per
    row, a fraction of the logits), cumulatively summed in the chunk's own scale, give the token.

Rules (also what the tests check): a -inf entry (masked) has weight 0 and is never drawn; if
rounding leaves the target at or past the chunk's recomputed total, the chunk's last entry of
positive weight is drawn; a row holding NaN returns its first NaN (as the argmax did); a row
whose entries are all -inf returns 0; +inf entries share the row's mass equally. Sizes come
from shapes (no host sync): CUDA-graph safe.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvflow.compilation.eager import eager_only
from kvflow.kernels.argmax import CHUNKS as ARGMAX_CHUNKS
from kvflow.kernels.argmax import argmax_chunk
from kvflow.kernels.pdl import pdl_launch, pdl_launch_dependents, pdl_wait

_BIG = tl.constexpr(2147483647)
_LOG2E = tl.constexpr(1.4426950408889634)
_FMAX = tl.constexpr(3.4028234663852886e38)
MAX_CHUNK = 4096    # stage-1 chunk cap: 4096 x 4 warps measured best at 140-1000 rows (H200)
CHUNKS = tuple(c for c in ARGMAX_CHUNKS if c <= MAX_CHUNK)   # every chunk sample_rows picks


@triton.jit
def _scaled(ptrs, mask, inv_t):
    """Logits / T in base 2 (x * log2(e) / T, so weights are exp2(y - m)), masked entries
    -inf; +inf and overflow clamped to the float32 maximum (so +inf entries weigh 1 against
    everything else's 0), NaN kept."""
    x = tl.load(ptrs, mask=mask, other=float("-inf")).to(tl.float32)
    return tl.minimum(x * inv_t, _FMAX, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _finite(m):
    """The reference point of a chunk's weights: its maximum, or 0 when every entry is -inf
    (exp2(-inf - 0) = 0 then, where exp2(-inf - -inf) would be NaN)."""
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def _sample_chunks_kernel(x_ptr, max_ptr, sum_ptr, nan_ptr, temp_ptr, V, stride_xb,
                          num_chunks, CHUNK: tl.constexpr, USE_PDL: tl.constexpr):
    pdl_wait(USE_PDL)                  # the logits are the predecessor's output
    pdl_launch_dependents(USE_PDL)
    row, c = tl.program_id(0).to(tl.int64), tl.program_id(1)
    cols = c * CHUNK + tl.arange(0, CHUNK)
    y = _scaled(x_ptr + row * stride_xb + cols, cols < V,
                _LOG2E / tl.load(temp_ptr + row))                                # [CHUNK]
    m = tl.max(tl.where(y == y, y, float("-inf")), axis=0)                       # NaN skipped
    # A NaN entry makes the sum NaN: only then is the chunk searched for its first NaN, so
    # the common case costs one exp2 and a few ALU ops an entry.
    s = tl.sum(tl.exp2(y - _finite(m)), axis=0)
    first_nan = tl.full([], _BIG, tl.int32)
    if s != s:
        first_nan = tl.min(tl.where(y != y, cols, _BIG), axis=0)
    tl.store(max_ptr + row * num_chunks + c, m)
    tl.store(sum_ptr + row * num_chunks + c, s)
    tl.store(nan_ptr + row * num_chunks + c, first_nan)


@triton.jit(do_not_specialize=["seed"])
def _sample_pick_kernel(x_ptr, max_ptr, sum_ptr, nan_ptr, temp_ptr, out_ptr, V, stride_xb,
                        num_chunks, seed, CHUNK: tl.constexpr, NC_PAD: tl.constexpr,
                        USE_PDL: tl.constexpr, u_ptr=None, HAS_U: tl.constexpr = False):
    pdl_wait(USE_PDL)                  # stage 1's partials
    pdl_launch_dependents(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    cs = tl.arange(0, NC_PAD)
    ok = cs < num_chunks
    part = row * num_chunks + cs
    m_c = tl.load(max_ptr + part, mask=ok, other=float("-inf"))                  # [NC_PAD]
    s_c = tl.load(sum_ptr + part, mask=ok, other=0.0)
    first_nan = tl.min(tl.load(nan_ptr + part, mask=ok, other=_BIG), axis=0)
    scale_c = tl.exp2(m_c - _finite(tl.max(m_c, axis=0)))   # 0 for empty chunks
    w_c = s_c * scale_c                                                          # [NC_PAD]
    cum = tl.cumsum(w_c, axis=0)
    total = tl.sum(w_c, axis=0)
    if HAS_U:                        # given uniforms (tests against the torch reference)
        u = tl.load(u_ptr + row)
    else:                            # u in [0, 1): counter 0 of the row's own Philox stream
        u = tl.sum(tl.rand(seed + row, tl.zeros([1], dtype=tl.int32)), axis=0)
    target = u * total
    c = tl.min(tl.where(ok & (cum > target), cs, _BIG), axis=0)
    # Rounding can put the target at the total: the last chunk with weight then.
    c = tl.where(c == _BIG, tl.max(tl.where(ok & (w_c > 0), cs, -1), axis=0), c)
    c_safe = tl.maximum(c, 0)
    sel = cs == c_safe
    before = tl.sum(tl.where(sel, cum - w_c, 0.0), axis=0)
    m_sel = tl.sum(tl.where(sel, m_c, 0.0), axis=0)
    scale_sel = tl.sum(tl.where(sel, scale_c, 0.0), axis=0)
    # The chunk again, in its own scale (weights exp2(y - m_sel), as stage 1 summed them).
    cols = c_safe * CHUNK + tl.arange(0, CHUNK)
    y = _scaled(x_ptr + row * stride_xb + cols, cols < V, _LOG2E / tl.load(temp_ptr + row))
    w = tl.exp2(y - _finite(m_sel))                                              # [CHUNK]
    local = (target - before) / scale_sel
    j = tl.min(tl.where(tl.cumsum(w, axis=0) > local, cols, _BIG), axis=0)
    j = tl.where(j == _BIG, tl.max(tl.where(w > 0, cols, -1), axis=0), j)
    j = tl.where(c < 0, 0, j)                                # every entry -inf: token 0
    j = tl.where(first_nan < _BIG, first_nan, j)             # (NaN rows: any j above)
    tl.store(out_ptr + row, j.to(tl.int64))


def sample_chunk(rows: int, vocab: int) -> int:
    """Stage-1 chunk: the argmax's (a few hundred programs in all), at most MAX_CHUNK."""
    return min(argmax_chunk(rows, vocab), MAX_CHUNK)


@eager_only
def sample_rows(logits: torch.Tensor, temperature: torch.Tensor, seed: int,
                chunk: int | None = None,
                uniforms: torch.Tensor | None = None) -> torch.Tensor:
    """One token per row drawn from softmax(logits / temperature) (see the module docstring).
    logits [B, V] floating; temperature [B] float32 > 0 on the logits' device; seed: the Philox
    key of row 0 (row r uses seed + r), an int in [0, 2**31) (one argument type, so one
    compiled variant). chunk: stage-1 chunk override (a power of two; tests, warm-up).
    uniforms: [B] float32 in [0, 1) used instead of the Philox draws (tests against
    kernels/reference.py's ref_sample_rows). Returns [B] int64."""
    assert temperature.shape == (logits.shape[0],) and temperature.dtype == torch.float32
    assert 0 <= seed < 2 ** 31, seed
    assert uniforms is None or (uniforms.shape == temperature.shape
                                and uniforms.dtype == torch.float32), uniforms
    b, v = logits.shape
    out = torch.empty((b,), dtype=torch.int64, device=logits.device)           # [B]
    if b == 0:
        return out
    if v == 0:
        raise IndexError("sampling from an empty row")
    x = logits if logits.stride(1) == 1 else logits.contiguous()
    chunk = min(chunk or sample_chunk(b, v), MAX_CHUNK)
    assert chunk & (chunk - 1) == 0, chunk
    nc = triton.cdiv(v, chunk)
    maxes = torch.empty((b, nc), dtype=torch.float32, device=x.device)          # [B, NC]
    sums = torch.empty((b, nc), dtype=torch.float32, device=x.device)           # [B, NC]
    nans = torch.empty((b, nc), dtype=torch.int32, device=x.device)             # [B, NC]
    pdl = pdl_launch(x.device)
    warps = 4
    _sample_chunks_kernel[(b, nc)](x, maxes, sums, nans, temperature, v, x.stride(0), nc,
                                   CHUNK=chunk, num_warps=warps, **pdl)
    given = {} if uniforms is None else dict(u_ptr=uniforms, HAS_U=True)
    _sample_pick_kernel[(b,)](x, maxes, sums, nans, temperature, out, v, x.stride(0), nc, seed,
                              CHUNK=chunk, NC_PAD=max(16, triton.next_power_of_2(nc)),
                              num_warps=warps, **given, **pdl)
    return out
