"""Probe: the fused-MoE Triton kernels against torch._grouped_mm (CUTLASS grouped GEMM on sm90)
for one expert shape, end to end (routing given: align/sort, both products, SiLU-and-mul, the
weighted K-sum), each variant one CUDA graph.

    python3 benchmarks/moe_grouped_probe.py [--tokens 128,256,...] [--out DIR]

Writes $OUT/moe-grouped-probe.json and prints one line per token count.
"""
from __future__ import annotations

import argparse
import json
import os

import torch

from graph_timing import graph_time_us
from kvflow.kernels import fused_moe as fm
from kvflow.kernels.activation import silu_and_mul
from kvflow.kernels.moe_routing import moe_sum
from moe_tune import add_shape_args, expert_weights, uniform_routing


def grouped_mm_moe(x, w13, w2, topk_weights, topk_ids):
    """x [T, H] -> [T, H]: pairs sorted by expert, two grouped GEMMs, SiLU-and-mul between."""
    t, k = topk_ids.shape
    e = w13.shape[0]
    flat = topk_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)                                  # [T*K]
    counts = torch.zeros(e, dtype=torch.int32, device=x.device).scatter_add_(
        0, flat.long(), torch.ones_like(flat, dtype=torch.int32))
    offs = torch.cumsum(counts, 0, dtype=torch.int32)                         # [E] group ends
    xs = x.index_select(0, order // k)                                        # [T*K, H]
    gu = torch._grouped_mm(xs, w13.transpose(1, 2), offs=offs)                # [T*K, 2I]
    hs = silu_and_mul(gu)                                                     # [T*K, I]
    ys = torch._grouped_mm(hs, w2.transpose(1, 2), offs=offs)                 # [T*K, H]
    ys = ys * topk_weights.reshape(-1)[order].to(ys.dtype)[:, None]
    out = torch.empty_like(ys).index_copy_(0, order, ys)                      # pair order
    return moe_sum(out.view(t, k, -1), x.dtype)


def main():
    ap = argparse.ArgumentParser()
    add_shape_args(ap)
    ap.add_argument("--tokens", default="64,128,192,256,384,512,768,1024,2048,4096,8192")
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/out"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    e, h, inter, k = args.experts, args.hidden, args.inter, args.topk
    dtype, dev = torch.bfloat16, torch.device("cuda", 0)
    w13, w2 = expert_weights(e, h, inter, dev, dtype)
    rows = []
    for t in [int(v) for v in args.tokens.split(",")]:
        x = torch.randn(t, h, device=dev, dtype=dtype)
        weights, ids = uniform_routing(t, e, k, dev)
        timing = dict(reps=3, iters=None, target_ms=30.0) if t * k > 1024 else {}
        ref = fm.fused_moe(x, w13, w2, weights, ids)
        got = grouped_mm_moe(x, w13, w2, weights, ids)
        err = ((got.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
        us_triton = graph_time_us(lambda: fm.fused_moe(x, w13, w2, weights, ids), **timing)
        us_grouped = graph_time_us(lambda: grouped_mm_moe(x, w13, w2, weights, ids), **timing)
        offs = torch.cumsum(torch.bincount(ids.reshape(-1), minlength=e), 0).int()
        xs = torch.randn(t * k, h, device=dev, dtype=dtype)
        hs = torch.randn(t * k, inter, device=dev, dtype=dtype)
        us_gemms = graph_time_us(lambda: (torch._grouped_mm(xs, w13.transpose(1, 2), offs=offs),
                                          torch._grouped_mm(hs, w2.transpose(1, 2), offs=offs)),
                                 **timing)
        wbytes = min(e, t * k) * 3 * inter * h * 2
        row = dict(tokens=t, pairs=t * k, triton_us=round(us_triton, 1),
                   grouped_us=round(us_grouped, 1), grouped_gemms_us=round(us_gemms, 1),
                   weight_floor_us=round(wbytes / 4.3e6, 1), rel_err=round(err, 4))
        rows.append(row)
        print(json.dumps(row), flush=True)
    with open(os.path.join(args.out, "moe-grouped-probe.json"), "w") as f:
        json.dump({"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
                   "shape": fm.shape_key(e, h, inter, dtype), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
