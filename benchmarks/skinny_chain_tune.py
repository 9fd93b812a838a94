"""Tune Llama-3.1-8B's batch-1 decode GEMVs in the chain a decode step runs them in.

    source benchmarks/device_env.sh && python3 benchmarks/skinny_chain_tune.py [--out DIR]
        [--layers 8] [--rounds 2] [--budget-s 300] [--smoke]

Why: benchmarks/skinny_gemm_tune.py times each product after a small kernel (an RMSNorm), the
place where PDL lets a GEMV's programs become resident and request their first weight tiles
while the predecessor drains. In a step, the down projection follows the gate | up GEMV and
the q/k/v GEMV follows the down projection: GEMVs that fill the SMs, so the next one's
programs can only become resident as the previous one's retire. The profile of decode1
(results/profiles/llama3.1-8b-b1-*.exposed.json) puts down at ~3.6 TB/s and q/k/v at ~3.4
where gate | up, after the norm, reaches ~4.1. A config that wins alone may lose there.

What: --layers copies of a decoder layer's decode chain at one row, as the model runs it on
the H200 (weights and KV caches distinct per layer, > the 50 MB L2, so every product reads
HBM):
  gate | up (glu epilogue) -> down (+ residual add + RMSNorm, folded) -> q/k/v -> q/k rotary +
  KV write -> paged attention over --context cached tokens -> o (+ add + norm, folded where
  gate | up is in the GEMV form, else the norm kernel) -> next layer
The whole chain is one CUDA graph (graph_timing) and the figure is microseconds per layer.
Coordinate descent over the configs of attention (split count, KV tile, warps, stages at the
decode graph's max_model_len bound), o, gate | up, down and q/k/v: each one's candidates are
timed with the others at their current choice and the best kept, `--rounds` times; the
starting chain is re-timed before each as the noise reference. Constraints the model needs
are kept: the GEMVs single-split (norm fold, glu), q/k/v in the GEMV form (a fold consumer).

Writes DIR/skinny_chain_tune.json (every timing) and DIR/skinny_gemm_chain_<device>.json: the
device table with the chosen M=1 entries for these shapes (point KVFLOW_SKINNY_TABLE at it to
A/B it against the committed table; copy it to kvflow/kernels/configs/ to adopt it).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import time

import torch

import kvflow.kernels.skinny_gemm as sg
from kvflow.kernels.norm import fused_add_rms_norm
from kvflow.kernels.qk_rope_cache import qk_norm_rope_cache
from kvflow.kernels.rotary import compute_cos_sin_cache

# Llama-3.1-8B: hidden 4096, intermediate 14336, 32 q heads, 8 kv heads, head 128.
SHAPES = {"gate_up": (28672, 4096), "down": (4096, 14336), "qkv": (6144, 4096),
          "o": (4096, 4096)}
HEADS, KV_HEADS, HEAD = 32, 8, 128
GEMV_TILE_ELEMS = 16384


def tiles(name: str, cur: dict) -> list[dict]:
    """Stage A: tile shapes at the current warps / stages. Single split; q/k/v keeps the GEMV
    form (a fold consumer); o and gate | up may take tensor-core tiles."""
    w, s = cur["num_warps"], cur["num_stages"]
    out = [dict(block_n=bn, block_k=bk, num_warps=w, num_stages=s, use_dot=False, split_k=1)
           for bn, bk in itertools.product((4, 8, 16), (256, 512, 1024, 2048))
           if bn * bk <= GEMV_TILE_ELEMS and not (name == "gate_up" and bn < 8)]
    if name in ("o", "gate_up"):
        out += [dict(block_n=bn, block_k=bk, num_warps=2, num_stages=3, use_dot=True, split_k=1)
                for bn, bk in ((32, 128), (64, 128), (64, 256), (128, 128))]
    return [c for c in out if c != cur]


def around(cur: dict) -> list[dict]:
    """Stage B: warps x stages around the current tile."""
    out = [dict(cur, num_warps=w, num_stages=s)
           for w, s in itertools.product((2, 4, 8), (2, 3, 4))]
    return [c for c in out if c != cur]


def attn_tiles(cur: dict) -> list[dict]:
    """Attention stage A: split count x KV tile width (the decode graph's bound is
    max_model_len, so the production heuristic takes 16 splits for one request)."""
    out = [dict(cur, num_splits=sp, block_n=bn)
           for sp, bn in itertools.product((4, 8, 16, 32), (16, 32, 64, 128))]
    return [c for c in out if c != cur]


def attn_around(cur: dict) -> list[dict]:
    out = [dict(cur, num_warps=w, num_stages=s) for w, s in itertools.product((1, 2, 4), (1, 2, 3))]
    return [c for c in out if c != cur]


class Chain:
    """The decode chain at one row over `layers` weight copies, configs per product, in the
    structure the model runs at one row: each residual add + RMSNorm is folded into the
    products around it where the consumer is in the GEMV form (layers/norm_fold.py), else it
    is the fused add + norm kernel."""

    def __init__(self, layers: int, device: str, context: int = 384):
        g = torch.Generator(device="cpu").manual_seed(0)
        dt = torch.bfloat16

        def w(n, k):
            return (torch.randn(n, k, generator=g) * 0.02).to(dt).to(device)
        self.w = [{name: w(*nk) for name, nk in SHAPES.items()} for _ in range(layers)]
        hidden = SHAPES["o"][0]
        self.norm_g = torch.ones(hidden, dtype=dt, device=device)
        self.x = (torch.randn(1, hidden, generator=g)).to(dt).to(device)
        self.res = (torch.randn(1, hidden, generator=g)).to(dt).to(device)
        self.pos = torch.tensor([context - 1], device=device)
        self.cs = compute_cos_sin_cache(HEAD, 4096).to(device)
        blocks = -(-context // 16)
        # One cache per layer (as the model's), the request's blocks in a shuffled order.
        self.caches = [torch.randn(2, blocks, 16, KV_HEADS, HEAD, generator=g).to(dt).to(device)
                       for _ in range(layers)]
        table = torch.zeros(1, 4096 // 16, dtype=torch.int32)
        table[0, :blocks] = torch.randperm(blocks, generator=g).to(torch.int32)
        self.block_table = table.to(device)
        self.slots = (self.block_table[0, (context - 1) // 16].long() * 16
                      + (context - 1) % 16).view(1)
        self.qsl = torch.tensor([0, 1], dtype=torch.int32, device=device)
        self.seq_lens = torch.tensor([context], dtype=torch.int32, device=device)

    def step(self, cfg: dict) -> None:
        from kvflow.kernels.attention import unified_attention
        from kvflow.kernels.attention_config import AttentionConfig
        x, res, fold_in = self.x, self.res, None
        gu = cfg["gate_up"]
        glu = sg.glu_tile(gu)
        gu_folds = not gu["use_dot"]              # a consumer folds only in the GEMV form
        attn_cfg = AttentionConfig(**cfg["attn"]) if "attn" in cfg else None
        for w, cache in zip(self.w, self.caches):
            act = sg.skinny_gemm(x, w["gate_up"], None, glu, glu=True, row_scale=fold_in)
            hg, h, fold = sg.skinny_gemm(act, w["down"], None, cfg["down"],
                                         add_norm=(res, self.norm_g, 1e-5))
            qkv = sg.skinny_gemm(hg, w["qkv"], None, cfg["qkv"], row_scale=fold)
            q, k, v = qkv.split([HEADS * HEAD, KV_HEADS * HEAD, KV_HEADS * HEAD], dim=-1)
            q = qk_norm_rope_cache(q.view(1, HEADS, HEAD), k.view(1, KV_HEADS, HEAD),
                                   v.view(1, KV_HEADS, HEAD), self.pos, self.cs, True, None,
                                   None, 1e-6, cache[0], cache[1], self.slots)
            a = unified_attention(q, cache[0], cache[1], self.qsl, self.seq_lens,
                                  self.block_table, max_query_len=1, max_seq_len=4096,
                                  scale=HEAD ** -0.5, config=attn_cfg).view(1, HEADS * HEAD)
            if gu_folds:
                x, res, fold_in = sg.skinny_gemm(a, w["o"], None, cfg["o"],
                                                 add_norm=(h, self.norm_g, 1e-5))
            else:
                o = sg.skinny_gemm(a, w["o"], None, cfg["o"])
                x, res = fused_add_rms_norm(o, h, self.norm_g, 1e-5)


def table_configs(device) -> dict:
    """The committed table's M=1 choices (the default heuristic where it names cuBLAS), and
    the attention heuristic's choice for one decode request (graph bound: max_model_len)."""
    import dataclasses

    from kvflow.kernels.attention_config import choose_config, device_limits
    out = {name: dict(sg.choose_config(1, n, k, device) or sg.default_config(1, n, k))
           for name, (n, k) in SHAPES.items()}
    sms, smem = device_limits(device)
    out["attn"] = dataclasses.asdict(choose_config(1, 1, HEADS, KV_HEADS, HEAD, 1, 4096,
                                                   torch.bfloat16, sms, None, smem))
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/out"))
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--context", type=int, default=384, help="tokens in the request's cache")
    ap.add_argument("--products", default="attn,o,gate_up,down,qkv")
    ap.add_argument("--budget-s", type=float, default=300.0)
    ap.add_argument("--smoke", action="store_true", help="CPU check (TRITON_INTERPRET=1)")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if args.smoke:
        chain = Chain(1, "cpu", context=40)
        cfg = {name: dict(sg.default_config(1, n, k), split_k=1)
               for name, (n, k) in SHAPES.items()}
        chain.step(cfg)
        chain.step(dict(cfg, gate_up=dict(cfg["gate_up"], use_dot=True, block_n=32)))
        print("smoke ok", flush=True)
        return 0
    from graph_timing import graph_time_us
    device = torch.device("cuda")
    chain = Chain(args.layers, "cuda", args.context)

    def time_us(cfg: dict) -> float:
        return graph_time_us(lambda: chain.step(cfg), reps=2, iters=10) / args.layers

    base = table_configs(device)
    best = {k: dict(v) for k, v in base.items()}
    t0 = time.time()
    log = [dict(kind="table", configs=base, us_per_layer=time_us(base))]
    print(json.dumps(log[-1]), flush=True)
    best_us = log[-1]["us_per_layer"]
    for rnd in range(args.rounds):
        for name in args.products.split(","):
            if time.time() - t0 > args.budget_s:
                break
            ref = time_us(base)
            log.append(dict(kind="table", round=rnd, before=name, us_per_layer=ref))
            best_us = time_us(best)
            stages = ((lambda n, cur: attn_tiles(cur), lambda n, cur: attn_around(cur))
                      if name == "attn" else (tiles, lambda n, cur: around(cur)))
            for stage in stages:
                for c in stage(name, best[name]):
                    if time.time() - t0 > args.budget_s:
                        break
                    trial = dict(best, **{name: c})
                    try:
                        us = time_us(trial)
                    except Exception as e:   # a tile that does not compile or fit: skip it
                        log.append(dict(kind="error", product=name, config=c,
                                        error=str(e)[:200]))
                        continue
                    log.append(dict(kind="trial", round=rnd, product=name, config=c,
                                    us_per_layer=us))
                    if us < best_us * 0.995:
                        best_us, best = us, trial
            print(json.dumps(dict(round=rnd, product=name, best=best[name],
                                  us_per_layer=round(best_us, 2), table_us=round(ref, 2))),
                  flush=True)
    final = dict(kind="final", table_us=time_us(base), best_us=time_us(best), configs=best)
    log.append(final)
    print(json.dumps(final), flush=True)
    name = torch.cuda.get_device_properties(0).name
    with open(os.path.join(args.out, "skinny_chain_tune.json"), "w") as f:
        json.dump(dict(device=name, layers=args.layers, log=log), f, indent=1)
    # The device table with the chosen M=1 entries.
    with open(sg._device_file(name)) as f:
        table = json.load(f)
    for prod, (n, k) in SHAPES.items():
        table["configs"].setdefault(f"{n},{k}", {})["1"] = best[prod]
    path = os.path.join(args.out, os.path.basename(sg._device_file(name)).replace(
        "skinny_gemm_", "skinny_gemm_chain_"))
    with open(path, "w") as f:
        json.dump(table, f, indent=1)
    print("table:", path, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
