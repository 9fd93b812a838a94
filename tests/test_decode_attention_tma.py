"""The TMA decode-attention kernel (kvflow/kernels/decode_attention_tma.py) against the torch
reference: GQA groups of 1-8 query heads, KV blocks of 16-64 slots, contexts that fill their
last block and ones that end inside it (with NaN in the unwritten slots), one-slot contexts,
shuffled block tables and both grid orders. Runs in Triton's interpreter on CPU, compiled on
the GPU."""
from __future__ import annotations

import pytest
import torch

from kvflow.kernels import decode_attention_tma as dat
from kvflow.kernels.reference import ref_paged_attention
from tests.conftest import kernel_device

DEV = kernel_device(dat._decode_tma_kernel)


def _case(b, h, kv, d, block, lens, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    per_req = max(-(-n // block) for n in lens)
    num_blocks = b * per_req + 3
    k = torch.randn(num_blocks, block, kv, d, generator=g).to(dtype)
    v = torch.randn(num_blocks, block, kv, d, generator=g).to(dtype)
    # Slots past each request's context are never written by the engine: NaN here, so a kernel
    # that lets them into the sums fails.
    bt = torch.randperm(num_blocks, generator=g)[:b * per_req].view(b, per_req).to(torch.int32)
    for i, n in enumerate(lens):
        for p in range(n, per_req * block):
            blk = bt[i, p // block]
            k[blk, p % block] = float("nan")
            v[blk, p % block] = float("nan")
    q = torch.randn(b, h, d, generator=g).to(dtype)
    seq = torch.tensor(lens, dtype=torch.int32)
    return [t.to(DEV) for t in (q, k, v, seq, bt)]


@pytest.mark.parametrize("h,kv,d,block", [(8, 2, 64, 16), (32, 8, 128, 64), (4, 4, 64, 32),
                                          (16, 2, 128, 16)])
@pytest.mark.parametrize("heads_first", [True, False])
def test_matches_reference(h, kv, d, block, heads_first):
    lens = [1, block, block + 1, 3 * block - 5, 2 * block]
    q, k, v, seq, bt = _case(len(lens), h, kv, d, block, lens, torch.bfloat16)
    scale = d ** -0.5
    got = dat.decode_attention_tma(q, k, v, seq, bt, scale, heads_first=heads_first)
    qsl = torch.arange(len(lens) + 1, dtype=torch.int32, device=q.device)
    ref = ref_paged_attention(q.float(), k.float(), v.float(), qsl, seq, bt, scale)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.float(), ref, atol=2e-2, rtol=2e-2)


def test_supported_shapes():
    q = torch.zeros(2, 8, 128, dtype=torch.bfloat16)
    assert dat.supported(q, torch.zeros(4, 64, 2, 128, dtype=torch.bfloat16))
    assert not dat.supported(q.float(), torch.zeros(4, 64, 2, 128))          # fp32
    assert not dat.supported(q, torch.zeros(4, 24, 2, 128, dtype=torch.bfloat16))  # block 24
    assert not dat.supported(q[..., :96], torch.zeros(4, 64, 2, 96, dtype=torch.bfloat16))


@pytest.mark.parametrize("heads_first", [True, False])
def test_request_order_permutes_programs_only(heads_first):
    """With request_order, grid row i serves request order[i]: each program computes what it
    computed without the order, so the output is bit-identical to the unordered launch."""
    lens = [70, 1, 130, 64, 65, 200]
    q, k, v, seq, bt = _case(len(lens), 8, 2, 64, 64, lens, torch.bfloat16, seed=3)
    order = torch.argsort(seq, descending=True, stable=True).to(torch.int32)
    assert not torch.equal(order.cpu(), torch.arange(len(lens), dtype=torch.int32))
    plain = dat.decode_attention_tma(q, k, v, seq, bt, 0.125, heads_first=heads_first)
    ordered = dat.decode_attention_tma(q, k, v, seq, bt, 0.125, heads_first=heads_first,
                                       request_order=order)
    assert torch.isfinite(plain).all()
    assert torch.equal(plain, ordered)
