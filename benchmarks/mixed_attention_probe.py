"""Attention of a mixed-step CUDA graph (decodes with a prompt chunk riding), launch by launch.

    python3 benchmarks/mixed_attention_probe.py [--heads 32 --kv-heads 8] [--out FILE]

Builds the inputs a mixed-step graph of T tokens and R = T request rows gives the Triton
backend (split_decodes: decodes first, then one prompt chunk over a cached prefix, then padding
rows with q_len 0) and times, as CUDA-graph replays, the decode launch as the engine chooses it
and the prefill launch under several tile / split-KV configurations. Cases: the shapes of
Mixtral-8x7B nanovllm's ridden steps (384 tokens: 64 decodes + a 320-token chunk, 200 decodes
+ 184), context lengths drawn as the run has them. One JSON line per (case, launch, config).
Launch "pair": the whole unified_attention call as the graph makes it (both launches, the
decode launch longest first).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys

import torch
import triton

from graph_timing import graph_time_us, jsonl_emitter
from kvflow.kernels import attention as attn
from kvflow.kernels.attention_config import choose_config, device_limits

BLOCK = 64


def build(T: int, nd: int, chunk_ctx: int, heads: int, kv: int, dev, seed: int = 0):
    """query [T, H, 128], K/V caches, qsl [T + 1], seq_lens [T], block table [T, max_blocks]:
    nd decodes (contexts U(100, 2048)), one chunk of T - nd tokens after chunk_ctx cached
    tokens, T - nd - 1 padding rows."""
    g = torch.Generator().manual_seed(seed)
    q_lens = [1] * nd + [T - nd] + [0] * (T - nd - 1)
    seq = ([int(x) for x in torch.randint(100, 2048, (nd,), generator=g)]
           + [chunk_ctx + T - nd] + [1] * (T - nd - 1))
    nblk = [-(-s // BLOCK) for s in seq]
    max_blocks = max(nblk)
    total = sum(nblk)
    perm = torch.randperm(total, generator=g)
    bt = torch.zeros(T, max_blocks, dtype=torch.int32)
    i = 0
    for r, n in enumerate(nblk):
        bt[r, :n] = perm[i:i + n]
        i += n
    kc = torch.randn(total, BLOCK, kv, 128, dtype=torch.bfloat16, device=dev)
    vc = torch.randn_like(kc)
    qsl = torch.zeros(T + 1, dtype=torch.int32)
    qsl[1:] = torch.tensor(q_lens).cumsum(0)
    query = torch.randn(T, heads, 128, dtype=torch.bfloat16, device=dev)
    kv_tokens = sum(s for s, q in zip(seq, q_lens) if q > 0)
    return (query, kc, vc, qsl.to(dev), torch.tensor(seq, dtype=torch.int32, device=dev),
            bt.to(dev), kv_tokens)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dev = torch.device("cuda")
    H, KV = args.heads, args.kv_heads
    sms, smem = device_limits(dev)
    emit = jsonl_emitter(args.out)
    for T, nd, ctx in ((384, 64, 700), (384, 200, 800), (384, 300, 300)):
        query, kc, vc, qsl, sl, bt, kv_tokens = build(T, nd, ctx, H, KV, dev)
        out = torch.empty_like(query)
        scale = 128 ** -0.5
        dcfg = choose_config(T, T, H, KV, 128, 1, 4096, torch.bfloat16, sms, None, smem)
        pcfg = choose_config(T, T, H, KV, 128, T, 4096, torch.bfloat16, sms, None, smem)
        variants = [("decode", dcfg, 0)]
        variants.append(("prefill", pcfg, 2))
        for splits in (2, 4):
            variants.append(("prefill", dataclasses.replace(pcfg, num_splits=splits,
                                                            fused_merge=True), 2))
        small = dataclasses.replace(pcfg, block_m=64,
                                    block_q=64 // triton.next_power_of_2(H // KV))
        for splits in (1, 2, 4):
            variants.append(("prefill", dataclasses.replace(small, num_splits=splits,
                                                            fused_merge=True), 2))
        variants.append(("prefill", dataclasses.replace(pcfg, num_stages=3), 2))
        variants.append(("prefill", dataclasses.replace(pcfg, num_warps=8), 2))
        # The whole call as the graph makes it: both launches, the decode one longest first.
        order = torch.argsort(sl, descending=True, stable=True).to(torch.int32)

        def pair():
            attn.unified_attention(query, kc, vc, qsl, sl, bt, T, 4096, scale, out=out,
                                   split_decodes=True, request_order=order)
        us = graph_time_us(pair, reps=10, iters=20)
        emit(dict(T=T, decodes=nd, chunk=T - nd, chunk_ctx=ctx, kv_tokens=kv_tokens,
                  launch="pair", us=round(us, 2)))
        base = None
        for name, cfg, min_q in variants:
            def fn(cfg=cfg, min_q=min_q):
                attn._launch(query, kc, vc, out, qsl, sl, bt, T, 1 if min_q == 0 else T,
                             scale, cfg, None, None, None, None, min_q)
            try:
                us = graph_time_us(fn, reps=10, iters=20)
            except Exception as e:   # a configuration that does not compile / fit
                us = None
                print(f"# {name} {cfg}: {type(e).__name__}: {str(e)[:200]}", file=sys.stderr)
            if name == "prefill" and us is not None:
                torch.cuda.synchronize()
                got = out.clone()
                if base is None:
                    base = got
                else:   # same rows as the default config (only the chunk's rows are written)
                    c0, c1 = int(qsl[nd]), int(qsl[nd + 1])
                    torch.testing.assert_close(got[c0:c1].float(), base[c0:c1].float(),
                                               atol=2e-2, rtol=2e-2)
            rec = dict(T=T, decodes=nd, chunk=T - nd, chunk_ctx=ctx, kv_tokens=kv_tokens,
                       launch=name, block_m=cfg.block_m, block_q=cfg.block_q,
                       block_n=cfg.block_n, warps=cfg.num_warps, stages=cfg.num_stages,
                       splits=cfg.num_splits, us=None if us is None else round(us, 2))
            emit(rec)
    return 0


if __name__ == "__main__":
    sys.exit(main())
