"""Probe: does feeding nanovllm's requests longest max_tokens first, with a smaller step
budget, let prompts ride in memory-bound decode steps? wl_nanovllm's requests, reordered.

    python3 benchmarks/order_probe.py bench throughput --model M --workload nanovllm_longest ...
    M=mixtral-8x7b VARIANTS="nanovllm:16384 nanovllm_longest:1024" bash benchmarks/order_probe_device.sh

Run one workload per process: a second run of the same prompts hits the prefix cache.
Answer on the H200 (session 19, results/order-probe-f2800d7-nvidia-h200.jsonl): no. Llama-3.1-8B
10151 tok/s in order at 16384 tokens a step, 10173 / 10205 / 10217 / 9463 longest first at
16384 / 2048 / 1024 / 512; Mixtral-8x7B 3748 in order, 3762 / 3767 / 3758 longest first at
16384 / 2048 / 1024. Decode steps at ~200 requests are already near compute-bound for the
dense model, and the MoE's grouped GEMM grows with every token added.
"""
import sys

import kvflow.bench.offline as off


def wl_nanovllm_longest(llm, base, temperature):
    prompt_ids, sps = off.nanovllm_requests()
    order = sorted(range(len(sps)), key=lambda i: -sps[i].max_tokens)
    return off.run_requests(llm, base, [prompt_ids[i] for i in order], [sps[i] for i in order],
                            workload="nanovllm_longest")


off.WORKLOADS["nanovllm_longest"] = wl_nanovllm_longest

if __name__ == "__main__":
    from kvflow.cli import main
    sys.exit(main(sys.argv[1:]))
