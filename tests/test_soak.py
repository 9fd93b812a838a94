"""A bounded reliability soak on localhost (CPU, tiny model): 64 concurrent streaming greedy
clients with client aborts and bad requests mixed in, for two rounds.

Asserts: no 5xx for any request (valid or not), every valid greedy stream equals its
single-request reference, every KV block back in the pool (engine and /metrics), the server
healthy afterwards, and resident memory not growing between the rounds."""
from __future__ import annotations

import asyncio
import json
import random

import httpx
import pytest

from tests.test_server import (MODEL, ServerThread, chat_model_dir, make_engine, metric,  # noqa: F401
                               serve_args, wait_engine_clean)

pytestmark = pytest.mark.timeout(150)

N_VALID, N_ABORT, MAX_TOKENS = 64, 12, 10
MAX_LEN = 512


@pytest.fixture(scope="module")
def server(chat_model_dir):  # noqa: F811
    engine = make_engine(chat_model_dir, max_model_len=MAX_LEN)
    with ServerThread(engine, serve_args()) as srv:
        srv.engine = engine
        yield srv
    engine.shutdown(graceful=False)


def _rss_mib() -> float:
    import os
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


BAD = [  # (path, raw body) — each must get a 4xx, never a 5xx
    ("/v1/completions", {"prompt": "x", "max_tokens": -3}),
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}),
    ("/v1/completions", {"prompt": "x", "model": "no-such-model"}),
    ("/v1/completions", {"prompt": list(range(1000, 1000 + MAX_LEN + 5)), "max_tokens": 2}),
    ("/v1/completions", {"prompt": [10**9], "max_tokens": 2}),
    ("/v1/completions", {"max_tokens": 2}),
    ("/v1/chat/completions", {"messages": "not a list"}),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}),
    ("/v1/completions", b"{not json"),
    ("/v1/completions", {"prompt": "x", "n": 0, "stream": True}),
]


async def _valid(client, url, prompt):
    body = {"model": MODEL, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
            "ignore_eos": True, "stream": True}
    parts = []
    async with client.stream("POST", url + "/v1/completions", json=body) as resp:
        if resp.status_code != 200:
            return resp.status_code, prompt, (await resp.aread()).decode()
        async for line in resp.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                obj = json.loads(line[6:])
                if "error" in obj:  # an error event inside a 200 stream counts as a 5xx
                    return 500, prompt, obj["error"]
                parts.append(obj["choices"][0]["text"])
    return 200, prompt, "".join(parts)


async def _abort(client, url, i, rng):
    """Start a long stream, read a few events, then drop the connection (a disconnect)."""
    body = {"model": MODEL, "prompt": f"Abort me {i}", "max_tokens": 300, "ignore_eos": True,
            "stream": rng.random() < 0.75}
    if not body["stream"]:
        try:  # a non-streaming client that gives up: the server must abort the request
            await client.post(url + "/v1/completions", json=body, timeout=0.3 + rng.random() * 0.5)
        except httpx.TimeoutException:
            return 0
        return -1
    async with client.stream("POST", url + "/v1/completions", json=body) as resp:
        if resp.status_code != 200:
            return resp.status_code
        n = 0
        async for _ in resp.aiter_lines():
            n += 1
            if n >= rng.randint(1, 6):
                break
    return 0


async def _bad(client, url, path, body):
    if isinstance(body, bytes):
        r = await client.post(url + path, content=body, headers={"content-type": "application/json"})
    else:
        r = await client.post(url + path, json=body)
    return r.status_code


async def _round(url, prompts, seed):
    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        jobs = [("valid", _valid(client, url, p)) for p in prompts]
        jobs += [("abort", _abort(client, url, i, rng)) for i in range(N_ABORT)]
        jobs += [("bad", _bad(client, url, p, b)) for p, b in BAD]
        rng.shuffle(jobs)
        results = await asyncio.gather(*(j for _, j in jobs))
    return [(kind, res) for (kind, _), res in zip(jobs, results)]


def test_soak_64_streams_with_aborts_and_bad_requests(server):
    url, engine = server.url, server.engine
    prompts = [f"Soak client {i}: describe item {i * 13 % 97}" for i in range(N_VALID)]
    with httpx.Client(timeout=60) as h:
        refs = {}
        for p in prompts:  # single-request greedy references, one at a time
            r = h.post(url + "/v1/completions", json={"model": MODEL, "prompt": p, "temperature": 0,
                                                      "max_tokens": MAX_TOKENS, "ignore_eos": True})
            assert r.status_code == 200, r.text
            refs[p] = r.json()["choices"][0]["text"]

    aborted_before = metric(httpx.get(url + "/metrics").text, "kvflow:request_success_total",
                            finished_reason="abort")
    rss = []
    for round_no in range(2):
        out = asyncio.run(asyncio.wait_for(_round(url, prompts, seed=round_no), timeout=90))
        valid = [res for kind, res in out if kind == "valid"]
        assert [v[0] for v in valid] == [200] * N_VALID, [v for v in valid if v[0] != 200][:3]
        mismatched = [(p, t, refs[p]) for _, p, t in valid if t != refs[p]]
        assert not mismatched, mismatched[:3]
        bad = [res for kind, res in out if kind == "bad"]
        assert all(400 <= s < 500 for s in bad), bad
        aborts = [res for kind, res in out if kind == "abort"]
        assert all(s in (0, -1) for s in aborts), aborts
        wait_engine_clean(engine, timeout=20)
        rss.append(_rss_mib())

    text = httpx.get(url + "/metrics").text
    assert metric(text, "kvflow:num_free_kv_blocks") == metric(text, "kvflow:num_total_kv_blocks")
    assert metric(text, "kvflow:num_requests_running") == 0
    # The disconnects really aborted requests mid-generation (300 tokens never finish in time).
    aborted = metric(text, "kvflow:request_success_total", finished_reason="abort") - aborted_before
    assert N_ABORT <= aborted <= 2 * N_ABORT, aborted
    assert metric(text, "kvflow:num_requests_waiting") == 0
    assert httpx.get(url + "/health").status_code == 200
    # Memory is stable: the second round (same load) does not keep what the first allocated.
    assert rss[1] - rss[0] < 64, rss
