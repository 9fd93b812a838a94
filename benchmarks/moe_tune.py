"""Search the fused-MoE tiles for one expert shape on this GPU and write the tuned table.

    python3 benchmarks/moe_tune.py [--experts 8 --hidden 4096 --inter 14336 --topk 2]
                                   [--tokens 1,2,4,...] [--samples 3] [--budget-s 300]
                                   [--out DIR]

For each token count T (uniformly random routing, as dummy weights give), every BLOCK_M that
makes sense for T*K pairs is tried; for each, the gate/up and the down kernel are searched
separately (they share only BLOCK_M): first BLOCK_N x BLOCK_K at fixed warps/stages, then
warps x stages around the best, then (past decode sizes) the program order GROUP_M. Each T
also times cuBLAS on the same products with the pairs spread evenly over the experts (one
batched GEMM, no gather, no padding): the bar a grouped GEMM is measured against. Times are
CUDA-graph replays (launch overhead excluded, as in the decode graphs). Writes
$OUT/moe-tune.json (every measurement) and $OUT/fused_moe.json in the format of
kvflow/kernels/configs/fused_moe.json ({gpu: {shape: [[max_pairs, config], ...]}}), to be
merged into that file.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import time

import torch

from graph_timing import graph_time_us
from kvflow.kernels import fused_moe as fm


def add_shape_args(ap: argparse.ArgumentParser) -> None:
    """The expert shape (defaults: Mixtral-8x7B's)."""
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--inter", type=int, default=14336)
    ap.add_argument("--topk", type=int, default=2)


def expert_weights(e: int, h: int, inter: int, dev, dtype) -> tuple:
    """Random w13 [E, 2I, H] and w2 [E, H, I] (seeded)."""
    torch.manual_seed(0)
    return (torch.randn(e, 2 * inter, h, device=dev, dtype=dtype) * 0.02,
            torch.randn(e, h, inter, device=dev, dtype=dtype) * 0.02)


def uniform_routing(t: int, e: int, k: int, dev) -> tuple:
    """Each token's top-k of uniform random scores, as dummy weights route: (weights [T, K]
    summing to 1, ids [T, K])."""
    w, ids = torch.rand(t, e, device=dev).topk(k, dim=-1)
    return w / w.sum(-1, keepdim=True), ids


def block_ms(pairs: int) -> list[int]:
    if pairs <= 64:
        return [16]
    if pairs <= 256:
        return [16, 32, 64]
    if pairs <= 512:
        return [32, 64, 128]
    if pairs <= 4096:
        return [32, 64, 128]
    return [64, 128]


def stage1(block_m: int, small: bool, kernel: str) -> list[dict]:
    if small:
        ns = [16, 32, 64, 128] if kernel == "down" else [32, 64, 128]
        return [dict(block_n=n, block_k=k, num_warps=4, num_stages=4)
                for n, k in itertools.product(ns, [128, 256])]
    warps = 8 if block_m >= 64 else 4
    return [dict(block_n=n, block_k=k, num_warps=warps, num_stages=3)
            for n, k in itertools.product([64, 128, 256], [64, 128])]


def stage2(best: dict) -> list[dict]:
    return [dict(best, num_warps=w, num_stages=s)
            for w, s in itertools.product([4, 8], [2, 3, 4, 5])
            if (w, s) != (best["num_warps"], best["num_stages"])]


def stage3(best: dict) -> list[dict]:
    """Program orders: row blocks fastest over the grid (0) or within groups."""
    return [dict(best, group_m=g) for g in (1, 4, 8, 16, 32) if g != best.get("group_m", 0)]


def search(time_fn, candidates: list[dict]) -> tuple[dict | None, float, list]:
    rows, best, best_us = [], None, float("inf")
    for tile in candidates:
        try:
            us = time_fn(tile)
        except Exception as exc:  # out of shared memory / registers: not a candidate
            rows.append(dict(tile, error=type(exc).__name__))
            continue
        rows.append(dict(tile, us=round(us, 2)))
        if us < best_us:
            best, best_us = tile, us
    return best, best_us, rows


def main():
    ap = argparse.ArgumentParser()
    add_shape_args(ap)
    ap.add_argument("--tokens", default="1,4,16,32,64,128,256,512,1024,2048,4096,8192")
    ap.add_argument("--budget-s", type=float, default=300.0)
    ap.add_argument("--samples", type=int, default=1,
                    help="routings per token count; a tile's time is their mean (the tile that "
                         "wins on one draw of per-expert row counts may lose on the next)")
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/out"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    e, h, inter, k = args.experts, args.hidden, args.inter, args.topk
    dtype, dev = torch.bfloat16, torch.device("cuda", 0)
    w13, w2 = expert_weights(e, h, inter, dev, dtype)
    name = torch.cuda.get_device_name(0)
    key = fm.shape_key(e, h, inter, dtype)
    tokens = [int(t) for t in args.tokens.split(",")]
    deadline = time.monotonic() + args.budget_s
    results, table = [], []
    for t in tokens:
        pairs_n = t * k
        x = torch.randn(t, h, device=dev, dtype=dtype)
        routings = []
        for _ in range(args.samples):
            w_s, ids_s = uniform_routing(t, e, k, dev)
            routings.append((w_s.reshape(-1).float(), ids_s))
        weights, ids = routings[0]
        out = torch.empty(pairs_n, h, device=dev, dtype=dtype)
        # Prefill-sized calls take milliseconds: replay for ~30 ms instead of 200 calls.
        timing = dict(reps=3, iters=None, target_ms=30.0) if pairs_n > 1024 else {}
        default = fm.default_config(pairs_n, dtype)
        rec = {"tokens": t, "pairs": pairs_n, "block_m": {}}
        best_total, best_cfg = float("inf"), None
        small = pairs_n <= 64
        for bm in block_ms(pairs_n):
            if time.monotonic() > deadline:
                break
            aligned = []                     # (pairs, block_expert, hbuf, weights) per routing
            for w_s, ids_s in routings:
                pairs, block_expert = fm.align_by_expert(ids_s, e, bm)
                hbuf = torch.randn(pairs.numel(), inter, device=dev, dtype=dtype) * 0.1
                aligned.append((pairs, block_expert, hbuf, w_s))

            def gate_up(tile, bm=bm, aligned=aligned):
                return graph_time_us([
                    lambda a=a: fm.launch_gate_up(x, w13, a[2], a[0], a[1], k, bm, tile)
                    for a in aligned], **timing)

            def down(tile, bm=bm, aligned=aligned):
                return graph_time_us([
                    lambda a=a: fm.launch_down(a[2], w2, out, a[0], a[1], a[3], bm, tile)
                    for a in aligned], **timing)

            per = {}
            for kname, fn in (("gate_up", gate_up), ("down", down)):
                b1, _, rows1 = search(fn, stage1(bm, small, kname))
                b2, us2, rows2 = search(fn, [b1] + stage2(b1)) if b1 else (None, float("inf"), [])
                rows3 = []
                if b2 and not small:
                    b2, us2, rows3 = search(fn, [b2] + stage3(b2))
                    rows3 = rows3[1:]
                per[kname] = {"best": b2, "us": round(us2, 2),
                              "tried": rows1 + rows2[1:] + rows3}
            total = per["gate_up"]["us"] + per["down"]["us"]
            rec["block_m"][bm] = per
            if total < best_total:
                best_total = total
                best_cfg = {"block_m": bm, "gate_up": per["gate_up"]["best"],
                            "down": per["down"]["best"]}
        if best_cfg is None:
            print(f"T={t}: out of time budget", flush=True)
            break
        # The untuned default on the same routing, for the record.
        pairs, block_expert = fm.align_by_expert(ids, e, default["block_m"])
        hbuf = torch.randn(pairs.numel(), inter, device=dev, dtype=dtype) * 0.1
        dflt_us = (graph_time_us(lambda: fm.launch_gate_up(x, w13, hbuf, pairs, block_expert, k,
                                                           default["block_m"], default["gate_up"]))
                   + graph_time_us(lambda: fm.launch_down(hbuf, w2, out, pairs, block_expert,
                                                          weights, default["block_m"],
                                                          default["down"])))
        # cuBLAS on the same products, pairs spread evenly (rounded up) over the experts.
        rows_e = -(-pairs_n // e)
        xe = torch.randn(e, rows_e, h, device=dev, dtype=dtype)
        he = torch.randn(e, rows_e, inter, device=dev, dtype=dtype)
        bmm_gu = graph_time_us(lambda: torch.bmm(xe, w13.transpose(1, 2)), **timing)
        bmm_dn = graph_time_us(lambda: torch.bmm(he, w2.transpose(1, 2)), **timing)
        flop = 2 * pairs_n * h * inter * 3
        active = min(e, pairs_n)  # experts whose weights are read (uniform routing)
        wbytes = active * 3 * inter * h * 2
        rec.update(best=best_cfg, best_us=round(best_total, 2), default=default,
                   default_us=round(dflt_us, 2), weight_tb_s=round(wbytes / best_total / 1e6, 3),
                   tflops=round(flop / best_total / 1e6, 1),
                   cublas_bmm_us=dict(gate_up=round(bmm_gu, 2), down=round(bmm_dn, 2)),
                   cublas_bmm_tflops=round(flop / (bmm_gu + bmm_dn) / 1e6, 1))
        results.append(rec)
        table.append([pairs_n, best_cfg])
        print(f"T={t:5d} pairs={pairs_n:6d} best {best_total:9.1f} us "
              f"({wbytes / best_total / 1e6:.2f} TB/s weights, {flop / best_total / 1e6:.0f} "
              f"TFLOP/s)  cuBLAS bmm {bmm_gu + bmm_dn:9.1f} us  default {dflt_us:9.1f} us  "
              f"{json.dumps(best_cfg)}", flush=True)
    with open(os.path.join(args.out, "moe-tune.json"), "w") as f:
        json.dump({"gpu": name, "shape": key, "torch": torch.__version__, "results": results}, f,
                  indent=1)
    with open(os.path.join(args.out, "fused_moe.json"), "w") as f:
        json.dump({name: {key: table}}, f, indent=1)


if __name__ == "__main__":
    main()
