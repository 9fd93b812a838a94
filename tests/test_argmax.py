"""The two-stage Triton argmax (kvflow/kernels/argmax.py) against torch.argmax: vocabularies
that are and are not multiples of the chunk, ties (lowest index wins), -inf rows, NaN (the
first NaN wins, as in torch), bf16 input, strided rows, batch sizes. Under TRITON_INTERPRET=1
without a GPU (see conftest), compiled on one."""
import pytest
import torch

pytest.importorskip("triton")

from kvflow.kernels.argmax import _argmax_chunks_kernel, argmax_chunk, argmax_rows  # noqa: E402
from kvflow.sample.sampler import row_argmax  # noqa: E402
from tests.conftest import kernel_device  # noqa: E402

DEVICE = kernel_device(_argmax_chunks_kernel)


def _check(x, chunk=None):
    got = argmax_rows(x, chunk)
    ref = x.cpu().float().argmax(dim=-1)
    assert got.dtype == torch.int64 and got.shape == ref.shape
    assert torch.equal(got.cpu(), ref), (got, ref)


@pytest.mark.parametrize("v", [1, 15, 16, 1000, 1024, 4097, 128256])
@pytest.mark.parametrize("b", [1, 3, 8])
def test_argmax_matches_torch(b, v):
    g = torch.Generator().manual_seed(b * 7 + v)
    x = (torch.randn(b, v, generator=g) * 5).to(DEVICE)
    _check(x)
    if 16 < v < 10000:                           # (the interpreter is slow per program)
        _check(x, chunk=16)                      # many chunks, a partial last one


def test_argmax_ties_inf_and_nan():
    v = 300
    x = torch.randn(7, v, generator=torch.Generator().manual_seed(0))
    x[0, [5, 40, 299]] = 50.0                    # ties within and across chunks -> 5
    x[1] = 3.0                                   # all tied -> 0
    x[2] = float("-inf")                         # all -inf -> 0
    x[3, :] = float("-inf")
    x[3, 257] = -1e30                            # one finite value in the last chunk
    x[4, [17, 200]] = float("nan")               # NaN counts as the max -> 17
    x[4, 3] = float("inf")
    x[5, 250] = float("inf")                     # +inf wins over finite values
    x[6, [100, 33]] = float("nan")               # first NaN by index -> 33
    x = x.to(DEVICE)
    ref = x.cpu().argmax(dim=-1)
    assert ref.tolist() == [5, 0, 0, 257, 17, 250, 33]
    for chunk in (None, 16, 64, 256):
        _check(x, chunk)


def test_argmax_bf16_strided_and_empty():
    g = torch.Generator().manual_seed(3)
    x = torch.randint(-3, 4, (5, 2 * 777), generator=g).to(DEVICE, torch.bfloat16)  # ties
    _check(x, 64)
    _check(x[:, ::2], 64)                        # stride 2 rows: copied contiguous
    _check(x[:, :500].float().t().contiguous().t(), 64)   # column-major [5, 500]
    assert argmax_rows(x[:0]).shape == (0,)


def test_argmax_chunk_sizes_and_sampler_dispatch():
    assert argmax_chunk(1, 128256) == 1024        # ~126 programs for Llama 3's vocabulary
    assert argmax_chunk(64, 151936) == 8192
    x = torch.randn(2, 50)
    assert torch.equal(row_argmax(x), x.argmax(-1))   # CPU tensors: torch


def test_sampler_row_limit_matches_the_kernel():
    """The sampler keeps its own copy of the kernel's row limit (it must not import Triton)."""
    import kvflow.kernels.argmax as am
    import kvflow.sample.sampler as sampler_mod
    assert sampler_mod._ARGMAX_MAX_ROWS == am.ARGMAX_MAX_ROWS
