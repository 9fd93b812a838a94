"""The decode launch of a mixed-step CUDA graph, split-KV per request against unsplit.

    python3 benchmarks/mixed_decode_split_probe.py [--heads 32 --kv-heads 8] [--out FILE]

A mixed-step graph of T tokens has R = T request rows; its decode launch (split_decodes) gets
tiles chosen for R rows, but only the step's nd decodes work, so with nd well below R a few
long contexts set its time. This times, as CUDA-graph replays, on the shapes of
Llama-3.1-8B nanovllm's paced ridden steps (T 192-384, 40-240 decodes, contexts U(100, 2048)):
  * "decode-graph": the same decodes as a decode graph of nd rows runs them (the reference);
  * "decode": the mixed graph's decode launch alone, split S ways with segments of at least
    min_seg context tokens (S = 1: as before);
  * "pair": the whole unified_attention call as the graph makes it (prompt launch first, the
    decode launch beside it), with attention.MIXED_DECODE_SPLITS / MIN_SEG set to (S, min_seg).
One JSON line per (case, launch, S, min_seg) with us and the decodes' KV read rate.

Needs the kernel support of commit 098bc6e (AttentionConfig.min_seg_tiles, attention.MIXED_DECODE_*),
reverted after this probe measured it (session 32, docs/performance.md): check that commit out
to run it again.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys

import torch

from graph_timing import graph_time_us, jsonl_emitter
from mixed_attention_probe import build
from kvflow.kernels import attention as attn
from kvflow.kernels.attention_config import (choose_config, device_limits,
                                             dispatch_longest_first)

CASES = ((192, 40, 600), (256, 63, 700), (256, 150, 700), (320, 150, 800), (320, 230, 800),
         (384, 240, 300))
SPLITS = ((1, 0), (2, 256), (4, 128), (4, 256), (4, 512), (8, 128), (8, 256))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--max-seq-len", type=int, default=4096)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dev = torch.device("cuda")
    H, KV, MS = args.heads, args.kv_heads, args.max_seq_len
    sms, smem = device_limits(dev)
    emit = jsonl_emitter(args.out)
    scale = 128 ** -0.5
    for T, nd, ctx in CASES:
        query, kc, vc, qsl, sl, bt, _ = build(T, nd, ctx, H, KV, dev)
        out = torch.empty_like(query)
        dec_kv = int(sl[:nd].sum())
        gb = dec_kv * KV * 128 * 2 * 2 / 1e9      # the decodes' K and V, one layer
        order = torch.argsort(sl, descending=True, stable=True).to(torch.int32)
        base = dict(T=T, decodes=nd, chunk=T - nd, chunk_ctx=ctx, decode_kv_tokens=dec_kv)

        def record(launch, us, **kw):
            emit(dict(base, launch=launch, **kw, us=round(us, 2),
                      tb_s=round(gb / (us * 1e-6) / 1e3, 3)))

        # The decode graph of nd rows: its own tiles, split and order rules.
        d_order = None
        if dispatch_longest_first(nd, KV, sms, MS):
            d_order = torch.argsort(sl[:nd], descending=True, stable=True).to(torch.int32)
        dq, dqsl = query[:nd], torch.arange(nd + 1, dtype=torch.int32, device=dev)

        def dgraph():
            attn.unified_attention(dq, kc, vc, dqsl, sl[:nd], bt[:nd], 1, MS, scale,
                                   out=out[:nd], request_order=d_order)
        record("decode-graph", graph_time_us(dgraph, reps=10, iters=20))
        dcfg = choose_config(T, T, H, KV, 128, 1, MS, torch.bfloat16, sms, None, smem)
        ref = None
        for S, min_seg in SPLITS:
            cfg = dataclasses.replace(dcfg, num_splits=S,
                                      min_seg_tiles=max(1, min_seg // dcfg.block_n))

            def dec(cfg=cfg):
                attn._launch(query, kc, vc, out, qsl, sl, bt, T, 1, scale, cfg, None, None,
                             None, order, 0)
            record("decode", graph_time_us(dec, reps=10, iters=20), splits=S, min_seg=min_seg,
                   warps=cfg.num_warps)
            torch.cuda.synchronize()
            got = out[:nd].clone()
            if ref is None:
                ref = got
            torch.testing.assert_close(got.float(), ref.float(), atol=2e-2, rtol=2e-2)
            attn.MIXED_DECODE_SPLITS, attn.MIXED_DECODE_MIN_SEG = S, min_seg

            def pair():
                attn.unified_attention(query, kc, vc, qsl, sl, bt, T, MS, scale, out=out,
                                       split_decodes=True, request_order=order)
            record("pair", graph_time_us(pair, reps=10, iters=20), splits=S, min_seg=min_seg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
