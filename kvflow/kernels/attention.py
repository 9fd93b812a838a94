"""Unified paged attention for varlen batches (prefill, chunked prefill with prefix, decode).

Design
------
One kernel, `_attention_kernel`, serves every request shape. A program owns
    (one q-block of one request) x (one KV head) x (one KV segment)
where a q-block is BLOCK_Q consecutive query tokens of a request, and the program's tile rows are
all (token, query head) pairs of that q-block and of the QPK = H / KV query heads sharing the KV
head (GQA packing): BLOCK_M = BLOCK_Q * QPK_PAD rows, row m = (token m // QPK_PAD, head m %
QPK_PAD). Each K/V tile is therefore loaded once per KV head group, not once per query head, and
decode with GQA still feeds the tensor cores with >= 16 rows.

Per KV tile (BLOCK_N tokens gathered through the block table; each token's D values are
contiguous) it runs flash-attention's online softmax in base 2: scores are multiplied by
scale * log2(e) (folded into one FMA with the max subtraction) and exponentiated with exp2;
both matmuls are tl.dot with fp32 accumulation. The KV loop is split in two: tiles that lie
entirely at or before the program's first query position need no mask at all (the bulk of the
work), the remaining (diagonal / tail) tiles apply the causal and length masks.

Mapping programs to requests without host data (CUDA-graph safe):
  * DIRECT: when BLOCK_Q >= max_query_len (decode, spec-decode, short chunks) every request is
    one q-block and grid row i serves request request_order[i] (an identity order when the
    caller gives none: one compiled variant for both, kernels/decode_order.py); the grid is [KV heads,
    rows, splits], heads fastest, so the programs dispatched together read all heads of the
    same cache slots (KVFLOW_ATTN_HEADS_FIRST=0: [rows, KV heads, splits]).
  * SEARCH: otherwise the q-blocks of the requests this launch serves (q_len >= max(1,
    min_q_len)) are numbered densely in request order, each request's from its last q-block
    to its first (under the causal mask the last carries the most KV tiles, so the heavy
    programs are dispatched first), and grid row w serves q-block w. A program finds its
    q-block by one vectorised prefix sum over query_start_loc (`_find_qblock`), before the PDL
    wait: those offsets are the step's input, not the previous kernel's output. The grid rows
    T // BLOCK_Q + P bound the count for P served requests (P <= num_reqs, and <= T //
    min_q_len); rows past the last q-block exit at once, without waiting, except row 0 of KV
    head 0, whose wait keeps the launch from completing before its predecessor. In a
    mixed-step graph's prefill launch (split_decodes) most of the R >= T request rows are
    decodes or padding: they get no q-block, and the few real programs run first.
  Actual lengths are always read from query_start_loc / seq_lens; the host ints max_query_len /
  max_seq_len only choose the configuration, so upper bounds (as a graph runner passes) are
  correct. Requests with q_len 0 (padding) do nothing.

Split-KV (flash-decoding): when the grid above would not fill the GPU (small batch, few KV
heads) and contexts are long, grid dim 2 = num_splits segments partition each program's KV
range into n_live = cdiv(num_tiles, per_seg) non-empty segments of per_seg = cdiv(num_tiles,
num_splits) tiles; each writes an unnormalised fp32 partial (acc, running max m, sum l) and the
partials are merged, out = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s (M = max_s m_s), by
`_merge_partials` (kvflow/kernels/attention_merge.py): exact max, then fmas strictly in split
order (deterministic and independent of tile layout / num_warps). This works for any q_len,
so chunked prefill of one request over a long prefix is split as well. Two ways to merge
(AttentionConfig.fused_merge):
  * fused (default): no second launch (at decode batch 1 that launch is ~1.8 us of a ~6 us
    layer). After storing its partial, a segment program takes a ticket: CTA barrier, then one
    atomic add (acq_rel, gpu scope) on counter [grid row, KV head] of a persistent zeroed int32
    buffer (_split_counters). The program that draws n_live - 1 arrived last: barrier, it loads
    the n_live partials (".cg", L2) in split order, writes the output and resets the counter to
    0, so the next launch and every CUDA-graph replay start clean. Nobody waits on anybody, so
    the protocol cannot deadlock whatever the CTA residency. Segments >= n_live (the split count
    comes from max_seq_len, an upper bound under CUDA graphs, so short contexts leave most of
    them empty) exit right after reading the lengths: no partial, no ticket. With n_live == 1
    the one segment normalises in registers with the same arithmetic (no partial, no ticket).
  * two kernels: every segment writes a partial (empty ones (0, -1e30, 0), which weigh
    exactly nothing) and `_merge_splits_kernel` (grid [rows, KV]) merges all num_splits.
  Same result bit for bit (tests/test_attention_fused_merge.py); kept for comparison and as a
  fallback. choose_config fuses for decode-like tiles (<= 64 rows) only: 128-row prefill
  tiles spill much more with the merge's loads. Split-KV is only chosen when the grid has
  < #SMs programs, so the fused merge's serial tail (one program per q-block merges) is never
  on a large grid's critical path.
PDL (kvflow/kernels/pdl.py): both kernels wait for their predecessor in every program before
reading the query, the new tokens' K/V or the partials, then let their dependents launch.
Decode-like launches (PREFETCH) read the lengths, the block table and the program's first KV
tile before the wait, when that tile lies wholly before the step's new tokens: those were
written by kernels that completed before the predecessor's own wait returned (see the kernel).

Mixed batches: with `num_decode_reqs` (decodes ordered first, as the runner schedules them) the
decode requests and the rest run as two launches over slices of the same metadata tensors, so
decode rows get 16-row tiles instead of 128-row prefill tiles that are mostly padding.

Tile configurations: kvflow/kernels/attention_config.py (`choose_config`).
Chunked local attention: with `seq_starts` (virtual batches of
kvflow/attention/local_attention.py) a request's KV range starts at seq_starts[i] < block_size
instead of 0; the tile holding it is masked, tiles before it skipped (HAS_STARTS constexpr, so
the plain path compiles exactly as before).
Invariants: K/V of every context position < seq_len has been written; block_table entries past
the request's blocks may be anything (they are never dereferenced unmasked); KV cache strides
are shared by K and V and the head dim is contiguous; block * block_stride and token-row
offsets are computed in int64. Split-KV launches on one device are stream-ordered (they share
its ticket counters; kvflow runs the model, eager or as a CUDA graph, on one stream).
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from kvflow import envs
from kvflow.kernels.attention_config import (
    MAX_SPLITS,
    AttentionConfig,
    choose_config,
    device_limits,
)
from kvflow.kernels.attention_merge import (
    _EMPTY_MAX,
    MERGE_UNROLL,
    _merge_partials,
    _merge_splits_kernel,
)
from kvflow.kernels.decode_order import identity_order
from kvflow.kernels.pdl import pdl_launch, pdl_launch_dependents, pdl_wait
from kvflow.kernels.tickets import TicketCounters

LOG2E = 1.4426950408889634
# Decode-like launches load their first KV tile before the PDL wait (see _attention_kernel).
# KVFLOW_ATTN_PREFETCH=0 turns it off (read once, at import).
_PREFETCH = envs.attn_prefetch()


@triton.jit
def _find_qblock(qsl_ptr, num_reqs, row, min_q_len, BLOCK_Q: tl.constexpr, SCAN: tl.constexpr):
    """Grid row -> (request, q-block) under the dense numbering of the module doc: request i
    owns rows [before_i, before_i + n_i), n_i = cdiv(q_len_i, BLOCK_Q) if q_len_i >= max(1,
    min_q_len) else 0, its q-blocks from last to first. A row past the last q-block gets
    (0, -1). query_start_loc is read SCAN requests at a time (one chunk up to SCAN requests)."""
    lo_len = tl.maximum(min_q_len, 1)
    req = tl.full([], -1, tl.int32)
    q_block = tl.full([], -1, tl.int32)
    before = tl.full([], 0, tl.int32)
    for c0 in range(0, num_reqs, SCAN):
        r = c0 + tl.arange(0, SCAN)
        ok = r < num_reqs
        first = tl.load(qsl_ptr + r, mask=ok, other=0)
        q_len = tl.load(qsl_ptr + r + 1, mask=ok, other=0) - first
        n = tl.where(ok & (q_len >= lo_len), (q_len + BLOCK_Q - 1) // BLOCK_Q, 0)   # [SCAN]
        end = tl.cumsum(n, 0) + before
        hit = (end - n <= row) & (row < end)
        req = tl.maximum(req, tl.max(tl.where(hit, r, -1), 0))
        q_block = tl.maximum(q_block, tl.max(tl.where(hit, end - 1 - row, -1), 0))
        before += tl.sum(n, 0)
    return tl.maximum(req, 0), q_block


@triton.jit
def _tile_rows(bt_row, start, kpos, seq_len, ok, stride_cb, stride_ct,
               BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr):
    """Cache row offsets [BLOCK_N] (int64) of the tile's tokens kpos = start + arange(BLOCK_N),
    through the block table. `ok` (scalar) gates the table reads (the prefetch's condition)."""
    if BLOCK_SIZE % BLOCK_N == 0:
        # The tile lies in one physical block: one scalar block-table read. `start` < seq_len
        # always, so the entry is valid even for masked tiles.
        blk = tl.load(bt_row + start // BLOCK_SIZE, mask=ok, other=0).to(tl.int64)
        return blk * stride_cb + ((start % BLOCK_SIZE) + tl.arange(0, BLOCK_N)) * stride_ct
    # The tile spans BLOCK_N / BLOCK_SIZE blocks: one vector read of their entries.
    if MASKED:
        blk = tl.load(bt_row + kpos // BLOCK_SIZE, mask=ok & (kpos < seq_len), other=0)
    else:
        blk = tl.load(bt_row + kpos // BLOCK_SIZE, mask=ok, other=0)
    return blk.to(tl.int64) * stride_cb + (kpos % BLOCK_SIZE) * stride_ct


@triton.jit
def _softmax_step(s, m_i, l_i, kpos, q_pos, seq_len, kv_lo, qk_scale, MASKED: tl.constexpr):
    """Online-softmax update for scores s [BLOCK_M, BLOCK_N]: (p, alpha, m_new, l_new)."""
    if MASKED:
        keep = (kpos[None, :] <= q_pos[:, None]) & ((kpos < seq_len) & (kpos >= kv_lo))[None, :]
        s = tl.where(keep, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)                   # qk_scale > 0
    p = tl.math.exp2(s * qk_scale - m_new[:, None])                     # one FMA + ex2
    alpha = tl.math.exp2(m_i - m_new)
    return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def _attend_tile(acc, m_i, l_i, q, k_base, v_base, bt_row, tile, q_pos, seq_len, kv_lo,
                 qk_scale, stride_cb, stride_ct,
                 BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, HEAD: tl.constexpr,
                 HEAD_PAD: tl.constexpr, MASKED: tl.constexpr, PREC: tl.constexpr):
    """One online-softmax step over KV tile `tile` (BLOCK_N context tokens).

    acc [BLOCK_M, HEAD_PAD] fp32, m_i/l_i [BLOCK_M] fp32 (m in log2 units), q [BLOCK_M, HEAD_PAD].
    MASKED=False promises every token of the tile is in [kv_lo, seq_len) and <= every row's
    q_pos. kv_lo: the request's first attended position (seq_starts; 0 without).
    """
    offs_d = tl.arange(0, HEAD_PAD)
    start = tile * BLOCK_N
    kpos = start + tl.arange(0, BLOCK_N)                                # [BLOCK_N]
    row_off = _tile_rows(bt_row, start, kpos, seq_len, True, stride_cb, stride_ct,
                         BLOCK_SIZE, BLOCK_N, MASKED)
    kv_off = row_off[:, None] + offs_d[None, :]                        # [BLOCK_N, HEAD_PAD]

    if MASKED:
        # Positions >= seq_len may hold garbage (even NaN): keep them out of both matmuls.
        kv_mask = (kpos < seq_len)[:, None] & (offs_d < HEAD)[None, :]
        k = tl.load(k_base + kv_off, mask=kv_mask, other=0.0)
    elif HEAD != HEAD_PAD:
        k = tl.load(k_base + kv_off, mask=(offs_d < HEAD)[None, :], other=0.0)
    else:
        k = tl.load(k_base + kv_off)
    # An fp8 cache holds K / k_scale: upcast exactly (e4m3 fits in bf16/fp16/fp32); the scale
    # is folded into qk_scale by the caller.
    s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=PREC)       # [BLOCK_M, BLOCK_N]
    p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i, kpos, q_pos, seq_len, kv_lo, qk_scale,
                                       MASKED)
    if MASKED:
        v = tl.load(v_base + kv_off, mask=kv_mask, other=0.0)
    elif HEAD != HEAD_PAD:
        v = tl.load(v_base + kv_off, mask=(offs_d < HEAD)[None, :], other=0.0)
    else:
        v = tl.load(v_base + kv_off)
    acc = tl.dot(p.to(q.dtype), v.to(q.dtype), acc * alpha[:, None], input_precision=PREC)
    return acc, m_i, l_i


@triton.jit
def _prefetch_tile(k_base, v_base, bt_row, tile, ok, stride_cb, stride_ct,
                   BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, HEAD: tl.constexpr,
                   HEAD_PAD: tl.constexpr):
    """K and V of a tile wholly before the step's new tokens, loaded only where `ok`
    (otherwise zeros and no memory access): issued before the PDL wait."""
    offs_d = tl.arange(0, HEAD_PAD)
    start = tile * BLOCK_N
    kpos = start + tl.arange(0, BLOCK_N)
    row_off = _tile_rows(bt_row, start, kpos, 0, ok, stride_cb, stride_ct,
                         BLOCK_SIZE, BLOCK_N, False)
    kv_off = row_off[:, None] + offs_d[None, :]
    mask = ok & (offs_d < HEAD)[None, :]
    return (tl.load(k_base + kv_off, mask=mask, other=0.0),
            tl.load(v_base + kv_off, mask=mask, other=0.0))


@triton.jit
def _attend_loaded(acc, m_i, l_i, q, k, v, qk_scale, PREC: tl.constexpr):
    """_attend_tile's step for an unmasked tile whose K and V are already loaded."""
    s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=PREC)
    p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i, 0, 0, 0, 0, qk_scale, False)
    acc = tl.dot(p.to(q.dtype), v.to(q.dtype), acc * alpha[:, None], input_precision=PREC)
    return acc, m_i, l_i


# Batch-dependent arguments are not specialized: a mixed batch's prefill launch receives slices
# (qsl[nd:], seq_lens[nd:], block_table[nd:], query[t0:]) whose 16-byte alignment and counts
# change with the number of decodes nd; specializing on them compiled a new variant for many
# step shapes (about a second each on a cold machine, inside the first requests). The block
# table's row stride is the widest request's block count this step, equally arbitrary, and so
# are the split partials' m / l strides (H * S, S: they follow the split count, which is picked
# per step; specialized, every split kernel compiled twice on a cold start, ~1.5 s each). Without
# an fp8 cache the k/v scale pointers are seq_lens slices too (unread placeholders).
_NO_SPECIALIZE = dict(do_not_specialize=["num_reqs", "num_splits", "min_q_len", "stride_bt",
                                         "stride_mt", "stride_mh"],
                      do_not_specialize_on_alignment=["q_ptr", "out_ptr", "part_ptr", "m_ptr",
                                                      "l_ptr", "cnt_ptr", "qsl_ptr",
                                                      "seq_lens_ptr", "bt_ptr", "starts_ptr",
                                                      "k_scale_ptr", "v_scale_ptr"])


@triton.jit(**_NO_SPECIALIZE)
def _attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, part_ptr, m_ptr, l_ptr, cnt_ptr,
    qsl_ptr, seq_lens_ptr, bt_ptr, starts_ptr, k_scale_ptr, v_scale_ptr,
    qk_scale, num_reqs, num_splits,
    min_q_len,                       # requests with fewer query tokens are another launch's
    stride_qt, stride_qh,            # query [T, H, D]
    stride_ot, stride_oh,            # out [T, H, D]
    stride_pt, stride_ph,            # split partial acc [rows, H, S, HEAD_PAD]
    stride_mt, stride_mh,            # split partial m / l [rows, H, S]
    stride_cb, stride_ct, stride_ch,  # K and V caches [num_blocks, block_size, KV, D]
    stride_bt,                       # block_table [B, max_blocks]
    QPK: tl.constexpr, QPK_PAD: tl.constexpr, HEAD: tl.constexpr, HEAD_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr, DIRECT: tl.constexpr, SPLIT: tl.constexpr, PREC: tl.constexpr,
    HAS_STARTS: tl.constexpr, KV_FP8: tl.constexpr, FUSED_MERGE: tl.constexpr,
    SPLITS_PAD: tl.constexpr, MERGE_UNROLL_: tl.constexpr, PREFETCH: tl.constexpr,
    USE_PDL: tl.constexpr, order_ptr=None, HAS_ORDER: tl.constexpr = False,
    HEADS_FIRST: tl.constexpr = False, WAIT_ONE: tl.constexpr = False,
):
    if HEADS_FIRST:
        # DIRECT only: grid [KV, rows, splits], KV heads fastest, so the programs dispatched
        # together read all heads of the same cache rows ([block, slot, KV, D]: one slot's
        # heads are adjacent) instead of one head's 1/KV of many rows.
        kv_head = tl.program_id(0)
        row = tl.program_id(1)
        num_kv = tl.num_programs(0)
    else:
        kv_head = tl.program_id(1)
        row = tl.program_id(0)
        num_kv = tl.num_programs(1)
    seg = tl.program_id(2)
    if WAIT_ONE:
        # The previous kernel is the prompt launch of a split_decodes pair: it writes only its
        # own requests' rows and reads nothing this launch writes, and the query and new K/V
        # this launch reads come from the kernel before it, settled once this launch starts
        # (kernels/pdl.py). So no program that works waits for it: an extra last grid row
        # only waits, which keeps this launch from completing before the prompt launch, and
        # the others run beside the prompt launch's few long programs.
        if row == tl.num_programs(1 if HEADS_FIRST else 0) - 1:
            pdl_wait(USE_PDL)
            return
    if HAS_ORDER:
        # DIRECT only: grid row i serves request order[i] (longest first, so the long programs
        # are dispatched first; written by the step's input kernels, like the lengths).
        row_req = tl.load(order_ptr + row)
    else:
        row_req = row
    if PREFETCH:
        # Decode-like launches (DIRECT, no seq_starts): this program's first KV tile, when it
        # lies wholly before the step's new tokens, is loaded before the PDL wait, so its DRAM
        # round trip overlaps the previous kernel (the q/k rotary + cache write). Safe because
        # only the query and the new tokens' K/V come from the previous kernel: the lengths and
        # block table were written by the step's input copy, and the cached K/V of earlier
        # positions by earlier steps -- kernels that completed before the previous kernel's
        # own wait returned, hence before this kernel could start (kernels/pdl.py).
        p_req = row_req
        p_q0 = tl.load(qsl_ptr + p_req)
        p_qlen = tl.load(qsl_ptr + p_req + 1) - p_q0
        p_ctx = tl.load(seq_lens_ptr + p_req) - p_qlen
        p_tiles = tl.cdiv(p_ctx + tl.minimum(p_qlen, BLOCK_Q), BLOCK_N)
        if SPLIT:
            p_t0 = seg * tl.cdiv(p_tiles, num_splits)
        else:
            p_t0 = 0
        pre_ok = (p_qlen > 0) & ((p_t0 + 1) * BLOCK_N <= p_ctx)
        k_pre, v_pre = _prefetch_tile(k_cache_ptr + kv_head * stride_ch,
                                      v_cache_ptr + kv_head * stride_ch,
                                      bt_ptr + p_req.to(tl.int64) * stride_bt, p_t0, pre_ok,
                                      stride_cb, stride_ct, BLOCK_SIZE, BLOCK_N, HEAD, HEAD_PAD)
    # A program with nothing to do exits before the wait (it reads only the step's inputs up
    # to here), so it holds no slot while the previous kernel runs; one program always waits,
    # which keeps this launch from completing before its predecessor.
    may_skip_wait = (row != 0) | (kv_head != 0) | (seg != 0)
    if not DIRECT:
        req, q_block = _find_qblock(qsl_ptr, num_reqs, row, min_q_len, BLOCK_Q, 256)
        if (q_block < 0) & may_skip_wait:
            return
    if PREFETCH:
        if ((p_qlen == 0) | (p_qlen > BLOCK_Q) | (p_qlen < min_q_len)) & may_skip_wait:
            return
    # Everything else (the query, the new tokens' K/V) may be written by the previous kernel:
    # wait, in every program that may read or write anything, before its first such access
    # (WAIT_ONE: the extra row above waits instead).
    if not WAIT_ONE:
        pdl_wait(USE_PDL)
    pdl_launch_dependents(USE_PDL)
    if DIRECT:
        req = row_req
        q_block = 0
    if PREFETCH:
        # The lengths were read before the wait (same request: DIRECT); reading them again
        # would put one more L2 round trip between the wait and the query load.
        q_start = p_q0
        q_len = p_qlen
        seq_len = p_ctx + p_qlen
    else:
        q_start = tl.load(qsl_ptr + req)
        q_len = tl.load(qsl_ptr + req + 1) - q_start
        seq_len = tl.load(seq_lens_ptr + req)
    # Gap program or padding request; or a request the other launch of a split_decodes pair
    # serves: shorter than min_q_len (the prefill launch skips decodes), or longer than a
    # DIRECT q-block (the decode launch skips prefills; never the case otherwise, as DIRECT
    # launches require BLOCK_Q >= every query length).
    skip = (q_block < 0) | (q_block * BLOCK_Q >= q_len) | (q_len < min_q_len)
    if DIRECT:
        skip = skip | (q_len > BLOCK_Q)
    if skip:
        return
    ctx_len = seq_len - q_len           # context tokens before this request's first query

    # KV range of this q-block: [kv_lo, kv_end), tiles [t0, t1) of it for this segment.
    first_pos = ctx_len + q_block * BLOCK_Q
    kv_end = ctx_len + tl.minimum(q_len, (q_block + 1) * BLOCK_Q)
    num_tiles = tl.cdiv(kv_end, BLOCK_N)
    if SPLIT:
        per_seg = tl.cdiv(num_tiles, num_splits)
        n_live = tl.cdiv(num_tiles, per_seg)   # segments with tiles: [0, n_live)
        t0 = seg * per_seg
        t1 = tl.minimum(t0 + per_seg, num_tiles)
        if FUSED_MERGE:
            # An empty segment (the split count comes from a max_seq_len upper bound; short
            # contexts leave most segments empty) neither stores a partial nor takes a ticket:
            # every program of this q-block derives the same n_live, so the merge counts and
            # reads exactly the segments < n_live.
            if seg >= n_live:
                return
    else:
        t0 = 0
        t1 = num_tiles

    # Rows: (query token, head of the KV group); see module docstring.
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_PAD)
    tok_in_block = offs_m // QPK_PAD
    q_tok = q_block * BLOCK_Q + tok_in_block                   # index within the request
    head = kv_head * QPK + offs_m % QPK_PAD
    row_ok = (q_tok < q_len) & (offs_m % QPK_PAD < QPK) & (tok_in_block < BLOCK_Q)
    q_pos = ctx_len + q_tok                                    # absolute position
    tok = (q_start + q_tok).to(tl.int64)                       # row of the flattened batch
    d_ok = offs_d < HEAD
    q = tl.load(q_ptr + tok[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)   # [BLOCK_M, HEAD_PAD]

    # Tiles in [head_end, num_full) need no mask; the (at most one) tile holding kv_lo and the
    # diagonal / tail tiles do; tiles wholly before kv_lo are skipped. kv_lo (local-attention
    # virtual batches) is < block_size and <= every query position of the request, so every
    # valid row still sees a key.
    if HAS_STARTS:
        kv_lo = tl.load(starts_ptr + req)
    else:
        kv_lo = 0
    num_full = (first_pos + 1) // BLOCK_N

    if KV_FP8:
        # Scales are read on the device (not baked in), so CUDA graphs see reloaded scales.
        qk_scale = qk_scale * tl.load(k_scale_ptr)
    bt_row = bt_ptr + req.to(tl.int64) * stride_bt
    k_base = k_cache_ptr + kv_head * stride_ch
    v_base = v_cache_ptr + kv_head * stride_ch
    m_i = tl.full([BLOCK_M], _EMPTY_MAX, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_PAD], tl.float32)
    if HAS_STARTS:
        lo_tile = kv_lo // BLOCK_N                 # first tile with an attended key
        head_end = tl.cdiv(kv_lo, BLOCK_N)         # first tile wholly at or after kv_lo
        for t in range(tl.maximum(t0, lo_tile), tl.minimum(t1, head_end)):
            acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, k_base, v_base, bt_row, t, q_pos,
                                         seq_len, kv_lo, qk_scale, stride_cb, stride_ct,
                                         BLOCK_SIZE, BLOCK_N, HEAD, HEAD_PAD, True, PREC)
        t_mid = tl.maximum(t0, head_end)
        t_tail = tl.maximum(t_mid, num_full)
    else:
        t_mid = t0
        t_tail = tl.maximum(t0, num_full)
    if PREFETCH:
        # pre_ok: tile t0 == t_mid lies before ctx_len <= every query position, so it is one of
        # the unmasked tiles [t_mid, num_full) and inside this segment [t0, t1).
        if pre_ok:
            acc, m_i, l_i = _attend_loaded(acc, m_i, l_i, q, k_pre, v_pre, qk_scale, PREC)
            t_mid = t_mid + 1
    for t in range(t_mid, tl.minimum(t1, num_full)):
        acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, k_base, v_base, bt_row, t, q_pos,
                                     seq_len, kv_lo, qk_scale, stride_cb, stride_ct, BLOCK_SIZE,
                                     BLOCK_N, HEAD, HEAD_PAD, False, PREC)
    for t in range(t_tail, t1):
        acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, k_base, v_base, bt_row, t, q_pos,
                                     seq_len, kv_lo, qk_scale, stride_cb, stride_ct, BLOCK_SIZE,
                                     BLOCK_N, HEAD, HEAD_PAD, True, PREC)

    if KV_FP8:
        acc = acc * tl.load(v_scale_ptr)      # P @ (V / v_scale) * v_scale; linear in acc
    if SPLIT:
        if FUSED_MERGE and n_live == 1:
            # The only segment: merge it in registers (the same arithmetic as
            # _merge_partials with one split, so the result does not depend on the path),
            # no partial, no ticket.
            w = tl.math.exp2(m_i - tl.where(row_ok, m_i, 0.0))
            o = tl.fma(acc, w[:, None], 0.0)
            den = tl.fma(l_i, w, 0.0)
            o = o / tl.where(row_ok, den, 1.0)[:, None]
            o_ptrs = (out_ptr + tok[:, None] * stride_ot + head[:, None] * stride_oh
                      + offs_d[None, :])
            tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty),
                     mask=row_ok[:, None] & d_ok[None, :])
        else:
            # Unnormalised partial; empty segments (two-kernel path only) store
            # (0, _EMPTY_MAX, 0). Partial rows are numbered from this launch's first token,
            # qsl[0].
            prow = tok - tl.load(qsl_ptr)
            p_ptrs = (part_ptr + prow[:, None] * stride_pt + head[:, None] * stride_ph
                      + seg * HEAD_PAD + offs_d[None, :])
            tl.store(p_ptrs, acc, mask=row_ok[:, None])
            ml_off = prow * stride_mt + head * stride_mh + seg
            tl.store(m_ptr + ml_off, m_i, mask=row_ok)
            tl.store(l_ptr + ml_off, l_i, mask=row_ok)
            if FUSED_MERGE:
                # Ticket: the segment that arrives last merges. The CTA barrier orders every
                # thread's partial stores before the (single-thread) release of the atomic;
                # its acquire side, in the last arriver, orders the merge's loads after all
                # the other segments' releases (CUTLASS's semaphore pattern). Nobody waits for
                # anybody, so it cannot deadlock whatever the residency or launch order.
                tl.debug_barrier()
                cnt = cnt_ptr + row * num_kv + kv_head
                ticket = tl.atomic_add(cnt, 1, sem="acq_rel", scope="gpu")
                if ticket == n_live - 1:
                    tl.debug_barrier()    # the acquire (one thread) before every thread's loads
                    o = _merge_partials(part_ptr, m_ptr, l_ptr, prow, head, row_ok, n_live,
                                        stride_pt, stride_ph, stride_mt, stride_mh,
                                        HEAD_PAD, SPLITS_PAD, MERGE_UNROLL_)
                    o_ptrs = (out_ptr + tok[:, None] * stride_ot + head[:, None] * stride_oh
                              + offs_d[None, :])
                    tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty),
                             mask=row_ok[:, None] & d_ok[None, :])
                    # All n_live tickets of this launch are taken: back to 0 for the next
                    # launch and every CUDA-graph replay (kernel completion publishes it).
                    tl.store(cnt, 0)
    else:
        # Every valid row saw key 0 (position 0 <= its position), so l_i > 0; rows that are
        # not stored may have l_i == 0.
        o = acc * (1.0 / tl.where(l_i > 0.0, l_i, 1.0))[:, None]
        o_ptrs = out_ptr + tok[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


# ---------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------
class _Part(NamedTuple):
    """One launch of unified_attention: requests [r0, r1), a bound on their query tokens, the
    token count its tiles are chosen for, a bound on their query lengths, the query length
    below which a request is left to another launch, and the dispatch order (DIRECT only)."""
    r0: int
    r1: int
    num_tokens: int
    config_tokens: int
    max_query_len: int
    min_q_len: int
    order: Optional[torch.Tensor]
    wait_one: bool = False
    max_served: Optional[int] = None     # a bound on the requests it serves


def unified_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                      query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                      block_table: torch.Tensor, max_query_len: int, max_seq_len: int,
                      scale: float, out: Optional[torch.Tensor] = None,
                      config: Optional[AttentionConfig] = None,
                      num_splits: Optional[int] = None,
                      num_decode_reqs: int = 0,
                      seq_starts: Optional[torch.Tensor] = None,
                      k_scale: Optional[torch.Tensor] = None,
                      v_scale: Optional[torch.Tensor] = None,
                      fused_merge: Optional[bool] = None,
                      request_order: Optional[torch.Tensor] = None,
                      split_decodes: bool = False,
                      max_prompt_reqs: Optional[int] = None) -> torch.Tensor:
    """Causal paged attention of a varlen batch; semantics of `ref_paged_attention`.

    query [T, H, D] (head dim contiguous; T may include padding rows past query_start_loc[-1],
    whose output is unspecified); key_cache/value_cache [num_blocks, block_size, KV, D] (same
    strides); query_start_loc [B + 1] int32; seq_lens [B] int32; block_table [B, max_blocks]
    int32. max_query_len / max_seq_len may be upper bounds. num_splits forces the split-KV
    segment count (1 disables it); config overrides the heuristics (one launch).
    num_decode_reqs = n > 0 promises the first n requests have q_len <= 1 (decodes ordered
    first): a mixed batch then runs as two launches, decode tiles for those n and prefill tiles
    for the rest, instead of 128-row prefill tiles that are 1/QPK_PAD full on decode rows.
    split_decodes does the same where the decode count is not a host int (a CUDA graph of
    mixed steps): both launches span every request, the decode launch's programs skip
    requests with q_len > 1 and the prefill launch's skip those with q_len <= 1.
    max_prompt_reqs (split_decodes only; the caller guarantees it): at most this many
    requests have q_len > 1. It bounds the prefill launch's grid, which is otherwise sized for
    T // 2 two-token prompts.
    seq_starts [B] int32 (optional; chunked local attention's virtual batches): request i
    attends only to positions >= seq_starts[i] (< block_size, <= its first query position).
    An fp8 (float8_e4m3fn) cache holds K / k_scale and V / v_scale; k_scale / v_scale are
    float32 scalar tensors (default 1.0).
    fused_merge overrides AttentionConfig.fused_merge (split-KV merge in the attention launch,
    or the separate merge kernel; for tests and benchmarks).
    request_order [B] int32 (optional; a permutation of 0..B-1): the order in which a
    one-program-per-request launch (a decode batch) dispatches the requests' programs, e.g.
    longest context first (with split_decodes, it orders the decode launch). The result does
    not depend on it; other launches ignore it.
    Returns out [T, H, D].
    """
    T, H, D = query.shape
    _, block_size, KV, Dk = key_cache.shape
    assert Dk == D and H % KV == 0, (query.shape, key_cache.shape)
    assert key_cache.stride() == value_cache.stride()
    assert query.stride(2) == 1 and key_cache.stride(3) == 1
    B = seq_lens.shape[0]
    if out is None:
        out = torch.empty_like(query)
    if T == 0 or B == 0:
        return out
    num_sms, smem = device_limits(query.device)
    parts = [_Part(0, B, T, T, max_query_len, 0, request_order)]
    if config is None and max_query_len > 1 and 0 < num_decode_reqs < B:
        # A slice's query_start_loc stays absolute. The decode slice has <= nd tokens; the
        # rest keeps T as its token bound (decodes with q_len 0 would leave it > T - nd).
        nd = num_decode_reqs
        parts = [_Part(0, nd, nd, nd, 1, 0, None), _Part(nd, B, T, T, max_query_len, 0, None)]
    elif (config is None and max_query_len > 1 and split_decodes
          and not choose_config(T, B, H, KV, D, max_query_len, max_seq_len, query.dtype,
                                num_sms, num_splits, smem).direct):
        # Only where the batch would take 128-row prefill tiles: a short-chunk (DIRECT) tile
        # wastes less on a decode than a second launch costs a small step. The decode tokens
        # may sit anywhere in [0, T): T bounds the decode launch's tokens (its split partials
        # are indexed by token), B sizes its tiles as a decode step's.
        parts = [_Part(0, B, T, B, 1, 0, request_order),
                 _Part(0, B, T, T, max_query_len, 2, None, max_served=max_prompt_reqs)]
    cfgs = []
    for p in parts:
        cfg = config or choose_config(p.config_tokens, p.r1 - p.r0, H, KV, D, p.max_query_len,
                                      max_seq_len, query.dtype, num_sms, num_splits, smem)
        if fused_merge is not None and fused_merge != cfg.fused_merge:
            cfg = dataclasses.replace(cfg, fused_merge=fused_merge)
        if p.min_q_len and cfg.num_splits > 1 and not cfg.fused_merge:
            # The two-kernel merge walks every token row, the skipped decodes' too, whose
            # partials this launch never writes. (A mixed-step graph's prefill grid has
            # T / BLOCK_Q + R + 1 rows per KV head: it fills the GPU unless KV heads are few.)
            cfg = dataclasses.replace(cfg, num_splits=1)
        cfgs.append(cfg)
    if (len(parts) == 2 and parts[1].min_q_len > 1 and envs.attn_overlap_prompts()
            and all(c.num_splits == 1 for c in cfgs)):
        # The prompt launch's few programs each walk a whole prefix (~15-30 us a layer,
        # latency-bound); launched first, with the decode launch's programs beside them, that
        # time hides under the decodes' KV reads. Unsplit launches only: split ones share the
        # ticket counters (_SPLIT_COUNTERS) and must not run at once.
        parts = [parts[1], parts[0]._replace(wait_one=True)]
        cfgs = cfgs[::-1]
    for p, cfg in zip(parts, cfgs):
        r0, r1 = p.r0, p.r1
        _launch(query, key_cache, value_cache, out, query_start_loc[r0:r1 + 1],
                seq_lens[r0:r1], block_table[r0:r1], p.num_tokens, p.max_query_len, scale, cfg,
                None if seq_starts is None else seq_starts[r0:r1], k_scale, v_scale,
                p.order, p.min_q_len, p.wait_one, p.max_served)
    return out


# Split-KV tickets (kernels/tickets.py): one int32 counter per (grid row, KV head) of a
# fused-merge launch. The decode graphs' warm-up runs (outside capture) grow the buffer to what
# their capture needs. 4096 (16 KB): heuristic split launches have < #SMs + KV rows x heads.
_SPLIT_COUNTERS = TicketCounters(min_size=4096)


def _split_counters(device: torch.device, n: int) -> torch.Tensor:
    buf = _SPLIT_COUNTERS.get(device, n)
    if buf is None:
        raise RuntimeError(
            f"split-KV attention needs {n} ticket counters on {device} but they would have to "
            "be allocated during CUDA-graph capture; run the same shape once before capturing "
            "the CUDA graph (or use fused_merge=False)")
    return buf


def _launch(query, key_cache, value_cache, out, query_start_loc, seq_lens, block_table,
            num_tokens: int, max_query_len: int, scale: float, cfg: AttentionConfig,
            seq_starts: Optional[torch.Tensor] = None,
            k_scale: Optional[torch.Tensor] = None,
            v_scale: Optional[torch.Tensor] = None,
            request_order: Optional[torch.Tensor] = None, min_q_len: int = 0,
            wait_one: bool = False, max_served: Optional[int] = None) -> None:
    """One attention launch (+ merge) over the requests of these (possibly sliced) tensors;
    num_tokens bounds their query token count (qsl[-1] - qsl[0]) and sizes the split-KV
    partials. Requests with fewer than min_q_len query tokens are skipped; max_served bounds
    the number of the others (SEARCH grids). wait_one: no working program waits for the
    previous kernel; one extra grid row only waits (WAIT_ONE in the kernel)."""
    T, H, D = query.shape
    _, block_size, KV, _ = key_cache.shape
    B = seq_lens.shape[0]
    qpk = H // KV
    assert cfg.block_m >= cfg.block_q * triton.next_power_of_2(qpk)
    assert not cfg.direct or cfg.block_q >= max_query_len
    head_pad = triton.next_power_of_2(D)
    # Dense q-blocks (module doc): at most num_tokens // block_q + P for P served requests.
    # Gap rows are not free: each finds no q-block (a scan of query_start_loc) and exits, but
    # holds the launch's shared memory meanwhile (two 64-row prefill programs a SM), and a
    # dependent launch starts only after every program has. A mixed-step graph's prompt
    # launch with one prompt beside 150 decodes (T = 320): 1440 programs, 88 working; bounded
    # by max_served = 4, 192 programs and the pair 10 us (6%) shorter, H200
    # (benchmarks/mixed_prompt_grid_probe.py).
    served = min(B, num_tokens // max(1, min_q_len))
    if max_served is not None:
        served = min(served, max_served)
    grid0 = B if cfg.direct else max(1, num_tokens // cfg.block_q + served)
    grid0 += wait_one              # its waiting row (WAIT_ONE in the kernel)
    split = cfg.num_splits > 1
    # fp32: 3xTF32 on the tensor cores (about fp32 accuracy); "ieee" would use FMA loops that
    # spill heavily at these tile sizes. Irrelevant for fp16/bf16.
    prec = "tf32x3" if query.dtype == torch.float32 else "tf32"
    common = dict(QPK=qpk, QPK_PAD=triton.next_power_of_2(qpk), HEAD=D, HEAD_PAD=head_pad,
                  BLOCK_SIZE=block_size, BLOCK_M=cfg.block_m, BLOCK_Q=cfg.block_q,
                  BLOCK_N=cfg.block_n, DIRECT=cfg.direct, SPLIT=split, PREC=prec,
                  HAS_STARTS=seq_starts is not None,
                  KV_FP8=key_cache.dtype == torch.float8_e4m3fn,
                  SPLITS_PAD=MAX_SPLITS, MERGE_UNROLL_=MERGE_UNROLL,
                  PREFETCH=(_PREFETCH and cfg.direct and seq_starts is None
                            and cfg.block_m <= 64),
                  num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if common["KV_FP8"]:
        one = None
        if k_scale is None or v_scale is None:
            one = torch.ones((), dtype=torch.float32, device=query.device)
        scales = (k_scale if k_scale is not None else one, v_scale if v_scale is not None else one)
    else:
        scales = (seq_lens, seq_lens)      # unread placeholders
    qk_scale = scale * LOG2E
    cache_strides = (key_cache.stride(0), key_cache.stride(1), key_cache.stride(2))
    pdl = pdl_launch(query.device)
    order = {}
    if cfg.direct:
        if request_order is None:
            # One kernel variant for ordered and unordered launches (decode_order.py).
            request_order = identity_order(query.device, B)
        if request_order is not None:
            assert request_order.shape == (B,), (request_order.shape, B)
            order = dict(order_ptr=request_order, HAS_ORDER=True)
    starts = seq_starts if seq_starts is not None else seq_lens
    # Grid dims y and z are limited to 65535 on CUDA; x is not (rows move there past it).
    # The prefill launch of a split_decodes pair too: its few real rows' programs, all heads,
    # are then dispatched before any gap row's.
    heads_first = ((cfg.direct or min_q_len > 1) and grid0 <= 65535
                   and envs.attn_heads_first())

    def grid(splits: int) -> tuple[int, int, int]:
        return (KV, grid0, splits) if heads_first else (grid0, KV, splits)

    if not split:
        _attention_kernel[grid(1)](
            query, key_cache, value_cache, out, out, out, out, seq_lens,
            query_start_loc, seq_lens, block_table, starts, *scales, qk_scale, B, 1, min_q_len,
            query.stride(0), query.stride(1), out.stride(0), out.stride(1), 0, 0, 0, 0,
            *cache_strides, block_table.stride(0), FUSED_MERGE=False, HEADS_FIRST=heads_first,
            WAIT_ONE=wait_one, **common, **order, **pdl)
        return
    assert not wait_one, "split launches wait in every program"

    S = cfg.num_splits
    assert S <= MAX_SPLITS, S
    rows = min(num_tokens, T)
    acc = torch.empty((rows, H, S, head_pad), dtype=torch.float32, device=query.device)
    m = torch.empty((rows, H, S), dtype=torch.float32, device=query.device)
    l = torch.empty_like(m)
    # Counter (grid row i, KV head h) is i * KV + h.
    counters = _split_counters(query.device, grid0 * KV) if cfg.fused_merge else seq_lens
    _attention_kernel[grid(S)](
        query, key_cache, value_cache, out, acc, m, l, counters,
        query_start_loc, seq_lens, block_table, starts, *scales, qk_scale, B, S, min_q_len,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        acc.stride(0), acc.stride(1), m.stride(0), m.stride(1),
        *cache_strides, block_table.stride(0), FUSED_MERGE=cfg.fused_merge,
        HEADS_FIRST=heads_first, **common, **order, **pdl)
    if cfg.fused_merge:
        return
    _merge_splits_kernel[(rows, KV)](
        out, acc, m, l, query_start_loc, B, S, out.stride(0), out.stride(1),
        acc.stride(0), acc.stride(1), m.stride(0), m.stride(1), QPK=qpk,
        QPK_PAD=common["QPK_PAD"], HEAD=D, HEAD_PAD=head_pad,
        # One merge variant for every split count (S <= MAX_SPLITS; the extra lanes of the
        # max are masked, the sums stop at S).
        SPLITS_PAD=MAX_SPLITS, MERGE_UNROLL_=MERGE_UNROLL, num_warps=4, **pdl)
