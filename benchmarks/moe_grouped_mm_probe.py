"""The fused MoE against torch's grouped GEMM (torch._grouped_mm, CUTLASS on sm90), alone.

    python3 benchmarks/moe_grouped_mm_probe.py [--out FILE]

At the token counts of Mixtral-8x7B's decode and ridden steps (uniform top-2 routing, as dummy
weights give), times as CUDA-graph replays: kvflow's whole `fused_moe` (alignment, gate/up,
down, combine), and a grouped-GEMM MoE with no row padding (pairs sorted by expert with torch
ops, x gathered, `_grouped_mm` over per-expert row offsets for gate|up, SiLU-and-mul, the down
product, weighted scatter-add), plus each grouped product alone. The question: does a grouped
GEMM that needs no 64/128-row padding stream the experts faster at ~50-130 rows an expert,
where the fused kernel's padded tiles are both weight- and FLOP-bound (docs/performance.md,
session 28)? One JSON line per (tokens, variant).
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from graph_timing import eager_time_us, graph_time_us, jsonl_emitter
from kvflow.kernels.fused_moe import fused_moe

E, H, INTER, K = 8, 4096, 14336, 2


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--tokens", default="64,128,213,256,384,512,1024")
    args = ap.parse_args()
    dev = torch.device("cuda")
    emit = jsonl_emitter(args.out)
    g = torch.Generator(device=dev).manual_seed(0)
    w13 = torch.randn(E, 2 * INTER, H, dtype=torch.bfloat16, device=dev, generator=g) * 0.02
    w2 = torch.randn(E, H, INTER, dtype=torch.bfloat16, device=dev, generator=g) * 0.02
    w13_t = w13.transpose(1, 2)              # [E, H, 2I]: grouped_mm's [G, K, N], K-major
    w2_t = w2.transpose(1, 2)                # [E, I, H]
    weight_gb = (w13.numel() + w2.numel()) * 2 / 1e9

    for t in (int(s) for s in args.tokens.split(",")):
        x = torch.randn(t, H, dtype=torch.bfloat16, device=dev, generator=g)
        topk_w, topk_ids = torch.rand(t, E, device=dev, generator=g).topk(K, dim=-1)
        topk_w = (topk_w / topk_w.sum(-1, keepdim=True)).float()

        def ours():
            return fused_moe(x, w13, w2, topk_w, topk_ids)

        # Sorting by expert with torch ops that never sync (argsort, scatter_add, cumsum).
        def sort_pairs():
            flat = topk_ids.reshape(-1)
            order = torch.argsort(flat, stable=True)
            counts = torch.zeros(E, dtype=torch.int64, device=dev).scatter_add_(
                0, flat, torch.ones_like(flat))
            return order, torch.cumsum(counts, 0).to(torch.int32)

        order, offs = sort_pairs()
        xs = x.index_select(0, order // K)                                    # [P, H]
        gu = torch._grouped_mm(xs, w13_t, offs=offs)                          # [P, 2I]
        hs = F.silu(gu[:, :INTER]) * gu[:, INTER:]                            # [P, I]

        def gate_up_only():
            return torch._grouped_mm(xs, w13_t, offs=offs)

        def down_only():
            return torch._grouped_mm(hs, w2_t, offs=offs)

        def grouped():
            order, offs = sort_pairs()
            tok = order // K
            xs = x.index_select(0, tok)
            gu = torch._grouped_mm(xs, w13_t, offs=offs)
            h = F.silu(gu[:, :INTER]) * gu[:, INTER:]
            o = torch._grouped_mm(h, w2_t, offs=offs)                         # [P, H]
            o = o * topk_w.reshape(-1)[order, None].to(o.dtype)
            return torch.zeros_like(x).index_add_(0, tok, o)

        ref = ours().float()
        got = grouped().float()
        err = float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-6))
        counts = torch.bincount(topk_ids.reshape(-1), minlength=E)
        for name, fn in (("fused_moe", ours), ("grouped_mm_moe", grouped),
                         ("grouped_mm_gate_up", gate_up_only),
                         ("grouped_mm_down", down_only)):
            timing = "graph"
            try:
                us = graph_time_us(fn, reps=5, iters=10)
            except Exception as exc:   # e.g. a host sync inside the capture
                print(f"# {t} {name}: {type(exc).__name__}: {str(exc)[:300]}", file=sys.stderr)
                us, timing = eager_time_us(fn), "eager"
            rec = dict(tokens=t, variant=name, us=round(us, 1), timing=timing,
                       rows_per_expert=[int(c) for c in counts], rel_err_vs_fused=round(err, 4))
            if name.endswith("moe"):
                rec["weight_tb_s"] = round(weight_gb / (us * 1e-6) / 1e3, 2)
            emit(rec)
    return 0


if __name__ == "__main__":
    sys.exit(main())
