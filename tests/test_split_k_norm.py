"""A projection's split-K sum inside the residual add + RMSNorm after it
(kvflow/layers/split_k_norm.py; the kernel itself: tests/test_kernels.py
test_fused_add_rms_norm_parts).

Here: the layer path against the plain one (product, then the norm), with activations and S
slices; a whole bf16 Llama forward with every o / down projection split against the same
model unsplit, on a GPU or on the interpreter's CPU tensors (the device check is pointed at
them); the conditions that keep cuBLAS's path; the committed tables.
"""
from __future__ import annotations

import glob
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

import kvflow.kernels  # noqa: E402,F401  (applies the interpreter fixes)
from kvflow.kernels.norm import _rms_norm_kernel  # noqa: E402
from kvflow.layers import shape_tables, split_k_norm  # noqa: E402
from kvflow.layers.linear import RowParallelLinear  # noqa: E402
from kvflow.layers.norm import RMSNorm  # noqa: E402
from tests.conftest import kernel_device, make_hf_model, save_hf_model  # noqa: E402
from tests.test_models_hf import _kvflow_logits  # noqa: E402

DEVICE = kernel_device(_rms_norm_kernel)


@pytest.fixture
def force_split(monkeypatch):
    """Every o / down product followed by an add + norm takes `state["s"]` slices (where they
    divide K); returns the state, whose "calls" counts the split launches."""
    state = {"s": 2, "calls": 0}
    monkeypatch.setattr(split_k_norm, "_device_ok", lambda x: True)
    monkeypatch.setattr(split_k_norm, "_lookup",
                        lambda device, n, k, m: state["s"] if k % state["s"] == 0 else None)
    real = split_k_norm.linear_add_norm

    def spy(*a, **kw):
        state["calls"] += 1
        return real(*a, **kw)
    monkeypatch.setattr(split_k_norm, "linear_add_norm", spy)
    return state


def _layer(k: int, n: int, seed: int = 0) -> tuple[RowParallelLinear, RMSNorm]:
    torch.manual_seed(seed)
    lin = RowParallelLinear(k, n).to(torch.bfloat16).to(DEVICE)
    lin.weight.data.normal_(0, 0.05)
    norm = RMSNorm(n, 1e-5).to(torch.bfloat16).to(DEVICE)
    norm.weight.data.uniform_(0.5, 1.5)
    return lin, norm


@pytest.mark.parametrize("s,silu", [(2, False), (4, True), (3, False)])
def test_layer_matches_plain(s, silu, force_split, monkeypatch):
    lin, norm = _layer(192, 64)
    x = torch.randn(5, 2 * 192 if silu else 192).to(torch.bfloat16).to(DEVICE)
    res = torch.randn(5, 64).to(torch.bfloat16).to(DEVICE)
    force_split["s"] = s
    got, got_res = lin(x, silu_mul_input=silu, add_norm=(res, norm, None))
    assert force_split["calls"] == 1
    monkeypatch.setenv("KVFLOW_SPLIT_K_NORM", "0")
    want, want_res = lin(x, silu_mul_input=silu, add_norm=(res, norm, None))
    assert force_split["calls"] == 1
    # The two differ only in the order of the product's fp32 additions: one bf16 ulp at most.
    torch.testing.assert_close(got_res, want_res, atol=0.02, rtol=0.01)
    torch.testing.assert_close(got.materialize(), want.materialize(), atol=0.03, rtol=0.02)
    assert got.h is got_res


def test_forward_matches_unsplit(tmp_path, make_llm, force_split, monkeypatch):
    hf = make_hf_model("llama", num_hidden_layers=3)
    path = save_hf_model(hf, tmp_path / "llama")
    ids = np.random.default_rng(0).integers(0, 383, size=16).tolist()

    def logits():
        llm = make_llm(path, dtype="bfloat16", device=DEVICE, enforce_eager=True)
        force_split["calls"] = 0
        try:
            return _kvflow_logits(llm, ids, split=11).float()   # two chunks: 11 and 5 tokens
        finally:
            llm.llm_engine.executor.shutdown()
    monkeypatch.setenv("KVFLOW_SPLIT_K_NORM", "0")
    plain = logits()
    assert force_split["calls"] == 0
    monkeypatch.setenv("KVFLOW_SPLIT_K_NORM", "1")
    split = logits()
    # per chunk: o in every layer, down in all but the last (the final norm is no add_norm)
    assert force_split["calls"] == 2 * (3 + 2)
    scale = plain.abs().max().item()
    assert (split - plain).abs().max().item() < 0.03 * scale
    assert (split.argmax(-1) == plain.argmax(-1)).float().mean() > 0.9


def test_conditions(monkeypatch):
    """The table's entry is taken only for a 16-bit, unbiased, unquantized, single-rank product
    on the device, untraced, with KVFLOW_SPLIT_K_NORM on; any other row count keeps cuBLAS."""
    monkeypatch.setattr(split_k_norm, "_device_ok", lambda x: True)
    monkeypatch.setattr(split_k_norm, "_lookup",
                        lambda device, n, k, m: {(32, 128, 4): 2}.get((n, k, m)))
    lin = RowParallelLinear(128, 32).to(torch.bfloat16)
    x = torch.zeros(4, 128, dtype=torch.bfloat16)
    assert split_k_norm.slices(lin, x, 4) == 2
    assert split_k_norm.slices(lin, x, 5) == 1
    assert split_k_norm.slices(RowParallelLinear(128, 32), x.float(), 4) == 1
    assert split_k_norm.slices(RowParallelLinear(128, 32, bias=True).to(torch.bfloat16), x,
                               4) == 1
    # a quantized layer (GPTQ) has no `weight` at all
    assert split_k_norm.slices(SimpleNamespace(quant_method=object(), bias=None), x, 4) == 1
    monkeypatch.setenv("KVFLOW_SPLIT_K_NORM", "0")
    assert split_k_norm.slices(lin, x, 4) == 1
    monkeypatch.delenv("KVFLOW_SPLIT_K_NORM")
    monkeypatch.setattr(split_k_norm, "get_tp_size", lambda: 2)
    assert split_k_norm.slices(lin, x, 4) == 1
    monkeypatch.setattr(split_k_norm, "get_tp_size", lambda: 1)
    monkeypatch.setattr(split_k_norm, "_device_ok", lambda x: False)
    assert split_k_norm.slices(lin, x, 4) == 1


def test_committed_tables_are_valid():
    """Every committed table parses, and each slice count divides K into whole 64-wide
    slices (the tuner only tries those)."""
    paths = glob.glob(shape_tables.table_path(split_k_norm.KIND, "*").replace("_.json", "*.json"))
    assert paths, "no committed table"
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        device = data["device"]
        assert shape_tables.table_path(split_k_norm.KIND, device) == path
        table = shape_tables.load_table(split_k_norm.KIND, device)
        assert table
        for (n, k, m), s in table.items():
            assert s >= 2 and k % (s * 64) == 0 and m > 16, (path, n, k, m, s)
