"""Serving statistics: what the async engine records, and the stat loggers that consume it.

The engine thread of `AsyncLLM` produces two kinds of records and hands them to every stat logger
*on the engine thread*, so loggers must be cheap and thread-safe (prometheus_client is):

- `IterationStats`, once per engine step that produced output: tokens and per-request latencies
  observed in that step;
- `FinishedRequestStats`, once per request that reached a final state (stop, length, abort, error).

Engine-wide state (running / waiting counts, KV usage, prefix-cache counters) is a snapshot,
`EngineStats`, that the engine thread refreshes after every iteration; loggers read it when they
need it (Prometheus at scrape time, the log line periodically) instead of being pushed every step.

This module imports nothing heavy: the Prometheus logger lives in `kvflow.metrics.prometheus`.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Optional

logger = logging.getLogger("kvflow")


@dataclass(frozen=True)
class EngineStats:
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0          # fraction of KV blocks in use, 0..1
    num_free_blocks: int = 0
    num_total_blocks: int = 0
    # Cumulative since the engine started (monotone): Prometheus turns them into counters.
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    num_preemptions: int = 0


@dataclass
class IterationStats:
    num_prompt_tokens: int = 0           # prompt tokens of requests whose first token came now
    num_generation_tokens: int = 0
    time_to_first_tokens: list[float] = field(default_factory=list)
    inter_token_latencies: list[float] = field(default_factory=list)

    def empty(self) -> bool:
        return not (self.num_prompt_tokens or self.num_generation_tokens)


@dataclass(frozen=True)
class FinishedRequestStats:
    request_id: str
    finish_reason: str                   # stop | length | abort | error
    num_prompt_tokens: int
    num_generation_tokens: int
    num_cached_tokens: int
    e2e_latency: float                   # seconds from arrival to the final output
    queue_time: Optional[float]          # arrival -> first scheduled; None if never scheduled
    ttft: Optional[float]                # None if no token was produced


class StatLogger:
    """Base class: every hook is optional. Hooks run on the engine thread."""

    def record_iteration(self, stats: IterationStats) -> None:
        pass

    def record_finished(self, stats: FinishedRequestStats) -> None:
        pass

    def log_engine(self, engine: EngineStats, now: float) -> None:
        """Called by the engine thread about every `log_interval` seconds while there is work."""


class LoggingStatLogger(StatLogger):
    """One INFO line per finished request, and a periodic engine line with throughput."""

    def __init__(self, log_requests: bool = True):
        self.log_requests = log_requests
        self._prompt_tokens = 0
        self._generation_tokens = 0
        self._last_log = time.monotonic()

    def record_iteration(self, stats: IterationStats) -> None:
        self._prompt_tokens += stats.num_prompt_tokens
        self._generation_tokens += stats.num_generation_tokens

    def record_finished(self, s: FinishedRequestStats) -> None:
        if not self.log_requests:
            return
        ttft = "-" if s.ttft is None else f"{s.ttft:.3f}s"
        logger.info("Finished request %s: finish_reason=%s prompt_tokens=%d (cached %d) "
                    "output_tokens=%d ttft=%s total=%.3fs", s.request_id, s.finish_reason,
                    s.num_prompt_tokens, s.num_cached_tokens, s.num_generation_tokens, ttft,
                    s.e2e_latency)

    def log_engine(self, engine: EngineStats, now: float) -> None:
        elapsed = max(now - self._last_log, 1e-6)
        logger.info("Engine: running=%d waiting=%d kv_cache_usage=%.1f%% "
                    "prompt_throughput=%.1f tok/s generation_throughput=%.1f tok/s preemptions=%d",
                    engine.num_running, engine.num_waiting, 100.0 * engine.kv_cache_usage,
                    self._prompt_tokens / elapsed, self._generation_tokens / elapsed,
                    engine.num_preemptions)
        self._prompt_tokens = self._generation_tokens = 0
        self._last_log = now


__all__ = ["EngineStats", "IterationStats", "FinishedRequestStats", "StatLogger",
           "LoggingStatLogger"]
