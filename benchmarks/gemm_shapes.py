"""TFLOP/s of torch's bf16 linear (cuBLAS) on a model's projection shapes, alone on the device.

    python3 benchmarks/gemm_shapes.py CONFIG_DIR [--rows 512,4096,16384]

Per projection (q|k|v, o, gate|up, down) and row count: median ms of 20 launches (CUDA events)
and TFLOP/s, to compare with what the prefill steps reach inside the model
(benchmarks/profile_workload.py's linear_tflops_if_all_time).
"""
from __future__ import annotations

import argparse
import json
import statistics

import torch



def shapes(cfg: dict) -> dict[str, tuple[int, int]]:
    h = cfg["hidden_size"]
    heads = cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads", heads)
    d = cfg.get("head_dim") or h // heads
    inter = cfg["intermediate_size"]
    return {"qkv": ((heads + 2 * kv) * d, h), "o": (h, heads * d), "gate_up": (2 * inter, h),
            "down": (h, inter)}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--rows", default="512,4096,16384")
    args = p.parse_args()
    with open(f"{args.model}/config.json") as f:
        cfg = json.load(f)
    dev = torch.device("cuda")
    out = {}
    for name, (n, k) in shapes(cfg).items():
        w = torch.randn(n, k, dtype=torch.bfloat16, device=dev) * 0.02
        for m in (int(r) for r in args.rows.split(",")):
            x = torch.randn(m, k, dtype=torch.bfloat16, device=dev)
            for _ in range(3):
                torch.nn.functional.linear(x, w)
            times = []
            for _ in range(20):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                torch.nn.functional.linear(x, w)
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b))
            ms = statistics.median(times)
            out[f"{name} M={m}"] = dict(n=n, k=k, ms=round(ms, 4),
                                        tflops=round(2 * m * n * k / ms / 1e9, 1))
    print(json.dumps(dict(model=args.model, gpu=torch.cuda.get_device_name(0), gemms=out)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
