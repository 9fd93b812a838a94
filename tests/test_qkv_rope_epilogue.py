"""Rotary + KV-cache write in the q | k | v skinny GEMM's epilogue (skinny_gemm(rope_cache=)).

Contract: bit-identical to the path it replaces, the plain product followed by
qk_norm_rope_cache without norm (q returned, K / V in the cache, padding slots untouched), for
the GEMV and tensor-core forms, neox and GPT-J pairs, bias, the folded-norm consumer, GQA and
an fp8 cache; under the interpreter (CPU) and compiled on a GPU alike. Then the layer-level
switch: Attention.forward_projected takes the epilogue exactly where it applies.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

import kvflow.kernels  # noqa: E402,F401  (applies the interpreter fixes)
import kvflow.kernels.skinny_gemm as sg  # noqa: E402
from kvflow.kernels.qk_rope_cache import qk_norm_rope_cache  # noqa: E402
from kvflow.kernels.rotary import compute_cos_sin_cache  # noqa: E402
from tests.conftest import kernel_device  # noqa: E402

DEVICE = kernel_device(sg._skinny_gemm_kernel)
FP8 = torch.float8_e4m3fn

GEMV8 = dict(block_n=8, block_k=32, split_k=1, num_warps=4, num_stages=2, use_dot=False)
GEMV16 = dict(GEMV8, block_n=16, block_k=64)
DOT32 = dict(block_n=32, block_k=32, split_k=1, num_warps=4, num_stages=2, use_dot=True)


def _bits(x):
    return x.view(torch.uint8) if x.dtype == FP8 else x


def _case(m, H, KV, D, K, bias, cache_dtype, n_slots, seed=0, block_size=4):
    g = torch.Generator().manual_seed(seed)
    n = (H + 2 * KV) * D
    x = (torch.randn(m, K, generator=g) * 0.5).to(torch.bfloat16).to(DEVICE)
    w = (torch.randn(n, K, generator=g) * 0.2).to(torch.bfloat16).to(DEVICE)
    b = (torch.randn(n, generator=g) * 0.1).to(torch.bfloat16).to(DEVICE) if bias else None
    positions = torch.randint(0, 100, (m,), generator=g).to(DEVICE)
    cs = compute_cos_sin_cache(D, 128).to(DEVICE)
    num_blocks = m // block_size + 3
    slots = torch.randperm(num_blocks * block_size, generator=g)[:n_slots]
    if n_slots > 1:
        slots[1] = -1                                    # a padding row
    caches = [torch.zeros(num_blocks, block_size, KV, D, dtype=cache_dtype, device=DEVICE)
              for _ in range(2)]
    return x, w, b, positions, cs, slots.to(DEVICE), caches


def _rope(H, KV, D, positions, cs, is_neox, caches, slots, scales):
    return sg.RopeCache(H, KV, D, positions, cs, is_neox, caches[0], caches[1], slots, *scales)


def _unfused(x, w, b, cfg, row_scale, H, KV, D, positions, cs, is_neox, caches, slots, scales):
    """The path the epilogue replaces: the product, then the fused transform kernel."""
    y = sg.skinny_gemm(x, w, b, cfg, row_scale=row_scale)
    m = x.shape[0]
    q, k, v = y.split([H * D, KV * D, KV * D], dim=-1)
    q = qk_norm_rope_cache(q.view(m, H, D), k.view(m, KV, D), v.view(m, KV, D), positions,
                           cs, is_neox, None, None, 1e-6, caches[0], caches[1], slots, *scales)
    return q.view(m, H * D)


GRID = [
    # m, H, KV, D, config, is_neox, bias, cache dtype, n_slots (< m: later rows not cached)
    (1, 4, 2, 32, GEMV8, True, False, torch.bfloat16, 1),
    (3, 4, 2, 32, GEMV8, True, True, torch.bfloat16, 3),
    (3, 4, 1, 32, GEMV16, False, False, torch.bfloat16, 2),
    (5, 2, 2, 32, DOT32, True, True, torch.bfloat16, 5),
    (2, 4, 2, 64, GEMV16, True, False, FP8, 2),
    (4, 4, 2, 32, DOT32, False, False, FP8, 4),
]


@pytest.mark.parametrize("m,H,KV,D,cfg,is_neox,bias,cache_dtype,n_slots", GRID)
@pytest.mark.parametrize("folded", [False, True])
def test_epilogue_equals_product_then_transform(m, H, KV, D, cfg, is_neox, bias, cache_dtype,
                                                n_slots, folded):
    if cache_dtype == FP8 and DEVICE == "cuda" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 casts need sm89+")
    K = 64
    x, w, b, pos, cs, slots, caches = _case(m, H, KV, D, K, bias, cache_dtype, n_slots)
    scales = (None, None)
    if cache_dtype == FP8:
        scales = (torch.tensor([0.05], device=DEVICE), torch.tensor([0.7], device=DEVICE))
    row_scale = None
    if folded:      # the consumer half of a folded input norm (a decoder layer's q/k/v)
        g = torch.Generator().manual_seed(1)
        sq = (torch.rand(m, 3, generator=g) * K).to(DEVICE)
        row_scale = sg.FoldedNorm(sq, 1e-5)
        if cfg["use_dot"]:
            pytest.skip("consumers fold only in the GEMV form (skinny_gemm.foldable)")
    ref_caches = [torch.zeros_like(c) for c in caches]
    want = _unfused(x, w, b, cfg, row_scale, H, KV, D, pos, cs, is_neox, ref_caches, slots,
                    scales)
    got = sg.skinny_gemm(x, w, b, cfg, row_scale=row_scale,
                         rope_cache=_rope(H, KV, D, pos, cs, is_neox, caches, slots, scales))
    assert got.shape == (m, H * D)
    assert torch.equal(got, want)
    for c, r in zip(caches, ref_caches):
        assert torch.equal(_bits(c), _bits(r))
    written = caches[0].float().abs().sum(dim=(-1, -2)).flatten() != 0
    assert int(written.sum()) == n_slots - (1 if n_slots > 1 else 0)


def test_rope_config_needs_one_split_and_whole_pairs(monkeypatch):
    table = {(6144, 4096, 1): dict(GEMV8, block_k=512), (6144, 4096, 2): dict(GEMV8, split_k=2),
             (1536, 1024, 1): dict(GEMV8, block_n=12), (1536, 1024, 2): dict(DOT32, block_n=64)}
    monkeypatch.setattr(sg, "choose_config", lambda m, n, k, device=None: table.get((n, k, m)))
    cuda = torch.device("cuda")
    assert sg.rope_config(1, 6144, 4096, 128, cuda)["block_n"] == 8
    assert sg.rope_config(2, 6144, 4096, 128, cuda) is None       # split K: no final sums
    assert sg.rope_config(4, 6144, 4096, 128, cuda) is None       # cuBLAS wins there
    assert sg.rope_config(1, 1536, 1024, 64, cuda) is None        # 12 columns: not whole pairs
    assert sg.rope_config(2, 1536, 1024, 32, cuda) is None        # a tile wider than the head
    assert sg.rope_config(2, 1536, 1024, 64, cuda)["block_n"] == 64
    assert sg.rope_config(17, 6144, 4096, 128, cuda) is None      # not a skinny product


@pytest.mark.parametrize("is_neox,kv_dtype", [(True, "auto"), (False, "auto"), (True, "fp8")])
def test_layer_forward_projected_takes_the_epilogue(monkeypatch, is_neox, kv_dtype):
    """Attention.forward_projected on the Triton backend at a decode-sized step: with
    KVFLOW_QKV_ROPE=1 the q|k|v product carries the transform (one skinny GEMM with a
    RopeCache, no separate transform launch); with 0 it is the product, then the fused
    transform kernel. Outputs and caches are identical."""
    if kv_dtype == "fp8" and DEVICE == "cuda" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 casts need sm89+")
    import kvflow.kernels.qk_rope_cache as qrc
    from kvflow.attention.backend import AttentionSpec
    from kvflow.attention.triton_backend import TritonAttentionBackend
    from kvflow.forward_context import set_forward_context
    from kvflow.layers import linear as linear_mod
    from tests.test_qk_rope_cache import _layer_batch

    monkeypatch.setattr(linear_mod, "_epilogue_device_ok", lambda x: True)
    monkeypatch.setattr(sg, "choose_config", lambda m, n, k, device=None: dict(GEMV16))
    # The plain product as CUDA runs it at decode (dense_linear would pick F.linear on CPU).
    monkeypatch.setattr(linear_mod, "dense_linear", lambda x, w, b, *a, **kw: sg.skinny_gemm(x, w, b))
    layer, md, cache, _, pos, (H, KV, D, n) = _layer_batch(torch.bfloat16, kv_dtype, False,
                                                           1.0, is_neox)
    be = TritonAttentionBackend()
    spec = AttentionSpec(H, KV, D, D ** -0.5, torch.bfloat16, kv_cache_dtype=kv_dtype,
                         block_size=4)
    layer.bind_impl(be.make_impl(spec), be.capabilities)
    torch.manual_seed(0)
    proj = linear_mod.QKVParallelLinear(32, D, H, KV).to(torch.bfloat16).to(DEVICE)
    proj.weight.data.normal_(0, 0.2)
    x = torch.randn(pos.shape[0], 32).to(torch.bfloat16).to(DEVICE)
    results = []
    for switch in ("1", "0"):
        monkeypatch.setenv("KVFLOW_QKV_ROPE", switch)
        ropes, transforms = [], []
        real_gemm, real_transform = sg.skinny_gemm, qrc.qk_norm_rope_cache
        monkeypatch.setattr(sg, "skinny_gemm", lambda *a, **kw: ropes.append(
            kw.get("rope_cache") is not None) or real_gemm(*a, **kw))
        monkeypatch.setattr(qrc, "qk_norm_rope_cache", lambda *a, **kw: transforms.append(1)
                            or real_transform(*a, **kw))
        layer.kv_cache = cache.clone()
        with set_forward_context(md):
            out = layer.forward_projected(proj, x, pos)
        monkeypatch.setattr(sg, "skinny_gemm", real_gemm)
        monkeypatch.setattr(qrc, "qk_norm_rope_cache", real_transform)
        assert ropes == [switch == "1"] and len(transforms) == (switch == "0")
        results.append((out[:n], layer.kv_cache.view(torch.uint8)))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])


def test_layer_forward_projected_conditions(monkeypatch):
    """Where the epilogue does not apply, forward_projected is the projection then forward:
    per-head q/k norm (Qwen3), a partial rotary, a KV connector, or a step too large."""
    from kvflow.attention.backend import AttentionSpec
    from kvflow.attention.triton_backend import TritonAttentionBackend
    from kvflow.forward_context import set_forward_context
    from kvflow.layers import linear as linear_mod
    from tests.test_qk_rope_cache import _layer_batch

    monkeypatch.setattr(linear_mod, "_epilogue_device_ok", lambda x: True)
    monkeypatch.setattr(sg, "choose_config",
                        lambda m, n, k, device=None: dict(GEMV16) if m <= sg.MAX_M else None)
    be = TritonAttentionBackend()

    def ropes_taken(norm, rot_factor, rows=None, connector=None):
        layer, md, cache, _, pos, (H, KV, D, n) = _layer_batch(torch.bfloat16, "auto", norm,
                                                               rot_factor, True)
        layer.bind_impl(be.make_impl(AttentionSpec(H, KV, D, D ** -0.5, torch.bfloat16,
                                                   block_size=4)), be.capabilities)
        layer.kv_cache = cache
        proj = linear_mod.QKVParallelLinear(32, D, H, KV).to(torch.bfloat16).to(DEVICE)
        x = torch.zeros(rows or pos.shape[0], 32, dtype=torch.bfloat16, device=DEVICE)
        taken = []
        real = sg.skinny_gemm
        monkeypatch.setattr(sg, "skinny_gemm", lambda *a, **kw: taken.append(
            kw.get("rope_cache") is not None) or real(*a, **kw))
        kw = {} if connector is None else dict(kv_connector=connector)
        with set_forward_context(md, **kw):
            if rows is None:
                layer.forward_projected(proj, x, pos)
            else:
                assert proj.rope_epilogue_config(x) is None
        monkeypatch.setattr(sg, "skinny_gemm", real)
        return any(taken)

    assert ropes_taken(False, 1.0)
    assert not ropes_taken(True, 1.0)          # q/k norm needs whole heads
    assert not ropes_taken(False, 0.5)         # pass-through dims
    import types
    hooks = types.SimpleNamespace(wait_for_layer_load=lambda name: None,
                                  save_kv_layer=lambda name, cache, md: None)
    assert not ropes_taken(False, 1.0, connector=hooks)
    ropes_taken(False, 1.0, rows=sg.MAX_M + 1)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_engine_with_epilogue_equals_without(kind, tmp_path, make_llm, monkeypatch):
    """A whole bf16 model on the Triton backend, every q|k|v product a single-split GEMV with
    the input norm folded in (as the H200 table gives Llama-3.1-8B at decode): logits over two
    prefill chunks and greedy tokens through the engine's own decode steps are identical with
    and without the epilogue (Qwen2: q/k/v bias), and the epilogue ran in every layer."""
    import dataclasses

    import numpy as np

    from kvflow import SamplingParams
    from kvflow.attention.triton_backend import TritonAttentionBackend
    from kvflow.layers import linear as linear_mod
    from kvflow.layers import norm_fold
    from tests.conftest import make_hf_model, save_hf_model
    from tests.test_models_hf import _kvflow_logits

    monkeypatch.setattr(linear_mod, "_epilogue_device_ok", lambda x: True)
    monkeypatch.setattr(norm_fold, "_device_ok", lambda x: True)
    monkeypatch.setattr(sg, "choose_config", lambda m, n, k, device=None:
                        dict(sg.default_config(1, n, k), split_k=1) if m <= sg.MAX_M else None)
    if DEVICE == "cpu":     # the Triton backend on the interpreter's CPU tensors
        caps = TritonAttentionBackend.capabilities
        monkeypatch.setattr(TritonAttentionBackend, "capabilities",
                            dataclasses.replace(caps, devices=(*caps.devices, "cpu")))
    layers = 2
    path = save_hf_model(make_hf_model(kind, num_hidden_layers=layers), tmp_path / kind)
    ids = np.random.default_rng(0).integers(0, 383, size=16).tolist()
    runs = []
    for switch in ("1", "0"):
        monkeypatch.setenv("KVFLOW_QKV_ROPE", switch)
        taken = []
        real = sg.skinny_gemm
        monkeypatch.setattr(sg, "skinny_gemm", lambda *a, **kw: taken.append(
            kw.get("rope_cache") is not None) or real(*a, **kw))
        llm = make_llm(path, dtype="bfloat16", device=DEVICE, attention_backend="triton")
        try:
            logits = _kvflow_logits(llm, ids, split=11)        # chunks of 11 and 5 tokens
            assert sum(taken) == (2 * layers if switch == "1" else 0), taken
            out = llm.generate([ids[:7], ids[3:12]],
                               SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
            assert (sum(taken) > 2 * layers) == (switch == "1")     # the engine's own steps
        finally:
            llm.llm_engine.executor.shutdown()
        monkeypatch.setattr(sg, "skinny_gemm", real)
        runs.append((logits, [o.outputs[0].token_ids for o in out]))
    assert torch.equal(runs[0][0], runs[1][0])
    assert runs[0][1] == runs[1][1]
