"""Per-step timing of the nanovllm workload's first steps, with Triton compilations per step."""
import random
import sys
import time

import torch

from kvflow import LLM, SamplingParams


def compiled_variants():
    """{kernel name: compiled variants so far} over every loaded kvflow.kernels module."""
    import triton
    total = {}
    for modname, mod in list(sys.modules.items()):
        if not modname.startswith("kvflow.kernels.") or mod is None:
            continue
        for name in dir(mod):
            fn = getattr(mod, name)
            if isinstance(fn, triton.runtime.jit.JITFunction):
                total[name] = sum(len(v[0]) for v in getattr(fn, "device_caches", {}).values())
    return total


llm = LLM(sys.argv[1], load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16",
          max_model_len=4096, max_num_seqs=512, max_num_batched_tokens=16384, async_scheduling=False)
eng = llm.llm_engine
random.seed(0)
prompts = [[random.randint(0, 10000) for _ in range(random.randint(100, 1024))] for _ in range(256)]
sps = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=random.randint(100, 1024),
                      detokenize=False) for _ in range(256)]
for i, (p, sp) in enumerate(zip(prompts, sps)):
    eng.add_request(str(i), {"prompt_token_ids": p}, sp)
before = compiled_variants()
for step in range(14):
    torch.cuda.synchronize()
    t = time.perf_counter()
    so_tokens = eng.scheduler.max_num_batched_tokens
    eng.step()
    torch.cuda.synchronize()
    dt = time.perf_counter() - t
    now = compiled_variants()
    new = {k: now[k] - before.get(k, 0) for k in now if now[k] != before.get(k, 0)}
    before = now
    print(f"step {step}: {dt * 1000:.1f} ms, running {len(eng.scheduler.running)}, new compiles {new}",
          flush=True)
eng.abort_request([str(i) for i in range(256)])
