"""Admission control on a chat-like load on the device: outputs that end at a stop token, not
at max_tokens, through a KV cache smaller than the load's concurrency.

    python3 benchmarks/chat_admission_probe.py --model benchmarks/configs/llama3.1-8b \
        [--no-admission-control] [--kv-tokens 100000] [--out res.jsonl]

Dummy (random) weights never emit EOS on purpose, so `stop_token_ids` holds 1/300 of the
vocabulary (ids from 20000 up, or from half the vocabulary in a small one) and sampling runs
at temperature 1 with a seed per request: outputs end after ~300 tokens on average, roughly
geometrically, and no request knows its length in advance (max_tokens unset: each may run to
the context window). Prompts are random
ids of U(100, 1000) tokens. Figure: output tokens / wall s, and the preemptions the run took.
One process per variant.
"""
import argparse
import json
import random
import time

from kvflow import LLM, SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--admission-control", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--kv-tokens", type=int, default=100_000)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--mean-len", type=int, default=300)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    with open(f"{args.model}/config.json") as f:
        cfg = json.load(f)
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    token_bytes = cfg["num_hidden_layers"] * kv_heads * head_dim * 2 * 2      # K and V, bf16
    t0 = time.perf_counter()
    llm = LLM(args.model, load_format="dummy", max_model_len=args.max_model_len, dtype="bfloat16",
              skip_tokenizer_init=True, max_num_seqs=256, max_num_batched_tokens=8192,
              admission_control=args.admission_control, seed=0,
              kv_cache_memory=args.kv_tokens * token_bytes)
    init_s = time.perf_counter() - t0
    eng = llm.llm_engine
    vocab = eng.config.model.vocab_size
    first = min(20000, vocab // 2)
    stops = list(range(first, first + max(1, vocab // args.mean_len)))
    rng = random.Random(0)
    max_prompt = min(1000, args.max_model_len // 4)
    prompts = [{"prompt_token_ids": [rng.randrange(min(10000, vocab))
                                     for _ in range(rng.randint(100, max_prompt))]}
               for _ in range(args.requests)]
    params = [SamplingParams(temperature=1.0, seed=i, stop_token_ids=stops, max_tokens=None,
                             detokenize=False)
              for i in range(args.requests)]
    llm.generate([{"prompt_token_ids": [1, 2, 3]}], SamplingParams(max_tokens=8, detokenize=False),
                 use_tqdm=False)
    pre = eng.scheduler.num_preemptions
    t = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    dt = time.perf_counter() - t
    lens = [len(o.outputs[0].token_ids) for o in outs]
    rec = dict(model=args.model.rstrip("/").split("/")[-1],
               admission_control=args.admission_control,
               kv_cache_tokens=eng.num_total_blocks() * eng.config.cache.block_size,
               requests=args.requests, init_s=round(init_s, 1), wall_s=round(dt, 3),
               output_tokens=sum(lens), mean_output=round(sum(lens) / len(lens), 1),
               max_output=max(lens), output_tok_s=round(sum(lens) / dt, 1),
               num_preemptions=eng.scheduler.num_preemptions - pre)
    print(json.dumps(rec), flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
