"""Arguments of `kvflow serve [MODEL] ...`, mirroring `vllm serve`.

Importing this module is cheap (argparse only): the CLI can build its parser without loading
torch, FastAPI or the model. The engine options are the ones every subcommand shares
(kvflow.engine.arg_utils), so `serve`, `generate` and `bench` spell them identically.
"""
from __future__ import annotations

import argparse
import json
import os
import re
from typing import Any, Optional

from kvflow.engine.arg_utils import add_engine_args
from kvflow.engine.arg_utils import engine_kwargs as _engine_kwargs

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9,
          "gb": 10**9, "t": 10**12, "tb": 10**12, "ki": 2**10, "kib": 2**10, "mi": 2**20,
          "mib": 2**20, "gi": 2**30, "gib": 2**30, "ti": 2**40, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """'1048576', '1MiB', '64KiB', '2M' -> bytes."""
    m = _SIZE.match(str(text))
    if not m:
        raise argparse.ArgumentTypeError(f"not a size in bytes: {text!r} (e.g. 2GiB, 512MiB)")
    value = float(m.group(1)) * _UNITS[(m.group(2) or "").lower()]
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
    return int(value)


def parse_origins(text: str) -> list[str]:
    """A JSON list ('["http://a", "http://b"]') or a comma-separated list; '*' allows all."""
    text = text.strip()
    if text.startswith("["):
        try:
            value = json.loads(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"invalid JSON list: {e}") from None
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise argparse.ArgumentTypeError("must be a JSON list of strings")
        return value
    return [o.strip() for o in text.split(",") if o.strip()]


def _non_negative_int(text: str) -> int:
    v = int(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


def add_serve_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("model", nargs="?", default=None,
                        help="model directory (config.json + weights) or .gguf file; "
                             "default: the embedded SmolLM2-135M-Instruct")
    srv = parser.add_argument_group("server")
    srv.add_argument("--host", default="0.0.0.0", help="address to bind (default: all interfaces)")
    srv.add_argument("--port", type=int, default=8000, help="port (0 picks a free one)")
    srv.add_argument("--api-key", default=None,
                     help="require 'Authorization: Bearer KEY' on /v1/* and /tokenize, "
                          "/detokenize (default: $KVFLOW_API_KEY, unset = no auth)")
    srv.add_argument("--allowed-origins", type=parse_origins, default=["*"],
                     help="CORS origins: JSON list or comma-separated (default: *)")
    srv.add_argument("--allow-credentials", action="store_true",
                     help="CORS: allow credentials (cookies, auth headers)")
    srv.add_argument("--served-model-name", nargs="+", default=None,
                     help="model name(s) clients use; the first is reported in responses "
                          "(default: MODEL as given)")
    srv.add_argument("--max-queued-requests", type=_non_negative_int, default=None,
                     help="answer 429 when this many requests are already waiting "
                          "(default: unlimited)")
    srv.add_argument("--max-request-body-bytes", type=parse_bytes, default=16 * 2**20,
                     help="reject larger request bodies with 413; accepts 64KiB, 16MiB, ... "
                          "(default: 16MiB)")
    srv.add_argument("--shutdown-timeout", type=float, default=30.0,
                     help="on SIGTERM, seconds in-flight requests may take to finish before "
                          "they are aborted (default: 30)")
    srv.add_argument("--health-stall-timeout", type=float, default=60.0,
                     help="/health answers 503 when requests are pending and the engine has "
                          "not completed a step for this many seconds (default: 60)")
    srv.add_argument("--log-stats-interval", type=float, default=10.0,
                     help="seconds between engine stats log lines while busy (0 disables)")
    srv.add_argument("--disable-log-requests", action="store_true",
                     help="no log line per finished request")
    srv.add_argument("--disable-uvicorn-access-log", action="store_true")
    srv.add_argument("--uvicorn-log-level", default="info",
                     choices=["critical", "error", "warning", "info", "debug", "trace"])

    # The engine options of LLM(), shared with every other subcommand.
    add_engine_args(parser)
    return parser


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    """Register `serve` on an argparse subparsers object; the subcommand runs through
    `args.func(args)`."""
    parser = subparsers.add_parser(
        "serve", help="start the OpenAI-compatible API server",
        description="Start an OpenAI-compatible HTTP server (like `vllm serve`).")
    add_serve_arguments(parser)
    parser.set_defaults(func=cmd_serve)
    return parser


def make_serve_parser() -> argparse.ArgumentParser:
    return add_serve_arguments(argparse.ArgumentParser(
        prog="kvflow serve", description="Start an OpenAI-compatible HTTP server."))


def parse_serve_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    return make_serve_parser().parse_args(argv)


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """LLMEngine.from_engine_args keywords from the parsed engine options (server defaults)."""
    return dict(_engine_kwargs(args), usage_context="server")


def api_key(args: argparse.Namespace) -> Optional[str]:
    return getattr(args, "api_key", None) or os.environ.get("KVFLOW_API_KEY") or None


def cmd_serve(args: argparse.Namespace) -> int:
    from kvflow.server.api_server import run_server  # heavy imports only when serving
    run_server(args)
    return 0
