"""Engine options on the command line, shared by every CLI subcommand (names as vLLM's)."""
from __future__ import annotations

import argparse


def add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model's)")
    g.add_argument("--dtype", default="auto", help="auto, float32, float16, bfloat16")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda")
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--block-size", type=int, default=None,
                   help="KV block size in tokens (default: 64 on CUDA, 16 elsewhere)")
    g.add_argument("--max-num-seqs", type=int, default=None,
                   help="most requests in a step (default, as vLLM: 1024 on GPUs with >= 70 GiB "
                        "other than the A100, else 256)")
    g.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="token budget of a step (default, as vLLM: on GPUs with >= 70 GiB other "
                        "than the A100 16384 offline and 8192 in the server, else 8192)")
    g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    g.add_argument("--enable-chunked-prefill", action=argparse.BooleanOptionalAction, default=True)
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    g.add_argument("--kv-cache-memory", type=int, default=None, help="KV cache size in bytes")
    g.add_argument("--kv-cache-dtype", default="auto",
                   help="auto (model dtype), fp8 / fp8_e4m3 (float8 e4m3, per-layer scales)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--load-format", default="auto", help="auto, safetensors, gguf, dummy")
    g.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs, no torch.compile")
    g.add_argument("--compilation-config", "-O", default=None, metavar="LEVEL|JSON",
                   help="torch.compile of the model forward, as vLLM's: an int level (-O0: "
                        "none, -O3: compile; 1 and 2 mean 3) or JSON '{\"level\": 3, "
                        "\"cudagraph_mode\": \"FULL_DECODE_ONLY\"}' (default: level 0, "
                        "cudagraph_mode FULL: decode and small mixed steps in CUDA graphs; "
                        "docs/performance.md)")
    g.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    g.add_argument("--enable-expert-parallel", action="store_true",
                   help="MoE: partition experts across the tensor-parallel ranks instead of "
                        "sharding every expert (ignored, with a warning, for dense models)")
    g.add_argument("--distributed-executor-backend", default=None, choices=["mp", "ray", "uni"],
                   help="mp: one process per rank on this host (default for -tp > 1); "
                        "ray: Ray actors in a placement group (several nodes; pip install kvflow[ray])")
    g.add_argument("--attention-backend", default=None, help="force a backend (triton, torch)")
    g.add_argument("--skip-tokenizer-init", action="store_true")
    g.add_argument("--scheduling-policy", default="fcfs", choices=["fcfs", "priority"])
    g.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                   help="overlap host scheduling with device execution (default: on for CUDA)")
    g.add_argument("--admission-control", action=argparse.BooleanOptionalAction, default=True,
                   help="admit a request only when the KV cache can hold it and the running ones "
                        "until they finish (estimated from max_tokens, learned from finished "
                        "requests); --no-admission-control admits whatever fits now and preempts "
                        "when the cache runs dry, as vLLM")
    g.add_argument("--ride-budget", type=int, default=None,
                   help="while running decodes outlast the waiting prompts, steps take at most "
                        "this many tokens so prompts ride in memory-bound decode steps (default: "
                        "offline on CUDA with chunked prefill, 3/4 of 128 x experts / experts per "
                        "token for MoE models and 512 for dense ones of 0.4B+ parameters; "
                        "else 0, off)")
    g.add_argument("--ride-granule", type=int, default=None,
                   help="0: a riding step takes the whole ride budget; N > 0: the smallest "
                        "multiple of N that keeps every waiting prompt on time (default: 0 for "
                        "MoE models, 64 for dense ones)")
    g.add_argument("--ride-chunk", type=int, default=None,
                   help="paced riding only: a step with at least --ride-fill decodes takes "
                        "prompt tokens only once this many are due (fewer, larger mixed steps); "
                        "0: every paced step rides")
    g.add_argument("--ride-fill", type=int, default=None,
                   help="with --ride-chunk: a step with fewer decodes than this takes prompt "
                        "tokens up to this many rows")
    g.add_argument("--enable-sleep-mode", action="store_true",
                   help="allow sleep/wake_up (server: POST /sleep, POST /wake_up, GET /is_sleeping)")
    g.add_argument("--kv-transfer-config", default=None,
                   help='disaggregated prefill/decode, as JSON: \'{"connector": "p2p", "role": '
                        '"producer|consumer|both", "transport": "tcp|nccl", "failure_policy": '
                        '"recompute|fail", ...}\' (docs/disaggregation.md)')


ENGINE_ARG_NAMES = ("tokenizer", "dtype", "device", "max_model_len", "block_size", "max_num_seqs",
                    "max_num_batched_tokens", "enable_prefix_caching", "enable_chunked_prefill",
                    "gpu_memory_utilization", "kv_cache_memory", "kv_cache_dtype", "seed",
                    "load_format", "enforce_eager", "tensor_parallel_size", "attention_backend",
                    "skip_tokenizer_init", "scheduling_policy", "async_scheduling",
                    "enable_sleep_mode", "enable_expert_parallel", "distributed_executor_backend",
                    "kv_transfer_config", "compilation_config", "admission_control", "ride_budget",
                    "ride_granule", "ride_chunk", "ride_fill")


def engine_kwargs(args: argparse.Namespace) -> dict:
    """LLM()/LLMEngine.from_engine_args keyword arguments from parsed CLI args."""
    return {k: getattr(args, k) for k in ENGINE_ARG_NAMES if hasattr(args, k)}
