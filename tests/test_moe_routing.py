"""MoE routing kernels (kvflow/kernels/moe_routing.py) against their torch references: top-k vs
select_experts, the fused router GEMM + top-k vs ReplicatedLinear + top-k, the expert alignment vs fused_moe.align_by_expert (exactly), the combine vs an
in-order fp32 sum (bit for bit).

Without a GPU they run under Triton's CPU interpreter (TRITON_INTERPRET=1, set by conftest
before triton is first imported) on small shapes; with a CUDA device, compiled on it.
"""
import pytest
import torch

pytest.importorskip("triton")

from kvflow.kernels.fused_moe import align_by_expert  # noqa: E402
from kvflow.kernels.moe_routing import (  # noqa: E402
    _align_kernel, align_by_expert_triton, moe_sum, router_topk, router_topk_config, topk_softmax)
from kvflow.layers.linear import ReplicatedLinear  # noqa: E402
from kvflow.layers.moe import select_experts  # noqa: E402
from tests.conftest import kernel_device  # noqa: E402

DEVICE = kernel_device(_align_kernel)


def _torch_select(logits, k, renorm, scoring="softmax"):
    """select_experts' torch path (on CUDA select_experts itself dispatches to topk_softmax)."""
    return select_experts(logits.cpu(), k, renorm, scoring)


# ------------------------------------------------------------------------------------- top-k
@pytest.mark.parametrize("e,k", [(4, 1), (8, 2), (5, 3), (16, 4), (128, 8)])
@pytest.mark.parametrize("renorm", [True, False])
def test_topk_softmax_matches_select_experts(e, k, renorm):
    g = torch.Generator().manual_seed(e * 10 + k)
    for t in (1, 7, 33):
        logits = torch.randn(t, e, generator=g) * 3                # no ties (continuous)
        w, ids = topk_softmax(logits.to(DEVICE), k, renorm)
        rw, rids = _torch_select(logits, k, renorm)
        assert w.dtype == torch.float32 and ids.dtype == rids.dtype == torch.int64
        assert torch.equal(ids.cpu(), rids)
        torch.testing.assert_close(w.cpu(), rw, atol=1e-6, rtol=1e-5)


def test_topk_bf16_logits_and_sigmoid_scoring():
    """bf16 router logits (softmax in fp32 as select_experts), and Llama 4's sigmoid scoring:
    top-k of the raw logits, weight sigmoid(logit), renormalize ignored."""
    g = torch.Generator().manual_seed(1)
    t, e = 19, 16
    # Distinct in bf16: a permutation of multiples of 1/16.
    logits = torch.stack([torch.randperm(e, generator=g) for _ in range(t)]).float() / 16 - 0.5
    logits = logits.bfloat16()
    for k, renorm, scoring in [(2, True, "softmax"), (1, False, "sigmoid"), (3, True, "sigmoid")]:
        w, ids = topk_softmax(logits.to(DEVICE), k, renorm, scoring)
        rw, rids = _torch_select(logits, k, renorm, scoring)
        assert torch.equal(ids.cpu(), rids)
        torch.testing.assert_close(w.cpu(), rw, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="scoring"):
        topk_softmax(logits.to(DEVICE), 2, True, "relu")
    w, ids = topk_softmax(logits[:0].to(DEVICE), 2, True)          # idle step
    assert w.shape == ids.shape == (0, 2)


def test_topk_ties_pick_the_lowest_expert():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0], [2.0, 2.0, 2.0, 2.0, 2.0]])
    w, ids = topk_softmax(logits.to(DEVICE), 3, True)
    assert ids.tolist() == [[1, 2, 4], [0, 1, 2]]
    torch.testing.assert_close(w.cpu(), torch.full((2, 3), 1 / 3))


# ---------------------------------------------------------------------- fused router + top-k
def _router(e, h, dtype, w):
    gate = ReplicatedLinear(h, e, bias=False).to(DEVICE, dtype)
    gate.weight.data.copy_(w)
    return gate


def _exact_data(g, t, e, h, dtype):
    """Multiples of 1/4 times multiples of 1/8, |sum| <= h/2: every partial sum is exact in fp32,
    so any GEMM order gives the same fp32 logits and the same rounding to dtype. Small integers
    also make many tied logits (more after rounding to bf16/fp16)."""
    x = (torch.randint(-4, 5, (t, h), generator=g).float() / 4).to(DEVICE, dtype)   # [T, H]
    w = (torch.randint(-4, 5, (e, h), generator=g).float() / 8).to(DEVICE, dtype)   # [E, H]
    return x, w


def _check_fused(x, gate, k, renorm, scoring, config=None):
    """Fused vs today's unfused GPU path (router linear, then topk_softmax): bit for bit; and vs
    select_experts' torch ops: the same logits selected (torch.topk may order tied experts
    differently), close weights."""
    w, ids = router_topk(x, gate.weight, k, renorm, scoring, config=config)
    logits = gate(x)                                                         # [T, E] dtype
    uw, uids = topk_softmax(logits, k, renorm, scoring)
    assert w.dtype == torch.float32 and ids.dtype == torch.int64
    assert torch.equal(ids, uids)
    if w.is_cuda:
        # Same selection code, but compiled into two kernels: the GPU compiler may contract
        # the softmax / renormalisation arithmetic differently (last-bit differences).
        torch.testing.assert_close(w, uw, atol=0, rtol=1e-6)
    else:
        assert torch.equal(w, uw)
    rw, rids = select_experts(logits.cpu(), k, renorm, scoring)
    assert torch.equal(logits.cpu().gather(1, ids.cpu()), logits.cpu().gather(1, rids))
    torch.testing.assert_close(w.cpu(), rw, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("e", [8, 16, 128])
@pytest.mark.parametrize("scoring,renorm", [("softmax", True), ("softmax", False),
                                            ("sigmoid", False)])
def test_router_topk_bit_equal_to_unfused(dtype, e, scoring, renorm):
    """T across the GEMV (<= 4) and tl.dot forms, H not a multiple of the H tile, one and
    several H chunks, the expert split (several programs + ticket) forced on and off."""
    g = torch.Generator().manual_seed(e)
    for t, h in [(1, 64), (3, 200), (4, 96), (5, 200), (37, 72)]:
        x, wt = _exact_data(g, t, e, h, dtype)
        gate = _router(e, h, dtype, wt)
        dot = router_topk_config(t, e, h, dtype)["DOT"]
        # Tile overrides: several H chunks (the GEMV form's prefetch); several expert slices.
        cfgs = [None, {"BLOCK_H": 16 if e <= 16 else 64}] + (
            [{"BLOCK_E": 16 if dot else 8, "BLOCK_H": 64}] if e > (16 if dot else 8) else [])
        for k in sorted({1, 2, min(8, e)}):
            if scoring == "sigmoid" and k > 2:
                continue
            for cfg in cfgs:
                _check_fused(x, gate, k, renorm, scoring, cfg)


def test_router_topk_ties_and_random_inputs():
    """Experts with identical router rows tie exactly: the lowest id wins, in both paths. Random
    bf16 data (sums not exact): the same on CPU; on a GPU the two GEMMs add in different orders,
    which can move a logit across a bf16 rounding boundary (compare ids and close weights)."""
    e, h = 16, 128
    g = torch.Generator().manual_seed(5)
    x, wt = _exact_data(g, 6, e, h, torch.bfloat16)
    x[:, 0] = 1
    wt[2] = 0
    wt[2, 0] = 32                           # logit 32: far above the others' (|sum| ~ 4)
    wt[5] = wt[9] = wt[12] = wt[2]          # experts 2, 5, 9, 12 tie for the top
    gate = _router(e, h, torch.bfloat16, wt)
    for t in (1, 6):
        _check_fused(x[:t], gate, 3, True, "softmax")
        w, ids = router_topk(x[:t], gate.weight, 3, True)
        assert (ids.cpu() == torch.tensor([2, 5, 9])).all()
        assert (w.cpu() == 1 / 3).all()
    for e, t in [(8, 1), (128, 2), (16, 20)]:
        x = torch.randn(t, 256, generator=g).to(DEVICE, torch.bfloat16)
        wt = (torch.randn(e, 256, generator=g) / 16).to(DEVICE, torch.bfloat16)
        gate = _router(e, 256, torch.bfloat16, wt)
        w, ids = router_topk(x, gate.weight, 2, True)
        uw, uids = topk_softmax(gate(x), 2, True)
        assert torch.equal(ids, uids)
        torch.testing.assert_close(w, uw, atol=1e-2, rtol=1e-2)
    assert router_topk(x[:0], gate.weight, 2, True)[0].shape == (0, 2)


# --------------------------------------------------------------------------------- alignment
@pytest.mark.parametrize("e", [4, 8, 16, 128])
@pytest.mark.parametrize("block_m", [16, 32, 64])
def test_align_matches_torch_reference(e, block_m):
    """Every (T, K), with and without remote ids (== E, expert parallel): identical outputs."""
    g = torch.Generator().manual_seed(e + block_m)
    for t in (1, 2, 7, 33, 130):
        for k in (1, 2, 4):
            for hi in (e, e + 1):                                    # e + 1: some ids remote
                ids = torch.randint(0, hi, (t, k), generator=g).to(DEVICE)
                pairs, blocks = align_by_expert_triton(ids, e, block_m)
                ref_pairs, ref_blocks = align_by_expert(ids, e, block_m)
                assert pairs.dtype == blocks.dtype == torch.int32
                assert torch.equal(pairs, ref_pairs), (t, k, hi)
                assert torch.equal(blocks, ref_blocks), (t, k, hi)


@pytest.mark.parametrize("fill", ["one_expert", "all_remote", "last_expert"])
def test_align_degenerate_routings(fill):
    """All pairs on one expert (a group longer than a chunk), or none local at all."""
    t, k, e, block_m = 300, 2, 8, 16
    value = {"one_expert": 3, "all_remote": e, "last_expert": e - 1}[fill]
    ids = torch.full((t, k), value, dtype=torch.int64, device=DEVICE)
    pairs, blocks = align_by_expert_triton(ids, e, block_m)
    ref_pairs, ref_blocks = align_by_expert(ids, e, block_m)
    assert torch.equal(pairs, ref_pairs) and torch.equal(blocks, ref_blocks)
    if fill == "all_remote":
        assert (pairs == t * k).all() and (blocks == e).all()


def test_align_int32_strided_and_empty_input():
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 9, (33, 4), generator=g).to(DEVICE, torch.int32)
    for sel in (ids, ids[:, ::2]):                                      # [33, 4], [33, 2] strided
        for got, ref in zip(align_by_expert_triton(sel, 8, 16), align_by_expert(sel, 8, 16)):
            assert torch.equal(got, ref)
    pairs, blocks = align_by_expert_triton(ids[:0], 8, 16)             # idle step
    ref_pairs, ref_blocks = align_by_expert(ids[:0], 8, 16)
    assert torch.equal(pairs, ref_pairs) and torch.equal(blocks, ref_blocks)


# ----------------------------------------------------------------------------------- combine
def _sum_in_order(x: torch.Tensor, dtype) -> torch.Tensor:
    """[T, K, H] -> [T, H]: k = 0..K-1 added in order in fp32, rounded once (torch's own
    sum(1) may reorder on CUDA, which shows in fp32's last bit)."""
    acc = x[:, 0].float()
    for j in range(1, x.shape[1]):
        acc = acc + x[:, j].float()
    return acc.to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_moe_sum_is_bit_equal_to_ordered_sum(dtype):
    g = torch.Generator().manual_seed(2)
    for t, k, h in [(1, 1, 50), (5, 2, 64), (3, 3, 1500), (4, 8, 96)]:
        out = (torch.randn(t * k, h, generator=g) * 4).to(DEVICE, dtype)   # [T*K, H] per pair
        got = moe_sum(out.view(t, k, h), dtype)
        ref = _sum_in_order(out.view(t, k, h), dtype)
        assert got.dtype == dtype and got.shape == (t, h)
        assert torch.equal(got, ref), (t, k, h, (got.float() - ref.float()).abs().max())
    strided = torch.randn(4, 2, 2 * 40, generator=g).to(DEVICE, dtype)[..., ::2]   # stride 2
    assert torch.equal(moe_sum(strided, dtype), _sum_in_order(strided, dtype))
    assert moe_sum(strided[:0], dtype).shape == (0, 40)
