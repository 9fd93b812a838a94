"""Where a decode step's time goes when kernels overlap (PDL): exposed time per kernel.

With programmatic dependent launch a kernel starts while its predecessor still runs, so the
profiler's kernel durations overlap and their sum (8 ms for a 4.3 ms Llama-8B step) says
nothing. What a kernel costs the step is its *exposed* time: its end minus the end of the GPU
work before it (the stream is serial: each kernel's wait returns only after its predecessor
completed). Kernels are keyed by name and by the name of the kernel before them, which tells
same-named kernels apart by role (the skinny GEMM after the attention kernel is the output
projection, after a norm the q/k/v or gate/up projection, after another skinny GEMM the
down projection).

    python3 benchmarks/exposed_time.py TRACE.json[.gz] [--step-marker NAME]

TRACE: a chrome trace from torch.profiler (benchmarks/profile_decode.py --out writes one).
Steps are cut at each launch of the step marker (default: the decode-input unpack kernel).
"""
from __future__ import annotations

import collections
import gzip
import json
import sys

GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
DEFAULT_MARKER = "_decode_inputs_kernel"


def load_events(path: str) -> list[dict]:
    """GPU events (kernels, copies, memsets) of a chrome trace, in start order."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        trace = json.load(f)
    events = [e for e in trace["traceEvents"]
              if e.get("ph") == "X" and e.get("cat") in GPU_CATEGORIES]
    return sorted(events, key=lambda e: e["ts"])


def _short(name: str) -> str:
    return name if len(name) <= 48 else name[:45] + "..."


def exposed_per_step(events: list[dict], marker: str = DEFAULT_MARKER) -> dict:
    """{"steps", "step_us", "idle_us", "kernels": {"name <- previous": {"launches",
    "exposed_us", "idle_before_us"}}}, per step, over the whole steps between marker launches
    (the first step, whose predecessor is not in the trace, and the last, partial, are dropped). With `prev_end` the end of all GPU work before
    a kernel: exposed = end - max(start, prev_end) (its own share of the timeline, never
    negative) and idle_before = max(0, start - prev_end) (the GPU waited, e.g. for the host)."""
    starts = [i for i, e in enumerate(events) if e["name"].startswith(marker)]
    if len(starts) < 3:
        raise ValueError(f"fewer than three launches of {marker!r}: no whole step with a "
                         "step before it in the trace")
    starts = starts[1:]          # the first step's predecessor is not in the trace
    per = collections.defaultdict(lambda: [0, 0.0, 0.0])
    spans = []
    for a, b in zip(starts, starts[1:]):
        prev_end = max(e["ts"] + e["dur"] for e in events[:a])
        prev_name = events[a - 1]["name"]
        t0 = prev_end
        for e in events[a:b]:
            end = e["ts"] + e["dur"]
            key = f"{_short(e['name'])} <- {_short(prev_name)}"
            per[key][0] += 1
            per[key][1] += max(0.0, end - max(e["ts"], prev_end))
            per[key][2] += max(0.0, e["ts"] - prev_end)
            prev_end = max(prev_end, end)
            prev_name = e["name"]
        spans.append(prev_end - t0)
    n = len(spans)
    kernels = {k: dict(launches=c / n, exposed_us=round(t / n, 2), idle_before_us=round(i / n, 2))
               for k, (c, t, i) in sorted(per.items(), key=lambda kv: -kv[1][1])}
    return dict(steps=n, step_us=round(sum(spans) / n, 1),
                idle_us=round(sum(v[2] for v in per.values()) / n, 1), kernels=kernels)


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    marker = argv[argv.index("--step-marker") + 1] if "--step-marker" in argv else DEFAULT_MARKER
    res = exposed_per_step(load_events(argv[0]), marker)
    print(f"{res['steps']} steps: {res['step_us']} us per step, of which the GPU idled "
          f"{res['idle_us']} us")
    print(f"{'exposed us/step':>16} {'idle before':>12} {'launches':>9}  kernel <- previous kernel")
    for k, v in res["kernels"].items():
        print(f"{v['exposed_us']:16.1f} {v['idle_before_us']:12.1f} {v['launches']:9.1f}  {k}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
