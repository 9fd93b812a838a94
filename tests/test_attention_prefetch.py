"""Decode-like attention launches load their first KV tile before the PDL wait
(kernels/attention.py, PREFETCH): the tile is used only when it lies wholly before the step's
new tokens, and then through the same arithmetic in the same tile order, so the output must be
bit-identical to the launch without the prefetch, and match the torch reference.

Under TRITON_INTERPRET=1 there is no PDL (the wait is a no-op), so these tests check which tile
is prefetched and that it is used exactly once; the ordering itself is the PDL convention's
(kernels/pdl.py) and is exercised on the device by the GPU suite and the benchmarks."""
import pytest
import torch

pytest.importorskip("triton")

from kvflow.kernels import attention as attn_mod  # noqa: E402
from kvflow.kernels import choose_config, ref_paged_attention, unified_attention  # noqa: E402
from tests.conftest import kernel_device  # noqa: E402
from tests.test_kernels import _close, make_paged_batch  # noqa: E402

DEVICE = kernel_device(attn_mod._attention_kernel)


def _run(monkeypatch, prefetch, q_lens, seq_lens, H, KV, D, block_size, dtype, **kw):
    monkeypatch.setattr(attn_mod, "_PREFETCH", prefetch)
    query, kv, qsl, sl, bt = make_paged_batch(q_lens, seq_lens, H, KV, D, block_size, dtype)
    out = torch.full_like(query, float("nan"))
    unified_attention(query, kv[0], kv[1], qsl, sl, bt, max(q_lens), max(seq_lens), D ** -0.5,
                      out=out, **kw)
    return out, (query, kv, qsl, sl, bt)


# Contexts shorter than one tile (no prefetch), exactly one tile plus the new token, many
# tiles; block sizes for which a 64-token tile spans several blocks (16) or lies in one (64).
@pytest.mark.parametrize("block_size", [16, 64])
@pytest.mark.parametrize("num_splits", [1, 2, 3, 16])
def test_prefetch_bit_identical_decode(monkeypatch, block_size, num_splits):
    q_lens, seq_lens = [1, 1, 1, 1, 1], [20, 65, 64, 200, 333]
    on, inputs = _run(monkeypatch, True, q_lens, seq_lens, 4, 2, 32, block_size,
                      torch.bfloat16, num_splits=num_splits)
    off, _ = _run(monkeypatch, False, q_lens, seq_lens, 4, 2, 32, block_size, torch.bfloat16,
                  num_splits=num_splits)
    cfg = choose_config(5, 5, 4, 2, 32, 1, 333, torch.bfloat16, num_splits=num_splits)
    assert cfg.direct and cfg.block_m <= 64 and cfg.block_n == 64   # the prefetching launch
    assert torch.equal(on.view(torch.uint8), off.view(torch.uint8))
    query, kv, qsl, sl, bt = inputs
    _close(on, ref_paged_attention(query, kv[0], kv[1], qsl, sl, bt, 32 ** -0.5), torch.bfloat16)


def test_prefetch_short_chunks_and_padding(monkeypatch):
    """Decode-like launches with short chunks over a prefix (the new tokens start inside or
    after the first tile) and a padding request (q_len 0): the prefetch only where the whole
    tile is context."""
    q_lens, seq_lens = [3, 1, 0, 4], [66, 130, 0, 67]
    outs = [_run(monkeypatch, p, q_lens, seq_lens, 2, 1, 32, 16, torch.float32)[0]
            for p in (True, False)]
    n = sum(q_lens)
    assert torch.equal(outs[0][:n], outs[1][:n])
