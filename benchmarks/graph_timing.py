"""GPU timers for the device tuning scripts (w4a16_tune, moe_tune, skinny_gemm_tune), and
the JSON-lines output the probes share.

graph_time_us times CUDA-graph replays, so launch overhead is excluded as in the decode graphs;
eager_time_us times eager launches (for what cannot be captured, or to include the launches).
"""
from __future__ import annotations

import json
import math
from typing import Callable, Sequence, Union

import torch


def graph_time_us(fns: Union[Callable, Sequence[Callable]], reps: int = 10,
                  iters: int | None = 20, target_ms: float = 4.0) -> float:
    """Mean microseconds of one call. `fns` is one callable, or several (e.g. one per weight
    copy, rotated so that the weights are not served from L2) run in turn; the graph holds
    `reps` rounds of them and is replayed `iters` times, or, with iters=None, as often as fills
    about target_ms (3 to 200 replays)."""
    fns = [fns] if callable(fns) else list(fns)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):          # warm-up (Triton compiles) outside the capture
        for fn in (fns * 2)[:2]:
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            for fn in fns:
                fn()
    g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(True), torch.cuda.Event(True)
    if iters is None:
        start.record()
        g.replay()
        end.record()
        torch.cuda.synchronize()
        iters = max(3, min(200, math.ceil(target_ms / max(start.elapsed_time(end), 1e-3))))
    start.record()
    for _ in range(iters):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / (iters * reps * len(fns))


def eager_time_us(fn: Callable, iters: int = 20, warmup: int = 1) -> float:
    """Mean microseconds of fn launched eagerly (launch overhead included), after `warmup`
    calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(True), torch.cuda.Event(True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / iters


def jsonl_emitter(path: str | None) -> Callable[[dict], None]:
    """emit(record): print it as one JSON line and, with a path, append it there (flushed per
    line, so a run cut short keeps what it measured)."""
    out_f = open(path, "a") if path else None

    def emit(rec: dict) -> None:
        line = json.dumps(rec)
        print(line, flush=True)
        if out_f:
            out_f.write(line + "\n")
            out_f.flush()
    return emit
