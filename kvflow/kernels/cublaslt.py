"""Products through cuBLASLt with an algorithm chosen by measurement, where torch's is slower.

torch's bf16 `linear` runs cuBLAS's first heuristic choice. At large row counts that choice is
often not the fastest of the list cuBLASLt's heuristic returns for the same problem: on the
H200, Llama-3.1-8B's products at 640-16384 rows run 2-10% faster alone with another entry of
the list (benchmarks/results/cublaslt-s35/). Products are ~90% of a throughput8k run's
prefill steps and ~half of its 1000-request decode steps; there the table gains 1.0-1.2% end
to end (same-call A/Bs on two leases). Products of up to 512 rows (nanovllm's decode and
riding steps, tuned by layers/row_pad.py and split_k_norm.py) keep torch's choice: the
512-row entries were level on nanovllm. Above that the table applies eagerly and inside the
decode graphs of 544-1024 requests alike (the workspace is made eagerly at the first product
that needs one: with the committed tables, the memory-profile step at the token budget; a
capture that would have to make it keeps torch's pick instead).

What runs here: y[M, N] = x[M, K] @ w[N, K]^T (no bias) through cublasLtMatmul with an
algorithm from the device's table `kvflow/kernels/configs/cublaslt_<device>.json`, written by
benchmarks/cublaslt_tune.py:

    {"device": ..., "cublaslt_version": V, "by_shape": {"N,K": {"M": "<algo hex>:<workspace>"}}}

The tuner times every shape at a ladder of row counts and writes an entry at each: the
algorithm where one beat torch's by its margin, else "" (torch's own). An entry at M covers
the row counts above the shape's next smaller entry, up to M (the smallest entry only its own
M): an algorithm is a tile shape, good for neighbouring row counts too, and each use is
checked by cublasLtMatmulAlgoCheck (a refusal keeps torch's path).
An algorithm is an opaque struct that only the cuBLASLt build which returned it may read, so
a table from another version is ignored (logged once).

Arithmetic: the same as torch's product (fp32 accumulation, one rounding to the output dtype);
only the tiling, and so the order of the fp32 additions, differs, as between any two cuBLAS
kernels. Off: CPU, fp32, biased products, torch.compile tracing, non-contiguous or unaligned
operands, a CUDA graph capture before the workspace exists, and KVFLOW_CUBLASLT=0.
"""
from __future__ import annotations

import bisect
import ctypes
import functools
import glob
import json
import logging
import os
import sys
from typing import NamedTuple, Optional

import torch

from kvflow import envs
from kvflow.kernels.device import device_properties

logger = logging.getLogger(__name__)

KIND = "cublaslt"
# cuBLASLt enums (cublasLt.h): compute / scale types and matmul descriptor attributes.
_COMPUTE_32F, _R_32F, _R_16F, _R_16BF = 68, 0, 2, 14
_DESC_TRANSA, _DESC_TRANSB = 3, 4
_PREF_MAX_WORKSPACE = 1
_OP_N, _OP_T = 0, 1
_DTYPES = {torch.bfloat16: _R_16BF, torch.float16: _R_16F}
MAX_WORKSPACE = 32 << 20      # the most workspace a tuned algorithm may ask for


class _Algo(ctypes.Structure):                   # cublasLtMatmulAlgo_t
    _fields_ = [("data", ctypes.c_uint64 * 8)]


class HeuristicResult(ctypes.Structure):         # cublasLtMatmulHeuristicResult_t
    _fields_ = [("algo", _Algo), ("workspace", ctypes.c_size_t), ("state", ctypes.c_int),
                ("waves", ctypes.c_float), ("reserved", ctypes.c_int * 4)]


def _check(status: int, what: str) -> None:
    if status != 0:
        raise RuntimeError(f"cublasLt {what}: status {status}")


@functools.lru_cache(maxsize=None)
def library() -> Optional[ctypes.CDLL]:
    """libcublasLt, preferring the copy torch loaded (its nvidia/cu*/lib wheels); None if none."""
    cands = []
    for base in sys.path:
        for sub in ("cu*", "cublas"):
            cands += sorted(glob.glob(os.path.join(base, "nvidia", sub, "lib", "libcublasLt.so*")))
    for name in cands + ["libcublasLt.so.13", "libcublasLt.so.12", "libcublasLt.so"]:
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        lib.cublasLtGetVersion.restype = ctypes.c_size_t
        return lib
    return None


def version() -> Optional[int]:
    lib = library()
    return int(lib.cublasLtGetVersion()) if lib is not None else None


@functools.lru_cache(maxsize=None)
def _handle(device_index: int) -> ctypes.c_void_p:
    handle = ctypes.c_void_p()
    with torch.cuda.device(device_index):
        _check(library().cublasLtCreate(ctypes.byref(handle)), "create")
    return handle


# ------------------------------------------------------------------------------ the table
def encode(algo: _Algo, workspace: int) -> str:
    """A table value: the algorithm struct's bytes in hex and its workspace bytes."""
    return bytes(algo).hex() + f":{int(workspace)}"


def decode(value: str) -> tuple[_Algo, int]:
    blob, _, ws = value.partition(":")
    return _Algo.from_buffer_copy(bytes.fromhex(blob)), int(ws or 0)


def parse_table(data: dict, lib_version: Optional[int]) -> dict[tuple[int, int], list]:
    """{(n, k): [(m, value), ...] ascending in m} from a table file's contents; empty when the
    table was tuned on another cuBLASLt version (its algorithm structs are not portable)."""
    tuned = data.get("cublaslt_version")
    if tuned != lib_version:
        logger.info("cuBLASLt table tuned on version %s, running %s: not used", tuned, lib_version)
        return {}
    out = {}
    for nk, per_m in data.get("by_shape", {}).items():
        n, k = (int(v) for v in nk.split(","))
        out[(n, k)] = sorted((int(m), v) for m, v in per_m.items())
    return out


@functools.lru_cache(maxsize=None)
def load_table(device_name: str) -> dict[tuple[int, int], list]:
    from kvflow.layers.shape_tables import table_path
    path = table_path(KIND, device_name)
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return parse_table(json.load(f), version())


def table_entry(table: dict, n: int, k: int, m: int) -> Optional[str]:
    """The algorithm (a table value) for m rows of shape (n, k): the entry at the smallest
    tuned row count >= m, if m lies in its range; None for torch's own."""
    rows = table.get((n, k))
    if not rows:
        return None
    i = bisect.bisect_left(rows, (m, ""))
    if i == len(rows) or (i == 0 and rows[0][0] != m):
        return None
    return rows[i][1] or None


# ------------------------------------------------------------------------------ products
class Plan:
    """The descriptors of one (M, N, K, dtype) product: y = x @ w^T, in cuBLAS's column-major
    terms D[N, M] = op(A = w)^T [N, K] @ B = x^T [K, M]."""

    def __init__(self, device_index: int, m: int, n: int, k: int, dtype: torch.dtype):
        self.lib, self.handle = library(), _handle(device_index)
        lib, rt = self.lib, _DTYPES[dtype]
        self.desc = ctypes.c_void_p()
        _check(lib.cublasLtMatmulDescCreate(ctypes.byref(self.desc), _COMPUTE_32F, _R_32F), "desc")
        for attr, val in ((_DESC_TRANSA, _OP_T), (_DESC_TRANSB, _OP_N)):
            v = ctypes.c_int32(val)
            _check(lib.cublasLtMatmulDescSetAttribute(self.desc, attr, ctypes.byref(v), 4), "attr")
        self.a, self.b, self.d = (ctypes.c_void_p() for _ in range(3))
        for layout, rows, cols in ((self.a, k, n), (self.b, k, m), (self.d, n, m)):
            _check(lib.cublasLtMatrixLayoutCreate(ctypes.byref(layout), rt, ctypes.c_uint64(rows),
                                                  ctypes.c_uint64(cols), ctypes.c_int64(rows)),
                   "layout")
        self.alpha, self.beta = ctypes.c_float(1.0), ctypes.c_float(0.0)

    def __del__(self):
        lib = getattr(self, "lib", None)
        if lib is None or getattr(self, "d", None) is None:
            return
        for layout in (self.a, self.b, self.d):
            lib.cublasLtMatrixLayoutDestroy(layout)
        lib.cublasLtMatmulDescDestroy(self.desc)

    def heuristics(self, count: int, max_workspace: int = MAX_WORKSPACE) -> list[HeuristicResult]:
        """cuBLASLt's ranked algorithms for this problem (the tuner times them)."""
        lib, pref = self.lib, ctypes.c_void_p()
        _check(lib.cublasLtMatmulPreferenceCreate(ctypes.byref(pref)), "preference")
        ws = ctypes.c_uint64(max_workspace)
        _check(lib.cublasLtMatmulPreferenceSetAttribute(pref, _PREF_MAX_WORKSPACE,
                                                        ctypes.byref(ws), 8), "preference attr")
        res, got = (HeuristicResult * count)(), ctypes.c_int(0)
        _check(lib.cublasLtMatmulAlgoGetHeuristic(self.handle, self.desc, self.a, self.b, self.d,
                                                  self.d, pref, count, res, ctypes.byref(got)),
               "heuristic")
        lib.cublasLtMatmulPreferenceDestroy(pref)
        return [res[i] for i in range(got.value) if res[i].state == 0]

    def supports(self, algo: _Algo) -> Optional[int]:
        """The workspace bytes `algo` needs for this problem, or None if it cannot run it."""
        result = HeuristicResult()
        status = self.lib.cublasLtMatmulAlgoCheck(self.handle, self.desc, self.a, self.b, self.d,
                                                  self.d, ctypes.byref(algo), ctypes.byref(result))
        return int(result.workspace) if status == 0 else None

    def run(self, x: torch.Tensor, w: torch.Tensor, out: torch.Tensor, algo: _Algo,
            workspace: Optional[torch.Tensor]) -> torch.Tensor:
        ws_ptr = workspace.data_ptr() if workspace is not None else 0
        ws_size = workspace.numel() if workspace is not None else 0
        _check(self.lib.cublasLtMatmul(
            self.handle, self.desc, ctypes.byref(self.alpha), ctypes.c_void_p(w.data_ptr()),
            self.a, ctypes.c_void_p(x.data_ptr()), self.b, ctypes.byref(self.beta),
            ctypes.c_void_p(out.data_ptr()), self.d, ctypes.c_void_p(out.data_ptr()), self.d,
            ctypes.byref(algo), ctypes.c_void_p(ws_ptr), ctypes.c_size_t(ws_size),
            ctypes.c_void_p(torch.cuda.current_stream(x.device).cuda_stream)), "matmul")
        return out


class _Choice(NamedTuple):
    """A table algorithm checked for one (device, M, N, K, dtype): its plan and workspace."""
    plan: Plan
    algo: _Algo
    workspace: int


_WORKSPACES: dict[int, torch.Tensor] = {}


def table_workspace(table: dict) -> int:
    """The most workspace any of a table's algorithms asked for when it was tuned."""
    return min(MAX_WORKSPACE, max((decode(v)[1] for rows in table.values() for _, v in rows
                                   if v), default=0))


def _workspace(device: torch.device, nbytes: int) -> Optional[torch.Tensor]:
    """The device's workspace, if it holds nbytes. Made once, outside CUDA graph captures, as
    large as the table's largest need: a captured graph keeps the pointer it recorded, so the
    buffer is never replaced. None where it is missing or too small (the caller falls back)."""
    ws = _WORKSPACES.get(device.index)
    if ws is None and not torch.cuda.is_current_stream_capturing():
        size = max(nbytes, table_workspace(load_table(device_properties(device).name)))
        _WORKSPACES[device.index] = ws = torch.empty(size, dtype=torch.uint8, device=device)
    return ws if ws is not None and ws.numel() >= nbytes else None


@functools.lru_cache(maxsize=4096)
def _choice(device_index: int, device_name: str, m: int, n: int, k: int,
            dtype: torch.dtype) -> Optional[_Choice]:
    value = table_entry(load_table(device_name), n, k, m)
    if value is None:
        return None
    algo, _ = decode(value)
    plan = Plan(device_index, m, n, k, dtype)
    need = plan.supports(algo)
    if need is None or need > MAX_WORKSPACE:
        return None
    return _Choice(plan, algo, need)


def choose(x2: torch.Tensor, weight: torch.Tensor) -> Optional[_Choice]:
    """The table's algorithm for x2 [M, K] @ weight[N, K]^T, checked, if this product can use
    it (see the module docstring for what cannot)."""
    if not x2.is_cuda or torch.compiler.is_compiling():
        return None            # traced code never looks up the table (dynamo cannot trace it)
    name = device_properties(x2.device).name
    if tuple(weight.shape) not in _tuned_shapes(name):
        return None            # the common case first: eager steps call this per product
    if x2.dtype not in _DTYPES or weight.dtype != x2.dtype or not envs.cublaslt():
        return None
    if not (x2.is_contiguous() and weight.is_contiguous()
            and x2.data_ptr() % 16 == 0 and weight.data_ptr() % 16 == 0):
        return None
    m, k = x2.shape
    return _choice(x2.device.index, name, m, weight.shape[0], k, x2.dtype)


@functools.lru_cache(maxsize=None)
def _tuned_shapes(device_name: str) -> frozenset:
    """The (N, K) shapes a GPU model's table has algorithms for (none without libcublasLt)."""
    if library() is None:
        return frozenset()
    return frozenset(nk for nk, rows in load_table(device_name).items()
                     if any(v for _, v in rows))


def linear(x2: torch.Tensor, weight: torch.Tensor, choice: _Choice,
           out: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """x2 [M, K] @ weight[N, K]^T with the chosen algorithm, into `out` ([M, N], contiguous)
    or a new tensor; None if the workspace it needs cannot be had now (the caller multiplies
    as usual)."""
    ws = _workspace(x2.device, choice.workspace) if choice.workspace else None
    if choice.workspace and ws is None:
        return None
    if out is None:
        out = torch.empty((x2.shape[0], weight.shape[0]), dtype=x2.dtype, device=x2.device)
    elif not out.is_contiguous() or out.data_ptr() % 16:
        return None
    return choice.plan.run(x2, weight, out, choice.algo, ws)
