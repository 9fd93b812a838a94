"""Prometheus metrics named `kvflow:*`, one for one with vLLM's `vllm:*`, so dashboards port over
by renaming the prefix.

Each server app owns a dedicated `CollectorRegistry` (never the process-global one), so tests can
run several servers in one process without "Duplicated timeseries" errors.

Two sources feed the registry:
- engine-wide state (running/waiting, KV usage, prefix-cache and preemption counters) is read
  from the engine's latest `EngineStats` snapshot at scrape time by a custom collector, so the
  numbers are never staler than one engine iteration and need no delta bookkeeping;
- per-request events (tokens, latencies, finishes) are pushed by the engine thread through the
  `StatLogger` hooks into ordinary counters and histograms (prometheus_client is thread-safe).
"""
from __future__ import annotations

from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from kvflow.metrics import EngineStats, FinishedRequestStats, IterationStats, StatLogger

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Bucket edges chosen for LLM serving latencies: from milliseconds (tiny models, cached prompts)
# to many minutes (long generations under load).
_TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]
_ITL_BUCKETS = [0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
                2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0]
_REQUEST_BUCKETS = [0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0,
                    30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0]

FINISH_REASONS = ("stop", "length", "abort", "error")


class _EngineCollector(Collector):
    """Engine-wide gauges and counters, read from the latest snapshot at scrape time."""

    def __init__(self, model_name: str, snapshot: Callable[[], EngineStats], cache_info: dict):
        self.model_name = model_name
        self.snapshot = snapshot
        self.cache_info = {k: str(v) for k, v in cache_info.items()}

    def collect(self) -> Iterable:
        s = self.snapshot()
        labels = ["model_name"]
        value = [self.model_name]

        def gauge(name, doc, v):
            g = GaugeMetricFamily(name, doc, labels=labels)
            g.add_metric(value, v)
            return g

        def counter(name, doc, v):
            c = CounterMetricFamily(name, doc, labels=labels)
            c.add_metric(value, v)
            return c

        yield gauge("kvflow:num_requests_running", "Number of requests in model execution batches.",
                    s.num_running)
        yield gauge("kvflow:num_requests_waiting", "Number of requests waiting to be processed.",
                    s.num_waiting)
        yield gauge("kvflow:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.",
                    s.kv_cache_usage)
        # kvflow extras (no vLLM counterpart): exact block counts, handy for leak checks.
        yield gauge("kvflow:num_free_kv_blocks", "Free KV-cache blocks (cached-but-free included).",
                    s.num_free_blocks)
        yield gauge("kvflow:num_total_kv_blocks", "Total KV-cache blocks.", s.num_total_blocks)
        yield counter("kvflow:prefix_cache_queries",
                      "Prefix cache queries, in terms of number of queried tokens.",
                      s.prefix_cache_queries)
        yield counter("kvflow:prefix_cache_hits",
                      "Prefix cache hits, in terms of number of cached tokens.", s.prefix_cache_hits)
        yield counter("kvflow:num_preemptions", "Cumulative number of preemptions.",
                      s.num_preemptions)
        info = GaugeMetricFamily("kvflow:cache_config_info", "Information of the KV cache config.",
                                 labels=sorted(self.cache_info))
        info.add_metric([self.cache_info[k] for k in sorted(self.cache_info)], 1.0)
        yield info


class PrometheusStatLogger(StatLogger):
    def __init__(self, model_name: str, snapshot: Callable[[], EngineStats],
                 cache_info: dict | None = None):
        self.registry = CollectorRegistry(auto_describe=True)
        self.model_name = model_name
        reg, lbl = self.registry, ["model_name"]
        self.registry.register(_EngineCollector(model_name, snapshot, cache_info or {}))
        self.prompt_tokens = Counter("kvflow:prompt_tokens", "Number of prefill tokens processed.",
                                     lbl, registry=reg).labels(model_name)
        self.generation_tokens = Counter("kvflow:generation_tokens",
                                         "Number of generation tokens processed.",
                                         lbl, registry=reg).labels(model_name)
        success = Counter("kvflow:request_success", "Count of finished requests by finish reason.",
                          lbl + ["finished_reason"], registry=reg)
        # Pre-create every label value so dashboards see zeros rather than missing series.
        self.request_success = {r: success.labels(model_name, r) for r in FINISH_REASONS}
        self.ttft = Histogram("kvflow:time_to_first_token_seconds",
                              "Histogram of time to first token in seconds.", lbl,
                              buckets=_TTFT_BUCKETS, registry=reg).labels(model_name)
        self.itl = Histogram("kvflow:inter_token_latency_seconds",
                             "Histogram of inter-token latency in seconds.", lbl,
                             buckets=_ITL_BUCKETS, registry=reg).labels(model_name)
        self.e2e = Histogram("kvflow:e2e_request_latency_seconds",
                             "Histogram of end to end request latency in seconds.", lbl,
                             buckets=_REQUEST_BUCKETS, registry=reg).labels(model_name)
        self.queue_time = Histogram("kvflow:request_queue_time_seconds",
                                    "Histogram of time spent in WAITING phase for request.", lbl,
                                    buckets=_REQUEST_BUCKETS, registry=reg).labels(model_name)

    def record_iteration(self, stats: IterationStats) -> None:
        if stats.num_prompt_tokens:
            self.prompt_tokens.inc(stats.num_prompt_tokens)
        if stats.num_generation_tokens:
            self.generation_tokens.inc(stats.num_generation_tokens)
        for t in stats.time_to_first_tokens:
            self.ttft.observe(t)
        for t in stats.inter_token_latencies:
            self.itl.observe(t)

    def record_finished(self, stats: FinishedRequestStats) -> None:
        counter = self.request_success.get(stats.finish_reason)
        if counter is not None:
            counter.inc()
        self.e2e.observe(stats.e2e_latency)
        if stats.queue_time is not None:
            self.queue_time.observe(stats.queue_time)

    def render(self) -> bytes:
        return generate_latest(self.registry)
