"""The OpenAI-compatible HTTP server (`kvflow serve`).

Modules: cli_args (argparse, cheap to import), api_server (app factory, uvicorn runner),
protocol (request/response models), errors (OpenAI error bodies), serving_base /
serving_completions / serving_chat (endpoint logic). Importing this package imports nothing
heavy; use `kvflow.server.api_server` for build_app / run_server.
"""
from kvflow.server.cli_args import add_serve_parser

__all__ = ["add_serve_parser"]
