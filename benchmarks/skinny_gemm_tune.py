"""Time the Triton skinny GEMM against torch (cuBLAS) on decode shapes, search its tiles, and
write the per-device table that kvflow.kernels.skinny_gemm.choose_config reads.

    source benchmarks/device_env.sh && python3 benchmarks/skinny_gemm_tune.py [--out DIR]
        [--ms 1,2,4,8] [--budget-s 200] [--models qwen3-0.6b,llama3.1-8b]
        [--shapes qkv,o] [--merge kvflow/kernels/configs/skinny_gemm_NVIDIA_H200.json]

For each projection of Qwen3-0.6B and Llama-3.1-8B (bf16, y = x @ W^T, W [N, K]) and each M it
times F.linear, the default config of skinny_gemm.default_config and a staged search (stage 0:
GEMV and tensor-core tiles x split-K; stage 1: warps x stages around the best). Times are CUDA
graph replays (launch overhead excluded, as in the decode graphs) of an RMSNorm followed by the
product, minus the norm alone (as in a decode step, where PDL overlaps a Triton kernel's start
with its predecessor and cuBLAS's launch waits for it); each graph cycles over enough
copies of W (>= ROTATE_BYTES in all, several times the 50 MB L2) that every call reads its matrix
from HBM. GB/s counts the weight bytes only (x and y are < 0.2% of them).

Writes to DIR (default $OUT, else /tmp/out):
  skinny_gemm_tune.json          every case: torch / default / best times, GB/s, best config
  skinny_gemm_<device>.json      the table: {"device", "configs": {"N,K": {"M": cfg | null}}};
                                 null where torch is not beaten by >= MIN_GAIN. Copy it into
                                 kvflow/kernels/configs/ to use it. With --merge the table
                                 starts from that file and only the tuned entries change.
Stage 1 is skipped once --budget-s has elapsed, so the run stays under ~4 minutes on an H200.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import time

import torch
import torch.nn.functional as F
import triton

import kvflow.kernels.skinny_gemm as sg
from kvflow.kernels.norm import rms_norm
from graph_timing import graph_time_us

MODELS = {
    "qwen3-0.6b": {"qkv": (4096, 1024), "o": (1024, 2048), "gate_up": (6144, 1024),
                   "down": (1024, 3072), "lm_head": (151936, 1024)},
    "llama3.1-8b": {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096),
                    "down": (4096, 14336), "lm_head": (128256, 4096)},
    # Mixtral's attention projections have Llama-8B's shapes; its experts are the fused MoE.
    "mixtral-8x7b": {"lm_head": (32000, 4096)},
}
ROTATE_BYTES = 256 << 20
MIN_GAIN = 0.03            # the kernel must be >= 3% faster than torch to take a shape over
GEMV_TILE_ELEMS = 16384    # BLOCK_M x BLOCK_N x BLOCK_K of a GEMV step (<= 128 fp32 a thread)


def stage0(m, n, k, sms):
    """GEMV tiles (register-bounded) and tensor-core tiles, each with the split-K values that
    give between ~1 and 16 programs per SM (split 1 always)."""
    bm = triton.next_power_of_2(m)
    # Long GEMV steps (up to 2048 columns) put more of W in flight per program: at one row the
    # small matrices are latency-bound, not bandwidth-bound.
    tiles = [dict(block_n=bn, block_k=bk, num_warps=4, num_stages=2, use_dot=False)
             for bn, bk in itertools.product((4, 8, 16, 32), (256, 512, 1024, 2048))
             if bm * bn * bk <= GEMV_TILE_ELEMS and not (bn == 4 and m < 8)
             and m <= sg.GEMV_MAX_M]       # above it the kernel runs the dot form only
    tiles += [dict(block_n=bn, block_k=bk, num_warps=4, num_stages=3, use_dot=True)
              for bn, bk in ((16, 256), (32, 128), (32, 256), (64, 64), (64, 128), (64, 256),
                             (128, 64), (128, 128))]
    cands = []
    for t in tiles:
        slabs = -(-n // t["block_n"])
        for split in (1, 2, 4, 8, 16):
            if split > 1 and (k < split * t["block_k"] or slabs * split > 16 * sms):
                continue
            if split > 1 and slabs * split // 2 >= 2 * sms:
                continue              # already >= 2 programs per SM with half the splits
            cands.append(dict(t, split_k=split))
    return cands


def stage1(best):
    stages = (2, 3, 4, 5, 6) if best.get("use_dot") else (1, 2, 3)
    cands = [dict(best, num_warps=w) for w in (1, 2, 8)]
    cands += [dict(best, num_stages=s) for s in stages if s != best.get("num_stages")]
    return cands


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/out"))
    ap.add_argument("--ms", default="1,2,4,8")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--budget-s", type=float, default=200.0)
    ap.add_argument("--shapes", default="", help="only these projections (e.g. qkv,o)")
    ap.add_argument("--merge", default="", help="a table file to update instead of replacing")
    ap.add_argument("--smoke", action="store_true",
                    help="CPU check of the script itself (TRITON_INTERPRET=1, tiny shapes)")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if args.smoke:
        return smoke(args)
    ms = [int(v) for v in args.ms.split(",")]
    props = torch.cuda.get_device_properties(0)
    run(args, ms, props.name, props.multi_processor_count, "cuda",
        lambda fns: graph_time_us(fns, reps=1, iters=None), MODELS)


def smoke(args):
    """The whole flow on CPU under the interpreter: tiny shapes, wall-clock 'timings'."""
    def wall_us(fns):
        t = time.perf_counter()
        for fn in fns:
            fn()
        return (time.perf_counter() - t) * 1e6 / len(fns)
    global ROTATE_BYTES
    ROTATE_BYTES = 1 << 14
    run(args, [1, 3], "Smoke CPU", 2, "cpu", wall_us, {"tiny": {"proj": (24, 256)}})


def run(args, ms, dev_name, sms, device, time_us, models):
    t_start = time.time()
    print(f"{dev_name}: {sms} SMs, torch {torch.__version__}", flush=True)
    torch.manual_seed(0)
    dtype = torch.bfloat16
    results, table = [], {}
    if args.merge:
        with open(args.merge) as f:
            table = json.load(f)["configs"]
    done = set()
    for model in args.models.split(",") if models is MODELS else models:
        for name, (n, k) in models[model].items():
            if (args.shapes and name not in args.shapes.split(",")) or (n, k) in done:
                continue
            done.add((n, k))
            wbytes = n * k * 2
            copies = max(2, math.ceil(ROTATE_BYTES / wbytes))
            ws = [torch.randn(n, k, device=device, dtype=dtype) * 0.05 for _ in range(copies)]
            for m in ms:
                x = torch.randn(m, k, device=device, dtype=dtype)

                # In a decode step every projection follows a small kernel (a norm, SiLU or
                # attention) that PDL lets it overlap; cuBLAS cannot. Each timed call is one
                # RMSNorm + the product, and the norm's own time is subtracted.
                xn = torch.randn(m, k, device=device, dtype=dtype)
                wn = torch.ones(k, device=device, dtype=dtype)

                def pre():
                    return rms_norm(xn, wn, 1e-6)

                t_pre = time_us([pre for _ in ws])

                def chain(gemm):
                    return time_us([lambda w=w: (pre(), gemm(w)) for w in ws]) - t_pre

                def timed(cfg=None):
                    return chain(lambda w: sg.skinny_gemm(x, w, None, cfg))

                t_torch = chain(lambda w: F.linear(x, w))
                default = sg.default_config(m, n, k, sms)
                t_default = timed(default)
                best, tried, failed = (t_default, default), 1, 0
                search = [stage0(m, n, k, sms)]
                if time.time() - t_start < args.budget_s:
                    search.append(None)                   # stage 1, built from stage 0's best
                for cands in search:
                    for cfg in cands if cands is not None else stage1(best[1]):
                        try:
                            t = timed(cfg)
                        except Exception:  # noqa: BLE001 - out of resources etc.
                            failed += 1
                            continue
                        tried += 1
                        if t < best[0]:
                            best = (t, cfg)
                ref = sg.skinny_gemm_ref(x, ws[0])
                out = sg.skinny_gemm(x, ws[0], None, best[1])
                err = (out.float() - ref.float()).abs().max().item()
                assert err <= 2 ** -7 * (ref.float().abs().max().item() + 1), (name, m, err)
                wins = best[0] <= t_torch * (1 - MIN_GAIN)
                table.setdefault(f"{n},{k}", {})[str(sg.m_bucket(m))] = best[1] if wins else None
                r = dict(model=model, shape=name, m=m, n=n, k=k, torch_us=round(t_torch, 2),
                         torch_gbps=round(wbytes / t_torch / 1e3, 1),
                         default_us=round(t_default, 2),
                         default_gbps=round(wbytes / t_default / 1e3, 1),
                         best_us=round(best[0], 2), best_gbps=round(wbytes / best[0] / 1e3, 1),
                         speedup=round(t_torch / best[0], 3), use_skinny=wins, best_cfg=best[1],
                         tried=tried, failed=failed, stage1=len(search) > 1,
                         elapsed_s=round(time.time() - t_start, 1))
                results.append(r)
                print(json.dumps(r), flush=True)
            del ws
            if device == "cuda":
                torch.cuda.empty_cache()
    safe = "".join(c if c.isalnum() or c in "-." else "_" for c in dev_name)
    with open(os.path.join(args.out, "skinny_gemm_tune.json"), "w") as f:
        json.dump(dict(device=dev_name, sms=sms, torch=torch.__version__, results=results), f,
                  indent=1)
    with open(os.path.join(args.out, f"skinny_gemm_{safe}.json"), "w") as f:
        json.dump(dict(device=dev_name, configs=table), f, indent=1)
    print(f"\n{'model':12} {'shape':8} {'M':>2} {'N':>6} {'K':>5} | {'torch us':>8} {'GB/s':>6} | "
          f"{'default':>8} {'GB/s':>6} | {'best us':>8} {'GB/s':>6} {'x':>5} | best config")
    for r in results:
        c = r["best_cfg"]
        cs = (f"{'dot' if c.get('use_dot') else 'gemv'} bn{c['block_n']} bk{c['block_k']} "
              f"sk{c['split_k']} w{c['num_warps']} s{c['num_stages']}")
        print(f"{r['model']:12} {r['shape']:8} {r['m']:>2} {r['n']:>6} {r['k']:>5} | "
              f"{r['torch_us']:>8.2f} {r['torch_gbps']:>6.0f} | {r['default_us']:>8.2f} "
              f"{r['default_gbps']:>6.0f} | {r['best_us']:>8.2f} {r['best_gbps']:>6.0f} "
              f"{r['speedup']:>5.2f} | {cs}{'' if r['use_skinny'] else '  (torch)'}")
    print(f"\ntable -> {args.out}/skinny_gemm_{safe}.json; total {time.time() - t_start:.0f} s")


if __name__ == "__main__":
    main()
