"""Tune which cuBLASLt algorithm each large product runs (kvflow/kernels/cublaslt.py's table).

    source benchmarks/device_env.sh && python3 benchmarks/cublaslt_tune.py CONFIG_DIR
        [CONFIG_DIR...] [--rows 512,768,...] [--margin 0.02] [--keep-rows 512] [--algos 24]
        [--names qkv,o,...] [--out FILE]
        [--table-out PATH.json | --table-out auto (the device's committed table)]

Why: torch's bf16 linear runs cuBLAS's first heuristic choice; at 640-16384 rows another entry
of cuBLASLt's ranked list is often 2-10% faster on Llama-3.1-8B's products (session 35,
benchmarks/results/cublaslt-s35/).

What: per unique (N, K) of the models' decoder products and LM head, at each row count of the
ladder above --keep-rows (prompt steps, the largest decode batches; lower rungs are written
as ""): torch's
F.linear, then each algorithm the heuristic returns (checked against torch's result), as
CUDA-graph replays rotating over enough weight copies that no weight comes from L2; then
torch and the three fastest again, interleaved, three times (medians). One JSON line per
(shape, M). With --table-out, an entry per (N, K, M): the fastest algorithm where it beats
torch by more than --margin, else "" (torch's), merged into that table with the cuBLASLt
version (an entry covers the row counts down to the next smaller one).
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
from split_k_norm_tune import rotated_weights  # noqa: E402
from kvflow.kernels import cublaslt  # noqa: E402
from kvflow.layers.shape_tables import merge_table, table_path  # noqa: E402

LADDER = "512,640,768,1024,1536,2048,3072,4096,6144,8192,12288,16384"


def model_shapes(models: list[str], names=None):
    """(name, N, K) of the models' decoder products and LM heads (`names` of them, default
    all), each (N, K) once."""
    done = set()
    for model in models:
        with open(os.path.join(model, "config.json")) as f:
            cfg = json.load(f)
        for name, (n, k) in dict(shapes(cfg), lm_head=(cfg["vocab_size"],
                                                        cfg["hidden_size"])).items():
            if (n, k) not in done and (names is None or name in names):
                done.add((n, k))
                yield name, n, k


def tune(name: str, n: int, k: int, m: int, count: int, emit, dev) -> tuple[float, list]:
    """torch's microseconds and [(us, value, index)] of the algorithms that ran correctly,
    fastest first. The best of eight noisy timings is biased low (the first session-35 table
    promised ~3% on Llama-3.1-8B throughput8k and gave 1.2%), so torch and the three fastest
    are timed again, interleaved, three more times, and each keeps its median."""
    ws = rotated_weights(n, k, dev)
    x = torch.randn(m, k, dtype=torch.bfloat16, device=dev)
    outs = [torch.empty(m, n, dtype=torch.bfloat16, device=dev) for _ in ws]
    ref = F.linear(x, ws[0]).float()
    plan = cublaslt.Plan(dev.index, m, n, k, torch.bfloat16)
    workspace = torch.empty(cublaslt.MAX_WORKSPACE, dtype=torch.uint8, device=dev)

    def time_us(algo=None) -> float:
        """torch's product (algo None) or the algorithm's, over the rotated weights."""
        if algo is None:
            fns = [lambda w=w, o=o: torch.mm(x, w.t(), out=o) for w, o in zip(ws, outs)]
        else:
            fns = [lambda w=w, o=o: plan.run(x, w, o, algo, workspace) for w, o in zip(ws, outs)]
        return graph_time_us(fns, reps=4, iters=None, target_ms=40)
    torch_us = time_us()
    timed, algo_of = [], {}
    for i, h in enumerate(plan.heuristics(count)):
        try:
            outs[0].zero_()
            plan.run(x, ws[0], outs[0], h.algo, workspace)
            torch.cuda.synchronize()
            torch.testing.assert_close(outs[0].float(), ref, atol=2e-2, rtol=2e-2)
            us = time_us(h.algo)
        except Exception as e:    # an algorithm that fails or is wrong is skipped
            print(f"{name} m={m} algo {i}: {str(e)[:120]}", file=sys.stderr)
            continue
        value = cublaslt.encode(h.algo, h.workspace)
        timed.append((us, value, i))
        algo_of[value] = h.algo
    timed.sort()
    algo_of["torch"] = None
    rerun = {"torch": [torch_us]} | {v: [us] for us, v, _ in timed[:3]}
    for _ in range(3):
        for v, times in rerun.items():
            times.append(time_us(algo_of[v]))
    med = {v: sorted(t)[len(t) // 2] for v, t in rerun.items()}
    torch_us = med.pop("torch")
    index = {v: i for _, v, i in timed}
    timed = sorted((us, v, index[v]) for v, us in med.items())
    emit(dict(shape=name, n=n, k=k, m=m, torch_us=round(torch_us, 1),
              algos=[(round(us, 1), i) for us, _, i in timed[:6]],
              best_vs_torch=round(torch_us / timed[0][0], 3) if timed else None))
    return torch_us, timed


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="+")
    ap.add_argument("--rows", default=LADDER)
    ap.add_argument("--margin", type=float, default=0.02)
    ap.add_argument("--keep-rows", type=int, default=512,
                    help="row counts up to this keep torch's product (nanovllm's step sizes: "
                         "row_pad / split_k_norm tune them, and the 512-row entries of the "
                         "first table were level on nanovllm)")
    ap.add_argument("--algos", type=int, default=24)
    ap.add_argument("--names", default=None, help="e.g. lm_head (default: qkv,o,gate_up,down,"
                    "lm_head; a MoE model's experts are not dense products)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--table-out", default=None,
                    help="a .json path, or 'auto': kvflow/kernels/configs/cublaslt_<device>.json")
    args = ap.parse_args()
    dev = torch.device("cuda", torch.cuda.current_device())
    emit = jsonl_emitter(args.out)
    by_shape: dict[str, dict[str, str]] = {}
    names = args.names.split(",") if args.names else None
    for name, n, k in model_shapes(args.models, names):
        per_m = by_shape.setdefault(f"{n},{k}", {})
        for m in (int(r) for r in args.rows.split(",")):
            if m <= args.keep_rows:
                per_m[str(m)] = ""        # bounds the ranges above; these keep torch's
                continue
            torch_us, timed = tune(name, n, k, m, args.algos, emit, dev)
            win = timed and timed[0][0] * (1 + args.margin) < torch_us
            per_m[str(m)] = timed[0][1] if win else ""
        torch.cuda.empty_cache()
    if args.table_out:
        device_name = torch.cuda.get_device_name(dev)
        path = args.table_out if args.table_out.endswith(".json") else \
            table_path(cublaslt.KIND, device_name)
        merge_table(path, device_name, by_shape, header={"cublaslt_version": cublaslt.version()})
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
