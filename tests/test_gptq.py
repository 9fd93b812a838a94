"""GPTQ (issue 6): config parsing, pack/unpack round trip, the Triton GEMM vs its torch
reference (interpreter on CPU), tensor-parallel loading, and whole tiny Llama / Qwen2 models
quantized by tests/gptq_utils.py against HF running the dequantized weights (fp32)."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from kvflow.distributed import set_tp
from kvflow.layers.quantization import get_quant_config
from kvflow.layers.quantization.gptq import (
    GPTQConfig, gptq_dequantize, gptq_gemm_ref, unpack_cols, unpack_rows)
from tests.conftest import hf_greedy, make_hf_model, save_hf_model
from tests.gptq_utils import pack_along, quantize_hf_model, rtn_quantize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------ config
def test_parse_real_config():
    with open(os.path.join(ROOT, "benchmarks/configs/qwen2.5-7b-gptq-int4/config.json")) as f:
        qc = get_quant_config(json.load(f))
    assert qc == GPTQConfig(bits=4, group_size=128, desc_act=False, sym=True, zero_offset=1)
    assert get_quant_config({"hidden_size": 8}) is None


@pytest.mark.parametrize("qc, match", [
    ({"quant_method": "awq", "bits": 4}, "supported: gptq"),
    ({"quant_method": "gptq", "bits": 3}, "bits=3"),
    ({"quant_method": "gptq", "bits": 4, "checkpoint_format": "marlin"}, "gptq_v2"),
])
def test_bad_configs_fail_clearly(qc, match):
    with pytest.raises(ValueError, match=match):
        get_quant_config({"quantization_config": qc})


# ---------------------------------------------------------------------------------- packing
@pytest.mark.parametrize("bits", [4, 8])
def test_pack_unpack_round_trip(bits):
    g = torch.Generator().manual_seed(bits)
    vals = torch.randint(0, 1 << bits, (64, 24), generator=g)
    assert torch.equal(unpack_rows(pack_along(vals, bits, 0), bits), vals.int())
    assert torch.equal(unpack_cols(pack_along(vals, bits, 1), bits), vals.int())


@pytest.mark.parametrize("bits, gs, sym, act, v2", [
    (4, 32, True, False, False), (4, 32, False, True, False), (8, -1, False, False, True),
    (8, 32, True, True, True), (4, -1, True, True, False)])
def test_dequantize_matches_packer(bits, gs, sym, act, v2):
    w = torch.randn(128, 64, generator=torch.Generator().manual_seed(0))
    t, deq = rtn_quantize(w, bits, gs, sym, act, v2)
    ours = gptq_dequantize(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits,
                           0 if v2 else 1)
    assert torch.equal(ours, deq)
    # RTN error bound: half a step, or one at the clipped top code of the symmetric range.
    assert (deq - w).abs().max() <= t["scales"].float().max() * 1.01


# ------------------------------------------------------------------------------ Triton GEMM
def _kernel():
    pytest.importorskip("triton")
    from kvflow.kernels import w4a16
    from tests.conftest import kernel_device
    return w4a16, kernel_device(w4a16._gptq_gemm_kernel)


KCFG = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=1)


@pytest.mark.parametrize("bits, gs, sym, act, v2, split", [
    (4, 32, True, False, False, 1),     # ONE_GROUP path (scale/zero folded out of the dot)
    (4, 32, False, True, False, 2),     # act-order g_idx, split K
    (8, -1, False, False, True, 1),     # one group
    (8, 32, True, True, True, 4),
    (4, 16, False, False, True, 2),     # group smaller than BLOCK_K: per-row groups
])
@pytest.mark.parametrize("m, gemv", [(5, False), (1, True), (3, True)])
def test_kernel_matches_reference(bits, gs, sym, act, v2, split, m, gemv):
    w4a16, dev = _kernel()
    g = torch.Generator().manual_seed(1)
    k, n = 128, 64
    t, _ = rtn_quantize(torch.randn(k, n, generator=g), bits, gs, sym, act, v2)
    t = {name: v.to(dev) for name, v in t.items()}
    x = torch.randn(m, k, generator=g).to(dev)
    zo = 0 if v2 else 1
    ref = gptq_gemm_ref(x, t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits, zo)
    out = w4a16.gptq_gemm(x, t["qweight"], t["qzeros"], t["scales"], t["g_idx"] if act else None,
                          bits, gs, zo, config=dict(KCFG, SPLIT_K=split, GEMV=gemv))
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_kernel_fits_stages_to_shared_memory(monkeypatch):
    """A variant whose pipeline does not fit shared memory (OutOfResources at its first launch,
    as act-order 16x256x128 tiles at 3 stages on an H200) is relaunched with fewer stages, and
    the fitted count is remembered for the next call."""
    import triton
    w4a16, dev = _kernel()
    real = w4a16._gptq_gemm_kernel
    stages_tried = []

    class TooBigAboveTwoStages:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                stages_tried.append(kw["num_stages"])
                if kw["num_stages"] > 2:
                    raise triton.runtime.errors.OutOfResources(300000, 232448, "shared memory")
                return real[grid](*args, **kw)
            return launch

    monkeypatch.setattr(w4a16, "_gptq_gemm_kernel", TooBigAboveTwoStages())
    from kvflow.kernels import stage_fit
    monkeypatch.setattr(stage_fit, "_STAGES_THAT_FIT", {})
    g = torch.Generator().manual_seed(5)
    t, _ = rtn_quantize(torch.randn(128, 64, generator=g), 4, 32, False, True, False)
    t = {name: v.to(dev) for name, v in t.items()}
    x = torch.randn(5, 128, generator=g).to(dev)
    ref = gptq_gemm_ref(x, t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 4, 1)
    cfg = dict(KCFG, num_stages=4, SPLIT_K=1, GEMV=False)
    for _ in range(2):
        out = w4a16.gptq_gemm(x, t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 4, 32, 1,
                              config=cfg)
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    assert stages_tried == [4, 3, 2, 2]            # fitted once, then launched at 2 directly
    assert cfg["num_stages"] == 4                  # the caller's config is not modified


@pytest.mark.parametrize("m, act", [(1, False), (1, True), (3, False), (70, True)])
def test_kernel_default_configs(m, act):
    """The shape-picked configs (decode: split K; prefill: big tiles), masked edges."""
    w4a16, dev = _kernel()
    g = torch.Generator().manual_seed(3)
    t, _ = rtn_quantize(torch.randn(512, 48, generator=g), 4, 128, False, act, False)
    t = {name: v.to(dev) for name, v in t.items()}
    x = torch.randn(m, 512, generator=g).to(dev)
    ref = gptq_gemm_ref(x, t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 4, 1)
    out = w4a16.gptq_gemm(x, t["qweight"], t["qzeros"], t["scales"], t["g_idx"] if act else None,
                          4, 128, 1)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 8, 64, 512])
@pytest.mark.parametrize("k, n, act", [(3584, 4608, False), (18944, 3584, False),
                                       (3584, 37888, True)])
def test_kernel_realistic_shapes_gpu(m, k, n, act):
    """Qwen2.5-7B projection shapes (qkv, down, gate_up) in fp16 with the default configs."""
    from kvflow.kernels import w4a16
    g = torch.Generator().manual_seed(0)
    t, _ = rtn_quantize(torch.randn(k, n, generator=g), 4, 128, True, act, False)
    t = {name: v.cuda() for name, v in t.items()}
    x = torch.randn(m, k, generator=g).half().cuda()
    ref = gptq_gemm_ref(x.float(), t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 4, 1)
    out = w4a16.gptq_gemm(x, t["qweight"], t["qzeros"], t["scales"], t["g_idx"] if act else None,
                          4, 128, 1)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), ref, atol=0.1 + 2e-3 * ref.abs().max().item(),
                               rtol=2e-2)


# --------------------------------------------------------------------- tensor-parallel loading
@pytest.mark.parametrize("act", [False, True])
def test_tensor_parallel_sharding(act):
    """Build TP=2 layers rank by rank (no process group: the shards are combined here) and check
    the column-parallel QKV / merged outputs concatenate, and row-parallel partial sums add
    up, to the unsharded dequantized product."""
    from kvflow.layers.linear import (MergedColumnParallelLinear, QKVParallelLinear,
                                      RowParallelLinear)
    qc = GPTQConfig(bits=4, group_size=32, desc_act=act, sym=False, zero_offset=1)
    g = torch.Generator().manual_seed(2)
    hid, hd, heads, kv = 128, 16, 4, 2
    ws = {s: torch.randn(hid, n, generator=g) for s, n in (("q", heads * hd), ("k", kv * hd),
                                                           ("v", kv * hd), ("gate", 64), ("up", 64))}
    w_down = torch.randn(128, hid, generator=g)
    qt, deq = {}, {}
    for s, w in list(ws.items()) + [("down", w_down)]:
        # Shared inputs share the act-order permutation (see gptq_utils.quantize_hf_model).
        seed = {"q": 0, "k": 0, "v": 0, "gate": 1, "up": 1}.get(s, 2)
        qt[s], deq[s] = rtn_quantize(w, 4, 32, False, act, False, seed=seed)
    x = torch.randn(3, hid, generator=g)
    h = torch.randn(3, 128, generator=g)           # input of the row-parallel layer
    outs = {"qkv": [], "gate_up": [], "down": []}
    try:
        for rank in range(2):
            set_tp(rank, 2)
            qkv = QKVParallelLinear(hid, hd, heads, kv, quant_config=qc)
            mlp = MergedColumnParallelLinear(hid, [64, 64], quant_config=qc)
            down = RowParallelLinear(128, hid, quant_config=qc)
            for name in ("qweight", "qzeros", "scales", "g_idx"):
                for s in "qkv":
                    p = getattr(qkv, name)
                    p.weight_loader(p, qt[s][name], s)
                for i, s in enumerate(("gate", "up")):
                    p = getattr(mlp, name)
                    p.weight_loader(p, qt[s][name], i)
                p = getattr(down, name)
                p.weight_loader(p, qt["down"][name])
            # Act-order with TP > 1 keeps every group on the row-parallel rank.
            assert down.scales.shape[0] == (4 if act else 2)
            outs["qkv"].append(qkv.split(qkv(x)))
            outs["gate_up"].append(mlp(x).split(32, dim=-1))
            # The rank's partial product (forward() would all-reduce; there is no group here).
            outs["down"].append(down.quant_method.apply(down, h[:, rank * 64:(rank + 1) * 64]))
    finally:
        set_tp(0, 1)
    for j, s in enumerate("qkv"):
        got = torch.cat([outs["qkv"][r][j] for r in range(2)], -1)
        torch.testing.assert_close(got, x @ deq[s], atol=1e-4, rtol=1e-4)
    for j, s in enumerate(("gate", "up")):
        got = torch.cat([outs["gate_up"][r][j] for r in range(2)], -1)
        torch.testing.assert_close(got, x @ deq[s], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(outs["down"][0] + outs["down"][1], h @ deq["down"],
                               atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------ whole models
MODEL_CASES = {
    "llama-int4-g32-sym-v1": ("llama", {}, dict(bits=4, group_size=32, sym=True, act_order=False, v2=False)),
    "llama-int8-gall-asym-v2-tied": ("llama", dict(tie_word_embeddings=True),
                                     dict(bits=8, group_size=-1, sym=False, act_order=False, v2=True)),
    "qwen2-int4-g32-asym-actorder-v1": ("qwen2", {}, dict(bits=4, group_size=32, sym=False, act_order=True, v2=False)),
    "qwen2-int8-g32-sym-actorder-v2": ("qwen2", {}, dict(bits=8, group_size=32, sym=True, act_order=True, v2=True)),
}


@pytest.mark.parametrize("name", sorted(MODEL_CASES))
def test_quantized_model_matches_dequantized_hf(name, tmp_path, make_llm):
    from kvflow import SamplingParams
    from tests.test_models_hf import _kvflow_logits
    kind, overrides, q = MODEL_CASES[name]
    hf = make_hf_model(kind, **overrides)
    path = save_hf_model(hf, tmp_path / name)
    quantize_hf_model(hf, path, **q)          # hf now runs dequant(quant(W))
    llm = make_llm(path)
    layer = llm.llm_engine.executor.worker.runner.model.model.layers[0]
    assert layer.mlp.down_proj.qweight.dtype == torch.int32
    assert not hasattr(layer.self_attn.qkv_proj, "weight")
    ids = np.random.default_rng(0).integers(0, 383, size=40).tolist()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].float()
    diff = (_kvflow_logits(llm, ids, split=17) - ref).abs().max().item()
    assert diff < 1e-4, f"max abs logit diff {diff}"
    prompts = [ids[:5], ids[:23]]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False)
    for p, o in zip(prompts, outs):
        assert o.outputs[0].token_ids == hf_greedy(hf, p, 6)


def save_gptq_config_model(path) -> str:
    """A tiny Qwen2 checkpoint whose config declares 4-bit GPTQ (group 32, no act-order): for
    load_format="dummy", which makes valid codes and random scales."""
    path = save_hf_model(make_hf_model("qwen2"), path)
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 32,
                                  "desc_act": False, "sym": True}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    return path


def test_dummy_gptq_model_runs(tmp_path, make_llm):
    """load_format='dummy' on a GPTQ config (the benchmark path): builds and generates."""
    from kvflow import SamplingParams
    path = save_gptq_config_model(tmp_path / "m")
    llm = make_llm(path, load_format="dummy")
    out = llm.generate([{"prompt_token_ids": [1, 2, 3]}],
                       SamplingParams(temperature=0, max_tokens=3, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3


def test_norm_fold_passes_over_gptq_layers():
    """The norm fold (decode steps of <= GEMV_MAX_M rows, fp16 / bf16, CUDA) asks each linear
    for its weight; a GPTQ layer has none (qweight, scales), and asking used to raise
    AttributeError in every bf16 decode step of a GPTQ model on the GPU."""
    from kvflow.layers import norm_fold
    from kvflow.layers.linear import MergedColumnParallelLinear, RowParallelLinear
    qc = GPTQConfig(bits=4, group_size=32, desc_act=False, sym=True, zero_offset=1)
    with torch.device("meta"):
        down = RowParallelLinear(128, 64, quant_config=qc)
        up = MergedColumnParallelLinear(64, [64, 64], quant_config=qc)
    x = torch.zeros(1, 64, dtype=torch.bfloat16)
    assert not norm_fold._foldable(down, x, 1, consumer=False)
    assert not norm_fold._foldable(up, x, 1, consumer=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_dummy_gptq_model_half_precision_gpu(tmp_path, dtype):
    """A GPTQ model as served (fp16 / bf16 on CUDA, CUDA graphs on): decode steps run the
    W4A16 kernel beside the norm fold's and skinny GEMM's shape checks, which once read a
    quantized layer's weight and raised in every step."""
    from kvflow import LLM, SamplingParams
    path = save_gptq_config_model(tmp_path / "m")
    llm = LLM(path, load_format="dummy", dtype=dtype, device="cuda", skip_tokenizer_init=True,
              kv_cache_memory=8 << 20, max_model_len=256)
    out = llm.generate([{"prompt_token_ids": [1, 2, 3]}, {"prompt_token_ids": list(range(40))}],
                       SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
                       use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in out] == [8, 8]


def test_fused_shards_with_different_g_idx_fail():
    from kvflow.layers.linear import MergedColumnParallelLinear
    qc = GPTQConfig(bits=4, group_size=32, desc_act=True, sym=True, zero_offset=1)
    layer = MergedColumnParallelLinear(64, [32, 32], quant_config=qc)
    p = layer.g_idx
    p.weight_loader(p, torch.arange(64, dtype=torch.int32) // 32, 0)
    with pytest.raises(ValueError, match="g_idx differs"):
        p.weight_loader(p, torch.arange(63, -1, -1, dtype=torch.int32) // 32, 1)


def test_startup_checks_and_auto_dtype(tmp_path):
    from kvflow import model_config as kcfg
    gptq = {"quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 128}}
    assert kcfg._resolve_dtype("auto", kcfg._checkpoint_dtype(
        {"torch_dtype": "bfloat16", **gptq}), torch.device("cuda")) == torch.float16
    assert kcfg._resolve_dtype("auto", kcfg._checkpoint_dtype(gptq),
                               torch.device("cpu")) == torch.float32
    path = save_hf_model(make_hf_model("llama"), tmp_path / "m")
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    cfg["quantization_config"] = {"quant_method": "awq", "bits": 4}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    from kvflow import LLM
    with pytest.raises(ValueError, match="quantization_config: unsupported quant_method 'awq'"):
        LLM(path, skip_tokenizer_init=True, device="cpu", kv_cache_memory=8 << 20)
