"""distributed_executor_backend="ray" on a local Ray cluster (CPU, 2 actors over gloo): the same
greedy tokens and logprobs as one process, expert parallel included, and a killed actor is
reported as ExecutorDeadError promptly (no hang), seen even while the engine is idle.

Skipped when Ray is not installed (it is an optional extra: pip install 'kvflow[ray]')."""
from __future__ import annotations

import os
import signal
import time

import pytest

ray = pytest.importorskip("ray")

from kvflow import LLM, SamplingParams  # noqa: E402
from tests.conftest import make_hf_model, save_hf_model  # noqa: E402
from tests.test_moe import make_hf_moe  # noqa: E402
from tests.test_tensor_parallel import (  # noqa: E402
    ENGINE_KW, PROMPTS, _assert_same, assert_async_engine_dies, kill_rank_and_expect_dead)


@pytest.fixture(scope="module")
def ray_cluster():
    # The actors inherit this environment (PYTHONPATH included) from the local cluster.
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    model = make_hf_model("llama", num_key_value_heads=1, vocab_size=300, eos_token_id=299)
    return save_hf_model(model, tmp_path_factory.mktemp("ray-llama"))


SP = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=3, prompt_logprobs=2)


@pytest.mark.timeout(240)
def test_ray_tp2_greedy_matches_tp1(ray_cluster, llama_dir):
    from kvflow.executor.ray_executor import RayExecutor
    args = dict(ENGINE_KW, max_num_batched_tokens=32)
    ref = LLM(llama_dir, **args).generate(PROMPTS, SP, use_tqdm=False)
    llm = LLM(llama_dir, tensor_parallel_size=2, distributed_executor_backend="ray", **args)
    try:
        eng = llm.llm_engine
        assert isinstance(eng.executor, RayExecutor)
        assert len(set(eng.executor.pids)) == 2 and os.getpid() not in eng.executor.pids
        _assert_same(ref, llm.generate(PROMPTS, SP, use_tqdm=False))
        assert eng.num_free_blocks() == eng.num_total_blocks()
        assert eng.workers_alive()
    finally:
        llm.shutdown()
    assert not llm.llm_engine.workers_alive()


@pytest.mark.timeout(240)
def test_ray_ep2_mixtral_matches_tp1(ray_cluster, tmp_path):
    d = save_hf_model(make_hf_moe("mixtral", num_local_experts=4, num_experts_per_tok=2),
                      tmp_path / "mixtral")
    args = dict(ENGINE_KW, max_num_batched_tokens=32)
    ref = LLM(d, **args).generate(PROMPTS[:2], SP, use_tqdm=False)
    llm = LLM(d, tensor_parallel_size=2, enable_expert_parallel=True,
              distributed_executor_backend="ray", **args)
    try:
        _assert_same(ref, llm.generate(PROMPTS[:2], SP, use_tqdm=False))
    finally:
        llm.shutdown()


@pytest.mark.timeout(180)
def test_ray_dead_actor_is_reported_not_hung(ray_cluster, llama_dir):
    llm = LLM(llama_dir, tensor_parallel_size=2, distributed_executor_backend="ray", **ENGINE_KW)
    eng = llm.llm_engine
    try:
        kill_rank_and_expect_dead(eng, notice_s=20, total_s=40)
        assert_async_engine_dies(eng)
    finally:
        eng.shutdown()


@pytest.mark.timeout(120)
def test_ray_single_rank(ray_cluster, llama_dir):
    """backend "ray" with one rank: one actor, same tokens as in-process."""
    args = dict(ENGINE_KW, max_num_batched_tokens=32)
    ref = LLM(llama_dir, **args).generate(PROMPTS[:2], SP, use_tqdm=False)
    llm = LLM(llama_dir, distributed_executor_backend="ray", **args)
    try:
        assert len(llm.llm_engine.executor.pids) == 1
        _assert_same(ref, llm.generate(PROMPTS[:2], SP, use_tqdm=False))
    finally:
        llm.shutdown()


@pytest.mark.timeout(180)
def test_ray_dead_actor_mid_step_is_reported(ray_cluster, llama_dir):
    """Killed while the survivor is inside the step's collectives: the step must not wait for
    the survivor (it would block until the gloo timeout)."""
    import threading
    from kvflow.executor import ExecutorDeadError
    llm = LLM(llama_dir, tensor_parallel_size=2, distributed_executor_backend="ray", **ENGINE_KW)
    eng = llm.llm_engine
    ex = eng.executor
    try:
        sp = SamplingParams(max_tokens=50, ignore_eos=True)
        threading.Timer(0.5, os.kill, (ex.pids[0], signal.SIGKILL)).start()
        t0 = time.monotonic()
        with pytest.raises(ExecutorDeadError, match="rank 0"):
            while time.monotonic() - t0 < 60:   # keep the ranks busy until the kill lands
                if not eng.has_unfinished_requests():
                    eng.add_request(None, list(range(1, 150)), sp)
                eng.step()
        assert time.monotonic() - t0 < 40
    finally:
        eng.shutdown()
