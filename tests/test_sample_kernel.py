"""The inverse-CDF sampling kernel (kvflow/kernels/sampling.py): draws follow softmax(x / T)
(chi-square, one chunk and many), masked entries are never drawn, NaN / all -inf / +inf rows,
a row's draw depends only on its logits, its temperature and seed + row (not the batch, the
chunking or the input's dtype layout), and the sampler's fused route. Under TRITON_INTERPRET=1
without a GPU (see conftest), compiled on one."""
import pytest
import torch

pytest.importorskip("triton")

from kvflow.kernels.sampling import (CHUNKS, _sample_chunks_kernel, sample_chunk,  # noqa: E402
                                     sample_rows)
from kvflow.sampling_params import SamplingParams as SP  # noqa: E402
from tests.conftest import kernel_device  # noqa: E402
from tests.test_sampler import CHI2_999, DIST_LOGITS, chi2, ref_probs  # noqa: E402

DEVICE = kernel_device(_sample_chunks_kernel)
NEG = float("-inf")


def _temps(temps, n):
    return torch.tensor([t for t in temps for _ in range(n)], dtype=torch.float32).to(DEVICE)


def _counts(ids, n, k, v):
    return [torch.bincount(ids[i * n:(i + 1) * n], minlength=v).tolist() for i in range(k)]


@pytest.mark.parametrize("chunk", [None, 64])
def test_matches_the_torch_reference_for_given_uniforms(chunk):
    """With the uniforms given, each row's token is the reference's inverse-CDF pick
    (kernels/reference.py, float64): the kernel's token j must bracket u (cdf[j-1] <= u * S <=
    cdf[j], to float32 rounding of S), and rows of NaN, -inf and +inf follow the same rules."""
    from kvflow.kernels.reference import ref_sample_rows
    g = torch.Generator().manual_seed(11)
    b, v = 24, 700
    x = torch.randn(b, v, generator=g) * 3
    x[:, ::7] = NEG                                # masked tokens
    x[3, 650:] = 40.0                              # mass in the last (partial) chunk
    x[4, 5] = float("nan")
    x[5] = NEG
    x[6, [9, 400]] = float("inf")
    t = torch.rand(b, generator=g) + 0.3
    u = torch.rand(b, generator=g)
    u[0], u[1] = 0.0, 1.0 - 2 ** -24               # both ends of [0, 1)
    got = sample_rows(x.to(DEVICE), t.to(DEVICE), 5, chunk=chunk, uniforms=u.to(DEVICE)).cpu()
    ref = ref_sample_rows(x, t, u)
    assert got[4] == ref[4] == 5 and got[5] == ref[5] == 0 and int(got[6]) in (9, 400)
    assert int(got[6]) == int(ref[6])
    y = x.double() / t.double()[:, None]
    for r in [r for r in range(b) if r not in (4, 5, 6)]:
        w = torch.exp(y[r] - y[r].max())
        cdf = torch.cumsum(w, 0) / w.sum()
        j = int(got[r])
        lo = float(cdf[j - 1]) if j else 0.0
        assert w[j] > 0 and lo - 1e-5 <= float(u[r]) <= float(cdf[j]) + 1e-5, (r, j, u[r])
    assert (got == ref).float().mean() >= 0.9


def test_draws_follow_softmax_of_tempered_logits():
    """One chunk: chi-square against softmax(x / T) per row temperature; the -inf entry is
    never drawn; the same counts reject the untempered distribution (the test can fail)."""
    row = DIST_LOGITS + [NEG]
    n, temps = 700, (0.7, 1.3)         # rows are interpreter programs: a few ms each on CPU
    x = torch.tensor(row).repeat(n * len(temps), 1).to(DEVICE)
    ids = sample_rows(x, _temps(temps, n), seed=1234).cpu()
    for t, counts in zip(temps, _counts(ids, n, len(temps), len(row))):
        assert counts[-1] == 0
        stat, dof = chi2(counts[:-1], ref_probs(DIST_LOGITS, SP(temperature=t)))
        assert stat < CHI2_999[dof], (t, counts, stat)
        assert chi2(counts[:-1], ref_probs(DIST_LOGITS, SP(temperature=1.0)))[0] > CHI2_999[dof]


def test_draws_across_chunks():
    """Eight tokens, each in its own chunk of 8 at a different offset, the rest masked: the
    chunk is picked by its mass and the token inside it by the cumulative sum."""
    v, chunk = 72, 8
    x = torch.full((v,), NEG)
    pos = [8 * i + i for i in range(len(DIST_LOGITS))]      # chunk i, offset i
    x[pos] = torch.tensor(DIST_LOGITS)
    n = 500
    ids = sample_rows(x.repeat(n, 1).to(DEVICE), _temps((0.9,), n), seed=7, chunk=chunk).cpu()
    counts = torch.bincount(ids, minlength=v)
    assert counts.sum() == n and counts[pos].sum() == n      # never a masked entry
    stat, dof = chi2(counts[pos].tolist(), ref_probs(DIST_LOGITS, SP(temperature=0.9)))
    assert stat < CHI2_999[dof], (counts[pos].tolist(), stat)


def test_special_rows():
    """NaN -> the first NaN (as the argmax); all -inf -> 0; +inf entries share the mass and
    nothing else is drawn; a single finite entry is always drawn; a dominant entry in the last
    chunk of a vocabulary that is not a multiple of the chunk."""
    v, n = 50, 40
    x = torch.randn(5, v, generator=torch.Generator().manual_seed(0))
    x[0, [31, 12]] = float("nan")
    x[1] = NEG
    x[2, [3, 44]] = float("inf")
    x[3] = NEG
    x[3, 17] = -1e30
    x[4, 49] = 1e4
    rows = x.repeat(n, 1).to(DEVICE)                          # row r of copy c at 5 * c + r
    for chunk in (None, 16):
        ids = sample_rows(rows, torch.ones(5 * n).to(DEVICE), seed=3, chunk=chunk).cpu()
        ids = ids.view(n, 5)
        assert (ids[:, 0] == 12).all() and (ids[:, 1] == 0).all()
        assert (ids[:, 3] == 17).all() and (ids[:, 4] == 49).all()
        inf_draws = ids[:, 2].tolist()
        assert set(inf_draws) == {3, 44}, inf_draws


def test_row_draw_depends_on_seed_and_row_only():
    """Row r uses key seed + r: the same row alone with seed + r draws the same token; the
    chunking, a strided or bf16-cast copy of the same values change nothing; another seed
    draws differently."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(16, 1000, generator=g).to(DEVICE)
    t = torch.full((16,), 1.0).to(DEVICE)
    a = sample_rows(x, t, 77)
    assert a.dtype == torch.int64 and a.shape == (16,)
    assert torch.equal(a, sample_rows(x, t, 77, chunk=64))
    assert all(int(sample_rows(x[r:r + 1], t[r:r + 1], 77 + r)) == int(a[r]) for r in (0, 5, 15))
    wide = torch.zeros(16, 2000).to(DEVICE)
    wide[:, ::2] = x
    assert torch.equal(a, sample_rows(wide[:, ::2], t, 77))
    xb = x.to(torch.bfloat16)
    assert torch.equal(sample_rows(xb, t, 77), sample_rows(xb.float(), t, 77))
    assert not torch.equal(a, sample_rows(x, t, 78))
    assert sample_rows(x[:0], t[:0], 1).shape == (0,)
    with pytest.raises(AssertionError):
        sample_rows(x, t, 2 ** 31)


def test_warm_up_chunks_cover_every_pick():
    """The engine's warm-up compiles sampling.CHUNKS: every chunk sample_rows picks is one."""
    for v in (384, 32000, 128256, 151936, 262144):
        for b in (1, 2, 7, 32, 140, 256, 1000, 4096):
            assert sample_chunk(b, v) in CHUNKS, (b, v)


def test_sampler_fused_path(monkeypatch):
    """The sampler's fused route (CUDA in serving; without a GPU forced onto the interpreter's
    CPU tensors): greedy rows stay exact argmax, random rows follow the tempered distribution,
    the caller's logits are untouched, and rows with top-k keep the torch path."""
    import kvflow.kernels.sampling as ks
    import kvflow.sample.sampler as sampler_mod
    from kvflow.sample import Sampler, SamplingMetadata
    torch.manual_seed(0)                          # the kernel's seed comes from it
    calls = []
    real = ks.sample_rows
    monkeypatch.setattr(ks, "sample_rows", lambda *a, **k: calls.append(1) or real(*a, **k))
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
