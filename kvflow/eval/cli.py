"""`kvflow eval gsm8k | mmlu`: accuracy of any OpenAI-compatible chat server, with a confidence
interval. Greedy by default (temperature 0) so a run is repeatable."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _common(p: argparse.ArgumentParser, max_tokens: int, shots: int) -> None:
    p.add_argument("--base-url", default=None, help="server root (default: http://HOST:PORT)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model", default=None, help="served model name (default: the server's)")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"))
    p.add_argument("--data-path", default=None, help="dataset file (default: the packaged one)")
    p.add_argument("--num-questions", type=int, default=None, help="default: all")
    p.add_argument("--num-shots", type=int, default=shots, help="0 for zero-shot")
    p.add_argument("--max-tokens", type=int, default=max_tokens)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--confidence", type=float, default=0.95)
    p.add_argument("--request-timeout", type=float, default=600.0)
    p.add_argument("--result-file", default=None, help="write the JSON result (and replies) here")
    p.add_argument("--disable-tqdm", action="store_true")


def add_eval_parser(subparsers) -> None:
    ev = subparsers.add_parser("eval", help="accuracy evaluations against an OpenAI-compatible server")
    sub = ev.add_subparsers(dest="eval_command", required=True)
    g = sub.add_parser("gsm8k", help="GSM8K test set, exact match of the final number")
    _common(g, max_tokens=512, shots=5)
    g.set_defaults(func=main_gsm8k)
    m = sub.add_parser("mmlu", help="MMLU, exact match of the chosen letter")
    _common(m, max_tokens=16, shots=5)
    m.add_argument("--subjects", nargs="+", default=None, help="default: all 57")
    m.set_defaults(func=main_mmlu)


def _validate(args) -> str:
    if args.num_questions is not None and args.num_questions < 1:
        raise ValueError("num_questions: must be >= 1")
    if args.max_tokens < 1:
        raise ValueError("max_tokens: must be >= 1")
    if not 0 < args.confidence < 1:
        raise ValueError("confidence: must be in (0, 1)")
    return args.base_url or f"http://{args.host}:{args.port}"


def _finish(args, summary: dict, records: list[dict]) -> int:
    print(f"{summary['task']}: accuracy {summary['accuracy']:.4f} "
          f"({summary['num_correct']}/{summary['num_questions']}), "
          f"{summary['confidence']:.0%} CI [{summary['ci_low']:.4f}, {summary['ci_high']:.4f}], "
          f"{summary['num_request_errors']} request errors, {summary['wall_s']:.1f} s")
    if summary["num_request_errors"]:
        print(f"first request error: {summary['first_error']}", file=sys.stderr)
    if args.result_file:
        os.makedirs(os.path.dirname(os.path.abspath(args.result_file)), exist_ok=True)
        with open(args.result_file, "w") as f:
            json.dump({**summary, "records": records}, f, indent=2)
    # Every request failing means the server was unusable: not an accuracy, an error.
    return 1 if summary["num_request_errors"] == summary["num_questions"] else 0


def main_gsm8k(args) -> int:
    from kvflow.eval import common, gsm8k

    base_url = _validate(args)
    shots, problems = gsm8k.split_shots(gsm8k.load_gsm8k(args.data_path), args.num_shots)
    if args.num_questions is not None:
        problems = problems[:args.num_questions]  # file order: the usual "first N" subset
    t = time.perf_counter()
    replies = common.chat_all(base_url, args.model, [gsm8k.build_messages(p, shots) for p in problems],
                              max_tokens=args.max_tokens, temperature=args.temperature,
                              concurrency=args.concurrency, api_key=args.api_key,
                              timeout=args.request_timeout, progress=not args.disable_tqdm)
    correct = [gsm8k.is_correct(text, p.answer) for p, (text, _) in zip(problems, replies)]
    summary = common.summarize("gsm8k", correct, [e for _, e in replies], args.confidence,
                               num_shots=args.num_shots, wall_s=time.perf_counter() - t,
                               num_unparsed=sum(gsm8k.extract_answer(r) is None for r, _ in replies))
    records = [{"question": p.question, "reference": p.answer, "reply": r, "error": e,
                "extracted": gsm8k.extract_answer(r), "correct": c}
               for p, (r, e), c in zip(problems, replies, correct)]
    return _finish(args, summary, records)


def main_mmlu(args) -> int:
    from kvflow.eval import common, mmlu

    base_url = _validate(args)
    pairs = mmlu.select(mmlu.load_mmlu(args.data_path), args.num_shots, args.subjects,
                        args.num_questions, args.seed)
    t = time.perf_counter()
    replies = common.chat_all(base_url, args.model, [mmlu.build_messages(q, s) for q, s in pairs],
                              max_tokens=args.max_tokens, temperature=args.temperature,
                              concurrency=args.concurrency, api_key=args.api_key,
                              timeout=args.request_timeout, progress=not args.disable_tqdm)
    correct = [mmlu.is_correct(text, q.answer) for (q, _), (text, _) in zip(pairs, replies)]
    by_subject: dict[str, list[bool]] = {}
    for (q, _), c in zip(pairs, correct):
        by_subject.setdefault(q.subject, []).append(c)
    summary = common.summarize(
        "mmlu", correct, [e for _, e in replies], args.confidence, num_shots=args.num_shots,
        wall_s=time.perf_counter() - t,
        num_unparsed=sum(mmlu.extract_choice(r) is None for r, _ in replies),
        subjects={s: {"n": len(v), "accuracy": sum(v) / len(v)} for s, v in sorted(by_subject.items())})
    records = [{"subject": q.subject, "question": q.question, "reference": q.answer, "reply": r,
                "error": e, "extracted": mmlu.extract_choice(r), "correct": c}
               for (q, _), (r, e), c in zip(pairs, replies, correct)]
    return _finish(args, summary, records)
