"""Products through a measured cuBLASLt algorithm (kvflow/kernels/cublaslt.py): the table's
format and row ranges, the conditions that keep torch's product, the committed tables, and on
the GPU the product itself (eager and captured in a CUDA graph) against torch's."""
from __future__ import annotations

import glob
import json

import pytest
import torch
import torch.nn.functional as F

from kvflow.kernels import cublaslt
from kvflow.layers import shape_tables
from kvflow.layers.linear import dense_linear


def _algo(tag: int) -> cublaslt._Algo:
    a = cublaslt._Algo()
    for i in range(8):
        a.data[i] = tag * 1000 + i
    return a


def test_encode_decode_round_trip():
    value = cublaslt.encode(_algo(7), 4)
    algo, ws = cublaslt.decode(value)
    assert bytes(algo) == bytes(_algo(7)) and ws == 4
    assert len(value.partition(":")[0]) == 128


def test_table_ranges():
    """An entry covers the row counts down to the next smaller entry; "" is torch's own; the
    smallest entry covers only itself; nothing past the largest."""
    a, b = cublaslt.encode(_algo(1), 0), cublaslt.encode(_algo(2), 4)
    data = {"cublaslt_version": 5, "by_shape": {"64,32": {"1024": a, "512": "", "2048": b}}}
    table = cublaslt.parse_table(data, 5)
    entry = lambda m: cublaslt.table_entry(table, 64, 32, m)  # noqa: E731
    assert [entry(m) for m in (100, 511, 512, 513, 1024, 1025, 2048, 2049)] == \
        [None, None, None, a, a, b, b, None]
    assert cublaslt.table_entry(table, 64, 16, 1024) is None           # another shape
    table2 = cublaslt.parse_table({"cublaslt_version": 5, "by_shape": {"64,32": {"256": a}}}, 5)
    assert [cublaslt.table_entry(table2, 64, 32, m) for m in (255, 256, 257)] == [None, a, None]
    assert cublaslt.table_workspace(table) == 4


def test_table_of_another_version_is_ignored():
    """Algorithm structs are private to the cuBLASLt build that made them."""
    data = {"cublaslt_version": 5, "by_shape": {"64,32": {"1024": cublaslt.encode(_algo(1), 0)}}}
    assert cublaslt.parse_table(data, 6) == {}
    assert cublaslt.parse_table(data, None) == {}


def test_conditions(monkeypatch):
    """CPU tensors, fp32, a biased product and KVFLOW_CUBLASLT=0 keep torch's product."""
    calls = []
    monkeypatch.setattr(cublaslt, "_choice", lambda *a: calls.append(a) or None)
    w = torch.zeros(8, 16, dtype=torch.bfloat16)
    x = torch.ones(4, 16, dtype=torch.bfloat16)
    assert cublaslt.choose(x, w) is None                                  # CPU
    torch.testing.assert_close(dense_linear(x, w), F.linear(x, w), atol=0, rtol=0)
    assert calls == []
    if torch.cuda.is_available():
        xc, wc = x.cuda(), w.cuda()
        cublaslt.choose(xc, wc)
        assert len(calls) == 1
        assert cublaslt.choose(xc.float(), wc.float()) is None
        assert cublaslt.choose(xc[:, 1:9], wc[:, :8]) is None            # not contiguous
        monkeypatch.setenv("KVFLOW_CUBLASLT", "0")
        assert cublaslt.choose(xc, wc) is None
        assert len(calls) == 1


def test_committed_tables_are_valid():
    """Every committed table names its device and version; values are "" or an algorithm."""
    for path in glob.glob(shape_tables.table_path(cublaslt.KIND, "*").replace("_.json", "*.json")):
        with open(path) as f:
            data = json.load(f)
        assert shape_tables.table_path(cublaslt.KIND, data["device"]) == path
        assert isinstance(data["cublaslt_version"], int)
        for nk, per_m in data["by_shape"].items():
            n, k = (int(v) for v in nk.split(","))
            for m, value in per_m.items():
                assert int(m) > 0 and n > 0 and k > 0
                if value:
                    algo, ws = cublaslt.decode(value)
                    assert 0 <= ws <= cublaslt.MAX_WORKSPACE, (path, nk, m)


def _gpu_table(monkeypatch, n: int, k: int, m: int, rank: int = 1):
    """A one-entry table holding the heuristic's rank-th algorithm for (n, k) at m rows (not
    its first, which is usually torch's own kernel), installed for the current device."""
    if not torch.cuda.is_available() or cublaslt.library() is None:
        pytest.skip("needs CUDA and libcublasLt")
    plan = cublaslt.Plan(torch.cuda.current_device(), m, n, k, torch.bfloat16)
    algos = plan.heuristics(8)
    h = algos[min(rank, len(algos) - 1)]
    data = {"cublaslt_version": cublaslt.version(),
            "by_shape": {f"{n},{k}": {str(m // 2): "", str(m): cublaslt.encode(h.algo, h.workspace)}}}
    table = cublaslt.parse_table(data, cublaslt.version())
    monkeypatch.setattr(cublaslt, "load_table", lambda name: table)
    cublaslt._choice.cache_clear()
    return table


@pytest.mark.gpu
@pytest.mark.parametrize("n,k,m", [(6144, 4096, 1024), (4096, 14336, 700), (1536, 1024, 640)])
def test_gpu_product_matches_torch(monkeypatch, n, k, m):
    """The table's algorithm, through dense_linear (the engine's product), equals torch's up
    to the order of fp32 additions; row counts inside the entry's range use it too."""
    _gpu_table(monkeypatch, n, k, m)
    torch.manual_seed(0)
    w = torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.02
    for rows in (m, m - 3):
        x = torch.randn(rows, k, dtype=torch.bfloat16, device="cuda")
        assert cublaslt.choose(x, w) is not None
        torch.testing.assert_close(dense_linear(x, w), F.linear(x, w), atol=2e-2, rtol=2e-2)
        out = torch.empty(rows, n, dtype=torch.bfloat16, device="cuda")
        assert dense_linear(x, w, out=out) is out
        torch.testing.assert_close(out, F.linear(x, w), atol=2e-2, rtol=2e-2)
    # Outside the ranges: torch's product.
    assert cublaslt.choose(torch.randn(m // 2, k, dtype=torch.bfloat16, device="cuda"), w) is None
    cublaslt._choice.cache_clear()


@pytest.mark.gpu
def test_gpu_product_in_cuda_graph(monkeypatch):
    """Captured in a CUDA graph (as the engine's decode and mixed graphs are), the product
    replays on new inputs like torch's."""
    n, k, m = 4096, 4096, 512
    _gpu_table(monkeypatch, n, k, m, rank=2)
    w = torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.02
    x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
    dense_linear(x, w)                       # eager first: the workspace exists before capture
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        with torch.cuda.graph(g):
            y = dense_linear(x, w)
    torch.cuda.current_stream().wait_stream(s)
    x.copy_(torch.randn_like(x))
    g.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(y, F.linear(x, w), atol=2e-2, rtol=2e-2)
    cublaslt._choice.cache_clear()
