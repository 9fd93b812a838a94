"""A product run at more rows than it has (kvflow/layers/row_pad.py): same result, the
conditions that keep the plain product, the committed tables."""
from __future__ import annotations

import glob
import json

import torch

from kvflow.layers import row_pad, shape_tables
from kvflow.layers.linear import QKVParallelLinear


def test_padded_product_matches():
    torch.manual_seed(0)
    x = torch.randn(5, 32, dtype=torch.bfloat16)
    w = torch.randn(24, 32, dtype=torch.bfloat16)
    b = torch.randn(24, dtype=torch.bfloat16)
    got = row_pad.linear_padded(x, w, b, 16)
    assert got.shape == (5, 24) and got.is_contiguous()
    torch.testing.assert_close(got, torch.nn.functional.linear(x, w, b), atol=0, rtol=0)


def test_layer_uses_the_table(monkeypatch):
    """A layer's product goes through the padded path exactly where the table has its
    (N, K, M), and the result is the plain product's."""
    layer = QKVParallelLinear(32, 8, 4, 2).to(torch.bfloat16)
    torch.nn.init.normal_(layer.weight)
    n, k = layer.weight.shape
    calls = []
    monkeypatch.setattr(row_pad, "padded_rows",
                        lambda x2, w: {(n, k, 3): 24}.get((w.shape[0], w.shape[1], x2.shape[0])))
    real = row_pad.linear_padded
    monkeypatch.setattr(row_pad, "linear_padded",
                        lambda *a: calls.append(a[-1]) or real(*a))
    x = torch.randn(3, 32, dtype=torch.bfloat16)
    want = torch.nn.functional.linear(x, layer.weight)
    torch.testing.assert_close(layer(x), want, atol=0, rtol=0)
    assert calls == [24]
    layer(torch.randn(4, 32, dtype=torch.bfloat16))
    assert calls == [24]


def test_conditions(monkeypatch):
    """CPU tensors, fp32 and KVFLOW_ROW_PAD=0 never consult the table."""
    monkeypatch.setattr(shape_tables, "lookup", lambda *a: 64)
    w = torch.zeros(8, 16, dtype=torch.bfloat16)
    assert row_pad.padded_rows(torch.zeros(4, 16, dtype=torch.bfloat16), w) is None  # CPU
    if torch.cuda.is_available():
        xc, wc = torch.zeros(4, 16, dtype=torch.bfloat16, device="cuda"), w.cuda()
        assert row_pad.padded_rows(xc, wc) == 64
        assert row_pad.padded_rows(xc.float(), wc.float()) is None
        monkeypatch.setenv("KVFLOW_ROW_PAD", "0")
        assert row_pad.padded_rows(xc, wc) is None


def test_committed_tables_are_valid():
    """Every committed table parses and only ever pads up."""
    for path in glob.glob(shape_tables.table_path(row_pad.KIND, "*").replace("_.json", "*.json")):
        with open(path) as f:
            device = json.load(f)["device"]
        assert shape_tables.table_path(row_pad.KIND, device) == path
        for (n, k, m), rows in shape_tables.load_table(row_pad.KIND, device).items():
            assert rows > m > 16, (path, n, k, m, rows)
