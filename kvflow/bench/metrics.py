"""Per-request timings of `kvflow bench serve` and the summary computed from them.

Definitions (all latencies in ms in the summary):
  TTFT  request sent -> first non-empty streamed text.
  ITL   gap between consecutive non-empty streamed chunks (a chunk may carry several tokens).
  TPOT  (e2e - TTFT) / (output_tokens - 1), per request with at least 2 output tokens.
  E2EL  request sent -> end of the stream.
Throughputs divide by the benchmark's wall time (first send to last completion). Goodput counts
only the requests that meet every given SLO (ms) on TTFT / TPOT / E2EL.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

METRICS = ("ttft", "tpot", "itl", "e2el")
SLO_KEYS = ("ttft", "tpot", "e2el")


@dataclass
class RequestResult:
    prompt_len: int
    expected_output_len: int
    success: bool = False
    error: str = ""
    output_len: int = 0          # from the server's usage when reported, else re-tokenized
    ttft: float = 0.0            # seconds
    latency: float = 0.0         # seconds, end to end
    itl: list[float] = field(default_factory=list)  # seconds
    start_time: float = 0.0      # seconds since the benchmark started
    generated_text: str = ""

    @property
    def tpot(self) -> Optional[float]:
        if not self.success or self.output_len < 2:
            return None
        return (self.latency - self.ttft) / (self.output_len - 1)


def parse_goodput(specs: Optional[list[str]]) -> dict[str, float]:
    """["ttft:200", "tpot:50"] -> {"ttft": 200.0, "tpot": 50.0} (ms); bad keys / values raise."""
    slos = {}
    for spec in specs or []:
        key, sep, value = spec.partition(":")
        if not sep or key not in SLO_KEYS:
            raise ValueError(f"goodput: {spec!r} is not KEY:MS with KEY in {', '.join(SLO_KEYS)}")
        try:
            ms = float(value)
        except ValueError:
            raise ValueError(f"goodput: {spec!r}: {value!r} is not a number") from None
        if ms <= 0:
            raise ValueError(f"goodput: {spec!r}: the SLO must be > 0 ms")
        slos[key] = ms
    return slos


def _stats(name: str, values_s: list[float], percentiles: list[float]) -> dict[str, float]:
    arr = np.asarray(values_s, dtype=np.float64) * 1000.0
    if arr.size == 0:
        arr = np.zeros(1)
    out = {f"mean_{name}_ms": float(arr.mean()), f"median_{name}_ms": float(np.median(arr)),
           f"std_{name}_ms": float(arr.std())}
    for p in percentiles:
        out[f"p{p:g}_{name}_ms"] = float(np.percentile(arr, p))
    return out


def meets_slos(r: RequestResult, slos: dict[str, float]) -> bool:
    got = {"ttft": r.ttft, "tpot": r.tpot if r.tpot is not None else 0.0, "e2el": r.latency}
    return r.success and all(got[k] * 1000.0 <= ms for k, ms in slos.items())


def summarize(results: list[RequestResult], duration: float, percentiles=(50, 90, 99),
              slos: Optional[dict[str, float]] = None) -> dict:
    """The summary dict (vLLM's `bench serve` key names where they exist)."""
    ok = [r for r in results if r.success]
    duration = max(duration, 1e-9)
    n_in = sum(r.prompt_len for r in ok)
    n_out = sum(r.output_len for r in ok)
    summary = {
        "duration": duration,
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "total_input_tokens": n_in,
        "total_output_tokens": n_out,
        "request_throughput": len(ok) / duration,
        "output_throughput": n_out / duration,
        "total_token_throughput": (n_in + n_out) / duration,
    }
    if slos:
        summary["goodput_slos_ms"] = dict(slos)
        summary["request_goodput"] = sum(meets_slos(r, slos) for r in ok) / duration
    pct = list(percentiles)
    summary.update(_stats("ttft", [r.ttft for r in ok], pct))
    summary.update(_stats("tpot", [r.tpot for r in ok if r.tpot is not None], pct))
    summary.update(_stats("itl", [x for r in ok for x in r.itl], pct))
    summary.update(_stats("e2el", [r.latency for r in ok], pct))
    errors: dict[str, int] = {}
    for r in results:
        if not r.success:
            key = r.error.splitlines()[0][:200] if r.error else "unknown"
            errors[key] = errors.get(key, 0) + 1
    summary["errors"] = errors
    return summary


def format_summary(s: dict, percentiles=(50, 90, 99)) -> str:
    lines = ["{s:{c}^60}".format(s=" Serving Benchmark Result ", c="=")]

    def row(label, value, fmt="{:<44}{:>16.2f}"):
        lines.append(fmt.format(label, value))

    lines.append("{:<44}{:>16}".format("Successful requests:", s["completed"]))
    lines.append("{:<44}{:>16}".format("Failed requests:", s["failed"]))
    row("Benchmark duration (s):", s["duration"])
    lines.append("{:<44}{:>16}".format("Total input tokens:", s["total_input_tokens"]))
    lines.append("{:<44}{:>16}".format("Total generated tokens:", s["total_output_tokens"]))
    row("Request throughput (req/s):", s["request_throughput"])
    if "request_goodput" in s:
        row("Request goodput (req/s):", s["request_goodput"])
    row("Output token throughput (tok/s):", s["output_throughput"])
    row("Total token throughput (tok/s):", s["total_token_throughput"])
    for name, title in (("ttft", "Time to First Token"), ("tpot", "Time per Output Token (excl. 1st token)"),
                        ("itl", "Inter-token Latency"), ("e2el", "End-to-end Latency")):
        lines.append("{s:{c}^60}".format(s=f" {title} ", c="-"))
        row(f"Mean {name.upper()} (ms):", s[f"mean_{name}_ms"])
        row(f"Median {name.upper()} (ms):", s[f"median_{name}_ms"])
        for p in percentiles:
            row(f"P{p:g} {name.upper()} (ms):", s[f"p{p:g}_{name}_ms"])
    lines.append("=" * 60)
    return "\n".join(lines)
