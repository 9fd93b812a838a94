"""A worker owns one device: it loads the model, plans memory, allocates the KV cache and runs
steps through its ModelRunner.

Memory plan (computed before the KV cache is allocated, logged on one line):
  GPU: budget = total * gpu_memory_utilization; KV = budget - non-torch memory (CUDA context,
       other processes' share is excluded by construction) - torch peak of a max-size dummy step.
  CPU: KV = kv_cache_memory (default 2 GiB).
  kv_cache_memory, when given, overrides the GPU plan too.
The plan counts allocated bytes; expandable segments (use_expandable_segments) keep the
allocator's reserve at that, so the process stays within gpu_memory_utilization.
"""
from __future__ import annotations

import dataclasses
import gc
import logging
import os
import time

import torch

from kvflow.config import EngineConfig
from kvflow.core.sched_output import RunnerOutput, SchedulerOutput
from kvflow.models.loader import build_model
from kvflow.worker.model_runner import ModelRunner

logger = logging.getLogger("kvflow")
GiB = 1 << 30


@dataclasses.dataclass
class MemoryPlan:
    weights_bytes: int
    activation_peak_bytes: int
    kv_cache_bytes: int
    num_blocks: int
    block_size: int
    max_model_len: int
    max_concurrency: float

    def describe(self) -> str:
        return (f"memory plan: weights {self.weights_bytes / GiB:.2f} GiB, activation peak "
                f"{self.activation_peak_bytes / GiB:.2f} GiB, KV cache {self.kv_cache_bytes / GiB:.2f} GiB "
                f"= {self.num_blocks} blocks x {self.block_size} tokens "
                f"({self.num_blocks * self.block_size} tokens), max concurrency "
                f"{self.max_concurrency:.1f} requests of {self.max_model_len} tokens")


def use_expandable_segments() -> bool:
    """Turn on the CUDA caching allocator's expandable segments unless the user configured the
    allocator (PYTORCH_CUDA_ALLOC_CONF set: theirs wins). Returns whether they are on.

    Why: the plan budgets *allocated* bytes (weights + profiled activation peak + KV + graphs),
    but the caching allocator reserves whole segments and cannot merge freed blocks of different
    segments, so a run whose activation sizes vary reserves more than it allocates. Measured on
    the H200, Qwen3-0.6B throughput8k: 123.4 GiB allocated at peak, 131.8 GiB reserved, above
    the 125.8 GiB budget of gpu_memory_utilization 0.9. With expandable segments freed pages are
    remapped within one growing segment and the reserve stays at the allocated peak."""
    conf = os.environ.get("PYTORCH_CUDA_ALLOC_CONF")
    if conf:
        return "expandable_segments:true" in conf.replace(" ", "").lower()
    # torch >= 2.9 names the setter per accelerator (the CUDA one warns that it is deprecated).
    setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None)
    (setter or torch.cuda.memory._set_allocator_settings)("expandable_segments:True")
    return True


class Worker:
    def __init__(self, config: EngineConfig, attention_backend: str | None = None):
        self.config = config
        self.device = config.device
        if self.device.type == "cuda":
            if not use_expandable_segments():
                logger.info("PYTORCH_CUDA_ALLOC_CONF leaves expandable segments off: the "
                            "allocator may reserve more than the memory plan (fragmentation)")
            torch.cuda.set_device(self.device)
        torch.manual_seed(config.model.seed)
        t0 = time.perf_counter()
        self.model = build_model(config.model, self.device)
        self.load_time_s = time.perf_counter() - t0
        self.weights_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        logger.info("loaded %s (%s) in %.2f s, %.2f GiB", config.model.architecture,
                    config.model.source or config.model.model, self.load_time_s,
                    self.weights_bytes / GiB)
        self.runner = ModelRunner(config, self.model, self.device)
        self.runner.bind_attention_backend(attention_backend)
        self.plan: MemoryPlan | None = None
        self.timings: dict[str, float] = {"model_load_s": self.load_time_s}
        self.compiled = None  # the CompiledModel when compilation level 3 is on
        if config.compilation.compile_forward:
            self._compile_model()
        from kvflow.worker.sleep import SleepManager
        self.sleeper = SleepManager(self)  # sleep / wake_up / reload_weights (sleep mode)

    def _compile_model(self) -> None:
        """torch.compile of the model forward (kvflow/compilation/compile.py's contract), done
        before the memory plan so the profiled peak is the compiled forward's.

        Only the runner's forward goes through the wrapper (`runner.model`, hence the decode
        CUDA graphs, which are captured around it). `self.model` stays the plain model: sleep
        mode and reload_weights walk its named_parameters() by checkpoint name, and the wrapper
        would prefix them with "model.". That is enough because the compiled code holds no
        weights: parameters and buffers are graph inputs (inductor runs without freezing), read
        from the modules at every call, so swapping `param.data` (sleep / wake) or copying new
        values into it (reload_weights) changes what the compiled forward computes without a
        recompile; dynamo's guards check only shape, dtype, device and strides, which sleep
        mode restores exactly. Verified by tests/test_compile_engine.py."""
        from kvflow.compilation import compile_model
        compiled = compile_model(self.model, self.config, self.device)
        info = compiled.compile_info
        self.compiled = compiled
        self.runner.model = compiled
        self.timings["compile_s"] = info.seconds
        self.timings["compile_cache_hit"] = info.cache_hit  # compile_model logged the details

    # ------------------------------------------------------------------ memory
    def _profile_peak(self) -> int:
        sc = self.config.scheduler
        num_tokens = sc.max_num_batched_tokens
        num_reqs = max(min(sc.max_num_seqs, num_tokens), -(-num_tokens // self.config.model.max_model_len))
        # One block is enough: the dummy step reads block 0 and writes nothing.
        scratch = [torch.zeros(self.runner.kv_cache_shape(1, l),
                               dtype=self.runner.kv_cache_torch_dtype, device=self.device)
                   for l in self.runner.attn_layers]
        for l, c in zip(self.runner.attn_layers, scratch):
            l.kv_cache = c
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            self.runner.dummy_run(*self._profile_shape(num_tokens, num_reqs))
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base
        else:
            self.runner.dummy_run(*self._profile_shape(min(num_tokens, 256), min(num_reqs, 4)))
            peak = 0
        self.runner.release_kv_cache()
        del scratch
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return peak

    def _profile_shape(self, num_tokens: int, num_reqs: int) -> tuple[list[int], list[int]]:
        """num_tokens spread evenly over num_reqs requests, each within max_model_len: a real
        step never holds a longer request (models may size tables by max_model_len, e.g. Llama
        4's rotary), nor more than num_reqs * max_model_len tokens."""
        limit = self.config.model.max_model_len
        num_tokens = min(num_tokens, num_reqs * limit)
        k = min(num_reqs, num_tokens)
        per = [num_tokens // k] * k
        for i in range(num_tokens - sum(per)):
            per[i] += 1                      # spread the remainder: max(per) <= ceil(t / k) <= limit
        return per, per

    def plan_memory(self) -> MemoryPlan:
        cc = self.config.cache
        t0 = time.perf_counter()
        peak = self._profile_peak()
        self.timings["profile_s"] = time.perf_counter() - t0
        per_block = self.runner.bytes_per_block()
        if cc.kv_cache_memory is not None:
            kv_bytes = cc.kv_cache_memory
        else:
            free, total = torch.cuda.mem_get_info(self.device)
            non_torch = (total - free) - torch.cuda.memory_reserved(self.device)
            kv_bytes = int(total * cc.gpu_memory_utilization - non_torch
                           - torch.cuda.memory_allocated(self.device) - peak)
            # Reserve room for CUDA graphs (their shared logits buffer and pool of decode-size
            # activations) and allocator fragmentation.
            if self.use_cuda_graphs:
                kv_bytes -= self._graph_reserve_bytes()
            kv_bytes -= int(0.01 * total)
        num_blocks = max(kv_bytes // per_block, 0)
        mc = self.config.model
        blocks_per_seq = -(-mc.max_model_len // cc.block_size)
        if num_blocks < blocks_per_seq:
            need = blocks_per_seq * per_block
            if self.config.max_model_len_explicit or num_blocks < 1:
                raise ValueError(
                    f"max_model_len: {mc.max_model_len} tokens need {need / GiB:.2f} GiB of KV cache "
                    f"for one request, but only {max(kv_bytes, 0) / GiB:.2f} GiB is available; raise "
                    "gpu_memory_utilization / kv_cache_memory or lower max_model_len")
        self.plan = MemoryPlan(self.weights_bytes, peak, num_blocks * per_block, int(num_blocks),
                               cc.block_size, mc.max_model_len,
                               num_blocks / max(blocks_per_seq, 1))
        return self.plan

    def _graph_reserve_bytes(self) -> int:
        from kvflow.worker.cuda_graphs import default_buckets
        max_bs = default_buckets(self.config.scheduler.max_num_seqs)[-1]
        mc = self.config.model
        logits = max_bs * mc.vocab_size * 4
        # Decode activations of the largest bucket are a few hidden/intermediate rows per token.
        acts = max_bs * (4 * mc.hidden_size + 2 * mc.intermediate_size + mc.vocab_size) * 4
        # Mixed-step graphs share that pool (activations of up to 512 token rows, no logits)
        # and keep one hidden-state output per bucket.
        if self.config.compilation.mixed_graphs:
            from kvflow.worker.mixed_graphs import scheduler_token_buckets
            buckets = scheduler_token_buckets(self.config.scheduler)
            acts = max(acts, buckets[-1] * (4 * mc.hidden_size + 2 * mc.intermediate_size) * 4)
            acts += sum(buckets) * mc.hidden_size * 4
        return logits + acts

    def initialize_cache(self, num_blocks: int) -> None:
        t0 = time.perf_counter()
        self.runner.allocate_kv_cache(num_blocks)
        self.timings["kv_cache_alloc_s"] = time.perf_counter() - t0
        if self.config.kv_transfer.is_enabled:
            from kvflow.kv_transfer.base import make_worker_connector
            from kvflow.kv_transfer.layout import KVLayout
            # The layout comes from the configs only (never from tensor shapes): layout.py.
            c = self.config
            layout = KVLayout.from_config(c.model, c.cache, c.parallel,
                                          kv_scales=self.runner.kv_scales())
            self.runner.kv_connector = make_worker_connector(c)
            self.runner.kv_connector.register_kv_caches(self.runner.kv_caches, layout)
        if self.device.type == "cuda" and self.runner.backend.name != "torch":
            t0 = time.perf_counter()
            self.runner.warm_up(self.config.scheduler.max_num_batched_tokens)
            self.timings["kernel_warmup_s"] = time.perf_counter() - t0
        if self.use_cuda_graphs:
            self.runner.capture_cuda_graphs()
            captured = [g for g in (self.runner.graphs, self.runner.mixed_graphs) if g is not None]
            self.timings["cuda_graph_s"] = sum(g.capture_s for g in captured)
            self.timings["cuda_graph_gib"] = sum(g.capture_bytes for g in captured) / GiB
        elif self.device.type == "cuda":
            logger.info("CUDA graphs off: %s", self.cuda_graphs_off_reason())

    def cuda_graphs_off_reason(self) -> str:
        if self.config.compilation.enforce_eager:
            return "enforce_eager"
        if not self.config.compilation.decode_graphs:
            return f"cudagraph_mode {self.config.compilation.cudagraph_mode}"
        if not self.runner.backend.capabilities.supports_cuda_graphs:
            return f"attention backend {self.runner.backend.name} does not declare them"
        if not getattr(self.model, "supports_cuda_graphs", True):
            return f"{type(self.model).__name__} does not support them (MoE expert dispatch syncs)"
        return "not on CUDA"

    @property
    def use_cuda_graphs(self) -> bool:
        return (self.device.type == "cuda" and self.config.compilation.decode_graphs
                and self.runner.backend.capabilities.supports_cuda_graphs
                and getattr(self.model, "supports_cuda_graphs", True))

    def memory_stats(self, reset: bool = False) -> dict[str, int]:
        """Peak bytes of this worker's device since the last reset: reserved by the caching
        allocator (what the memory plan bounds) and allocated by live tensors. {} off CUDA.
        reset: start a new peak window after reading."""
        if self.device.type != "cuda":
            return {}
        stats = dict(peak_reserved=torch.cuda.max_memory_reserved(self.device),
                     peak_allocated=torch.cuda.max_memory_allocated(self.device))
        if reset:
            torch.cuda.reset_peak_memory_stats(self.device)
        return stats

    # ------------------------------------------------------------------ steps
    def execute_model(self, so: SchedulerOutput) -> RunnerOutput:
        return self.runner.execute_model(so)

    def apply_sampled_tokens(self, sampled: dict[str, list[int]]) -> None:
        """Tensor parallelism: overwrite this rank's copy of the tokens sampled last step with
        the driver's (rank 0's), so that every rank's host history (next inputs, penalties)
        is rank 0's even where its own sampler drew differently. Steps are synchronous here:
        the last len(toks) tokens of each request are the ones sampled last step."""
        runner = self.runner
        for rid, toks in sampled.items():
            st = runner.requests.get(rid)
            if st is None or not toks or st.pending:
                continue
            end = min(st.num_tokens, runner.max_model_len)
            start = max(st.num_tokens - len(toks), 0)
            if start < end:
                runner.token_buf[st.row, start:end] = toks[:end - start]
