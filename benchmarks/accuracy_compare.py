"""Compare GSM8K result files (`kvflow eval gsm8k --result-file`, benchmarks/gsm8k_hf.py).

    python3 benchmarks/accuracy_compare.py NAME=FILE.json NAME=FILE.json ... [--out FILE.jsonl]

Prints each run's accuracy with its Wilson interval and, for every pair, the share of questions
with identical replies and identical correctness, and whether each accuracy lies inside the
other's interval. The first file is the reference of the verdict lines.
"""
from __future__ import annotations

import argparse
import json


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("runs", nargs="+", metavar="NAME=FILE.json")
    p.add_argument("--out", default=None, help="append a summary line to this JSONL file")
    args = p.parse_args()
    out = args.out
    runs = {}
    for a in args.runs:
        name, path = a.split("=", 1)
        with open(path) as f:
            runs[name] = json.load(f)
    names = list(runs)
    n = {len(r["records"]) for r in runs.values()}
    assert len(n) == 1, f"different question counts: {n}"
    for name in names:
        r = runs[name]
        print(f"{name:>16}: accuracy {r['accuracy']:.4f} ({r['num_correct']}/{r['num_questions']})"
              f"  95% CI [{r['ci_low']:.4f}, {r['ci_high']:.4f}]  unparsed {r.get('num_unparsed')}"
              f"  request errors {r.get('num_request_errors')}")
    pairs = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            ra, rb = runs[a]["records"], runs[b]["records"]
            assert [x["question"] for x in ra] == [x["question"] for x in rb], "different questions"
            same_reply = sum(x["reply"] == y["reply"] for x, y in zip(ra, rb)) / len(ra)
            same_correct = sum(x["correct"] == y["correct"] for x, y in zip(ra, rb)) / len(ra)
            acc_a, acc_b = runs[a]["accuracy"], runs[b]["accuracy"]
            within = (runs[b]["ci_low"] <= acc_a <= runs[b]["ci_high"]
                      and runs[a]["ci_low"] <= acc_b <= runs[a]["ci_high"])
            pairs.append(dict(a=a, b=b, accuracy_a=acc_a, accuracy_b=acc_b,
                              equal_accuracy=acc_a == acc_b, within_ci=within,
                              identical_replies=round(same_reply, 4),
                              same_correctness=round(same_correct, 4)))
            print(f"{a} vs {b}: accuracy {acc_a:.4f} vs {acc_b:.4f} "
                  f"({'equal' if acc_a == acc_b else 'differ'}; "
                  f"{'each inside the other CI' if within else 'OUTSIDE CI'}), identical replies "
                  f"{same_reply:.3f}, same correctness {same_correct:.3f}")
    if out:
        with open(out, "a") as f:
            f.write(json.dumps({"task": "gsm8k", "num_questions": n.pop(),
                                "runs": {k: {x: v[x] for x in ("accuracy", "ci_low", "ci_high",
                                                               "num_correct", "num_unparsed")
                                             if x in v} for k, v in runs.items()},
                                "pairs": pairs}) + "\n")


if __name__ == "__main__":
    main()
