"""Longest-first order of a decode batch: kvflow/kernels/decode_order.py against torch.argsort.

    python3 benchmarks/decode_order_bench.py

On a CUDA device: us per call inside a CUDA graph (20 calls a replay, 50 replays) at 80-1024
random lengths, torch.argsort(descending) + the int32 cast against the one-program sort at 1-16
warps; each size's result is checked against the stable torch reference.
"""
from __future__ import annotations

import sys

import torch
import triton

from graph_timing import graph_time_us
from kvflow.kernels import decode_order as do
from kvflow.kernels.pdl import pdl_launch


def main() -> int:
    dev = torch.device("cuda")
    for n in (80, 144, 256, 512, 1024):
        lens = torch.randint(100, 2000, (n,), device=dev, dtype=torch.int32)
        out = torch.empty(n, dtype=torch.int32, device=dev)
        row = {"torch": round(graph_time_us(
            lambda: torch.argsort(lens, descending=True).to(torch.int32), reps=20, iters=50), 2)}
        block = max(16, triton.next_power_of_2(n))
        for w in (1, 2, 4, 8, 16):
            def sort(w=w):
                do._longest_first_kernel[(1,)](lens, out, n, BLOCK=block, num_warps=w,
                                               **pdl_launch(dev))
            row[f"w{w}"] = round(graph_time_us(sort, reps=20, iters=50), 2)
        assert torch.equal(out, do.longest_first_order_ref(lens))
        print(n, row, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
