"""Sweep the decode attention tiles at large batch: how close to HBM bandwidth can the
throughput workloads' decode steps get?

    source benchmarks/device_env.sh && python3 benchmarks/attention_tune.py [--out DIR]
        [--batch 512[,64,...]] [--context 512,768] [--models qwen3-0.6b,llama3.1-8b]
        [--sweep full|warps] [--layout nhd,hnd] [--cache-blocks 0,69632] [--smoke]

Why: Qwen3-0.6B's throughput8k run is 81% attention (decode steps of ~500 requests read
~37 GB of KV each at ~4.06 TB/s, against the ~4.3 TB/s a device copy reaches), and the decode
tile configuration (kernels/attention_config.py: 64-token KV tiles, 4 warps, 2 stages) was
chosen in session 3 on shorter sweeps.

What: one decode step's attention for --batch requests with context lengths uniform in
--context (lo,hi) over a paged cache (block size 16 unless --block-size, blocks shuffled as a
long-running engine leaves them), per model's head layout, timed as CUDA-graph replays
(graph_timing); every KV tile x warps x stages variant (one launch, no split: the grid has
batch x KV-head programs, far more than SMs), and the heuristic's own choice. TB/s counts the
K and V bytes read.
--layout hnd stores each block head-major ([KV, block_size, D] in memory, so one head's page is
contiguous) behind the same logical [blocks, block_size, KV, D] view the kernels take.
Writes DIR/attention_tune.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os

import torch

from kvflow.kernels.attention import unified_attention
from kvflow.kernels.attention_config import choose_config

MODELS = {"qwen3-0.6b": (16, 8, 128), "llama3.1-8b": (32, 8, 128)}   # q heads, KV heads, D


def case(batch, lo, hi, heads, kv, d, device, block_size=16, seed=0, order="random",
         layout="nhd", cache_blocks=0, blocks_kind="random"):
    """order: the requests' order in the batch by context length (random as drawn, or sorted
    longest / shortest first: the grid dispatches programs in request order; "perm": random
    batch order dispatched longest first through request_order, as the decode graphs do).
    blocks "runs": each request's blocks consecutive (a prompt's, allocated together), the
    requests' runs in random places; else every block random. Returns request_order too."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi + 1, (batch,), generator=g)
    request_order = None
    if order == "perm":
        request_order = torch.argsort(lens, descending=True).to(torch.int32).to(device)
    elif order != "random":
        lens = lens.sort(descending=order == "desc").values
    blocks = (lens + block_size - 1) // block_size
    total = int(blocks.sum())
    # The batch's blocks: a shuffle of the blocks it needs, or (cache_blocks) drawn at random
    # from a cache of that many, as an engine's allocator spreads a long run's working set.
    pool = max(total, cache_blocks)
    if blocks_kind == "runs":   # room for every request's run at a slot of the longest's size
        pool = max(pool, batch * int(blocks.max()))
        starts = torch.randperm(pool // int(blocks.max()), generator=g)[:batch] * int(blocks.max())
        perm = torch.cat([torch.arange(int(st), int(st) + int(b)) for st, b in
                          zip(starts, blocks)]).to(torch.int32)
    else:
        perm = torch.randperm(pool, generator=g)[:total].to(torch.int32)
    total = pool
    table = torch.zeros(batch, int(blocks.max()), dtype=torch.int32)
    o = 0
    for i, b in enumerate(blocks.tolist()):
        table[i, :b] = perm[o:o + b]
        o += b
    if cache_blocks:   # large: filled on the device
        cache = torch.empty(2, total, block_size, kv, d, dtype=torch.bfloat16,
                            device=device).normal_()
    else:
        cache = torch.randn(2, total, block_size, kv, d, generator=g).to(torch.bfloat16).to(device)
    if layout == "hnd":   # same values, one head's page contiguous
        cache = cache.permute(0, 1, 3, 2, 4).contiguous().permute(0, 1, 3, 2, 4)
    q = torch.randn(batch, heads, d, generator=g).to(torch.bfloat16).to(device)
    qsl = torch.arange(batch + 1, dtype=torch.int32).to(device)
    kv_bytes = int(lens.sum()) * kv * d * 2 * 2
    return (q, cache, qsl, lens.to(torch.int32).to(device), table.to(device), int(hi), kv_bytes,
            request_order)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/out"))
    ap.add_argument("--batch", default="512", help="one or more batch sizes, comma-separated")
    ap.add_argument("--sweep", default="full", choices=("full", "warps", "splits", "none"),
                    help="full: KV tile x warps x stages; warps: 1, 2, 4 warps at the heuristic's "
                         "tile; splits: 1-8 split-KV segments x 2, 4 warps; none: the heuristic")
    ap.add_argument("--context", default="512,768")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--order", default="random", help="random, desc or asc (comma-separated: "
                    "each), the requests' order by context length")
    ap.add_argument("--layout", default="nhd", help="nhd and/or hnd (comma-separated): the "
                    "KV cache's memory order within a block (token-major or head-major)")
    ap.add_argument("--cache-blocks", default="0", help="comma-separated: blocks in the cache "
                    "the batch's blocks are drawn from (0: just the batch's, shuffled)")
    ap.add_argument("--layers", type=int, default=1, help="caches (one per layer, the same "
                    "batch) timed in turn, as a decode step reads one layer's after another")
    ap.add_argument("--chain-o", type=int, default=0, help="hidden size N: follow each launch "
                    "by an [batch, heads x D] x [heads x D, N] cuBLAS product (a step's o "
                    "projection) and report the attention's share (pair minus product alone)")
    ap.add_argument("--blocks", default="random", choices=("random", "runs"),
                    help="the batch's blocks: each random, or each request's consecutive")
    ap.add_argument("--block-size", type=int, default=16, help="KV block size (the engine's "
                    "default on CUDA is 64: config.DEFAULT_BLOCK_SIZE)")
    ap.add_argument("--smoke", action="store_true", help="CPU check (TRITON_INTERPRET=1)")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    lo, hi = (int(v) for v in args.context.split(","))
    device = "cpu" if args.smoke else "cuda"
    batches = [int(b) for b in args.batch.split(",")]
    if args.smoke:
        batches, lo, hi = [3], 20, 40
    records = []
    refs = {}
    for model, batch, order, layout, nblocks in itertools.product(
            args.models.split(","), batches, args.order.split(","), args.layout.split(","),
            [int(v) for v in args.cache_blocks.split(",")]):
        heads, kv, d = MODELS[model]
        q, cache, qsl, lens, table, max_len, kv_bytes, request_order = case(
            batch, lo, hi, heads, kv, d, device, block_size=args.block_size, order=order,
            layout=layout,
            cache_blocks=0 if args.smoke else nblocks, blocks_kind=args.blocks)
        out = torch.empty_like(q)
        caches = [cache] + [torch.empty_like(cache).normal_() for _ in range(args.layers - 1)]
        o_us = 0.0

        def o_proj(w):      # --chain-o: a step's o projection of the attention output
            return torch.mm(out.view(batch, -1), w.t())

        if args.chain_o:    # its weights per layer, and its time alone
            o_ws = [torch.randn(args.chain_o, heads * d, device=device, dtype=torch.bfloat16)
                    for _ in caches]
            if not args.smoke:
                from graph_timing import graph_time_us
                o_us = graph_time_us([lambda w=w: o_proj(w) for w in o_ws], reps=5, iters=10)
        base = choose_config(batch, batch, heads, kv, d, 1, 4096, torch.bfloat16)
        variants = [("heuristic", base)]
        if args.sweep == "splits":
            grid = [dict(num_splits=sp, num_warps=w)
                    for sp, w in itertools.product((1, 2, 4, 8), (2, 4))]
        elif args.sweep == "full":
            grid = [dict(block_n=bn, num_warps=w, num_stages=st) for bn, w, st in
                    itertools.product((32, 64, 128), (2, 4, 8), (2, 3, 4))]
        elif args.sweep == "warps":
            grid = [dict(num_warps=w) for w in (1, 2, 4)]
        else:
            grid = []
        for change in grid:
            c = dataclasses.replace(base, **change)
            if c != base:
                variants.append(("sweep", c))
        if args.smoke:
            variants = variants[:3]
        ref = refs.get((model, batch, order, nblocks))   # every layout: the same attention
        for kind, cfg in variants:
            def fn(cfg=cfg, cache=cache):
                unified_attention(q, cache[0], cache[1], qsl, lens, table, max_query_len=1,
                                  max_seq_len=4096, scale=d ** -0.5, out=out, config=cfg,
                                  request_order=request_order)
            # --layers: one cache per layer, run in turn as a step runs its layers; --chain-o:
            # each followed by the o projection (cuBLAS, launched without PDL), as in a step
            if args.chain_o:
                fns = [lambda cfg=cfg, c=c, w=w: (fn(cfg, c), o_proj(w))
                       for c, w in zip(caches, o_ws)]
            else:
                fns = [lambda cfg=cfg, c=c: fn(cfg, c) for c in caches]
            try:
                fn()
                if ref is None:
                    ref = refs[(model, batch, order, nblocks)] = out.clone()
                else:       # every variant computes the same attention
                    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)
                if args.smoke:
                    us = 0.0
                else:
                    from graph_timing import graph_time_us
                    us = graph_time_us(fns, reps=5, iters=10) - o_us
            except Exception as e:   # a tile that does not fit: recorded, skipped
                records.append(dict(model=model, batch=batch, kind=kind,
                                    layout=layout, config=dataclasses.asdict(cfg),
                                    error=str(e)[:200]))
                continue
            rec = dict(model=model, kind=kind, order=order, layout=layout, blocks=args.blocks,
                       cache_blocks=int(cache.shape[1]), layers=len(caches),
                       chain_o=args.chain_o, o_us=round(o_us, 1), config=dataclasses.asdict(cfg),
                       us=round(us, 1),
                       tb_s=round(kv_bytes / us / 1e6, 3) if us else None, batch=batch,
                       context=[lo, hi], kv_gb=round(kv_bytes / 1e9, 3))
            records.append(rec)
            print(json.dumps(rec), flush=True)
        best = min((r for r in records if r["model"] == model and r["batch"] == batch
                    and r.get("order") == order and r.get("layout") == layout
                    and r.get("cache_blocks") == int(cache.shape[1]) and r.get("us")),
                   key=lambda r: r["us"], default=None)
        if best:
            print(json.dumps(dict(model=model, batch=batch, order=order, layout=layout,
                                  cache_blocks=int(cache.shape[1]), best=best)), flush=True)
    with open(os.path.join(args.out, "attention_tune.json"), "w") as f:
        json.dump(records, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
