"""The skinny (decode) GEMM kernel vs its torch reference, its config table, and the dense-linear
dispatch that uses it (KVFLOW_SKINNY_GEMM).

Without a GPU the kernel runs under Triton's CPU interpreter (TRITON_INTERPRET=1, set by conftest
before triton is first imported) on tiny shapes; the interpreter handles fp16 and bf16 loads/arithmetic
(tl.dot on bf16 through the patch in kvflow/kernels/__init__.py), so both dtypes are tested
directly. With a CUDA device the same tests run compiled, plus the `gpu`-marked model shapes:
    pytest tests/test_skinny_gemm.py
"""
import json

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

import kvflow.kernels  # noqa: E402,F401  (applies the interpreter fixes)
import kvflow.kernels.skinny_gemm as sg  # noqa: E402
import triton  # noqa: E402
from kvflow.layers import linear as linear_mod  # noqa: E402
from tests.conftest import kernel_device  # noqa: E402

DEVICE = kernel_device(sg._skinny_gemm_kernel)
INTERPRET = DEVICE == "cpu"


def _close(out, ref, dtype):
    """The kernel and the reference both round an fp32 sum once; only the summation order
    differs, so allow one or two output ulps (relative to the output's scale)."""
    assert out.dtype == ref.dtype == dtype and out.shape == ref.shape
    assert not torch.isnan(out).any()
    ulp = {torch.float32: 1e-6, torch.float16: 2 ** -10, torch.bfloat16: 2 ** -7}[dtype]
    scale = ref.float().abs().max().item() + 1.0
    torch.testing.assert_close(out.float(), ref.float(), atol=2 * ulp * scale, rtol=0)


def _operands(m, n, k, dtype, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(dtype).to(DEVICE)
    w = torch.randn(n, k, generator=g).to(dtype).to(DEVICE)
    b = torch.randn(n, generator=g).to(dtype).to(DEVICE) if bias else None
    return x, w, b


# N = 37 and K = 200 are multiples of no block; K = 192 is a multiple of BLOCK_K=64 (EVEN_K).
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("use_dot", [False, True])
@pytest.mark.parametrize("split_k", [1, 3])
def test_matches_reference(dtype, m, use_dot, split_k):
    for k, bias in ((200, True), (192, False)):
        x, w, b = _operands(m, 37, k, dtype, bias)
        cfg = dict(block_n=16, block_k=64, split_k=split_k, num_warps=4, num_stages=2,
                   use_dot=use_dot)
        _close(sg.skinny_gemm(x, w, b, cfg), sg.skinny_gemm_ref(x, w, b), dtype)


@pytest.mark.parametrize("m", [1, 5, 16])
def test_fp32_and_large_split(m):
    """fp32 inputs (IEEE dot, not TF32), more splits than K blocks asked for (clamped), the
    per-step K reduction (accumulator above the deferred budget) and 16 rows."""
    x, w, b = _operands(m, 33, 130, torch.float32, True, seed=1)
    step = dict(block_n=32, block_k=128) if m == 1 else dict(block_n=8, block_k=32)
    for cfg in (dict(block_n=32, block_k=32, split_k=16, num_warps=1, use_dot=True),
                dict(step, split_k=2, num_warps=1, use_dot=False)):
        _close(sg.skinny_gemm(x, w, b, cfg), sg.skinny_gemm_ref(x, w, b), torch.float32)


# Decode batches of up to MAX_M rows: the tensor-core form with the rows padded to a power of
# two (40 -> 64, 200 -> 256), masked rows never stored; a GEMV config is run in the dot form.
@pytest.mark.parametrize("m", [17, 40, 200])
@pytest.mark.parametrize("split_k, bias, use_dot", [(1, True, True), (3, False, True),
                                                    (2, True, False)])
def test_many_rows_match_reference(m, split_k, bias, use_dot):
    x, w, b = _operands(m, 37, 200, torch.bfloat16, bias, seed=m)
    cfg = dict(block_n=16, block_k=64, split_k=split_k, num_warps=4, num_stages=2,
               use_dot=use_dot)
    _close(sg.skinny_gemm(x, w, b, cfg), sg.skinny_gemm_ref(x, w, b), torch.bfloat16)


def test_many_rows_fused_activations():
    """glu epilogue and silu(gate) * up prologue at 40 rows: exactly the unfused chain."""
    from kvflow.kernels.activation import silu_and_mul
    g = torch.Generator().manual_seed(11)
    m, n, k = 40, 24, 128
    x = torch.randn(m, k, generator=g).to(torch.bfloat16).to(DEVICE)
    w2 = (torch.randn(2 * n, k, generator=g) * k ** -0.5).to(torch.bfloat16).to(DEVICE)
    cfg = dict(block_n=16, block_k=64, split_k=1, num_warps=4, num_stages=2, use_dot=True)
    act = sg.skinny_gemm(x, w2, None, cfg, glu=True)
    assert torch.equal(act, silu_and_mul(sg.skinny_gemm(x, w2, None, cfg)))
    w = (torch.randn(n, k // 2, generator=g) * 0.05).to(torch.bfloat16).to(DEVICE)
    assert torch.equal(sg.skinny_gemm(x, w, None, cfg, silu_mul_input=True),
                       sg.skinny_gemm(silu_and_mul(x), w, None, cfg))


def test_consumer_fold_needs_the_gemv_form():
    """Above GEMV_MAX_M rows no product can be a folded norm's consumer (its tile of partial
    sums is per row; the dot form would pad it), whatever its table entry says."""
    sg.load_table.cache_clear()
    gemv = dict(block_n=8, block_k=256, split_k=1, num_warps=4, num_stages=2, use_dot=False)
    real = sg.choose_config
    try:
        sg.choose_config = lambda m, n, k, device=None: gemv
        dev = torch.device("cpu")
        assert sg.foldable(sg.GEMV_MAX_M, 64, 256, dev, consumer=True)
        assert not sg.foldable(sg.GEMV_MAX_M + 1, 64, 256, dev, consumer=True)
        assert sg.foldable(sg.GEMV_MAX_M + 1, 64, 256, dev, consumer=False)
    finally:
        sg.choose_config = real


@pytest.mark.parametrize("m, n, k", [(1, 40, 1024), (3, 24, 512), (8, 80, 300)])
def test_default_configs(m, n, k):
    """The heuristic's configs (GEMV / dot, split K, BLOCK_K=256 over a ragged K)."""
    x, w, b = _operands(m, n, k, torch.bfloat16, True, seed=2)
    _close(sg.skinny_gemm(x, w, b), sg.skinny_gemm_ref(x, w, b), torch.bfloat16)


def test_strided_inputs_and_deterministic():
    x, w, b = _operands(4, 40, 96, torch.float16, True, seed=3)
    xs = torch.zeros(4, 128, dtype=x.dtype, device=DEVICE)
    xs[:, :96] = x                                       # row stride 128 != K
    cfg = dict(block_n=16, block_k=32, split_k=3, num_warps=4)
    out = sg.skinny_gemm(xs[:, :96], w, b, cfg)
    _close(out, sg.skinny_gemm_ref(x, w, b), torch.float16)
    assert torch.equal(out, sg.skinny_gemm(x, w, b, cfg))


def test_default_config_heuristic():
    # Qwen3-0.6B o_proj at M=1: 64 slabs of 16 rows, split until ~4 programs per SM.
    cfg = sg.default_config(1, 1024, 2048, num_sms=132)
    assert cfg["use_dot"] is False and cfg["split_k"] == 8
    assert sg.default_config(8, 1024, 2048)["use_dot"] is True
    assert sg.default_config(1, 151936, 1024)["split_k"] == 1      # LM head: enough slabs
    assert sg.default_config(1, 64, 256)["split_k"] == 1           # K too short to split
    assert sg.choose_config(sg.MAX_M + 1, 64, 64) is None          # past MAX_M


def test_tuned_table(tmp_path, monkeypatch):
    """The device's table: an entry's config; null (cuBLAS wins) and shapes it never measured
    both mean cuBLAS."""
    monkeypatch.setattr(sg, "CONFIG_DIR", str(tmp_path))
    from types import SimpleNamespace
    monkeypatch.setattr(sg, "device_properties",
                        lambda device: SimpleNamespace(name="Fake GPU X", multi_processor_count=100))
    sg.load_table.cache_clear()
    cfg = dict(block_n=32, block_k=128, split_k=2, num_warps=4, num_stages=3, use_dot=False)
    (tmp_path / "skinny_gemm_Fake_GPU_X.json").write_text(json.dumps(
        {"device": "Fake GPU X", "configs": {"1024,2048": {"1": cfg, "8": None}}}))
    try:
        dev = torch.device("cuda", 0)
        assert sg.choose_config(1, 1024, 2048, dev) == cfg
        assert sg.choose_config(7, 1024, 2048, dev) is None           # bucket 8: cuBLAS
        assert sg.choose_config(2, 1024, 2048, dev) is None            # bucket not measured
        assert sg.choose_config(1, 4096, 1024, dev) is None            # shape not measured
        # KVFLOW_SKINNY_TABLE: another file (a tuning run's table, for an A/B)
        other = dict(cfg, block_n=4, split_k=1)
        (tmp_path / "chain.json").write_text(json.dumps(
            {"device": "Fake GPU X", "configs": {"4096,1024": {"1": other}}}))
        monkeypatch.setenv("KVFLOW_SKINNY_TABLE", str(tmp_path / "chain.json"))
        sg.load_table.cache_clear()
        assert sg.choose_config(1, 4096, 1024, dev) == other
        assert sg.choose_config(1, 1024, 2048, dev) is None
    finally:
        sg.load_table.cache_clear()


# ---------------------------------------------------------------------------------- dispatch
def test_dispatch_cpu_unchanged(monkeypatch):
    """KVFLOW_SKINNY_GEMM on (the default) or 0: layers (column / row parallel, LM head) on CPU
    compute exactly F.linear (the kernel is CUDA-only)."""
    from kvflow.layers.embedding import ParallelLMHead
    from kvflow.layers.linear import ReplicatedLinear, RowParallelLinear
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 48, generator=g).to(torch.bfloat16)
    for flag in (None, "0"):
        if flag is None:
            monkeypatch.delenv("KVFLOW_SKINNY_GEMM", raising=False)
        else:
            monkeypatch.setenv("KVFLOW_SKINNY_GEMM", flag)
        lin = ReplicatedLinear(48, 24, bias=True).to(torch.bfloat16)
        row = RowParallelLinear(48, 24, bias=True).to(torch.bfloat16)
        head = ParallelLMHead(40, 48).to(torch.bfloat16)
        assert lin.skinny_gemm == row.skinny_gemm == head.skinny_gemm == (flag is None)
        for mod in (lin, row, head):
            for p in mod.parameters():
                p.data.copy_(torch.randn(p.shape, generator=g))
        assert torch.equal(lin(x), F.linear(x, lin.weight, lin.bias))
        assert torch.equal(row(x), F.linear(x, row.weight) + row.bias)
        assert torch.equal(head.compute_logits(x), F.linear(x, head.weight))


@pytest.mark.parametrize("rows", [3, 40])
def test_lm_head_writes_into_the_graph_buffer(rows):
    """compute_logits(out=): the decode graphs' buffer in the model's dtype holds exactly the
    values the plain call returns (the product's own output where cuBLAS runs it; a copy of
    the skinny GEMM's where that runs), and the model-level call upcasts only without out."""
    from kvflow.layers.embedding import ParallelLMHead
    g = torch.Generator().manual_seed(rows)
    head = ParallelLMHead(40, 48).to(torch.bfloat16).to(DEVICE)
    head.weight.data.copy_(torch.randn(head.weight.shape, generator=g).to(DEVICE))
    x = torch.randn(rows, 48, generator=g).to(torch.bfloat16).to(DEVICE)
    buf = torch.full((64, 40), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    got = head.compute_logits(x, out=buf[:rows])
    assert got.data_ptr() == buf.data_ptr() and got.dtype == torch.bfloat16
    assert torch.equal(buf[:rows], head.compute_logits(x))
    assert torch.isnan(buf[rows:]).all()
    # dense_linear(out=) with a bias and leading dims: the same values as without out.
    b = torch.randn(40, generator=g).to(torch.bfloat16).to(DEVICE)
    x3 = x.view(1, rows, 48)
    o3 = torch.empty(1, rows, 40, dtype=torch.bfloat16, device=DEVICE)
    assert linear_mod.dense_linear(x3, head.weight, b, head.skinny_gemm, out=o3) is o3
    assert torch.equal(o3, linear_mod.dense_linear(x3, head.weight, b, head.skinny_gemm))


def test_skinny_linear_path():
    """What the dispatch runs on CUDA (run here on the interpreter's CPU tensors): leading dims
    flattened to rows, up to MAX_M rows through the kernel, more through F.linear."""
    g = torch.Generator().manual_seed(5)
    w = torch.randn(24, 64, generator=g).to(torch.float16).to(DEVICE)
    b = torch.randn(24, generator=g).to(torch.float16).to(DEVICE)
    x = torch.randn(2, 3, 64, generator=g).to(torch.float16).to(DEVICE)
    out = linear_mod._skinny_linear(x, w, b)
    assert out.shape == (2, 3, 24)
    _close(out.reshape(6, 24), sg.skinny_gemm_ref(x.reshape(6, 64), w, b), torch.float16)
    big = torch.randn(sg.MAX_M + 1, 64, generator=g).to(torch.float16).to(DEVICE)
    assert torch.equal(linear_mod._skinny_linear(big, w, b), F.linear(big, w, b))


def test_skinny_linear_op_schema():
    """The opaque op compiled graphs call: schema, fake (meta) impl and dynamic shapes."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(3, 32, generator=g).to(DEVICE)
    w = torch.randn(16, 32, generator=g).to(DEVICE)
    for b in (None, torch.randn(16, generator=g).to(DEVICE)):
        torch.library.opcheck(torch.ops.kvflow.skinny_linear.default, (x, w, b),
                              test_utils=("test_schema", "test_faketensor"))


# -------------------------------------------------------------------------- device shapes
@pytest.mark.gpu
@pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(), reason="needs CUDA, compiled")
@pytest.mark.parametrize("m", [1, 2, 4, 8, 16, 48, 256])
@pytest.mark.parametrize("n, k", [(4096, 1024), (1024, 3072), (151936, 1024), (6144, 4096)])
def test_model_shapes_gpu(m, n, k):
    x, w, b = _operands(m, n, k, torch.bfloat16, False)
    _close(sg.skinny_gemm(x, w, b), sg.skinny_gemm_ref(x, w, b), torch.bfloat16)


@pytest.mark.parametrize("m, n, k, use_dot", [(1, 24, 256, False), (3, 40, 192, False),
                                              (5, 64, 256, True)])
def test_silu_mul_input_matches_separate_activation(m, n, k, use_dot):
    """A gated MLP's down projection: silu(gate) * up applied as x is loaded gives exactly the
    product of the activation kernel's output (same fp32 math, one rounding)."""
    from kvflow.kernels.activation import silu_and_mul
    g = torch.Generator().manual_seed(m * n + k)
    gate_up = (torch.randn(m, 2 * k, generator=g) * 2).to(torch.bfloat16).to(DEVICE)
    w = (torch.randn(n, k, generator=g) * 0.05).to(torch.bfloat16).to(DEVICE)
    cfg = dict(block_n=16, block_k=64, split_k=2, num_warps=4, num_stages=2, use_dot=use_dot)
    fused = sg.skinny_gemm(gate_up, w, None, cfg, silu_mul_input=True)
    separate = sg.skinny_gemm(silu_and_mul(gate_up), w, None, cfg)
    assert torch.equal(fused, separate)
    with pytest.raises(AssertionError):
        sg.skinny_gemm(gate_up[:, :k + 1], w, None, cfg, silu_mul_input=True)


def test_dense_linear_silu_mul_input_falls_back_exactly():
    """Off the skinny path (CPU, fp32) silu_mul_input is the activation, then F.linear."""
    from kvflow.kernels.reference import ref_silu_and_mul
    x = torch.randn(3, 2 * 48)
    w = torch.randn(20, 48)
    out = linear_mod.dense_linear(x, w, None, skinny=True, silu_mul_input=True)
    assert torch.equal(out, F.linear(ref_silu_and_mul(x), w))


# ------------------------------------------------------------ folded residual add + RMSNorm
def _fold_chain(m, hidden, n_out, k_in, use_dot, bias, dtype=torch.bfloat16, seed=3):
    """producer: y = x @ W1^T (K = k_in -> N = hidden) + residual add + RMSNorm, then the
    consumer W2 (hidden -> n_out): folded (two launches) and unfused (GEMM, norm kernel /
    reference, GEMM)."""
    from kvflow.layers import ops
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k_in, generator=g).to(dtype).to(DEVICE)
    w1 = (torch.randn(hidden, k_in, generator=g) * k_in ** -0.5).to(dtype).to(DEVICE)
    w2 = (torch.randn(n_out, hidden, generator=g) * hidden ** -0.5).to(dtype).to(DEVICE)
    r = torch.randn(m, hidden, generator=g).to(dtype).to(DEVICE)
    gam = (1 + 0.1 * torch.randn(hidden, generator=g)).to(dtype).to(DEVICE)
    b2 = torch.randn(n_out, generator=g).to(dtype).to(DEVICE) if bias else None
    eps = 1e-5
    cfg1 = dict(sg.default_config(m, hidden, k_in), split_k=1, use_dot=use_dot)
    cfg2 = dict(sg.default_config(m, n_out, hidden), split_k=1, use_dot=use_dot)
    hg, h, fold = sg.skinny_gemm(x, w1, None, cfg1, add_norm=(r, gam, eps))
    folded = sg.skinny_gemm(hg, w2, b2, cfg2, row_scale=fold)
    y1 = sg.skinny_gemm(x, w1, None, cfg1)
    normed, h_ref = ops.fused_add_rms_norm(y1, r, gam, eps)
    unfused = sg.skinny_gemm(normed, w2, b2, cfg2)
    return dict(x=x, w1=w1, r=r, gam=gam, eps=eps, hg=hg, h=h, fold=fold, y1=y1, h_ref=h_ref,
                folded=folded, unfused=unfused, w2=w2, b2=b2, cfg1=cfg1)


@pytest.mark.parametrize("m, use_dot", [(1, False), (3, False), (5, True)])
@pytest.mark.parametrize("bias", [False, True])
def test_folded_norm_matches_the_unfused_chain(m, use_dot, bias):
    """The producer's residual stream is exactly the norm kernel's; its h * g and per-program
    sums of squares are what they say; the consumer's result matches GEMM -> add+norm -> GEMM
    to bf16 rounding (one rounding moved: h * g before the product, rstd after)."""
    c = _fold_chain(m, hidden=96, n_out=40, k_in=64, use_dot=use_dot, bias=bias)
    assert torch.equal(c["h"], c["h_ref"])                   # same rounding of y + r
    hf = c["h"].float()
    torch.testing.assert_close(c["hg"], (hf * c["gam"].float()).to(torch.bfloat16),
                               rtol=0, atol=0)
    sq = c["fold"].sq
    bn = c["cfg1"]["block_n"]
    assert sq.shape == (m, triton.cdiv(96, bn))
    torch.testing.assert_close(sq.sum(1), (hf * hf).sum(1), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(sq[:, 0], (hf[:, :bn] ** 2).sum(1), rtol=1e-5, atol=1e-4)
    # the consumer: exact against its own fp32 reference ...
    rstd = torch.rsqrt((hf * hf).mean(1) + c["eps"])
    ref = c["hg"].float() @ c["w2"].float().T * rstd[:, None]
    if c["b2"] is not None:
        ref = ref + c["b2"].float()
    _close(c["folded"], ref.to(torch.bfloat16), torch.bfloat16)
    # ... and within bf16 rounding of the unfused chain
    scale = c["unfused"].float().abs().max().item() + 1.0
    torch.testing.assert_close(c["folded"].float(), c["unfused"].float(), rtol=0,
                               atol=4 * 2 ** -7 * scale)


def test_folded_norm_needs_one_split():
    x, w, _ = _operands(1, 32, 256, torch.bfloat16, False)
    r = torch.zeros(1, 32, dtype=torch.bfloat16, device=DEVICE)
    g = torch.ones(32, dtype=torch.bfloat16, device=DEVICE)
    cfg = dict(sg.default_config(1, 32, 256), split_k=2, block_k=64)
    with pytest.raises(AssertionError, match="single K split"):
        sg.skinny_gemm(x, w, None, cfg, add_norm=(r, g, 1e-6))


# ------------------------------------------------------------ gate | up with the activation
@pytest.mark.parametrize("m, n, k, use_dot", [(1, 24, 256, False), (3, 37, 200, False),
                                              (5, 48, 192, True), (16, 40, 256, True)])
@pytest.mark.parametrize("bias", [False, True])
def test_glu_epilogue_equals_product_then_activation(m, n, k, use_dot, bias):
    """glu=True: one launch gives exactly the gate | up product (same tiles, each half rounded
    once) followed by the activation kernel; also with a folded norm's row scale."""
    from kvflow.kernels.activation import silu_and_mul
    g = torch.Generator().manual_seed(m * n + k)
    x = torch.randn(m, k, generator=g).to(torch.bfloat16).to(DEVICE)
    w = (torch.randn(2 * n, k, generator=g) * k ** -0.5).to(torch.bfloat16).to(DEVICE)
    b = torch.randn(2 * n, generator=g).to(torch.bfloat16).to(DEVICE) if bias else None
    cfg = dict(block_n=16, block_k=64, split_k=1, num_warps=4, num_stages=2, use_dot=use_dot)
    fused = sg.skinny_gemm(x, w, b, cfg, glu=True)
    assert fused.shape == (m, n)
    # The plain product with the same tiles: its gate and up columns are the GLU program's.
    separate = silu_and_mul(sg.skinny_gemm(x, w, b, cfg))
    assert torch.equal(fused, separate)
    ref = F.silu(sg.skinny_gemm_ref(x, w, b)[:, :n].float()) * \
        sg.skinny_gemm_ref(x, w, b)[:, n:].float()
    _close(fused, ref.to(torch.bfloat16), torch.bfloat16)
    # As the consumer half of a folded norm: rows scaled by rstd before the activation.
    sq = (torch.rand(m, 3, generator=g) + 0.5).to(DEVICE)
    fold = sg.FoldedNorm(sq, 1e-5)
    fused = sg.skinny_gemm(x, w, b, cfg, row_scale=fold, glu=True)
    assert torch.equal(fused, silu_and_mul(sg.skinny_gemm(x, w, b, cfg, row_scale=fold)))


def test_glu_config_halves_the_tiles_and_needs_one_split(monkeypatch):
    table = {(28672, 4096, 1): dict(block_n=64, block_k=128, num_warps=2, num_stages=3,
                                    use_dot=True, split_k=1),
             (6144, 1024, 1): dict(block_n=8, block_k=512, num_warps=2, num_stages=2,
                                   use_dot=False, split_k=1),
             (2048, 1024, 1): dict(block_n=8, block_k=256, num_warps=2, num_stages=2,
                                   use_dot=False, split_k=2)}
    monkeypatch.setattr(sg, "choose_config", lambda m, n, k, device=None: table.get((n, k, m)))
    cuda = torch.device("cuda")
    assert sg.glu_config(1, 28672, 4096, cuda)["block_n"] == 32
    assert sg.glu_config(1, 6144, 1024, cuda)["block_n"] == 4
    assert sg.glu_config(1, 2048, 1024, cuda) is None           # split K: no epilogue
    assert sg.glu_config(1, 4096, 4096, cuda) is None           # cuBLAS wins there
    assert sg.glu_config(17, 6144, 1024, cuda) is None          # not a skinny product


@pytest.mark.parametrize("folded", [False, True])
def test_mlp_glu_path_equals_the_down_prologue_path(monkeypatch, folded):
    """LlamaMLP at decode: the GLU epilogue path and the SiLU-in-down path (KVFLOW_SKINNY_GLU=0)
    give identical outputs, with and without the folded input norm; the GLU path is taken."""
    from kvflow.layers import norm_fold
    from kvflow.layers.norm import RMSNorm
    from kvflow.models.llama import LlamaMLP
    monkeypatch.setattr(linear_mod, "_glu_device_ok", lambda x: True)
    monkeypatch.setattr(norm_fold, "_device_ok", lambda x: True)
    cfg = dict(block_n=16, block_k=64, split_k=1, num_warps=4, num_stages=2, use_dot=False)
    monkeypatch.setattr(sg, "choose_config", lambda m, n, k, device=None: dict(cfg))
    torch.manual_seed(0)
    outs = []
    for glu in ("1", "0"):
        monkeypatch.setenv("KVFLOW_SKINNY_GLU", glu)
        torch.manual_seed(0)
        mlp = LlamaMLP(64, 96).to(torch.bfloat16).to(DEVICE)
        o_proj = linear_mod.RowParallelLinear(64, 64).to(torch.bfloat16).to(DEVICE)
        norm = RMSNorm(64, 1e-5).to(torch.bfloat16).to(DEVICE)
        for p in (*mlp.parameters(), *o_proj.parameters(), *norm.parameters()):
            p.data.copy_(torch.randn_like(p, dtype=torch.float32).to(p.dtype) * 0.2)
        assert mlp.gate_up_proj.skinny_glu == (glu == "1")
        calls = []
        real = sg.skinny_gemm
        monkeypatch.setattr(sg, "skinny_gemm",
                            lambda *a, **kw: calls.append(kw.get("glu", False)) or real(*a, **kw))
        x = torch.randn(2, 64).to(torch.bfloat16).to(DEVICE)
        res = torch.randn(2, 64).to(torch.bfloat16).to(DEVICE)
        if folded:   # o_proj -> add + norm -> gate | up, as a decoder layer runs it
            h, _ = o_proj(x, add_norm=(res, norm, mlp.gate_up_proj))
            assert h.fold is not None
        else:
            h = x
        outs.append(mlp(h))
        monkeypatch.setattr(sg, "skinny_gemm", real)
        assert any(calls) == (glu == "1")
    assert torch.equal(outs[0], outs[1])


def test_glu_follows_the_skinny_gemm_switch(monkeypatch):
    """KVFLOW_SKINNY_GEMM=0 turns the skinny GEMM off everywhere, the GLU epilogue included."""
    from kvflow.layers.linear import MergedColumnParallelLinear
    monkeypatch.setattr(linear_mod, "_glu_device_ok", lambda x: True)
    cfg = dict(block_n=16, block_k=64, split_k=1, num_warps=4, num_stages=2, use_dot=False)
    monkeypatch.setattr(sg, "choose_config", lambda m, n, k, device=None: dict(cfg))
    x = torch.randn(2, 64).to(torch.bfloat16).to(DEVICE)
    for switch, used in (("1", True), ("0", False)):
        monkeypatch.setenv("KVFLOW_SKINNY_GEMM", switch)
        layer = MergedColumnParallelLinear(64, [32, 32]).to(torch.bfloat16).to(DEVICE)
        layer.weight.data.normal_()
        assert (layer.forward_glu(x) is not None) == used
