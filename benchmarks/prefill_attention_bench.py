"""How fast is the paged attention kernel on a prefill step, and what would a better tile buy?

    source benchmarks/device_env.sh && python3 benchmarks/prefill_attention_bench.py [--out F]
        [--models qwen3-0.6b,llama3.1-8b] [--block-sizes 16,64] [--sweep] [--smoke]

Why: a nanovllm prefill step (16K new tokens in ~29 prompts of U(100, 1024) tokens, no prefix)
spends ~10 ms of its ~37 ms in attention at ~145 TFLOP/s (Qwen3-0.6B, H200), a third of what
dense bf16 GEMMs reach. Is that the paged gather (K/V rows read through the block table), the
tile, or short causal sequences?

What: one such step's attention (lengths drawn like the workload, packed to <= --tokens) over a
paged cache whose blocks are shuffled, timed as CUDA-graph replays; TFLOP/s counts the causal
products only (4 * D * H * sum L(L+1)/2). Rows: the heuristic's config; with --sweep every
block_m x block_n x warps x stages that fits; "contiguous": the same launch over a cache whose
blocks are in order and 128 tokens long (one table entry per KV tile: the gather's cost);
torch SDPA (flash, GQA) on the prompts one call each, and on an equal-length batch of the
mean length (the cuDNN/flash reference for sequences this short). Writes JSON lines to --out.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math

import torch
import torch.nn.functional as F

from kvflow.kernels.attention import unified_attention
from kvflow.kernels.attention_config import AttentionConfig, choose_config, device_limits
from graph_timing import graph_time_us

# q heads, KV heads, D: the two bench configs' layouts, and one MHA and one 8-query-per-KV layout
# (Llama-2-7B, Llama-3.1-70B) to check the tile rule beyond them.
MODELS = {"qwen3-0.6b": (16, 8, 128), "llama3.1-8b": (32, 8, 128), "llama2-7b": (32, 32, 128),
          "llama3.1-70b": (64, 8, 128)}


def draw_lengths(tokens: int, lo: int, hi: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    lens, total = [], 0
    while True:
        n = int(torch.randint(lo, hi + 1, (1,), generator=g))
        if total + n > tokens:
            if tokens - total >= 16:
                lens.append(tokens - total)   # the step's last prompt is a chunk
            return lens
        lens.append(n)
        total += n


def build(lens, heads, kv, d, block_size, device, shuffle=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    T = sum(lens)
    q = torch.randn(T, heads, d, generator=g).to(device, torch.bfloat16)
    nblk = [math.ceil(n / block_size) for n in lens]
    total = sum(nblk)
    perm = torch.randperm(total, generator=g) if shuffle else torch.arange(total)
    width = max(nblk)
    table = torch.zeros(len(lens), width, dtype=torch.int32)
    at = 0
    for i, b in enumerate(nblk):
        table[i, :b] = perm[at:at + b]
        at += b
    kc = torch.randn(total, block_size, kv, d, generator=g).to(device, torch.bfloat16)
    vc = torch.randn(total, block_size, kv, d, generator=g).to(device, torch.bfloat16)
    qsl = torch.tensor([0] + list(itertools.accumulate(lens)), dtype=torch.int32, device=device)
    sl = torch.tensor(lens, dtype=torch.int32, device=device)
    return q, kc, vc, qsl, sl, table.to(device)


def causal_flops(lens, heads, d):
    return 4 * d * heads * sum(n * (n + 1) // 2 for n in lens)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--models", default="qwen3-0.6b,llama3.1-8b")
    ap.add_argument("--block-sizes", default="16,64")
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--lengths", default="100,1024")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--configs", default=None,
                    help="block_m x block_n x warps x stages list instead of the full --sweep, "
                         "e.g. 64x64x4x2,128x128x8x3")
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    dev = torch.device("cuda")
    num_sms, smem = device_limits(dev)
    lo, hi = (int(x) for x in args.lengths.split(","))
    tokens = 2048 if args.smoke else args.tokens
    lens = draw_lengths(tokens, lo, hi, seed=0)   # lo == hi: throughput8k's equal prompts
    rows = []

    def emit(row):
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")

    for model in args.models.split(","):
        heads, kv, d = MODELS[model]
        flops = causal_flops(lens, heads, d)
        base = dict(model=model, lengths=[lo, hi], prompts=len(lens), tokens=sum(lens), mean_len=sum(lens) / len(lens))
        sizes = [int(x) for x in args.block_sizes.split(",")]
        for bs in sizes + ([] if args.configs else [-128]):
            contiguous = bs < 0
            block_size = abs(bs)
            q, kc, vc, qsl, sl, table = build(lens, heads, kv, d, block_size, dev,
                                              shuffle=not contiguous)
            out = torch.empty_like(q)
            scale = d ** -0.5
            heur = choose_config(q.shape[0], len(lens), heads, kv, d, max(lens), max(lens),
                                 q.dtype, num_sms, None, smem)
            cfgs = [("heuristic", heur)]
            if (args.sweep or args.configs) and not contiguous:
                qpk_pad = triton_next_pow2(heads // kv)
                grid = (itertools.product((64, 128), (64, 128), (4, 8), (2, 3, 4)) if args.sweep
                        else [tuple(int(v) for v in c.split("x")) for c in args.configs.split(",")])
                for bm, bn, w, st in grid:
                    bq = bm // qpk_pad
                    c = AttentionConfig(bm, bq, bn, w, st, 1, bq >= max(lens), False)
                    if c != heur:
                        cfgs.append((f"m{bm}n{bn}w{w}s{st}", c))
            ref = None
            for name, cfg in cfgs:
                def fn(cfg=cfg):
                    unified_attention(q, kc, vc, qsl, sl, table, max(lens), max(lens), scale,
                                      out=out, config=cfg)
                try:
                    fn()
                    torch.cuda.synchronize()
                    if ref is None:
                        ref = out.clone()
                    err = (out.float() - ref.float()).abs().max().item()
                    us = graph_time_us(fn, reps=5, iters=None, target_ms=20)
                except Exception as e:  # noqa: BLE001 - a config that does not compile or fit
                    emit(dict(base, block_size=block_size, config=name, error=repr(e)[:200]))
                    continue
                emit(dict(base, block_size=block_size, contiguous=contiguous, config=name,
                          cfg=[cfg.block_m, cfg.block_n, cfg.num_warps, cfg.num_stages],
                          us=round(us, 1), tflops=round(flops / us / 1e6, 1),
                          max_err_vs_first=err))
        if args.configs:
            continue
        # Torch SDPA (flash / cuDNN on sm90), one call per prompt, and an equal-length batch.
        g = torch.Generator().manual_seed(1)
        qs = [torch.randn(1, heads, n, d, generator=g).to(dev, torch.bfloat16) for n in lens]
        ks = [torch.randn(1, kv, n, d, generator=g).to(dev, torch.bfloat16) for n in lens]
        vs = [torch.randn(1, kv, n, d, generator=g).to(dev, torch.bfloat16) for n in lens]

        def per_prompt():
            for a, b, c in zip(qs, ks, vs):
                F.scaled_dot_product_attention(a, b, c, is_causal=True, enable_gqa=True)
        mean = round(sum(lens) / len(lens))
        qb = torch.randn(len(lens), heads, mean, d, device=dev, dtype=torch.bfloat16)
        kb = torch.randn(len(lens), kv, mean, d, device=dev, dtype=torch.bfloat16)
        vb = torch.randn_like(kb)
        kb_full = kb.repeat_interleave(heads // kv, 1)
        vb_full = vb.repeat_interleave(heads // kv, 1)

        def batched():
            F.scaled_dot_product_attention(qb, kb_full, vb_full, is_causal=True)
        for name, fn, fl in (("sdpa per prompt", per_prompt, flops),
                             ("sdpa equal-length batch", batched,
                              causal_flops([mean] * len(lens), heads, d))):
            try:
                us = graph_time_us(fn, reps=3, iters=None, target_ms=20)
                emit(dict(base, config=name, us=round(us, 1), tflops=round(fl / us / 1e6, 1)))
            except Exception as e:  # noqa: BLE001
                emit(dict(base, config=name, error=repr(e)[:200]))


def triton_next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


if __name__ == "__main__":
    main()
