"""The split-KV merge of kvflow/kernels/attention.py: one merge routine for both paths.

A split-KV launch leaves, per (token row, query head, segment), an unnormalised partial
output acc [HEAD_PAD] fp32, its running max m and its sum l. `_merge_partials` combines them;
the fused path runs it in the last-arriving segment's program (ticket counters, in
attention.py), the two-kernel path in `_merge_splits_kernel`. Both call the same routine, so
their outputs agree bit for bit (tests/test_attention_fused_merge.py).
"""
from __future__ import annotations

import triton
import triton.language as tl

from kvflow.kernels.pdl import pdl_launch_dependents, pdl_wait

# Splits whose partials a merge loads per unrolled group: their loads are independent, so they
# are in flight together (one L2 round trip per group, not per split), while the arithmetic
# stays strictly sequential in split order. 8 x [rows, HEAD_PAD] fp32 fits the registers of
# the decode tiles.
MERGE_UNROLL = 8
# Start of the running max: finite, so rows that see only masked scores stay NaN-free.
_EMPTY_MAX = tl.constexpr(-1.0e30)


@triton.jit
def _merge_partials(part_ptr, m_ptr, l_ptr, prow, head, row_ok, n,
                    stride_pt, stride_ph, stride_mt, stride_mh,
                    HEAD_PAD: tl.constexpr, SPLITS_PAD: tl.constexpr, UNROLL: tl.constexpr):
    """out = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s over splits s < n (M = max_s m_s)
    for rows (partial row prow [R] int64, query head head [R]); returns [R, HEAD_PAD] fp32.

    The one merge of both split-KV paths (the fused last-arriving split and
    `_merge_splits_kernel`), so they agree bit for bit: the max is exact in any order, and the
    sums are explicit fmas in split order, independent of the tile layout and num_warps (a
    tl.sum over splits would reduce in a layout-dependent tree). Splits that contribute nothing
    (empty segments' (0, _EMPTY_MAX, 0), or s >= n) add fma(0, 0, x) = x. Loads are ".cg"
    (L2, not L1): in the fused path they read other CTAs' partials of this very launch."""
    offs_s = tl.arange(0, SPLITS_PAD)
    offs_d = tl.arange(0, HEAD_PAD)
    ml_row = prow * stride_mt + head * stride_mh                               # [R]
    acc_row = prow * stride_pt + head * stride_ph                              # [R]
    m_all = tl.load(m_ptr + ml_row[:, None] + offs_s[None, :],
                    mask=row_ok[:, None] & (offs_s < n)[None, :], other=float("-inf"),
                    cache_modifier=".cg")                                      # [R, SPLITS_PAD]
    m_max = tl.where(row_ok, tl.max(m_all, 1), 0.0)     # rows not merged: keep them NaN-free
    o = tl.zeros([prow.shape[0], HEAD_PAD], tl.float32)
    den = tl.zeros([prow.shape[0]], tl.float32)
    for s0 in range(0, n, UNROLL):
        for j in tl.static_range(UNROLL):
            s = s0 + j
            ok = row_ok & (s < n)
            m_s = tl.load(m_ptr + ml_row + s, mask=ok, other=float("-inf"), cache_modifier=".cg")
            l_s = tl.load(l_ptr + ml_row + s, mask=ok, other=0.0, cache_modifier=".cg")
            acc_s = tl.load(part_ptr + (acc_row + s * HEAD_PAD)[:, None] + offs_d[None, :],
                            mask=ok[:, None], other=0.0, cache_modifier=".cg")  # [R, HEAD_PAD]
            w = tl.math.exp2(m_s - m_max)
            o = tl.fma(acc_s, w[:, None], o)
            den = tl.fma(l_s, w, den)
    return o / tl.where(row_ok, den, 1.0)[:, None]


# m / l strides follow the split count (attention_kernel.py's _NO_SPECIALIZE says why they
# are not specialized).
@triton.jit(do_not_specialize=["num_reqs", "num_splits", "stride_mt", "stride_mh"],
            do_not_specialize_on_alignment=["out_ptr", "part_ptr", "m_ptr", "l_ptr", "qsl_ptr"])
def _merge_splits_kernel(out_ptr, part_ptr, m_ptr, l_ptr, qsl_ptr, num_reqs, num_splits,
                         stride_ot, stride_oh, stride_pt, stride_ph, stride_mt, stride_mh,
                         QPK: tl.constexpr, QPK_PAD: tl.constexpr, HEAD: tl.constexpr,
                         HEAD_PAD: tl.constexpr, SPLITS_PAD: tl.constexpr,
                         MERGE_UNROLL_: tl.constexpr, USE_PDL: tl.constexpr):
    """Two-kernel split-KV path: program (r, kv head) merges partial row r (token
    t = qsl[0] + r) for the query heads of that KV head, over all num_splits segments."""
    pdl_wait(USE_PDL)
    pdl_launch_dependents(USE_PDL)
    r = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    t = r + tl.load(qsl_ptr)
    if t >= tl.load(qsl_ptr + num_reqs):     # padding row: no partials were written
        return
    offs_h = tl.arange(0, QPK_PAD)
    offs_d = tl.arange(0, HEAD_PAD)
    head = kv_head * QPK + offs_h                                         # [QPK_PAD]
    row_ok = offs_h < QPK
    prow = tl.zeros([QPK_PAD], tl.int64) + r
    o = _merge_partials(part_ptr, m_ptr, l_ptr, prow, head, row_ok, num_splits,
                        stride_pt, stride_ph, stride_mt, stride_mh,
                        HEAD_PAD, SPLITS_PAD, MERGE_UNROLL_)              # [QPK_PAD, HEAD_PAD]
    tl.store(out_ptr + t * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
             o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & (offs_d < HEAD)[None, :])
