"""Does a restarted compiled engine give the first engine's outputs bit for bit?

    source benchmarks/device_env.sh && python3 benchmarks/restart_determinism.py

For each (compilation level, block size, prefix caching) case: a tiny fp32 Llama (the one
tests/test_compile_engine.py uses) runs three greedy generate() calls with logprobs in this
process, compiling into a fresh KVFLOW_CACHE_DIR, then a spawned process (a restart) loads the
same entry and runs two. Prints the first differing token or logprob of each pair (None: equal
bit for bit). Session 16 (H200): without inductor's deterministic mode the parent and the
restart differed by one ulp in a logprob under either block size (each process's own runs
agreed; eager was equal), i.e. a per-process choice, not the block size (results/determinism-s16/).
"""
import multiprocessing as mp, os, sys, tempfile, json
import numpy as np, torch
sys.path.insert(0, os.getcwd())
from tests.test_compile_engine import _prompts, _summary, GREEDY

def gen(llm):
    return _summary(llm.generate([{"prompt_token_ids": p} for p in _prompts()], GREEDY, use_tqdm=False))

def first_diff(a, b):
    for i, ((ta, la, pa), (tb, lb, pb)) in enumerate(zip(a, b)):
        if ta != tb:
            return f"req {i}: tokens {ta} vs {tb}"
        for kind, x, y in (("out", la, lb), ("prompt", pa, pb)):
            for j, (u, v) in enumerate(zip(x, y)):
                if u != v:
                    return f"req {i} {kind} pos {j}: {u} vs {v}"
    return None

def make(model_dir, bs, level, prefix):
    from kvflow import LLM
    return LLM(model_dir, skip_tokenizer_init=True, kv_cache_memory=8 << 20, device="cuda",
               dtype="float32", compilation_config={"level": level}, block_size=bs,
               enable_prefix_caching=prefix)

def child(model_dir, cache_dir, bs, level, prefix, q):
    try:
        os.environ["KVFLOW_CACHE_DIR"] = cache_dir
        llm = make(model_dir, bs, level, prefix)
        q.put([gen(llm), gen(llm)])
    except BaseException:
        import traceback; q.put(traceback.format_exc())

if __name__ == "__main__":
    from tests.conftest import make_hf_model, save_hf_model
    tmp = tempfile.mkdtemp()
    torch.manual_seed(0)
    model_dir = save_hf_model(make_hf_model("llama"), tmp + "/m")
    ctx = mp.get_context("spawn")
    import torch._inductor.config as ic
    print('inductor has deterministic:', hasattr(ic, 'deterministic'))
    from kvflow.compilation.compile import _INDUCTOR_OPTIONS; print('options', _INDUCTOR_OPTIONS)
    for level, bs, prefix in ((3, 64, True), (3, 16, True), (0, 64, True)):
        cache = tempfile.mkdtemp(); os.environ["KVFLOW_CACHE_DIR"] = cache
        llm = make(model_dir, bs, level, prefix)
        runs = [gen(llm) for _ in range(3)]
        llm.shutdown(); del llm
        q = ctx.Queue(); p = ctx.Process(target=child, args=(model_dir, cache, bs, level, prefix, q)); p.start()
        c = q.get(timeout=600); p.join()
        if isinstance(c, str):
            print("CHILD ERROR", c); continue
        print(f"=== level {level} block {bs} prefix {prefix}", flush=True)
        print("  p1 vs p2:", first_diff(runs[0], runs[1]))
        print("  p2 vs p3:", first_diff(runs[1], runs[2]))
        print("  c1 vs c2:", first_diff(c[0], c[1]))
        print("  p1 vs c1:", first_diff(runs[0], c[0]))
        print("  p2 vs c2:", first_diff(runs[1], c[1]))
        print("  p2 vs c1:", first_diff(runs[1], c[0]))
