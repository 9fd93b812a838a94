"""Engine behaviour on a tiny random Llama: every scheduling path gives HF's greedy tokens, bad
input fails cleanly, and no KV block is ever leaked (checked by the make_llm fixture)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kvflow import SamplingParams
from tests.conftest import hf_greedy

GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


def _block_bytes(block_size: int) -> int:
    # tiny model: 2 layers x (K, V) x block_size x 2 KV heads x head_dim 32 x fp32
    return 2 * 2 * block_size * 2 * 32 * 4


def _prompts(seed=0, lengths=(3, 17, 40, 64, 5, 29)):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 383, size=n).tolist() for n in lengths]


def _gen(llm, prompts, params=GREEDY):
    return llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)


@pytest.fixture(scope="module")
def reference(tiny_llama):
    hf, _ = tiny_llama
    return {tuple(p): hf_greedy(hf, p, 16) for p in _prompts()}


def _check(outs, prompts, reference):
    for p, o in zip(prompts, outs):
        assert o.outputs[0].token_ids == reference[tuple(p)], f"prompt of {len(p)} tokens differs"


def test_alone_and_batched(tiny_llama, reference, make_llm):
    llm = make_llm(tiny_llama[1])
    prompts = _prompts()
    for p in prompts:  # one at a time
        _check(_gen(llm, [p]), [p], reference)
    _check(_gen(llm, prompts), prompts, reference)


def test_chunked_prefill_tiny_budget(tiny_llama, reference, make_llm):
    llm = make_llm(tiny_llama[1], max_num_batched_tokens=7, enable_prefix_caching=False)
    prompts = _prompts()
    _check(_gen(llm, prompts), prompts, reference)


@pytest.mark.parametrize("admission,async_", [(False, False), (True, False), (True, True)],
                         ids=["no-admission", "admission", "admission-async"])
def test_forced_preemption(tiny_llama, reference, make_llm, admission, async_):
    # 24 blocks of 4 tokens: the six requests need far more together. Admitted as vLLM does
    # (whatever fits now), some are preempted and recomputed; with admission control they
    # wait instead, and nothing is preempted -- also with async scheduling, where a finished
    # request's blocks return one step later. Same tokens either way.
    llm2 = make_llm(tiny_llama[1], block_size=4, kv_cache_memory=24 * _block_bytes(4),
                    enable_prefix_caching=False, admission_control=admission,
                    async_scheduling=async_)
    prompts = _prompts()
    _check(_gen(llm2, prompts), prompts, reference)
    assert (llm2.llm_engine.scheduler.num_preemptions > 0) != admission
    assert llm2.llm_engine.scheduler.kv.num_free_blocks == 24


def test_prefix_cache_hits(tiny_llama, reference, make_llm):
    llm = make_llm(tiny_llama[1], block_size=16)    # the prompts' lengths are sized for 16
    prompts = _prompts()
    first = _gen(llm, prompts)
    second = _gen(llm, prompts)
    _check(first, prompts, reference)
    _check(second, prompts, reference)
    long = [o for o, p in zip(second, prompts) if len(p) > 16]
    assert all(o.num_cached_tokens > 0 for o in long)
    assert all(o.num_cached_tokens % 16 == 0 and o.num_cached_tokens < len(o.prompt_token_ids) for o in second)
    stats = llm.llm_engine.stats()
    assert stats["prefix_cache_hits"] > 0


def test_shared_prefix_in_one_batch(tiny_llama, make_llm):
    hf, path = tiny_llama
    llm = make_llm(path, block_size=4)
    base = _prompts(3, (37,))[0]
    prompts = [base + [i] for i in range(4)]
    outs = _gen(llm, prompts)
    for p, o in zip(prompts, outs):
        assert o.outputs[0].token_ids == hf_greedy(hf, p, 16)


def test_preemption_with_prefix_cache_and_chunking(tiny_llama, reference, make_llm):
    llm2 = make_llm(tiny_llama[1], block_size=4, max_num_batched_tokens=10,
                    kv_cache_memory=30 * _block_bytes(4), admission_control=False)
    prompts = _prompts()
    _check(_gen(llm2, prompts), prompts, reference)
    _check(_gen(llm2, prompts), prompts, reference)


def test_n_and_seed(tiny_llama, make_llm):
    llm = make_llm(tiny_llama[1])
    p = _prompts(5, (12,))
    sp = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=10, ignore_eos=True)
    a = _gen(llm, p, sp)[0]
    assert [c.index for c in a.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in a.outputs}) > 1
    # Same seed, different batch company: identical samples.
    others = _prompts(6, (20, 3, 9))
    b = _gen(llm, others + p, [SamplingParams(temperature=1.0, max_tokens=7)] * 3 + [sp])[-1]
    assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]


def test_stop_token_and_min_tokens(tiny_llama, reference, make_llm):
    llm = make_llm(tiny_llama[1])
    p = _prompts()[2]
    ref = reference[tuple(p)]
    stop_tok = ref[5]
    first = ref.index(stop_tok)
    o = _gen(llm, [p], SamplingParams(temperature=0, max_tokens=16, stop_token_ids=[stop_tok]))[0].outputs[0]
    assert o.token_ids == ref[:first + 1] and o.finish_reason == "stop" and o.stop_reason == stop_tok
    # min_tokens masks stop tokens until that many tokens exist.
    o = _gen(llm, [p], SamplingParams(temperature=0, max_tokens=16, stop_token_ids=[stop_tok],
                                      min_tokens=first + 2))[0].outputs[0]
    assert len(o.token_ids) >= first + 2 and stop_tok not in o.token_ids[:first + 2]


def test_max_tokens_and_max_model_len(tiny_llama, make_llm):
    llm = make_llm(tiny_llama[1], max_model_len=48)
    outs = _gen(llm, [_prompts()[2]], SamplingParams(temperature=0, max_tokens=100, ignore_eos=True))
    assert len(outs[0].outputs[0].token_ids) == 48 - 40
    assert outs[0].outputs[0].finish_reason == "length"


def test_too_long_prompt_fails_alone(tiny_llama, reference, make_llm):
    llm = make_llm(tiny_llama[1], max_model_len=50)
    prompts = _prompts()
    bad = list(range(60))
    outs = _gen(llm, prompts[:2] + [bad] + prompts[2:3])
    assert outs[2].outputs[0].finish_reason == "error"
    assert "max_model_len=50" in outs[2].error
    for p, o in zip(prompts[:3], [outs[0], outs[1], outs[3]]):
        # Generation stops at max_model_len: the 40-token prompt gets 10 tokens.
        assert o.outputs[0].token_ids == reference[tuple(p)][:50 - len(p)]


def test_generate_feeds_a_large_batch_between_steps(tiny_llama, make_llm, monkeypatch):
    """LLM.generate queues about two steps' worth of prompt tokens and adds the rest while
    steps run (so the device does not idle while a large batch is queued): the outputs equal
    the same batch queued all at once, and a bad prompt queued late still fails alone."""
    from kvflow.engine.output_processor import OutputKind
    llm = make_llm(tiny_llama[1], max_num_batched_tokens=64, enable_prefix_caching=False)
    eng = llm.llm_engine
    prompts = _prompts(seed=3, lengths=(20,) * 12)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=2)
    for i, p in enumerate(prompts):                       # all at once, straight to the engine
        eng.add_request(f"all-{i}", {"prompt_token_ids": p}, params,
                        output_kind=OutputKind.FINAL_ONLY)
    ref = {}
    while eng.has_unfinished_requests():
        ref.update((o.request_id, o) for o in eng.step() if o.finished)
    ref = [ref[f"all-{i}"] for i in range(len(prompts))]

    steps, added_at = [0], []
    step, add = eng.step, eng.add_request

    def counting_step():
        steps[0] += 1
        return step()

    def recording_add(*args, **kwargs):
        added_at.append(steps[0])
        return add(*args, **kwargs)
    monkeypatch.setattr(eng, "step", counting_step)
    monkeypatch.setattr(eng, "add_request", recording_add)
    outs = _gen(llm, prompts[:9] + [[10 ** 9]] + prompts[9:], params)
    # 2 x 64 tokens queued first (7 prompts of 20), the rest after steps had run.
    assert added_at[:7] == [0] * 7 and added_at[7] > 0 and len(added_at) == 13, added_at
    assert outs[9].outputs[0].finish_reason == "error" and "prompt" in outs[9].error
    for o, r in zip(outs[:9] + outs[10:], ref):
        assert o.outputs[0].token_ids == r.outputs[0].token_ids
        assert [sorted((t, v.logprob) for t, v in d.items()) for d in o.outputs[0].logprobs] == \
            [sorted((t, v.logprob) for t, v in d.items()) for d in r.outputs[0].logprobs]
    assert eng.num_waiting_tokens() == 0


def test_logprobs_match_hf(tiny_llama, make_llm):
    hf, path = tiny_llama
    llm = make_llm(path)
    p = _prompts()[1]
    o = _gen(llm, [p], SamplingParams(temperature=0, max_tokens=4, logprobs=3, prompt_logprobs=2,
                                      ignore_eos=True))[0]
    with torch.no_grad():
        full = torch.tensor([p + o.outputs[0].token_ids])
        ref = torch.log_softmax(hf(full).logits[0].float(), -1)
    for i, (tok, lps) in enumerate(zip(o.outputs[0].token_ids, o.outputs[0].logprobs)):
        row = ref[len(p) - 1 + i]
        assert abs(lps[tok].logprob - row[tok].item()) < 1e-4
        assert lps[tok].rank == 1  # greedy picks the top token
        top = torch.topk(row, 3).indices.tolist()
        assert set(top) <= set(lps)
    assert o.prompt_logprobs[0] is None and len(o.prompt_logprobs) == len(p)
    for j in range(1, len(p)):
        assert abs(o.prompt_logprobs[j][p[j]].logprob - ref[j - 1, p[j]].item()) < 1e-4
    assert o.outputs[0].cumulative_logprob == pytest.approx(
        sum(d[t].logprob for d, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)), abs=1e-5)


@pytest.mark.parametrize("kwargs,field", [
    (dict(n=0), "n"), (dict(temperature=-0.1), "temperature"),
    (dict(temperature=float("nan")), "temperature"), (dict(temperature=float("inf")), "temperature"),
    (dict(repetition_penalty=float("inf")), "repetition_penalty"), (dict(top_p=float("nan")), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(top_p=0.0), "top_p"), (dict(top_k=-2), "top_k"), (dict(min_p=1.5), "min_p"),
    (dict(presence_penalty=3.0), "presence_penalty"), (dict(frequency_penalty=-2.5), "frequency_penalty"),
    (dict(repetition_penalty=0.0), "repetition_penalty"), (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=-1), "max_tokens"), (dict(min_tokens=-1), "min_tokens"),
    (dict(min_tokens=5, max_tokens=2), "min_tokens"), (dict(logprobs=-1), "logprobs"),
    (dict(prompt_logprobs=-3), "prompt_logprobs"), (dict(stop=[""]), "stop"),
    (dict(stop_token_ids=[-1]), "stop_token_ids"), (dict(logit_bias={"x": 1}), "logit_bias"),
    (dict(logit_bias={5: 500}), "logit_bias"), (dict(seed=1.5), "seed"),
    (dict(detokenize=False, stop=["x"]), "stop"), (dict(n=1.5), "n"), (dict(ignore_eos="yes"), "ignore_eos"),
])
def test_invalid_sampling_params(kwargs, field):
    with pytest.raises(ValueError, match=field) as e:
        SamplingParams(**kwargs)
    assert getattr(e.value, "param", field) == field


def test_out_of_vocab_ids_rejected(tiny_llama, make_llm):
    llm = make_llm(tiny_llama[1])
    with pytest.raises(ValueError, match="logit_bias"):
        _gen(llm, [[1, 2]], SamplingParams(logit_bias={10_000: 1.0}))
    outs = _gen(llm, [[1, 999_999]])
    assert outs[0].outputs[0].finish_reason == "error" and "prompt" in outs[0].error
    outs = _gen(llm, [[]])
    assert outs[0].outputs[0].finish_reason == "error"


@pytest.mark.parametrize("ids", [[1, -1], [1, True], [1, 2.0], [1, "2"], [1, np.int64(2)],
                                 [1, 383, 384]])
def test_bad_token_ids_rejected_by_field(tiny_llama, make_llm, ids):
    # Only Python ints in [0, vocab) (vocab 384 here); bools and numpy ints are not token ids.
    eng = make_llm(tiny_llama[1]).llm_engine
    with pytest.raises(ValueError, match="prompt"):
        eng.add_request(None, {"prompt_token_ids": ids}, SamplingParams(max_tokens=2))
    assert not eng.has_unfinished_requests()


def test_sampling_params_clone_is_independent():
    sp = SamplingParams(stop=["a"], stop_token_ids=[3], logit_bias={1: 2.0}, seed=5)
    c = sp.clone()
    assert c == sp and c is not sp
    c.stop.append("b")
    c.stop_token_ids.append(4)
    c.logit_bias[2] = 1.0
    c.seed = 6
    assert sp.stop == ["a"] and sp.stop_token_ids == [3] and sp.logit_bias == {1: 2.0}
    assert sp.seed == 5


@pytest.mark.parametrize("kwargs,field", [
    (dict(block_size=12), "block_size"), (dict(gpu_memory_utilization=1.5), "gpu_memory_utilization"),
    (dict(max_num_seqs=0), "max_num_seqs"), (dict(max_model_len=100_000), "max_model_len"),
    (dict(max_num_batched_tokens=0), "max_num_batched_tokens"), (dict(device="tpu"), "device"),
    (dict(load_format="pickle"), "load_format"), (dict(dtype="int3"), "dtype"),
    (dict(kv_cache_memory=-5), "kv_cache_memory"),
])
def test_invalid_engine_args(tiny_llama, kwargs, field):
    from kvflow import LLM
    kw = dict(skip_tokenizer_init=True, device="cpu", kv_cache_memory=1 << 20)
    kw.update(kwargs)
    with pytest.raises(ValueError, match=field):
        LLM(tiny_llama[1], **kw)


def test_default_block_size_by_device(tiny_llama):
    """block_size=None: 64 tokens on CUDA, 16 (vLLM's default) elsewhere; an explicit value
    wins and enters the config as given."""
    from kvflow.config import create_engine_config, default_block_size
    assert default_block_size(torch.device("cuda")) == 64
    assert default_block_size(torch.device("cpu")) == 16
    kw = dict(device="cpu", skip_tokenizer_init=True, kv_cache_memory=1 << 20)
    assert create_engine_config(tiny_llama[1], **kw).cache.block_size == 16
    assert create_engine_config(tiny_llama[1], block_size=32, **kw).cache.block_size == 32


def test_default_scheduler_limits_follow_vllm(tiny_llama, monkeypatch):
    """max_num_seqs / max_num_batched_tokens=None: vLLM's rule (1024 sequences on GPUs of >= 70
    GiB but the A100, 16384 tokens a step offline and 8192 in the server; else 256 / 8192);
    explicit values win; without chunked prefill a step holds at least max_model_len."""
    from types import SimpleNamespace

    from kvflow.config import create_engine_config, default_scheduler_limits
    from kvflow.server.cli_args import engine_kwargs, parse_serve_args
    gib = 2**30

    def gpu(name, total):
        monkeypatch.setattr(torch.cuda, "get_device_properties",
                            lambda dev: SimpleNamespace(name=name, total_memory=total))
    cuda = torch.device("cuda", 0)
    gpu("NVIDIA H200", 140 * gib)
    assert default_scheduler_limits(cuda) == (1024, 16384)
    assert default_scheduler_limits(cuda, "server") == (1024, 8192)
    gpu("NVIDIA H100 80GB HBM3", 79 * gib)
    assert default_scheduler_limits(cuda) == (1024, 16384)
    gpu("NVIDIA A100-SXM4-80GB", 79 * gib)
    assert default_scheduler_limits(cuda) == (256, 8192)
    gpu("NVIDIA L40S", 44 * gib)
    assert default_scheduler_limits(cuda, "server") == (256, 8192)
    assert default_scheduler_limits(torch.device("cpu")) == (256, 8192)
    with pytest.raises(ValueError, match="usage_context"):
        default_scheduler_limits(cuda, "offline")

    kw = dict(device="cpu", skip_tokenizer_init=True, kv_cache_memory=1 << 20)
    sc = create_engine_config(tiny_llama[1], **kw).scheduler
    assert (sc.max_num_seqs, sc.max_num_batched_tokens) == (256, 8192)
    sc = create_engine_config(tiny_llama[1], max_num_seqs=7, max_num_batched_tokens=100,
                              max_model_len=64, **kw).scheduler
    assert (sc.max_num_seqs, sc.max_num_batched_tokens) == (7, 100)
    sc = create_engine_config(tiny_llama[1], enable_chunked_prefill=False, max_model_len=100,
                              **kw).scheduler
    assert sc.max_num_batched_tokens == 8192
    import kvflow.config as config_mod
    monkeypatch.setattr(config_mod, "default_scheduler_limits",
                        lambda dev, usage: (3, 500) if usage == "server" else (5, 900))
    sc = create_engine_config(tiny_llama[1], max_model_len=64, usage_context="server", **kw)
    assert (sc.scheduler.max_num_seqs, sc.scheduler.max_num_batched_tokens) == (3, 500)
    sc = create_engine_config(tiny_llama[1], max_model_len=64, **kw).scheduler
    assert (sc.max_num_seqs, sc.max_num_batched_tokens) == (5, 900)
    # The server asks for its own defaults; the CLI's engine options leave both unset.
    served = engine_kwargs(parse_serve_args(["m"]))
    assert served["usage_context"] == "server"
    assert served["max_num_seqs"] is None and served["max_num_batched_tokens"] is None


def test_max_model_len_that_cannot_fit_says_how_much(tiny_llama):
    from kvflow import LLM
    with pytest.raises(ValueError, match=r"max_model_len: 1024 tokens need .* GiB"):
        LLM(tiny_llama[1], skip_tokenizer_init=True, device="cpu", kv_cache_memory=64 << 10,
            max_model_len=1024)


def test_max_model_len_fitted_to_memory(tiny_llama, make_llm, caplog):
    llm = make_llm(tiny_llama[1], kv_cache_memory=256 << 10)
    cap = llm.llm_engine.num_total_blocks() * llm.llm_engine.config.cache.block_size
    assert llm.llm_engine.max_model_len == cap < 1024
    assert "max_model_len is set to" in caplog.text


def test_abort_frees_blocks(tiny_llama, make_llm):
    llm = make_llm(tiny_llama[1])
    eng = llm.llm_engine
    for i, p in enumerate(_prompts()):
        eng.add_request(f"r{i}", {"prompt_token_ids": p}, SamplingParams(max_tokens=50, ignore_eos=True))
    for _ in range(3):
        eng.step()
    assert eng.num_free_blocks() < eng.num_total_blocks()
    outs = eng.abort_request([f"r{i}" for i in range(6)])
    assert {o.outputs[0].finish_reason for o in outs} == {"abort"}
    assert not eng.has_unfinished_requests()
    assert eng.num_free_blocks() == eng.num_total_blocks()


def test_duplicate_request_id_rejected(tiny_llama, make_llm):
    llm = make_llm(tiny_llama[1])
    eng = llm.llm_engine
    eng.add_request("x", [1, 2, 3], SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="request_id"):
        eng.add_request("x", [1, 2, 3], SamplingParams(max_tokens=2))
    while eng.has_unfinished_requests():
        eng.step()


def test_failed_step_fails_its_requests_and_engine_keeps_serving(tiny_llama, reference, make_llm):
    llm = make_llm(tiny_llama[1])
    eng = llm.llm_engine
    worker = eng.executor.worker
    real = worker.runner.launch
    calls = {"n": 0}

    def flaky(so):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("injected failure")
        return real(so)

    worker.runner.launch = flaky
    try:
        outs = _gen(llm, _prompts()[:2])
        assert all(o.outputs[0].finish_reason == "error" and "injected" in o.error for o in outs)
    finally:
        worker.runner.launch = real
    prompts = _prompts()
    _check(_gen(llm, prompts), prompts, reference)


@pytest.mark.parametrize("kw", [
    dict(), dict(max_num_batched_tokens=7, enable_prefix_caching=False),
    dict(block_size=4, kv_cache_memory=24 * _block_bytes(4), enable_prefix_caching=False,
         admission_control=False),
    dict(block_size=4, max_num_batched_tokens=10, kv_cache_memory=30 * _block_bytes(4),
         admission_control=False),
    dict(block_size=4, kv_cache_memory=24 * _block_bytes(4), enable_prefix_caching=False),
], ids=["batched", "chunked", "preempted", "preempted-chunked-prefix", "admission-tight"])
def test_async_scheduling_gives_identical_outputs(tiny_llama, reference, make_llm, kw):
    """Overlapped scheduling (step N+1 launched before step N's tokens are applied) changes
    nothing observable: same tokens, same finish reasons, no leaks, also with preemption."""
    llm = make_llm(tiny_llama[1], async_scheduling=True, **kw)
    assert llm.llm_engine.async_scheduling
    prompts = _prompts()
    _check(_gen(llm, prompts), prompts, reference)
    _check(_gen(llm, prompts), prompts, reference)  # again, with prefix hits where enabled
    p = prompts[2]
    ref = reference[tuple(p)]
    o = _gen(llm, [p], SamplingParams(temperature=0, max_tokens=16, stop_token_ids=[ref[5]]))[0].outputs[0]
    assert o.token_ids == ref[:ref.index(ref[5]) + 1] and o.finish_reason == "stop"
    sp = SamplingParams(n=2, temperature=1.0, seed=3, max_tokens=9, ignore_eos=True)
    sync = make_llm(tiny_llama[1], async_scheduling=False, **kw)
    assert ([c.token_ids for c in _gen(llm, [p], sp)[0].outputs]
            == [c.token_ids for c in _gen(sync, [p], sp)[0].outputs])


def test_async_scheduling_with_penalties_and_aborts(tiny_llama, make_llm):
    llm = make_llm(tiny_llama[1], async_scheduling=True)
    sync = make_llm(tiny_llama[1], async_scheduling=False)
    sp = [SamplingParams(temperature=0, max_tokens=12, repetition_penalty=1.3, ignore_eos=True),
          SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, min_tokens=4)]
    prompts = _prompts()[:2]
    assert [o.outputs[0].token_ids for o in _gen(llm, prompts, sp)] == \
        [o.outputs[0].token_ids for o in _gen(sync, prompts, sp)]
    eng = llm.llm_engine
    for i, p in enumerate(_prompts()):
        eng.add_request(f"a{i}", {"prompt_token_ids": p}, SamplingParams(max_tokens=40, ignore_eos=True))
    for _ in range(4):
        eng.step()
    eng.abort_request([f"a{i}" for i in range(3)])
    while eng.has_unfinished_requests():
        eng.step()


def test_lm_head_rows_padded_to_graph_sizes(tiny_llama, reference, make_llm):
    """Outside the decode graphs the LM head runs on its rows padded to the graphs' batch sizes
    (so cuBLAS meets only shapes whose kernels the captures loaded); the padding rows never
    reach the sampler: HF's greedy tokens and the same logprobs as unpadded."""
    llm = make_llm(tiny_llama[1], max_num_batched_tokens=64)
    runner = llm.llm_engine.executor.worker.runner
    model = runner.model
    real = model.compute_logits
    rows = []

    def spy(hidden, out=None):
        rows.append(hidden.shape[0])
        return real(hidden, out=out)

    prompts = _prompts()
    lp = SamplingParams(temperature=0, max_tokens=4, logprobs=3, ignore_eos=True)
    plain = _gen(llm, prompts, lp)
    model.compute_logits = spy
    runner.logits_row_buckets = [4, 8]
    try:
        _check(_gen(llm, prompts), prompts, reference)
        padded = _gen(llm, prompts, lp)
    finally:
        model.compute_logits = real
        runner.logits_row_buckets = []
    assert set(rows) <= {4, 8} and rows          # 1-6 sampled rows run as 4 or 8
    for a, b in zip(plain, padded):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for x, y in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert x.keys() == y.keys()
            for t in x:
                assert abs(x[t].logprob - y[t].logprob) < 1e-5


def test_default_ride_budget_is_offline_cuda_only(tiny_llama):
    """3/4 of a 128-row tile x experts / experts per token for MoE models offline on CUDA
    (Mixtral's 8 experts, top 2: 384), DENSE_RIDE_BUDGET for dense ones from 0.4B parameters in
    their products (Llama-3.1-8B's sizes: 7.0B; Qwen3-0.6B's: 0.44B); 0 off the GPU and in
    the server."""
    import dataclasses
    from kvflow.config import (DENSE_RIDE_BUDGET, DENSE_RIDE_CHUNK, DENSE_RIDE_FILL,
                               DENSE_RIDE_GRANULE, SchedulerConfig,
                               create_engine_config, default_ride_budget,
                               default_ride_granule)
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    tiny = create_engine_config(tiny_llama[1], device="cpu").model

    def model(hf=None, **sizes):
        return dataclasses.replace(tiny, hf_config=hf or {}, **sizes)
    mixtral = model({"num_local_experts": 8, "num_experts_per_tok": 2})
    llama8b = model(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, head_dim=128)
    qwen06b = model(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                    num_attention_heads=16, num_key_value_heads=8, head_dim=128)
    assert llama8b.layer_product_params == 6_979_321_856
    assert qwen06b.layer_product_params == 440_401_920
    assert default_ride_budget(mixtral, cuda, "llm") == 384
    assert default_ride_budget(model({"num_experts": 128, "num_experts_per_tok": 8}),
                               cuda, "llm") == 1536
    assert default_ride_budget(llama8b, cuda, "llm") == DENSE_RIDE_BUDGET == 512
    # Dense riding steps are paced by 64 tokens; MoE ones take their whole budget.
    assert default_ride_granule(llama8b) == DENSE_RIDE_GRANULE == 64
    assert default_ride_granule(mixtral) == 0
    assert default_ride_budget(qwen06b, cuda, "llm") == DENSE_RIDE_BUDGET   # since session 34
    assert (DENSE_RIDE_CHUNK, DENSE_RIDE_FILL) == (384, 160)
    assert default_ride_budget(tiny, cuda, "llm") == 0
    for m in (mixtral, llama8b):
        assert default_ride_budget(m, cpu, "llm") == 0
        assert default_ride_budget(m, cuda, "server") == 0
    with pytest.raises(ValueError, match="ride_budget"):
        SchedulerConfig(ride_budget=-1)
    with pytest.raises(ValueError, match="ride_budget"):
        SchedulerConfig(ride_budget=8, enable_chunked_prefill=False, max_num_batched_tokens=4096)
    with pytest.raises(ValueError, match="ride_granule"):
        SchedulerConfig(ride_budget=8, ride_granule=-1)
    for name in ("ride_chunk", "ride_fill"):
        with pytest.raises(ValueError, match=name):
            SchedulerConfig(ride_budget=8, ride_granule=8, **{name: -1})


def test_default_ride_budget_off_without_chunked_prefill(tiny_llama, monkeypatch):
    """Prompts ride in pieces, so the default gives way when chunked prefill is off (an explicit
    ride_budget there is still refused); with it on, the default stands."""
    import kvflow.config as config
    monkeypatch.setattr(config, "default_ride_budget", lambda m, dev, usage: 384)
    path = tiny_llama[1]
    assert config.create_engine_config(path, device="cpu").scheduler.ride_budget == 384
    off = config.create_engine_config(path, device="cpu", enable_chunked_prefill=False)
    assert off.scheduler.ride_budget == 0 and not off.scheduler.enable_chunked_prefill
    assert off.scheduler.ride_granule == 0          # riding off: no granule to key on
    assert (off.scheduler.ride_chunk, off.scheduler.ride_fill) == (0, 0)
    # Lazy riding comes with paced riding (a dense model's granule), not with fixed steps.
    monkeypatch.setattr(config, "default_ride_granule", lambda m: 64)
    paced = config.create_engine_config(path, device="cpu").scheduler
    assert (paced.ride_granule, paced.ride_chunk, paced.ride_fill) == (
        64, config.DENSE_RIDE_CHUNK, config.DENSE_RIDE_FILL)
    fixed = config.create_engine_config(path, device="cpu", ride_granule=0).scheduler
    assert (fixed.ride_chunk, fixed.ride_fill) == (0, 0)
    mine = config.create_engine_config(path, device="cpu", ride_chunk=128, ride_fill=0).scheduler
    assert (mine.ride_chunk, mine.ride_fill) == (128, 0)
    with pytest.raises(ValueError, match="ride_budget"):
        config.create_engine_config(path, device="cpu", enable_chunked_prefill=False,
                                    ride_budget=384)


@pytest.mark.parametrize("ride_granule", [0, 8])
def test_riding_generate_starts_longest_outputs_first_same_outputs(tiny_llama, make_llm,
                                                                   monkeypatch, reference,
                                                                   ride_granule):
    """With ride_budget set, LLM.generate queues the longest max_tokens first (and the rest of
    the batch once the first step runs), steps of riding prompts stay within the budget, and
    every output is the HF greedy one, returned in the order given. Unpaced (granule 0) the
    first step is a full prefill and riding steps take the whole budget; paced (granule 8) the
    batch rides from its first step in multiples of 8 tokens."""
    llm = make_llm(tiny_llama[1], ride_budget=24, max_num_batched_tokens=64,
                   ride_granule=ride_granule)
    eng = llm.llm_engine
    prompts = _prompts()
    # Paced, a strictly longest head lets the batch ride from its first step (two equal
    # longest outputs could not: the second would finish after the first).
    lengths = [4, 16, 9, 12, 2, 14 if ride_granule else 16]
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in lengths]
    added, totals = [], []
    add, schedule = eng.add_request, eng.scheduler.schedule

    def recording_add(rid, prompt, p, **kw):
        added.append(p.max_tokens)
        return add(rid, prompt, p, **kw)

    def recording_schedule():
        so = schedule()
        decodes = sum(1 for r in eng.scheduler.running
                      if so.num_scheduled_tokens.get(r.request_id) == 1)
        totals.append((so.total_num_scheduled_tokens, decodes))
        return so
    monkeypatch.setattr(eng, "add_request", recording_add)
    monkeypatch.setattr(eng.scheduler, "schedule", recording_schedule)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert added == sorted(lengths, reverse=True)
    for p, n, o in zip(prompts, lengths, outs):
        assert o.prompt_token_ids == p
        assert o.outputs[0].token_ids == reference[tuple(p)][:n]
    if not ride_granule:
        # The first step has nothing to ride on (full budget); some later ones ride.
        assert totals[0][0] == 64
        assert any(0 < d and t == 24 for t, d in totals[1:]), totals
    else:
        assert totals[0][0] <= 24
        assert all(t <= 24 or t == 64 for t, _ in totals), totals
