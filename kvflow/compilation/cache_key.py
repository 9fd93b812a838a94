"""The compile cache key: a flat dict of every factor that can change compiled code, hashed.

A cached artifact is only ever loaded under a key computed from *all* of these factors, and its
stored factor dict must equal the current one (store.py checks), so an artifact compiled for one
configuration can never be loaded for another — the failure mode where a graph traced for a
different model asserts on its number of inputs cannot happen.

Factors (flat "group.name" -> JSON value):
  config.*    every dataclass field of EngineConfig and its sub-configs, found by walking the
              dataclasses (nothing is listed by hand), minus IGNORED. Each path must be
              classified in KEYED or IGNORED; `unclassified_fields` finds new fields, and a test
              fails until someone decides. At run time an unclassified field is keyed (the safe
              side) with a warning, and a field of a kind we cannot encode raises.
  version.*   kvflow version and a hash of its traced sources; python, torch, triton, CUDA/HIP.
  device.*    device type; GPU name and compute capability, or CPU arch, vector ISA and
              intra-op thread count.
  env.*       environment variables that steer dynamo / inductor / triton / kvflow.
  + extras from compile.py: model class and its source file, compile options, inductor and
              AOTAutograd config, attention backend impls, entry format.
"""
from __future__ import annotations

import dataclasses
import enum
import functools
import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import sys
from typing import Any, Iterator, Optional

import torch

logger = logging.getLogger("kvflow")

# Field paths (relative to EngineConfig) that cannot change compiled code, each with why.
IGNORED: dict[str, str] = {
    "model.model": "the weights' location; weights are graph inputs, shapes come from the dims",
    "model.tokenizer": "tokenization happens outside the model forward",
    "model.eos_token_ids": "stop conditions are applied by the scheduler, not the model",
    "model.bos_token_id": "prompt construction only",
    "model.seed": "seeds sampling and dummy weights, never traced code",
    "model.source": "original .gguf path, for messages only",
    "cache.enable_prefix_caching": "block reuse is scheduler policy; attention sees block tables",
    "cache.gpu_memory_utilization": "sizes the KV cache, which is kept out of the compiled graph",
    "cache.kv_cache_memory": "sizes the KV cache, which is kept out of the compiled graph",
    "cache.num_blocks": "KV cache size; the cache is layer state outside the compiled graph",
    "cache.enable_sleep_mode": "frees / restores weight and KV memory between steps; same graph",
    "parallel.distributed_executor_backend": "how worker processes are started, not what they run",
    "scheduler.enable_chunked_prefill": "changes per-step metadata only, read inside the op",
    "scheduler.long_prefill_token_threshold": "scheduling policy only",
    "scheduler.policy": "request ordering (fcfs / priority) only",
    "scheduler.async_scheduling": "overlaps host scheduling with device steps; same forward",
    "scheduler.admission_control": "which requests are admitted when; same forward",
    "scheduler.ride_chunk": "which steps take prompt tokens; their sizes stay graph buckets",
    "scheduler.ride_fill": "which steps take prompt tokens; their sizes stay graph buckets",
    "max_model_len_explicit": "only decides whether the memory plan may shrink max_model_len",
    # KV transfer moves blocks between steps, outside the forward; the connector's per-layer
    # hooks are called by eager code around the attention op, never traced.
    "kv_transfer.connector": "KV transfer happens outside the compiled forward",
    "kv_transfer.role": "KV transfer happens outside the compiled forward",
    "kv_transfer.transport": "KV transfer happens outside the compiled forward",
    "kv_transfer.failure_policy": "scheduler policy only",
    "compilation.cudagraph_mode": "which steps replay CUDA graphs of the same compiled forward",
    "kv_transfer.timeout_s": "transfer deadline, host side only",
    "kv_transfer.hold_timeout_s": "host-side block lifetime only",
    "kv_transfer.host": "network address only",
    "kv_transfer.port": "network address only",
    "kv_transfer.advertise_host": "network address only",
    "kv_transfer.nccl_port": "network address only",
}

# Field paths reviewed and keyed (documentation plus the completeness test's reference).
KEYED: frozenset[str] = frozenset({
    # model architecture, dims, dtype, layer switches (hf_config carries e.g. mlp_bias,
    # partial_rotary_factor and, once supported, quantization_config)
    "model.architecture", "model.model_type", "model.hidden_size", "model.intermediate_size",
    "model.num_hidden_layers", "model.num_attention_heads", "model.num_key_value_heads",
    "model.head_dim", "model.vocab_size", "model.rms_norm_eps", "model.rope_theta",
    "model.rope_scaling", "model.max_position_embeddings", "model.tie_word_embeddings",
    "model.attention_bias", "model.dtype", "model.max_model_len", "model.hf_config",
    "model.load_format",      # selects the weight format (GGUF may bring quantized layers)
    "cache.block_size", "cache.kv_cache_dtype",
    "scheduler.max_num_seqs", "scheduler.max_num_batched_tokens",  # bound capture sizes
    "scheduler.ride_budget",  # a capture size of the mixed-step graphs
    "scheduler.ride_granule",  # so are its multiples below the ride budget
    "scheduler.max_model_len",
    "parallel.tensor_parallel_size", "parallel.rank",
    "parallel.enable_expert_parallel",   # expert weights' shapes and the expert-id map
    "compilation.enforce_eager",
    # 0 or 3 (aliases are normalised away): always 3 when compile_model runs, keyed anyway so a
    # future level that compiles differently cannot share entries by accident.
    "compilation.level",
    "device",                 # the type; the GPU model is keyed through device.* factors
})

# config.json keys that never change the model (the rest of hf_config is keyed).
IGNORED_HF_KEYS: dict[str, str] = {
    "_name_or_path": "where the checkpoint was saved from",
    "transformers_version": "version of the library that wrote the file",
}

# Environment variables: these prefixes are keyed, except the names in IGNORED_ENV.
ENV_PREFIXES = ("TORCHINDUCTOR_", "TORCHDYNAMO_", "TORCH_COMPILE_", "TORCH_INDUCTOR_",
                "TRITON_", "KVFLOW_", "PYTORCH_NVFUSER_")
IGNORED_ENV: dict[str, str] = {
    "KVFLOW_CACHE_DIR": "where the cache lives, not what it holds",
    "TORCHINDUCTOR_CACHE_DIR": "set per key by compile.py (would make the key self-referential)",
    "TRITON_CACHE_DIR": "set per key by compile.py",
    "KVFLOW_LOGGING_LEVEL": "logging only",
    "KVFLOW_COMMIT": "a label the benchmarks write into their records",
    "KVFLOW_STEP_TRACE": "host-side step timing only",
    "KVFLOW_TEST_DEVICE": "which device the test suite runs on; the device itself is keyed",
    "TORCH_COMPILE_DEBUG_DIR": "where debug dumps go",
    "CUDA_VISIBLE_DEVICES": "device identity is keyed by name and compute capability",
    # Set by inductor itself while compiling (to torch's bundled tools): keying them would change
    # the key between the first compile of a process and every later one.
    "TRITON_PTXAS_PATH": "set by inductor at run time; the toolchain is keyed by versions",
    "TRITON_LIBDEVICE_PATH": "set by inductor at run time; the toolchain is keyed by versions",
}

# Top-level kvflow entries that are never traced into the model forward; every other source
# file (present or future) enters the source hash.
_UNTRACED_SOURCES = frozenset({"server", "engine", "core", "metrics", "bench", "executor",
                               "kv_transfer",
                               "cli.py", "cli_cache.py", "llm.py", "outputs.py", "request.py"})


# ------------------------------------------------------------------------------ config walk
def iter_config_fields(config: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(path, value) of every leaf field of a (nested) config dataclass, ignored ones included."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        path = prefix + f.name
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            yield from iter_config_fields(value, path + ".")
        else:
            yield path, value


def unclassified_fields(config: Any) -> list[str]:
    """Leaf field paths that are neither in KEYED nor in IGNORED (a new config field)."""
    return [p for p, _ in iter_config_fields(config) if p not in KEYED and p not in IGNORED]


def stale_classifications(config: Any) -> list[str]:
    """Paths in KEYED or IGNORED that no longer exist in the config (a removed field)."""
    present = {p for p, _ in iter_config_fields(config)}
    return sorted((set(KEYED) | set(IGNORED)) - present)


def _encode(value: Any, path: str) -> Any:
    """A JSON-stable form of a config value. Unknown kinds raise: a value we cannot encode
    faithfully must not be silently dropped from (or stringified into) the key."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return repr(value)  # exact, and NaN/inf stay valid JSON
    if isinstance(value, torch.dtype):
        return str(value)
    if isinstance(value, torch.device):
        return value.type  # the index only picks one of identical devices
    if isinstance(value, enum.Enum):
        return f"{type(value).__name__}.{value.name}"
    if isinstance(value, (list, tuple)):
        return [_encode(v, f"{path}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"compile cache key: {path} has a non-string key {k!r}")
            out[k] = _encode(v, f"{path}.{k}")
        return out
    raise TypeError(f"compile cache key: config field {path} has a value of type "
                    f"{type(value).__name__}, which the key cannot encode; teach "
                    f"kvflow/compilation/cache_key.py:_encode about it or add {path!r} to IGNORED")


def config_factors(config: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path, value in iter_config_fields(config):
        if path in IGNORED:
            continue
        if path not in KEYED:
            logger.warning("compile cache key: config field %s is not classified in "
                           "kvflow/compilation/cache_key.py; keying it", path)
        if path == "model.hf_config" and isinstance(value, dict):
            value = {k: v for k, v in value.items() if k not in IGNORED_HF_KEYS}
        out[f"config.{path}"] = _encode(value, path)
    return out


# ------------------------------------------------------------------------------ environment
@functools.lru_cache(maxsize=None)
def kvflow_source_hash() -> str:
    """sha256 over the path and bytes of every kvflow .py file that may be traced."""
    import kvflow

    root = os.path.dirname(os.path.abspath(kvflow.__file__))
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        if rel_dir == ".":
            dirnames[:] = [d for d in dirnames if d not in _UNTRACED_SOURCES]
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        for name in sorted(filenames):
            if not name.endswith(".py") or (rel_dir == "." and name in _UNTRACED_SOURCES):
                continue
            rel = os.path.normpath(os.path.join(rel_dir, name))
            h.update(rel.encode() + b"\0")
            with open(os.path.join(dirpath, name), "rb") as f:
                h.update(hashlib.sha256(f.read()).digest())
    return h.hexdigest()


def _dist_version(*names: str) -> Optional[str]:
    for name in names:
        try:
            return f"{name}=={importlib.metadata.version(name)}"
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def version_factors() -> dict[str, Any]:
    import kvflow

    return {
        "version.kvflow": kvflow.__version__,
        "version.kvflow_sources": kvflow_source_hash(),
        # Dynamo rewrites bytecode: the interpreter version changes what is traced.
        "version.python": f"{sys.implementation.name}-{platform.python_version()}",
        "version.torch": torch.__version__,
        "version.triton": _dist_version("triton", "pytorch-triton", "pytorch-triton-rocm"),
        "version.cuda": torch.version.cuda,
        "version.hip": getattr(torch.version, "hip", None),
    }


def device_factors(device: torch.device) -> dict[str, Any]:
    device = torch.device(device)
    out: dict[str, Any] = {"device.type": device.type}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        out["device.name"] = props.name
        out["device.capability"] = f"{props.major}.{props.minor}"
        out["device.gcn_arch"] = getattr(props, "gcnArchName", None)  # ROCm
    else:
        # Inductor's C++ backend emits code for the host's vector ISA (AVX512 vs AVX2 ...):
        # an artifact from another CPU may not even run here.
        out["device.machine"] = platform.machine()
        out["device.cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        # The generated C++ is specialised to the intra-op thread count.
        out["device.cpu_threads"] = torch.get_num_threads()
        try:
            from torch._inductor.cpu_vec_isa import pick_vec_isa
            out["device.vec_isa"] = str(pick_vec_isa())
        except Exception:  # noqa: BLE001 - private API; the capability above still keys the ISA
            out["device.vec_isa"] = None
    return out


def env_factors(environ: Optional[dict] = None) -> dict[str, Any]:
    environ = os.environ if environ is None else environ
    return {f"env.{k}": environ[k] for k in sorted(environ)
            if k.startswith(ENV_PREFIXES) and k not in IGNORED_ENV}


# ------------------------------------------------------------------------------ key
def compute_factors(config: Any, device: Optional[torch.device] = None,
                    extra: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Every factor of the compile cache key for `config` (an EngineConfig) on `device`
    (default config.device), plus `extra` (e.g. compile options), as a flat JSON-able dict."""
    factors = config_factors(config)
    factors.update(version_factors())
    factors.update(device_factors(device if device is not None else config.device))
    factors.update(env_factors())
    for k, v in (extra or {}).items():
        factors[k] = _encode(v, k)
    return factors


def canonical_json(factors: dict[str, Any]) -> str:
    return json.dumps(factors, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def key_of(factors: dict[str, Any]) -> str:
    """The content address: sha256 of the canonical factor JSON (32 hex chars)."""
    return hashlib.sha256(canonical_json(factors).encode()).hexdigest()[:32]


def diff_factors(stored: dict[str, Any], current: dict[str, Any], limit: int = 8) -> str:
    """Human-readable list of the factors that differ, for log messages."""
    def show(d: dict, n: str) -> str:
        text = repr(d[n]) if n in d else "<absent>"
        return text if len(text) <= 60 else text[:57] + "..."

    names = sorted(set(stored) | set(current))
    diffs = [f"{n}: {show(stored, n)} -> {show(current, n)}" for n in names
             if n not in stored or n not in current or stored[n] != current[n]]
    more = f" (+{len(diffs) - limit} more)" if len(diffs) > limit else ""
    return "; ".join(diffs[:limit]) + more
