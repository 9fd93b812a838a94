"""Greedy tokens of a tiny random Llama against Hugging Face on the GPU, for each cudagraph_mode
(FULL: mixed steps in graphs; FULL_DECODE_ONLY: eager), token budget (7, 16, 32: chunked
prefill mixed with decodes) and async scheduling on / off. Prints the mismatching prompts.
Written to bisect an order-dependent failure of test_engine's async [chunked] case (session 8:
the host-staging race fixed in ModelRunner.launch).

    source benchmarks/device_env.sh && python3 benchmarks/diag_mixed_graphs.py [--tp N]

--tp N runs the engines tensor-parallel over N GPUs (graphs captured on every rank).
"""
import sys

import numpy as np
import torch

sys.path.insert(0, ".")
from tests.conftest import hf_greedy, make_hf_model, save_hf_model  # noqa: E402
from kvflow import LLM, SamplingParams  # noqa: E402



def main():
    tp = int(sys.argv[sys.argv.index("--tp") + 1]) if "--tp" in sys.argv else 1
    hf = make_hf_model("llama")
    path = save_hf_model(hf, "/tmp/tl")
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 383, size=n).tolist() for n in (3, 17, 40, 64, 5, 29)]
    ref = [hf_greedy(hf, p, 16) for p in prompts]
    sp = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    # Tensor-parallel engines start slowly (worker processes, NCCL): fewer variants there.
    grid = ([(mbt, mode, asy) for mbt in (7, 16, 32) for mode in ("FULL_DECODE_ONLY", "FULL")
             for asy in (False, True)] if tp == 1 else
            [(7, "FULL", True), (32, "FULL", True), (32, "FULL_DECODE_ONLY", True)])
    for mbt, mode, asy in grid:
        llm = LLM(path, skip_tokenizer_init=True, kv_cache_memory=8 << 20, device="cuda",
                  dtype="float32", max_num_batched_tokens=mbt, enable_prefix_caching=False,
                  async_scheduling=asy, compilation_config={"cudagraph_mode": mode},
                  tensor_parallel_size=tp)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
        bad = []
        for i, (o, r) in enumerate(zip(outs, ref)):
            t = o.outputs[0].token_ids
            if t != r:
                bad.append((i, next(k for k in range(len(r)) if t[k] != r[k])))
        print(f"tp={tp} mbt={mbt} {mode} async={asy}: mismatches (prompt, first pos) {bad}",
              flush=True)
        llm.shutdown()
        del llm
        torch.cuda.empty_cache()


if __name__ == "__main__":     # tensor-parallel workers are spawned: they re-import this file
    main()
