"""Sleep mode (issue 8) on CPU: what the semantics promise — exact outputs and buffers after
wake-up (prompts reach far rotary positions), level-2 refusal until weights are reloaded, wake
in either order, reload of other weights == a fresh engine with them (and no stale prefix
cache), requests in flight aborted or finished, no leaked KV block (make_llm checks). Device
memory is covered by the gpu-marked test at the end."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from kvflow import SamplingParams
from kvflow.engine.llm_engine import EngineSleepingError
from tests.conftest import DEVICE, make_hf_model, save_hf_model

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
# max_position_embeddings 1024 (TINY): 700-token prompts use far rotary positions.
LENGTHS = (700, 37)


def _prompts(seed=0, lengths=LENGTHS):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 383, size=n).tolist() for n in lengths]


def _gen(llm, prompts, params=GREEDY):
    return llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)


def _tokens(outs):
    return [o.outputs[0].token_ids for o in outs]


def _model(llm):
    return llm.llm_engine.executor.worker.model


def _hashes(llm) -> dict[str, str]:
    """sha256 of every parameter and every named buffer (persistent or not)."""
    m = _model(llm)
    out = {}
    for kind, items in (("param", m.named_parameters()), ("buffer", m.named_buffers())):
        for name, t in items:
            out[f"{kind}:{name}"] = hashlib.sha256(
                t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def other_llama(tmp_path_factory):
    """The same architecture with different weights (a 'trained' model)."""
    torch.manual_seed(99)
    model = make_hf_model("llama")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model, save_hf_model(model, tmp_path_factory.mktemp("other-llama"))


def _sleepy(make_llm, path, **kw):
    return make_llm(path, enable_sleep_mode=True, **kw)


def test_sleep_needs_sleep_mode(tiny_llama, make_llm):
    llm = make_llm(tiny_llama[1])
    with pytest.raises(RuntimeError, match="enable_sleep_mode"):
        llm.sleep(1)
    with pytest.raises(RuntimeError, match="enable_sleep_mode"):
        llm.wake_up()


def test_level1_roundtrip_exact(tiny_llama, make_llm):
    llm = _sleepy(make_llm, tiny_llama[1])
    prompts = _prompts()
    before, hashes = _tokens(_gen(llm, prompts)), _hashes(llm)
    assert not llm.is_sleeping()
    llm.sleep(level=1)
    assert llm.is_sleeping()
    assert all(p.numel() == 0 for p in _model(llm).parameters())  # really released
    assert not llm.llm_engine.executor.worker.runner.kv_caches
    assert llm.llm_engine.last_sleep_freed_bytes > 0
    with pytest.raises(EngineSleepingError, match="sleeping"):
        _gen(llm, prompts[:1])
    with pytest.raises(RuntimeError, match="already sleeping"):
        llm.sleep(1)
    llm.wake_up()
    assert not llm.is_sleeping()
    assert _hashes(llm) == hashes
    after = _gen(llm, prompts)
    assert _tokens(after) == before
    # The prefix cache was cleared on sleep: nothing of the first run is reused.
    assert all(o.num_cached_tokens == 0 for o in after)


@pytest.mark.parametrize("order", [("weights", "kv_cache"), ("kv_cache", "weights")])
def test_level2_wake_order_and_reload(tiny_llama, make_llm, order):
    hf, path = tiny_llama
    llm = _sleepy(make_llm, path)
    prompts = _prompts()
    before, hashes = _tokens(_gen(llm, prompts)), _hashes(llm)
    buffers = {k for k in hashes if k.startswith("buffer:")}
    assert any("cos_sin_cache" in k for k in buffers)
    llm.sleep(level=2)
    m = _model(llm)
    assert all(b.numel() == 0 for b in m.buffers())  # buffers released too
    llm.wake_up(tags=[order[0]])
    assert llm.is_sleeping()
    with pytest.raises(EngineSleepingError):
        _gen(llm, prompts[:1])
    llm.wake_up(tags=[order[1]])
    assert not llm.is_sleeping()
    now = _hashes(llm)
    assert {k: now[k] for k in buffers} == {k: hashes[k] for k in buffers}  # every buffer restored
    with pytest.raises(EngineSleepingError, match="reload_weights"):
        _gen(llm, prompts[:1])
    if order[0] == "weights":
        llm.reload_weights()  # re-read the checkpoint
    else:
        llm.reload_weights(hf.state_dict().items())  # as a trainer sends them (q/k/v apart)
    assert _hashes(llm) == hashes
    assert _tokens(_gen(llm, prompts)) == before


def test_reload_other_weights_equals_fresh_engine(tiny_llama, other_llama, make_llm):
    llm = _sleepy(make_llm, tiny_llama[1])
    prompts = _prompts()
    _gen(llm, prompts)
    assert _gen(llm, prompts)[0].num_cached_tokens > 0  # cached before the reload
    # Level 2 + weights sent in two batches: serving is refused until every one has arrived.
    llm.sleep(level=2)
    llm.wake_up()
    items = list(other_llama[0].state_dict().items())
    half = len(items) // 2
    llm.reload_weights(items[:half])
    with pytest.raises(EngineSleepingError, match="reload_weights"):
        _gen(llm, prompts[:1])
    llm.reload_weights(iter(items[half:]))
    got = _gen(llm, prompts)
    fresh = make_llm(other_llama[1])
    assert _tokens(got) == _tokens(_gen(fresh, prompts))
    assert all(o.num_cached_tokens == 0 for o in got)


def test_reload_awake_resets_prefix_cache(tiny_llama, other_llama, make_llm):
    llm = make_llm(tiny_llama[1])  # reload_weights works without sleep mode
    prompts = _prompts()
    _gen(llm, prompts)
    llm.reload_weights(other_llama[0].state_dict().items())
    got = _gen(llm, prompts)
    assert all(o.num_cached_tokens == 0 for o in got)
    fresh = make_llm(other_llama[1])
    assert _tokens(got) == _tokens(_gen(fresh, prompts))


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_in_flight_abort(tiny_llama, make_llm, async_scheduling):
    llm = _sleepy(make_llm, tiny_llama[1], async_scheduling=async_scheduling)
    eng = llm.llm_engine
    prompts = _prompts(lengths=(50, 20, 9))
    for i, p in enumerate(prompts):
        eng.add_request(str(i), {"prompt_token_ids": p}, GREEDY)
    eng.step()
    eng.step()
    outs = llm.sleep(level=1)  # default: abort
    assert sorted(o.request_id for o in outs) == ["0", "1", "2"]
    assert all(o.finished and o.outputs[0].finish_reason == "abort" for o in outs)
    assert all("sleep" in o.error for o in outs)
    assert not eng.has_unfinished_requests()
    assert eng.num_free_blocks() == eng.num_total_blocks()
    llm.wake_up()
    assert _tokens(_gen(llm, prompts)) == _tokens(_gen(llm, prompts))


def test_in_flight_finish(tiny_llama, make_llm):
    llm = _sleepy(make_llm, tiny_llama[1])
    prompts = _prompts(lengths=(50, 20))
    expected = _tokens(_gen(llm, prompts))
    eng = llm.llm_engine
    for i, p in enumerate(prompts):
        eng.add_request(str(i), {"prompt_token_ids": p}, GREEDY)
    eng.step()
    outs = [o for o in llm.sleep(level=2, in_flight="finish") if o.finished]
    assert sorted(o.request_id for o in outs) == ["0", "1"]
    got = {o.request_id: o.outputs[0] for o in outs}
    assert [got["0"].token_ids, got["1"].token_ids] == expected
    assert all(c.finish_reason == "length" for c in got.values())
    llm.wake_up()
    llm.reload_weights()
    assert _tokens(_gen(llm, prompts)) == expected


def test_bad_arguments(tiny_llama, make_llm):
    llm = _sleepy(make_llm, tiny_llama[1])
    with pytest.raises(ValueError, match="level"):
        llm.sleep(3)
    with pytest.raises(ValueError, match="in_flight"):
        llm.sleep(1, in_flight="later")
    llm.sleep(1)
    with pytest.raises(ValueError, match="tags"):
        llm.wake_up(["gpu"])
    with pytest.raises(RuntimeError, match="wake_up"):
        llm.reload_weights()  # weights asleep
    llm.wake_up("weights")
    llm.wake_up("kv_cache")
    assert not llm.is_sleeping()
    llm.wake_up()  # already awake: a no-op


def test_server_endpoints(tiny_llama):
    pytest.importorskip("fastapi")
    import httpx

    from kvflow.engine.async_engine import AsyncLLM
    from kvflow.server.api_server import build_app
    from kvflow.server.cli_args import parse_serve_args

    async def main(engine, app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            body = {"model": "m", "prompt": _prompts(lengths=(40,))[0], "max_tokens": 4,
                    "temperature": 0}
            first = (await c.post("/v1/completions", json=body)).json()["choices"][0]["text"]
            assert (await c.get("/is_sleeping")).json() == {"is_sleeping": False}
            r = await c.post("/sleep", params={"level": 1})
            assert r.status_code == 200 and r.json()["freed_bytes"] > 0
            assert (await c.get("/is_sleeping")).json() == {"is_sleeping": True}
            assert (await c.post("/sleep", params={"level": 1})).status_code == 409
            assert (await c.post("/v1/completions", json=body)).status_code == 503
            assert (await c.post("/sleep", params={"level": 5})).status_code in (400, 409)
            assert (await c.post("/wake_up", params={"tags": "kv_cache"})).json() == {"is_sleeping": True}
            assert (await c.post("/wake_up", params={"tags": "weights"})).json() == {"is_sleeping": False}
            r = await c.post("/v1/completions", json=body)
            assert r.status_code == 200 and r.json()["choices"][0]["text"] == first

    engine = AsyncLLM.from_engine_args(tiny_llama[1], log_interval=None, log_stats=False,
                                       device="cpu", kv_cache_memory=8 << 20, max_model_len=512,
                                       skip_tokenizer_init=True,
                                       enable_sleep_mode=True)
    try:
        args = parse_serve_args(["--served-model-name", "m", "--enable-sleep-mode"])
        import asyncio
        asyncio.run(main(engine, build_app(engine, args)))
    finally:
        engine.shutdown(graceful=False, timeout=5)


@pytest.mark.gpu
def test_gpu_memory_returns_and_cycles(tmp_path):
    """On the device: free memory rises by >= weights (+ KV) - 5% after sleep; 20 sleep/wake
    cycles with CUDA graphs keep memory flat and outputs unchanged."""
    from kvflow import LLM
    model = make_hf_model("llama", hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                          num_attention_heads=16, num_key_value_heads=8, vocab_size=32000,
                          eos_token_id=31999)
    path = save_hf_model(model, tmp_path / "mid")
    llm = LLM(path, device="cuda", dtype="bfloat16", enable_sleep_mode=True,
              skip_tokenizer_init=True, kv_cache_memory=1 << 30, max_model_len=1024,
              max_num_seqs=16)
    worker = llm.llm_engine.executor.worker
    assert worker.runner.graphs is not None  # CUDA graphs in use
    prompts = _prompts(lengths=(900, 300, 5))
    ref = _tokens(_gen(llm, prompts, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)))
    weights = worker.weights_bytes
    kv = sum(c.numel() * c.element_size() for c in worker.runner.kv_caches)
    baseline = None
    for cycle in range(20):
        level = 1 if cycle % 2 == 0 else 2
        free0 = torch.cuda.mem_get_info()[0]
        llm.sleep(level)
        freed = torch.cuda.mem_get_info()[0] - free0
        assert freed >= 0.95 * (weights + kv), (cycle, freed, weights, kv)
        assert llm.llm_engine.last_sleep_freed_bytes >= 0.95 * (weights + kv)
        llm.wake_up(["kv_cache"] if cycle % 3 == 0 else None)
        llm.wake_up()
        if level == 2:
            llm.reload_weights()
        assert worker.runner.graphs is not None
        out = _tokens(_gen(llm, prompts, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)))
        assert out == ref, cycle
        used = torch.cuda.memory_allocated()
        baseline = used if baseline is None else baseline
        assert used <= baseline + (8 << 20), (cycle, used, baseline)  # no growth
