"""Random sampling of [B, V] logits on the device: kvflow's kernel against torch's passes.

    python3 benchmarks/sample_bench.py [--vocab 151936,128256] [--rows 1,32,140,256,512,1000]
        [--impl MODULE:FUNCTION ...] [--out FILE]

Per (vocab, rows): us per call inside a CUDA graph (benchmarks/graph_timing) of
kvflow.kernels.sampling.sample_rows, of every extra `--impl` with the same signature
(fn(logits, temperature, seed) -> [B] int64; e.g. an older kernel on PYTHONPATH, for an A/B in
one process) and of torch's path (temperature, softmax, exponential race: the sampler's route
for rows with top-k / top-p / seeds, without the truncation). Logits are bf16 (the decode
graphs' dtype), N(0, 4) at temperature 0.6, 4.3 TB/s reading them is the floor.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys

import torch

from graph_timing import graph_time_us
from kvflow.kernels.sampling import sample_rows
from kvflow.sample.sampler import sample_exponential_race


def _impl(spec: str):
    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)


def _torch_path(logits, t):
    probs = (logits.float() / t[:, None]).softmax(dim=-1)
    return sample_exponential_race(probs, {})


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab", default="151936,128256")
    ap.add_argument("--rows", default="1,32,140,256,512,1000")
    ap.add_argument("--impl", action="append", default=[])
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
            print(json.dumps(rec), flush=True)
            records.append(rec)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), records=records), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
