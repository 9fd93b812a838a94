"""Device idle gaps in a chrome trace (torch.profiler, host + device) and what the host was
doing meanwhile.

    python3 benchmarks/trace_gaps.py TRACE.json [--min-us 100]

Lists every gap between consecutive device events longer than --min-us, with the host
runtime calls (cudaXxx) and Python-level ops that were running when the device went idle, and
sums the gaps by the host call that covered their start.
"""
from __future__ import annotations

import argparse
import collections
import gzip
import json

GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")     # device events (as exposed_time.py)
RUNTIME_CATEGORIES = ("cuda_runtime", "cuda_driver")
HOST_CATEGORIES = RUNTIME_CATEGORIES + ("cpu_op", "python_function", "user_annotation")


def find_gaps(events: list[dict], min_us: float) -> list[dict]:
    """Gaps longer than min_us between consecutive device events of a trace's "X" events:
    [{"us", "before" (the next device event's name), "runtime" (host runtime calls covering
    the gap's start), "ops" (innermost host ops covering it), "host" (the call to blame)}]."""
    dev = sorted((e for e in events if e.get("cat") in GPU_CATEGORIES), key=lambda e: e["ts"])
    host = [e for e in events if e.get("cat") in HOST_CATEGORIES]
    out, end = [], None
    for e in dev:
        if end is not None and e["ts"] - end > min_us:
            cover = [h for h in host if h["ts"] <= end < h["ts"] + h["dur"]]
            runtime = [h["name"] for h in sorted(cover, key=lambda h: h["ts"])
                       if h.get("cat") in RUNTIME_CATEGORIES]
            ops = [h["name"] for h in sorted(cover, key=lambda h: h["ts"])
                   if h.get("cat") in ("cpu_op", "user_annotation")][-3:]
            blame = runtime[-1] if runtime else (ops[-1] if ops else "(host between calls)")
            out.append(dict(us=e["ts"] - end, before=e["name"], runtime=runtime, ops=ops,
                            host=blame))
        end = max(end or 0, e["ts"] + e["dur"])
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("trace")
    p.add_argument("--min-us", type=float, default=100.0)
    args = p.parse_args()
    opener = gzip.open if args.trace.endswith(".gz") else open
    with opener(args.trace, "rt") as f:
        ev = [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]
    gaps = find_gaps(ev, args.min_us)
    total = collections.Counter()
    for g in gaps:
        total[g["host"]] += g["us"]
        print(f"gap {g['us']:9.1f} us before {g['before'][:40]!r}: runtime {g['runtime'][-2:]} "
              f"ops {g['ops']}")
    dev = [e for e in ev if e.get("cat") in GPU_CATEGORIES]
    span = max(e["ts"] + e["dur"] for e in dev) - min(e["ts"] for e in dev) if dev else 0
    print("gaps by host call at their start (us):", dict(total.most_common(12)))
    print(f"{len(gaps)} gaps, {sum(total.values()) / 1e3:.2f} ms in all, over "
          f"{span / 1e3:.1f} ms of trace")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
