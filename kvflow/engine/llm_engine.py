"""The synchronous engine: add requests, then step (schedule -> execute -> update) until done.

Everything user-facing about a request (prompt text, detokenisation, stop strings, n > 1 fan-in)
lives in the OutputProcessor; the scheduler sees only token ids. A failure inside one step fails
the requests of that step with finish_reason "error" and the engine keeps serving.
"""
from __future__ import annotations

import logging
import time
import traceback
from dataclasses import replace
from typing import Any, Optional, Union

from kvflow import envs
from kvflow.config import EngineConfig, create_engine_config
from kvflow.core.scheduler import Scheduler
from kvflow.engine.output_processor import OutputKind, OutputProcessor
from kvflow.engine.tokenizer import load_tokenizer
from kvflow.executor import ExecutorDeadError, make_executor
from kvflow.gc_heap import freeze_startup_heap
from kvflow.kv_transfer.base import make_scheduler_connector
from kvflow.outputs import RequestOutput
from kvflow.request import Request, RequestStatus
from kvflow.sampling_params import SamplingParams, SamplingParamError

logger = logging.getLogger("kvflow")

PromptType = Union[str, list[int], dict]

SLEEP_ABORT_MESSAGE = "aborted: the engine was put to sleep"


class EngineSleepingError(RuntimeError):
    """The engine cannot serve now: it is asleep, or sleep(level=2) discarded the weights and
    reload_weights() has not restored them."""


def _bind_kv_transfer_port(config: EngineConfig) -> EngineConfig:
    """A producer with port 0 gets a free port now: the scheduler half writes it into
    kv_transfer_params and the worker half listens on it, so both must agree before either
    starts."""
    kt = config.kv_transfer
    if not kt.is_producer or kt.port:
        return config
    import socket
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((kt.host if kt.host not in ("*", "::") else "0.0.0.0", 0))
        port = s.getsockname()[1]
    return config.replace(kv_transfer=replace(kt, port=port))


class LLMEngine:
    def __init__(self, config: EngineConfig, attention_backend: Optional[str] = None):
        t0 = time.perf_counter()
        config = _bind_kv_transfer_port(config)
        self.tokenizer = load_tokenizer(config.model.tokenizer) if config.model.tokenizer else None
        # One process, or one worker process per tensor-parallel rank.
        self.executor = make_executor(config, attention_backend)
        try:
            plan = self.executor.plan_memory()
            config = self._fit_max_model_len(config, plan)
            self.config = config
            self.executor.initialize_cache(plan.num_blocks)
        except BaseException:
            self.executor.shutdown()  # no orphan worker processes when startup fails
            raise
        logger.info(plan.describe())
        cc, sc = config.cache, config.scheduler
        self.scheduler = Scheduler(
            max_num_seqs=sc.max_num_seqs, max_num_batched_tokens=sc.max_num_batched_tokens,
            max_model_len=config.model.max_model_len, num_blocks=plan.num_blocks,
            block_size=cc.block_size, enable_prefix_caching=cc.enable_prefix_caching,
            enable_chunked_prefill=sc.enable_chunked_prefill,
            long_prefill_token_threshold=sc.long_prefill_token_threshold, policy=sc.policy,
            connector=make_scheduler_connector(config), admission_control=sc.admission_control,
            ride_budget=sc.ride_budget, ride_granule=sc.ride_granule,
            ride_chunk=sc.ride_chunk, ride_fill=sc.ride_fill)
        self.output_processor = OutputProcessor(self.tokenizer)
        self.memory_plan = plan
        eos = set(config.model.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_token_ids = frozenset(eos)
        # Long-lived from here on: out of the collector's full scans (gc_heap.py).
        freeze_startup_heap()
        self.startup_s = time.perf_counter() - t0
        logger.info("engine ready in %.2f s", self.startup_s)
        self._next_id = 0
        self.step_trace: Optional[list] = [] if envs.step_trace() else None
        self.async_scheduling = config.scheduler.async_scheduling
        self._pending = None  # (SchedulerOutput, handle) launched but not yet applied

    @classmethod
    def from_engine_args(cls, model: Optional[str] = None, attention_backend: Optional[str] = None,
                         **kwargs) -> "LLMEngine":
        return cls(create_engine_config(model, **kwargs), attention_backend)

    @staticmethod
    def _fit_max_model_len(config: EngineConfig, plan) -> EngineConfig:
        capacity = plan.num_blocks * plan.block_size
        if capacity >= config.model.max_model_len:
            return config
        # Only reached when max_model_len was not given (the worker raises otherwise).
        logger.warning("the KV cache holds %d tokens, less than the model's maximum length %d; "
                       "max_model_len is set to %d", capacity, config.model.max_model_len, capacity)
        plan.max_model_len = capacity
        plan.max_concurrency = 1.0
        return config.replace(model=replace(config.model, max_model_len=capacity),
                              scheduler=replace(config.scheduler, max_model_len=capacity))

    # ------------------------------------------------------------------ requests
    @property
    def max_model_len(self) -> int:
        return self.config.model.max_model_len

    def new_request_id(self) -> str:
        self._next_id += 1
        return str(self._next_id - 1)

    def process_prompt(self, prompt: PromptType) -> tuple[Optional[str], list[int]]:
        """(prompt text or None, token ids) from a str, a token-id list or a dict with
        'prompt' or 'prompt_token_ids'. Raises ValueError naming `prompt`."""
        text = None
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                ids, text = prompt["prompt_token_ids"], prompt.get("prompt")
            elif "prompt" in prompt:
                text = prompt["prompt"]
                ids = None
            else:
                raise SamplingParamError("prompt", "prompt: a dict prompt needs 'prompt' or 'prompt_token_ids'")
        elif isinstance(prompt, str):
            text, ids = prompt, None
        elif isinstance(prompt, (list, tuple)):
            ids = prompt
        else:
            raise SamplingParamError("prompt", f"prompt: unsupported type {type(prompt).__name__}")
        if ids is None:
            if self.tokenizer is None:
                raise SamplingParamError("prompt", "prompt: text prompts need a tokenizer "
                                                   "(the engine was started without one)")
            ids = self.tokenizer(text).input_ids
        ids = list(ids)
        vocab = self.config.model.vocab_size
        if not ids:
            raise SamplingParamError("prompt", "prompt: must not be empty")
        if set(map(type, ids)) == {int}:      # the common case, checked at C speed
            ok = 0 <= min(ids) and max(ids) < vocab
        else:
            ok = all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in ids)
        if not ok:
            raise SamplingParamError("prompt", f"prompt: token ids must be integers in [0, {vocab})")
        if len(ids) >= self.max_model_len:
            raise SamplingParamError(
                "prompt", f"prompt: {len(ids)} tokens do not fit max_model_len={self.max_model_len} "
                          f"(the prompt must leave room for at least one generated token)")
        return text, ids

    def add_request(self, request_id: Optional[str], prompt: PromptType,
                    params: Optional[SamplingParams] = None, *, arrival_time: Optional[float] = None,
                    priority: int = 0, output_kind: OutputKind = OutputKind.CUMULATIVE,
                    prompt_token_ids: Optional[list[int]] = None, prompt_text: Optional[str] = None,
                    kv_transfer_params: Optional[dict] = None) -> str:
        """Validate and enqueue. Raises ValueError (the request is not added) on bad input,
        EngineSleepingError while the engine cannot serve (sleep mode)."""
        sleeping = self.executor.serving_error()
        if sleeping is not None:
            raise EngineSleepingError(sleeping)
        params = (params or SamplingParams()).clone()
        params.verify_for_model(self.config.model.vocab_size)
        if params.detokenize and self.tokenizer is None and params.stop:
            raise SamplingParamError("stop", "stop: stop strings need a tokenizer")
        params._eos_token_ids = self.eos_token_ids
        if prompt_token_ids is None:
            prompt_text, prompt_token_ids = self.process_prompt(prompt)
        request_id = self.new_request_id() if request_id is None else str(request_id)
        if self.output_processor.has_request(request_id):
            raise SamplingParamError("request_id", f"request_id: {request_id!r} is already in use")
        requests = []
        for i in range(params.n):
            child = params if params.n == 1 else params.clone()
            if params.n > 1:
                child.n = 1
                # Distinct but reproducible streams for seeded n > 1.
                child.seed = None if params.seed is None else params.seed + i
            cid = request_id if params.n == 1 else f"{i}_{request_id}"
            requests.append(Request(cid, prompt_token_ids, child, self.max_model_len,
                                    arrival_time=arrival_time, priority=priority,
                                    kv_transfer_params=kv_transfer_params))
        for req in requests:  # validate everything before any state changes
            self.scheduler.check_request(req)
        self.output_processor.add_request(request_id, prompt_text, prompt_token_ids,
                                          [(r.request_id, r.sampling_params) for r in requests],
                                          output_kind)
        for req in requests:
            self.scheduler.add_request(req)
        return request_id

    def abort_request(self, request_ids) -> list[RequestOutput]:
        if isinstance(request_ids, str):
            request_ids = [request_ids]
        outs = []
        for rid in request_ids:
            self.scheduler.finish_requests(self.output_processor.child_ids(rid),
                                           RequestStatus.FINISHED_ABORTED)
            ro = self.output_processor.abort(rid)
            if ro is not None:
                outs.append(ro)
        if self._pending is not None and not self.scheduler.has_unfinished_requests():
            self._complete(*self._pending)  # nothing left to overlap with: drain the last step
        return outs

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests() or self._pending is not None

    def get_num_unfinished_requests(self) -> int:
        return self.scheduler.get_num_unfinished_requests()

    # ------------------------------------------------------------------ step
    def step(self) -> list[RequestOutput]:
        """One engine iteration. With async scheduling, step N+1 is scheduled and launched
        before step N's tokens are applied, so host work overlaps device work; the outputs
        returned are step N's. Requests whose sampling reads their own history (penalties,
        min_tokens, prompt logprobs) force a synchronous step."""
        trace = self.step_trace is not None
        if self._pending is not None and (not self.async_scheduling or self._needs_sync()):
            return self._complete(*self._pending)
        t0 = time.perf_counter() if trace else 0.0
        so = self.scheduler.schedule()
        t1 = time.perf_counter() if trace else 0.0
        try:
            handle = self.executor.launch(so)
        except ExecutorDeadError:
            raise  # no step can run any more: the engine is dead, not just this step
        except Exception as e:  # noqa: BLE001 - a failed step fails its requests, not the engine
            return self._step_failed(so, e) + (self._complete(*self._pending) if self._pending else [])
        if not self.async_scheduling:
            outputs = self._complete(so, handle)
        else:
            outputs = self._complete(*self._pending) if self._pending is not None else []
            # An empty step has nothing in flight (e.g. every running request waits for its
            # last token); pending it would keep the loop alive forever. It is applied now:
            # it may carry KV transfer reports.
            if so.is_empty:
                outputs += self._complete(so, handle)
            else:
                self._pending = (so, handle)
        if trace:
            # (requests, tokens, schedule s, launch + complete s)
            self.step_trace.append((len(so.num_scheduled_tokens), so.total_num_scheduled_tokens,
                                    t1 - t0, time.perf_counter() - t1, 0.0))
        return outputs

    def _needs_sync(self) -> bool:
        return any(r.sampling_params.needs_history for r in self.scheduler.running) or any(
            r.sampling_params.needs_history for r in self.scheduler.requests.values()
            if r.status == RequestStatus.WAITING)

    def _complete(self, so, handle) -> list[RequestOutput]:
        """Wait for a launched step and apply its tokens."""
        if self._pending is not None and self._pending[1] is handle:
            self._pending = None
        try:
            ro = self.executor.resolve(handle)
        except ExecutorDeadError:
            raise
        except Exception as e:  # noqa: BLE001
            return self._step_failed(so, e)
        core_outs = self.scheduler.update_from_output(so, ro)
        outputs, stopped = self.output_processor.process(core_outs)
        if stopped:
            self.scheduler.finish_requests(stopped, RequestStatus.FINISHED_STOPPED)
        return outputs

    def _step_failed(self, so, e: Exception) -> list[RequestOutput]:
        logger.error("step failed; failing its %d requests:\n%s", len(so.num_scheduled_tokens),
                     traceback.format_exc())
        return self._fail(list(so.num_scheduled_tokens), f"{type(e).__name__}: {e}")

    def _fail(self, child_ids: list[str], message: str) -> list[RequestOutput]:
        self.scheduler.finish_requests(child_ids, RequestStatus.FINISHED_ERROR)
        parents = {self.output_processor.child_to_parent.get(c) for c in child_ids} - {None}
        outs = []
        for pid in parents:
            for cid in self.output_processor.child_ids(pid):  # siblings fail with it
                self.scheduler.finish_requests([cid], RequestStatus.FINISHED_ERROR)
            ro = self.output_processor.abort(pid, reason="error", error=message)
            if ro is not None:
                outs.append(ro)
        return outs

    # ------------------------------------------------------------------ misc
    def get_tokenizer(self):
        return self.tokenizer

    def startup_timings(self) -> dict[str, float]:
        """Seconds spent in each startup phase (and GiB of CUDA graphs), plus time to ready."""
        # Floats are seconds / GiB; flags (compile_cache_hit) pass through as they are.
        t = {k: round(v, 3) if isinstance(v, float) else v
             for k, v in self.executor.timings.items()}
        t["ready_s"] = round(self.startup_s, 3)
        return t

    def shutdown(self) -> None:
        """Stop the executor's worker processes (if any). Idempotent."""
        self.scheduler.connector.shutdown()
        self.executor.shutdown()

    def workers_alive(self) -> bool:
        """False once a worker process of the executor has died (read-only, any thread)."""
        alive = getattr(self.executor, "workers_alive", None)
        return True if alive is None else alive()

    def num_waiting_tokens(self) -> int:
        """Tokens the scheduler has queued but not admitted (waiting requests' prompts)."""
        return self.scheduler.num_waiting_tokens()

    def num_free_blocks(self) -> int:
        return self.scheduler.kv.num_free_blocks

    def num_total_blocks(self) -> int:
        return self.scheduler.kv.pool.num_blocks

    def reset_prefix_cache(self) -> bool:
        return self.scheduler.reset_prefix_cache()

    def stats(self) -> dict[str, Any]:
        s = self.scheduler.stats()
        return dict(num_running=s.num_running, num_waiting=s.num_waiting,
                    kv_cache_usage=s.kv_cache_usage, prefix_cache_queries=s.prefix_cache_queries,
                    prefix_cache_hits=s.prefix_cache_hits, num_preemptions=s.num_preemptions)

    # ------------------------------------------------------------------ serving helpers
    def get_scheduler_requests(self, request_id: str) -> list[Request]:
        """The scheduler's Request objects of a request's samples (one per n), for timing
        metrics: callers keep the references, which stay readable after the request finishes
        (e.g. `first_scheduled_time`). Empty for an unknown or finished request."""
        reqs = (self.scheduler.get_request(cid) for cid in self.output_processor.child_ids(request_id))
        return [r for r in reqs if r is not None]

    # ------------------------------------------------------------------ sleep mode
    # Mechanics live in kvflow/worker/sleep.py; here: request handling around them. Invariant
    # at the moment the worker releases memory: no request is in the engine, no step is
    # launched-but-unapplied (_pending), every KV block is free and the prefix cache is empty
    # (the KV contents are about to be lost).
    def _require_sleep_mode(self, what: str) -> None:
        if not self.config.cache.enable_sleep_mode:
            raise RuntimeError(f"{what}: sleep mode is off; create the engine with "
                               "enable_sleep_mode=True (server: --enable-sleep-mode)")

    def sleep(self, level: int = 1, in_flight: str = "abort") -> list[RequestOutput]:
        """Release the KV cache and the weights (level 1: offloaded to CPU, restored exactly on
        wake; level 2: discarded, reload_weights() needed after wake). Requests in flight are
        aborted (finish_reason "abort") or, with in_flight="finish", run to completion first.
        Returns the final outputs of those requests."""
        self._require_sleep_mode("sleep")
        if level not in (1, 2):
            raise ValueError(f"level: must be 1 or 2, got {level!r}")
        if in_flight not in ("abort", "finish"):
            raise ValueError(f"in_flight: must be 'abort' or 'finish', got {in_flight!r}")
        if self.executor.is_sleeping():
            raise RuntimeError("sleep: the engine is already sleeping; call wake_up() first")
        outs: list[RequestOutput] = []
        if in_flight == "finish":
            while self.has_unfinished_requests():
                outs.extend(self.step())
        else:
            for rid in list(self.output_processor.parents):
                self.scheduler.finish_requests(self.output_processor.child_ids(rid),
                                               RequestStatus.FINISHED_ABORTED)
                ro = self.output_processor.abort(rid, reason="abort", error=SLEEP_ABORT_MESSAGE)
                if ro is not None:
                    outs.append(ro)
        while self._pending is not None:  # the launched step reads the KV cache: let it land
            outs.extend(self._complete(*self._pending))
        if self.scheduler.has_unfinished_requests() or not self.scheduler.reset_prefix_cache():
            raise RuntimeError("sleep: KV blocks are still in use after draining the requests")
        self.last_sleep_freed_bytes = self.executor.sleep(level)
        return outs

    def wake_up(self, tags: Optional[list[str]] = None) -> None:
        """Take back device memory: tags "weights" and/or "kv_cache" (None = both), in any
        order. The engine serves again once both are awake (and, after level 2, the weights
        are reloaded)."""
        self._require_sleep_mode("wake_up")
        if isinstance(tags, str):
            tags = [tags]
        self.executor.wake_up(tags)

    def is_sleeping(self) -> bool:
        return self.executor.is_sleeping()

    def reload_weights(self, weights=None) -> int:
        """New weight values: None re-reads the checkpoint; otherwise an iterable of
        (checkpoint name, tensor). The prefix cache is reset (KV computed with the old weights
        is stale). Returns the number of parameters written."""
        if self.has_unfinished_requests():
            raise RuntimeError("reload_weights: requests are in flight; finish or abort them first")
        n = self.executor.reload_weights(weights)
        if not self.scheduler.reset_prefix_cache():
            raise RuntimeError("reload_weights: the prefix cache could not be reset")
        return n
