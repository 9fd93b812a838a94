"""Offline benchmarks: the three workloads of vLLM's reference numbers, reproduced exactly.

The workloads (same RNG calls, lengths and sampling settings as the reference script that drove
vLLM, so the numbers compare one to one):
  nanovllm      random.seed(0); 256 prompts of randint(100, 1024) token ids randint(0, 10000);
                output lengths randint(100, 1024); temperature 0.6; ignore_eos. Figure: output
                tokens / wall s.
  decode1       random.Random(1): three 128-token prompts; 512 greedy tokens; run 1 warms up,
                run 2 (fresh prompt, no prefix hit) is timed; a third prompt measures prefill + 1
                token. Figure: ms per output token.
  throughput8k  random.Random(2): 1000 prompts of 512 tokens, 256 output tokens each,
                temperature 0.6, ignore_eos. Figure: output tokens / wall s.

Each record is one JSON line with the reference's field names, plus startup timings.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from typing import Callable

from kvflow.sampling_params import SamplingParams


_MAX_TOKEN_ID = 10000      # the reference's prompt ids lie in [0, 10000]


def _prompts(ids_list):
    return [{"prompt_token_ids": ids} for ids in ids_list]


def _n_out(outputs) -> int:
    return sum(len(o.outputs[0].token_ids) for o in outputs)


def nanovllm_requests() -> tuple[list[list[int]], list[SamplingParams]]:
    """nanovllm's prompts and sampling settings, drawn as the reference draws them."""
    random.seed(0)
    num_seqs, max_in, max_out = 256, 1024, 1024
    prompt_ids = [[random.randint(0, 10000) for _ in range(random.randint(100, max_in))]
                  for _ in range(num_seqs)]
    sps = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=random.randint(100, max_out),
                          detokenize=False) for _ in range(num_seqs)]
    return prompt_ids, sps


def wl_nanovllm(llm, base: dict, temperature: float) -> dict:
    return run_requests(llm, base, *nanovllm_requests(), workload="nanovllm")


def run_requests(llm, base: dict, prompt_ids: list[list[int]], sps: list[SamplingParams],
                 workload: str) -> dict:
    """One timed generate of these requests after a short warm-up, as nanovllm's record
    (benchmarks/order_probe.py runs the same requests reordered through it)."""
    num_seqs = len(prompt_ids)
    llm.generate(_prompts([[1, 2, 3, 4, 5, 6, 7, 8]]), SamplingParams(max_tokens=16, detokenize=False),
                 use_tqdm=False)
    t = time.perf_counter()
    outs = llm.generate(_prompts(prompt_ids), sps, use_tqdm=False)
    dt = time.perf_counter() - t
    total = sum(sp.max_tokens for sp in sps)
    n_in = sum(len(p) for p in prompt_ids)
    return dict(base, record="workload", workload=workload, num_seqs=num_seqs, input_tokens=n_in,
                total_output_tokens=total, actual_output_tokens=_n_out(outs), wall_s=round(dt, 4),
                output_tok_s=round(total / dt, 2), total_tok_s=round((n_in + total) / dt, 2))


def wl_decode1(llm, base: dict, temperature: float) -> dict:
    rng = random.Random(1)
    prompts = [[rng.randrange(10000) for _ in range(128)] for _ in range(3)]
    sp = SamplingParams(temperature=0.0, max_tokens=512, ignore_eos=True, detokenize=False)
    llm.generate(_prompts([prompts[0]]), sp, use_tqdm=False)
    t = time.perf_counter()
    outs = llm.generate(_prompts([prompts[1]]), sp, use_tqdm=False)
    dt = time.perf_counter() - t
    n = _n_out(outs)
    sp1 = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True, detokenize=False)
    t = time.perf_counter()
    llm.generate(_prompts([prompts[2]]), sp1, use_tqdm=False)
    t1 = time.perf_counter() - t
    return dict(base, record="workload", workload="decode1", input_tokens=128, output_tokens=n,
                wall_s=round(dt, 4), ms_per_output_token=round(dt * 1000 / n, 4),
                first_token_s=round(t1, 4), decode_ms_per_token=round((dt - t1) * 1000 / max(n - 1, 1), 4),
                output_tok_s=round(n / dt, 2))


def wl_throughput8k(llm, base: dict, temperature: float) -> dict:
    rng = random.Random(2)
    num, n_in_each, n_out_each = 1000, 512, 256
    prompts = [[rng.randrange(10000) for _ in range(n_in_each)] for _ in range(num)]
    sp = SamplingParams(temperature=temperature, max_tokens=n_out_each, ignore_eos=True, detokenize=False)
    llm.generate(_prompts([[rng.randrange(10000) for _ in range(64)]]),
                 SamplingParams(max_tokens=16, detokenize=False), use_tqdm=False)
    t = time.perf_counter()
    outs = llm.generate(_prompts(prompts), sp, use_tqdm=False)
    dt = time.perf_counter() - t
    n = _n_out(outs)
    return dict(base, record="workload", workload="throughput8k", num_prompts=num,
                input_tokens=num * n_in_each, output_tokens=n, temperature=temperature,
                wall_s=round(dt, 4), output_tok_s=round(n / dt, 2),
                total_tok_s=round((num * n_in_each + n) / dt, 2), requests_s=round(num / dt, 3))


WORKLOADS: dict[str, Callable] = {"nanovllm": wl_nanovllm, "decode1": wl_decode1,
                                  "throughput8k": wl_throughput8k}


def _git_commit() -> str:
    """KVFLOW_COMMIT if set (a copied working tree, e.g. on the device machine, may carry a
    stale or no .git), else the checkout's HEAD."""
    if os.environ.get("KVFLOW_COMMIT"):
        return os.environ["KVFLOW_COMMIT"]
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run(args) -> list[dict]:
    import torch

    from kvflow import LLM, __version__
    from kvflow.engine.arg_utils import engine_kwargs

    names = list(WORKLOADS) if args.workload == "all" else args.workload.split(",")
    for w in names:
        if w not in WORKLOADS:
            raise ValueError(f"workload: unknown {w!r}; choose from {list(WORKLOADS)} or 'all'")
    kw = engine_kwargs(args)
    kw["skip_tokenizer_init"] = True  # token-id prompts, as the reference
    t0 = time.perf_counter()
    llm = LLM(args.model, **kw)
    init_s = time.perf_counter() - t0
    eng = llm.llm_engine
    vocab = eng.config.model.vocab_size
    if vocab <= _MAX_TOKEN_ID:
        raise ValueError(f"model: the workloads draw prompt token ids up to {_MAX_TOKEN_ID} (as "
                         f"the reference does), but this model's vocabulary has {vocab} tokens")
    base = dict(model=os.path.basename(os.path.normpath(args.model or "default")), engine="kvflow",
                kvflow=__version__, commit=_git_commit(),
                tensor_parallel_size=eng.config.parallel.tensor_parallel_size,
                enable_expert_parallel=eng.config.parallel.enable_expert_parallel)
    # Switches that change what is measured (A/B runs differ only here).
    env = {k: v for k, v in sorted(os.environ.items())
           if (k.startswith("KVFLOW_") and k not in ("KVFLOW_COMMIT", "KVFLOW_CACHE_DIR"))
           or k == "PYTORCH_CUDA_ALLOC_CONF"}
    if env:
        base["env"] = env
    info = dict(torch=torch.__version__)
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        # What the plan may use, and what startup (profile, warm-up, graph capture) did use.
        util = kw.get("gpu_memory_utilization") or eng.config.cache.gpu_memory_utilization
        info["memory_budget_gib"] = round(util * torch.cuda.mem_get_info()[1] / 2 ** 30, 2)
        info.update(_peaks(eng.executor.memory_stats(reset=True)))
    init = dict(base, record="init", llm_constructor_s=round(init_s, 3),
                enforce_eager=bool(kw.get("enforce_eager")),
                compilation_level=eng.config.compilation.level,
                cudagraph_mode=eng.config.compilation.cudagraph_mode,
                max_model_len=eng.max_model_len,
                gpu_memory_utilization=kw.get("gpu_memory_utilization"),
                kv_cache_tokens=eng.num_total_blocks() * eng.config.cache.block_size,
                **eng.startup_timings(), **info)
    sc = eng.config.scheduler
    init.update(max_num_seqs=sc.max_num_seqs, max_num_batched_tokens=sc.max_num_batched_tokens,
                admission_control=sc.admission_control, ride_budget=sc.ride_budget,
                ride_granule=sc.ride_granule, ride_chunk=sc.ride_chunk, ride_fill=sc.ride_fill)
    records = [init]
    _emit(init, args.out)
    for w in names:
        if eng.step_trace is not None:
            eng.step_trace.clear()
        preempted = eng.scheduler.num_preemptions
        rec = WORKLOADS[w](llm, base, args.temperature)
        rec["num_preemptions"] = eng.scheduler.num_preemptions - preempted
        if eng.step_trace:
            rec["step_trace"] = summarize_trace(eng.step_trace)
        # This workload's own peaks: the window was reset after startup / the last workload.
        rec.update(_peaks(eng.executor.memory_stats(reset=True)))
        records.append(rec)
        _emit(rec, args.out)
    return records


def _peaks(per_rank: list[dict]) -> dict:
    """Peak GPU memory from every rank's Worker.memory_stats: reserved by torch's caching
    allocator (what the memory plan must bound) and allocated by live tensors (reserved -
    allocated = cached or fragmented blocks), the largest rank's; per rank too when there are
    several (tensor / expert parallel workers live in their own processes, so the driver's
    own torch.cuda counters say nothing). {} without a GPU."""
    ranks = [r for r in per_rank if r]
    if not ranks:
        return {}
    gib = lambda b: round(b / 2 ** 30, 2)  # noqa: E731
    out = dict(peak_gpu_memory_gib=gib(max(r["peak_reserved"] for r in ranks)),
               peak_gpu_allocated_gib=gib(max(r["peak_allocated"] for r in ranks)))
    if len(ranks) > 1:
        out["peak_gpu_memory_gib_per_rank"] = [gib(r["peak_reserved"]) for r in ranks]
    return out


def summarize_trace(trace: list) -> dict:
    """Where the steps' time went: decode-only vs mixed steps, host phases vs execution."""
    out = {}
    for kind, sel in (("decode", lambda r: r[0] == r[1]), ("mixed", lambda r: r[0] != r[1])):
        rows = [r for r in trace if sel(r)]
        if rows:
            out[kind] = dict(steps=len(rows), tokens=sum(r[1] for r in rows),
                             schedule_s=round(sum(r[2] for r in rows), 3),
                             execute_s=round(sum(r[3] for r in rows), 3),
                             update_s=round(sum(r[4] for r in rows), 3),
                             mean_reqs=round(sum(r[0] for r in rows) / len(rows), 1))
    return out


def _emit(rec: dict, out: str | None) -> None:
    line = json.dumps(rec)
    print(line, flush=True)
    if out:
        with open(out, "a") as f:
            f.write(line + "\n")


def add_offline_args(p) -> None:
    p.add_argument("--model", default=None, help="directory with config.json (dummy weights)")
    p.add_argument("--temperature", type=float, default=0.6, help="temperature for throughput8k")
    p.add_argument("--out", default=None, help="append JSON lines to this file")


def main_throughput(args) -> int:
    args.workload = args.workload or "nanovllm,throughput8k"
    run(args)
    return 0


def main_latency(args) -> int:
    args.workload = "decode1"
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit("use: kvflow bench throughput|latency")
