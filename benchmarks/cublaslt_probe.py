"""Do cuBLASLt's other algorithms beat the one torch gets, on the decode GEMMs?

    source benchmarks/device_env.sh && python3 benchmarks/cublaslt_probe.py CONFIG_DIR
        [--rows 32,64,...] [--algos 24] [--out FILE]

Why: torch's bf16 `linear` takes cuBLAS's first heuristic choice. At nanovllm's mid-size
decode steps (Llama-3.1-8B, 32-256 requests) those products run 10-30% above max(weight read,
FLOPs) (session 11, gemm_mid.py), and a hand-written Triton GEMM did not beat them. cuBLASLt's
heuristic returns a ranked list of algorithms (tile, stages, split-K, cluster shape); timing
the whole list per shape (what PyTorch's TunableOp does on ROCm, not on CUDA) shows whether a
per-shape pick is worth wiring in.

What: per projection (q|k|v, o, gate|up, down, lm_head) and row count, CUDA-graph replays
rotating over enough weight copies that no weight comes from L2 (as gemm_mid.py): torch's
linear, then each algorithm the heuristic returns for the same problem through cublasLtMatmul
(kvflow/kernels/cublaslt.py's Plan; checked against torch's result). One JSON line per
(shape, rows). benchmarks/cublaslt_tune.py turns such timings into the engine's table.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from gemm_shapes import shapes  # noqa: E402
from graph_timing import graph_time_us  # noqa: E402
from kvflow.kernels import cublaslt  # noqa: E402

HBM_TBS, MMA_TFLOPS = 4.3, 700.0
WORKSPACE = cublaslt.MAX_WORKSPACE


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--rows", default="32,64,96,128,160,200,256,384,512,1000")
    p.add_argument("--shapes", default="qkv,o,gate_up,down,lm_head")
    p.add_argument("--algos", type=int, default=24)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    dev = torch.device("cuda", torch.cuda.current_device())
    workspace = torch.empty(WORKSPACE, dtype=torch.uint8, device=dev)
    with open(f"{args.model}/config.json") as f:
        cfg = json.load(f)
    table = dict(shapes(cfg), lm_head=(cfg["vocab_size"], cfg["hidden_size"]))
    out_f = open(args.out, "w") if args.out else None
    for name in args.shapes.split(","):
        n, k = table[name]
        copies = max(2, -(-320 * 2 ** 20 // (n * k * 2)))    # >= 320 MB of weights: no L2 hits
        ws = [torch.empty(n, k, dtype=torch.bfloat16, device=dev).uniform_(-1e-3, 1e-3)
              for _ in range(copies)]
        for m in (int(r) for r in args.rows.split(",")):
            x = torch.empty(m, k, dtype=torch.bfloat16, device=dev).uniform_(-1, 1)
            outs = [torch.empty(m, n, dtype=torch.bfloat16, device=dev) for _ in ws]
            ref = torch.nn.functional.linear(x, ws[0]).float()
            torch_us = graph_time_us([lambda w=w, o=o: torch.mm(x, w.t(), out=o)
                                      for w, o in zip(ws, outs)], reps=4, iters=10)
            lt = cublaslt.Plan(dev.index, m, n, k, torch.bfloat16)
            times = []
            for i, algo in enumerate(lt.heuristics(args.algos)):
                try:
                    outs[0].zero_()
                    lt.run(x, ws[0], outs[0], algo.algo, workspace)
                    torch.cuda.synchronize()
                    torch.testing.assert_close(outs[0].float(), ref, atol=2e-3, rtol=2e-2)
                    us = graph_time_us([lambda w=w, o=o, a=algo.algo:
                                        lt.run(x, w, o, a, workspace)
                                        for w, o in zip(ws, outs)], reps=4, iters=10)
                except Exception as e:   # an algorithm that fails or is wrong is skipped
                    print(f"{name} m={m} algo {i}: {str(e)[:120]}", file=sys.stderr)
                    continue
                times.append((round(us, 1), i, round(algo.waves, 2), algo.workspace))
            del lt
            flops, wbytes = 2 * m * n * k, n * k * 2
            floor = max(wbytes / HBM_TBS / 1e6, flops / MMA_TFLOPS / 1e6)
            best = min(times) if times else None
            rec = dict(model=os.path.basename(args.model.rstrip("/")), shape=name, m=m, n=n, k=k,
                       floor_us=round(floor, 1), torch_us=round(torch_us, 1),
                       lt_first_us=times[0][0] if times and times[0][1] == 0 else None,
                       best_us=best[0] if best else None, best_algo=best[1] if best else None,
                       best_vs_torch=round(torch_us / best[0], 3) if best else None,
                       n_algos=len(times), algos=sorted(times)[:6])
            print(json.dumps(rec), flush=True)
            if out_f:
                out_f.write(json.dumps(rec) + "\n")
                out_f.flush()
        del ws
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
