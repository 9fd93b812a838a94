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


# ----------------------------------------------------------------- sampling (Gumbel-max)
def _sample_counts(logits_row, temps, n, seed, chunk=None):
    from kvflow.kernels.argmax import sample_rows
    rows = torch.tensor(logits_row).repeat(n * len(temps), 1).to(DEVICE)
    t = torch.tensor([t for t in temps for _ in range(n)], dtype=torch.float32).to(DEVICE)
    ids = sample_rows(rows, t, seed, chunk).cpu()
    return [torch.bincount(ids[i * n:(i + 1) * n], minlength=len(logits_row)).tolist()
            for i in range(len(temps))]


def test_sample_rows_follows_softmax_of_tempered_logits():
    """Chi-square against softmax(x / T) per row temperature; a -inf token is never drawn;
    and the same counts reject the untempered distribution (the test can fail)."""
    from tests.test_sampler import CHI2_999, DIST_LOGITS, chi2, ref_probs
    from kvflow.sampling_params import SamplingParams as SP
    logits = DIST_LOGITS + [float("-inf")]
    n = 1000                     # rows are interpreter programs: ~6 ms each on CPU
    temps = (0.7, 1.3)
    for t, counts in zip(temps, _sample_counts(logits, temps, n, seed=1234)):
        assert counts[-1] == 0
        expected = ref_probs(DIST_LOGITS, SP(temperature=t)) + [0.0]
        stat, dof = chi2(counts, expected)
        assert stat < CHI2_999[dof], (t, counts, expected, stat)
        wrong = ref_probs(DIST_LOGITS, SP(temperature=1.0)) + [0.0]
        assert chi2(counts, wrong)[0] > CHI2_999[dof]


def test_sample_rows_seed_and_chunking():
    """A row's draw depends on the seed and its row index, not on how the vocabulary is
    chunked; another seed draws differently."""
    from kvflow.kernels.argmax import sample_rows
    g = torch.Generator().manual_seed(5)
    x = torch.randn(16, 1000, generator=g).to(DEVICE)
    t = torch.full((16,), 1.0).to(DEVICE)
    a = sample_rows(x, t, 77)
    assert torch.equal(a, sample_rows(x, t, 77, chunk=64))
    assert not torch.equal(a, sample_rows(x, t, 78))
    with pytest.raises(AssertionError):
        sample_rows(x, t, 2 ** 31)


def test_sampler_fused_path(monkeypatch):
    """The sampler's fused route (CUDA in serving; without a GPU forced onto the interpreter's
    CPU tensors): greedy rows stay exact argmax, random rows follow the tempered distribution,
    the caller's logits are untouched, and rows with top-k keep the torch path."""
    import kvflow.kernels.argmax as am
    import kvflow.sample.sampler as sampler_mod
    from tests.test_sampler import CHI2_999, DIST_LOGITS, chi2, ref_probs
    from kvflow.sample import Sampler, SamplingMetadata
    from kvflow.sampling_params import SamplingParams as SP
    torch.manual_seed(0)                          # the kernel's seed comes from it
    calls = []
    real = am.sample_rows
    monkeypatch.setattr(am, "sample_rows", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(sampler_mod, "_triton_device", lambda x: True)
    sampler = Sampler()
    V = len(DIST_LOGITS)

    def meta(params):
        n = len(params)
        return SamplingMetadata.build(params=params, output_token_ids=[[]] * n,
                                      prompt_token_ids=[[]] * n, generators={}, vocab_size=V,
                                      device=DEVICE)

    n = 700
    params = [SP(temperature=0.0)] * 4 + [SP(temperature=0.7)] * n
    logits = torch.tensor(DIST_LOGITS).repeat(len(params), 1)
    logits[:4] = torch.randn(4, V)
    logits = logits.to(DEVICE)
    before = logits.clone()
    out = sampler(logits, meta(params)).sampled_token_ids.cpu()
    assert calls and torch.equal(logits, before)
    assert torch.equal(out[:4], before[:4].argmax(-1).cpu())
    counts = torch.bincount(out[4:], minlength=V).tolist()
    stat, dof = chi2(counts, ref_probs(DIST_LOGITS, SP(temperature=0.7)))
    assert stat < CHI2_999[dof]
    calls.clear()
    sampler(logits[:8], meta([SP(temperature=0.7, top_k=3)] * 8))
    assert not calls


def test_sampler_row_limit_matches_the_kernel():
    """The sampler keeps its own copy of the kernel's row limit (it must not import Triton)."""
    import kvflow.kernels.argmax as am
    import kvflow.sample.sampler as sampler_mod
    assert sampler_mod._ARGMAX_MAX_ROWS == am.ARGMAX_MAX_ROWS
