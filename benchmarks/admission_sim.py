"""Admission control against vLLM-style admission, on the scheduler alone (no model, CPU).

    python3 benchmarks/admission_sim.py [--workloads t8k,nanovllm,chat]

Drives kvflow's Scheduler with fake model steps and prices each step with a coarse cost model
(below), so schedules can be compared in seconds before spending device time:

- t8k / nanovllm: the anchors' throughput8k and nanovllm (ignore_eos) on Mixtral-8x7B's KV
  cache on one H200 (282,368 tokens in 64-token blocks), with and without admission control,
  and with the 384 sequences / 8192 tokens set by hand in sessions 12-17;
- chat: 2000 requests, prompts U(100, 1000), outputs ending at EOS after Exp(300) tokens,
  max_tokens unset or 1024, on caches of 60K and 200K tokens (an 8B model's step costs).

Per step it counts the tokens computed (recomputed prompts included) and the requests running;
the model-seconds are only as good as the cost model: they rank admission policies, they are not
times. They do not rank step budgets or request orders: their flat per-request decode cost makes
prompt tokens that ride in decode steps look free, and the H200 disagreed (session 19,
benchmarks/order_probe.py). benchmarks/ride_sim.py prices steps by measured product times and
does rank ride budgets.
"""
from __future__ import annotations

import argparse
import random

from kvflow.core.sched_output import RunnerOutput
from kvflow.core.scheduler import Scheduler
from kvflow.request import Request
from kvflow.sampling_params import SamplingParams

EOS = 99_999
KV_BYTES = 131072          # per token: Mixtral-8x7B and Llama-3.1-8B
HBM = 4.3e9                # bytes per ms


def mixtral_ms(tokens: int, reqs: int, kv_tokens: int) -> float:
    """Decode ~17 ms of expert reads + 0.05 ms a request (profiles of sessions 12-17); prefill
    at the grouped GEMM's 585 TFLOP/s (12.9B active parameters); KV read at 4.3 TB/s."""
    return max(17 + 0.05 * reqs, tokens * 0.044) + kv_tokens * KV_BYTES / HBM


def dense8b_ms(tokens: int, reqs: int, kv_tokens: int) -> float:
    return max(4.0 + 0.04 * reqs, tokens * 0.025) + kv_tokens * KV_BYTES / HBM


def fake_output(s: Scheduler, so, stop_at: dict | None = None) -> RunnerOutput:
    """A model's output for the scheduled step `so`: every request that caught up samples
    token 1, or EOS once its output reaches stop_at[rid] tokens."""
    sampled = {}
    for rid in so.num_scheduled_tokens:
        r = s.requests[rid]
        if r.num_computed_tokens == r.num_tokens:
            end = (stop_at or {}).get(rid)
            sampled[rid] = [EOS if end is not None and r.num_output_tokens + 1 >= end else 1]
    return RunnerOutput(sampled_token_ids=sampled)


def simulate(requests, cost, *, cap_tokens, block_size, max_num_seqs, budget, admission,
             stop_at=None, ride_budget=0, ride_granule=0, ride_chunk=0, ride_fill=0,
             step_tokens=None):
    """ride_budget: the scheduler's, with the requests added longest max_tokens first as
    LLM.generate does then. step_tokens: a list that gets each step's token count."""
    s = Scheduler(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget, max_model_len=4096,
                  num_blocks=cap_tokens // block_size, block_size=block_size,
                  enable_prefix_caching=True, admission_control=admission,
                  ride_budget=ride_budget, ride_granule=ride_granule, ride_chunk=ride_chunk,
                  ride_fill=ride_fill)
    items = list(requests.items())
    if ride_budget:
        items.sort(key=lambda kv: -kv[1][1].max_tokens)
    for rid, (prompt, sp) in items:
        s.add_request(Request(rid, prompt, sp, max_model_len=4096))
    steps = computed = running = 0
    ms = 0.0
    while s.has_unfinished_requests():
        so = s.schedule()
        kv = sum(s.requests[r].num_computed_tokens for r in so.num_scheduled_tokens)
        ms += cost(so.total_num_scheduled_tokens, len(so.num_scheduled_tokens), kv)
        steps += 1
        computed += so.total_num_scheduled_tokens
        if step_tokens is not None:
            step_tokens.append(so.total_num_scheduled_tokens)
        running += len(s.running)
        s.update_from_output(so, fake_output(s, so, stop_at))
    return dict(steps=steps, preemptions=s.num_preemptions, tokens_computed=computed,
                mean_running=round(running / steps), model_s=round(ms / 1e3, 2))


def anchors(name: str):
    if name == "t8k":
        rng = random.Random(0)
        reqs = [([rng.randrange(10000) for _ in range(512)], 256) for _ in range(1000)]
    else:
        random.seed(0)
        reqs = [([random.randint(0, 10000) for _ in range(random.randint(100, 1024))],
                 random.randint(100, 1024)) for _ in range(256)]
    out = sum(m for _, m in reqs)
    return {f"r{i}": (p, SamplingParams(max_tokens=m, ignore_eos=True))
            for i, (p, m) in enumerate(reqs)}, out


def chat(max_tokens):
    rng = random.Random(0)
    reqs, stop_at = {}, {}
    for i in range(2000):
        p = [rng.randrange(10000) for _ in range(rng.randint(100, 1000))]
        stop_at[f"r{i}"] = min(int(rng.expovariate(1 / 300)) + 1, 4096 - len(p))
        reqs[f"r{i}"] = (p, SamplingParams(max_tokens=max_tokens, stop_token_ids=[EOS]))
    if max_tokens:
        stop_at = {r: min(n, max_tokens) for r, n in stop_at.items()}
    return reqs, stop_at, sum(stop_at.values())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workloads", default="t8k,nanovllm,chat")
    args = ap.parse_args()
    for w in args.workloads.split(","):
        if w in ("t8k", "nanovllm"):
            reqs, out = anchors(w)
            for label, seqs, budget, adm in (("vLLM-style, defaults", 1024, 16384, False),
                                             ("vLLM-style, 384 / 8192", 384, 8192, False),
                                             ("admission, defaults", 1024, 16384, True)):
                r = simulate(reqs, mixtral_ms, cap_tokens=282368, block_size=64,
                             max_num_seqs=seqs, budget=budget, admission=adm)
                print(f"{w:8s} {label:24s} {r}  ~{out / r['model_s']:.0f} tok/s", flush=True)
        elif w == "chat":
            for cap in (60000, 200000):
                for mt in (None, 1024):
                    reqs, stop_at, out = chat(mt)
                    for adm in (False, True):
                        r = simulate(reqs, dense8b_ms, cap_tokens=cap, block_size=16,
                                     max_num_seqs=256, budget=8192, admission=adm,
                                     stop_at=stop_at)
                        label = f"cap {cap} max_tokens {mt} {'admission' if adm else 'vLLM-style'}"
                        print(f"chat     {label:40s} {r}  ~{out / r['model_s']:.0f} tok/s",
                              flush=True)


if __name__ == "__main__":
    main()
