"""Random sampling of [B, V] logits on the device: kvflow's kernel against torch's passes.

    python3 benchmarks/sample_bench.py [--vocab 151936,128256] [--rows 1,32,140,256,512,1000]
        [--impl MODULE:FUNCTION ...] [--sweep] [--out FILE]

Per (vocab, rows): us per call inside a CUDA graph (benchmarks/graph_timing) of
kvflow.kernels.sampling.sample_rows, of every extra `--impl` with the same signature
(fn(logits, temperature, seed) -> [B] int64; e.g. an older kernel on PYTHONPATH, for an A/B in
one process) and of torch's path (temperature, softmax, exponential race: the sampler's route
for rows with top-k / top-p / seeds, without the truncation). Logits are bf16 (the decode
graphs' dtype), N(0, 4) at temperature 0.6, 4.3 TB/s reading them is the floor.
--sweep also times the kernel's two launches apart over stage-1 chunks x warps ("s1 c4096
w4", "s2 c4096 w4": the tiles `sample_rows` picks were chosen from this).
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys

import torch
import triton

from graph_timing import graph_time_us
from kvflow.kernels import sampling as ks
from kvflow.kernels.pdl import pdl_launch
from kvflow.kernels.sampling import sample_rows
from kvflow.sample.sampler import sample_exponential_race


def _impl(spec: str):
    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)


def _torch_path(logits, t):
    probs = (logits.float() / t[:, None]).softmax(dim=-1)
    return sample_exponential_race(probs, {})


def sweep(logits, t) -> dict:
    """us of stage 1 and stage 2 launched on their own, per (chunk, warps)."""
    b, v = logits.shape
    pdl, row = pdl_launch(logits.device), {}
    out = torch.empty(b, dtype=torch.int64, device=logits.device)
    for chunk in (1024, 2048, 4096, 8192):
        nc = triton.cdiv(v, chunk)
        m, s = (torch.empty(b, nc, device=logits.device) for _ in range(2))
        n = torch.empty(b, nc, device=logits.device, dtype=torch.int32)
        for w in (2, 4, 8):
            def stage1(w=w):
                ks._sample_chunks_kernel[(b, nc)](logits, m, s, n, t, v, logits.stride(0), nc,
                                                  CHUNK=chunk, num_warps=w, **pdl)

            def stage2(w=w):
                ks._sample_pick_kernel[(b,)](logits, m, s, n, t, out, v, logits.stride(0), nc,
                                             1, CHUNK=chunk,
                                             NC_PAD=max(16, triton.next_power_of_2(nc)),
                                             num_warps=w, **pdl)
            stage1()            # stage 2 reads stage 1's partials
            row[f"s1 c{chunk} w{w}"] = round(graph_time_us(stage1, iters=None), 1)
            row[f"s2 c{chunk} w{w}"] = round(graph_time_us(stage2, iters=None), 1)
    return row


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab", default="151936,128256")
    ap.add_argument("--rows", default="1,32,140,256,512,1000")
    ap.add_argument("--impl", action="append", default=[])
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--out")
    args = ap.parse_args()
    dev = torch.device("cuda")
    impls = {"kvflow": sample_rows, **{s: _impl(s) for s in args.impl}}
    records = []
    for v in (int(s) for s in args.vocab.split(",")):
        for b in (int(s) for s in args.rows.split(",")):
            logits = (torch.randn(b, v, device=dev) * 2).to(torch.bfloat16)
            t = torch.full((b,), 0.6, device=dev)
            rec = dict(vocab=v, rows=b, floor_us=round(logits.numel() * 2 / 4.3e6, 2))
            for name, fn in impls.items():
                rec[name] = round(graph_time_us(lambda fn=fn: fn(logits, t, 1234), iters=None), 2)
            rec["torch"] = round(graph_time_us(lambda: _torch_path(logits, t), reps=3,
                                               iters=None), 2)
            if args.sweep:
                rec.update(sweep(logits, t))
            print(json.dumps(rec), flush=True)
            records.append(rec)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), records=records), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
