"""The server's failure model: bad input -> 4xx OpenAI error bodies naming the field (and the
server stays healthy), API keys, body-size limit, CORS, 429 when the queue is full, a failing
request failing alone, a dead or stalled engine reported by /health, never a hang."""
from __future__ import annotations

import threading
import time

import httpx
import pytest

from tests.test_server import (MODEL, ServerThread, chat_model_dir, make_engine, serve_args,  # noqa: F401
                               wait_engine_clean)

openai = pytest.importorskip("openai")

pytestmark = pytest.mark.timeout(120)

MAX_LEN = 512  # make_engine's max_model_len


@pytest.fixture(scope="module")
def engine(chat_model_dir):  # noqa: F811
    eng = make_engine(chat_model_dir)
    yield eng
    eng.shutdown(graceful=False)


@pytest.fixture(scope="module")
def server(engine):
    with ServerThread(engine, serve_args("--max-request-body-bytes", "64KiB",
                                         "--allowed-origins", "http://good.example")) as srv:
        yield srv


def _assert_error(resp: httpx.Response, status: int, param=None, code=None):
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err
        assert param.split("[")[0].split(".")[0] in err["message"], err
    if code is not None:
        assert err["code"] == code
    return err


CMPL = "/v1/completions"
CHAT = "/v1/chat/completions"
USER = [{"role": "user", "content": "hi"}]
LONG_PROMPT = list(range(1000, 1000 + MAX_LEN))

BAD_INPUTS = [
    # (path, body, status, param)
    (CMPL, {"prompt": "x", "max_tokens": "ten"}, 400, "max_tokens"),
    (CMPL, {"prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    (CMPL, {"prompt": "x", "max_tokens": 1.5}, 400, "max_tokens"),
    (CMPL, {"prompt": "x", "temperature": -0.5}, 400, "temperature"),
    (CMPL, {"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    (CMPL, {"prompt": "x", "top_p": 1.5}, 400, "top_p"),
    (CMPL, {"prompt": "x", "n": 0}, 400, "n"),
    (CMPL, {"prompt": "x", "n": True}, 400, "n"),
    (CMPL, {"prompt": "x", "presence_penalty": 3}, 400, "presence_penalty"),
    (CMPL, {"prompt": "x", "logit_bias": {"abc": 1}}, 400, "logit_bias"),
    (CMPL, {"prompt": "x", "logit_bias": {"99999999": 1}}, 400, "logit_bias"),
    (CMPL, {"prompt": "x", "logit_bias": {"5": 500}}, 400, "logit_bias"),
    (CMPL, {"prompt": "x", "logit_bias": ["5"]}, 400, "logit_bias"),
    (CMPL, {"prompt": "x", "logprobs": 50}, 400, "logprobs"),
    (CMPL, {"prompt": "x", "stop": [1]}, 400, "stop[0]"),
    (CMPL, {"prompt": "x", "seed": "abc"}, 400, "seed"),
    (CMPL, {"prompt": "x", "top_k": "x"}, 400, "top_k"),
    (CMPL, {"prompt": "x", "min_p": 2}, 400, "min_p"),
    (CMPL, {"prompt": "x", "repetition_penalty": 0}, 400, "repetition_penalty"),
    (CMPL, {"prompt": "x", "min_tokens": 20, "max_tokens": 5}, 400, "min_tokens"),
    (CMPL, {"prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options"),
    (CMPL, {"prompt": "x", "stream": "yes"}, 400, "stream"),
    (CMPL, {"prompt": 123}, 400, "prompt"),
    (CMPL, {"prompt": []}, 400, "prompt"),
    (CMPL, {"prompt": [1, "a"]}, 400, "prompt"),
    (CMPL, {"prompt": [10**9]}, 400, "prompt"),
    (CMPL, {"prompt": ""}, 400, "prompt"),
    (CMPL, {}, 400, "prompt"),
    (CMPL, {"prompt": LONG_PROMPT}, 400, "prompt"),
    (CMPL, {"prompt": [1, 2, 3], "max_tokens": MAX_LEN}, 400, "max_tokens"),
    (CMPL, {"prompt": "x", "suffix": "y"}, 400, "suffix"),
    (CMPL, {"prompt": "x", "priority": 5}, 400, "priority"),
    (CMPL, {"prompt": "x", "stop_token_ids": [10**9]}, 400, "stop_token_ids"),  # needs --scheduling-policy priority
    (CHAT, {"messages": []}, 400, "messages"),
    (CHAT, {}, 400, "messages"),
    (CHAT, {"messages": "hi"}, 400, "messages"),
    (CHAT, {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role"),
    (CHAT, {"messages": [{"content": "x"}]}, 400, "messages[0].role"),
    (CHAT, {"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    (CHAT, {"messages": [{"role": "user"}]}, 400, "messages[0].content"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     400, "messages[0].content"),
    (CHAT, {"messages": USER, "top_logprobs": 2}, 400, "top_logprobs"),
    (CHAT, {"messages": USER, "logprobs": True, "top_logprobs": 99}, 400, "top_logprobs"),
    (CHAT, {"messages": USER, "max_completion_tokens": -2}, 400, "max_completion_tokens"),
    (CHAT, {"messages": USER, "max_tokens": 10**6}, 400, "max_tokens"),
    (CHAT, {"messages": USER, "temperature": -1}, 400, "temperature"),
    (CHAT, {"messages": USER, "tools": [{"type": "function"}]}, 400, "tools"),
    (CHAT, {"messages": [{"role": "user", "content": "word " * MAX_LEN}]}, 400, "messages"),
    ("/tokenize", {}, 400, "prompt"),
    ("/detokenize", {"tokens": [-1]}, 400, "tokens"),
    ("/detokenize", {"tokens": "abc"}, 400, "tokens"),
]


@pytest.mark.parametrize("path,body,status,param", BAD_INPUTS,
                         ids=[f"{p.rsplit('/', 1)[-1]}-{param}-{i}"
                              for i, (p, _, _, param) in enumerate(BAD_INPUTS)])
def test_bad_input_matrix(server, engine, path, body, status, param):
    resp = httpx.post(server.url + path, json=body, timeout=30)
    _assert_error(resp, status, param)
    assert httpx.get(server.url + "/health").status_code == 200
    wait_engine_clean(engine)


def test_limits_message_for_long_prompt(server):
    err = _assert_error(httpx.post(server.url + CMPL, json={"prompt": LONG_PROMPT}), 400, "prompt")
    assert str(MAX_LEN) in err["message"] and str(len(LONG_PROMPT)) in err["message"]
    err = _assert_error(httpx.post(server.url + CMPL, json={"prompt": [1, 2, 3], "max_tokens": 600}),
                        400, "max_tokens")
    assert "600" in err["message"] and str(MAX_LEN) in err["message"]


def test_protocol_level_errors(server, engine):
    url = server.url
    headers = {"content-type": "application/json"}
    _assert_error(httpx.post(url + CMPL, content=b'{"prompt": "x",', headers=headers), 400)
    _assert_error(httpx.post(url + CMPL, content=b"[1, 2]", headers=headers), 400)
    err = _assert_error(httpx.post(url + CMPL, json={"model": "nope", "prompt": "x"}), 404,
                        code="model_not_found")
    assert err["param"] == "model" and "nope" in err["message"]
    _assert_error(httpx.post(url + CHAT, json={"model": "nope", "messages": USER}), 404,
                  code="model_not_found")
    _assert_error(httpx.get(url + "/v1/models/nope"), 404, code="model_not_found")
    _assert_error(httpx.post(url + CMPL, content=b"x" * (100 << 10), headers=headers), 413)
    _assert_error(httpx.get(url + "/v1/no-such-route"), 404)
    _assert_error(httpx.get(url + CMPL), 405)
    assert httpx.get(url + "/health").status_code == 200
    # The official client maps the errors to its exception classes.
    client = server.client()
    with pytest.raises(openai.BadRequestError) as ei:
        client.completions.create(model=MODEL, prompt="x", max_tokens=-5)
    assert ei.value.body["param"] == "max_tokens"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="missing", messages=USER)
    wait_engine_clean(engine)


def test_cors(server):
    pre = {"origin": "http://good.example", "access-control-request-method": "POST",
           "access-control-request-headers": "authorization, content-type"}
    ok = httpx.options(server.url + CMPL, headers=pre)
    assert ok.status_code == 200
    assert ok.headers["access-control-allow-origin"] == "http://good.example"
    bad = httpx.options(server.url + CMPL, headers=dict(pre, origin="http://evil.example"))
    assert "access-control-allow-origin" not in bad.headers


def test_api_key(engine, monkeypatch):
    body = {"model": MODEL, "prompt": "x", "max_tokens": 2}
    with ServerThread(engine, serve_args("--api-key", "s3cret")) as srv:
        _assert_error(httpx.post(srv.url + CMPL, json=body), 401)
        _assert_error(httpx.post(srv.url + CMPL, json=body,
                                 headers={"authorization": "Bearer wrong"}), 401)
        _assert_error(httpx.get(srv.url + "/v1/models"), 401)
        _assert_error(httpx.post(srv.url + "/tokenize", json={"prompt": "x"}), 401)
        assert httpx.post(srv.url + CMPL, json=body,
                          headers={"authorization": "Bearer s3cret"}).status_code == 200
        assert httpx.get(srv.url + "/health").status_code == 200
        assert httpx.get(srv.url + "/metrics").status_code == 200
        with pytest.raises(openai.AuthenticationError):
            srv.client(api_key="nope").models.list()
        assert srv.client(api_key="s3cret").models.list().data[0].id == MODEL
    monkeypatch.setenv("KVFLOW_API_KEY", "from-env")
    with ServerThread(engine, serve_args()) as srv:
        _assert_error(httpx.post(srv.url + CMPL, json=body), 401)
        assert srv.client(api_key="from-env").completions.create(**body).choices
    monkeypatch.delenv("KVFLOW_API_KEY")
    with ServerThread(engine, serve_args()) as srv:  # key off: no header needed
        assert httpx.post(srv.url + CMPL, json=body).status_code == 200
    wait_engine_clean(engine)


# ---------------------------------------------------------------------------------- failures
def test_request_failure_is_isolated(server, engine, monkeypatch):
    executor = engine.engine.executor
    real = executor.launch  # the engine launches steps (then resolves them)
    calls = {"n": 0}

    def failing_once(so):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected kernel failure")
        return real(so)

    monkeypatch.setattr(executor, "launch", failing_once)
    client = server.client()
    with pytest.raises(openai.InternalServerError, match="injected kernel failure"):
        client.completions.create(model=MODEL, prompt="boom", max_tokens=3)
    r = client.completions.create(model=MODEL, prompt="fine", max_tokens=3)
    assert r.choices[0].finish_reason in ("stop", "length")
    calls["n"] = 0  # and the streaming flavour: an in-band error event
    with pytest.raises(openai.APIError, match="injected kernel failure"):
        for _ in client.chat.completions.create(model=MODEL, messages=USER, max_tokens=3,
                                                stream=True):
            pass
    assert httpx.get(server.url + "/health").status_code == 200
    wait_engine_clean(engine)


@pytest.fixture
def limited(chat_model_dir):  # noqa: F811
    """One sequence at a time, at most one waiting, a short stall threshold."""
    eng = make_engine(chat_model_dir, max_num_seqs=1)
    with ServerThread(eng, serve_args("--max-queued-requests", "1",
                                      "--health-stall-timeout", "0.5")) as srv:
        yield eng, srv
    eng.shutdown(graceful=False)


def test_queue_full_429_at_once(limited, monkeypatch):
    eng, srv = limited
    real = eng.engine.step

    def slow_step():  # the tiny model is too quick to keep a request running otherwise
        time.sleep(0.01)
        return real()

    monkeypatch.setattr(eng.engine, "step", slow_step)
    body = {"model": MODEL, "prompt": "x", "max_tokens": 400, "stream": True, "ignore_eos": True}
    with httpx.Client(timeout=30) as h1, httpx.Client(timeout=30) as h2:
        with h1.stream("POST", srv.url + CMPL, json=body) as running:
            lines = running.iter_lines()  # keep it: a dropped iterator closes the connection
            next(lines)
            with h2.stream("POST", srv.url + CMPL, json=body) as waiting:
                assert waiting.status_code == 200
                deadline = time.monotonic() + 5
                while eng.engine_stats().num_waiting != 1:
                    assert time.monotonic() < deadline, eng.engine_stats()
                    time.sleep(0.01)
                t0 = time.monotonic()
                resp = httpx.post(srv.url + CMPL, json=dict(body, stream=False), timeout=10)
                assert time.monotonic() - t0 < 2.0
                err = _assert_error(resp, 429)
                assert "max_queued_requests=1" in err["message"]
                with pytest.raises(openai.RateLimitError):
                    srv.client().completions.create(model=MODEL, prompt="y", max_tokens=2)
    wait_engine_clean(eng)
    assert httpx.post(srv.url + CMPL, json=dict(body, stream=False, max_tokens=2)).status_code == 200


def test_stalled_engine_is_unhealthy(limited, monkeypatch):
    eng, srv = limited
    release = threading.Event()
    real = eng.engine.step

    def slow_step():
        release.wait(10)
        return real()

    monkeypatch.setattr(eng.engine, "step", slow_step)
    result = {}
    t = threading.Thread(target=lambda: result.setdefault(
        "r", srv.client().completions.create(model=MODEL, prompt="x", max_tokens=2)))
    t.start()
    try:
        deadline = time.monotonic() + 10
        while httpx.get(srv.url + "/health").status_code != 503:
            assert time.monotonic() < deadline, "stall not reported"
            time.sleep(0.05)
        assert "no progress" in httpx.get(srv.url + "/health").json()["error"]["message"]
    finally:
        monkeypatch.setattr(eng.engine, "step", real)
        release.set()
        t.join(20)
    assert result["r"].choices[0].finish_reason in ("stop", "length")
    assert httpx.get(srv.url + "/health").status_code == 200


def test_engine_death(chat_model_dir):  # noqa: F811
    eng = make_engine(chat_model_dir)
    try:
        with ServerThread(eng, serve_args()) as srv:
            client = srv.client()
            assert client.completions.create(model=MODEL, prompt="x", max_tokens=2).choices
            stream = client.completions.create(model=MODEL, prompt="x", max_tokens=400, stream=True,
                                               extra_body={"ignore_eos": True})
            it = iter(stream)
            next(it)

            def broken_step():
                raise RuntimeError("scheduler invariant violated")

            eng.engine.step = broken_step  # the engine thread's next step kills the engine
            with pytest.raises(openai.APIError, match="engine died"):
                for _ in it:
                    pass
            health = httpx.get(srv.url + "/health")
            _assert_error(health, 503)
            assert "scheduler invariant violated" in health.json()["error"]["message"]
            t0 = time.monotonic()
            with pytest.raises(openai.InternalServerError, match="dead"):
                client.completions.create(model=MODEL, prompt="x", max_tokens=2)
            assert time.monotonic() - t0 < 5
            assert not eng.is_healthy()
    finally:
        eng.shutdown(graceful=False)
