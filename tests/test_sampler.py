"""Tests for kvflow.sample: masks, distribution, penalties, processors, seeding, logprobs.

References are written plainly (per row, Python floats / float64) so that they check the
vectorised code rather than restate it.
"""
from __future__ import annotations

import math
import random

import pytest
import torch

from kvflow.sample import LogprobsTensors, Sampler, SamplingMetadata, compute_topk_logprobs
from kvflow.sample.penalties import apply_penalties
from kvflow.sample.sampler import apply_min_p, apply_top_k_top_p
from kvflow.sampling_params import SamplingParams as SP

CPU = torch.device("cpu")


def build(params, vocab_size, outputs=None, prompts=None, generators=None):
    n = len(params)
    return SamplingMetadata.build(
        params=params,
        output_token_ids=outputs if outputs is not None else [[] for _ in range(n)],
        prompt_token_ids=prompts if prompts is not None else [[] for _ in range(n)],
        generators=generators or {},
        vocab_size=vocab_size,
        device=CPU,
    )


def gen(seed: int) -> torch.Generator:
    g = torch.Generator(device=CPU)
    g.manual_seed(seed)
    return g


# ----------------------------------------------------------------------------- references
def ref_keep(row: list[float], top_k: int, top_p: float, min_p: float) -> list[bool]:
    """Tokens that survive top-k, then top-p, then min-p (tie-inclusive), for one row."""
    V = len(row)
    keep = [True] * V
    if 0 < top_k < V:
        kth = sorted(row, reverse=True)[top_k - 1]
        keep = [x >= kth for x in row]
    if top_p < 1.0:
        kept = [x for x, k in zip(row, keep) if k]
        m = max(kept)
        z = sum(math.exp(x - m) for x in kept)
        mass, threshold = 0.0, None
        for x in sorted(kept, reverse=True):
            threshold = x
            mass += math.exp(x - m) / z
            if mass >= top_p:
                break
        keep = [k and x >= threshold for x, k in zip(row, keep)]
    if min_p > 0.0:
        m = max(x for x, k in zip(row, keep) if k)
        # prob_j / prob_max = exp(x_j - max), normalisation cancels.
        keep = [k and math.exp(x - m) >= min_p for x, k in zip(row, keep)]
    return keep


def ref_probs(row: list[float], p: SP) -> list[float]:
    """The distribution a random row should sample from (float64)."""
    scaled = [x / p.temperature for x in row]
    keep = ref_keep(scaled, p.top_k, p.top_p, p.min_p)
    m = max(x for x, k in zip(scaled, keep) if k)
    w = [math.exp(x - m) if k else 0.0 for x, k in zip(scaled, keep)]
    return [x / sum(w) for x in w]


def ref_penalties(row: list[float], p: SP, prompt: list[int], output: list[int]) -> list[float]:
    out = list(row)
    for t in set(prompt) | set(output):
        if out[t] > 0:
            out[t] /= p.repetition_penalty
        else:
            out[t] *= p.repetition_penalty
    for t in set(output):
        out[t] -= p.frequency_penalty * output.count(t)
        out[t] -= p.presence_penalty
    return out


# Upper 0.1% quantiles of chi-square for 1..7 degrees of freedom.
CHI2_999 = {1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467, 5: 20.515, 6: 22.458, 7: 24.322}


def chi2(counts: list[int], probs: list[float]) -> tuple[float, int]:
    n = sum(counts)
    cells = [(c, q * n) for c, q in zip(counts, probs) if q > 0]
    return sum((c - e) ** 2 / e for c, e in cells), len(cells) - 1


# ----------------------------------------------------------------------------- truncation masks
TRUNC_COMBOS = [  # (top_k, top_p, min_p)
    (0, 1.0, 0.0), (1, 1.0, 0.0), (3, 1.0, 0.0), (12, 1.0, 0.0), (50, 1.0, 0.0),
    (0, 0.5, 0.0), (0, 1e-6, 0.0), (0, 0.93, 0.0), (4, 0.7, 0.0), (1, 0.3, 0.0),
    (0, 1.0, 0.2), (5, 1.0, 0.5), (0, 0.8, 0.1), (6, 0.9, 0.05), (12, 0.999, 1.0),
]


def masked_by_sampler(logits: torch.Tensor, params: list[SP], full_sort=None) -> torch.Tensor:
    """[B, V] bool: tokens the sampler's truncation keeps (temperature 1)."""
    meta = build(params, logits.shape[1])
    if full_sort is not None:  # the test wants this code path
        assert meta.top_p is not None and meta.top_p_full_sort == full_sort
    out = apply_top_k_top_p(logits.clone(), meta.top_k, meta.top_p, meta.max_top_k,
                            meta.top_p_full_sort)
    probs = out.softmax(dim=-1)
    if meta.min_p is not None:
        apply_min_p(probs, meta.min_p)
    return probs > 0


@pytest.mark.parametrize("full_sort", [True, False])
@pytest.mark.parametrize("ties", [False, True])
def test_truncation_masks_match_reference(ties, full_sort):
    torch.manual_seed(0)
    V, reps = 12, 6
    combos = TRUNC_COMBOS * reps
    if not full_sort:
        # Every top-p row also has top-k: top-p runs on topk(max_k) instead of a full sort.
        combos = [c for c in combos if c[1] == 1.0 or 0 < c[0] < V]
    if ties:  # few distinct integer values: many exact ties, at the cut too
        logits = torch.randint(-2, 3, (len(combos), V)).float()
    else:
        logits = torch.randn(len(combos), V) * 2
    params = [SP(temperature=1.0, top_k=k, top_p=p, min_p=m) for k, p, m in combos]
    kept = masked_by_sampler(logits, params, full_sort)
    for i, (k, p, m) in enumerate(combos):
        ref = ref_keep(logits[i].double().tolist(), k, p, m)
        assert kept[i].tolist() == ref, f"row {i} top_k={k} top_p={p} min_p={m}"


def test_top_k_only_path_and_mixed_off_rows():
    # No row uses top-p: the topk(max_k) path, with rows that have top-k off mixed in.
    torch.manual_seed(1)
    V = 16
    ks = [0, 1, 2, 5, 15, 16, 40, 3]
    logits = torch.randn(len(ks), V)
    logits[7, :] = 1.0  # all tied: top-k keeps every token
    kept = masked_by_sampler(logits, [SP(top_k=k) for k in ks])
    for i, k in enumerate(ks):
        assert kept[i].tolist() == ref_keep(logits[i].double().tolist(), k, 1.0, 0.0), f"k={k}"
    assert kept[1].sum() == 1 and kept[7].all()


def test_tiny_top_p_keeps_only_the_max_and_its_ties():
    logits = torch.tensor([[0.0, 3.0, 1.0, 3.0, -1.0], [5.0, 0.0, 0.0, 0.0, 0.0]])
    kept = masked_by_sampler(logits, [SP(top_p=1e-9), SP(top_p=1e-9)])
    assert kept.tolist() == [[False, True, False, True, False], [True, False, False, False, False]]


# ----------------------------------------------------------------------------- distribution
DIST_LOGITS = [1.2, 0.3, -0.5, 2.0, 0.9, -1.5, 0.1, 1.6]
DIST_PARAMS = [
    SP(temperature=0.7),
    SP(temperature=1.3, top_k=5, top_p=0.9),
    SP(temperature=1.0, top_p=0.8, min_p=0.05),
    SP(temperature=0.9, top_k=6, min_p=0.2),
]


def test_sampled_distribution_chi_square():
    torch.manual_seed(1234)
    n = 20000
    V = len(DIST_LOGITS)
    params = [p for p in DIST_PARAMS for _ in range(n)]  # one batch, all configs mixed
    logits = torch.tensor(DIST_LOGITS).repeat(len(params), 1)
    sampled = Sampler()(logits, build(params, V)).sampled_token_ids
    for c, p in enumerate(DIST_PARAMS):
        counts = torch.bincount(sampled[c * n:(c + 1) * n], minlength=V).tolist()
        expected = ref_probs(DIST_LOGITS, p)
        assert all(cnt == 0 for cnt, q in zip(counts, expected) if q == 0), (p, counts)
        stat, dof = chi2(counts, expected)
        assert stat < CHI2_999[dof], (p, counts, expected, stat)
        if c == 0:
            # Power check: the same counts must reject the untempered distribution, so this
            # test would notice a sampler that ignored temperature.
            wrong = ref_probs(DIST_LOGITS, SP(temperature=1.0))
            assert chi2(counts, wrong)[0] > CHI2_999[dof]


def test_seeded_rows_follow_the_distribution():
    n = 3000
    p = SP(temperature=1.0, top_k=6, top_p=0.95, seed=0)
    V = len(DIST_LOGITS)
    logits = torch.tensor(DIST_LOGITS).repeat(n, 1)
    meta = build([p] * n, V, generators={i: gen(10_000 + i) for i in range(n)})
    counts = torch.bincount(Sampler()(logits, meta).sampled_token_ids, minlength=V).tolist()
    expected = ref_probs(DIST_LOGITS, p)
    assert all(cnt == 0 for cnt, q in zip(counts, expected) if q == 0)
    stat, dof = chi2(counts, expected)
    assert stat < CHI2_999[dof], (counts, expected, stat)


# ----------------------------------------------------------------------------- penalties
def test_penalties_match_reference():
    rnd = random.Random(0)
    torch.manual_seed(0)
    V = 20
    params = [
        SP(repetition_penalty=1.3),
        SP(frequency_penalty=0.7),
        SP(presence_penalty=-1.2),
        SP(repetition_penalty=0.8, frequency_penalty=-0.4, presence_penalty=1.5),
        SP(),  # no penalty: must be untouched even though other rows have some
        SP(repetition_penalty=2.0, presence_penalty=0.3),
    ]
    prompts = [[rnd.randrange(V) for _ in range(rnd.randrange(1, 10))] for _ in params]
    outputs = [[rnd.randrange(V) for _ in range(rnd.randrange(0, 15))] for _ in params]
    outputs[0] = []  # repetition must still count the prompt
    prompts[1] = [7, 7, 7]  # frequency must ignore prompt-only tokens
    logits = torch.randn(len(params), V) * 3
    meta = build(params, V, outputs=outputs, prompts=prompts)
    got = apply_penalties(logits.clone(), meta.penalties)
    for i, p in enumerate(params):
        ref = ref_penalties(logits[i].tolist(), p, prompts[i], outputs[i])
        torch.testing.assert_close(got[i], torch.tensor(ref), rtol=1e-6, atol=1e-6)
    assert torch.equal(got[4], logits[4])
    # Through the sampler: greedy rows pick the argmax of the penalised logits.
    gparams = [SP(temperature=0.0, repetition_penalty=p.repetition_penalty,
                  frequency_penalty=p.frequency_penalty, presence_penalty=p.presence_penalty)
               for p in params]
    sampled = Sampler()(logits, build(gparams, V, outputs=outputs, prompts=prompts))
    assert torch.equal(sampled.sampled_token_ids, got.argmax(dim=-1))


def test_no_penalties_means_no_penalty_state():
    meta = build([SP(), SP(temperature=0)], 8, outputs=[[1, 2], [3]], prompts=[[4], [5]])
    assert meta.penalties is None
    meta = build([SP(frequency_penalty=0.5), SP()], 8, outputs=[[1, 2], [3]], prompts=[[4], [5]])
    assert meta.penalties.prompt_ids is None and meta.penalties.repetition is None


# ----------------------------------------------------------------------------- processors
def test_logit_bias():
    V = 6
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0, 0.5, 0.0]] * 3)
    params = [
        SP(temperature=0.0, logit_bias={0: 10.0}),
        SP(temperature=0.0, logit_bias={3: -100.0, 5: 2.5}),  # 5 becomes 2.5 > 2.0
        SP(temperature=1.0, logit_bias={i: -100.0 for i in range(V) if i != 4}),
    ]
    out = Sampler()(logits, build(params, V)).sampled_token_ids
    assert out.tolist() == [0, 5, 4]


def test_min_tokens_masks_stop_and_eos_until_reached():
    V = 8
    eos = frozenset({5})
    logits = torch.zeros(6, V)
    logits[:, 2] = 10.0  # stop token
    logits[:, 5] = 9.0  # eos
    logits[:, 1] = 1.0
    logits[2, 2] = 0.0  # row 2 has no stop ids: make EOS its argmax
    params = [
        SP(temperature=0.0, min_tokens=3, stop_token_ids=[2], _eos_token_ids=eos),  # 1 generated
        SP(temperature=0.0, min_tokens=3, stop_token_ids=[2], _eos_token_ids=eos),  # 3 generated
        SP(temperature=0.0, min_tokens=3, _eos_token_ids=eos),  # no stop ids: eos masked only
        SP(temperature=0.0, min_tokens=3, stop_token_ids=[2], ignore_eos=True,
           _eos_token_ids=eos),  # eos is not a stop token then
        SP(temperature=1.0, top_k=3, min_tokens=2, stop_token_ids=[2], _eos_token_ids=eos),
        SP(temperature=0.0, stop_token_ids=[2], _eos_token_ids=eos),  # min_tokens 0
    ]
    outputs = [[0], [0, 0, 0], [0], [0, 0], [], [0]]
    out = Sampler()(logits, build(params, V, outputs=outputs)).sampled_token_ids.tolist()
    assert out[:4] == [1, 2, 1, 5] and out[5] == 2
    assert out[4] not in (2, 5)
    # Many random draws never hit a masked token.
    meta = build([params[4]] * 500, V, outputs=[[]] * 500)
    draws = Sampler()(torch.zeros(500, V), meta).sampled_token_ids
    assert not ((draws == 2) | (draws == 5)).any()


# ----------------------------------------------------------------------------- greedy
def test_greedy_is_argmax_with_first_max_on_ties():
    torch.manual_seed(3)
    V = 10
    logits = torch.randint(0, 3, (32, V)).float()  # lots of ties for the max
    all_greedy = build([SP(temperature=0.0)] * 32, V)
    assert all_greedy.all_greedy and all_greedy.temperature is None and all_greedy.top_k is None
    out = Sampler()(logits, all_greedy).sampled_token_ids
    assert out.dtype == torch.int64 and torch.equal(out, logits.argmax(dim=-1))
    # Mixed batch: greedy rows are still the argmax; random rows stay in their top-k.
    params = [SP(temperature=0.0) if i % 2 else SP(temperature=1.0, top_k=2) for i in range(32)]
    out = Sampler()(logits, build(params, V)).sampled_token_ids
    assert torch.equal(out[1::2], logits[1::2].argmax(dim=-1))
    for i in range(0, 32, 2):
        assert ref_keep(logits[i].tolist(), 2, 1.0, 0.0)[out[i]]


def test_input_not_modified_and_low_precision_input():
    torch.manual_seed(4)
    V = 32
    logits = torch.randn(4, V)
    before = logits.clone()
    params = [SP(temperature=0.5, top_p=0.5, repetition_penalty=1.5, logit_bias={0: 3.0}),
              SP(temperature=0.0, min_tokens=2, stop_token_ids=[1]), SP(top_k=3), SP()]
    meta = build(params, V, outputs=[[0, 1]] * 4, prompts=[[2]] * 4)
    Sampler()(logits, meta)
    assert torch.equal(logits, before)
    out = Sampler()(logits.to(torch.bfloat16), meta).sampled_token_ids
    assert out.shape == (4,) and out.dtype == torch.int64 and bool(((out >= 0) & (out < V)).all())


# ----------------------------------------------------------------------------- seeding
def run_steps(row_params: list[SP], row_logits: list[torch.Tensor], seeds: dict[int, int],
              steps: int) -> list[list[int]]:
    """Sample `steps` times with persistent per-row generators, as the runner would."""
    generators = {r: gen(s) for r, s in seeds.items()}
    V = row_logits[0].shape[-1]
    tokens = []
    for step in range(steps):
        logits = torch.stack([l[step] for l in row_logits])
        meta = build(row_params, V, generators=generators)
        tokens.append(Sampler()(logits, meta).sampled_token_ids.tolist())
    return [list(col) for col in zip(*tokens)]  # per row


def test_seeded_row_is_reproducible_across_batches_and_positions():
    torch.manual_seed(5)
    V, steps = 64, 10
    target = SP(temperature=1.0, top_p=0.95, seed=1234)
    target_logits = torch.randn(steps, V) * 0.5  # flat-ish: draws vary
    other = lambda: torch.randn(steps, V)  # noqa: E731

    a = run_steps([target, SP(), SP(temperature=0.0)],
                  [target_logits, other(), other()], {0: 1234}, steps)
    b = run_steps([SP(), SP(seed=7), SP(temperature=0.0), SP(top_k=5), target],
                  [other(), other(), other(), other(), target_logits], {1: 7, 4: 1234}, steps)
    c = run_steps([target], [target_logits], {0: 1234}, steps)
    assert a[0] == b[4] == c[0]
    assert len(set(a[0])) > 1  # it really sampled
    d = run_steps([target], [target_logits], {0: 99}, steps)
    assert d[0] != a[0]  # another seed, another sequence


def test_unseeded_rows_differ():
    torch.manual_seed(6)
    V, steps, rows = 64, 10, 4
    same = torch.randn(steps, V) * 0.5
    out = run_steps([SP()] * rows, [same] * rows, {}, steps)
    assert len({tuple(r) for r in out}) == rows


def test_greedy_row_does_not_consume_its_generator():
    g = gen(42)
    state = g.get_state()
    meta = build([SP(temperature=0.0, seed=42), SP()], 8, generators={0: g})
    Sampler()(torch.randn(2, 8), meta)
    assert torch.equal(g.get_state(), state)


# ----------------------------------------------------------------------------- logprobs
def test_logprobs_are_raw_with_ranks_and_topk_order():
    torch.manual_seed(7)
    V = 40
    ks = [None, 0, 3, 5, 2, None]
    params = [SP(temperature=0.5, top_k=4, logprobs=k, logit_bias={1: 50.0}) for k in ks]
    params[1] = SP(temperature=0.0, logprobs=0, repetition_penalty=1.7)
    logits = torch.randn(len(ks), V) * 2
    logits[:, 1] = -5.0  # raw-unlikely token that the bias makes certain
    logits = logits.to(torch.bfloat16)
    out = Sampler()(logits, build(params, V, outputs=[[3]] * len(ks), prompts=[[4]] * len(ks)))
    lp = out.logprobs
    assert isinstance(lp, LogprobsTensors)
    K = 5
    assert lp.token_ids.shape == (len(ks), K + 1) and lp.logprobs.shape == (len(ks), K + 1)
    assert lp.token_ids.dtype == torch.int64 and lp.logprobs.dtype == torch.float32
    assert lp.ranks.shape == (len(ks),) and lp.ranks.dtype == torch.int64
    raw = torch.log_softmax(logits.float(), dim=-1)  # before bias / penalty / temperature
    sampled = out.sampled_token_ids
    assert torch.equal(lp.token_ids[:, 0], sampled)
    for i in range(len(ks)):
        row = raw[i].tolist()
        assert lp.logprobs[i, 0].item() == row[sampled[i]]
        assert lp.ranks[i].item() == 1 + sum(x > row[sampled[i]] for x in row)  # no ties here
        top = sorted(range(V), key=lambda j: -row[j])[:K]
        assert lp.token_ids[i, 1:].tolist() == top
        assert lp.logprobs[i, 1:].tolist() == [row[j] for j in top]
    # The bias made token 1 the sampled one on biased rows, yet its logprob/rank are raw ones.
    for i in (0, 2, 3, 4, 5):
        assert sampled[i].item() == 1 and lp.ranks[i].item() > V // 2
    assert sampled[1].item() != 1


def test_logprobs_absent_unless_asked():
    out = Sampler()(torch.randn(2, 8), build([SP(), SP(temperature=0.0)], 8))
    assert out.logprobs is None


def test_compute_topk_logprobs_for_prompt_tokens():
    logits = torch.tensor([[1.0, 1.0, 0.0, -1.0], [0.0, 2.0, 1.0, 3.0]])
    tokens = torch.tensor([1, 2])
    lp = compute_topk_logprobs(logits, tokens, 2)
    raw = torch.log_softmax(logits, dim=-1)
    assert lp.token_ids[:, 0].tolist() == [1, 2]
    assert set(lp.token_ids[0, 1:].tolist()) == {0, 1} and lp.token_ids[1, 1:].tolist() == [3, 1]
    assert torch.equal(lp.logprobs[:, 1:], raw.topk(2, dim=-1).values)
    assert torch.equal(lp.logprobs[:, 0], raw[[0, 1], [1, 2]])
    assert lp.ranks.tolist() == [2, 3]  # vLLM convention: count of logprobs >= the token's
    only = compute_topk_logprobs(logits, tokens, 0)
    assert only.token_ids.shape == (2, 1) and only.logprobs.shape == (2, 1)
    assert compute_topk_logprobs(logits, tokens, 99).token_ids.shape == (2, 5)  # clipped to V
