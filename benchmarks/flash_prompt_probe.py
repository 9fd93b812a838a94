"""Would torch's bundled FlashAttention-2 (aten::_flash_attention_forward: varlen, causal,
GQA without repeating heads) run a step's fresh prompts faster than kvflow's paged kernel?

    source benchmarks/device_env.sh && python3 benchmarks/flash_prompt_probe.py [--out F]

Fresh prompts (no cached prefix) have all their K/V in the step's own k / v tensors, so they
need no block-table gather: flash reads those directly. Steps: throughput8k's 32 x 512 tokens
and nanovllm-like lengths U(100, 1024) packed to 16K tokens (benchmarks/
prefill_attention_bench.draw_lengths), Llama-3.1-8B and Qwen3-0.6B head layouts, bf16, ours
over a shuffled 64-token-block cache. Prints the schema (which torch has block_table /
seqused_k), times (CUDA-graph replays) and the largest difference from ours.
"""
from __future__ import annotations

import argparse
import json
import math
import sys

import torch

sys.path.insert(0, "benchmarks")
from graph_timing import graph_time_us  # noqa: E402
from prefill_attention_bench import draw_lengths  # noqa: E402
from kvflow.kernels.attention import unified_attention  # noqa: E402

LAYOUTS = {"llama3.1-8b": (32, 8, 128), "qwen3-0.6b": (16, 8, 128)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    op = torch.ops.aten._flash_attention_forward.default
    print("torch", torch.__version__, op._schema)
    dev = torch.device("cuda")
    rows = []
    steps = {"512x32": [512] * 32, "U(100,1024)": draw_lengths(16384, 100, 1024, 0)}
    for name, (h, kv, d) in LAYOUTS.items():
        for step, lens in steps.items():
            g = torch.Generator().manual_seed(0)
            T, bs = sum(lens), 64
            q = torch.randn(T, h, d, generator=g).to(dev, torch.bfloat16)
            k = torch.randn(T, kv, d, generator=g).to(dev, torch.bfloat16)
            v = torch.randn(T, kv, d, generator=g).to(dev, torch.bfloat16)
            nblk = [math.ceil(n / bs) for n in lens]
            perm = torch.randperm(sum(nblk), generator=g)
            bt = torch.zeros(len(lens), max(nblk), dtype=torch.int32)
            kc = torch.zeros(sum(nblk), bs, kv, d, dtype=torch.bfloat16)
            vc = torch.zeros_like(kc)
            t0, b0 = 0, 0
            for i, n in enumerate(lens):
                for j in range(nblk[i]):
                    blk = int(perm[b0 + j])
                    bt[i, j] = blk
                    lo, hi = t0 + j * bs, min(t0 + n, t0 + (j + 1) * bs)
                    kc[blk, :hi - lo] = k[lo:hi].cpu()
                    vc[blk, :hi - lo] = v[lo:hi].cpu()
                t0, b0 = t0 + n, b0 + nblk[i]
            kc, vc, bt = kc.to(dev), vc.to(dev), bt.to(dev)
            cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32,
                              device=dev)
            seq_lens = torch.tensor(lens, dtype=torch.int32, device=dev)
            out = torch.empty_like(q)
            scale = d ** -0.5
            L = max(lens)

            def ours():
                unified_attention(q, kc, vc, cu, seq_lens, bt, max_query_len=L,
                                  max_seq_len=L, scale=scale, out=out)

            def flash():
                return op(q, k, v, cu, cu, L, L, 0.0, True, False, scale=scale)[0]

            ours()
            ref = out.float().clone()
            row = dict(model=name, step=step, prompts=len(lens), tokens=T,
                       ours_us=round(graph_time_us(ours, reps=5, iters=20), 1))
            try:
                got = flash()
                row["max_abs_diff"] = (got.float() - ref).abs().max().item()
                row["flash_us"] = round(graph_time_us(flash, reps=5, iters=20), 1)
            except Exception as e:  # noqa: BLE001
                row["flash_error"] = str(e)[:300]
            flops = 4 * d * h * sum(n * (n + 1) / 2 for n in lens)
            for key in ("ours_us", "flash_us"):
                if key in row:
                    row[key.replace("_us", "_tflops")] = round(flops / row[key] / 1e6, 1)
            print(json.dumps(row), flush=True)
            rows.append(row)
    if args.out:
        with open(args.out, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
