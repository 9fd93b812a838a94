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
    T // BLOCK_Q + P bound the count for P served requests (P <= num_reqs, <= T // min_q_len,
    and <= the caller's max_prompt_reqs where it gives one); rows past the last q-block exit
    at once, without waiting, except row 0 of KV head 0, whose wait keeps the launch from
    completing before its predecessor. In a
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

from kvflow import envs
from kvflow.kernels.attention_config import (
    MAX_SPLITS,
    AttentionConfig,
    choose_config,
    device_limits,
)
from kvflow.kernels.attention_kernel import (  # noqa: F401 (re-exported)
    _attend_loaded,
    _attention_kernel,
    _softmax_step,
)
from kvflow.kernels.attention_merge import MERGE_UNROLL, _merge_splits_kernel
from kvflow.kernels.decode_order import identity_order
from kvflow.kernels.pdl import pdl_launch
from kvflow.kernels.tickets import TicketCounters

LOG2E = 1.4426950408889634
# Decode-like launches load their first KV tile before the PDL wait (see _attention_kernel).
# KVFLOW_ATTN_PREFETCH=0 turns it off (read once, at import).
_PREFETCH = envs.attn_prefetch()


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
