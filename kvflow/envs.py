"""Environment variables kvflow reads, in one place (names, defaults, meaning)."""
from __future__ import annotations

import os


def cache_dir() -> str:
    """KVFLOW_CACHE_DIR: root of kvflow's caches (GGUF conversions, compiled graphs)."""
    return os.path.expanduser(os.environ.get("KVFLOW_CACHE_DIR", "~/.cache/kvflow"))


def allow_long_max_model_len() -> bool:
    """KVFLOW_ALLOW_LONG_MAX_MODEL_LEN=1: accept max_model_len above max_position_embeddings."""
    return os.environ.get("KVFLOW_ALLOW_LONG_MAX_MODEL_LEN") == "1"


def step_trace() -> bool:
    """KVFLOW_STEP_TRACE=1: record per-step timings in LLMEngine.step_trace (benchmarks)."""
    return os.environ.get("KVFLOW_STEP_TRACE") == "1"


def gc_freeze() -> bool:
    """KVFLOW_GC_FREEZE (default 1): freeze the garbage collector's heap at the end of engine
    startup, so full collections skip the long-lived objects (kvflow/gc_heap.py); 0 leaves the
    collector as Python configures it."""
    return os.environ.get("KVFLOW_GC_FREEZE", "1") != "0"


def gc_gen2_threshold() -> int:
    """KVFLOW_GC_GEN2_THRESHOLD (default 100): with the heap frozen, generation-1 collections
    between two full ones (Python's default is 10; kvflow/gc_heap.py says why more)."""
    return int(os.environ.get("KVFLOW_GC_GEN2_THRESHOLD", "100"))


def dummy_weights_mode() -> str:
    """KVFLOW_DUMMY_WEIGHTS: value distribution of load_format="dummy" weights — "uniform"
    (default, +-1e-3 like vLLM: speed runs) or "scaled" (fan-in scaled: a model whose greedy
    tokens are well defined, for comparing parallel layouts). See kvflow/models/dummy.py."""
    return os.environ.get("KVFLOW_DUMMY_WEIGHTS", "uniform")


def fused_moe_kernel() -> bool:
    """KVFLOW_FUSED_MOE (default 1): the Triton fused-MoE kernel on CUDA; 0 forces the torch
    reference (one host sync per MoE layer, so MoE models then run without CUDA graphs)."""
    return os.environ.get("KVFLOW_FUSED_MOE", "1") != "0"


def skinny_silu_mul() -> bool:
    """KVFLOW_SKINNY_SILU_MUL (default 1): where a gated MLP's down projection runs as the
    skinny GEMM, silu(gate) * up is applied inside it as x is loaded (one launch fewer per
    layer); 0 runs the activation kernel first. Read when a layer is built."""
    return os.environ.get("KVFLOW_SKINNY_SILU_MUL", "1") != "0"


def skinny_glu() -> bool:
    """KVFLOW_SKINNY_GLU (default 1): where a gated MLP's gate | up product runs as one skinny
    GEMM at decode, its epilogue applies silu(gate) * up and the down projection reads the
    result (instead of applying the activation as it loads gate | up). 0: the latter."""
    return os.environ.get("KVFLOW_SKINNY_GLU", "1") != "0"


def pdl() -> bool:
    """KVFLOW_PDL (default 1): programmatic dependent launch for kvflow's Triton kernels on sm90+
    (kvflow/kernels/pdl.py); 0 turns it off. Read at every launch."""
    return os.environ.get("KVFLOW_PDL", "1") != "0"


def attn_prefetch() -> bool:
    """KVFLOW_ATTN_PREFETCH (default 1): decode-like attention launches load their first cached
    KV tile before the PDL wait (kvflow/kernels/attention.py); 0 turns it off. Read when the
    attention kernels module is imported."""
    return os.environ.get("KVFLOW_ATTN_PREFETCH", "1") != "0"


def fused_sampling() -> bool:
    """KVFLOW_FUSED_SAMPLING (default 1): on CUDA, random sampling without top-k / top-p / min-p
    or per-request seeds is one Triton pass over the logits (inverse-CDF sampling,
    kernels/sampling.py's sample_rows) instead of temperature, softmax, noise and argmax
    passes in torch; 0 keeps torch. Read when the sampler is built."""
    return os.environ.get("KVFLOW_FUSED_SAMPLING", "1") != "0"


def norm_fold() -> bool:
    """KVFLOW_NORM_FOLD (default 1): at decode, a residual add + RMSNorm between two
    single-split skinny GEMMs runs in their epilogues instead of its own kernel
    (kvflow/layers/norm_fold.py); 0 keeps the norm kernel. Read at every forward (CUDA graphs:
    at capture)."""
    return os.environ.get("KVFLOW_NORM_FOLD", "1") != "0"


def split_k_norm() -> bool:
    """KVFLOW_SPLIT_K_NORM (default 1): where the device's table says it pays, a projection
    followed by a residual add + RMSNorm runs as fp32 K-slice products that the norm kernel
    sums (kvflow/layers/split_k_norm.py); 0: cuBLAS's product, then the norm. Read at every
    forward (CUDA graphs: at capture)."""
    return os.environ.get("KVFLOW_SPLIT_K_NORM", "1") != "0"


def row_pad() -> bool:
    """KVFLOW_ROW_PAD (default 1): where the device's table says cuBLAS is faster at more rows,
    a product runs on its input copied into a larger buffer (kvflow/layers/row_pad.py); 0:
    every product at its own row count. Read at every forward (CUDA graphs: at capture)."""
    return os.environ.get("KVFLOW_ROW_PAD", "1") != "0"


def cublaslt() -> bool:
    """KVFLOW_CUBLASLT (default 1): products the device's cuBLASLt table names run with the
    algorithm it records (kvflow/kernels/cublaslt.py); 0: torch's choice everywhere. Read at
    every forward (CUDA graphs: at capture)."""
    return os.environ.get("KVFLOW_CUBLASLT", "1") != "0"


def skinny_table() -> str:
    """KVFLOW_SKINNY_TABLE (default unset): a skinny-GEMM config table to read instead of the
    device's committed one in kvflow/kernels/configs/ (tuning A/Bs, e.g. a table written by
    benchmarks/skinny_chain_tune.py). Read once a process."""
    return os.environ.get("KVFLOW_SKINNY_TABLE", "")


def attn_longest_first() -> bool:
    """KVFLOW_ATTN_LONGEST_FIRST (default 1): decode CUDA graphs whose attention programs
    outnumber what the GPU holds at once (kernels/attention_config.dispatch_longest_first) sort
    the requests by context length (once a step, inside the graph) and attention dispatches the
    longest first; 0: in batch order. Read at capture."""
    return os.environ.get("KVFLOW_ATTN_LONGEST_FIRST", "1") != "0"


def attn_split_decodes() -> bool:
    """KVFLOW_ATTN_SPLIT_DECODES (default 1): CUDA graphs of mixed steps give their decodes
    decode tiles where the step's prompt tokens take 128-row prefill tiles (two attention
    launches over all requests, each skipping the other's; AttentionMetadata.split_decodes),
    as eager mixed steps do; 0: one launch, decodes on prefill tiles. Read at capture."""
    return os.environ.get("KVFLOW_ATTN_SPLIT_DECODES", "1") != "0"


def attn_overlap_prompts() -> bool:
    """KVFLOW_ATTN_OVERLAP_PROMPTS (default 1): in a split_decodes pair the prompt launch goes
    first and the decode launch's programs start beside it instead of after it (one extra grid
    row of it only waits for the prompt launch); 0: decode launch first, each launch after the
    other. Read at capture."""
    return os.environ.get("KVFLOW_ATTN_OVERLAP_PROMPTS", "1") != "0"


def attn_heads_first() -> bool:
    """KVFLOW_ATTN_HEADS_FIRST (default 1): one-program-per-request attention launches (decode
    batches) order their grid KV heads fastest, so the programs running together read all
    heads of the same KV-cache slots (H200, same call: Qwen3-0.6B nanovllm +2.4%); 0:
    requests fastest. Read at each launch (fixed in a captured graph)."""
    return os.environ.get("KVFLOW_ATTN_HEADS_FIRST", "1") != "0"


def skinny_gemm() -> bool:
    """KVFLOW_SKINNY_GEMM (default 1): unquantized linear layers (incl. tensor-parallel shards, the LM head
    and MoE routers) on CUDA with fp16/bf16 inputs of at most 16 rows use the Triton skinny GEMM
    (kvflow/kernels/skinny_gemm.py) instead of cuBLAS, except on shapes where the device's tuned
    table measured a win (kvflow/kernels/configs/skinny_gemm_<gpu>.json; other shapes and GPUs
    keep cuBLAS). 0 turns it off. Read when a layer is built."""
    return os.environ.get("KVFLOW_SKINNY_GEMM", "1") != "0"
