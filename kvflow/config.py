"""Engine configuration: frozen sub-configs, each validated once at construction.

`create_engine_config(**LLM kwargs)` resolves the model (path, GGUF conversion, default model),
reads config.json into a normalised `ModelConfig` (kvflow/model_config.py), and checks
cross-field constraints. Every error
is a ValueError naming the field and the allowed range. Values that depend on the device (the
number of KV blocks, a max_model_len fitted to memory) are filled in later by the worker's memory
plan through `dataclasses.replace`, never by mutation.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from kvflow.model_config import (ModelConfig, build_model_config, model_num_experts,
                                 resolve_model_path)
from kvflow.model_config import config_error as _fail

__all__ = ["ModelConfig", "CacheConfig", "SchedulerConfig", "ParallelConfig", "CompilationConfig",
           "KVTransferConfig", "EngineConfig", "create_engine_config", "resolve_device",
           "resolve_model_path", "model_num_experts", "default_block_size",
           "default_scheduler_limits"]

logger = logging.getLogger("kvflow")


def _reject_unknown_keys(field_name: str, value: dict, known, aliases: str = "") -> None:
    """A dict-valued option: a misspelt key is an error naming it, never a silent default."""
    unknown = sorted(set(value) - set(known))
    if unknown:
        raise _fail(field_name, f"unknown keys {unknown}; known: {sorted(known)}{aliases}")


def resolve_device(device: str) -> torch.device:
    """A concrete device; CUDA always with an index (memory queries and graphs need one)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda") and not str(device).startswith("cuda:"):
        raise _fail("device", f"must be 'auto', 'cpu' or 'cuda[:N]', got {device!r}")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise _fail("device", "CUDA was requested but no CUDA device is available")
        dev = torch.device(device)
        return torch.device("cuda", torch.cuda.current_device() if dev.index is None else dev.index)
    return torch.device(device)


# ---------------------------------------------------------------------------------- cache
# Accepted kv_cache_dtype spellings -> canonical name. "auto" stores K/V in the model dtype;
# "fp8" stores float8 e4m3 (torch.float8_e4m3fn) with a per-layer k_scale/v_scale.
KV_CACHE_DTYPES = {"auto": "auto", "fp8": "fp8", "fp8_e4m3": "fp8"}


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    enable_prefix_caching: bool = True
    gpu_memory_utilization: float = 0.9
    kv_cache_memory: Optional[int] = None   # bytes; overrides the profiled plan when set
    kv_cache_dtype: str = "auto"
    num_blocks: Optional[int] = None        # set by the memory plan
    # Allow LLM.sleep()/wake_up(): weights and KV cache can be released between generation
    # phases (kvflow/worker/sleep.py).
    enable_sleep_mode: bool = False

    def __post_init__(self):
        if not isinstance(self.block_size, int) or self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise _fail("block_size", f"must be a power of two >= 1 (16 is typical), got {self.block_size!r}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise _fail("gpu_memory_utilization", f"must be in (0, 1], got {self.gpu_memory_utilization!r}")
        if self.kv_cache_memory is not None and (not isinstance(self.kv_cache_memory, int)
                                                 or self.kv_cache_memory <= 0):
            raise _fail("kv_cache_memory", f"must be a positive number of bytes, got {self.kv_cache_memory!r}")
        if not isinstance(self.kv_cache_dtype, str) or self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise _fail("kv_cache_dtype", f"must be one of {sorted(KV_CACHE_DTYPES)}, "
                                          f"got {self.kv_cache_dtype!r}")
        # One canonical spelling downstream (backend capabilities, compile cache key).
        object.__setattr__(self, "kv_cache_dtype", KV_CACHE_DTYPES[self.kv_cache_dtype])


# ---------------------------------------------------------------------------------- scheduler
@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int = 2048
    enable_chunked_prefill: bool = True
    # A single prefill takes at most this many tokens of a step's budget, so decodes of other
    # requests keep flowing while a long prompt is processed (0 = no extra cap).
    long_prefill_token_threshold: int = 0
    policy: str = "fcfs"   # or "priority" (lower SamplingParams priority value runs first)
    # Overlap scheduling of step N+1 with the device running step N (default: on for CUDA).
    async_scheduling: bool = False
    # Admit a request only when the KV cache can hold it and the running requests until they
    # finish (estimated; kvflow/core/admission.py). False: admit whatever fits now and preempt
    # when the cache runs dry, as vLLM.
    admission_control: bool = True
    # While running decodes outlast the waiting prompts, a step takes at most this many tokens
    # so prompts ride in memory-bound decode steps (Scheduler._step_budget; 0 = never).
    ride_budget: int = 0
    # 0: a riding step takes all of ride_budget; g > 0: the smallest multiple of g (or
    # ride_budget itself, if smaller) that keeps every waiting prompt on time (paced).
    ride_granule: int = 0
    # Lazy riding (paced only): a step with at least ride_fill decodes takes prompt tokens only
    # once the paced rate has banked ride_chunk of them; one with fewer fills up to ride_fill
    # rows (Scheduler._step_budget). 0: every paced step rides.
    ride_chunk: int = 0
    ride_fill: int = 0

    def __post_init__(self):
        if self.policy not in ("fcfs", "priority"):
            raise _fail("scheduling_policy", f"must be 'fcfs' or 'priority', got {self.policy!r}")
        if not isinstance(self.max_num_seqs, int) or self.max_num_seqs < 1:
            raise _fail("max_num_seqs", f"must be an integer >= 1, got {self.max_num_seqs!r}")
        if not isinstance(self.max_num_batched_tokens, int) or self.max_num_batched_tokens < 1:
            raise _fail("max_num_batched_tokens",
                        f"must be an integer >= 1, got {self.max_num_batched_tokens!r}")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise _fail("max_num_batched_tokens",
                        f"must be >= max_model_len={self.max_model_len} without chunked prefill")
        if not isinstance(self.ride_budget, int) or self.ride_budget < 0:
            raise _fail("ride_budget", f"must be an integer >= 0, got {self.ride_budget!r}")
        if self.ride_budget and not self.enable_chunked_prefill:
            raise _fail("ride_budget", "needs enable_chunked_prefill (prompts ride in pieces)")
        if not isinstance(self.ride_granule, int) or self.ride_granule < 0:
            raise _fail("ride_granule", f"must be an integer >= 0, got {self.ride_granule!r}")
        for name in ("ride_chunk", "ride_fill"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise _fail(name, f"must be an integer >= 0, got {v!r}")


# distributed_executor_backend values: "mp" = one worker process per rank on this host (the
# default for tensor_parallel_size > 1), "ray" = Ray actors in a placement group (several nodes),
# "uni" = the single in-process worker (tensor_parallel_size 1 only). None picks uni or mp.
EXECUTOR_BACKENDS = ("mp", "ray", "uni")


@dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel_size: int = 1
    rank: int = 0
    # MoE experts partitioned across the tensor-parallel ranks instead of each expert being
    # TP-sharded (kvflow/layers/moe.py). Always False for dense models (ignored with a warning).
    enable_expert_parallel: bool = False
    distributed_executor_backend: Optional[str] = None

    def __post_init__(self):
        if not isinstance(self.tensor_parallel_size, int) or self.tensor_parallel_size < 1:
            raise _fail("tensor_parallel_size", f"must be an integer >= 1, got {self.tensor_parallel_size!r}")
        b = self.distributed_executor_backend
        if b is not None and b not in EXECUTOR_BACKENDS:
            raise _fail("distributed_executor_backend", f"must be one of {list(EXECUTOR_BACKENDS)}, "
                                                        f"got {b!r}")
        if b == "uni" and self.tensor_parallel_size > 1:
            raise _fail("distributed_executor_backend", "'uni' runs one process: it needs "
                                                        "tensor_parallel_size=1")

    @property
    def executor_backend(self) -> str:
        """The backend actually used: the explicit choice, else uni for one rank, mp for more."""
        if self.distributed_executor_backend is not None:
            return self.distributed_executor_backend
        return "mp" if self.tensor_parallel_size > 1 else "uni"


# ---------------------------------------------------------------------------------- compilation
# Compilation levels, with vLLM's numbering (`-O3`, compilation_config={"level": 3}):
#   0  no compilation: the model forward runs eagerly (CUDA graphs are still captured on GPU).
#   3  torch.compile of the model forward through the compile cache (kvflow/compilation/).
# vLLM's 1 (stock torch.compile) and 2 (trace once) also compile the forward there, so a
# command line written for vLLM with -O1 / -O2 compiles here too: both are accepted as aliases
# of 3 (normalised at construction, so the config and the compile cache key only ever see 0
# or 3).
NO_COMPILATION = 0
COMPILE_FORWARD = 3
COMPILATION_LEVEL_ALIASES = {0: NO_COMPILATION, 1: COMPILE_FORWARD, 2: COMPILE_FORWARD,
                             3: COMPILE_FORWARD}
# The default level. Off until the GPU gain is measured by a device benchmark: flipping the
# default is this one line.
DEFAULT_COMPILATION_LEVEL = NO_COMPILATION

# Which steps replay CUDA graphs, with vLLM's names (CUDAGraphMode):
#   FULL: decode steps (<= 512 requests) and small mixed / prefill steps (<= 512 tokens), each
#       a whole-forward graph (kvflow/worker/cuda_graphs.py, mixed_graphs.py). The default.
#   FULL_AND_PIECEWISE: vLLM's default; accepted as FULL (kvflow has no piecewise graphs: its
#       attention reads every length from tensors, so mixed steps are captured whole).
#   FULL_DECODE_ONLY: decode steps only; mixed steps run eagerly.
#   NONE: no CUDA graphs (torch.compile unaffected; enforce_eager turns off both).
CUDAGRAPH_MODES = {"FULL": "FULL", "FULL_AND_PIECEWISE": "FULL",
                   "FULL_DECODE_ONLY": "FULL_DECODE_ONLY", "NONE": "NONE"}


@dataclass(frozen=True)
class CompilationConfig:
    """level: see COMPILATION_LEVEL_ALIASES. enforce_eager=True overrides it: no torch.compile
    and no CUDA graphs (`compile_forward` is the effective switch). cudagraph_mode: see
    CUDAGRAPH_MODES (normalised at construction)."""
    level: int = DEFAULT_COMPILATION_LEVEL
    enforce_eager: bool = False
    cudagraph_mode: str = "FULL"

    def __post_init__(self):
        level = self.level
        if isinstance(level, bool) or not isinstance(level, int) \
                or level not in COMPILATION_LEVEL_ALIASES:
            raise _fail("compilation_config", f"level must be 0 (no compile) or 3 (torch.compile "
                                              f"of the model forward; 1 and 2 are accepted as "
                                              f"aliases of 3), got {level!r}")
        object.__setattr__(self, "level", COMPILATION_LEVEL_ALIASES[level])
        object.__setattr__(self, "enforce_eager", bool(self.enforce_eager))
        mode = self.cudagraph_mode
        key = mode.upper() if isinstance(mode, str) else mode
        if key not in CUDAGRAPH_MODES:
            extra = (" (kvflow has no piecewise graphs: use FULL, which captures mixed steps "
                     "whole)" if key == "PIECEWISE" else "")
            raise _fail("compilation_config", f"cudagraph_mode must be one of "
                                              f"{sorted(CUDAGRAPH_MODES)}, got {mode!r}{extra}")
        object.__setattr__(self, "cudagraph_mode", CUDAGRAPH_MODES[key])

    @property
    def decode_graphs(self) -> bool:
        """Whether decode steps replay CUDA graphs (on a GPU whose backend supports them)."""
        return not self.enforce_eager and self.cudagraph_mode != "NONE"

    @property
    def mixed_graphs(self) -> bool:
        """Whether small mixed / prefill steps replay CUDA graphs too."""
        return self.decode_graphs and self.cudagraph_mode == "FULL"

    @property
    def compile_forward(self) -> bool:
        """Whether the worker runs the model forward through torch.compile."""
        return self.level == COMPILE_FORWARD and not self.enforce_eager

    @classmethod
    def parse(cls, value: Any, enforce_eager: bool = False) -> "CompilationConfig":
        """From None (the default level), an int level, a dict {"level": N} (vLLM's newer
        spelling {"mode": N} too), a CompilationConfig, or a string holding an int or a JSON
        object (the CLI's --compilation-config / -O). Unknown keys are errors naming them."""
        if value is None:
            return cls(enforce_eager=enforce_eager)
        if isinstance(value, cls):
            return dataclasses.replace(value, enforce_eager=value.enforce_eager or enforce_eager)
        if isinstance(value, str):
            text = value.strip()
            try:
                value = json.loads(text)
            except ValueError as e:
                raise _fail("compilation_config", f"must be an integer level or a JSON object, "
                                                  f"got {text!r} ({e})") from None
        if isinstance(value, dict):
            value = dict(value)
            if "mode" in value:
                if "level" in value and value["level"] != value["mode"]:
                    raise _fail("compilation_config", f"'level' ({value['level']!r}) and 'mode' "
                                                      f"({value['mode']!r}) disagree")
                value["level"] = value.pop("mode")
            _reject_unknown_keys("compilation_config", value, {"level", "cudagraph_mode"},
                                 " (or its alias 'mode')")
            return cls(level=cls._level(value.get("level", DEFAULT_COMPILATION_LEVEL)),
                       enforce_eager=enforce_eager,
                       cudagraph_mode=value.get("cudagraph_mode", "FULL"))
        return cls(level=cls._level(value), enforce_eager=enforce_eager)

    @staticmethod
    def _level(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _fail("compilation_config", f"must be an integer level (0 or 3) or a dict "
                                              f"{{'level': N}}, got {value!r}")
        return value


# ---------------------------------------------------------------------------------- KV transfer
KV_CONNECTORS = ("null", "p2p")
KV_ROLES = {"producer": "producer", "consumer": "consumer", "both": "both",
            # vLLM's spellings, so configs written for it read the same here.
            "kv_producer": "producer", "kv_consumer": "consumer", "kv_both": "both"}
KV_TRANSPORTS = ("tcp", "nccl")
KV_FAILURE_POLICIES = ("recompute", "fail")


@dataclass(frozen=True)
class KVTransferConfig:
    """Disaggregated prefill/decode (docs/disaggregation.md). Validated once, here.

    connector  "null" (default: no transfer) or "p2p" (a consumer pulls a finished prefill's
               KV blocks from the producer that computed them).
    role       producer (prefill instance: computes prompts, keeps their blocks until pulled),
               consumer (decode instance: pulls KV instead of prefilling), or both.
    transport  "tcp" (pyzmq; CPU or GPU caches, copied through host memory) or "nccl" (GPU to
               GPU; gloo on CPU so it is testable without GPUs).
    failure_policy  what a consumer does when a transfer fails (timeout, producer gone, corrupt
               or incompatible KV): "recompute" the prompt locally, or "fail" the request.
    timeout_s  a consumer's deadline for one whole transfer (handshake + payload).
    hold_timeout_s  how long a producer keeps a finished prefill's blocks waiting for a pull.
    host/port  where a producer listens for pulls (port 0: any free port); advertise_host is the
               address written into kv_transfer_params (default: host, or this machine's name
               when host is a wildcard).
    nccl_port  nccl transport: base TCP port of the NCCL rendezvous stores.
    """
    connector: str = "null"
    role: str = "both"
    transport: str = "tcp"
    failure_policy: str = "recompute"
    timeout_s: float = 30.0
    hold_timeout_s: float = 120.0
    host: str = "127.0.0.1"
    port: int = 0
    advertise_host: Optional[str] = None
    nccl_port: int = 0

    def __post_init__(self):
        f = "kv_transfer_config"
        if self.connector not in KV_CONNECTORS:
            raise _fail(f"{f}.connector", f"must be one of {list(KV_CONNECTORS)}, got {self.connector!r}")
        if self.role not in KV_ROLES:
            raise _fail(f"{f}.role", f"must be one of producer, consumer, both; got {self.role!r}")
        object.__setattr__(self, "role", KV_ROLES[self.role])
        if self.transport not in KV_TRANSPORTS:
            raise _fail(f"{f}.transport", f"must be one of {list(KV_TRANSPORTS)}, got {self.transport!r}")
        if self.failure_policy not in KV_FAILURE_POLICIES:
            raise _fail(f"{f}.failure_policy", f"must be one of {list(KV_FAILURE_POLICIES)}, "
                                               f"got {self.failure_policy!r}")
        for name in ("timeout_s", "hold_timeout_s"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise _fail(f"{f}.{name}", f"must be a number of seconds > 0, got {v!r}")
            object.__setattr__(self, name, float(v))
        for name in ("port", "nccl_port"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 65536:
                raise _fail(f"{f}.{name}", f"must be a TCP port in [0, 65535], got {v!r}")
        if not isinstance(self.host, str) or not self.host:
            raise _fail(f"{f}.host", f"must be a host name or address, got {self.host!r}")

    @property
    def is_enabled(self) -> bool:
        return self.connector != "null"

    @property
    def is_producer(self) -> bool:
        return self.is_enabled and self.role in ("producer", "both")

    @property
    def is_consumer(self) -> bool:
        return self.is_enabled and self.role in ("consumer", "both")

    @classmethod
    def parse(cls, value: Any) -> "KVTransferConfig":
        """From a KVTransferConfig, a dict, or a JSON object string (the CLI form). Unknown
        keys are errors naming them: a misspelt key must not silently fall back to a default."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError as e:
                raise _fail("kv_transfer_config", f"not valid JSON ({e})") from None
        if not isinstance(value, dict):
            raise _fail("kv_transfer_config", f"must be a JSON object, got {type(value).__name__}")
        value = dict(value)
        # vLLM's key names are accepted as aliases.
        for alias, key in (("kv_connector", "connector"), ("kv_role", "role")):
            if alias in value:
                value.setdefault(key, value.pop(alias))
        _reject_unknown_keys("kv_transfer_config", value,
                             {fl.name for fl in dataclasses.fields(cls)})
        if "connector" not in value and "role" in value:
            value["connector"] = "p2p"  # a role without a connector means the default transfer
        return cls(**value)


# ---------------------------------------------------------------------------------- engine
@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig
    cache: CacheConfig
    scheduler: SchedulerConfig
    parallel: ParallelConfig
    compilation: CompilationConfig
    device: torch.device
    kv_transfer: KVTransferConfig = field(default_factory=KVTransferConfig)
    # Whether max_model_len was given by the user (else the memory plan may shrink it).
    max_model_len_explicit: bool = False

    def replace(self, **changes) -> "EngineConfig":
        return dataclasses.replace(self, **changes)


_CPU_DEFAULT_KV_BYTES = 2 << 30
# KV block size when none is given: 64 tokens on CUDA, where a decode attention tile (64
# tokens) then gathers one block instead of four. Same-call A/B on an H200 (profile_workload
# device time, docs/performance.md session 15): Qwen3-0.6B nanovllm -0.6%, throughput8k
# -0.9%, Llama-3.1-8B nanovllm -0.5%, throughput8k +-0.2%; 128 lost in prefill steps. 16
# (vLLM's default) elsewhere. The cost: prefix-cache hits and KV allocation in 64-token units.
DEFAULT_BLOCK_SIZE = {"cuda": 64}


def default_block_size(device: torch.device) -> int:
    return DEFAULT_BLOCK_SIZE.get(device.type, 16)


# Scheduler limits when none are given, by vLLM's rule so that its users get the batch sizes they
# expect: GPUs with >= 70 GiB other than the A100 (H100, H200, ...) run 1024 sequences, and
# 16384 tokens a step offline (LLM, `kvflow generate|bench`) or 8192 in the server (shorter
# mixed steps keep inter-token latency down while prompts arrive); other devices 256 and 8192.
# A model whose KV cache holds fewer sequences (Mixtral-8x7B on one H200: ~370 of
# throughput8k's) does not preempt at 1024: admission control (core/admission.py) keeps the
# rest waiting.
LARGE_GPU_BYTES = 70 * 2**30
USAGE_CONTEXTS = ("llm", "server")


def default_scheduler_limits(device: torch.device, usage_context: str = "llm") -> tuple[int, int]:
    """(max_num_seqs, max_num_batched_tokens) for a device when the user gives neither."""
    if usage_context not in USAGE_CONTEXTS:
        raise ValueError(f"usage_context must be one of {USAGE_CONTEXTS}, got {usage_context!r}")
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        if props.total_memory >= LARGE_GPU_BYTES and "a100" not in props.name.lower():
            return 1024, 16384 if usage_context == "llm" else 8192
    return 256, 8192


# Rows of the MoE kernel's largest row tile (kvflow/kernels/configs): an expert's weights are read
# once per tile of rows routed to it.
MOE_ROW_TILE = 128


# Tokens a step of a dense model takes at most while prompts ride in its decodes. A bf16 product
# reads 2 bytes and does 2 FLOPs per weight per row, so whatever the model its products stay
# bound by the weight read up to about FLOP rate / bandwidth rows (~160 on an H200 at the
# ~700 TFLOP/s and ~4.3 TB/s that cuBLAS and a copy reach); riding fills that room in the
# decode steps that have it. Fixed-size riding steps (ride_granule 0) measured best at 256 on
# Llama-3.1-8B nanovllm, H200: 10732-10772 tok/s at 256, 10749 at 384, 10690-10694 at 512,
# 10546-10558 at 192, 10427-10431 at 128, 10395-10410 without riding (benchmarks/results/
# ride-s29). Paced by DENSE_RIDE_GRANULE (session 31), steps take only what keeps the prompts on
# time, so the budget is a cap, the largest mixed-step graph bucket: 10723 / 10749 tok/s against
# 10603 / 10599 at fixed 256 on one lease, 10729 with a 448 cap
# (benchmarks/results/paced-ride-s31).
DENSE_RIDE_BUDGET = 512
# Dense riding steps are paced (Scheduler._step_budget): each takes the smallest multiple of
# this that keeps every waiting prompt on time. Each multiple up to the budget is a mixed-step
# graph bucket (worker/mixed_graphs.py): 64 adds four graphs (~1 s of capture) to the powers of
# two. benchmarks/ride_sim.py put 32 / 64 / 128 at 11.51 / 11.55 / 11.60 s.
DENSE_RIDE_GRANULE = 64
# ...for models with at least this many parameters in their layers' products
# (ModelConfig.layer_product_params). A ridden prompt token saves what it would cost in a
# prefill step, which grows with the model, while what a mixed step adds (a second attention
# launch a layer, the prompt's chunks re-reading their prefix) does not shrink with it.
# Llama-3.1-8B (7.0B) gained 3.5% (session 29). Qwen3-0.6B (0.44B), whose decode steps are mostly
# attention and launches, read ~1% lower with fixed 256-token riding steps then (26496-26877
# against 26565-27400 tok/s, six processes each), but +1.4% paced and lazy (session 34, one
# call: 27763-27803 against 27411-27424; paced alone 27625-27651). Smaller models (SmolLM2-135M:
# 0.1B) are not measured.
DENSE_RIDE_MIN_PARAMS = 4 * 10**8
# Lazy riding (Scheduler._step_budget, session 34): a paced step with at least DENSE_RIDE_FILL
# decodes takes prompt tokens only once DENSE_RIDE_CHUNK of them are due, so fewer steps are
# mixed (a mixed step costs ~1 ms more than its products and KV reads on Llama-3.1-8B); one with
# fewer decodes takes prompt tokens up to DENSE_RIDE_FILL rows, the weight-bound room (~160
# rows on an H200, above). Llama-3.1-8B nanovllm, H200, one lease, each twice: 10870 / 10847
# tok/s every step paced; chunk / fill 384 / 160 10983 / 10982 / 10985 / 10978, 256 / 160
# 10969-10978, 512 / 160 10964-10979, 384 / 128 10969-10977, 256 / 128 10921, 384 / 192
# 10951, 384 / 224 10878 (benchmarks/results/lazy-ride-s34). ride_sim.py ranks them alike.
DENSE_RIDE_CHUNK = 384
DENSE_RIDE_FILL = 160


def default_ride_budget(m: ModelConfig, device: torch.device, usage_context: str) -> int:
    """Offline on CUDA, the step size up to which a decode step costs about the same, so that
    prompt tokens added to it are nearly free; 0 (off) off the GPU and in the server, where
    prompts' time to first token counts.

    MoE: every expert's weights are read once while the rows routed to it fit one row tile,
    that is while a step's tokens x experts_per_token / experts stay within MOE_ROW_TILE; three
    quarters of that leaves room for uneven routing. Measured on Mixtral-8x7B (8 experts, top 2:
    384) nanovllm, H200: 4126-4135 tok/s at 384, 4100 at 352, 4003 at 448, 3790 without riding
    (benchmarks/results/ride-s26); the client-side probe of session 25 (ridden-s25) had the same
    order: 384 > 448 > 512 > 320. Dense: DENSE_RIDE_BUDGET from DENSE_RIDE_MIN_PARAMS up."""
    if device.type != "cuda" or usage_context != "llm":
        return 0
    experts = model_num_experts(m.hf_config)
    top_k = int(m.hf_config.get("num_experts_per_tok") or 0)
    if experts and top_k:
        return MOE_ROW_TILE * experts // top_k * 3 // 4
    return DENSE_RIDE_BUDGET if m.layer_product_params >= DENSE_RIDE_MIN_PARAMS else 0


def default_ride_granule(m: ModelConfig) -> int:
    """0 for MoE models (a riding step costs an expert read whatever its rows up to the budget,
    so it takes the whole budget), DENSE_RIDE_GRANULE for dense ones (past the weight-bound rows
    each row costs its FLOPs, so a riding step takes only what keeps the prompts on time)."""
    return 0 if model_num_experts(m.hf_config) else DENSE_RIDE_GRANULE


def _check_tensor_parallel(m: ModelConfig, dev: torch.device, tp: int, backend: str) -> None:
    """Shapes must split evenly across ranks; KV heads split, or are replicated when there are
    fewer of them than ranks (then tp must be a multiple of num_key_value_heads)."""
    if m.num_attention_heads % tp:
        raise _fail("tensor_parallel_size", f"{tp} must divide the model's num_attention_heads "
                                            f"({m.num_attention_heads})")
    kv = m.num_key_value_heads
    if (kv >= tp and kv % tp) or (kv < tp and tp % kv):
        raise _fail("tensor_parallel_size", f"{tp} must divide num_key_value_heads ({kv}) or be "
                                            "a multiple of it")
    if m.intermediate_size % tp:
        raise _fail("tensor_parallel_size", f"{tp} must divide the model's intermediate_size "
                                            f"({m.intermediate_size})")
    # Ray ranks may live on other nodes: there the placement group checks the GPUs.
    if dev.type == "cuda" and backend != "ray" and tp > torch.cuda.device_count():
        raise _fail("tensor_parallel_size", f"{tp} ranks need {tp} CUDA devices, "
                                            f"{torch.cuda.device_count()} are visible")


def _check_expert_parallel(m: ModelConfig, par: ParallelConfig) -> ParallelConfig:
    """Expert parallel on a dense model is a logged no-op (as in vLLM: the flag only changes MoE
    layers, so one launch command can serve dense and MoE models); on an MoE model every rank
    must get at least one expert (uneven splits are fine)."""
    if not par.enable_expert_parallel:
        return par
    experts = model_num_experts(m.hf_config)
    if experts == 0:
        logger.warning("enable_expert_parallel=True ignored: %s has no MoE layers", m.architecture)
        return dataclasses.replace(par, enable_expert_parallel=False)
    if experts < par.tensor_parallel_size:
        raise _fail("enable_expert_parallel",
                    f"{experts} experts cannot be spread over {par.tensor_parallel_size} ranks "
                    "(every rank needs at least one); lower tensor_parallel_size or turn expert "
                    "parallel off")
    return par


def create_engine_config(model: Optional[str] = None, *, tokenizer: Optional[str] = None,
                         skip_tokenizer_init: bool = False, dtype: Any = "auto",
                         device: str = "auto", max_model_len: Optional[int] = None,
                         block_size: Optional[int] = None, max_num_seqs: Optional[int] = None,
                         max_num_batched_tokens: Optional[int] = None,
                         enable_prefix_caching: bool = True, enable_chunked_prefill: bool = True,
                         gpu_memory_utilization: float = 0.9, kv_cache_memory: Optional[int] = None,
                         kv_cache_dtype: str = "auto", seed: int = 0, load_format: str = "auto",
                         enforce_eager: bool = False, tensor_parallel_size: int = 1,
                         scheduling_policy: str = "fcfs", async_scheduling: Optional[bool] = None,
                         enable_sleep_mode: bool = False, enable_expert_parallel: bool = False,
                         distributed_executor_backend: Optional[str] = None,
                         kv_transfer_config: Any = None, compilation_config: Any = None,
                         admission_control: bool = True, usage_context: str = "llm",
                         ride_budget: Optional[int] = None, ride_granule: Optional[int] = None,
                         ride_chunk: Optional[int] = None, ride_fill: Optional[int] = None,
                         **unknown) -> EngineConfig:
    if unknown:
        raise TypeError(f"unexpected engine arguments: {sorted(unknown)}")
    if load_format not in ("auto", "safetensors", "dummy", "gguf"):
        raise _fail("load_format", f"must be one of auto, safetensors, gguf, dummy; got {load_format!r}")
    if not isinstance(seed, int):
        raise _fail("seed", f"must be an integer, got {seed!r}")
    compilation = CompilationConfig.parse(compilation_config, enforce_eager=bool(enforce_eager))
    dev = resolve_device(device)
    path, source = resolve_model_path(model)
    mcfg = build_model_config(path, dtype=dtype, device=dev, max_model_len=max_model_len,
                              tokenizer=tokenizer, skip_tokenizer_init=skip_tokenizer_init,
                              load_format=load_format, seed=seed, source=source)
    if dev.type == "cpu" and kv_cache_memory is None:
        kv_cache_memory = _CPU_DEFAULT_KV_BYTES
    if block_size is None:
        block_size = default_block_size(dev)
    cache = CacheConfig(block_size=block_size, enable_prefix_caching=bool(enable_prefix_caching),
                        gpu_memory_utilization=gpu_memory_utilization,
                        kv_cache_memory=kv_cache_memory, kv_cache_dtype=kv_cache_dtype,
                        enable_sleep_mode=bool(enable_sleep_mode))
    default_seqs, default_tokens = default_scheduler_limits(dev, usage_context)
    if max_num_seqs is None:
        max_num_seqs = default_seqs
    if max_num_batched_tokens is None:
        max_num_batched_tokens = (default_tokens if enable_chunked_prefill
                                  else max(default_tokens, mcfg.max_model_len))
    if ride_budget is None:  # prompts ride in pieces: not without chunked prefill
        ride_budget = (default_ride_budget(mcfg, dev, usage_context)
                       if enable_chunked_prefill else 0)
    if ride_granule is None:
        # Riding off, no granule: it would only split compile-cache keys.
        ride_granule = default_ride_granule(mcfg) if ride_budget else 0
    lazy = bool(ride_budget and ride_granule)   # lazy riding needs paced steps
    sched = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                            max_model_len=mcfg.max_model_len,
                            enable_chunked_prefill=bool(enable_chunked_prefill),
                            policy=scheduling_policy,
                            admission_control=bool(admission_control),
                            ride_budget=ride_budget,
                            ride_granule=ride_granule,
                            ride_chunk=((DENSE_RIDE_CHUNK if lazy else 0)
                                        if ride_chunk is None else ride_chunk),
                            ride_fill=((DENSE_RIDE_FILL if lazy else 0)
                                       if ride_fill is None else ride_fill),
                            async_scheduling=(dev.type == "cuda") if async_scheduling is None
                            else bool(async_scheduling))
    par = ParallelConfig(tensor_parallel_size=tensor_parallel_size,
                         enable_expert_parallel=bool(enable_expert_parallel),
                         distributed_executor_backend=distributed_executor_backend)
    par = _check_expert_parallel(mcfg, par)
    if par.tensor_parallel_size > 1:
        _check_tensor_parallel(mcfg, dev, par.tensor_parallel_size, par.executor_backend)
    if par.executor_backend != "uni":
        # Steps are synchronous across worker processes (see kvflow/executor/ranked.py).
        sched = dataclasses.replace(sched, async_scheduling=False)
    kv_transfer = KVTransferConfig.parse(kv_transfer_config)
    if kv_transfer.is_enabled and par.tensor_parallel_size > 1:
        raise _fail("kv_transfer_config", "KV transfer with tensor_parallel_size > 1 is not "
                                          "supported yet (docs/disaggregation.md)")
    if kv_transfer.is_enabled and cache.enable_sleep_mode:
        raise _fail("kv_transfer_config", "KV transfer together with enable_sleep_mode is not "
                                          "supported (sleep would free blocks being transferred)")
    if kv_transfer.transport == "nccl" and kv_transfer.is_enabled and dev.type != "cuda":
        logger.warning("kv_transfer_config.transport 'nccl' on %s: using gloo instead", dev)
    return EngineConfig(model=mcfg, cache=cache, scheduler=sched, parallel=par,
                        compilation=compilation,
                        device=dev, max_model_len_explicit=max_model_len is not None,
                        kv_transfer=kv_transfer)
