"""Client side of benchmarks/disagg_device.sh: TTFT and inter-token latency of one OpenAI
endpoint (a colocated server, or the disaggregation proxy), plus greedy agreement with a
reference run. Prompts are random token ids (servers run --skip-tokenizer-init with dummy
weights), so every streamed chunk carries tokens and no text: chunks are timed, not text.

  python benchmarks/disagg_bench.py --url http://127.0.0.1:8400 --label disagg-nccl \
      --out results.json [--reference colocated]
Appends {"label", "phases": {...}, "greedy_tokens": [...]} to the JSON list in --out.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import time

import httpx


def pct(xs, q):
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def summary(xs):
    return {"mean_ms": 1000 * statistics.fmean(xs) if xs else None,
            "p50_ms": 1000 * pct(xs, 50) if xs else None,
            "p90_ms": 1000 * pct(xs, 90) if xs else None,
            "p99_ms": 1000 * pct(xs, 99) if xs else None}


async def one(client, url, model, prompt, max_tokens):
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
            "ignore_eos": True, "stream": True}
    t0 = time.perf_counter()
    ttft, last, itl, n = None, None, [], 0
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            obj = json.loads(line[5:])
            if "error" in obj:
                raise RuntimeError(f"stream error: {obj['error']}")
            if not obj.get("choices"):
                continue
            now = time.perf_counter()
            if ttft is None:
                ttft = now - t0
            else:
                itl.append(now - last)
            last = now
            n += 1
    return ttft, itl, time.perf_counter() - t0


async def phase(url, model, prompts, max_tokens, concurrency):
    sem = asyncio.Semaphore(concurrency)
    ttfts, itls, lats = [], [], []
    async with httpx.AsyncClient(timeout=httpx.Timeout(3600.0)) as client:
        async def run(p):
            async with sem:
                t, i, lat = await one(client, url, model, p, max_tokens)
                ttfts.append(t)
                itls.extend(i)
                lats.append(lat)
        t0 = time.perf_counter()
        await asyncio.gather(*(run(p) for p in prompts))
        wall = time.perf_counter() - t0
    return {"requests": len(prompts), "concurrency": concurrency, "input_len": len(prompts[0]),
            "output_len": max_tokens, "wall_s": wall,
            "output_tok_s": len(prompts) * max_tokens / wall,
            "ttft": summary(ttfts), "itl": summary(itls), "e2e": summary(lats)}


def greedy_tokens(url, model, prompts, max_tokens):
    """Token ids of greedy completions (logprobs name them 'token_id:N' without a tokenizer)."""
    out = []
    with httpx.Client(timeout=600.0) as c:
        for p in prompts:
            r = c.post(url + "/v1/completions", json={
                "model": model, "prompt": p, "max_tokens": max_tokens, "temperature": 0.0,
                "ignore_eos": True, "logprobs": 0})
            r.raise_for_status()
            out.append(r.json()["choices"][0]["logprobs"]["tokens"])
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--label", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="bench")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--reference", default=None, help="label whose greedy tokens to compare")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)

    def prompts(n, length):
        return [[rng.randrange(100, args.vocab) for _ in range(length)] for _ in range(n)]

    url = args.url.rstrip("/")
    one_prompt = prompts(1, 64)
    asyncio.run(phase(url, args.model, one_prompt, 8, 1))  # warm-up (first-use compiles)
    record = {"label": args.label, "url": url, "time": time.time(), "phases": {}}
    # Latency alone: one request at a time.
    record["phases"]["single_2k_in_128_out"] = asyncio.run(
        phase(url, args.model, prompts(8, 2048), 128, 1))
    # Decode under prefill pressure: long prompts arriving while others decode. This is where
    # disaggregation should keep inter-token latency flat.
    record["phases"]["load_4k_in_256_out_c16"] = asyncio.run(
        phase(url, args.model, prompts(64, 4096), 256, 16))
    greedy_prompts = prompts(4, 300)
    record["greedy_tokens"] = greedy_tokens(url, args.model, greedy_prompts, 32)

    results = []
    if os.path.exists(args.out):
        with open(args.out) as f:
            results = json.load(f)
    if args.reference:
        ref = next((r for r in results if r["label"] == args.reference), None)
        if ref is not None:
            same = sum(a == b for x, y in zip(ref["greedy_tokens"], record["greedy_tokens"])
                       for a, b in zip(x, y))
            total = sum(len(x) for x in ref["greedy_tokens"])
            record["greedy_agreement_vs_" + args.reference] = same / max(total, 1)
    results.append(record)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    s, l = record["phases"]["single_2k_in_128_out"], record["phases"]["load_4k_in_256_out_c16"]
    print(f"{args.label}: single TTFT p50 {s['ttft']['p50_ms']:.1f} ms ITL p50 "
          f"{s['itl']['p50_ms']:.2f} ms | load TTFT p50 {l['ttft']['p50_ms']:.1f} ms ITL p50 "
          f"{l['itl']['p50_ms']:.2f} p99 {l['itl']['p99_ms']:.2f} ms, {l['output_tok_s']:.0f} tok/s")


if __name__ == "__main__":
    main()
