"""Which tuned fused-MoE tile serves the token counts between the table's buckets best.

    python3 benchmarks/moe_bucket_probe.py [--tokens 200,208,...] [--samples 5] [--out FILE]

kernels/configs/fused_moe.json holds a tile per bucket of (token, expert) pairs, tuned at the
bucket's own size; `choose_config` serves every count up to a bucket with its tile. Between
buckets the row padding changes with the count (e.g. Mixtral at 200-256 tokens: ~50-64 rows an
expert, which a 64-row block holds only some of the time), so the neighbouring buckets' tiles
may win there. For each token count every distinct tile of the table whose bucket lies within
a factor of two of the pair count is timed (gate/up + down, CUDA-graph replays, uniform top-2
routing averaged over `--samples` draws; Mixtral-8x7B's shape by default). One JSON line per
(tokens, tile) with `chosen` marking what choose_config serves today.
"""
from __future__ import annotations

import argparse
import json

import torch

from graph_timing import graph_time_us, jsonl_emitter
from kvflow.kernels import fused_moe as fm
from moe_tune import add_shape_args, expert_weights, uniform_routing


def main() -> int:
    ap = argparse.ArgumentParser()
    add_shape_args(ap)
    ap.add_argument("--tokens", default="200,208,216,224,232,240,248,256")
    ap.add_argument("--samples", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    emit = jsonl_emitter(args.out)
    e, h, inter, k = args.experts, args.hidden, args.inter, args.topk
    dtype, dev = torch.bfloat16, torch.device("cuda", 0)
    w13, w2 = expert_weights(e, h, inter, dev, dtype)
    table = fm._tuned_table(torch.cuda.get_device_name(0), fm.shape_key(e, h, inter, dtype))
    if not table:
        raise SystemExit("no tuned table for this GPU and shape")
    for t in (int(s) for s in args.tokens.split(",")):
        n = t * k
        chosen = json.dumps(fm.choose_config(n, dtype, e, h, inter, dev), sort_keys=True)
        x = torch.randn(t, h, device=dev, dtype=dtype)
        out = torch.empty(n, h, device=dev, dtype=dtype)
        routings = [uniform_routing(t, e, k, dev) for _ in range(args.samples)]
        seen = set()
        for bucket, cfg in table:
            key = json.dumps(cfg, sort_keys=True)
            if key in seen or not n / 2 <= bucket <= 2 * n:
                continue
            seen.add(key)
            bm = cfg["block_m"]
            cases = []
            for w_s, ids_s in routings:
                pairs, block_expert = fm.align_by_expert(ids_s, e, bm)
                hbuf = torch.zeros(pairs.numel(), inter, device=dev, dtype=dtype)
                cases.append((pairs, block_expert, hbuf, w_s.reshape(-1).float()))
            gu = graph_time_us([lambda c=c: fm.launch_gate_up(x, w13, c[2], c[0], c[1], k, bm,
                                                              cfg["gate_up"]) for c in cases])
            dn = graph_time_us([lambda c=c: fm.launch_down(c[2], w2, out, c[0], c[1], c[3], bm,
                                                           cfg["down"]) for c in cases])
            emit(dict(tokens=t, pairs=n, bucket=bucket, block_m=bm, gate_up_us=round(gu, 2),
                      down_us=round(dn, 2), us=round(gu + dn, 2), chosen=key == chosen))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
