"""MoE routing kernels alone, as CUDA-graph replays: the router product + top-k, and alignment.

    python3 benchmarks/router_probe.py [--align-only] [--out FILE]

For token counts from decode sizes to a ridden step's 512, times the unfused router (F.linear,
cuBLAS, then the top-k kernel) against `moe_routing.router_topk` with its own tiles and a few
overrides, then `align_by_expert_triton` at the fused MoE's row blocks and its kernel with
other one-hot chunks and warps (--align-only: those alone). Shapes: Mixtral-8x7B
(8 experts, hidden 4096, top-2 softmax) and Llama-4-Scout (16 experts, 5120, top-1 sigmoid).
Each fused variant is checked against the unfused ids. One JSON line per measurement.
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F
import triton

from graph_timing import graph_time_us, jsonl_emitter
from kvflow.kernels import moe_routing as mr

SHAPES = (("mixtral", 8, 4096, 2, "softmax"), ("scout", 16, 5120, 1, "sigmoid"))
TOKENS = (16, 64, 128, 256, 384, 512)
OVERRIDES = ({}, dict(BLOCK_T=32), dict(BLOCK_H=256), dict(BLOCK_H=64),
             dict(num_warps=8), dict(BLOCK_T=32, num_warps=8), dict(num_stages=4),
             dict(BLOCK_H=256, num_stages=2))


def _align_variant(ids, e, block_m, chunk, warps, want):
    """align_by_expert_triton with another CHUNK / num_warps: (us, same outputs)."""
    flat = ids.reshape(-1).contiguous()
    n = flat.numel()
    p = triton.cdiv(n + e * (block_m - 1), block_m) * block_m
    pairs = torch.empty((p,), dtype=torch.int32, device=flat.device)
    blocks = torch.empty((p // block_m,), dtype=torch.int32, device=flat.device)
    e_pad = triton.next_power_of_2(e)

    def run():
        mr._align_kernel[(1,)](flat, pairs, blocks, n, e, p, BLOCK_M=block_m, E_PAD=e_pad,
                               CHUNK=chunk, BLOCK_B=max(16, 4096 // e_pad), num_warps=warps,
                               **mr.pdl_launch(flat.device))
    try:
        run()
        ok = bool(torch.equal(pairs, want[0]) and torch.equal(blocks, want[1]))
        return round(graph_time_us(run), 2), ok
    except Exception as exc:
        print(f"# align chunk {chunk} warps {warps}: {type(exc).__name__}: {str(exc)[:200]}",
              file=sys.stderr)
        return None, False


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--align-only", action="store_true")
    args = ap.parse_args()
    dev = torch.device("cuda")
    emit = jsonl_emitter(args.out)

    for name, e, h, k, scoring in SHAPES:
        w = torch.randn(e, h, dtype=torch.bfloat16, device=dev) * 0.02
        for t in TOKENS:
            x = torch.randn(t, h, dtype=torch.bfloat16, device=dev)
            _, ref_ids = mr.topk_softmax(F.linear(x, w), k, True, scoring)
            # router_topk's own tiles up to ROUTER_TOPK_MAX_T; above, its 16-token tl.dot
            # tiles and the overrides.
            cfg = mr.router_topk_config(min(t, 16), e, h, x.dtype)
            overrides = () if args.align_only else ({},) if t <= 64 else OVERRIDES
            if not args.align_only:
                us = graph_time_us(lambda: mr.topk_softmax(F.linear(x, w), k, True, scoring))
                emit(dict(shape=name, tokens=t, kernel="cublas+topk", us=round(us, 2)))
            for ov in overrides:
                def fused(ov=ov):
                    return mr.router_topk(x, w, k, True, scoring, config=dict(cfg, **ov))
                try:
                    _, ids = fused()
                    agree = float((ids == ref_ids).float().mean())
                    us = graph_time_us(fused)
                except Exception as exc:   # a tile that does not compile / fit
                    print(f"# {name} {t} {ov}: {type(exc).__name__}: {str(exc)[:200]}",
                          file=sys.stderr)
                    continue
                emit(dict(shape=name, tokens=t, kernel="router_topk", override=ov,
                          us=round(us, 2), ids_agree=round(agree, 4)))
            ids = ref_ids
            for block_m in (64, 128):
                us = graph_time_us(lambda: mr.align_by_expert_triton(ids, e, block_m))
                emit(dict(shape=name, tokens=t, kernel="align", block_m=block_m,
                          us=round(us, 2)))
            # The alignment's one-hot chunk (pairs per pass) and warps, at block_m 128.
            want = mr.align_by_expert_triton(ids, e, 128)
            for chunk in (256, 512, 1024, 2048):
                for warps in (4, 8, 16):
                    us, ok = _align_variant(ids, e, 128, chunk, warps, want)
                    emit(dict(shape=name, tokens=t, kernel="align", block_m=128, chunk=chunk,
                              warps=warps, us=us, same=ok))
    return 0


if __name__ == "__main__":
    sys.exit(main())
