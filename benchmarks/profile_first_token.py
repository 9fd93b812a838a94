"""Where does the first token's time go? (decode1's `first_token_s`: a generate() of one
128-token prompt with max_tokens=1, after a warm-up like the bench's.)

    python3 benchmarks/profile_first_token.py CONFIG_DIR [--out DIR] [--real-weights]

Prints, for N fresh prompts (no prefix hit): the generate() wall times; the same split into
engine steps (each step's host time to return, then the time until the device is idle: what a
step leaves queued); the Python hotspots (cProfile, by own time); and from torch.profiler the
device kernels per generate(), their busy time and the idle time between them. With --out DIR it
writes DIR/<config>-first-token.json (those figures) and the chrome trace. Runs on CPU too
(tiny test models), where the device columns are the host's.
"""
from __future__ import annotations

import cProfile
import io
import json
import os
import pstats
import random
import statistics
import sys
import time

import torch

from kvflow import LLM, SamplingParams


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main():
    model = sys.argv[1]
    out_dir = sys.argv[sys.argv.index("--out") + 1] if "--out" in sys.argv else None
    kw = {} if "--real-weights" in sys.argv else {"load_format": "dummy"}
    if not torch.cuda.is_available():
        kw.update(device="cpu", dtype="float32", kv_cache_memory=64 << 20)
    else:
        kw.update(dtype="bfloat16", max_model_len=4096)
    llm = LLM(model, skip_tokenizer_init=True, **kw)
    eng = llm.llm_engine
    runner = eng.executor.worker.runner
    device = runner.device
    vocab = min(10000, runner.vocab_size)       # the bench's prompt ids lie in [0, 10000)
    rng = random.Random(1)
    prompts = [[rng.randrange(vocab) for _ in range(128)] for _ in range(64)]
    one = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True, detokenize=False)

    def gen(p):
        llm.generate([{"prompt_token_ids": p}], one, use_tqdm=False)

    # The bench's warm-up: a 512-token greedy run first.
    llm.generate([{"prompt_token_ids": prompts[0]}],
                 SamplingParams(temperature=0.0, max_tokens=512, ignore_eos=True,
                                detokenize=False), use_tqdm=False)
    nxt = iter(prompts[1:])
    walls = []
    for _ in range(15):
        p = next(nxt)
        _sync(device)
        t = time.perf_counter()
        gen(p)
        walls.append((time.perf_counter() - t) * 1000)

    # The same request through the engine by hand: every step's host time, then the time the
    # device still needed after the step returned.
    steps = []
    for _ in range(5):
        p = next(nxt)
        _sync(device)
        t0 = time.perf_counter()
        eng.add_request(f"ft{len(steps)}", {"prompt_token_ids": p}, one)
        t_add = time.perf_counter() - t0
        per = []
        while eng.has_unfinished_requests():
            t = time.perf_counter()
            outs = eng.step()
            host = time.perf_counter() - t
            _sync(device)
            per.append(dict(host_ms=round(host * 1000, 3),
                            drain_ms=round((time.perf_counter() - t - host) * 1000, 3),
                            outputs=len(outs)))
        steps.append(dict(add_request_ms=round(t_add * 1000, 3), steps=per,
                          total_ms=round((time.perf_counter() - t0) * 1000, 3)))

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(10):
        gen(next(nxt))
    prof.disable()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(25)

    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    n_prof = 3
    with profile(activities=acts) as prof_t:
        for _ in range(n_prof):
            gen(next(nxt))
        _sync(device)
    kern = [e for e in prof_t.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy_us = sum(e.device_time_total for e in kern) / n_prof
    by_name: dict[str, list] = {}
    for e in kern:
        by_name.setdefault(e.name, []).append(e.device_time_total)
    top = sorted(((k, len(v) / n_prof, sum(v) / n_prof) for k, v in by_name.items()),
                 key=lambda r: -r[2])[:25]

    report = dict(
        model=os.path.basename(os.path.normpath(model)), device=str(device),
        generate_ms=dict(median=round(statistics.median(walls), 3), min=round(min(walls), 3),
                         max=round(max(walls), 3), all=[round(w, 3) for w in walls]),
        by_step=steps,
        device_kernels_per_generate=len(kern) / n_prof, device_busy_us_per_generate=round(busy_us, 1),
        top_kernels=[dict(name=k[:120], per_generate=c, us=round(u, 1)) for k, c, u in top])
    g = report["generate_ms"]
    print(f"generate(max_tokens=1): median {g['median']} ms (min {g['min']}, max {g['max']})")
    for st in steps:
        print(f"  add_request {st['add_request_ms']} ms; steps (host ms / then device drain ms): "
              + ", ".join(f"{x['host_ms']}/{x['drain_ms']}" for x in st["steps"])
              + f"; total {st['total_ms']} ms")
    print(f"device: {report['device_kernels_per_generate']:g} kernels, "
          f"{report['device_busy_us_per_generate']} us busy per generate()")
    for r in report["top_kernels"]:
        print(f"  {r['us']:9.1f} us  x{r['per_generate']:<6g} {r['name']}")
    print(s.getvalue()[:7000])
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, f"{report['model']}-first-token.json"), "w") as f:
            json.dump(report, f, indent=1)
        prof_t.export_chrome_trace(os.path.join(out_dir, f"{report['model']}-first-token.trace.json"))


if __name__ == "__main__":
    main()
