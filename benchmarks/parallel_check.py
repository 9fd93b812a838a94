"""Greedy-token equality of parallel layouts (TP, TP+EP) against one GPU, with dummy weights.

    python benchmarks/parallel_check.py run --model DIR --tp 2 [--ep] --dtype float32 \
        [--layers 8] --out tp2.json
    python benchmarks/parallel_check.py compare tp1.json tp2.json [--tie-gap 1e-3] \
        [--jsonl results.jsonl]

Why this is a meaningful check
------------------------------
- Same weights in every layout: load_format="dummy" generates each parameter's full tensor from
  a seed derived from its name and shards it through the weight loaders (kvflow/models/dummy.py),
  so TP=1, TP=2 and EP=2 hold the same model. KVFLOW_DUMMY_WEIGHTS=scaled (set here) gives
  fan-in-scaled values: logits spread O(1) and decisive routers. The default +-1e-3 dummy model
  is nearly constant (logit gaps ~1e-5) and its greedy tokens would be decided by noise.
- Bit-exact equality across TP degrees is not expected: the all-reduce sums partial products
  in another order, so logits differ by rounding (fp32: ~1e-6 relative; bf16: ~1e-2). A greedy
  sequence diverges where the reference's top-2 logprob gap is below that noise, and after a
  divergence the continuations are unrelated. So `compare` reports, per prompt, the first
  divergence and the reference's top-1/top-2 gap there, and passes when every divergence
  happens at a near-tie (gap < --tie-gap). A sharding bug (wrong slice, missing all-reduce,
  wrong expert) breaks the logits by O(1) and diverges at the first tokens with large gaps.
- fp32 is the strict check (tie-gap 1e-3: fp32 rounding cannot move a logprob that far);
  bf16 (tie-gap 0.1) reports the agreement rate a user would see.
- --layers N keeps only the first N decoder layers (same shapes per layer, so the same sharding
  code): Mixtral-8x7B in fp32 does not fit one GPU at full depth, 8 layers do (~47 GB).

`run` also records throughput of the greedy batch (tokens/s) — use `kvflow bench throughput`
for the standard workloads.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time


def _prompts(vocab: int, n: int, seed: int = 0) -> list[list[int]]:
    import random
    rng = random.Random(seed)
    return [[rng.randrange(3, min(vocab, 32000)) for _ in range(rng.randint(16, 200))]
            for _ in range(n)]


def _model_dir(model: str, layers: int | None) -> str:
    if not layers:
        return model
    d = tempfile.mkdtemp(prefix="kvflow-parallel-check-")
    for name in os.listdir(model):
        if name.endswith(".json"):
            shutil.copy(os.path.join(model, name), d)
    with open(os.path.join(d, "config.json")) as f:
        cfg = json.load(f)
    cfg["num_hidden_layers"] = layers
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f)
    return d


def cmd_run(a) -> int:
    os.environ.setdefault("KVFLOW_DUMMY_WEIGHTS", "scaled")   # inherited by the workers
    import torch

    from kvflow import LLM, SamplingParams
    model = _model_dir(a.model, a.layers)
    kw = dict(load_format="dummy", seed=a.seed, dtype=a.dtype, skip_tokenizer_init=True,
              tensor_parallel_size=a.tp, enable_expert_parallel=a.ep,
              max_model_len=a.max_model_len, enforce_eager=a.enforce_eager,
              gpu_memory_utilization=a.gpu_memory_utilization)
    if a.backend:
        kw["distributed_executor_backend"] = a.backend
    t0 = time.perf_counter()
    llm = LLM(model, **kw)
    init_s = time.perf_counter() - t0
    vocab = llm.llm_engine.config.model.vocab_size
    prompts = _prompts(vocab, a.num_prompts)
    sp = SamplingParams(temperature=0, max_tokens=a.max_tokens, ignore_eos=True, logprobs=2,
                        detokenize=False)
    llm.generate([{"prompt_token_ids": [5, 6, 7]}], SamplingParams(max_tokens=4), use_tqdm=False)
    t = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
    dt = time.perf_counter() - t
    seqs = []
    for o in outs:
        c = o.outputs[0]
        top2 = [sorted((lp.logprob for lp in pos.values()), reverse=True)[:2] for pos in c.logprobs]
        seqs.append(dict(tokens=list(c.token_ids), top2=top2))
    n_out = sum(len(s["tokens"]) for s in seqs)
    n_in = sum(len(p) for p in prompts)
    rec = dict(model=os.path.basename(os.path.normpath(a.model)), layers=a.layers or "all",
               tp=a.tp, ep=a.ep, dtype=a.dtype, backend=a.backend or "default",
               gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
               enforce_eager=a.enforce_eager, init_s=round(init_s, 2), num_prompts=len(prompts),
               input_tokens=n_in, output_tokens=n_out, wall_s=round(dt, 3),
               output_tok_s=round(n_out / dt, 1), total_tok_s=round((n_in + n_out) / dt, 1),
               seqs=seqs)
    with open(a.out, "w") as f:
        json.dump(rec, f)
    print(json.dumps({k: v for k, v in rec.items() if k != "seqs"}))
    llm.shutdown()
    return 0


def compare(ref: dict, got: dict, tie_gap: float) -> dict:
    """Per-prompt first divergence and the reference's top-2 gap there (module docstring)."""
    identical, agree, total, worst_gap, bad = 0, 0, 0, 0.0, []
    divergences = []
    for i, (r, g) in enumerate(zip(ref["seqs"], got["seqs"])):
        rt, gt = r["tokens"], g["tokens"]
        n = min(len(rt), len(gt))
        first = next((j for j in range(n) if rt[j] != gt[j]), None)
        total += len(rt)
        if first is None and len(rt) == len(gt):
            identical += 1
            agree += len(rt)
            continue
        first = n if first is None else first
        agree += first
        top2 = r["top2"][first] if first < len(r["top2"]) else []
        gap = (top2[0] - top2[1]) if len(top2) == 2 else float("inf")
        divergences.append(dict(prompt=i, first_divergence=first, ref_top2_gap=round(gap, 6)))
        worst_gap = max(worst_gap, gap)
        if gap >= tie_gap:
            bad.append(i)
    return dict(record="parallel_check", ref=_label(ref), got=_label(got), dtype=ref["dtype"],
                prompts=len(ref["seqs"]), identical_prompts=identical,
                token_agreement=round(agree / max(total, 1), 4), tie_gap=tie_gap,
                divergences=divergences, max_gap_at_divergence=round(worst_gap, 6),
                ok=not bad, non_tie_divergences=bad,
                got_output_tok_s=got["output_tok_s"], ref_output_tok_s=ref["output_tok_s"])


def _label(rec: dict) -> str:
    return f"{rec['model']}[layers={rec['layers']}] tp={rec['tp']}{' ep' if rec['ep'] else ''} {rec['dtype']}"


def cmd_compare(a) -> int:
    with open(a.ref) as f:
        ref = json.load(f)
    with open(a.got) as f:
        got = json.load(f)
    res = compare(ref, got, a.tie_gap)
    line = json.dumps(res)
    print(line)
    if a.jsonl:
        with open(a.jsonl, "a") as f:
            f.write(line + "\n")
    print(f"{'PASS' if res['ok'] else 'FAIL'} {res['got']} vs {res['ref']}: "
          f"{res['identical_prompts']}/{res['prompts']} prompts identical, token agreement "
          f"{res['token_agreement']:.2%}, largest ref top-2 gap at a divergence "
          f"{res['max_gap_at_divergence']} (tie threshold {a.tie_gap})")
    return 0 if res["ok"] else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--model", required=True)
    r.add_argument("--tp", type=int, default=1)
    r.add_argument("--ep", action="store_true")
    r.add_argument("--dtype", default="bfloat16")
    r.add_argument("--layers", type=int, default=None)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--num-prompts", type=int, default=32)
    r.add_argument("--max-tokens", type=int, default=64)
    r.add_argument("--max-model-len", type=int, default=1024)
    r.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    r.add_argument("--enforce-eager", action="store_true")
    r.add_argument("--backend", default=None, help="mp (default) or ray")
    r.add_argument("--out", required=True)
    r.set_defaults(func=cmd_run)
    c = sub.add_parser("compare")
    c.add_argument("ref")
    c.add_argument("got")
    c.add_argument("--tie-gap", type=float, default=1e-3)
    c.add_argument("--jsonl", default=None)
    c.set_defaults(func=cmd_compare)
    a = p.parse_args(argv)
    return a.func(a)


if __name__ == "__main__":
    sys.exit(main())
