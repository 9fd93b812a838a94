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


def _near(a, b, norm):
    """Kernel vs torch reference: bit-equal without the norm; with it the fp32 sum of squares
    is reduced in another order (torch's mean), so a value may differ by one rounding step."""
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
    assert torch.equal(out, seq)
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)
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
    assert torch.equal(out, seq) and torch.equal(kc, kc2) and torch.equal(vc, vc2)
    empty = qk_norm_rope_cache(q[:0], k[:0], v[:0], pos[:0], cs, True, qw, kw, 1e-6, kc, vc,
                               slots[:0])
    assert empty.shape == (0, 2, 64)
