"""The best sustained rates this GPU reaches for bf16 products and for reading HBM, with power.

    source benchmarks/device_env.sh && python3 benchmarks/floor_probe.py CONFIG_DIR [--out FILE]

Why: the throughput floors in docs/performance.md ("Why the remaining 1.15x ...") divide a
workload's FLOPs by the product rate the engine's steps sustain (~706 TFLOP/s) and its KV bytes
by the copy rate (~4.3 TB/s). A floor argued from the engine's own rates is only as strong as
those rates are the GPU's best. This probe measures the best any kernel at hand reaches, held
long enough (--seconds, default 1.5 s) for the power limit to settle the clock:

- products: the model's five projections at 1000 and 16384 rows, and square 8192^3 and
  16384^3, with torch's cuBLAS pick and with the fastest of cuBLASLt's heuristic list (each
  candidate timed in a short burst, the fastest then held);
- reads: a Triton kernel that only reads (sums) an 8 GiB tensor, over a few tile shapes; and
  torch's sum and copy for comparison.

Each held run samples `nvidia-smi` every 50 ms (power, SM clock) and reports the medians of
the run's second half. Operands are U(-1e-3, 1e-3) like the dummy weights (a GEMM's power
depends on its data). One JSON line per measurement, then a summary with the best rates.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(__file__))
from gemm_shapes import shapes  # noqa: E402
from graph_timing import eager_time_us, jsonl_emitter  # noqa: E402
from kvflow.kernels import cublaslt  # noqa: E402


class PowerLog:
    """nvidia-smi samples (W, MHz) while the block runs; medians of its second half."""

    def __enter__(self):
        self.proc = subprocess.Popen(
            ["nvidia-smi", "--query-gpu=power.draw,clocks.sm", "--format=csv,noheader,nounits",
             "-lms", "50"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        return self

    def __exit__(self, *exc):
        self.proc.terminate()
        out, _ = self.proc.communicate()
        rows = []
        for line in out.splitlines():
            try:
                w, mhz = (float(v) for v in line.split(","))
                rows.append((w, mhz))
            except ValueError:
                continue
        tail = rows[len(rows) // 2:] or [(float("nan"), float("nan"))]
        self.watts = statistics.median(r[0] for r in tail)
        self.mhz = statistics.median(r[1] for r in tail)
        return False


def held_us(fn, seconds: float) -> tuple[float, float, float]:
    """(us per call, W, MHz) with fn run back to back for about `seconds`."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    per = (time.perf_counter() - t0) / 10
    n = max(10, int(seconds / per))
    start, end = torch.cuda.Event(True), torch.cuda.Event(True)
    with PowerLog() as p:
        for _ in range(n // 3):                 # a third of the time to let the clock settle
            fn()
        start.record()
        for _ in range(n):
            fn()
        end.record()
        torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / n, p.watts, p.mhz


def products(emit, problems, seconds: float, n_algos: int) -> None:
    dev = torch.device("cuda", torch.cuda.current_device())
    workspace = torch.empty(cublaslt.MAX_WORKSPACE, dtype=torch.uint8, device=dev)
    for name, m, n, k in problems:
        copies = max(1, -(-160 * 2 ** 20 // (n * k * 2)))    # weights not served from L2
        ws = [torch.empty(n, k, dtype=torch.bfloat16, device=dev).uniform_(-1e-3, 1e-3)
              for _ in range(copies)]
        x = torch.empty(m, k, dtype=torch.bfloat16, device=dev).uniform_(-1e-3, 1e-3)
        out = torch.empty(m, n, dtype=torch.bfloat16, device=dev)
        turn = [0]

        def run_torch():
            turn[0] = (turn[0] + 1) % copies
            torch.mm(x, ws[turn[0]].t(), out=out)

        flops = 2 * m * n * k
        us, watts, mhz = held_us(run_torch, seconds)
        emit(dict(kind="product", name=name, m=m, n=n, k=k, path="torch", us=round(us, 1),
                  tflops=round(flops / us / 1e6, 1), watts=watts, mhz=mhz))
        plan = cublaslt.Plan(dev.index, m, n, k, torch.bfloat16)
        bursts = []
        for i, algo in enumerate(plan.heuristics(n_algos)):
            try:
                def run_lt(a=algo.algo):
                    turn[0] = (turn[0] + 1) % copies
                    plan.run(x, ws[turn[0]], out, a, workspace)
                bursts.append((eager_time_us(run_lt, warmup=3), i, run_lt))
            except Exception as e:       # an algorithm that cannot run this problem
                print(f"{name} m={m} algo {i}: {str(e)[:100]}", file=sys.stderr)
        if bursts:
            b_us, i, fn = min(bursts, key=lambda b: b[0])
            us, watts, mhz = held_us(fn, seconds)
            emit(dict(kind="product", name=name, m=m, n=n, k=k, path=f"cublaslt#{i}",
                      burst_us=round(b_us, 1), us=round(us, 1),
                      tflops=round(flops / us / 1e6, 1), watts=watts, mhz=mhz))
        ws = plan = bursts = None       # free this problem's operands before the next
        torch.cuda.empty_cache()


@triton.jit
def _read_kernel(x_ptr, out_ptr, n_per_prog, BLOCK: tl.constexpr):
    # Each program sums its own contiguous stretch of x (n_per_prog elements, a multiple of
    # BLOCK): the read is the whole cost, the one store per program is noise.
    pid = tl.program_id(0)
    base = x_ptr + pid.to(tl.int64) * n_per_prog
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n_per_prog, BLOCK):
        acc += tl.load(base + start + tl.arange(0, BLOCK)).to(tl.float32)
    tl.store(out_ptr + pid, tl.sum(acc))


def reads(emit, seconds: float, gib: int) -> None:
    dev = torch.device("cuda", torch.cuda.current_device())
    n = gib * 2 ** 30 // 2
    x = torch.empty(n, dtype=torch.bfloat16, device=dev).uniform_(-1e-3, 1e-3)
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    for per_sm in (4, 8, 16):
        for block, warps in ((2048, 4), (4096, 8), (8192, 8)):
            progs = sms * per_sm
            n_per = n // progs // block * block
            partial = torch.empty(progs, dtype=torch.float32, device=dev)

            def run(progs=progs, n_per=n_per, block=block, warps=warps, partial=partial):
                _read_kernel[(progs,)](x, partial, n_per, BLOCK=block, num_warps=warps)
            us, watts, mhz = held_us(run, seconds)
            emit(dict(kind="read", path=f"triton per_sm={per_sm} block={block} warps={warps}",
                      bytes=progs * n_per * 2, us=round(us, 1),
                      tbs=round(progs * n_per * 2 / us / 1e6, 3), watts=watts, mhz=mhz))
    us, watts, mhz = held_us(lambda: x.sum(dtype=torch.float32), seconds)
    emit(dict(kind="read", path="torch sum", bytes=n * 2, us=round(us, 1),
              tbs=round(n * 2 / us / 1e6, 3), watts=watts, mhz=mhz))
    half = x[: n // 2]
    y = torch.empty_like(half)
    us, watts, mhz = held_us(lambda: y.copy_(half), seconds)
    emit(dict(kind="copy", path="torch copy (read + write bytes)", bytes=n * 2, us=round(us, 1),
              tbs=round(n * 2 / us / 1e6, 3), watts=watts, mhz=mhz))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("model", help="config dir (its five projections are timed)")
    p.add_argument("--rows", default="1000,16384")
    p.add_argument("--seconds", type=float, default=1.5)
    p.add_argument("--algos", type=int, default=8)
    p.add_argument("--read-gib", type=int, default=8)
    p.add_argument("--skip", default="", help="'products' or 'reads'")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    with open(f"{args.model}/config.json") as f:
        cfg = json.load(f)
    table = dict(shapes(cfg), lm_head=(cfg["vocab_size"], cfg["hidden_size"]))
    problems = [(name, int(m), n, k) for m in args.rows.split(",")
                for name, (n, k) in table.items()]
    problems += [("square", 8192, 8192, 8192), ("square", 16384, 16384, 16384)]
    records = []
    emit_line = jsonl_emitter(args.out)

    def emit(rec):
        rec["device"] = torch.cuda.get_device_name()
        records.append(rec)
        emit_line(rec)
    if "products" not in args.skip:
        products(emit, problems, args.seconds, args.algos)
    if "reads" not in args.skip:
        reads(emit, args.seconds, args.read_gib)
    summary = dict(kind="summary",
                   best_product_tflops=max((r["tflops"] for r in records
                                            if r["kind"] == "product"), default=None),
                   best_read_tbs=max((r["tbs"] for r in records if r["kind"] == "read"),
                                     default=None))
    emit(summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
