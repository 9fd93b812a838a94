"""Decode GEMMs at 16 < M <= 512 rows: cuBLAS against the HBM / tensor-core floor and a
Triton swap-AB GEMM swept over its tiles.

    source benchmarks/device_env.sh && python3 benchmarks/gemm_mid.py CONFIG_DIR [CONFIG_DIR...]
        [--rows 32,64,...] [--out FILE] [--quick]

Why: in nanovllm's decode steps (Llama-3.1-8B, 32-256 running requests) the profile left
~2 ms a step between the GEMMs and max(weight read, FLOPs at cuBLAS's sustained rate). Below
~150 rows a decode GEMM is a weight stream; cuBLAS's tiles for these M are picked by its
heuristic, not for streaming.

What: per projection (q|k|v, o, gate|up, down) and row count, CUDA-graph replays rotating over
enough weight copies that no weight is served from L2: cuBLAS (torch.nn.functional.linear)
and every variant of the swap-AB kernel below (out^T = W @ x^T: the weight slab is the MMA's M
side, the x rows its N side, so a tile needs no padding of the rows to 64). Reported: us,
TB/s of weight bytes, TFLOP/s, and the floor max(bytes / 4.3 TB/s, FLOPs / 700 TFLOP/s).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(__file__))
from gemm_shapes import shapes  # noqa: E402
from graph_timing import graph_time_us  # noqa: E402

HBM_TBS, MMA_TFLOPS = 4.3, 700.0


@triton.jit
def _mid_gemm_kernel(x_ptr, w_ptr, out_ptr, M, N, K, stride_xm, stride_wn,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)        # fastest: the programs sharing a weight slab run together
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + tl.minimum(offs_n, N - 1).to(tl.int64)[:, None] * stride_wn + offs_k[None, :]
    x_ptrs = x_ptr + tl.minimum(offs_m, M - 1)[None, :] * stride_xm + offs_k[:, None]
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):    # K % BLOCK_K == 0 on every benchmarked shape
        w = tl.load(w_ptrs, eviction_policy="evict_first")
        xt = tl.load(x_ptrs)
        acc = tl.dot(w, xt, acc)
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    out = tl.trans(acc).to(out_ptr.dtype.element_ty)
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    tl.store(out_ptr + offs_m[:, None] * N + offs_n[None, :], out, mask=mask)


def mid_gemm(x, w, out, bm, bn, bk, warps, stages):
    m, k = x.shape
    n = w.shape[0]
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    _mid_gemm_kernel[grid](x, w, out, m, n, k, x.stride(0), w.stride(0),
                           BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)


def variants(m: int, quick: bool):
    bms = sorted({min(max(16, triton.next_power_of_2(m)), 128), 64} if m > 64 else
                 {max(16, triton.next_power_of_2(m))})
    if m > 128:
        bms = sorted(set(bms) | {128, min(256, triton.next_power_of_2(m))})
    for bm, bn, bk, warps, stages in itertools.product(
            bms, (64, 128, 256), (64, 128), (4, 8), (3, 4, 5)):
        smem = (bn * bk + bk * bm) * 2 * stages
        regs = bm * bn // (32 * warps)            # fp32 accumulator per thread
        if smem > 200 * 1024 or regs > 128 or (quick and stages == 5):
            continue
        yield bm, bn, bk, warps, stages


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("models", nargs="+")
    p.add_argument("--rows", default="32,48,64,96,128,160,192,256,320,384,512")
    p.add_argument("--shapes", default="qkv,o,gate_up,down")
    p.add_argument("--out", default=None)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    dev = torch.device("cuda")
    records = []
    for model in args.models:
        with open(f"{model}/config.json") as f:
            cfg = json.load(f)
        for name, (n, k) in shapes(cfg).items():
            if name not in args.shapes.split(","):
                continue
            copies = max(2, -(-320 * 2 ** 20 // (n * k * 2)))    # >= 320 MB of weights: no L2 hits
            ws = [torch.randn(n, k, dtype=torch.bfloat16, device=dev) * 0.02 for _ in range(copies)]
            for m in (int(r) for r in args.rows.split(",")):
                x = torch.randn(m, k, dtype=torch.bfloat16, device=dev)
                outs = [torch.empty(m, n, dtype=torch.bfloat16, device=dev) for _ in ws]
                ref = torch.nn.functional.linear(x, ws[0])
                fns = [lambda w=w, o=o: torch.mm(x, w.t(), out=o) for w, o in zip(ws, outs)]
                cublas = graph_time_us(fns, reps=4, iters=10)
                flops, wbytes = 2 * m * n * k, n * k * 2
                floor = max(wbytes / HBM_TBS / 1e6, flops / MMA_TFLOPS / 1e6)
                best = None
                for v in variants(m, args.quick):
                    bm, bn, bk, warps, stages = v
                    try:
                        mid_gemm(x, ws[0], outs[0], *v)
                        torch.testing.assert_close(outs[0].float(), ref.float(), atol=3e-2, rtol=3e-2)
                        us = graph_time_us([lambda w=w, o=o: mid_gemm(x, w, o, *v)
                                            for w, o in zip(ws, outs)], reps=4, iters=10)
                    except Exception as e:    # out of resources etc.: skipped
                        print(f"skip {v}: {str(e)[:100]}", file=sys.stderr)
                        continue
                    if best is None or us < best[0]:
                        best = (us, v)
                rec = dict(model=os.path.basename(model), shape=name, m=m, n=n, k=k,
                           floor_us=round(floor, 1), cublas_us=round(cublas, 1),
                           cublas_tbs=round(wbytes / cublas / 1e6, 2),
                           cublas_tflops=round(flops / cublas / 1e6, 1),
                           triton_us=round(best[0], 1) if best else None,
                           triton_cfg=best[1] if best else None,
                           triton_tflops=round(flops / best[0] / 1e6, 1) if best else None)
                records.append(rec)
                print(json.dumps(rec), flush=True)
            del ws
            torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(records, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
