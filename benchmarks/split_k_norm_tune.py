"""Tune where a projection + residual add + RMSNorm runs as fp32 K-slices summed by the norm.

    source benchmarks/device_env.sh && python3 benchmarks/split_k_norm_tune.py CONFIG_DIR
        [CONFIG_DIR...] [--rows 24,32,...] [--splits 2,4] [--margin 0.03] [--out FILE]
        [--table-out kvflow/kernels/configs/split_k_norm_<device>.json]

Why (kvflow/layers/split_k_norm.py): at 64-384 rows cuBLAS runs Llama-3.1-8B's down projection
as a split-K GEMM plus a reduce kernel of its own, then the norm kernel reads the reduced
output back. The K-slices as one batched product with fp32 outputs, summed by the norm kernel
as it loads them, save that launch and round trip where cuBLAS splits; elsewhere they lose.

What: per projection followed by a norm in a decoder layer (o, down) of each model and per row
count (default: the CUDA-graph sizes between 17 and 512, decode and mixed-step buckets),
CUDA-graph replays rotating over enough weight copies that no weight is served from L2:
linear + fused_add_rms_norm (what the engine runs without a table entry) and, per slice count
S, the engine's split path itself (layers/split_k_norm.py linear_add_norm: bmm(out_dtype=fp32)
+ fused_add_rms_norm_parts). Outputs are checked against the linear
path. One JSON line per (shape, rows, variant); with --table-out, the fastest S per (N, K, M)
where it beats the linear path by more than --margin, merged into that table (other entries
kept).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from gemm_shapes import shapes  # noqa: E402
from graph_timing import graph_time_us, jsonl_emitter  # noqa: E402
from kvflow.kernels.norm import fused_add_rms_norm  # noqa: E402
from kvflow.layers.norm import RMSNorm  # noqa: E402
from kvflow.layers.split_k_norm import linear_add_norm  # noqa: E402
from kvflow.layers.shape_tables import merge_table  # noqa: E402
from kvflow.worker.cuda_graphs import default_buckets  # noqa: E402
from kvflow.worker.mixed_graphs import default_token_buckets  # noqa: E402

L2_BYTES = 50 << 20


def graph_rows() -> list[int]:
    """Row counts of the engine's default CUDA graphs (decode batch sizes, mixed-step token
    buckets with the dense ride defaults) between the skinny GEMM's 16 and 512."""
    rows = set(default_buckets(1024)) | set(default_token_buckets(16384, 512, 64))
    return sorted(r for r in rows if 16 < r <= 512)


def tuner_parser(margin: float) -> argparse.ArgumentParser:
    """The command line both shape-table tuners take (this one and row_pad_tune.py)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="+")
    ap.add_argument("--rows", default=None, help="(default: the CUDA-graph sizes in 17..512)")
    ap.add_argument("--margin", type=float, default=margin)
    ap.add_argument("--out", default=None)
    ap.add_argument("--table-out", default=None)
    return ap


def unique_shapes(models: list[str], names=None):
    """(name, N, K) of the models' decoder products (`names` of them, default all), each
    (N, K) once."""
    done = set()
    for model in models:
        with open(os.path.join(model, "config.json")) as f:
            cfg = json.load(f)
        for name, (n, k) in shapes(cfg).items():
            if (names is None or name in names) and (n, k) not in done:
                done.add((n, k))
                yield name, n, k


def rotated_weights(n: int, k: int, dev) -> list[torch.Tensor]:
    """Enough [N, K] weight copies that, rotated, none is served from L2."""
    copies = max(2, -(-3 * L2_BYTES // (n * k * 2)))
    return [torch.randn(n, k, dtype=torch.bfloat16, device=dev) * 0.02 for _ in range(copies)]


def tune_shape(name: str, n: int, k: int, rows: list[int], splits: list[int], emit,
               dev) -> dict[int, dict[str, float]]:
    """{m: {variant: us}} for one (N, K) product followed by an add + norm."""
    ws = rotated_weights(n, k, dev)
    norm = RMSNorm(n, 1e-5).to(dev)
    norm.weight.data = torch.rand(n, dtype=torch.bfloat16, device=dev) + 0.5
    g, eps = norm.weight, norm.eps
    times: dict[int, dict[str, float]] = {}
    for m in rows:
        x = torch.randn(m, k, dtype=torch.bfloat16, device=dev)
        r = torch.randn(m, n, dtype=torch.bfloat16, device=dev)
        base = dict(shape=name, m=m, n=n, k=k)

        def linear_norm(w):
            return fused_add_rms_norm(F.linear(x, w), r, g, eps)
        ref = linear_norm(ws[0])
        us = graph_time_us([lambda w=w: linear_norm(w) for w in ws], reps=5, iters=None)
        times[m] = {"linear": us}
        emit(dict(base, variant="linear", us=round(us, 2)))
        for s in splits:
            if k % (s * 64):
                continue

            def parts_norm(w, s=s):
                return linear_add_norm(x, w, s, r, norm)
            got = parts_norm(ws[0])
            err = max((a.float() - b.float()).abs().max().item() for a, b in zip(got, ref))
            assert err < 0.5, (name, m, s, err)
            us = graph_time_us([lambda w=w: parts_norm(w) for w in ws], reps=5, iters=None)
            times[m][f"bmm{s}"] = us
            emit(dict(base, variant=f"bmm{s}", us=round(us, 2), max_abs_diff=err))
    return times


def main() -> int:
    ap = tuner_parser(margin=0.03)
    ap.add_argument("--splits", default="2,4")
    args = ap.parse_args()
    dev = torch.device("cuda")
    rows = [int(r) for r in args.rows.split(",")] if args.rows else graph_rows()
    splits = [int(s) for s in args.splits.split(",")]
    emit = jsonl_emitter(args.out)
    wins: dict[str, dict[str, int]] = {}
    for name, n, k in unique_shapes(args.models, ("o", "down")):
        per_m = wins.setdefault(f"{n},{k}", {})
        for m, t in tune_shape(name, n, k, rows, splits, emit, dev).items():
            best = min((us, v) for v, us in t.items())
            if best[1] != "linear" and best[0] < t["linear"] * (1 - args.margin):
                per_m[str(m)] = int(best[1][3:])
    if args.table_out:
        print(json.dumps(merge_table(args.table_out, torch.cuda.get_device_name(dev), wins)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
