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


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("trace")
    p.add_argument("--min-us", type=float, default=100.0)
    args = p.parse_args()
    opener = gzip.open if args.trace.endswith(".gz") else open
    with opener(args.trace, "rt") as f:
        ev = [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]
    dev = sorted((e for e in ev if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")),
                 key=lambda e: e["ts"])
    host = [e for e in ev if e.get("cat") in ("cuda_runtime", "cuda_driver", "cpu_op",
                                                "python_function", "user_annotation")]
    gaps, end = [], None
    for e in dev:
        if end is not None and e["ts"] - end > args.min_us:
            gaps.append((end, e["ts"], e["name"]))
        end = max(end or 0, e["ts"] + e["dur"])
    total = collections.Counter()
    for g0, g1, nxt in gaps:
        cover = [h for h in host if h["ts"] <= g0 < h["ts"] + h["dur"]]
        runtime = [h["name"] for h in cover if h.get("cat") in ("cuda_runtime", "cuda_driver")]
        ops = [h["name"] for h in sorted(cover, key=lambda h: h["ts"])
               if h.get("cat") in ("cpu_op", "user_annotation")][-3:]
        key = runtime[-1] if runtime else (ops[-1] if ops else "(host between calls)")
        total[key] += g1 - g0
        print(f"gap {g1 - g0:9.1f} us before {nxt[:40]!r}: runtime {runtime[-2:]} ops {ops}")
    print("gaps by host call at their start (us):", dict(total.most_common(12)))
    print(f"{len(gaps)} gaps, {sum(total.values()) / 1e3:.2f} ms in all, over "
          f"{(dev[-1]['ts'] + dev[-1]['dur'] - dev[0]['ts']) / 1e3:.1f} ms of trace")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
