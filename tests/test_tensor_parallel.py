"""Tensor parallelism on CPU: 2 worker processes over gloo must reproduce the single-process
engine (greedy tokens identical, logprobs within 1e-4 in fp32), and a dead worker must be
reported promptly, never hang.

Each TP=2 engine costs a few seconds of process startup (spawn + torch import), so engines are
module-scoped and shared by the tests that only read them."""
from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest
import torch

from kvflow import LLM, SamplingParams
from tests.conftest import make_hf_model, save_hf_model

ENGINE_KW = dict(skip_tokenizer_init=True, kv_cache_memory=8 << 20, device="cpu",
                 dtype="float32", max_model_len=256)

PROMPTS = [[1, 5, 9, 33, 7], [2, 8, 100, 250, 3, 4, 5, 6, 7, 8, 9, 10],
           list(range(3, 60)),   # > one block and, with max_num_batched_tokens=32, chunked
           [17] * 20]


def _pair(model_dir, **kw):
    """(TP=1 engine, TP=2 engine) on the same checkpoint; TP=2 workers stopped at teardown."""
    args = dict(ENGINE_KW, max_num_batched_tokens=32, **kw)
    one = LLM(model_dir, **args)
    two = LLM(model_dir, tensor_parallel_size=2, **args)
    return one, two


@pytest.fixture(scope="module")
def llama_pair(tmp_path_factory):
    # One KV head for 4 query heads: with tp=2 the KV head is replicated on both ranks.
    # vocab 300 is not a multiple of 2*64: the vocab-parallel shards are padded.
    model = make_hf_model("llama", num_key_value_heads=1, vocab_size=300, eos_token_id=299)
    d = save_hf_model(model, tmp_path_factory.mktemp("tp-llama"))
    one, two = _pair(d)
    yield one, two
    two.shutdown()


@pytest.fixture(scope="module")
def qwen2_pair(tmp_path_factory):
    # Qwen2: q/k/v biases (column-sharded with their weights); 2 KV heads split across ranks.
    model = make_hf_model("qwen2", tie_word_embeddings=False)
    d = save_hf_model(model, tmp_path_factory.mktemp("tp-qwen2"))
    one, two = _pair(d)
    yield one, two
    two.shutdown()


def _assert_same(outs_a, outs_b, *, logprob_tol=1e-4):
    for a, b in zip(outs_a, outs_b):
        ca, cb = a.outputs[0], b.outputs[0]
        assert ca.token_ids == cb.token_ids
        if ca.logprobs is not None:
            for pa, pb in zip(ca.logprobs, cb.logprobs):
                assert pa.keys() == pb.keys()
                for tok in pa:
                    assert abs(pa[tok].logprob - pb[tok].logprob) < logprob_tol
        if a.prompt_logprobs is not None:
            for pa, pb in zip(a.prompt_logprobs, b.prompt_logprobs):
                if pa is None:
                    assert pb is None
                    continue
                for tok in pa:
                    assert abs(pa[tok].logprob - pb[tok].logprob) < logprob_tol


def kill_rank_and_expect_dead(eng, notice_s: float, total_s: float) -> None:
    """SIGKILL rank 1 while a request generates: the engine notices within notice_s (even
    idle), the next steps raise ExecutorDeadError naming rank 1 within total_s, health checks
    keep raising, and the request can still be aborted."""
    from kvflow.executor import ExecutorDeadError
    ex = eng.executor
    eng.add_request("r", [1, 2, 3], SamplingParams(max_tokens=200, ignore_eos=True))
    eng.step()
    eng.step()
    os.kill(ex.pids[1], signal.SIGKILL)
    t0 = time.monotonic()
    while eng.workers_alive() and time.monotonic() - t0 < notice_s:   # seen while idle too
        time.sleep(0.05)
    assert not eng.workers_alive()
    with pytest.raises(ExecutorDeadError, match="rank 1"):
        for _ in range(200):
            eng.step()
    assert time.monotonic() - t0 < total_s
    with pytest.raises(ExecutorDeadError):
        ex.check_health()
    eng.abort_request("r")


def assert_async_engine_dies(eng) -> None:
    """The async engine on top of a dead executor: the first step kills it, the request gets
    EngineDeadError and the engine turns unhealthy (the server answers /health with 503)."""
    from kvflow.engine.async_engine import AsyncLLM, EngineDeadError
    aeng = AsyncLLM(eng, log_stats=False)

    async def run():
        with pytest.raises(EngineDeadError):
            async for _ in aeng.generate([1, 2, 3], SamplingParams(max_tokens=4), "a"):
                pass
    asyncio.run(asyncio.wait_for(run(), 20))
    assert not aeng.is_healthy()
    aeng.shutdown(graceful=False, timeout=5)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("pair", ["llama_pair", "qwen2_pair"])
def test_tp2_greedy_matches_tp1(pair, request):
    one, two = request.getfixturevalue(pair)
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=3,
                        prompt_logprobs=2)
    ref = one.generate(PROMPTS, sp, use_tqdm=False)
    got = two.generate(PROMPTS, sp, use_tqdm=False)
    _assert_same(ref, got)
    eng = two.llm_engine
    assert eng.num_free_blocks() == eng.num_total_blocks()


@pytest.mark.timeout(120)
def test_tp2_seeded_sampling_with_penalties_matches_tp1(llama_pair):
    """Seeded random sampling and history-reading penalties: rank 0's tokens drive every rank's
    host history (workers receive them with the next step)."""
    one, two = llama_pair
    sps = [SamplingParams(temperature=0.8, seed=7 + i, max_tokens=10, ignore_eos=True,
                          repetition_penalty=1.3, frequency_penalty=0.5) for i in range(len(PROMPTS))]
    _assert_same(one.generate(PROMPTS, sps, use_tqdm=False),
                 two.generate(PROMPTS, sps, use_tqdm=False))


@pytest.mark.timeout(120)
def test_tp2_unseeded_sampling_runs(llama_pair):
    _, two = llama_pair
    sp = SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True, n=2)
    outs = two.generate(PROMPTS[:2], sp, use_tqdm=False)
    assert all(len(c.token_ids) == 8 for o in outs for c in o.outputs)


def test_memory_stats_come_from_every_rank(llama_pair):
    """The bench's peak-memory fields ask the workers (their own processes under TP), not the
    driver's torch counters: one entry per rank, empty off CUDA."""
    one, two = llama_pair
    assert one.llm_engine.executor.memory_stats() == [{}]
    assert two.llm_engine.executor.memory_stats(reset=True) == [{}, {}]


@pytest.mark.timeout(60)
def test_tp_config_validation(llama_pair):
    from kvflow.config import create_engine_config
    one, two = llama_pair
    model_dir = one.llm_engine.config.model.model
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        create_engine_config(model_dir, tensor_parallel_size=3, **ENGINE_KW)   # 4 heads
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        create_engine_config(model_dir, tensor_parallel_size=0, **ENGINE_KW)
    cfg = create_engine_config(model_dir, tensor_parallel_size=2, async_scheduling=True, **ENGINE_KW)
    assert cfg.parallel.tensor_parallel_size == 2 and not cfg.scheduler.async_scheduling
    # The KV cache shards per rank: each rank holds half the KV heads (here: 1 replicated of 1,
    # so the same), and the smallest rank's block count is the pool's.
    assert two.llm_engine.num_total_blocks() >= one.llm_engine.num_total_blocks()


def test_weight_loader_shards_in_process():
    """Loaders of each rank, without processes: KV-head replication, vocab padding (including
    a rank whose whole slice is padding), row-parallel bias not split."""
    from kvflow.distributed import set_tp
    from kvflow.layers.embedding import ParallelLMHead
    from kvflow.layers.linear import QKVParallelLinear, RowParallelLinear
    hd, heads, hidden = 2, 4, 8
    wq = torch.arange(heads * hd * hidden, dtype=torch.float32).view(heads * hd, hidden)
    wk = -torch.arange(hd * hidden, dtype=torch.float32).view(hd, hidden)
    wv = wk * 10
    try:
        for rank in range(4):
            set_tp(rank, 4)
            qkv = QKVParallelLinear(hidden, hd, heads, 1)
            assert (qkv.num_heads, qkv.num_kv_heads, qkv.kv_replicas) == (1, 1, 4)
            for sid, w in (("q", wq), ("k", wk), ("v", wv)):
                qkv.weight_loader(qkv.weight, w, sid)
            q, k, v = qkv.split(qkv.weight.t())
            assert torch.equal(q.t(), wq[rank * hd:(rank + 1) * hd])
            assert torch.equal(k.t(), wk) and torch.equal(v.t(), wv)   # replicated

            row = RowParallelLinear(heads * hd, hidden, bias=True)
            w = torch.randn(hidden, heads * hd)
            b = torch.randn(hidden)
            row.weight_loader(row.weight, w)
            row.weight_loader(row.bias, b)
            assert torch.equal(row.weight, w[:, rank * hd:(rank + 1) * hd]) and torch.equal(row.bias, b)

            # vocab 70 over 4 ranks: padded to 256, 64 rows each; ranks 2 and 3 are all padding.
            head = ParallelLMHead(70, hidden)
            emb = torch.randn(70, hidden)
            head.weight_loader(head.weight, emb)
            real = max(0, min(70 - rank * 64, 64))
            assert head.weight.shape == (64, hidden)
            assert torch.equal(head.weight[:real], emb[rank * 64:rank * 64 + real])
            assert not head.weight[real:].any()
    finally:
        set_tp(0, 1)


@pytest.mark.timeout(90)
def test_dead_worker_is_reported_not_hung(tmp_path):
    """SIGKILL a worker while a generation runs: the engine raises ExecutorDeadError promptly,
    stops the other worker, and an async engine on top reports itself unhealthy (server: 503)."""
    model = make_hf_model("llama")
    d = save_hf_model(model, tmp_path / "m")
    llm = LLM(d, tensor_parallel_size=2, **ENGINE_KW)
    eng = llm.llm_engine
    try:
        kill_rank_and_expect_dead(eng, notice_s=10, total_s=30)
        assert not any(p.is_alive() for p in eng.executor._procs)   # the survivor was stopped too
        assert_async_engine_dies(eng)
    finally:
        eng.shutdown()


@pytest.mark.timeout(90)
def test_worker_startup_error_is_raised_and_workers_stopped(llama_pair):
    """An error while a worker builds its model reaches the caller as itself; no process is
    left behind."""
    import multiprocessing
    model_dir = llama_pair[0].llm_engine.config.model.model
    before = {p.pid for p in multiprocessing.active_children()}
    with pytest.raises(Exception, match="no-such-backend"):
        LLM(model_dir, tensor_parallel_size=2, attention_backend="no-such-backend", **ENGINE_KW)
    leftover = {p.pid for p in multiprocessing.active_children()} - before
    assert not leftover
