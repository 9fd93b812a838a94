"""Where a throughput workload's time goes on the device: per step kind and per kernel kind.

    python3 benchmarks/profile_workload.py CONFIG_DIR [--workloads nanovllm,throughput8k]
        [--max-num-seqs 1024] [--max-num-batched-tokens 16384] [--ride-budget N]
        [--ride-granule G] [--no-kernels] [--out FILE]

Builds the engine as `kvflow bench throughput` does (dummy weights, bf16, max_model_len 4096)
and runs each workload (the bench's own functions) twice:

1. timing pass: a CUDA event before and after every step's device work (ModelRunner.launch is
   wrapped). Per step: requests, tokens, decode tokens, KV tokens attended (sum of seq_lens),
   its device time (end - start: its queued work, run back to back when the host is ahead) and
   the device idle gap before it (start - previous end > 0 when the host was late). Steps are
   grouped by kind (decode-only by batch size, mixed by token count); each group gets its
   bytes (weights once + KV read) and FLOPs (2 x layer params x tokens), so its time can be
   compared with the HBM and tensor-core floors.
2. kernel pass (unless --no-kernels): the same workload under torch.profiler (device activity
   only); kernel time by kind (GEMM, attention, norm, rotary/KV write, activation, MoE,
   sampling, copies, other) and the top kernels. Kernel durations overlap under PDL at small
   batch, so kinds are shares of summed kernel time, not of the wall.

Writes one JSON object (to --out, else stdout). Runs on CPU with a tiny model too (no device
timings there: the events are skipped).
"""
from __future__ import annotations

import argparse
import collections
import gc
import json
import os
import re
import sys
import time
from types import SimpleNamespace

import torch

from kvflow import LLM
from kvflow.bench.offline import WORKLOADS
from kvflow.worker.model_runner import ModelRunner

HBM_TBS = 4.3      # device-to-device copy bandwidth of an H200 (../shared/anchors)

KINDS = [  # first match wins; kernel names of Triton (ours), cuBLAS (nvjet/sm90) and torch
    ("attention", r"_attention_kernel|_merge_splits"),
    ("moe", r"moe|_align|expert"),
    ("gemm", r"nvjet|gemm|cutlass|xmma|skinny|cublas|w4a16|splitk|_split_k"),
    ("norm", r"norm"),
    ("rotary_kv_write", r"rope|rotary|kv_cache|cache_write"),
    ("activation", r"silu|gelu|act_and_mul"),
    ("sampling", r"argmax|sample|softmax|topk|top_k|sort|gumbel|exponential|penalt"),
    ("copy", r"[Mm]emcpy|[Mm]emset|copy|index|scatter|gather|fill"),
]


class GcTimer:
    """Collections and pause seconds per generation (gc.callbacks), while enabled."""

    def __init__(self):
        self.stats = collections.defaultdict(lambda: [0, 0.0, 0.0])   # count, total, max
        self._t = 0.0
        gc.callbacks.append(self._cb)

    def _cb(self, phase, info):
        if phase == "start":
            self._t = time.perf_counter()
            return
        d = time.perf_counter() - self._t
        st = self.stats[info["generation"]]
        st[0] += 1
        st[1] += d
        st[2] = max(st[2], d)

    def stop(self) -> None:
        gc.callbacks.remove(self._cb)

    def report(self) -> dict:
        return {f"gen{g}": dict(collections=c, s=round(t, 4), max_ms=round(m * 1e3, 2))
                for g, (c, t, m) in sorted(self.stats.items())}


class StepRecorder:
    """Wraps ModelRunner.launch: one (start, end) event pair and the step's shape per step."""

    def __init__(self, profile_steps: int = 0):
        self.rows = []
        self.enabled = False
        self._orig = ModelRunner.launch
        # Kernel profiles of single steps (--profile-steps): per step kind, up to N steps, each
        # run alone (synchronized before and after; its kernels' durations are what they are
        # in the pipeline, its idle time is not).
        self.profile_steps = profile_steps
        self.step_kernels: dict[str, list] = collections.defaultdict(list)
        # Chrome trace (host and device) of consecutive pipelined steps from the first large
        # mixed step on (--trace-steps N --trace-out FILE): where the device waits.
        self.trace_steps = 0
        self.trace_out = None
        self.trace_decode_b = 0      # > 0: trace from the first decode step of <= this batch
        self.trace_ridden = 0        # > 0: from the first step with prompt tokens riding
        #                              beside at least this many requests
        self._max_b = 0
        self._trace = None
        self._traced = 0

    def print_traced(self, so, kv_tokens: int) -> None:
        print(json.dumps(dict(traced_step=self._traced, reqs=len(so.num_scheduled_tokens),
                              tokens=so.total_num_scheduled_tokens, kv_tokens=kv_tokens)),
              flush=True)

    def install(self):
        rec = self

        def launch(runner, so):
            if not rec.enabled or so.is_empty or runner.device.type != "cuda":
                return rec._orig(runner, so)
            nsched = so.num_scheduled_tokens
            kind = _profile_kind(len(nsched), so.total_num_scheduled_tokens)
            traced = False
            if rec.trace_steps and rec._traced < rec.trace_steps:
                # Decode: once the batch has shrunk to B from above (not the warm-up's one).
                rec._max_b = max(rec._max_b, len(nsched))
                t = so.total_num_scheduled_tokens
                if rec.trace_decode_b:
                    start = (rec._max_b > rec.trace_decode_b >= len(nsched)
                             and t == len(nsched))
                elif rec.trace_ridden:   # prompt tokens in a <= 512-token step
                    start = rec.trace_ridden <= len(nsched) < t <= 512
                else:
                    start = kind == "mixed T>8192"
                if rec._trace is None and start:
                    from torch.profiler import ProfilerActivity, profile
                    rec._trace = profile(activities=[ProfilerActivity.CPU,
                                                     ProfilerActivity.CUDA])
                    rec._trace.start()
                traced = rec._trace is not None
                if traced:
                    rec._traced += 1
                    if rec._traced == rec.trace_steps:
                        handle = rec._orig(runner, so)
                        rec.print_traced(so, _kv_tokens(runner, nsched))
                        torch.cuda.synchronize()
                        rec._trace.stop()
                        rec._trace.export_chrome_trace(rec.trace_out)
                        return handle
            if kind and len(rec.step_kernels[kind]) < rec.profile_steps:
                from torch.profiler import ProfilerActivity, profile
                torch.cuda.synchronize()
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    handle = rec._orig(runner, so)
                    torch.cuda.synchronize()
                rec.step_kernels[kind].append(
                    dict(reqs=len(nsched), tokens=so.total_num_scheduled_tokens,
                         **kernel_kinds(prof, top=12)))
                return handle
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            handle = rec._orig(runner, so)
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            kv = _kv_tokens(runner, nsched)
            if traced:
                rec.print_traced(so, kv)
            rec.rows.append((len(nsched), so.total_num_scheduled_tokens,
                             sum(1 for n in nsched.values() if n == 1), kv, start, end))
            return handle

        ModelRunner.launch = launch


def _kv_tokens(runner, nsched: dict) -> int:
    """KV tokens a launched step attends (its requests' cached + scheduled tokens). After the
    launch: the runner learns a step's new requests and their computed tokens in launch()."""
    return sum(runner.requests[r].num_computed_tokens + n for r, n in nsched.items())


def _profile_kind(b: int, t: int):
    """The step kinds --profile-steps profiles: large mixed (prefill-heavy) and large decode."""
    if t > 8192:
        return "mixed T>8192"
    if t == b and b > 256:
        return "decode B>256"
    return None


def _bucket(b: int, t: int) -> str:
    if t == b:
        for hi in (1, 16, 64, 128, 256, 512, 1024):
            if b <= hi:
                return f"decode B<={hi}"
        return "decode B>1024"
    for hi in (512, 2048, 8192, 16384):
        if t <= hi:
            return f"mixed T<={hi}"
    return "mixed T>16384"


def summarize_steps(rows, weight_bytes: int, layer_params: int, kv_bytes_per_token: int,
                    wall_s: float) -> dict:
    """Group the recorded steps; times in ms."""
    torch.cuda.synchronize()
    groups = collections.OrderedDict()
    total_dev = total_gap = 0.0
    prev_end = None
    per_dev, per_gap = [], []
    for b, t, nd, kv, start, end in rows:
        dev = start.elapsed_time(end)
        gap = max(0.0, prev_end.elapsed_time(start)) if prev_end is not None else 0.0
        prev_end = end
        per_dev.append(dev)
        per_gap.append(gap)
        total_dev += dev
        total_gap += gap
        g = groups.setdefault(_bucket(b, t), collections.Counter())
        g["steps"] += 1
        g["device_ms"] += dev
        g["gap_ms"] += gap
        g["reqs"] += b
        g["tokens"] += t
        g["decode_tokens"] += nd
        g["kv_tokens"] += kv
    out = {}
    for name, g in sorted(groups.items(), key=lambda kv: kv[0]):
        n = g["steps"]
        kv_gb = g["kv_tokens"] * kv_bytes_per_token / 1e9
        w_gb = n * weight_bytes / 1e9
        pflop = 2 * layer_params * g["tokens"] / 1e15
        out[name] = dict(
            steps=n, device_s=round(g["device_ms"] / 1e3, 3), gap_s=round(g["gap_ms"] / 1e3, 3),
            mean_step_ms=round(g["device_ms"] / n, 3), mean_reqs=round(g["reqs"] / n, 1),
            mean_tokens=round(g["tokens"] / n, 1),
            mean_kv_tokens=round(g["kv_tokens"] / n, 1),
            kv_read_gb=round(kv_gb, 1), weight_read_gb=round(w_gb, 1),
            # What the step kind would take at the HBM floor (weights once per step + KV).
            hbm_floor_s=round((kv_gb + w_gb) / HBM_TBS / 1e3, 3),
            linear_pflop=round(pflop, 3),
            linear_tflops_if_all_time=round(pflop * 1e3 / max(g["device_ms"] / 1e3, 1e-9), 1))
    return dict(wall_s=round(wall_s, 3), steps=len(rows), device_s=round(total_dev / 1e3, 3),
                gap_s=round(total_gap / 1e3, 3), groups=out,
                # Every step: [requests, tokens, device ms, idle ms before it, decode tokens,
                # KV tokens attended].
                per_step=[[b, t, round(d, 3), round(g, 3), nd, kv] for (b, t, nd, kv, *_), d, g
                          in zip(rows, per_dev, per_gap)])


def kernel_kinds(prof, top: int = 25) -> dict:
    by_name = collections.Counter()
    launches = collections.Counter()
    for evt in prof.key_averages():
        t = getattr(evt, "self_device_time_total", None)
        if t is None:
            t = getattr(evt, "self_cuda_time_total", 0)
        if t <= 0:
            continue
        by_name[evt.key] += t
        launches[evt.key] += evt.count
    kinds = collections.Counter()
    for name, t in by_name.items():
        for kind, pat in KINDS:
            if re.search(pat, name):
                kinds[kind] += t
                break
        else:
            kinds["other"] += t
    total = sum(kinds.values())
    return dict(
        kernel_s=round(total / 1e6, 3),
        kinds={k: dict(s=round(v / 1e6, 3), share=round(v / total, 3))
               for k, v in kinds.most_common()},
        top=[dict(name=n[:90], s=round(v / 1e6, 3), launches=launches[n])
             for n, v in by_name.most_common(top)])


def _model_sizes(llm) -> tuple[int, int, int]:
    """(bytes of weights read per decode step, parameters of the layers (linear FLOPs / 2 per
    token), KV bytes per token)."""
    model = llm.llm_engine.executor.worker.runner.model
    runner = llm.llm_engine.executor.worker.runner
    total = layer = embed = 0
    for name, p in model.named_parameters():
        total += p.numel() * p.element_size()
        if "embed_tokens" in name:
            embed += p.numel() * p.element_size()
        elif p.dim() >= 2 and "norm" not in name and "lm_head" not in name:
            layer += p.numel()
    tied = not any("lm_head" in n for n, _ in model.named_parameters())
    weight_bytes = total - (0 if tied else embed)      # the embedding table is not streamed
    return weight_bytes, layer, runner.bytes_per_block() // runner.block_size


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--workloads", default="nanovllm,throughput8k")
    p.add_argument("--max-num-seqs", type=int, default=1024)
    p.add_argument("--max-num-batched-tokens", type=int, default=16384)
    p.add_argument("--block-size", type=int, default=None,
                   help="KV block size (default: the engine's, 64 tokens on CUDA)")
    p.add_argument("--ride-budget", type=int, default=None, help="(default: the engine's)")
    p.add_argument("--ride-granule", type=int, default=None, help="(default: the engine's)")
    p.add_argument("--no-kernels", action="store_true")
    p.add_argument("--trace-steps", type=int, default=0,
                   help="chrome trace (host + device) of this many pipelined steps from the "
                        "first large mixed step on, to --trace-out")
    p.add_argument("--trace-out", default="trace.json")
    p.add_argument("--trace-decode-b", type=int, default=0,
                   help="trace from the first decode-only step of at most this many requests, "
                        "once a step had more, instead (a mid-size decode step's timeline)")
    p.add_argument("--trace-ridden", nargs="?", type=int, const=64, default=0,
                   metavar="MIN_REQS",
                   help="trace from the first step of at most 512 tokens with prompt tokens "
                        "riding beside >= MIN_REQS (default 64) requests, instead")
    p.add_argument("--profile-steps", type=int, default=0,
                   help="kernel profile of this many single steps per kind (large mixed, large "
                        "decode), taken in the timing pass (those steps are not timed)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    os.environ.setdefault("KVFLOW_STEP_TRACE", "1")
    recorder = StepRecorder(args.profile_steps)
    recorder.trace_steps, recorder.trace_out = args.trace_steps, args.trace_out
    recorder.trace_decode_b = args.trace_decode_b
    recorder.trace_ridden = args.trace_ridden
    recorder.install()
    kw = dict(load_format="dummy", skip_tokenizer_init=True, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, block_size=args.block_size,
              ride_budget=args.ride_budget, ride_granule=args.ride_granule)
    if torch.cuda.is_available():
        kw.update(dtype="bfloat16", max_model_len=4096)
    else:
        kw.update(device="cpu", dtype="float32", kv_cache_memory=64 << 20)
    llm = LLM(args.model, **kw)
    weight_bytes, layer_params, kv_per_token = _model_sizes(llm)
    result = dict(model=args.model, block_size=llm.llm_engine.config.cache.block_size,
                  max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                  weight_read_gb_per_step=round(weight_bytes / 1e9, 3),
                  layer_params=layer_params, kv_bytes_per_token=kv_per_token, workloads={})
    base = dict(model=args.model)
    eng = llm.llm_engine
    for w in args.workloads.split(","):
        recorder.rows.clear()
        recorder.enabled = True
        gct = GcTimer()
        if eng.step_trace is not None:
            eng.step_trace.clear()
        t0 = time.perf_counter()
        rec = WORKLOADS[w](llm, base, 0.6)
        wall = time.perf_counter() - t0
        recorder.enabled = False
        gct.stop()
        if recorder.step_kernels:
            entry_steps = {k: v for k, v in recorder.step_kernels.items()}
            recorder.step_kernels.clear()
        else:
            entry_steps = None
        entry = dict(output_tok_s=rec.get("output_tok_s"), bench_wall_s=rec.get("wall_s"),
                     gc=gct.report())
        if entry_steps:
            entry["step_kernels"] = entry_steps
        if eng.step_trace:
            # Host seconds per engine step: schedule, then launch + completing the step before.
            tr = eng.step_trace
            entry["host"] = dict(schedule_s=round(sum(r[2] for r in tr), 3),
                                 launch_complete_s=round(sum(r[3] for r in tr), 3),
                                 per_step_ms=[[round(r[2] * 1e3, 2), round(r[3] * 1e3, 2)]
                                              for r in tr])
        if torch.cuda.is_available():
            entry["steps"] = summarize_steps(recorder.rows, weight_bytes, layer_params,
                                             kv_per_token, wall)
            if not args.no_kernels:
                from torch.profiler import ProfilerActivity, profile
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    WORKLOADS[w](llm, base, 0.6)
                entry["kernels"] = kernel_kinds(prof)
        result["workloads"][w] = entry
        brief = {k: v for k, v in entry.items()
                 if k not in ("host", "steps", "kernels", "step_kernels")}
        if "steps" in entry:
            brief["steps"] = {k: v for k, v in entry["steps"].items() if k != "per_step"}
        if "host" in entry:
            brief["host"] = {k: v for k, v in entry["host"].items() if k != "per_step_ms"}
        if "kernels" in entry:
            brief["kernels"] = entry["kernels"]["kinds"]
        print(json.dumps({w: brief}), flush=True)
    text = json.dumps(result, indent=1)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
