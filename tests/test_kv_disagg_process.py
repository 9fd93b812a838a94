"""Disaggregation with real processes: `kvflow serve --kv-transfer-config` twice and
`kvflow proxy`, as a user starts them. The prefill process is SIGKILLed between its answer and
the decode instance's pull: with failure_policy "recompute" the client still gets the colocated
tokens, and the decode instance's KV pool returns to empty."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from tests.test_server import MODEL, chat_model_dir  # noqa: F401

openai = pytest.importorskip("openai")
pytest.importorskip("zmq")
pytestmark = pytest.mark.timeout(300)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args, log):
    env = dict(os.environ, PYTHONPATH=os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, "-m", "kvflow.cli", "--log-level", "WARNING", *args],
                            stdout=log, stderr=subprocess.STDOUT, env=env)


def wait_up(url, proc, timeout=180):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"{url} exited with {proc.returncode}"
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"{url} did not come up")


def test_processes_proxy_and_killed_prefill(chat_model_dir, tmp_path):  # noqa: F811
    common = [chat_model_dir, "--device", "cpu", "--max-model-len", "512", "--kv-cache-memory",
              str(8 << 20), "--served-model-name", MODEL, "--host", "127.0.0.1",
              "--disable-uvicorn-access-log"]
    ports = [free_port() for _ in range(3)]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    log = open(tmp_path / "servers.log", "wb")
    procs = [
        start(["serve", *common, "--port", str(ports[0]), "--kv-transfer-config",
               json.dumps({"connector": "p2p", "role": "producer"})], log),
        start(["serve", *common, "--port", str(ports[1]), "--kv-transfer-config",
               json.dumps({"connector": "p2p", "role": "consumer", "timeout_s": 2,
                           "failure_policy": "recompute"})], log),
        start(["proxy", "--prefill", urls[0], "--decode", urls[1], "--host", "127.0.0.1",
               "--port", str(ports[2])], log),
    ]
    try:
        for url, proc in zip(urls, procs):
            wait_up(url, proc)
        client = openai.OpenAI(base_url=urls[2] + "/v1", api_key="x", max_retries=0, timeout=60)
        prompt = "Once upon a time, in a land far away, there lived a"
        kw = dict(model=MODEL, prompt=prompt, max_tokens=10, temperature=0.0,
                  extra_body={"ignore_eos": True})
        via_proxy = client.completions.create(**kw).choices[0].text
        # The decode instance alone (no transfer) is the colocated reference.
        direct = openai.OpenAI(base_url=urls[1] + "/v1", api_key="x", max_retries=0, timeout=60)
        assert direct.completions.create(**kw).choices[0].text == via_proxy
        # Prefill answers, then dies before the decode instance pulls.
        r = httpx.post(urls[0] + "/v1/completions", timeout=30, json={
            "model": MODEL, "prompt": prompt, "max_tokens": 1,
            "kv_transfer_params": {"do_remote_decode": True}})
        params = r.json()["kv_transfer_params"]
        procs[0].send_signal(signal.SIGKILL)
        procs[0].wait(10)
        out = direct.completions.create(**dict(kw, extra_body={
            "ignore_eos": True, "kv_transfer_params": params}))
        assert out.choices[0].text == via_proxy
        # The decode instance's pool is empty again.
        metrics = httpx.get(urls[1] + "/metrics", timeout=10).text
        usage = [line for line in metrics.splitlines() if line.startswith("kvflow:kv_cache_usage_perc")]
        assert usage and float(usage[0].split()[-1]) == 0.0
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
        log.close()
