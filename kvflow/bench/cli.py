"""`kvflow bench throughput | latency` (offline, dummy weights) and `serve` (online)."""
from __future__ import annotations

from kvflow.engine.arg_utils import add_engine_args


def add_bench_parser(subparsers) -> None:
    from kvflow.bench import offline

    bench = subparsers.add_parser("bench", help="benchmarks")
    sub = bench.add_subparsers(dest="bench_command", required=True)
    t = sub.add_parser("throughput", help="offline throughput: nanovllm and throughput8k workloads")
    t.add_argument("--workload", default=None, help="nanovllm,throughput8k (comma list) or all")
    offline.add_offline_args(t)
    add_engine_args(t)
    t.set_defaults(func=offline.main_throughput, load_format="dummy")
    lat = sub.add_parser("latency", help="single-request decode latency: the decode1 workload")
    offline.add_offline_args(lat)
    add_engine_args(lat)
    lat.set_defaults(func=offline.main_latency, load_format="dummy")
    from kvflow.bench import serve  # online: needs only httpx, not the engine

    srv = sub.add_parser("serve", help="online load generator against an OpenAI-compatible server")
    serve.add_serve_args(srv)
    srv.set_defaults(func=serve.main_serve)
