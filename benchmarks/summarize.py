"""Markdown table: kvflow's benchmark records beside vLLM 0.26's anchors, with ratios.

    python3 benchmarks/summarize.py benchmarks/results/*.jsonl
"""
from __future__ import annotations

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ANCHORS = os.path.join(HERE, "vllm-0.26.0-nvidia-h200.jsonl")
# workload -> (field, higher is better)
FIGURES = {"nanovllm": ("output_tok_s", True), "decode1": ("ms_per_output_token", False),
           "throughput8k": ("output_tok_s", True)}


def load(paths):
    recs = {}
    for path in paths:
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line.startswith("{"):
                    r = json.loads(line)
                    key = (r["model"], r.get("workload", "init"))
                    recs[key] = r  # the last record of a (model, workload) wins
    return recs


def main(paths):
    ours, ref = load(paths), load([ANCHORS])
    models = sorted({m for m, _ in ours})
    print("| model | workload | vLLM 0.26 | kvflow | kvflow / vLLM |")
    print("|---|---|---|---|---|")
    for m in models:
        for w, (field, higher) in FIGURES.items():
            a, b = ref.get((m, w)), ours.get((m, w))
            if not b:
                continue
            va, vb = (a or {}).get(field), b[field]
            ratio = (vb / va if higher else va / vb) if va else None
            unit = "ms/token" if field.startswith("ms") else "out tok/s"
            print(f"| {m} | {w} ({unit}) | {va if va is not None else '-'} | {vb} | "
                  f"{f'{ratio:.2f}x' if ratio else '-'} |")
        a, b = ref.get((m, "init")), ours.get((m, "init"))
        if b:
            print(f"| {m} | LLM() ready (s) | {(a or {}).get('llm_constructor_s', '-')} | "
                  f"{b['llm_constructor_s']} | "
                  f"{(a['llm_constructor_s'] / b['llm_constructor_s']):.2f}x |" if a else "- |")


if __name__ == "__main__":
    main(sys.argv[1:])
