"""Decode attention in the engine against the same launches alone, on the engine's own inputs.

    python3 benchmarks/attention_replay.py CONFIG_DIR [--batch 140] [--workload nanovllm]

Builds the engine as `kvflow bench throughput` does (dummy weights, bf16, max_model_len 4096)
and runs the workload until its first decode-only step of at most --batch requests (after a
larger one). Right after that step, with the decode graph's staged inputs still in place:

1. graph: the step's CUDA graph replayed (wall per step) and under torch.profiler: the
   attention kernel's mean duration per launch (a PDL launch's duration includes its wait on
   the kernel before it) and the graph's kernel table (graph_kernels);
2. alone: the same attention launches (each layer's real KV cache, the graph's seq_lens, block
   table and request order; a random query) back to back, eager and captured in one graph;
3. alone_per_layer: the first layers' launches timed on their own (events around 20 repeats);
4. variants (unless --no-variants): per-layer wall of the alone graph under other tiles
   (warps, KV tile, stages, splits) and other inputs (no order, rows presorted, contiguous
   blocks, equal lengths): which property of the real batch costs bandwidth;
5. tma (--tma; Hopper): the same launches by kernels/decode_attention_tma.py (K/V tiles by
   TMA, one KV block a tile) over warps x stages, with and without the step's request order.

The same kernel, tiles and data in both; what differs is only what runs beside it. KV bytes
are the step's sum of seq_lens x KV heads x head size x 2 (K and V) x dtype size per layer.
The graph replays rewrite the step's own KV slots (from the next input token, which the step
has sampled): harmless for timing with dummy weights. Prints one JSON line per probe and the
whole result (also written to --out). Measured with it: docs/performance.md, session 14.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from graph_timing import graph_time_us
from kvflow import LLM
from kvflow.attention.layer import Attention
from kvflow.bench.offline import WORKLOADS
from kvflow.kernels.attention import unified_attention
from kvflow.worker.model_runner import ModelRunner


def _attn_us(prof) -> tuple[float, int]:
    """Mean duration (us) and count of the attention kernel launches in a profile."""
    durs = [e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
            for e in prof.events() if e.name.startswith("_attention_kernel")
            and e.device_type == torch.autograd.DeviceType.CUDA]
    return (sum(durs) / len(durs) if durs else 0.0), len(durs)


def _kernel_table(prof, iters: int) -> list:
    """The graph's kernels by total time per replay: [name, launches per replay, us per launch,
    us per replay]. Durations of PDL launches include their wait for the previous kernel."""
    import collections
    tot, cnt = collections.Counter(), collections.Counter()
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            t = e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
            tot[e.name[:60]] += t
            cnt[e.name[:60]] += 1
    return [[n, cnt[n] // iters, round(t / cnt[n], 2), round(t / iters, 1)]
            for n, t in tot.most_common(16)]


def probe(runner, b: int, iters: int = 10, variants: bool = True, tma: bool = False) -> dict:
    from torch.profiler import ProfilerActivity, profile
    graphs = runner.graphs
    bs = next(s for s in graphs.buckets if s >= b)
    layers = [m for m in runner.model.modules() if isinstance(m, Attention)]
    a0 = layers[0]
    seq_lens = graphs.seq_lens[:bs]
    kv_tokens = int(seq_lens[:b].sum())
    kv_bytes = kv_tokens * a0.num_kv_heads * a0.head_dim * 2 * a0.kv_cache.element_size()
    md = graphs._metadata(bs)

    graph = graphs.graphs[bs]
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            graph.replay()
        torch.cuda.synchronize()
    g_us, g_n = _attn_us(prof)
    kernels = _kernel_table(prof, iters)
    step_ms = _replay_us(graph, iters) / 1e3

    q = torch.randn(bs, a0.num_heads, a0.head_dim, dtype=a0.kv_cache.dtype, device=runner.device)
    out = torch.empty_like(q)

    def all_layers():
        for layer in layers:
            unified_attention(q, layer.kv_cache[0], layer.kv_cache[1], md.query_start_loc,
                              md.seq_lens, md.block_table, 1, md.max_seq_len, a0.scale,
                              out=out, request_order=md.decode_order)

    all_layers()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            all_layers()
        torch.cuda.synchronize()
    e_us, e_n = _attn_us(prof)
    cg = _capture(all_layers)
    cg_us = _replay_us(cg, iters) / len(layers)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            cg.replay()
        torch.cuda.synchronize()
    cgk_us, _ = _attn_us(prof)

    per_layer = []
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
    for layer in layers[:4]:
        ev[0].record()
        for _ in range(20):
            unified_attention(q, layer.kv_cache[0], layer.kv_cache[1], md.query_start_loc,
                              md.seq_lens, md.block_table, 1, md.max_seq_len, a0.scale,
                              out=out, request_order=md.decode_order)
        ev[1].record()
        torch.cuda.synchronize()
        per_layer.append(round(ev[0].elapsed_time(ev[1]) * 1e3 / 20, 1))

    def tbs(us: float) -> float:
        return round(kv_bytes / (us * 1e-6) / 1e12, 3) if us else 0.0

    variants = {name: round(us, 1) for name, us in _variants(runner, layers, md, q, out, b, bs,
                                                              iters).items()} if variants else {}
    variants_tbs = {name: tbs(us) for name, us in variants.items()}
    tma = ({name: round(us, 1) for name, us in _tma_variants(layers, md, q, out, iters).items()}
           if tma else {})

    return dict(batch=b, bucket=bs, kv_tokens=kv_tokens, kv_mb_per_layer=round(kv_bytes / 1e6, 1),
                layers=len(layers), step_ms=round(step_ms, 3),
                graph=dict(attn_us=round(g_us, 1), launches=g_n, tbs=tbs(g_us)),
                alone_eager=dict(attn_us=round(e_us, 1), launches=e_n, tbs=tbs(e_us)),
                alone_graph=dict(wall_us_per_layer=round(cg_us, 1), tbs_wall=tbs(cg_us),
                                 attn_us=round(cgk_us, 1), tbs=tbs(cgk_us)),
                graph_kernels=kernels,
                alone_per_layer_us=per_layer, variants_us=variants,
                variants_tbs=variants_tbs, tma_us=tma,
                tma_tbs={name: tbs(us) for name, us in tma.items()})


def _capture(fn) -> torch.cuda.CUDAGraph:
    """fn captured in a CUDA graph, after one eager call on the capture stream (warm-up)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    cg = torch.cuda.CUDAGraph()
    with torch.cuda.stream(s):
        fn()
        torch.cuda.synchronize()
        with torch.cuda.graph(cg):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    return cg


def _replay_us(graph: torch.cuda.CUDAGraph, iters: int) -> float:
    """Mean wall time (us) of `iters` back-to-back replays of a captured graph."""
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
    ev[0].record()
    for _ in range(iters):
        graph.replay()
    ev[1].record()
    torch.cuda.synchronize()
    return ev[0].elapsed_time(ev[1]) * 1e3 / iters


def _variants(runner, layers, md, q, out, b: int, bs: int, iters: int) -> dict:
    """Per-layer wall (us) of the step's attention launches (all layers, one graph) under
    tile variants and input variants: which property of the real inputs costs bandwidth."""
    import dataclasses
    from kvflow.kernels.attention_config import choose_config, device_limits
    a0 = layers[0]
    num_sms, smem = device_limits(q.device)
    base = choose_config(bs, bs, a0.num_heads, a0.num_kv_heads, a0.head_dim, 1, md.max_seq_len,
                         q.dtype, num_sms, None, smem)
    nb = a0.kv_cache.shape[1]
    mb = md.block_table.shape[1]
    # Synthetic tables: request i's blocks contiguous (i * mb + j), same lengths.
    contig = (torch.arange(bs * mb, device=q.device, dtype=torch.int32) % nb).view(bs, mb)
    # Equal lengths (the mean). With the real table, rows shorter than the mean read blocks
    # past their own (block 0 where never used: L2 hits), so that case reads fast for a reason
    # of its own; the contiguous-table case has no such reads.
    mean = int(md.seq_lens[:b].float().mean())
    equal = md.seq_lens.clone()
    equal[:b] = mean
    # Sorted by length, not interleaved: rows already in longest-first order.
    sorted_lens, perm = torch.sort(md.seq_lens[:b], descending=True)
    srt = md.seq_lens.clone()
    srt[:b] = sorted_lens
    srt_bt = md.block_table.clone()
    srt_bt[:b] = md.block_table[perm]
    ident = torch.arange(bs, device=q.device, dtype=torch.int32)
    tiles = dict(bn32=dict(block_n=32), bn32_stages3=dict(block_n=32, num_stages=3),
                 stages3=dict(num_stages=3), warps4=dict(num_warps=4),
                 warps4_bn32=dict(num_warps=4, block_n=32), warps2=dict(num_warps=2),
                 warps1=dict(num_warps=1), split2=dict(num_splits=2),
                 bn128=dict(block_n=128), bn128_warps4=dict(block_n=128, num_warps=4))
    cases = {
        "base": (base, md.seq_lens, md.block_table, md.decode_order),
        "no_order": (base, md.seq_lens, md.block_table, None),
        "presorted_rows": (base, srt, srt_bt, ident),
        "contig_blocks": (base, md.seq_lens, contig, md.decode_order),
        "equal_lens_contig": (base, equal, contig, None),
        "equal_lens_real_blocks": (base, equal, md.block_table, None),
        **{name: (dataclasses.replace(base, **kw), md.seq_lens, md.block_table,
                  md.decode_order) for name, kw in tiles.items()},
        "base_again": (base, md.seq_lens, md.block_table, md.decode_order),   # drift check
    }
    res = {}
    for name, (cfg, lens, bt, order) in cases.items():
        def fn(cfg=cfg, lens=lens, bt=bt, order=order):
            for layer in layers:
                unified_attention(q, layer.kv_cache[0], layer.kv_cache[1], md.query_start_loc,
                                  lens, bt, 1, md.max_seq_len, a0.scale, out=out, config=cfg,
                                  request_order=order)
        try:
            res[name] = graph_time_us(fn, reps=1, iters=iters) / len(layers)
        except Exception as e:  # a variant that does not compile or fit: report, go on
            print(f"variant {name}: {type(e).__name__}: {e}", file=sys.stderr)
    return res


def _tma_variants(layers, md, q, out, iters: int) -> dict:
    """Per-layer wall (us) of the step's attention launches by the TMA decode kernel (all
    layers, one graph), the pointer kernel's "base" case of `_variants` run again first as
    the same-moment bar. Rows past the step's requests are the graph bucket's padding
    (seq_len 0 in the pointer kernel's terms); the TMA kernel needs >= 1, so it runs the
    live rows only, which is all the pointer kernel reads too."""
    from kvflow.kernels.decode_attention_tma import decode_attention_tma, supported
    a0 = layers[0]
    if not supported(q, a0.kv_cache[0]):
        return {}
    b = int((md.seq_lens > 0).sum())
    lens, bt = md.seq_lens[:b], md.block_table[:b]
    order = md.decode_order[:b] if md.decode_order is not None else None
    if order is not None and int(order.max()) >= b:    # the order covers padded rows too
        order = torch.argsort(lens, descending=True, stable=True).to(torch.int32)
    res = {}

    def base():
        for layer in layers:
            unified_attention(q, layer.kv_cache[0], layer.kv_cache[1], md.query_start_loc,
                              md.seq_lens, md.block_table, 1, md.max_seq_len, a0.scale,
                              out=out, request_order=md.decode_order)
    res["pointer_base"] = graph_time_us(base, reps=1, iters=iters) / len(layers)
    for warps in (1, 2, 4):
        for stages in (2, 3, 4):
            for name, ordr in (("", None), ("_order", order)):
                if name and ordr is None:         # the step dispatched no order
                    continue

                def fn(warps=warps, stages=stages, ordr=ordr):
                    for layer in layers:
                        decode_attention_tma(q[:b], layer.kv_cache[0], layer.kv_cache[1], lens,
                                             bt, a0.scale, out=out[:b], num_stages=stages,
                                             num_warps=warps, request_order=ordr)
                try:
                    res[f"tma_w{warps}_s{stages}{name}"] = (
                        graph_time_us(fn, reps=1, iters=iters) / len(layers))
                except Exception as e:  # a tile that does not fit: report, go on
                    print(f"tma w{warps} s{stages}{name}: {type(e).__name__}: {e}",
                          file=sys.stderr)
    return res


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--workload", default="nanovllm")
    p.add_argument("--batch", default="140", help="comma list: probe at each of these batches")
    p.add_argument("--no-variants", action="store_true")
    p.add_argument("--tma", action="store_true", help="also time the TMA decode kernel")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    targets = sorted((int(x) for x in args.batch.split(",")), reverse=True)
    results = []
    orig = ModelRunner.launch
    state = dict(max_b=0)

    def launch(runner, so):
        handle = orig(runner, so)
        b = len(so.num_scheduled_tokens)
        decode = so.total_num_scheduled_tokens == b and not so.is_empty
        state["max_b"] = max(state["max_b"], b)
        if (decode and targets and state["max_b"] > targets[0] >= b
                and runner.graphs is not None and runner.graphs.can_run(b)):
            while targets and targets[0] >= b:
                targets.pop(0)
            torch.cuda.synchronize()
            r = probe(runner, b, variants=not args.no_variants, tma=args.tma)
            print(json.dumps(r), flush=True)
            results.append(r)
        return handle

    ModelRunner.launch = launch
    llm = LLM(args.model, load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16",
              max_model_len=4096, max_num_seqs=1024, max_num_batched_tokens=16384)
    WORKLOADS[args.workload](llm, dict(model=args.model), 0.6)
    text = json.dumps(dict(model=args.model, workload=args.workload, probes=results), indent=1)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
