"""How a dummy-weight MoE model routes real steps: rows an expert, layer by layer.

    python3 benchmarks/routing_census.py [--model benchmarks/configs/mixtral-8x7b] [--tokens 384]

The fused MoE's tiles are tuned on uniformly random routing (benchmarks/moe_tune.py). This runs
the engine eagerly on nanovllm-like prompts (token ids in [0, 10000)), in steps of --tokens
prompt tokens, and records each MoE layer's rows per expert (top-k pairs an expert receives)
for every step of at least half that size. Prints one JSON line per layer: the mean over
steps of the largest and smallest expert's rows, against what uniform routing gives for the
same pair count (mean, and the expected largest of E multinomial counts by simulation).
"""
from __future__ import annotations

import argparse
import json
import random
import sys

import torch


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="benchmarks/configs/mixtral-8x7b")
    ap.add_argument("--tokens", type=int, default=384)
    ap.add_argument("--prompts", type=int, default=8)
    args = ap.parse_args()

    import kvflow.layers.moe as moe
    from kvflow import LLM, SamplingParams

    seen: list[tuple[int, torch.Tensor]] = []   # (call index, counts [E])
    real_route = moe.route
    calls = [0]
    recording = [False]          # not the constructor's profiling and warm-up passes

    def route(gate, x, top_k, renormalize, scoring="softmax"):
        weights, ids = real_route(gate, x, top_k, renormalize, scoring)
        if not recording[0]:
            return weights, ids
        if x.shape[0] >= args.tokens // 2:
            e = gate.weight.shape[0]
            seen.append((calls[0], torch.bincount(ids.reshape(-1), minlength=e).cpu()))
        calls[0] += 1
        return weights, ids
    moe.route = route

    llm = LLM(args.model, load_format="dummy", dtype="bfloat16", max_model_len=4096,
              enforce_eager=True, skip_tokenizer_init=True,
              max_num_batched_tokens=args.tokens, max_num_seqs=256)
    random.seed(0)
    prompts = [[random.randint(0, 10000) for _ in range(random.randint(100, 1024))]
               for _ in range(args.prompts)]
    recording[0] = True
    llm.generate([{"prompt_token_ids": p} for p in prompts],
                 SamplingParams(max_tokens=1, temperature=0.6, ignore_eos=True))
    with open(f"{args.model}/config.json") as f:
        layers = json.load(f)["num_hidden_layers"]   # MoE calls run layer by layer
    if not seen:
        print("no MoE step of that size was seen", file=sys.stderr)
        return 1
    e = seen[0][1].numel()
    by_layer: dict[int, list[torch.Tensor]] = {}
    for call, counts in seen:
        by_layer.setdefault(call % layers, []).append(counts)
    pairs = int(seen[0][1].sum())
    sim = torch.stack([torch.bincount(torch.rand(pairs // 2, e).topk(2, dim=-1).indices
                                      .reshape(-1), minlength=e) for _ in range(200)])
    uniform_max = float(sim.max(1).values.float().mean())
    for layer, rows in sorted(by_layer.items()):
        c = torch.stack(rows).float()                                          # [steps, E]
        print(json.dumps(dict(layer=layer, steps=len(rows), pairs=int(c[0].sum()),
                              mean_max_rows=round(float(c.max(1).values.mean()), 1),
                              mean_min_rows=round(float(c.min(1).values.mean()), 1),
                              uniform_mean=round(pairs / e, 1),
                              uniform_mean_max=round(uniform_max, 1),
                              first_step=[int(v) for v in rows[0]])), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
