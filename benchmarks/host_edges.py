"""Host time at the edges of an offline run: before the first step and after the last.

    python3 benchmarks/host_edges.py CONFIG_DIR [--workload nanovllm] [--rounds 3]

Builds the engine as `kvflow bench throughput` does (dummy weights; bf16 and max_model_len 4096
on a GPU) and runs the workload --rounds times. Per round, host seconds of: LLM.generate up to
the engine loop (request checks and add_request), the loop up to the first launch, the loop
(first launch to the last step's return), and from there to generate's return. The device has
nothing to do outside the loop, so the edges are wall time the workload's figure pays in full.
Rounds after the first find their prompts in the prefix cache (the workloads reuse their seeds)
unless --no-prefix-caching: then round 1 against the others shows what is cold in a first run.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from kvflow import LLM
from kvflow.bench.offline import WORKLOADS
from kvflow.engine.llm_engine import LLMEngine
from kvflow.worker.model_runner import ModelRunner


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--workload", default="nanovllm")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--no-prefix-caching", action="store_true",
                   help="rounds after the first would otherwise find their prompts cached")
    args = p.parse_args()
    marks: dict[str, float] = {}
    orig_gen, orig_run, orig_launch, orig_step = (LLM.generate, LLM._run_engine,
                                                  ModelRunner.launch, LLMEngine.step)

    def generate(self, *a, **k):
        marks.clear()
        marks["enter"] = time.perf_counter()
        out = orig_gen(self, *a, **k)
        marks["return"] = time.perf_counter()
        return out

    def run_engine(self, *a, **k):
        marks["loop"] = time.perf_counter()
        return orig_run(self, *a, **k)

    def launch(self, so):
        marks.setdefault("first_launch", time.perf_counter())
        return orig_launch(self, so)

    def step(self):
        out = orig_step(self)
        marks["last_step"] = time.perf_counter()
        return out

    LLM.generate, LLM._run_engine, ModelRunner.launch, LLMEngine.step = (
        generate, run_engine, launch, step)
    kw = dict(load_format="dummy", skip_tokenizer_init=True, max_num_seqs=1024,
              max_num_batched_tokens=16384,
              enable_prefix_caching=not args.no_prefix_caching)
    if torch.cuda.is_available():
        kw.update(dtype="bfloat16", max_model_len=4096)
    else:
        kw.update(device="cpu", dtype="float32", kv_cache_memory=256 << 20, max_model_len=2048)
    llm = LLM(args.model, **kw)
    for _ in range(args.rounds):
        rec = WORKLOADS[args.workload](llm, dict(model=args.model), 0.6)
        m = marks
        print(json.dumps(dict(
            output_tok_s=rec.get("output_tok_s"), wall_s=rec.get("wall_s"),
            add_s=round(m["loop"] - m["enter"], 4),
            to_first_launch_s=round(m["first_launch"] - m["loop"], 4),
            loop_s=round(m["last_step"] - m["first_launch"], 4),
            after_loop_s=round(m["return"] - m["last_step"], 4))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
