"""GSM8K with Hugging Face transformers on exactly the prompts of `kvflow eval gsm8k`.

    python3 benchmarks/gsm8k_hf.py --model MODEL.gguf [--num-questions N] [--num-shots 5]
        [--max-tokens 512] [--batch-size 64] [--dtype float32] --result-file hf.json

Same exemplars, chat messages, greedy decoding, answer extraction and Wilson interval as
kvflow.eval (it imports them), so its accuracy is comparable with a kvflow server's. The chat
template is the checkpoint's own, applied by the transformers tokenizer. Batches are sorted by
prompt length and left-padded. Writes the same JSON shape as `kvflow eval --result-file`.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True, help="a .gguf file or a Hugging Face directory")
    p.add_argument("--data-path", default=None)
    p.add_argument("--num-questions", type=int, default=None)
    p.add_argument("--num-shots", type=int, default=5)
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--result-file", required=True)
    args = p.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kvflow.eval import common, gsm8k

    shots, problems = gsm8k.split_shots(gsm8k.load_gsm8k(args.data_path), args.num_shots)
    if args.num_questions is not None:
        problems = problems[:args.num_questions]
    if args.model.endswith(".gguf"):
        kw = dict(pretrained_model_name_or_path=os.path.dirname(os.path.abspath(args.model)),
                  gguf_file=os.path.basename(args.model))
    else:
        kw = dict(pretrained_model_name_or_path=args.model)
    tok = AutoTokenizer.from_pretrained(**kw)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(**kw, dtype=getattr(torch, args.dtype)).to(device)
    model.eval()
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos]) | {tok.eos_token_id}
    eos.discard(None)
    pad = tok.pad_token_id if tok.pad_token_id is not None else min(eos)

    prompts = [tok.apply_chat_template(gsm8k.build_messages(q, shots), tokenize=True,
                                       add_generation_prompt=True) for q in problems]
    prompts = [x["input_ids"] if isinstance(x, dict) or hasattr(x, "keys") else x for x in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    replies: list[str] = [""] * len(prompts)
    t = time.perf_counter()
    for b in range(0, len(order), args.batch_size):
        idx = order[b:b + args.batch_size]
        width = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):          # left padding
            ids[r, width - len(prompts[i]):] = torch.tensor(prompts[i])
            mask[r, width - len(prompts[i]):] = 1
        with torch.no_grad():
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                 max_new_tokens=args.max_tokens, do_sample=False,
                                 eos_token_id=sorted(eos), pad_token_id=pad)
        for r, i in enumerate(idx):
            gen = out[r, width:].tolist()
            cut = next((j for j, x in enumerate(gen) if x in eos), len(gen))
            replies[i] = tok.decode(gen[:cut], skip_special_tokens=True)
        print(f"hf: {min(b + args.batch_size, len(order))}/{len(order)} "
              f"({time.perf_counter() - t:.0f} s)", flush=True)
    correct = [gsm8k.is_correct(r, q.answer) for q, r in zip(problems, replies)]
    summary = common.summarize("gsm8k", correct, [""] * len(correct), 0.95,
                               num_shots=args.num_shots, wall_s=time.perf_counter() - t,
                               num_unparsed=sum(gsm8k.extract_answer(r) is None for r in replies))
    summary["engine"] = f"transformers {__import__('transformers').__version__} ({args.dtype})"
    records = [{"question": q.question, "reference": q.answer, "reply": r, "error": "",
                "extracted": gsm8k.extract_answer(r), "correct": c}
               for q, r, c in zip(problems, replies, correct)]
    with open(args.result_file, "w") as f:
        json.dump({**summary, "records": records}, f, indent=1)
    print(f"gsm8k (hf): accuracy {summary['accuracy']:.4f} ({summary['num_correct']}/"
          f"{summary['num_questions']}), CI [{summary['ci_low']:.4f}, {summary['ci_high']:.4f}]")


if __name__ == "__main__":
    main()
