"""Where an LLM() constructor's seconds go: a sampling profiler over the main thread.

    python3 benchmarks/ready_probe.py --model benchmarks/configs/llama3.1-8b --out $OUT/ready.json
        [--interval-ms 2] [--top 60] [-- extra LLM kwargs as key=value ...]

Why: the 8B model's warm-cache ready time (11.3-14.9 s in session 35) is near the 15 s target,
and the engine's own phase timings (model_load_s, profile_s, kv_cache_alloc_s, kernel_warmup_s,
cuda_graph_s) leave ~5 s unaccounted. cProfile would inflate the host-bound graph captures;
a thread that samples the main thread's stack every --interval-ms costs little and still
attributes wall time to code (GPU waits included, which is what ready time is).

What: the same engine arguments as `kvflow bench throughput` (dummy weights, bf16,
max_model_len 4096, 1024 sequences, 16384 batched tokens, no tokenizer). The JSON holds the
engine's startup timings, the wall time of `import kvflow` and of LLM(), the stacks that first
imported torch._dynamo / _refs / _inductor (compilation off should need none), and the functions
with the largest inclusive share of the samples (each counted once per sample however often it
recurses), as "file:line function" with seconds.
"""
import argparse
import json
import os
import sys
import threading
import time
from collections import Counter


def _frames(frame):
    out = []
    while frame is not None:
        c = frame.f_code
        out.append(f"{os.path.relpath(c.co_filename) if 'kvflow' in c.co_filename else os.path.basename(c.co_filename)}:{c.co_firstlineno} {c.co_name}")
        frame = frame.f_back
    return out


class FirstImport:
    """A meta-path finder that records the stack of the first import of each watched module
    (it finds nothing itself, so the import proceeds as usual)."""

    def __init__(self, names):
        self.names = set(names)
        self.stacks: dict[str, list[str]] = {}

    def find_spec(self, name, path=None, target=None):
        if name in self.names and name not in self.stacks:
            import traceback
            self.stacks[name] = [l.strip() for l in traceback.format_stack()[:-1]]
        return None


class Sampler(threading.Thread):
    def __init__(self, target_ident: int, interval: float):
        super().__init__(daemon=True)
        self.ident_ = target_ident
        self.interval = interval
        self.inclusive: Counter = Counter()
        self.leaf: Counter = Counter()
        self.n = 0
        self.stop = threading.Event()

    def run(self):
        while not self.stop.is_set():
            f = sys._current_frames().get(self.ident_)
            if f is not None:
                stack = _frames(f)
                self.n += 1
                self.leaf[stack[0]] += 1
                for name in set(stack):
                    self.inclusive[name] += 1
            time.sleep(self.interval)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--out")
    ap.add_argument("--interval-ms", type=float, default=2.0)
    ap.add_argument("--top", type=int, default=60)
    ap.add_argument("extra", nargs="*", help="LLM kwargs as key=value (python literals)")
    args = ap.parse_args()
    import ast
    kw = dict(load_format="dummy", dtype="bfloat16", max_model_len=4096, max_num_seqs=1024,
              max_num_batched_tokens=16384, skip_tokenizer_init=True)
    for item in args.extra:
        k, v = item.split("=", 1)
        try:
            kw[k] = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            kw[k] = v
    watch = FirstImport(["torch._dynamo", "torch._refs", "torch._inductor"])
    sys.meta_path.insert(0, watch)
    sampler = Sampler(threading.get_ident(), args.interval_ms / 1000)
    sampler.start()
    t0 = time.perf_counter()
    import torch  # noqa: F401

    import kvflow
    t_import = time.perf_counter() - t0
    t1 = time.perf_counter()
    llm = kvflow.LLM(args.model, **kw)
    t_llm = time.perf_counter() - t1
    sampler.stop.set()
    sampler.join()
    dt = (time.perf_counter() - t0) / max(sampler.n, 1)  # seconds a sample stands for
    rec = dict(model=os.path.basename(os.path.normpath(args.model)), import_s=round(t_import, 3),
               llm_constructor_s=round(t_llm, 3), samples=sampler.n,
               dynamo_loaded="torch._dynamo" in sys.modules, first_imports=watch.stacks,
               startup=llm.llm_engine.startup_timings(),
               inclusive=[(name, round(c * dt, 3)) for name, c in sampler.inclusive.most_common(args.top)],
               leaf=[(name, round(c * dt, 3)) for name, c in sampler.leaf.most_common(args.top // 2)])
    text = json.dumps(rec, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
