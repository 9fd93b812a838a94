"""The fused MoE's persistent kernels against its one-program-a-tile kernels, alone.

    python3 benchmarks/moe_persistent_probe.py [--tokens 384,512,8192] [--samples 3] [--out F]

Mixtral-8x7B's expert shape by default (moe_tune.py's shape arguments), uniform top-2 routing
(`--samples` draws, times averaged), CUDA-graph replays. For each token count the tuned tile
of kernels/configs/fused_moe.json (`choose_config`) is timed as it is, then as a persistent
launch (`persistent` = 1 or 2 programs a SM) at its own and neighbouring stage counts. The
question (docs/performance.md, session 30): at the ridden steps' ~96 rows an expert every SM
holds one large-tile program, and each program's pipeline fill and epilogue run with nothing
under them; a persistent program that pipelines across its tiles hides them. Outputs of every
variant are checked equal to the baseline's (same tiles, same arithmetic). One JSON line per
(tokens, kernel, variant); a summary line per token count.
"""
from __future__ import annotations

import argparse

import torch

from graph_timing import graph_time_us, jsonl_emitter
from kvflow.kernels import fused_moe as fm
from moe_tune import add_shape_args, expert_weights, uniform_routing


def main() -> int:
    ap = argparse.ArgumentParser()
    add_shape_args(ap)
    ap.add_argument("--tokens", default="192,384,416,448,512,1024,8192")
    ap.add_argument("--samples", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    emit = jsonl_emitter(args.out)
    e, h, inter, k = args.experts, args.hidden, args.inter, args.topk
    dtype, dev = torch.bfloat16, torch.device("cuda", 0)
    w13, w2 = expert_weights(e, h, inter, dev, dtype)
    for t in (int(s) for s in args.tokens.split(",")):
        cfg = fm.choose_config(t * k, dtype, e, h, inter, dev)
        bm = cfg["block_m"]
        x = torch.randn(t, h, device=dev, dtype=dtype)
        out = torch.empty(t * k, h, device=dev, dtype=dtype)
        cases = []                               # (pairs, block_expert, hbuf, weights)
        for _ in range(args.samples):
            w_s, ids_s = uniform_routing(t, e, k, dev)
            pairs, block_expert = fm.align_by_expert(ids_s, e, bm)
            hbuf = torch.zeros(pairs.numel(), inter, device=dev, dtype=dtype)
            cases.append((pairs, block_expert, hbuf, w_s.reshape(-1).float()))
        timing = dict(reps=3, iters=None, target_ms=30.0) if t * k > 1024 else {}

        def run(kernel: str, tile: dict, c) -> None:
            if kernel == "gate_up":
                fm.launch_gate_up(x, w13, c[2], c[0], c[1], k, bm, tile)
            else:
                fm.launch_down(c[2], w2, out, c[0], c[1], c[3], bm, tile)

        summary = {"tokens": t, "block_m": bm}
        for kernel in ("gate_up", "down"):
            base = dict(cfg[kernel])
            variants = [("tuned", base)]
            for per_sm in (1, 2):
                for stages in sorted({base["num_stages"] - 1, base["num_stages"],
                                      base["num_stages"] + 1} - {1}):
                    variants.append((f"persistent{per_sm}-s{stages}",
                                     dict(base, persistent=per_sm, num_stages=stages)))
            ref = None
            best = None
            for name, tile in variants:
                try:
                    us = graph_time_us([lambda c=c: run(kernel, tile, c) for c in cases],
                                       **timing)
                except Exception as exc:      # out of shared memory / registers
                    emit(dict(tokens=t, kernel=kernel, variant=name, error=type(exc).__name__))
                    continue
                run(kernel, tile, cases[0])
                got = (cases[0][2] if kernel == "gate_up" else out).clone()
                if ref is None:
                    ref = got
                same = bool(torch.equal(got, ref))
                emit(dict(tokens=t, kernel=kernel, variant=name, us=round(us, 2), tile=tile,
                          equal_to_tuned=same))
                if same and (best is None or us < best[1]):
                    best = (name, us)
                if name == "tuned":
                    summary[f"{kernel}_tuned_us"] = round(us, 2)
            summary[f"{kernel}_best"] = best[0]
            summary[f"{kernel}_best_us"] = round(best[1], 2)
        tuned = summary["gate_up_tuned_us"] + summary["down_tuned_us"]
        new = summary["gate_up_best_us"] + summary["down_best_us"]
        summary.update(tuned_us=round(tuned, 1), best_us=round(new, 1),
                       gain=round(tuned / new - 1, 4))
        emit(summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
