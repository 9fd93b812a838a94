"""Is the fused MoE's gate/up GEMM slow at 100-300 rows an expert because of its loads?

    source benchmarks/device_env.sh && python3 benchmarks/moe_tma_probe.py
        [--tokens 192,384,512,768,1024,2048] [--out FILE]
    TRITON_INTERPRET=1 python3 benchmarks/moe_tma_probe.py --check   # tiny shapes, CPU

Why: moe_tune.py's records (session 12) put kvflow's gate/up kernel at 1.4-1.5x cuBLAS's
batched GEMM on the same products at 512-1024 tokens (Mixtral, 128-256 rows an expert), with
little padding at 1024 tokens and BLOCK_M = 64. That kernel gathers each row of x by pair
index and loads both operands through pointers. The variant here first gathers x into
expert order (one small copy: [P, H]), then loads every tile, x's and the weights', by TMA
(host-side tensor descriptors), so the GEMM is a plain tiled product per row block.

What: per token count (uniform routing, as dummy weights give), the gate/up kernel with the
tuned table's tiles, the TMA variant over a few tiles (its gather timed apart), and
torch.bmm with the pairs spread evenly (moe_tune.py's bar). One JSON line per token count.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

sys.path.insert(0, os.path.dirname(__file__))
from kvflow.kernels import fused_moe as fm  # noqa: E402
from kvflow.kernels.fused_moe import _tile_of_program  # noqa: E402


@triton.jit
def _gate_up_tma_kernel(xs_desc, w_desc, h_ptr, block_expert_ptr, num_experts, I, num_pid_m,
                        stride_hp, H: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid_m, pid_n = _tile_of_program(num_pid_m, tl.cdiv(I, BLOCK_N), GROUP_M)
    e = tl.load(block_expert_ptr + pid_m)
    if e >= num_experts:
        return
    row0 = pid_m * BLOCK_M
    n0 = pid_n * BLOCK_N
    wg = e * 2 * I + n0                     # w13 seen as [E * 2I, H]: gate rows, then up rows
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        a = xs_desc.load([row0, k0])                          # [BM, BK]
        bg = w_desc.load([wg, k0])                            # [BN, BK]
        bu = w_desc.load([wg + I, k0])
        acc_g = tl.dot(a, bg.T, acc_g)
        acc_u = tl.dot(a, bu.T, acc_u)
    g = acc_g.to(h_ptr.dtype.element_ty).to(tl.float32)
    u = acc_u.to(h_ptr.dtype.element_ty).to(tl.float32)
    out = g * tl.sigmoid(g) * u
    rows = row0 + tl.arange(0, BLOCK_M)
    cols = n0 + tl.arange(0, BLOCK_N)
    tl.store(h_ptr + rows[:, None].to(tl.int64) * stride_hp + cols[None, :],
             out.to(h_ptr.dtype.element_ty), mask=(cols < I)[None, :])


def gather_sorted(x, pairs, top_k: int, num_pairs: int):
    """x rows in padded expert order: xs[p] = x[pair(p) // K] ([P, H]; padding rows: row 0)."""
    tok = torch.where(pairs < num_pairs, pairs // top_k, 0).long()
    return x.index_select(0, tok)


def gate_up_tma(xs, w13, hbuf, block_expert, block_m, tile):
    e, two_i, h = w13.shape
    inter = two_i // 2
    bn, bk = tile["block_n"], tile["block_k"]
    xs_desc = TensorDescriptor.from_tensor(xs, [block_m, bk])
    w_desc = TensorDescriptor.from_tensor(w13.view(e * two_i, h), [bn, bk])
    nblocks = xs.shape[0] // block_m
    _gate_up_tma_kernel[(nblocks * triton.cdiv(inter, bn),)](
        xs_desc, w_desc, hbuf, block_expert, e, inter, nblocks, hbuf.stride(0),
        H=h, BLOCK_M=block_m, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=tile.get("group_m", 0),
        num_warps=tile["num_warps"], num_stages=tile["num_stages"])


def reference_h(x, w13, pairs, block_expert, top_k, block_m, tile):
    hbuf = torch.zeros(pairs.numel(), w13.shape[1] // 2, dtype=x.dtype, device=x.device)
    fm.launch_gate_up(x, w13, hbuf, pairs, block_expert, top_k, block_m, tile)
    return hbuf


def check() -> int:
    """Tiny shapes (CPU interpreter): the TMA variant's valid rows equal the kernel's."""
    torch.manual_seed(0)
    e, h, inter, k, t, bm = 4, 64, 64, 2, 9, 16
    from triton.runtime.interpreter import InterpretedFunction
    on_cpu = isinstance(_gate_up_tma_kernel, InterpretedFunction)
    dt, dev = (torch.float32, "cpu") if on_cpu else (torch.bfloat16, "cuda")
    x = torch.randn(t, h, dtype=dt, device=dev)
    w13 = torch.randn(e, 2 * inter, h, dtype=dt, device=dev) * 0.1
    ids = torch.rand(t, e, device=dev).topk(k, -1).indices
    pairs, block_expert = fm.align_by_expert(ids, e, bm)
    tile = dict(block_n=32, block_k=32, num_warps=4, num_stages=2)
    ref = reference_h(x, w13, pairs, block_expert, k, bm, tile)
    xs = gather_sorted(x, pairs, k, t * k)
    hbuf = torch.zeros_like(ref)
    gate_up_tma(xs, w13, hbuf, block_expert, bm, tile)
    valid = pairs < t * k
    torch.testing.assert_close(hbuf[valid], ref[valid], atol=1e-2, rtol=1e-2)
    print(f"ok: {int(valid.sum())} rows match")
    return 0


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", default="192,384,512,768,1024,2048")
    p.add_argument("--check", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.check:
        return check()
    from graph_timing import graph_time_us
    from moe_tune import expert_weights, uniform_routing
    e, h, inter, k = 8, 4096, 14336, 2
    dev, dt = torch.device("cuda"), torch.bfloat16
    w13, _ = expert_weights(e, h, inter, dev, dt)
    out_f = open(args.out, "w") if args.out else None
    for t in (int(s) for s in args.tokens.split(",")):
        x = torch.randn(t, h, device=dev, dtype=dt)
        _, ids = uniform_routing(t, e, k, dev)
        cfg = fm.choose_config(t * k, dt, e, h, inter, dev)
        bm0 = cfg["block_m"]
        pairs, block_expert = fm.align_by_expert(ids, e, bm0)
        hbuf = torch.empty(pairs.numel(), inter, device=dev, dtype=dt)
        tuned = graph_time_us(lambda: fm.launch_gate_up(x, w13, hbuf, pairs, block_expert, k,
                                                        bm0, cfg["gate_up"]))
        ref = hbuf.clone()
        rows_e = -(-t * k // e)
        xe = torch.randn(e, rows_e, h, device=dev, dtype=dt)
        bmm = graph_time_us(lambda: torch.bmm(xe, w13.transpose(1, 2)))
        best, tried = None, []
        for bm, bn, bk, warps, stages, gm in itertools.product(
                (64, 128), (64, 128, 256), (64,), (4, 8), (3, 4), (0, 8)):
            if bm * bn * 2 > 128 * 256 or (bm == 128 and warps == 4 and bn > 64):
                continue                       # two fp32 accumulators must fit the registers
            tile = dict(block_n=bn, block_k=bk, num_warps=warps, num_stages=stages, group_m=gm)
            pr, be = fm.align_by_expert(ids, e, bm)
            xs = gather_sorted(x, pr, k, t * k)
            hb = torch.empty(pr.numel(), inter, device=dev, dtype=dt)
            try:
                gate_up_tma(xs, w13, hb, be, bm, tile)
                if bm == bm0:                  # same row layout: compare with the kernel
                    v = pairs < t * k
                    torch.testing.assert_close(hb[v].float(), ref[v].float(), atol=2e-2,
                                               rtol=2e-2)
                us = graph_time_us(lambda: gate_up_tma(xs, w13, hb, be, bm, tile))
            except Exception as exc:           # out of resources: not a candidate
                tried.append(dict(block_m=bm, **tile, error=str(exc)[:80]))
                continue
            tried.append(dict(block_m=bm, **tile, us=round(us, 1)))
            if best is None or us < best[0]:
                gather = graph_time_us(lambda: gather_sorted(x, pr, k, t * k))
                best = (us, dict(block_m=bm, **tile), gather)
        rec = dict(tokens=t, pairs=t * k, tuned_us=round(tuned, 1), tuned_cfg=cfg,
                   bmm_us=round(bmm, 1), tma_us=round(best[0], 1) if best else None,
                   tma_cfg=best[1] if best else None,
                   gather_us=round(best[2], 1) if best else None,
                   tuned_vs_tma=round(tuned / (best[0] + best[2]), 3) if best else None,
                   tried=sorted((r for r in tried if "us" in r), key=lambda r: r["us"])[:5])
        print(json.dumps(rec), flush=True)
        if out_f:
            out_f.write(json.dumps(rec) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
