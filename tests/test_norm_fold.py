"""Residual add + RMSNorm folded into the skinny GEMMs around it (kvflow/layers/norm_fold.py).

The kernel halves are tested in tests/test_skinny_gemm.py. Here: a whole bf16 Llama / Qwen2
forward with every dense layer's norms folded against the same model unfolded
(KVFLOW_NORM_FOLD=0), compiled on a GPU or on the interpreter's CPU tensors (the fold's device
check is pointed at them), every product given a single-split config as the H200 table gives
Llama-3.1-8B at decode; and the conditions that turn the fold off.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

import kvflow.kernels  # noqa: E402,F401  (applies the interpreter fixes)
import kvflow.kernels.skinny_gemm as sg  # noqa: E402
from kvflow.layers import norm_fold  # noqa: E402
from tests.conftest import kernel_device, make_hf_model, save_hf_model  # noqa: E402
from tests.test_models_hf import _kvflow_logits  # noqa: E402

DEVICE = kernel_device(sg._skinny_gemm_kernel)


@pytest.fixture
def force_fold(monkeypatch):
    """Fold on the interpreter: CPU tensors count as the skinny GEMM's device and every product
    gets a single-split GEMV config (consumers fold only in that form). Returns the list of
    (add_norm, row_scale) flags per launch."""
    if DEVICE == "cpu":
        monkeypatch.setattr(norm_fold, "_device_ok", lambda x: True)
    monkeypatch.setattr(sg, "choose_config",
                        lambda m, n, k, device=None: dict(sg.default_config(1, n, k), split_k=1))
    calls = []
    real = sg.skinny_gemm

    def spy(*a, **kw):
        calls.append((kw.get("add_norm") is not None, kw.get("row_scale") is not None))
        return real(*a, **kw)
    monkeypatch.setattr(sg, "skinny_gemm", spy)
    return calls


def _logits(make_llm, path, ids, calls):
    llm = make_llm(path, dtype="bfloat16", device=DEVICE)
    calls.clear()       # only the forward below counts (not the GPU's warm-up and capture)
    try:
        return _kvflow_logits(llm, ids, split=11).float()   # two chunks: 11 and 5 tokens
    finally:
        llm.llm_engine.executor.shutdown()


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_folded_forward_matches_unfolded(kind, tmp_path, make_llm, force_fold, monkeypatch):
    hf = make_hf_model(kind, num_hidden_layers=3)
    path = save_hf_model(hf, tmp_path / kind)
    ids = np.random.default_rng(0).integers(0, 383, size=16).tolist()
    monkeypatch.setenv("KVFLOW_NORM_FOLD", "0")
    plain = _logits(make_llm, path, ids, force_fold)
    assert not any(a or r for a, r in force_fold)
    monkeypatch.setenv("KVFLOW_NORM_FOLD", "1")
    folded = _logits(make_llm, path, ids, force_fold)
    # per chunk and layer: o and down produce (the last layer's down does not: the final
    # norm feeds the LM head), q/k/v and gate/up consume.
    produced = sum(a for a, _ in force_fold)
    consumed = sum(r for _, r in force_fold)
    assert produced == consumed == 2 * (2 * 3 - 1), force_fold
    scale = plain.abs().max().item()
    assert (folded - plain).abs().max().item() < 0.03 * scale
    assert (folded.argmax(-1) == plain.argmax(-1)).float().mean() > 0.9


def test_fold_conditions(monkeypatch):
    """fp32, an unknown split, TP > 1 and KVFLOW_NORM_FOLD=0 each keep the norm kernel."""
    from kvflow.layers.linear import MergedColumnParallelLinear, RowParallelLinear
    monkeypatch.setattr(norm_fold, "_device_ok", lambda x: True)
    one = lambda m, n, k, device=None: dict(sg.default_config(m, n, k), split_k=1)  # noqa: E731
    monkeypatch.setattr(sg, "choose_config", one)
    prod = RowParallelLinear(64, 32).to(torch.bfloat16)
    cons = MergedColumnParallelLinear(32, [48, 48]).to(torch.bfloat16)
    x = torch.zeros(2, 64, dtype=torch.bfloat16)
    assert norm_fold.fold_ok(x, prod, cons, False)
    # (Module.float() converts in place: copies, so the checks below still see bf16 layers)
    assert not norm_fold.fold_ok(x.float(), copy.deepcopy(prod).float(),
                                 copy.deepcopy(cons).float(), False)
    assert norm_fold.fold_ok(x, prod, cons, False)
    assert not norm_fold.fold_ok(torch.zeros(17, 64, dtype=torch.bfloat16), prod, cons, False)
    monkeypatch.setenv("KVFLOW_NORM_FOLD", "0")
    assert not norm_fold.fold_ok(x, prod, cons, False)
    monkeypatch.delenv("KVFLOW_NORM_FOLD")
    import kvflow.distributed as dist
    monkeypatch.setattr(dist, "get_tp_size", lambda: 2)
    assert not norm_fold.fold_ok(x, prod, cons, False)
    monkeypatch.setattr(dist, "get_tp_size", lambda: 1)
    assert norm_fold.fold_ok(x, prod, cons, False)
    # a consumer in the tensor-core form (its padded partial-sum tile costs registers)
    monkeypatch.setattr(sg, "choose_config",
                        lambda m, n, k, device=None: dict(sg.default_config(m, n, k), split_k=1,
                                                          use_dot=n == 96))
    assert not norm_fold.fold_ok(x, prod, cons, False)
    assert norm_fold.fold_ok(x, prod, RowParallelLinear(32, 48).to(torch.bfloat16), False)
    monkeypatch.setattr(sg, "choose_config",
                        lambda m, n, k, device=None: dict(sg.default_config(m, n, k),
                                                          split_k=2, block_k=16))
    assert not norm_fold.fold_ok(x, prod, cons, False)
