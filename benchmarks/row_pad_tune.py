"""Tune at which row counts a product runs faster padded to more rows (layers/row_pad.py).

    source benchmarks/device_env.sh && python3 benchmarks/row_pad_tune.py CONFIG_DIR
        [CONFIG_DIR...] [--rows 24,32,...] [--margin 0.10] [--out FILE]
        [--table-out kvflow/kernels/configs/row_pad_<device>.json]

Why: cuBLAS picks its kernel by the problem's shape, and at some row counts the pick is poor
(Llama-3.1-8B's q|k|v product: 32.4 us at 320 rows, 25.6 at 328; gate|up: 272 us at 448,
154 at 512, H200).

What: per decoder projection (q|k|v, o, gate|up, down) of each model and per row count M
(default: the CUDA-graph sizes between 17 and 512), CUDA-graph replays rotating over enough
weight copies that no weight is served from L2: F.linear at M, and the copy into an M'-row
buffer plus F.linear at M' (row_pad.linear_padded) for M' = M + 8, 16, 24, 32, 48, 64 and
the next multiples of 128 and 256. One JSON line per (shape, M, M'); with --table-out, the
fastest M' per (N, K, M) where it beats M by more than --margin, merged into that table.
"""
from __future__ import annotations

import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from graph_timing import graph_time_us, jsonl_emitter  # noqa: E402
from split_k_norm_tune import (graph_rows, rotated_weights, tuner_parser,  # noqa: E402
                               unique_shapes)
from kvflow.layers.row_pad import linear_padded  # noqa: E402
from kvflow.layers.shape_tables import merge_table  # noqa: E402


def candidates(m: int) -> list[int]:
    up = lambda g: -(-m // g) * g  # noqa: E731
    return sorted({m + d for d in (8, 16, 24, 32, 48, 64)} | {up(128), up(256)} - {m})


def main() -> int:
    args = tuner_parser(margin=0.10).parse_args()
    dev = torch.device("cuda")
    rows = [int(r) for r in args.rows.split(",")] if args.rows else graph_rows()
    emit = jsonl_emitter(args.out)
    wins: dict[str, dict[str, int]] = {}
    for name, n, k in unique_shapes(args.models):
        ws = rotated_weights(n, k, dev)
        per_m = wins.setdefault(f"{n},{k}", {})
        for m in rows:
            x = torch.randn(m, k, dtype=torch.bfloat16, device=dev)
            base = graph_time_us([lambda w=w: F.linear(x, w) for w in ws], reps=5,
                                 iters=None)
            emit(dict(shape=name, n=n, k=k, m=m, rows=m, us=round(base, 2)))
            best = (base, m)
            ref = F.linear(x, ws[0]).float()
            for mp in candidates(m):
                # Another kernel may add in another order: a few bf16 ulps of the output.
                err = (linear_padded(x, ws[0], None, mp).float() - ref).abs().max()
                assert err <= 0.02 * ref.abs().max(), (name, m, mp, err)
                us = graph_time_us([lambda w=w, mp=mp: linear_padded(x, w, None, mp)
                                    for w in ws], reps=5, iters=None)
                emit(dict(shape=name, n=n, k=k, m=m, rows=mp, us=round(us, 2)))
                best = min(best, (us, mp))
            if best[1] != m and best[0] < base * (1 - args.margin):
                per_m[str(m)] = best[1]
    if args.table_out:
        print(json.dumps(merge_table(args.table_out, torch.cuda.get_device_name(dev), wins)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
