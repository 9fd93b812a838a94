"""How fast can a decode step's KV access pattern be read, with no attention arithmetic?

    source benchmarks/device_env.sh && python3 benchmarks/kv_read_probe.py [--batch 1000]
        [--context 512,768] [--block-size 64] [--out FILE]

Why: floor_probe.py reads a flat tensor at 4.68 TB/s on the H200, while the decode attention
reads 4.2-4.33 TB/s at 500-1000 requests (sessions 10-14, 35). This probe separates the access
pattern from the kernel: one program per (request, KV head), as the decode grid (heads
fastest), walks the request's KV tiles through the block table and only sums K and V. If the
pattern alone reads near the flat rate, the attention kernel's own structure (dependent loads,
the dots and softmax between them) is what is slower; if not, the pattern is.

Variants: KV tile (block_n tokens), warps, pipelining stages (tl.range num_stages), and the
cache's order within a block (nhd: token-major, the engine's [blocks, block_size, KV, D];
hnd: one head's page contiguous, behind the same logical view). Batch and blocks as
attention_tune.py draws them (random lengths in --context, blocks shuffled). One JSON line each.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(__file__))
from attention_tune import MODELS, case  # noqa: E402
from graph_timing import graph_time_us, jsonl_emitter  # noqa: E402


@triton.jit
def _kv_read_kernel(k_ptr, v_ptr, out_ptr, seq_lens_ptr, bt_ptr,
                    stride_cb, stride_ct, stride_ch, stride_bt,
                    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, HEAD: tl.constexpr,
                    STAGES: tl.constexpr):
    # Grid [KV heads, requests]: heads fastest, as the decode launch's heads-first grid.
    kv_head = tl.program_id(0)
    req = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + req)
    bt_row = bt_ptr + req.to(tl.int64) * stride_bt
    k_base = k_ptr + kv_head * stride_ch
    v_base = v_ptr + kv_head * stride_ch
    offs_d = tl.arange(0, HEAD)
    acc = tl.zeros([BLOCK_N, HEAD], dtype=tl.float32)
    for t in tl.range(0, tl.cdiv(seq_len, BLOCK_N), num_stages=STAGES):
        start = t * BLOCK_N
        kpos = start + tl.arange(0, BLOCK_N)
        if BLOCK_SIZE % BLOCK_N == 0:
            blk = tl.load(bt_row + start // BLOCK_SIZE).to(tl.int64)
            rows = blk * stride_cb + ((start % BLOCK_SIZE) + tl.arange(0, BLOCK_N)) * stride_ct
        else:
            blk = tl.load(bt_row + kpos // BLOCK_SIZE, mask=kpos < seq_len, other=0)
            rows = blk.to(tl.int64) * stride_cb + (kpos % BLOCK_SIZE) * stride_ct
        off = rows[:, None] + offs_d[None, :]
        m = (kpos < seq_len)[:, None]
        k = tl.load(k_base + off, mask=m, other=0.0)
        v = tl.load(v_base + off, mask=m, other=0.0)
        acc += k.to(tl.float32) + v.to(tl.float32)
    tl.store(out_ptr + req * tl.num_programs(0) + kv_head, tl.sum(acc))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", default="1000")
    ap.add_argument("--context", default="512,768")
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--model", default="llama3.1-8b", choices=tuple(MODELS))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    emit = jsonl_emitter(args.out)
    lo, hi = (int(v) for v in args.context.split(","))
    heads, kv, d = MODELS[args.model]
    for batch, layout in itertools.product([int(b) for b in args.batch.split(",")],
                                           ("nhd", "hnd")):
        _, cache, _, lens, table, _, kv_bytes, _ = case(batch, lo, hi, heads, kv, d, "cuda",
                                                        block_size=args.block_size,
                                                        layout=layout)
        k, v = cache[0], cache[1]
        out = torch.empty(batch * kv, dtype=torch.float32, device="cuda")
        ref = None
        for block_n, warps, stages in itertools.product((32, 64, 128), (2, 4, 8), (1, 2, 3)):
            def fn(block_n=block_n, warps=warps, stages=stages):
                _kv_read_kernel[(kv, batch)](
                    k, v, out, lens, table, k.stride(0), k.stride(1), k.stride(2),
                    table.stride(0), BLOCK_SIZE=args.block_size, BLOCK_N=block_n, HEAD=d,
                    STAGES=stages, num_warps=warps)
            fn()
            if ref is None:
                ref = out.clone()
            else:            # every variant sums the same bytes (fp32 order aside)
                torch.testing.assert_close(out, ref, atol=1e-2, rtol=1e-3)
            us = graph_time_us(fn, reps=5, iters=10)
            emit(dict(probe="kv_read", model=args.model, batch=batch, context=[lo, hi],
                      block_size=args.block_size, layout=layout, block_n=block_n,
                      num_warps=warps, num_stages=stages, us=round(us, 1),
                      tb_s=round(kv_bytes / us / 1e6, 3)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
