"""The fused q/k RMSNorm + rotary + KV-cache write kernel (kvflow/kernels/qk_rope_cache.py).

Its contract is bit-identity with the sequential kernels it replaces (rms_norm -> rotary ->
reshape_and_cache) and with the torch reference composed of theirs; under the interpreter
(CPU) and compiled on a GPU alike.
"""
import pytest
import torch

pytest.importorskip("triton")

from kvflow.kernels import (  # noqa: E402
    ref_qk_norm_rope_cache, reshape_and_cache, rms_norm, rotary_embedding)
from kvflow.kernels.qk_rope_cache import (  # noqa: E402
    _qk_norm_rope_cache_kernel, qk_norm_rope_cache)
from kvflow.kernels.rotary import compute_cos_sin_cache  # noqa: E402
from tests.conftest import kernel_device  # noqa: E402

DEVICE = kernel_device(_qk_norm_rope_cache_kernel)
FP8 = torch.float8_e4m3fn


def _case(T, H, KV, D, rot, dtype, norm, cache_dtype=None, block_size=4, seed=0, pad=(1,)):
    """q/k/v as column slices of one fused [T, (H + 2 KV) * D + 3] qkv output (strided rows,
    as the model passes them), a slot mapping with padding rows (-1), zeroed caches."""
    g = torch.Generator().manual_seed(seed)
    width = (H + 2 * KV) * D + 3                     # odd extra columns: a non-trivial stride
    qkv = (torch.randn(T, width, generator=g) * 2).to(dtype).to(DEVICE)
    q = qkv[:, :H * D].view(T, H, D)
    k = qkv[:, H * D:(H + KV) * D].view(T, KV, D)
    v = qkv[:, (H + KV) * D:(H + 2 * KV) * D].view(T, KV, D)
    positions = torch.randint(0, 200, (T,), generator=g).to(DEVICE)
    cs = compute_cos_sin_cache(rot, 256).to(DEVICE)
    if norm:
        qw = (1 + 0.3 * torch.randn(D, generator=g)).to(dtype).to(DEVICE)
        kw = (1 + 0.3 * torch.randn(D, generator=g)).to(dtype).to(DEVICE)
    else:
        qw = kw = None
    num_blocks = T // block_size + 3
    slots = torch.randperm(num_blocks * block_size, generator=g)[:T]
    for i in pad:
        if i < T:
            slots[i] = -1
    slots = slots.to(DEVICE)
    cdt = cache_dtype or dtype
    caches = [torch.zeros(num_blocks, block_size, KV, D, dtype=cdt, device=DEVICE)
              for _ in range(2)]
    return q, k, v, positions, cs, qw, kw, slots, caches


def _sequential(q, k, v, positions, cs, is_neox, qw, kw, eps, kc, vc, slots, ks, vs):
    """The existing kernels in sequence, as the unfused layer runs them."""
    if qw is not None:
        q, k = rms_norm(q, qw, eps), rms_norm(k, kw, eps)
    else:
        q, k = q.clone(), k.clone()
    rotary_embedding(positions, q, k, cs, is_neox)
    reshape_and_cache(k, v, kc, vc, slots, ks, vs)
    return q


def _bits(x):
    return x.view(torch.uint8) if x.dtype == FP8 else x


def _same(a, b):
    """Bit-equal, except fp32 outputs of compiled kernels: the GPU compiler contracts
    x1*cos - x2*sin into an FMA differently per kernel (and torch does not contract), so an
    fp32 result may differ in its last bit. Lower precisions round that away (and are exact
    under the interpreter, which never contracts)."""
    if a.dtype == torch.float32 and a.is_cuda:
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    else:
        assert torch.equal(a, b)


def _near(a, b, norm):
    """Kernel vs torch reference: bit-equal without the norm (see _same for fp32 on a GPU);
    with it the fp32 sum of squares is reduced in another order (torch's mean), so a value
    may differ by one rounding step."""
    if not norm and a.dtype == torch.float32:
        _same(a, b)
        return
    if not norm:
        assert torch.equal(_bits(a), _bits(b))
        return
    # One ulp of bf16 (2^-8 relative), or one e4m3 step (2^-3 relative) in an fp8 cache.
    tol = 0.13 if a.dtype == FP8 else 8e-3
    torch.testing.assert_close(a.float(), b.float(), atol=tol, rtol=tol)


GRID = [
    # T, H, KV, D, rot, dtype, norm, is_neox
    (5, 4, 2, 64, 64, torch.bfloat16, True, True),        # Qwen3-like: GQA + q/k norm
    (5, 4, 2, 64, 64, torch.float16, False, True),        # Llama-like
    (3, 2, 2, 128, 128, torch.float32, True, True),       # head 128, MHA
    (4, 8, 1, 128, 64, torch.bfloat16, True, True),       # partial rotary + norm, MQA
    (4, 4, 2, 64, 32, torch.float16, False, False),       # partial, interleaved (GPT-J)
    (3, 4, 2, 64, 64, torch.bfloat16, True, False),       # interleaved + norm
    (6, 6, 3, 64, 48, torch.float32, False, True),        # non-power-of-two heads / half
    (2, 40, 8, 128, 128, torch.bfloat16, True, True),     # several q head chunks per token
]


@pytest.mark.parametrize("T,H,KV,D,rot,dtype,norm,is_neox", GRID)
def test_matches_sequential_kernels_and_reference(T, H, KV, D, rot, dtype, norm, is_neox):
    q, k, v, pos, cs, qw, kw, slots, (kc, vc) = _case(T, H, KV, D, rot, dtype, norm)
    eps = 1e-6
    q_before = q.clone()
    out = qk_norm_rope_cache(q, k, v, pos, cs, is_neox, qw, kw, eps, kc, vc, slots)
    assert torch.equal(q, q_before), "the fused kernel must not modify its inputs"
    kc2, vc2 = torch.zeros_like(kc), torch.zeros_like(vc)
    seq = _sequential(q, k, v, pos, cs, is_neox, qw, kw, eps, kc2, vc2, slots, None, None)
    _same(out, seq)
    _same(kc, kc2)
    assert torch.equal(vc, vc2)
    kc3, vc3 = torch.zeros_like(kc), torch.zeros_like(vc)
    ref = ref_qk_norm_rope_cache(q, k, v, pos, cs, is_neox, qw, kw, eps, kc3, vc3, slots)
    _near(out, ref, norm)
    _near(kc, kc3, norm)
    assert torch.equal(vc, vc3)
    # Padding rows (slot -1) write nothing: exactly T - 1 slots are non-zero.
    written = kc.abs().sum(dim=(-1, -2)).flatten() != 0
    assert int(written.sum()) == T - 1


@pytest.mark.parametrize("norm,rot", [(True, 64), (False, 32)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp8_cache(norm, rot, dtype):
    T, H, KV, D = 5, 4, 2, 64
    q, k, v, pos, cs, qw, kw, slots, (kc, vc) = _case(T, H, KV, D, rot, dtype, norm,
                                                      cache_dtype=FP8, pad=(0, 3))
    ks = torch.tensor([0.05], dtype=torch.float32, device=DEVICE)   # some values saturate
    vs = torch.tensor([0.7], dtype=torch.float32, device=DEVICE)
    out = qk_norm_rope_cache(q, k, v, pos, cs, True, qw, kw, 1e-5, kc, vc, slots, ks, vs)
    kc2, vc2 = torch.zeros_like(kc), torch.zeros_like(vc)
    seq = _sequential(q, k, v, pos, cs, True, qw, kw, 1e-5, kc2, vc2, slots, ks, vs)
    assert torch.equal(out, seq)
    assert torch.equal(_bits(kc), _bits(kc2)) and torch.equal(_bits(vc), _bits(vc2))
    kc3, vc3 = torch.zeros_like(kc), torch.zeros_like(vc)
    ref = ref_qk_norm_rope_cache(q, k, v, pos, cs, True, qw, kw, 1e-5, kc3, vc3, slots, ks, vs)
    _near(out, ref, norm)
    _near(kc, kc3, norm)
    assert torch.equal(_bits(vc), _bits(vc3))


def test_short_slot_mapping_and_empty():
    """slot_mapping shorter than T: later tokens are transformed but not cached (as
    reshape_and_cache); T = 0 launches nothing."""
    q, k, v, pos, cs, qw, kw, slots, (kc, vc) = _case(4, 2, 1, 64, 64, torch.float32, True,
                                                      pad=())
    out = qk_norm_rope_cache(q, k, v, pos, cs, True, qw, kw, 1e-6, kc, vc, slots[:2])
    kc2, vc2 = torch.zeros_like(kc), torch.zeros_like(vc)
    seq = _sequential(q, k, v, pos, cs, True, qw, kw, 1e-6, kc2, vc2, slots[:2], None, None)
    _same(out, seq)
    _same(kc, kc2)
    assert torch.equal(vc, vc2)
    empty = qk_norm_rope_cache(q[:0], k[:0], v[:0], pos[:0], cs, True, qw, kw, 1e-6, kc, vc,
                               slots[:0])
    assert empty.shape == (0, 2, 64)


# ------------------------------------------------------------------------------------------
# The Attention layer that owns its rotary / q-k norm: Triton (fused) vs torch (reference)
# ------------------------------------------------------------------------------------------
def _layer_batch(dtype, kv_dtype, norm, rot_factor, is_neox, seed=0):
    """An Attention layer owning rotary (+ q/k RMSNorm) and one mixed step: two decode rows
    over cached context, one prefill chunk over a cached prefix, one padding row (slot -1)."""
    from kvflow.attention.backend import AttentionMetadata
    from kvflow.attention.layer import Attention
    from kvflow.layers.norm import RMSNorm
    from kvflow.layers.rotary import RotaryEmbedding

    g = torch.Generator().manual_seed(seed)
    H, KV, D, bs = 4, 2, 64, 4
    rotary = RotaryEmbedding(D, 128, 10000.0, None, rot_factor, is_neox).to(DEVICE)
    qn = kn = None
    if norm:
        qn, kn = RMSNorm(D, 1e-6), RMSNorm(D, 1e-6)
        for n in (qn, kn):
            n.weight.data = (1 + 0.3 * torch.randn(D, generator=g)).to(dtype).to(DEVICE)
    layer = Attention(H, D, D ** -0.5, KV, rotary=rotary, q_norm=qn, k_norm=kn)
    seq_lens, q_lens = [9, 5, 9], [1, 1, 6]
    block_table = torch.tensor([[5, 2, 7], [0, 3, 0], [1, 4, 6]], dtype=torch.int32)
    positions, slots = [], []
    for r, (s, ql) in enumerate(zip(seq_lens, q_lens)):
        for p in range(s - ql, s):
            positions.append(p)
            slots.append(int(block_table[r, p // bs]) * bs + p % bs)
    positions.append(0)                                  # padding row
    slots.append(-1)
    T, n = len(positions), len(positions) - 1
    cache_dtype = torch.float8_e4m3fn if kv_dtype == "fp8" else dtype
    cache = torch.randn(2, 8, bs, KV, D, generator=g).to(cache_dtype).to(DEVICE)  # old context
    md = AttentionMetadata(
        num_actual_tokens=n, max_query_len=max(q_lens), max_seq_len=max(seq_lens),
        query_start_loc=torch.tensor([0, 1, 2, 8], dtype=torch.int32, device=DEVICE),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
        block_table=block_table.to(DEVICE),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=DEVICE),
        query_start_loc_cpu=torch.tensor([0, 1, 2, 8], dtype=torch.int32),
        seq_lens_cpu=torch.tensor(seq_lens, dtype=torch.int32), num_decode_reqs=2)
    qkv = torch.randn(T, (H + 2 * KV) * D + 8, generator=g).to(dtype).to(DEVICE)
    pos = torch.tensor(positions, dtype=torch.int64, device=DEVICE)
    if kv_dtype == "fp8":
        layer.k_scale.fill_(0.5)
        layer.v_scale.fill_(1.5)
    layer.to(DEVICE)
    return layer, md, cache, qkv, pos, (H, KV, D, n)


def _split_qkv(x, dims):
    """[T, (H + 2 KV) * D] -> q, k, v column slices (as the model's qkv split)."""
    H, KV, D, _ = dims
    return x[:, :H * D], x[:, H * D:(H + KV) * D], x[:, (H + KV) * D:(H + 2 * KV) * D]


def _run_layer(layer, backend, caps, md, cache, qkv, pos, dims, spec_dtype, kv_dtype):
    from kvflow.attention.backend import AttentionSpec
    from kvflow.forward_context import set_forward_context

    H, KV, D, _ = dims
    spec = AttentionSpec(H, KV, D, D ** -0.5, spec_dtype, kv_cache_dtype=kv_dtype, block_size=4)
    layer.bind_impl(backend.make_impl(spec), caps)
    layer.kv_cache = cache.clone()
    q, k, v = _split_qkv(qkv.clone(), dims)              # the unfused path rotates in place
    with set_forward_context(md):
        out = layer(q, k, v, pos)
    return out, layer.kv_cache


@pytest.mark.parametrize("dtype,kv_dtype,norm,rot_factor,is_neox", [
    (torch.float32, "auto", True, 1.0, True),
    (torch.bfloat16, "auto", True, 1.0, True),
    (torch.float16, "auto", False, 0.5, True),
    (torch.bfloat16, "fp8", True, 1.0, False),
    (torch.float32, "auto", False, 1.0, True),
])
def test_layer_triton_fused_matches_torch_backend(dtype, kv_dtype, norm, rot_factor, is_neox):
    import dataclasses

    from kvflow.attention.torch_backend import TorchAttentionBackend
    from kvflow.attention.triton_backend import TritonAttentionBackend

    layer, md, cache, qkv, pos, dims = _layer_batch(dtype, kv_dtype, norm, rot_factor, is_neox)
    n = dims[3]
    torch_be, triton_be = TorchAttentionBackend(), TritonAttentionBackend()
    assert triton_be.capabilities.fuses_qk_rope_cache
    assert not torch_be.capabilities.fuses_qk_rope_cache
    ref, ref_cache = _run_layer(layer, torch_be, torch_be.capabilities, md, cache, qkv, pos,
                                dims, dtype, kv_dtype)
    assert not layer.fuse_qk_rope
    out, out_cache = _run_layer(layer, triton_be, triton_be.capabilities, md, cache, qkv, pos,
                                dims, dtype, kv_dtype)
    assert layer.fuse_qk_rope
    # The Triton backend with fusion turned off: the layer applies norm + rotary itself.
    unfused_caps = dataclasses.replace(triton_be.capabilities, fuses_qk_rope_cache=False)
    out2, cache2 = _run_layer(layer, triton_be, unfused_caps, md, cache, qkv, pos, dims, dtype,
                              kv_dtype)
    assert not layer.fuse_qk_rope
    tol = {torch.float32: 2e-3, torch.float16: 2e-2, torch.bfloat16: 6e-2}[dtype]
    tol_cache = 0.13 if kv_dtype == "fp8" else tol
    for o, c in ((out, out_cache), (out2, cache2)):
        torch.testing.assert_close(o[:n].float(), ref[:n].float(), atol=tol, rtol=tol)
        torch.testing.assert_close(c.float(), ref_cache.float(), atol=tol_cache, rtol=tol_cache)
    if not norm:      # without the norm both Triton paths run the same roundings
        assert torch.equal(out[:n], out2[:n])
        assert torch.equal(out_cache.view(torch.uint8), cache2.view(torch.uint8))


def _fused_layer_for_op(dtype):
    """A q/k-norm layer on the Triton backend, its eager fused result (output, cache), then
    registered for the custom op with a fresh copy of the cache."""
    from kvflow.attention.layer import bind_attention_layers
    from kvflow.attention.triton_backend import TritonAttentionBackend

    layer, md, cache, qkv, pos, dims = _layer_batch(dtype, "auto", True, 1.0, True)
    be = TritonAttentionBackend()
    eager, eager_cache = _run_layer(layer, be, be.capabilities, md, cache, qkv, pos, dims,
                                    dtype, "auto")
    bind_attention_layers(torch.nn.ModuleDict({"attn": layer}))
    layer.kv_cache = cache.clone()
    return layer, md, cache, qkv, pos, dims, eager, eager_cache


def test_layer_custom_op_fused_path():
    """The layer's custom op (what torch.compile calls) carries the positions on the fused
    path and gives the eager result."""
    from kvflow.forward_context import set_forward_context

    dtype = torch.bfloat16
    layer, md, cache, qkv, pos, dims, eager, eager_cache = _fused_layer_for_op(dtype)
    H, KV, D, n = dims
    q, k, v = _split_qkv(qkv, dims)
    with set_forward_context(md):
        out = torch.ops.kvflow.unified_attention(q, k, v, layer.layer_name, pos)
    assert torch.equal(out[:n], eager[:n]) and torch.equal(layer.kv_cache, eager_cache)
    # Rebound to a backend that does not fuse, an op call with positions (a graph traced
    # before) still gives the same result: the layer applies the transform itself.
    from kvflow.attention.backend import AttentionSpec
    from kvflow.attention.torch_backend import TorchAttentionBackend
    tb = TorchAttentionBackend()
    layer.bind_impl(tb.make_impl(AttentionSpec(H, KV, D, D ** -0.5, dtype, block_size=4)),
                    tb.capabilities)
    layer.kv_cache = cache.clone()
    q_before = q.clone()
    with set_forward_context(md):
        out2 = torch.ops.kvflow.unified_attention(q, k, v, layer.layer_name, pos)
    assert torch.equal(q, q_before)
    torch.testing.assert_close(out2[:n].float(), out[:n].float(), atol=6e-2, rtol=6e-2)


def test_layer_argument_checks():
    from kvflow.attention.layer import Attention
    from kvflow.layers.norm import RMSNorm
    from kvflow.layers.rotary import RotaryEmbedding

    rot = RotaryEmbedding(64, 16, 10000.0)
    with pytest.raises(ValueError, match="go together"):
        Attention(2, 64, 0.1, 1, rotary=rot, q_norm=RMSNorm(64))
    with pytest.raises(ValueError, match="need a rotary"):
        Attention(2, 64, 0.1, 1, q_norm=RMSNorm(64), k_norm=RMSNorm(64))
    with pytest.raises(ValueError, match="head dim"):
        Attention(2, 32, 0.1, 1, rotary=rot)
    layer = Attention(2, 64, 0.1, 1, rotary=rot)
    with pytest.raises(ValueError, match="positions"):
        layer(torch.zeros(1, 128), torch.zeros(1, 64), torch.zeros(1, 64))


def test_layer_fused_path_under_torch_compile():
    """fullgraph torch.compile of a forward around the layer: the fused op gets the positions
    as a graph input and gives the eager result (output and cache)."""
    from kvflow.forward_context import set_forward_context

    dtype = torch.float32
    layer, md, cache, qkv, pos, dims, eager, eager_cache = _fused_layer_for_op(dtype)
    n = dims[3]

    def forward(x, p):
        return layer(*_split_qkv(x, dims), p) * 2

    with torch.inference_mode(), set_forward_context(md):
        out = torch.compile(forward, fullgraph=True)(qkv.clone(), pos)
    assert torch.equal(out[:n], eager[:n] * 2) and torch.equal(layer.kv_cache, eager_cache)


def test_qwen3_model_fused_matches_torch_backend(tmp_path, make_llm):
    """A whole Qwen3 (q/k norm) through the runner's model: rebound to the Triton backend
    (interpreter), the fused layers give the torch backend's logits, for a prefill, a chunk
    over the cached prefix, and the CUDA-graph decode path driven eagerly (its persistent
    positions buffer reaches the fused kernel)."""
    import numpy as np

    from kvflow.attention.triton_backend import TritonAttentionBackend
    from kvflow.worker.cuda_graphs import DecodeGraphs
    from tests.conftest import make_hf_model, save_hf_model
    from tests.test_llama4 import runner_logits

    path = save_hf_model(make_hf_model("qwen3"), tmp_path / "qwen3")
    llm = make_llm(path, max_model_len=64, block_size=16)
    runner = llm.llm_engine.executor.worker.runner
    ids = np.random.default_rng(3).integers(0, 383, size=24).tolist()
    ref = runner_logits(llm, ids, splits=[])
    torch_impls = [layer.impl for layer in runner.attn_layers]
    be = TritonAttentionBackend()
    try:
        for layer in runner.attn_layers:
            layer.bind_impl(be.make_impl(runner.attention_spec(layer)), be.capabilities)
        assert all(layer.fuse_qk_rope for layer in runner.attn_layers)
        out = runner_logits(llm, ids, splits=[17])
        assert (out - ref).abs().max().item() < 1e-4
        graphs = DecodeGraphs(runner.model, runner.device, runner.max_model_len, 16,
                              runner.max_blocks_per_req, [2])
        graphs.input_ids[:1] = ids[20]
        graphs.positions[:1] = 20
        graphs.slot_mapping[:1] = 20                       # rewrite the same K/V
        graphs.seq_lens[:1] = 21
        graphs.block_table[:1] = torch.arange(runner.max_blocks_per_req, dtype=torch.int32,
                                              device=runner.device)
        with torch.inference_mode():
            graphs._forward(2)                             # row 1: padding (slot -1)
        assert (graphs.logits[0].cpu() - ref[20]).abs().max().item() < 1e-4
    finally:
        for layer, impl in zip(runner.attn_layers, torch_impls):
            layer.bind_impl(impl, type(runner.backend).capabilities)
        llm.llm_engine.reset_prefix_cache()
