"""Tile configurations of the paged attention kernel (kernels/attention.py): host-side only,
from shapes and device limits; upper bounds for the lengths are fine (CUDA graphs pass them).

Tuning knobs (all in `choose_config`; `config=` overrides, e.g. for benchmarking; defaults
measured on an H200, see choose_config):
  prefill tiles, D = 128 and 16-bit: 128 x 64 / 4 warps when a KV head serves >= 4 query
  heads (GQA_PREFILL_TILE), else 64 x 64 / 4 warps / 2 stages for queries of <= 1024-1536
  tokens (SMALL_PREFILL_TILE); otherwise 128 rows, block_n 128 for D = 128 (else 64), 8 warps,
  3 stages (2 for D > 128): wgmma with cp.async pipelining of the gathered K/V tiles.
  Steps too small to fill the GPU with 128-row tiles take 64 rows (SMALL_GRID_BLOCK_M) unless
  the 128-row tiles would split the KV.
  decode-like: block_m max(16, next_pow2(max_q) * QPK_PAD) <= 64, block_n 64 (32 for
  D > 128); 4 warps / 2 stages, one-token decode 2 warps when the grid has >= #SMs programs
  (16-bit, D <= 128), except unsplit grids of 2-3 programs per SM (4).
  block_n is halved for fp32.
  fp32 uses 3xTF32 dots (tensor cores, about fp32 accuracy).
  Shared memory: stages, then block_n, then block_m shrink until Q + K/V buffers (_smem_bytes)
  fit the device's opt-in limit (227 KB on Hopper, less on Ampere/Ada).
  num_splits: only when (q-blocks x KV heads) < #SMs (one-token decode: < 2 x #SMs); about
  2 waves, >= MIN_SPLIT_TOKENS per segment, a power of two <= MAX_SPLITS. fused_merge:
  block_m <= 64.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton

from kvflow.kernels.device import device_properties

MIN_SPLIT_TOKENS = 256     # fewest context tokens per split-KV segment
MAX_SPLITS = 32
# One-token decode programs (2-warp, 64-token tiles, D = 128) an SM holds at once on the H200:
# where longest-first dispatch turned from a loss to a gain on the engine's own inputs
# (benchmarks/attention_replay.py, Qwen3-0.6B nanovllm, 8 KV heads: -7% at 512 programs, -13%
# of attention time at 544 to 800).
DECODE_PROGRAMS_PER_SM = 4
# Unsplit one-token decode grids of at most this many programs per SM run 4 warps a program
# (choose_config): all of them are resident at once with 4 warps too.
DECODE_4WARP_MAX_PROGRAMS_PER_SM = 3


@dataclass(frozen=True)
class AttentionConfig:
    block_m: int       # tile rows = block_q * next_pow2(QPK) (or more, padded to >= 16)
    block_q: int       # query tokens per program
    block_n: int       # KV tokens per tile
    num_warps: int
    num_stages: int
    num_splits: int    # KV segments per program; 1 = no split-KV
    direct: bool       # one program per request (needs block_q >= max_query_len)
    # Split-KV merge inside the attention launch (last-arriving segment, see module doc);
    # False: the two-kernel path (_merge_splits_kernel), same result bit for bit.
    fused_merge: bool = True


_H100_LIMITS = (132, 227 * 1024)             # SMs, opt-in shared memory per block


def device_limits(device: torch.device) -> tuple[int, int]:
    """(multiprocessor count, opt-in shared memory per block) of a CUDA device; H100/H200
    values elsewhere (they only steer the heuristics)."""
    if device.type != "cuda":
        return _H100_LIMITS
    props = device_properties(device)
    smem = getattr(props, "shared_memory_per_block_optin", 0)
    if not smem:   # older torch: by architecture
        smem = {(9, 0): 227 * 1024, (8, 0): 163 * 1024}.get((props.major, props.minor),
                                                            99 * 1024)
    return props.multi_processor_count, smem


def _smem_bytes(block_m: int, block_n: int, head_pad: int, elem: int, stages: int) -> int:
    """Shared memory of a configuration, an upper bound fitted to Triton 3.6's allocation for
    this kernel on sm_90: the Q tile plus max(stages - 1, 2) K and V tile buffers; fp32
    (3xTF32 dots) keeps up to 1.5x that."""
    tiles = (block_m + 2 * max(stages - 1, 2) * block_n) * head_pad * elem
    return (tiles * 3 // 2 if elem == 4 else tiles) + 4096


def _split_below(decode: bool, num_sms: int) -> int:
    """Grids of fewer programs than this split KV (choose_config's comment says why decode
    grids split up to two programs per SM)."""
    return 2 * num_sms if decode else num_sms


def _grid_programs(num_tokens: int, num_reqs: int, num_kv_heads: int, block_q: int,
                   direct: bool) -> int:
    """Programs of a launch before any KV split (at least 1): a q-block per request (DIRECT),
    else the SEARCH grid's bound T // BLOCK_Q + requests, times the KV heads."""
    n_qblocks = num_reqs if direct else num_tokens // block_q + num_reqs
    return max(1, n_qblocks * num_kv_heads)


def _heuristic_splits(programs: int, split_below: int, max_seq_len: int, num_sms: int) -> int:
    """Split-KV segments of a grid of `programs` (q-blocks x KV heads): about two waves of
    >= MIN_SPLIT_TOKENS-token segments when the grid has fewer than split_below programs."""
    if programs >= split_below or max_seq_len < 2 * MIN_SPLIT_TOKENS:
        return 1
    want = triton.cdiv(2 * num_sms, programs)
    cap = max_seq_len // MIN_SPLIT_TOKENS
    num_splits = min(triton.next_power_of_2(want), MAX_SPLITS)
    while num_splits > cap:
        num_splits //= 2
    return max(1, num_splits)


def dispatch_longest_first(num_reqs: int, num_kv_heads: int, num_sms: int,
                           max_seq_len: int) -> bool:
    """Whether a one-token decode launch over num_reqs requests (a program per request, KV head
    and split-KV segment; max_seq_len as choose_config gets it) should dispatch the longest
    contexts first. Measured on the engine's own inputs (benchmarks/attention_replay.py, H200,
    8 KV heads), two cases gain:
      * unsplit grids larger than the GPU holds at once (DECODE_PROGRAMS_PER_SM a SM): the
        programs start in waves as earlier ones finish, and longest first keeps long programs
        out of the last wave, which sets the launch's tail (-13% attention time at 544-800
        programs; at <= 512, where every program starts at once, +7%);
      * grids split into >= 4 segments (fewer programs than SMs before splitting: 2-16
        requests): -6 to -11% at 4-16 requests. Two segments (17-32 requests) lost 2-4%.
    One request has nothing to order (and decode at batch 1 is all latency)."""
    if num_reqs < 2:
        return False
    programs = num_reqs * num_kv_heads
    splits = _heuristic_splits(programs, _split_below(True, num_sms), max_seq_len, num_sms)
    if splits == 1:
        return programs > DECODE_PROGRAMS_PER_SM * num_sms
    return splits >= 4


# Prefill tiles (block_m, block_n, num_warps, num_stages) for D = 128 with 16-bit K/V, by the
# query heads a KV head serves (padded to a power of two, QPK) and the longest query.
# benchmarks/prefill_attention_bench.py on an H200, one 16K-token step of prompts drawn from a
# length range over 64-token blocks, 100-1024 (nanovllm) to 4096-8192 tokens, for Qwen3-0.6B
# (QPK 2), Llama-3.1-8B (4), Llama-2-7B (1) and Llama-3.1-70B (8) head layouts
# (results/prefill-attention-220c3c9-{limit,tiles}-nvidia-h200.jsonl):
# - QPK >= 4: 128 x 64 / 4 warps: 1-9% less time than 64 x 64 / 4 / 2 up to 1024 tokens
#   (Llama-3.1-70B: 828 against 903 us), 2-10% less than 128 x 128 / 8 / 3 at 1-2K, 1-3% less
#   at 2-4K and within 0.3% at 4-8K; 3 stages take 0.4-1.5% off from 2K tokens on.
# - QPK <= 2: 64 x 64 / 4 / 2 is fastest for short queries, 128 x 128 / 8 / 3 beyond
#   SMALL_PREFILL_MAX_Q (the small tile against it: Qwen3-0.6B equal at 1280-1536 tokens and
#   2.5% slower at 1536-1792; Llama-2-7B 4% slower at 1024-1536).
# Probable reasons, not measured: about 32 query tokens a program (16 at QPK 8) waste little of
# the tile on the causal diagonal while reusing each K/V tile over enough rows, and many
# smaller programs even out prompts of unequal lengths.
SMALL_PREFILL_TILE = (64, 64, 4, 2)
SMALL_PREFILL_MAX_Q = {1: 1024, 2: 1536}     # by QPK
GQA_PREFILL_TILE = (128, 64, 4, 2)           # QPK >= 4; 3 stages above GQA_PREFILL_STAGES_Q
GQA_PREFILL_STAGES_Q = 2048


# Prefill tiles of a step too small to fill the GPU with 128-row programs (fewer q-blocks x KV
# heads than two a SM, the residency of the 128 x 64 tile): 64 rows. The prefill launch of a
# 384-token mixed-step graph (Mixtral-8x7B, QPK 4; benchmarks/mixed_attention_probe.py, H200)
# took 27.1 / 25.6 / 14.1 us against 45.9 / 41.7 / 21.3 with 128 rows, for a 320 / 184 /
# 84-token prompt chunk beside 64 / 200 / 300 decodes: its ~100 programs each walk the
# chunk's whole prefix, so the launch lasts as long as one program, and half the rows halve
# each tile's work (8 warps on 128 rows: 33.4 / 28.2 / 21.7; split-KV with the fused merge
# lost 3-6x there). Steps whose 128-row tiles split the KV (a chunk over a long prefix, few
# requests) keep them: the split shortens each program more than halving its rows.
SMALL_GRID_BLOCK_M = 64


def _prefill_tile(head_pad: int, elem: int, max_query_len: int,
                  qpk_pad: int) -> tuple[int, int, int, int]:
    """(block_m, block_n, num_warps, num_stages) of the prefill tiles, before the shared-memory
    fit."""
    if head_pad == 128 and elem == 2:
        if qpk_pad >= 4:
            block_m, block_n, warps, stages = GQA_PREFILL_TILE
            return block_m, block_n, warps, 3 if max_query_len > GQA_PREFILL_STAGES_Q else stages
        if max_query_len <= SMALL_PREFILL_MAX_Q[qpk_pad]:
            return SMALL_PREFILL_TILE
    return (128, 128 if head_pad == 128 else 64, 8, 3 if head_pad <= 128 else 2)


def prefill_block_q(num_heads: int, num_kv_heads: int, head_size: int = 128,
                    dtype: torch.dtype = torch.bfloat16, max_query_len: int = 1) -> int:
    """Query positions per q-block of the prefill tiles (block_m rows over the padded query
    heads of a KV head; fewer only if shared memory forces it): a batch whose longest query is
    at most this runs "direct", one q-block per request."""
    qpk_pad = triton.next_power_of_2(num_heads // num_kv_heads)
    block_m = _prefill_tile(triton.next_power_of_2(head_size), dtype.itemsize, max_query_len,
                            qpk_pad)[0]
    return max(block_m, qpk_pad) // qpk_pad


def choose_config(num_tokens: int, num_reqs: int, num_heads: int, num_kv_heads: int,
                  head_size: int, max_query_len: int, max_seq_len: int, dtype: torch.dtype,
                  num_sms: int = 132, num_splits: Optional[int] = None,
                  smem_limit: int = 227 * 1024) -> AttentionConfig:
    """Tile configuration by shape. Only host ints are read; upper bounds are fine.

    Defaults were measured on an H200 (bf16, block size 16, Triton 3.6): decode 64-token
    tiles / 2 stages reached 3.9-4.4 TB/s; prefill 128x128 tiles / 8 warps / 3 stages for
    D=128, 128x64 for D=64 and (2 stages) D=256 were the fastest of the sweep."""
    qpk_pad = triton.next_power_of_2(num_heads // num_kv_heads)
    head_pad = triton.next_power_of_2(head_size)
    elem = dtype.itemsize
    max_query_len = max(1, max_query_len)
    bq_small = triton.next_power_of_2(max_query_len)
    if bq_small * qpk_pad <= 64:
        # Decode-like: every request fits one q-block; memory-bound, small tiles, 4 warps.
        # Two q-block sizes only, decode (1) and short chunk (the most that fits 64 rows): each
        # distinct BLOCK_Q is a Triton compilation, and chunk remainders of any length would
        # otherwise compile new variants inside the first requests.
        block_q = 1 if max_query_len == 1 else 64 // qpk_pad
        block_m = max(16, block_q * qpk_pad)
        block_n = 64 if head_pad <= 128 else 32
        num_warps, num_stages, direct = 4, 2, True   # 2 warps on full grids: see below
    else:
        block_m, block_n, num_warps, num_stages = _prefill_tile(head_pad, elem, max_query_len,
                                                                qpk_pad)
        if (head_pad == 128 and elem == 2 and block_m > SMALL_GRID_BLOCK_M
                and num_tokens // (block_m // qpk_pad) * num_kv_heads < 2 * num_sms):
            # A small step: more, shorter programs -- unless the 128-row tiles would split
            # the KV (a chunk over a long prefix), which shortens every program more.
            # (Counted as a SEARCH grid, also where the 128-row tile would be DIRECT.)
            programs = _grid_programs(num_tokens, num_reqs, num_kv_heads, block_m // qpk_pad,
                                      direct=False)
            splits = num_splits if num_splits is not None else _heuristic_splits(
                programs, _split_below(False, num_sms), max_seq_len, num_sms)
            if splits == 1:
                block_m = SMALL_GRID_BLOCK_M
        block_m = max(block_m, qpk_pad)
        block_q = block_m // qpk_pad
        direct = block_q >= max_query_len
    if elem == 4:
        block_n = max(16, block_n // 2)                 # 4-byte tiles: halve the KV tile
    # Fit shared memory: fewer stages, then narrower KV tiles, then fewer query rows.
    while _smem_bytes(block_m, block_n, head_pad, elem, num_stages) > smem_limit:
        if num_stages > 2:
            num_stages -= 1
        elif block_n > 16:
            block_n //= 2
        elif block_m // 2 >= max(16, qpk_pad):
            block_m //= 2
            block_q = block_m // qpk_pad
            direct = direct and block_q >= max_query_len
        else:
            break

    programs = _grid_programs(num_tokens, num_reqs, num_kv_heads, block_q, direct)
    # Decode grids (one query token per request) of one to two programs per SM also split (in
    # two): with about one long program per SM, uneven context lengths leave most SMs idle at
    # the end (32 requests x 8 KV heads: -10 to -19% with 2 splits in the sweep below).
    decode = direct and block_q == 1
    split_below = _split_below(decode, num_sms)
    if (decode and elem == 2 and head_pad <= 128 and programs >= num_sms
            and not split_below <= programs <= DECODE_4WARP_MAX_PROGRAMS_PER_SM * num_sms):
        # 2 warps once the grid has a program per SM (16-bit tiles, D <= 128): more programs
        # stay resident per SM, so more KV tiles are in flight. benchmarks/attention_tune.py
        # on an H200 (Qwen3-0.6B / Llama-8B head layouts): 4.11 -> 4.27 TB/s at 512 requests,
        # up to -21% time at 64; in the engine (same call), Qwen3-0.6B throughput8k +2.4 to
        # +5.3%, nanovllm +1.8%, Llama-3.1-8B throughput8k +1.1%. Small split-KV grids keep 4:
        # at one request (decode1, after the q/k transform under PDL) 2 warps lost 2.5%.
        # Unsplit grids of 2-3 programs per SM keep 4 too: the whole grid is resident at
        # once either way, and 4 warps per program put twice the loads in flight (on the
        # engine's own inputs, attention_replay.py: -12 to -14% at 40-48 requests x 8 KV
        # heads; +15-20% past 3 a SM, where 4-warp programs no longer all fit).
        num_warps = 2
    if num_splits is None:
        num_splits = _heuristic_splits(programs, split_below, max_seq_len, num_sms)
    # Fused split-KV merge for decode-like tiles only: with 128-row tiles the merge's
    # [rows, HEAD_PAD] fp32 loads raise ptxas spills of the sm_90 kernel from ~0.8 KB to ~6 KB
    # (D=128, bf16), while the one long-prefix chunk that splits there is compute-heavy and a
    # second launch costs it little.
    fused_merge = block_m <= 64
    return AttentionConfig(block_m, block_q, block_n, num_warps, num_stages, num_splits, direct,
                           fused_merge)
