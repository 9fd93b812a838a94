"""`kvflow` command line: generate, serve, bench, cache (names as vLLM's where they exist)."""
from __future__ import annotations

import argparse
import logging
import sys


def _generate(args) -> int:
    from kvflow.engine.arg_utils import engine_kwargs
    from kvflow.engine.llm_engine import LLMEngine
    from kvflow.engine.output_processor import OutputKind
    from kvflow.sampling_params import SamplingParams

    engine = LLMEngine.from_engine_args(args.model, **engine_kwargs(args))
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            max_tokens=args.max_tokens, seed=args.sampling_seed)
    prompt_text = args.prompt if args.prompt is not None else sys.stdin.read()
    if args.chat:
        from kvflow.engine.chat import render_chat
        prompt = render_chat(engine.get_tokenizer(), [{"role": "user", "content": prompt_text}])
    else:
        prompt = prompt_text
    engine.add_request("cli", prompt, params, output_kind=OutputKind.DELTA)
    out = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            sys.stdout.write(out.outputs[0].text if out.outputs else "")
            sys.stdout.flush()
    sys.stdout.write("\n")
    if out is not None and out.error:
        print(f"error: {out.error}", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    from kvflow import __version__
    from kvflow.engine.arg_utils import add_engine_args

    parser = argparse.ArgumentParser(prog="kvflow", description="kvflow LLM inference engine")
    parser.add_argument("--version", action="version", version=f"kvflow {__version__}")
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text for one prompt, streamed to the terminal")
    g.add_argument("prompt", nargs="?", default=None, help="the prompt (default: read stdin)")
    g.add_argument("--model", default=None, help="model directory or .gguf (default: embedded SmolLM2)")
    g.add_argument("--chat", action="store_true", help="apply the model's chat template")
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--sampling-seed", type=int, default=None)
    add_engine_args(g)
    g.set_defaults(func=_generate)

    for hook in _optional_subcommands():
        hook(sub)
    return parser


def _optional_subcommands():
    """Subcommands whose dependencies may be missing (e.g. the server's FastAPI)."""
    hooks = []
    for module, name in (("kvflow.server.cli_args", "add_serve_parser"),
                         ("kvflow.cli_cache", "add_cache_parser"),
                         ("kvflow.bench.cli", "add_bench_parser"),
                         ("kvflow.kv_transfer.proxy", "add_proxy_parser"),
                         ("kvflow.eval.cli", "add_eval_parser")):
        try:
            mod = __import__(module, fromlist=[name])
            hooks.append(getattr(mod, name))
        except ModuleNotFoundError as e:
            # Not built yet, or an optional dependency is missing: the subcommand is absent.
            logging.getLogger("kvflow").debug("subcommand from %s unavailable: %s", module, e)
            continue
    return hooks


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO),
                        format="%(levelname)s %(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return int(args.func(args) or 0)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
