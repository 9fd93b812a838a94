"""MoE: the fused-MoE layer against a naive per-token loop, and Mixtral / Qwen3-MoE against
Hugging Face transformers on tiny random checkpoints (fp32, CPU)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kvflow.distributed import get_tp_rank, get_tp_size, set_tp
from kvflow.layers.moe import FusedMoE, fused_moe_torch, select_experts
from tests.conftest import TINY, hf_greedy, save_hf_model
from tests.test_models_hf import _kvflow_logits


def naive_moe(x, w13, w2, weights, ids):
    """One token, one chosen expert at a time: the definition."""
    out = torch.zeros_like(x)
    inter = w2.shape[2]
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            gate, up = (w13[e] @ x[t]).split(inter)
            out[t] += weights[t, j] * (w2[e] @ (F.silu(gate) * up))
    return out


@pytest.mark.parametrize("renorm", [True, False])
def test_fused_moe_matches_naive(renorm):
    g = torch.Generator().manual_seed(0)
    t, h, inter, e, k = 37, 16, 24, 6, 2
    x = torch.randn(t, h, generator=g)
    w13, w2 = torch.randn(e, 2 * inter, h, generator=g), torch.randn(e, h, inter, generator=g)
    logits = torch.randn(t, e, generator=g)
    logits[:, 5] -= 100.0   # expert 5 never chosen: empty groups must be skipped cleanly
    weights, ids = select_experts(logits, k, renorm)
    assert torch.allclose(weights.sum(-1), torch.ones(t)) == renorm
    assert not (ids == 5).any()
    ref = naive_moe(x, w13, w2, weights, ids)
    assert torch.allclose(fused_moe_torch(x, w13, w2, weights, ids), ref, atol=1e-4, rtol=1e-4)
    # Zero tokens (an idle step) is a valid input.
    empty = fused_moe_torch(x[:0], w13, w2, weights[:0], ids[:0])
    assert empty.shape == (0, h)


def test_expert_weight_loader_tp_shards_sum_to_full():
    """Loading per-expert checkpoint tensors under tp=2 and summing the ranks' partial outputs
    (what the all-reduce does) reproduces the unsharded layer."""
    g = torch.Generator().manual_seed(1)
    e, h, inter, t = 3, 8, 12, 10
    ckpt = {(i, w): torch.randn(*((inter, h) if w != "w2" else (h, inter)), generator=g)
            for i in range(e) for w in ("w1", "w3", "w2")}
    x = torch.randn(t, h, generator=g)
    weights, ids = select_experts(torch.randn(t, e, generator=g), 2, True)
    prev = (get_tp_rank(), get_tp_size())

    def build():
        layer = FusedMoE(e, h, inter)
        for (i, w), tensor in ckpt.items():
            p = layer.w2 if w == "w2" else layer.w13
            p.weight_loader(p, tensor, (i, w))
        return layer

    try:
        set_tp(0, 1)
        full = build()
        partial = []
        for rank in range(2):
            set_tp(rank, 2)
            layer = build()
            assert layer.w13.shape == (e, inter, h) and layer.w2.shape == (e, h, inter // 2)
            partial.append(fused_moe_torch(x, layer.w13, layer.w2, weights, ids))
    finally:
        set_tp(*prev)
    assert torch.allclose(full.w13[1, :inter], ckpt[(1, "w1")])
    assert torch.allclose(full.w13[1, inter:], ckpt[(1, "w3")])
    ref = fused_moe_torch(x, full.w13, full.w2, weights, ids)
    assert torch.allclose(partial[0] + partial[1], ref, atol=1e-5)
    with pytest.raises(ValueError, match="shape mismatch"):
        full.w2.weight_loader(full.w2, torch.zeros(inter, h), (0, "w2"))   # transposed


# ------------------------------------------------------------------------------ HF parity
MOE = dict(TINY, hidden_size=64, head_dim=32, intermediate_size=96)
CASES = {
    "mixtral": ("mixtral", dict(num_local_experts=4, num_experts_per_tok=2)),
    # Layer 1 dense (mlp_only_layers); top-k weights not renormalised (Qwen3-MoE's default).
    "qwen3moe-dense1": ("qwen3_moe", dict(num_experts=4, num_experts_per_tok=2,
                                          moe_intermediate_size=48, mlp_only_layers=[1],
                                          norm_topk_prob=False, tie_word_embeddings=False)),
    # Three layers, every second sparse (decoder_sparse_step=2), renormalised, tied embeddings.
    "qwen3moe-step2": ("qwen3_moe", dict(num_experts=4, num_experts_per_tok=2,
                                         moe_intermediate_size=48, num_hidden_layers=3,
                                         decoder_sparse_step=2, norm_topk_prob=True,
                                         tie_word_embeddings=True)),
}


def make_hf_moe(kind: str, **overrides):
    from transformers import MixtralConfig, MixtralForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM
    cfg_cls, model_cls = {"mixtral": (MixtralConfig, MixtralForCausalLM),
                          "qwen3_moe": (Qwen3MoeConfig, Qwen3MoeForCausalLM)}[kind]
    torch.manual_seed(1234)
    model = model_cls(cfg_cls(**dict(MOE, **overrides))).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
            elif name.endswith(".gate.weight"):   # the router, not gate_proj
                # Init leaves router logits tiny, so top-k would hinge on near-ties; spread them.
                p.mul_(20.0)
    return model


@pytest.fixture(scope="module", params=sorted(CASES))
def moe_case(request, tmp_path_factory):
    kind, overrides = CASES[request.param]
    model = make_hf_moe(kind, **overrides)
    return model, save_hf_model(model, tmp_path_factory.mktemp(request.param))


def test_moe_logits_match_hf(moe_case, make_llm):
    hf, path = moe_case
    llm = make_llm(path)
    # The checkpoint really is per-expert and the layers really are what the config says.
    model = llm.llm_engine.executor.worker.runner.model
    names = dict(model.named_parameters())
    sparse = [n for n in names if n.endswith("experts.w13")]
    assert sparse, "no MoE layer built"
    if hf.config.model_type == "qwen3_moe":
        dense = [n for n in names if n.endswith("mlp.gate_up_proj.weight")]
        assert len(sparse) + len(dense) == hf.config.num_hidden_layers and dense
    ids = np.random.default_rng(0).integers(0, 383, size=90).tolist()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].float()
    diff = (_kvflow_logits(llm, ids, split=41) - ref).abs().max().item()
    assert diff < 1e-4, f"max abs logit diff {diff}"


def test_moe_greedy_matches_hf_generate(moe_case, make_llm):
    hf, path = moe_case
    llm = make_llm(path)
    from kvflow import SamplingParams
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, 383, size=n).tolist() for n in (1, 9, 30)]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    for p, o in zip(prompts, outs):
        assert o.outputs[0].token_ids == hf_greedy(hf, p, 8)


def test_missing_expert_count_is_a_clear_error(tmp_path):
    import json
    from kvflow import LLM
    path = save_hf_model(make_hf_moe("mixtral", num_local_experts=4, num_experts_per_tok=2,
                                     num_hidden_layers=1), tmp_path / "m")
    cfg = json.load(open(f"{path}/config.json"))
    cfg["num_experts_per_tok"] = 5
    json.dump(cfg, open(f"{path}/config.json", "w"))
    with pytest.raises(ValueError, match="num_experts_per_tok=5"):
        LLM(path, skip_tokenizer_init=True, kv_cache_memory=1 << 20, dtype="float32")


# ------------------------------------------------------------------- Triton kernel (interpreter)
def test_triton_fused_moe_matches_reference():
    """The CUDA kernel under TRITON_INTERPRET=1 (set by conftest without a GPU) on tiny shapes,
    with ragged sizes so every mask is exercised, and an expert nobody picks."""
    pytest.importorskip("triton")
    from kvflow.kernels.fused_moe import align_by_expert, fused_moe
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(3)
    t, h, inter, e, k = 21, 40, 24, 5, 2
    x = torch.randn(t, h, generator=g).to(dev)
    w13 = torch.randn(e, 2 * inter, h, generator=g).to(dev) * 0.2
    w2 = torch.randn(e, h, inter, generator=g).to(dev) * 0.2
    logits = torch.randn(t, e, generator=g)
    logits[:, 2] -= 100.0
    weights, ids = select_experts(logits.to(dev), k, True)
    pairs, block_expert = align_by_expert(ids, e, 16)
    assert sorted(pairs[pairs < t * k].tolist()) == list(range(t * k))
    ref = fused_moe_torch(x, w13, w2, weights, ids)
    got = fused_moe(x, w13, w2, weights, ids,
                    config=dict(block_m=16, block_n=16, block_k=16, num_warps=4, num_stages=1))
    assert torch.allclose(got, ref, atol=1e-4, rtol=1e-4), (got - ref).abs().max()


@pytest.mark.parametrize("group_m", [0, 1, 3, 64])
def test_triton_fused_moe_grouped_program_order(group_m):
    """The program -> (row block, column tile) map: row blocks fastest over the whole grid
    (group_m 0), or within groups of group_m (3 does not divide the block count, 64 exceeds
    it). Every tile is computed exactly once in each order, so outputs match the reference."""
    pytest.importorskip("triton")
    from kvflow.kernels.fused_moe import fused_moe
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(5)
    t, h, inter, e, k = 37, 48, 40, 3, 2       # ~25 pairs per expert: 2 blocks of 16 each
    x = torch.randn(t, h, generator=g).to(dev)
    w13 = torch.randn(e, 2 * inter, h, generator=g).to(dev) * 0.2
    w2 = torch.randn(e, h, inter, generator=g).to(dev) * 0.2
    weights, ids = select_experts(torch.randn(t, e, generator=g).to(dev), k, True)
    ref = fused_moe_torch(x, w13, w2, weights, ids)
    tile = dict(block_n=16, block_k=16, group_m=group_m, num_warps=4, num_stages=1)
    got = fused_moe(x, w13, w2, weights, ids,
                    config=dict(block_m=16, gate_up=dict(tile), down=dict(tile)))
    assert torch.allclose(got, ref, atol=1e-4, rtol=1e-4), (got - ref).abs().max()


@pytest.mark.parametrize("t", [1, 3, 40, 600])
def test_triton_fused_moe_default_tiles_bf16(t):
    """The shape-chosen tiles (decode: 16-row blocks, long K steps; prefill: 32/64-row blocks)
    in bf16, against the reference in bf16 (same rounding points: gate/up and the expert output
    are rounded to bf16 in both)."""
    pytest.importorskip("triton")
    from kvflow.kernels.fused_moe import choose_config, fused_moe
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(t)
    h, inter, e, k = 64, 48, 4, 2
    x = torch.randn(t, h, generator=g).to(dev, torch.bfloat16)
    w13 = (torch.randn(e, 2 * inter, h, generator=g) * 0.2).to(dev, torch.bfloat16)
    w2 = (torch.randn(e, h, inter, generator=g) * 0.2).to(dev, torch.bfloat16)
    weights, ids = select_experts(torch.randn(t, e, generator=g).to(dev), k, True)
    ref = fused_moe_torch(x, w13, w2, weights, ids).float()
    got = fused_moe(x, w13, w2, weights, ids).float()
    assert choose_config(t * k, torch.bfloat16)["block_m"] == (16 if t * k <= 64 else 32 if t * k <= 1024 else 64)
    assert (got - ref).abs().max() <= 0.03 * ref.abs().max() + 0.02, (got - ref).abs().max()


def test_tuned_moe_table_is_well_formed_and_bucketed(monkeypatch):
    """configs/fused_moe.json (written by benchmarks/moe_tune.py, merged by hand): every entry a
    launchable tile (only known keys, powers of two, a program order >= 0), buckets ascending;
    choose_config takes the smallest bucket >= the pair count, the largest past the end."""
    import json
    import types

    from kvflow.kernels import fused_moe as fm
    table = json.load(open(fm._TUNED_PATH))
    pow2 = {16, 32, 64, 128, 256, 512}
    for gpu, shapes in table.items():
        for key, rows in shapes.items():
            buckets = [int(n) for n, _ in rows]
            assert buckets == sorted(set(buckets)), (gpu, key)
            for n, cfg in rows:
                assert set(cfg) == {"block_m", "gate_up", "down"}, (key, n)
                assert cfg["block_m"] in pow2
                for kernel in ("gate_up", "down"):
                    tile = cfg[kernel]
                    assert set(tile) - {"group_m"} == {"block_n", "block_k", "num_warps",
                                                       "num_stages"}, (key, n, kernel)
                    assert tile["block_n"] in pow2 and tile["block_k"] in pow2
                    assert tile["num_warps"] in (4, 8) and 1 <= tile["num_stages"] <= 6
                    assert isinstance(tile.get("group_m", 0), int) and tile.get("group_m", 0) >= 0
    # Bucket lookup, with the device name of the table's GPU.
    gpu, shapes = next(iter(table.items()))
    key, rows = next(iter(shapes.items()))
    e, h, i = (int(part[1:]) for part in key.split("_")[:3])
    monkeypatch.setattr(fm, "device_properties", lambda dev: types.SimpleNamespace(name=gpu))
    cuda = torch.device("cuda", 0)
    for (lo, _), (hi, cfg) in zip(rows, rows[1:]):
        assert fm.choose_config(lo + 1, torch.bfloat16, e, h, i, cuda) == fm._split(cfg)
        assert fm.choose_config(hi, torch.bfloat16, e, h, i, cuda) == fm._split(cfg)
    assert fm.choose_config(10 ** 7, torch.bfloat16, e, h, i, cuda) == fm._split(rows[-1][1])
    assert fm.choose_config(1, torch.bfloat16, e, h, i, cuda) == fm._split(rows[0][1])
