"""Expert parallelism on CPU.

In process: the expert split (uneven included), the expert weight loader per EP rank, and the
dispatch/combine arithmetic (each rank's partial output over its own experts sums to the full
layer), for the torch reference and the Triton kernel (interpreter). Across processes (2 ranks
over gloo): tiny random Mixtral and Qwen3-MoE give the same greedy tokens (and logprobs within
1e-4, fp32) with TP=2, and TP=2 + expert parallel (vLLM semantics: EP size = TP size = 2), as
with one process."""
from __future__ import annotations

import logging

import pytest
import torch

from kvflow import LLM, SamplingParams
from kvflow.distributed import get_tp_rank, get_tp_size, set_tp
from kvflow.layers.expert_placement import ExpertPlacement, expert_ranges
from kvflow.layers.moe import FusedMoE, fused_moe_torch, select_experts
from tests.conftest import make_hf_model, save_hf_model
from tests.test_moe import make_hf_moe
from tests.test_tensor_parallel import ENGINE_KW, PROMPTS, _assert_same


# ------------------------------------------------------------------------------ in process
def test_expert_ranges_even_uneven_and_too_few():
    assert expert_ranges(8, 2) == [range(0, 4), range(4, 8)]
    assert expert_ranges(3, 2) == [range(0, 2), range(2, 3)]
    assert expert_ranges(5, 3) == [range(0, 2), range(2, 4), range(4, 5)]
    with pytest.raises(ValueError, match="at least one expert"):
        expert_ranges(2, 3)
    p = ExpertPlacement(5, 1, 2)                       # experts 3, 4
    assert [p.local_slot(e) for e in range(5)] == [None, None, None, 0, 1]
    assert p.global_to_local().tolist() == [2, 2, 2, 0, 1]   # 2 = remote sentinel
    assert ExpertPlacement(5, 0, 1).global_to_local().tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="out of range"):
        p.local_slot(5)


def _ckpt(e, h, inter, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {(i, w): torch.randn(*((inter, h) if w != "w2" else (h, inter)), generator=g)
            for i in range(e) for w in ("w1", "w3", "w2")}


def _build(ckpt, e, h, inter) -> FusedMoE:
    layer = FusedMoE(e, h, inter)
    for (i, w), tensor in ckpt.items():
        p = layer.w2 if w == "w2" else layer.w13
        p.weight_loader(p, tensor, (i, w))
    return layer


@pytest.mark.parametrize("num_experts", [4, 3])   # 3: uneven split [2, 1]
def test_ep_ranks_partial_outputs_sum_to_full(num_experts):
    """What the all-reduce does: the sum over EP ranks of each rank's output (its own experts
    only, whole intermediate dim) equals the unsharded layer."""
    e, h, inter, t = num_experts, 8, 12, 23
    ckpt = _ckpt(e, h, inter)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(t, h, generator=g)
    weights, ids = select_experts(torch.randn(t, e, generator=g), 2, True)
    prev = (get_tp_rank(), get_tp_size())
    try:
        set_tp(0, 1)
        full = _build(ckpt, e, h, inter)
        ref = full(x, weights, ids)
        parts = []
        for rank, own in enumerate(expert_ranges(e, 2)):
            set_tp(rank, 2, expert_parallel=True)
            layer = _build(ckpt, e, h, inter)
            # Whole experts, only the local ones, in order.
            assert layer.w13.shape == (len(own), 2 * inter, h) and layer.w2.shape == (len(own), h, inter)
            for slot, g_id in enumerate(own):
                assert torch.equal(layer.w13[slot, :inter], ckpt[(g_id, "w1")])
                assert torch.equal(layer.w2[slot], ckpt[(g_id, "w2")])
            # The layer's compute without its all-reduce (no process group here).
            parts.append(fused_moe_torch(x, layer.w13, layer.w2, weights, layer.expert_map[ids]))
    finally:
        set_tp(*prev)
    assert not torch.allclose(parts[0], ref, atol=1e-3)     # a single rank is not the answer
    assert torch.allclose(parts[0] + parts[1], ref, atol=1e-5)


def test_remote_pairs_contribute_nothing_in_torch_and_triton():
    """Ids equal to E (the remote sentinel) are skipped by both kernels; the rest matches the
    layer restricted to local experts."""
    pytest.importorskip("triton")
    from kvflow.kernels.fused_moe import align_by_expert, fused_moe as triton_moe
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(4)
    t, h, inter, e, k = 19, 40, 24, 3, 2
    x = torch.randn(t, h, generator=g).to(dev)
    w13 = (torch.randn(e, 2 * inter, h, generator=g) * 0.2).to(dev)
    w2 = (torch.randn(e, h, inter, generator=g) * 0.2).to(dev)
    weights, ids = select_experts(torch.randn(t, 5, generator=g).to(dev), k, True)
    local = ExpertPlacement(5, 0, 2).global_to_local().to(dev)[ids]   # experts 0..2 local
    assert (local == e).any() and (local < e).any()
    # Reference: drop remote pairs by giving them zero weight on a real expert.
    ref = fused_moe_torch(x, w13, w2, torch.where(local == e, 0.0, weights),
                          local.clamp(max=e - 1))
    assert torch.allclose(fused_moe_torch(x, w13, w2, weights, local), ref, atol=1e-5)
    pairs, block_expert = align_by_expert(local, e, 16)
    n_local = int((local < e).sum())
    assert sorted(pairs[pairs < t * k].tolist()) == sorted(
        i for i, v in enumerate(local.reshape(-1).tolist()) if v < e)
    assert len(pairs[pairs < t * k]) == n_local
    got = triton_moe(x, w13, w2, weights, local, has_remote=True,
                     config=dict(block_m=16, block_n=16, block_k=16, num_warps=4, num_stages=1))
    assert torch.allclose(got, ref, atol=1e-4, rtol=1e-4), (got - ref).abs().max()


# ------------------------------------------------------------------------------ config
def test_expert_parallel_config_rules(tmp_path, caplog):
    from kvflow.config import create_engine_config
    dense = save_hf_model(make_hf_model("llama"), tmp_path / "dense")
    with caplog.at_level(logging.WARNING, logger="kvflow"):
        cfg = create_engine_config(dense, tensor_parallel_size=2, enable_expert_parallel=True,
                                   **ENGINE_KW)
    assert not cfg.parallel.enable_expert_parallel            # logged no-op on a dense model
    assert "enable_expert_parallel=True ignored" in caplog.text
    moe = save_hf_model(make_hf_moe("mixtral", num_local_experts=3, num_experts_per_tok=2,
                                    num_hidden_layers=1), tmp_path / "moe")
    cfg = create_engine_config(moe, tensor_parallel_size=2, enable_expert_parallel=True, **ENGINE_KW)
    assert cfg.parallel.enable_expert_parallel and not cfg.scheduler.async_scheduling
    with pytest.raises(ValueError, match="enable_expert_parallel"):   # 3 experts, 4 ranks
        create_engine_config(moe, tensor_parallel_size=4, enable_expert_parallel=True, **ENGINE_KW)
    with pytest.raises(ValueError, match="distributed_executor_backend"):
        create_engine_config(moe, distributed_executor_backend="nope", **ENGINE_KW)
    with pytest.raises(ValueError, match="distributed_executor_backend"):
        create_engine_config(moe, tensor_parallel_size=2, distributed_executor_backend="uni",
                             **ENGINE_KW)


# ------------------------------------------------------------------------------ 2 processes
CASES = {
    # 4 experts: 2 per EP rank; each expert's I=96 split 48/48 under plain TP.
    "mixtral4": ("mixtral", dict(num_local_experts=4, num_experts_per_tok=2)),
    # 3 experts: uneven EP split [2, 1].
    "mixtral3": ("mixtral", dict(num_local_experts=3, num_experts_per_tok=2)),
    # Dense layer 1 (TP-sharded MLP) next to a sparse layer 0; top-k not renormalised.
    "qwen3moe": ("qwen3_moe", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
                                   mlp_only_layers=[1], norm_topk_prob=False,
                                   tie_word_embeddings=False)),
}


@pytest.fixture(scope="module")
def moe_dirs(tmp_path_factory):
    return {name: save_hf_model(make_hf_moe(kind, **kw), tmp_path_factory.mktemp(name))
            for name, (kind, kw) in CASES.items()}


@pytest.fixture(scope="module")
def references(moe_dirs):
    """TP=1 outputs per case (engines dropped right away: only their tokens are needed)."""
    sp = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=3, prompt_logprobs=2)
    out = {}
    for name, d in moe_dirs.items():
        llm = LLM(d, max_num_batched_tokens=32, **ENGINE_KW)
        out[name] = llm.generate(PROMPTS, sp, use_tqdm=False)
    return sp, out


@pytest.mark.timeout(180)
@pytest.mark.parametrize("name,ep", [("mixtral4", False), ("mixtral4", True), ("mixtral3", True),
                                     ("qwen3moe", False), ("qwen3moe", True)])
def test_moe_tp2_and_ep2_greedy_match_tp1(name, ep, moe_dirs, references):
    sp, ref = references
    llm = LLM(moe_dirs[name], tensor_parallel_size=2, enable_expert_parallel=ep,
              max_num_batched_tokens=32, **ENGINE_KW)
    try:
        assert llm.llm_engine.config.parallel.enable_expert_parallel == ep
        got = llm.generate(PROMPTS, sp, use_tqdm=False)
        _assert_same(ref[name], got)
        eng = llm.llm_engine
        assert eng.num_free_blocks() == eng.num_total_blocks()
    finally:
        llm.shutdown()


# ------------------------------------------------------------------------------ dummy weights
@pytest.mark.timeout(240)
def test_dummy_weights_identical_across_parallel_layouts(moe_dirs, monkeypatch):
    """load_format="dummy" gives every layout the same full tensors (seeded per parameter
    name, sharded by the weight loaders): TP=2 and TP=2+EP reproduce TP=1 token for token.
    "scaled" values make the greedy tokens meaningful (the default +-1e-3 model is nearly
    constant)."""
    monkeypatch.setenv("KVFLOW_DUMMY_WEIGHTS", "scaled")   # inherited by the spawned workers
    d = moe_dirs["qwen3moe"]   # qkv + q/k norms, a dense merged MLP layer, experts, vocab split
    args = dict(ENGINE_KW, load_format="dummy", seed=3, max_num_batched_tokens=32)
    sp = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=3)
    ref = LLM(d, **args).generate(PROMPTS, sp, use_tqdm=False)
    # The scaled model is not degenerate: prompts lead to different continuations.
    assert len({tuple(o.outputs[0].token_ids) for o in ref}) > 1
    for ep in (False, True):
        llm = LLM(d, tensor_parallel_size=2, enable_expert_parallel=ep, **args)
        try:
            _assert_same(ref, llm.generate(PROMPTS, sp, use_tqdm=False))
        finally:
            llm.shutdown()


def test_dummy_weights_seeded_per_name(tmp_path, monkeypatch):
    from kvflow.models.dummy import full_tensor, param_seed
    assert param_seed(0, "a.weight") != param_seed(0, "b.weight") != param_seed(1, "a.weight")
    a = full_tensor("layers.0.w", (64, 32), 0, torch.device("cpu"), torch.float32, "scaled")
    b = full_tensor("layers.1.w", (64, 32), 0, torch.device("cpu"), torch.float32, "scaled")
    assert not torch.equal(a, b) and a.abs().max() <= (3 / 32) ** 0.5
    assert torch.equal(a, full_tensor("layers.0.w", (64, 32), 0, torch.device("cpu"),
                                      torch.float32, "scaled"))
    monkeypatch.setenv("KVFLOW_DUMMY_WEIGHTS", "nope")
    d = save_hf_model(make_hf_model("llama"), tmp_path / "m")
    with pytest.raises(ValueError, match="KVFLOW_DUMMY_WEIGHTS"):
        LLM(d, load_format="dummy", **ENGINE_KW)


def test_cli_flags_reach_the_engine_kwargs():
    import argparse
    from kvflow.engine.arg_utils import add_engine_args, engine_kwargs
    p = argparse.ArgumentParser()
    add_engine_args(p)
    kw = engine_kwargs(p.parse_args(["-tp", "2", "--enable-expert-parallel",
                                     "--distributed-executor-backend", "ray"]))
    assert kw["tensor_parallel_size"] == 2 and kw["enable_expert_parallel"] is True
    assert kw["distributed_executor_backend"] == "ray"
    kw = engine_kwargs(p.parse_args([]))
    assert kw["enable_expert_parallel"] is False and kw["distributed_executor_backend"] is None


def test_ep_rank_reads_only_its_experts(tmp_path):
    """Rank 1 of 2 with expert parallel: the loader never reads experts 0-1 of 4, and the
    stacked weights hold experts 2-3 exactly as in the checkpoint."""
    from safetensors.torch import load_file
    from kvflow.config import create_engine_config
    from kvflow.models.loader import build_model, remote_expert_filter
    d = save_hf_model(make_hf_moe("mixtral", num_local_experts=4, num_experts_per_tok=2,
                                  num_hidden_layers=1), tmp_path / "m")
    cfg = create_engine_config(d, **ENGINE_KW).model
    ckpt = load_file(f"{d}/model.safetensors")
    prev = (get_tp_rank(), get_tp_size())
    try:
        set_tp(1, 2, expert_parallel=True)       # no collective runs while building / loading
        model = build_model(cfg, torch.device("cpu"))
        wanted = remote_expert_filter(model)
    finally:
        set_tp(*prev)
    assert not wanted("model.layers.0.block_sparse_moe.experts.1.w1.weight")
    assert wanted("model.layers.0.block_sparse_moe.experts.2.w1.weight")
    assert wanted("model.layers.0.block_sparse_moe.gate.weight")
    w13 = dict(model.named_parameters())["model.layers.0.block_sparse_moe.experts.w13"]
    assert w13.shape[0] == 2
    for slot, e in enumerate((2, 3)):
        w1 = ckpt[f"model.layers.0.block_sparse_moe.experts.{e}.w1.weight"]
        assert torch.equal(w13[slot, :w1.shape[0]], w1)
