"""Fused add + RMSNorm over a prefill chunk's rows: warps per program against the heuristic
(kvflow/kernels/norm.py) and the HBM bytes (x, residual read; out, new residual written).

Session 13 swept several rows a program too (a5e3a88, reverted): one row a program already
reaches ~4.0 TB/s at 16384 x 1024 and 4.1 at 16384 x 4096 (results/norm-rows-a5e3a88-*.json).
The ~88 us a launch that profiles of prefill steps show is PDL: the norm launches while the
GEMM before it drains and the profiler counts the wait.

    source benchmarks/device_env.sh && python3 benchmarks/norm_rows.py [--m 16384,128]
        [--n 1024,4096] [--out DIR]

Times are CUDA-graph replays over two buffer sets (> the 50 MB L2 at 16K rows). Writes
DIR/norm_rows.json.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os

import torch

from kvflow.kernels import norm
from graph_timing import graph_time_us


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", default="16384,4096,128")
    ap.add_argument("--n", default="1024,2048,4096")
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/out"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    records = []
    for m, n in itertools.product([int(v) for v in args.m.split(",")],
                                  [int(v) for v in args.n.split(",")]):
        sets = [[torch.randn(m, n, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
                for _ in range(2)]
        w = torch.ones(n, device="cuda", dtype=torch.bfloat16)
        nbytes = 4 * m * n * 2

        def timed(warps=None):
            return graph_time_us([lambda s=s: norm._launch(s[0], s[1], w, s[2], s[3], 1e-6,
                                                           True, num_warps=warps)
                                  for s in sets], reps=5, iters=20)

        variants = [("heuristic", None)] + [("sweep", wp) for wp in (1, 2, 4, 8, 16)]
        for kind, warps in variants:
            us = timed(warps)
            rec = dict(m=m, n=n, kind=kind, num_warps=warps, us=round(us, 2),
                       tb_s=round(nbytes / us / 1e6, 3))
            records.append(rec)
            print(json.dumps(rec), flush=True)
        best = min((r for r in records if r["m"] == m and r["n"] == n), key=lambda r: r["us"])
        print(json.dumps(dict(best=best)), flush=True)
    with open(os.path.join(args.out, "norm_rows.json"), "w") as f:
        json.dump(records, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
