"""The prompt launch of a mixed-step CUDA graph: its grid bound, measured in the pair.

    python3 benchmarks/mixed_prompt_grid_probe.py [--heads 32 --kv-heads 8] [--out FILE]

A mixed-step graph's prompt launch (split_decodes) sizes its grid for the most q-blocks T
tokens can make: T // BLOCK_Q + min(R, T // 2) rows a KV head, since any request may hold
a 2-token prompt. Llama-3.1-8B nanovllm's ridden steps hold one or two prompts, so ~90 of
~1400 programs work; the rest find no q-block (a scan of query_start_loc) and exit. They
hold the launch's shared memory (two such programs a SM) and the decode launch beside it
starts only once every prompt program has started. This times, as CUDA-graph replays, the
pair (prompt launch, then the decode launch beside it) with the prompt grid bounded by
max_prompt_reqs (None: the bound above), on Llama-3.1-8B nanovllm's shapes (one prompt
chunk beside 40-240 decodes), and the decode launch alone for reference.
"""
from __future__ import annotations

import argparse
import sys

import torch

from graph_timing import graph_time_us, jsonl_emitter
from mixed_attention_probe import build
from kvflow.kernels import attention as attn
from kvflow.kernels.attention_config import choose_config, device_limits

# (T, decodes, the chunk's cached prefix): Llama-3.1-8B nanovllm's paced ridden steps
CASES = ((192, 40, 600), (256, 63, 700), (256, 150, 700), (320, 150, 800), (320, 230, 800),
         (384, 240, 300))
BOUNDS = (None, 64, 16, 4, 1)


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
        order = torch.argsort(sl, descending=True, stable=True).to(torch.int32)
        base = dict(T=T, decodes=nd, chunk=T - nd, chunk_ctx=ctx)
        dcfg = choose_config(T, T, H, KV, 128, 1, MS, torch.bfloat16, sms, None, smem)

        def dec():
            attn._launch(query, kc, vc, out, qsl, sl, bt, T, 1, scale, dcfg, None, None,
                         None, order, 0)
        emit(dict(base, launch="decode", us=round(graph_time_us(dec, reps=10, iters=20), 2)))
        ref = None
        for bound in BOUNDS:
            def pair(bound=bound):
                attn.unified_attention(query, kc, vc, qsl, sl, bt, T, MS, scale, out=out,
                                       split_decodes=True, request_order=order,
                                       max_prompt_reqs=bound)
            us = graph_time_us(pair, reps=10, iters=20)
            torch.cuda.synchronize()
            got = out[:T].clone()      # the decodes and the chunk (padding rows have none)
            if ref is None:
                ref = got
            torch.testing.assert_close(got.float(), ref.float(), atol=0, rtol=0)
            emit(dict(base, launch="pair", max_prompt_reqs=bound, us=round(us, 2)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
