"""Does splitting a large-M bf16 linear into row chunks beat one cuBLAS call, under sustained
load (the clocks of a long prefill step, not a short burst)?

    python3 benchmarks/gemm_chunks.py CONFIG_DIR [--rows 16384] [--chunks 1,2,4] [--ms 400]

For each projection of the model (q|k|v, o, gate|up, down) and each chunk count, runs the
M-row product back to back for about --ms milliseconds (interleaving the chunk counts, three
rounds) and reports the mean ms per product and TFLOP/s.
"""
from __future__ import annotations

import argparse
import json

import torch

from gemm_shapes import shapes


def run(x, w, out, chunks: int, reps: int) -> float:
    m = x.shape[0]
    step = -(-m // chunks)
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps):
        for r0 in range(0, m, step):
            torch.matmul(x[r0:r0 + step], w.t(), out=out[r0:r0 + step])
    b.record()
    b.synchronize()
    return a.elapsed_time(b) / reps


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--rows", type=int, default=16384)
    p.add_argument("--chunks", default="1,2,4")
    p.add_argument("--ms", type=float, default=400.0)
    args = p.parse_args()
    with open(f"{args.model}/config.json") as f:
        cfg = json.load(f)
    dev = torch.device("cuda")
    counts = [int(c) for c in args.chunks.split(",")]
    res = {}
    for name, (n, k) in shapes(cfg).items():
        w = torch.randn(n, k, dtype=torch.bfloat16, device=dev) * 0.02
        x = torch.randn(args.rows, k, dtype=torch.bfloat16, device=dev)
        out = torch.empty(args.rows, n, dtype=torch.bfloat16, device=dev)
        est = run(x, w, out, 1, 3)
        reps = max(3, int(args.ms / max(est, 1e-3)))
        times = {c: [] for c in counts}
        for _ in range(3):
            for c in counts:
                times[c].append(run(x, w, out, c, reps))
        flop = 2 * args.rows * n * k
        res[name] = {f"chunks={c}": dict(ms=round(min(t), 4),
                                         tflops=round(flop / min(t) / 1e9, 1)) for c, t in times.items()}
    print(json.dumps(dict(model=args.model, rows=args.rows, gpu=torch.cuda.get_device_name(0),
                          results=res)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
