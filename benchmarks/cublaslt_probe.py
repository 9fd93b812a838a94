"""Do cuBLASLt's other algorithms beat the one torch gets, on the decode GEMMs?

    source benchmarks/device_env.sh && python3 benchmarks/cublaslt_probe.py CONFIG_DIR
        [--rows 32,64,...] [--algos 24] [--out FILE]

Why: torch's bf16 `linear` takes cuBLAS's first heuristic choice. At nanovllm's mid-size
decode steps (Llama-3.1-8B, 32-256 requests) those products run 10-30% above max(weight read,
FLOPs) (session 11, gemm_mid.py), and a hand-written Triton GEMM did not beat them. cuBLASLt's
heuristic returns a ranked list of algorithms (tile, stages, split-K, cluster shape); timing
the whole list per shape (what PyTorch's TunableOp does on ROCm, not on CUDA) shows whether a
per-shape pick is worth wiring in.

What: per projection (q|k|v, o, gate|up, down, lm_head) and row count, CUDA-graph replays
rotating over enough weight copies that no weight comes from L2 (as gemm_mid.py): torch's
linear, then each algorithm the heuristic returns for the same problem through cublasLtMatmul
(ctypes; checked against torch's result). One JSON line per (shape, rows).
"""
from __future__ import annotations

import argparse
import ctypes
import glob
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from gemm_shapes import shapes  # noqa: E402
from graph_timing import graph_time_us  # noqa: E402

HBM_TBS, MMA_TFLOPS = 4.3, 700.0
COMPUTE_32F, R_32F, R_16BF = 68, 0, 14          # cublasComputeType_t, cudaDataType
DESC_TRANSA, DESC_TRANSB = 3, 4                 # cublasLtMatmulDescAttributes_t
PREF_MAX_WORKSPACE = 1                          # cublasLtMatmulPreferenceAttributes_t
OP_N, OP_T = 0, 1
WORKSPACE = 32 << 20


class HeuristicResult(ctypes.Structure):        # cublasLtMatmulHeuristicResult_t
    _fields_ = [("algo", ctypes.c_uint64 * 8), ("workspace", ctypes.c_size_t),
                ("state", ctypes.c_int), ("waves", ctypes.c_float), ("reserved", ctypes.c_int * 4)]


def load_cublaslt() -> ctypes.CDLL:
    cands = []
    for base in sys.path:
        cands += glob.glob(os.path.join(base, "nvidia", "cu*", "lib", "libcublasLt.so*"))
        cands += glob.glob(os.path.join(base, "nvidia", "cublas", "lib", "libcublasLt.so*"))
    for name in cands + ["libcublasLt.so.13", "libcublasLt.so.12", "libcublasLt.so"]:
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    raise RuntimeError("libcublasLt not found")


def check(status: int, what: str) -> None:
    if status != 0:
        raise RuntimeError(f"{what}: cublas status {status}")


class LtGemm:
    """y[M, N] = x[M, K] @ w[N, K]^T (torch's linear) through cublasLtMatmul: in cuBLAS's
    column-major terms D[N, M] = op(A = w)^T [N, K] @ B = x^T [K, M]."""

    def __init__(self, lib, handle, m: int, n: int, k: int):
        self.lib, self.handle = lib, handle
        self.desc = ctypes.c_void_p()
        check(lib.cublasLtMatmulDescCreate(ctypes.byref(self.desc), COMPUTE_32F, R_32F), "desc")
        for attr, val in ((DESC_TRANSA, OP_T), (DESC_TRANSB, OP_N)):
            v = ctypes.c_int32(val)
            check(lib.cublasLtMatmulDescSetAttribute(self.desc, attr, ctypes.byref(v), 4), "attr")
        self.a, self.b, self.d = (ctypes.c_void_p() for _ in range(3))
        check(lib.cublasLtMatrixLayoutCreate(ctypes.byref(self.a), R_16BF, ctypes.c_uint64(k),
                                             ctypes.c_uint64(n), ctypes.c_int64(k)), "A")
        check(lib.cublasLtMatrixLayoutCreate(ctypes.byref(self.b), R_16BF, ctypes.c_uint64(k),
                                             ctypes.c_uint64(m), ctypes.c_int64(k)), "B")
        check(lib.cublasLtMatrixLayoutCreate(ctypes.byref(self.d), R_16BF, ctypes.c_uint64(n),
                                             ctypes.c_uint64(m), ctypes.c_int64(n)), "D")
        self.alpha, self.beta = ctypes.c_float(1.0), ctypes.c_float(0.0)

    def algos(self, count: int) -> list[HeuristicResult]:
        pref = ctypes.c_void_p()
        check(self.lib.cublasLtMatmulPreferenceCreate(ctypes.byref(pref)), "pref")
        ws = ctypes.c_uint64(WORKSPACE)
        check(self.lib.cublasLtMatmulPreferenceSetAttribute(pref, PREF_MAX_WORKSPACE,
                                                            ctypes.byref(ws), 8), "pref attr")
        res = (HeuristicResult * count)()
        got = ctypes.c_int(0)
        check(self.lib.cublasLtMatmulAlgoGetHeuristic(
            self.handle, self.desc, self.a, self.b, self.d, self.d, pref, count, res,
            ctypes.byref(got)), "heuristic")
        self.lib.cublasLtMatmulPreferenceDestroy(pref)
        return [res[i] for i in range(got.value) if res[i].state == 0]

    def close(self) -> None:
        for layout in (self.a, self.b, self.d):
            self.lib.cublasLtMatrixLayoutDestroy(layout)
        self.lib.cublasLtMatmulDescDestroy(self.desc)

    def run(self, x, w, out, algo: HeuristicResult, workspace) -> None:
        stream = torch.cuda.current_stream().cuda_stream
        check(self.lib.cublasLtMatmul(
            self.handle, self.desc, ctypes.byref(self.alpha), ctypes.c_void_p(w.data_ptr()),
            self.a, ctypes.c_void_p(x.data_ptr()), self.b, ctypes.byref(self.beta),
            ctypes.c_void_p(out.data_ptr()), self.d, ctypes.c_void_p(out.data_ptr()), self.d,
            ctypes.byref(algo.algo), ctypes.c_void_p(workspace.data_ptr()),
            ctypes.c_size_t(WORKSPACE), ctypes.c_void_p(stream)), "matmul")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--rows", default="32,64,96,128,160,200,256,384,512,1000")
    p.add_argument("--shapes", default="qkv,o,gate_up,down,lm_head")
    p.add_argument("--algos", type=int, default=24)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    lib = load_cublaslt()
    handle = ctypes.c_void_p()
    check(lib.cublasLtCreate(ctypes.byref(handle)), "create")
    dev = torch.device("cuda")
    workspace = torch.empty(WORKSPACE, dtype=torch.uint8, device=dev)
    with open(f"{args.model}/config.json") as f:
        cfg = json.load(f)
    table = dict(shapes(cfg), lm_head=(cfg["vocab_size"], cfg["hidden_size"]))
    out_f = open(args.out, "w") if args.out else None
    for name in args.shapes.split(","):
        n, k = table[name]
        copies = max(2, -(-320 * 2 ** 20 // (n * k * 2)))    # >= 320 MB of weights: no L2 hits
        ws = [torch.empty(n, k, dtype=torch.bfloat16, device=dev).uniform_(-1e-3, 1e-3)
              for _ in range(copies)]
        for m in (int(r) for r in args.rows.split(",")):
            x = torch.empty(m, k, dtype=torch.bfloat16, device=dev).uniform_(-1, 1)
            outs = [torch.empty(m, n, dtype=torch.bfloat16, device=dev) for _ in ws]
            ref = torch.nn.functional.linear(x, ws[0]).float()
            torch_us = graph_time_us([lambda w=w, o=o: torch.mm(x, w.t(), out=o)
                                      for w, o in zip(ws, outs)], reps=4, iters=10)
            lt = LtGemm(lib, handle, m, n, k)
            times = []
            for i, algo in enumerate(lt.algos(args.algos)):
                try:
                    outs[0].zero_()
                    lt.run(x, ws[0], outs[0], algo, workspace)
                    torch.cuda.synchronize()
                    torch.testing.assert_close(outs[0].float(), ref, atol=2e-3, rtol=2e-2)
                    us = graph_time_us([lambda w=w, o=o, a=algo: lt.run(x, w, o, a, workspace)
                                        for w, o in zip(ws, outs)], reps=4, iters=10)
                except Exception as e:   # an algorithm that fails or is wrong is skipped
                    print(f"{name} m={m} algo {i}: {str(e)[:120]}", file=sys.stderr)
                    continue
                times.append((round(us, 1), i, round(algo.waves, 2), algo.workspace))
            lt.close()
            flops, wbytes = 2 * m * n * k, n * k * 2
            floor = max(wbytes / HBM_TBS / 1e6, flops / MMA_TFLOPS / 1e6)
            best = min(times) if times else None
            rec = dict(model=os.path.basename(args.model.rstrip("/")), shape=name, m=m, n=n, k=k,
                       floor_us=round(floor, 1), torch_us=round(torch_us, 1),
                       lt_first_us=times[0][0] if times and times[0][1] == 0 else None,
                       best_us=best[0] if best else None, best_algo=best[1] if best else None,
                       best_vs_torch=round(torch_us / best[0], 3) if best else None,
                       n_algos=len(times), algos=sorted(times)[:6])
            print(json.dumps(rec), flush=True)
            if out_f:
                out_f.write(json.dumps(rec) + "\n")
                out_f.flush()
        del ws
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
