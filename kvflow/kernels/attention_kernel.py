"""The Triton kernel of kvflow/kernels/attention.py's unified paged attention, and its tile steps
(the TMA decode kernel, kernels/decode_attention_tma.py, shares `_softmax_step` and
`_attend_loaded`). The design -- program mapping, split-KV and its fused merge, PDL,
prefetch, invariants -- is attention.py's docstring; the host side (`unified_attention`,
`_launch`) lives there too.
"""
from __future__ import annotations

import triton
import triton.language as tl

from kvflow.kernels.attention_merge import _EMPTY_MAX, _merge_partials
from kvflow.kernels.pdl import pdl_launch_dependents, pdl_wait

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
