"""Measure the W4A16 GPTQ GEMM against bf16/fp16 cuBLAS on real projection shapes and search tiles.

    python3 benchmarks/w4a16_tune.py [--out FILE.json]

For each (M, N, K) of Qwen2.5-7B (qkv, o, gate_up, down; group 128) it times the default config
of kvflow.kernels.w4a16.choose_config, a staged search over tiles (BLOCK_N x BLOCK_K x SPLIT_K,
then warps x stages around the best), and x @ W in fp16 through cuBLAS. Times are CUDA-graph
replays (launch overhead excluded, as in the decode graphs). GB/s counts the packed weight,
scales and zeros once.
"""
from __future__ import annotations

import itertools
import json
import sys

import torch

from graph_timing import graph_time_us
from kvflow.kernels import w4a16

SHAPES = {"qkv": (3584, 4608), "o": (3584, 3584), "gate_up": (3584, 37888), "down": (18944, 3584)}
MS = [1, 2, 4, 8, 16]


def main():
    out_path = sys.argv[sys.argv.index("--out") + 1] if "--out" in sys.argv else None
    torch.manual_seed(0)
    results = []
    for name, (k, n) in SHAPES.items():
        qweight = torch.randint(-2**31, 2**31 - 1, (k // 8, n), dtype=torch.int32, device="cuda")
        qzeros = torch.randint(-2**31, 2**31 - 1, (k // 128, n // 8), dtype=torch.int32,
                               device="cuda")
        scales = (torch.rand(k // 128, n, device="cuda") * 0.01).half()
        w16 = torch.randn(k, n, device="cuda").half()
        nbytes = qweight.numel() * 4 + qzeros.numel() * 4 + scales.numel() * 2
        for m in MS:
            x = torch.randn(m, k, device="cuda").half()

            def run(cfg=None):
                return w4a16.gptq_gemm(x, qweight, qzeros, scales, None, 4, 128, 1, config=cfg)

            t_cublas = graph_time_us(lambda: x @ w16, iters=50)
            default = w4a16.choose_config(m, n, k, 128)
            t_default = graph_time_us(lambda: run(default), iters=50)
            best = (t_default, default)
            cands = []
            for gemv in ((True,) if m == 1 else (False, True) if m <= 8 else (False,)):
                base = dict(BLOCK_M=1 if m == 1 else 16 if m <= 16 else 64, num_warps=4,
                            num_stages=3, GEMV=gemv)
                for bn, bk, sp in itertools.product((32, 64, 128, 256), (64, 128, 256),
                                                    (1, 2, 4, 8, 16)):
                    if (m > 16 or (gemv and m > 1)) and bn == 256:
                        continue
                    if gemv and m > 1 and bk == 256:
                        continue
                    cands.append(dict(base, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=sp))
            for stage in (0, 1):
                for cfg in cands:
                    try:
                        t = graph_time_us(lambda: run(cfg), iters=20)
                    except Exception as e:  # noqa: BLE001 - out of resources etc.
                        continue
                    if t < best[0]:
                        best = (t, cfg)
                if stage == 0:
                    b = best[1]
                    cands = [dict(b, num_warps=w, num_stages=st)
                             for w, st in itertools.product((2, 4, 8), (2, 3, 4, 5))]
            # correctness of the winner against the default
            torch.testing.assert_close(run(best[1]), run(default), atol=0.5, rtol=2e-2)
            r = dict(shape=name, m=m, n=n, k=k, cublas_fp16_us=round(t_cublas, 2),
                     default_us=round(t_default, 2), best_us=round(best[0], 2),
                     best_cfg=best[1], best_gbps=round(nbytes / best[0] / 1e3, 1))
            results.append(r)
            print(json.dumps(r), flush=True)
    if out_path:
        with open(out_path, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
