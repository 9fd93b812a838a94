"""Where does a decode step's time go?
    python3 benchmarks/profile_decode.py CONFIG_DIR [batch] [--eager] [--out DIR]

Prints: wall ms per step (greedy, dummy weights, CUDA graphs as configured), the Python hotspots
of the step loop (cProfile), and GPU kernel count / GPU time per step (torch.profiler).
With --out DIR it also writes DIR/<config>-b<batch>.json: every kernel with its launches and GPU
microseconds per step, GPU busy time and the wall time per step (busy < wall: the GPU idles);
the chrome trace; and <config>-b<batch>.exposed.json, each kernel's exposed time per step
(benchmarks/exposed_time.py: what it costs the step when PDL overlaps the durations).
"""
from __future__ import annotations

import cProfile
import io
import json
import os
import pstats
import sys
import time

import torch

from kvflow import LLM, SamplingParams


def main():
    model = sys.argv[1]
    batch = int(sys.argv[2]) if len(sys.argv) > 2 and sys.argv[2].isdigit() else 1
    eager = "--eager" in sys.argv
    out_dir = sys.argv[sys.argv.index("--out") + 1] if "--out" in sys.argv else None
    llm = LLM(model, load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16",
              max_model_len=4096, enforce_eager=eager)
    eng = llm.llm_engine
    prompts = [{"prompt_token_ids": [(i * 7 + j) % 10000 for j in range(128)]} for i in range(batch)]
    sp = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True, detokenize=False)
    for i, p in enumerate(prompts):
        eng.add_request(f"w{i}", p, sp)
    for _ in range(20):  # prefill + warm decode
        eng.step()
    torch.cuda.synchronize()
    n = 100
    t = time.perf_counter()
    for _ in range(n):
        eng.step()
    torch.cuda.synchronize()
    print(f"batch {batch}: {(time.perf_counter() - t) * 1000 / n:.3f} ms/step wall", flush=True)

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(50):
        eng.step()
    prof.disable()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(18)
    print(s.getvalue()[:6000])

    from torch.profiler import ProfilerActivity, profile
    steps = 10
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        t = time.perf_counter()
        for _ in range(steps):
            eng.step()
        torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - t) * 1000 / steps
    events = [e for e in p.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    total_us = sum(e.self_device_time_total for e in events) / steps
    count = sum(e.count for e in events) / steps
    print(f"GPU per step: {total_us / 1000:.3f} ms in {count:.0f} kernels "
          f"(wall {wall_ms:.3f} ms/step under the profiler)")
    print(p.key_averages().table(sort_by="self_cuda_time_total", row_limit=15))
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        kernels = sorted(((e.key, e.count / steps, e.self_device_time_total / steps)
                          for e in events), key=lambda r: -r[2])
        name = os.path.basename(os.path.normpath(model))
        with open(os.path.join(out_dir, f"{name}-b{batch}.json"), "w") as f:
            json.dump({"model": name, "batch": batch, "eager": eager,
                       "gpu_busy_ms_per_step": total_us / 1000, "kernels_per_step": count,
                       "wall_ms_per_step_profiled": wall_ms,
                       "kernels": [{"name": k, "per_step": c, "us_per_step": round(u, 2)}
                                   for k, c, u in kernels]}, f, indent=1)
        trace = os.path.join(out_dir, f"{name}-b{batch}.trace.json")
        p.export_chrome_trace(trace)
        # Durations overlap under PDL; each kernel's exposed share of the step is what counts.
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from exposed_time import exposed_per_step, load_events
        exposed = exposed_per_step(load_events(trace))
        with open(os.path.join(out_dir, f"{name}-b{batch}.exposed.json"), "w") as f:
            json.dump(exposed, f, indent=1)
        print(f"exposed: {exposed['step_us']} us per profiled step, idle {exposed['idle_us']}")
    eng.abort_request([f"w{i}" for i in range(batch)])


if __name__ == "__main__":
    main()
