"""Where does a decode step's time go?  python3 benchmarks/profile_decode.py CONFIG_DIR [batch]

Prints: wall ms per step (greedy, dummy weights, CUDA graphs as configured), the Python hotspots
of the step loop (cProfile), and GPU kernel count / GPU time per step (torch.profiler).
"""
from __future__ import annotations

import cProfile
import io
import pstats
import sys
import time

import torch

from kvflow import LLM, SamplingParams


def main():
    model = sys.argv[1]
    batch = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    eager = "--eager" in sys.argv
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
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        for _ in range(10):
            eng.step()
        torch.cuda.synchronize()
    events = [e for e in p.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    total_us = sum(e.self_device_time_total for e in events) / 10
    count = sum(e.count for e in events) / 10
    print(f"GPU per step: {total_us / 1000:.3f} ms in {count:.0f} kernels")
    print(p.key_averages().table(sort_by="self_cuda_time_total", row_limit=15))
    eng.abort_request([f"w{i}" for i in range(batch)])


if __name__ == "__main__":
    main()
