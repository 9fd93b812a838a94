"""AsyncLLM: the synchronous LLMEngine driven by one background thread, for asyncio servers.

Threading model (the invariants everything below relies on):
- The LLMEngine is touched by exactly one thread, the engine thread (`kvflow-engine`). Other
  threads never call into it; they post work into `_new` / `_aborts` under `_cond` and notify.
  (Read-only helpers that use only the tokenizer and the config, such as `process_prompt`, may
  be called from elsewhere.)
- Each request has a `RequestStream` whose asyncio queue lives on the event loop that submitted
  it. The engine thread never touches that queue directly: it batches one iteration's items per
  loop and hands them over with a single `loop.call_soon_threadsafe`.
- The engine thread sleeps on `_cond` whenever the engine has nothing to do: no busy loop.
- Per iteration the engine thread applies new requests, then aborts, then runs one step. An abort
  posted before a step therefore takes effect before that step: a disconnected client's KV blocks
  are freed within one engine step.
- Whole-engine operations (sleep / wake_up / reload_weights) are posted as commands into
  `_commands` and run by the engine thread between steps, after that iteration's new requests
  and aborts; their results go back to the caller's event loop the same way outputs do.
- If the engine thread itself fails (anything escaping an iteration), the engine is dead: every
  in-flight stream raises `EngineDeadError`, new requests are refused, `is_healthy()` is False.
  A failure inside one request's step is not that: LLMEngine.step fails only that step's
  requests (finish_reason "error") and serving continues.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Iterable, Optional

from kvflow.engine.llm_engine import EngineSleepingError as _CoreSleepingError
from kvflow.engine.llm_engine import LLMEngine, PromptType
from kvflow.engine.output_processor import OutputKind
from kvflow.engine.request_stream import RequestStream
from kvflow.metrics import (EngineStats, FinishedRequestStats, IterationStats, LoggingStatLogger,
                            StatLogger)
from kvflow.outputs import RequestOutput
from kvflow.sampling_params import SamplingParamError, SamplingParams

logger = logging.getLogger("kvflow")

SHUTDOWN_MESSAGE = "the server is shutting down"


class EngineDeadError(RuntimeError):
    """The engine thread failed; no request can make progress any more."""


class EngineShutdownError(RuntimeError):
    """The engine is draining or stopped and accepts no new requests."""


class EngineAsleepError(EngineShutdownError):
    """The engine is in sleep mode (or its weights await a reload); the server answers 503."""


class EngineOverloadedError(RuntimeError):
    """Too many requests are already waiting (the server answers 429)."""


# First item of every stream: the engine thread accepted the request.
_ACCEPTED = object()


@dataclass(eq=False)
class _Tracker:
    """Engine-thread-only bookkeeping of one request, for metrics and the finish log line."""
    arrival: float                       # time.time() at submission (the scheduler's clock)
    core_requests: list = field(default_factory=list)  # scheduler Request objects, for timing
    queue_time: Optional[float] = None
    first_token: Optional[float] = None
    last_token: Optional[float] = None
    num_prompt_tokens: int = 0
    num_generation_tokens: int = 0
    num_cached_tokens: int = 0


class AsyncLLM:
    def __init__(self, engine: LLMEngine, *, stat_loggers: Iterable[StatLogger] = (),
                 log_stats: bool = True, log_requests: bool = True,
                 log_interval: Optional[float] = 10.0):
        self.engine = engine
        self.stat_loggers: list[StatLogger] = list(stat_loggers)
        if log_stats:
            self.stat_loggers.append(LoggingStatLogger(log_requests=log_requests))
        self.log_interval = log_interval
        self._cond = threading.Condition()
        # Guarded by _cond.
        self._new: deque[tuple[RequestStream, dict]] = deque()
        self._aborts: deque[tuple[str, Optional[str]]] = deque()
        # (fn(deliveries) -> result, loop, future): run on the engine thread between steps.
        self._commands: deque[tuple[Any, asyncio.AbstractEventLoop, asyncio.Future]] = deque()
        self._streams: dict[str, RequestStream] = {}   # accepted and not yet finished
        self._in_transit = 0     # drained from _new, not yet visible in the stats snapshot
        self._accepting = True
        self._stop = False
        self._dead: Optional[BaseException] = None
        # Engine-thread only.
        self._trackers: dict[str, _Tracker] = {}
        self._unscheduled: set[str] = set()
        self._abort_messages: dict[str, str] = {}
        self._activity = False
        self._next_log = time.monotonic() + (log_interval or 0)
        # Read from any thread; replaced, never mutated.
        self._snapshot = self._read_stats()
        # Monotonic time of the engine thread's last completed iteration (watchdog).
        self.last_step_time = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="kvflow-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_engine_args(cls, model: Optional[str] = None, *, stat_loggers: Iterable[StatLogger] = (),
                         log_stats: bool = True, log_requests: bool = True,
                         log_interval: Optional[float] = 10.0, **engine_kwargs) -> "AsyncLLM":
        return cls(LLMEngine.from_engine_args(model, **engine_kwargs), stat_loggers=stat_loggers,
                   log_stats=log_stats, log_requests=log_requests, log_interval=log_interval)

    # ------------------------------------------------------------------ read-only views
    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def get_tokenizer(self):
        return self.engine.get_tokenizer()

    def engine_stats(self) -> EngineStats:
        return self._snapshot

    def is_healthy(self) -> bool:
        # workers_alive: a dead tensor-parallel worker is reported even while the engine idles
        # (read-only check, safe from any thread; the next step raises and kills the engine).
        return (self._dead is None and self._thread.is_alive()
                and getattr(self.engine, "workers_alive", lambda: True)())

    @property
    def dead_error(self) -> Optional[BaseException]:
        return self._dead

    def num_in_flight(self) -> int:
        return len(self._streams)

    def is_stalled(self, threshold_s: float) -> bool:
        """True when requests are pending but the engine thread has not finished an iteration
        for `threshold_s` seconds (a hung kernel, a deadlock)."""
        return bool(self._streams) and time.monotonic() - self.last_step_time > threshold_s

    # ------------------------------------------------------------------ submission
    async def add_request(self, request_id: str, prompt: PromptType,
                          params: Optional[SamplingParams] = None, *,
                          prompt_token_ids: Optional[list[int]] = None,
                          prompt_text: Optional[str] = None, priority: int = 0,
                          max_queued: Optional[int] = None,
                          kv_transfer_params: Optional[dict] = None) -> RequestStream:
        """Submit and wait until the engine thread accepted the request; returns its stream.

        Raises SamplingParamError/ValueError (bad input), EngineOverloadedError (more than
        `max_queued` requests waiting), EngineShutdownError or EngineDeadError."""
        stream = RequestStream(request_id, self, asyncio.get_running_loop())
        kwargs = dict(prompt=prompt, params=params, prompt_token_ids=prompt_token_ids,
                      prompt_text=prompt_text, priority=priority, arrival_time=time.time(),
                      kv_transfer_params=kv_transfer_params)
        with self._cond:
            self._check_accepting()
            if request_id in self._streams:
                raise SamplingParamError("request_id", f"request_id: {request_id!r} is already in use")
            if max_queued is not None:
                queued = len(self._new) + self._in_transit + self._snapshot.num_waiting
                if queued >= max_queued:
                    raise EngineOverloadedError(
                        f"the server is overloaded: {queued} requests are already waiting "
                        f"(max_queued_requests={max_queued}); retry later")
            self._streams[request_id] = stream
            self._new.append((stream, kwargs))
            self._cond.notify()
        try:
            first = await stream._queue.get()
        except BaseException:
            # Cancelled while waiting for the ack: the request may still be added; abort it.
            self.abort(request_id)
            raise
        if isinstance(first, BaseException):
            stream.finished = True
            raise first
        assert first is _ACCEPTED
        return stream

    async def generate(self, prompt: PromptType, params: Optional[SamplingParams], request_id: str,
                       **kwargs) -> AsyncIterator[RequestOutput]:
        """DELTA outputs of one request. Closing or cancelling the iterator aborts the request."""
        stream = await self.add_request(request_id, prompt, params, **kwargs)
        try:
            async for out in stream:
                yield out
        finally:
            stream.cancel()

    def abort(self, request_id: str, message: Optional[str] = None) -> None:
        """Thread-safe; applied by the engine thread before its next step. With a message, the
        consumer (if any) receives a final output with finish_reason "abort" and that error."""
        with self._cond:
            if request_id in self._streams:
                self._aborts.append((request_id, message))
                self._cond.notify()

    def abort_all(self, message: str = SHUTDOWN_MESSAGE) -> int:
        with self._cond:
            ids = list(self._streams)
            self._aborts.extend((rid, message) for rid in ids)
            self._cond.notify()
        return len(ids)

    def _check_accepting(self) -> None:  # under _cond
        if self._dead is not None:
            raise EngineDeadError(f"the engine is dead: {self._dead!r}")
        if not self._accepting:
            raise EngineShutdownError(SHUTDOWN_MESSAGE)

    # ------------------------------------------------------------------ engine commands
    async def run_in_engine_thread(self, fn) -> Any:
        """Run `fn(engine)` on the engine thread between two steps; returns its result (or
        raises its exception) on the caller's event loop."""
        return await self._post(lambda deliveries: fn(self.engine))

    async def _post(self, fn) -> Any:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        with self._cond:
            if self._dead is not None:
                raise EngineDeadError(f"the engine is dead: {self._dead!r}")
            if self._stop:
                raise EngineShutdownError(SHUTDOWN_MESSAGE)
            self._commands.append((fn, loop, fut))
            self._cond.notify()
        return await fut

    async def sleep(self, level: int = 1, in_flight: str = "abort") -> int:
        """LLMEngine.sleep on the engine thread; the requests it finishes or aborts are
        delivered to their streams. Returns the bytes released."""
        def cmd(deliveries):
            now = time.time()
            for out in self.engine.sleep(level, in_flight):
                self._handle_output(out, now, deliveries, None)
            return self.engine.last_sleep_freed_bytes
        return await self._post(cmd)

    async def wake_up(self, tags: Optional[list[str]] = None) -> None:
        await self.run_in_engine_thread(lambda e: e.wake_up(tags))

    async def is_sleeping(self) -> bool:
        return await self.run_in_engine_thread(lambda e: e.is_sleeping())

    async def reload_weights(self, weights=None) -> int:
        return await self.run_in_engine_thread(lambda e: e.reload_weights(weights))

    # ------------------------------------------------------------------ shutdown
    def stop_accepting(self) -> None:
        with self._cond:
            self._accepting = False

    def wait_idle(self, timeout: Optional[float]) -> bool:
        """Block until no request is in flight (True) or the timeout passed (False)."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._streams or self._dead is not None, timeout)

    def shutdown(self, graceful: bool = True, timeout: float = 30.0) -> None:
        """Stop accepting; if graceful, let in-flight requests finish for up to `timeout`
        seconds; abort the rest (finish_reason "abort", error SHUTDOWN_MESSAGE); stop the thread."""
        self.stop_accepting()
        if graceful:
            self.wait_idle(timeout)
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=max(5.0, timeout))
            if not self._thread.is_alive():
                # The engine thread is gone: stop what outlives it (a KV transfer server's
                # socket and thread, tensor-parallel workers).
                self.engine.shutdown()

    # ------------------------------------------------------------------ engine thread
    def _has_work(self) -> bool:  # under _cond, engine thread
        return bool(self._new or self._aborts or self._commands) or \
            self.engine.has_unfinished_requests()

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._stop and not self._has_work():
                        if self._log_due():
                            break
                        self._cond.wait(self._log_wait())
                    if self._stop:
                        break
                    new, self._new = list(self._new), deque()
                    aborts, self._aborts = list(self._aborts), deque()
                    commands, self._commands = list(self._commands), deque()
                    self._in_transit = len(new)
                self.last_step_time = time.monotonic()
                deliveries: list[tuple[RequestStream, Any]] = []
                self._apply_new(new, deliveries)
                self._apply_aborts(aborts, deliveries)
                self._run_commands(commands, deliveries)
                if self.engine.has_unfinished_requests():
                    self._activity = True
                    self._step(deliveries)
                self._deliver(deliveries)
                snapshot = self._read_stats()
                with self._cond:
                    self._snapshot = snapshot
                    self._in_transit = 0
                self.last_step_time = time.monotonic()
                self._maybe_log()
            self._stop_all()
        except BaseException as e:  # noqa: BLE001 - the engine is dead; tell everyone
            self._die(e)

    def _apply_new(self, new: list[tuple[RequestStream, dict]], deliveries: list) -> None:
        for stream, kw in new:
            rid = stream.request_id
            try:
                self.engine.add_request(rid, kw["prompt"], kw["params"],
                                        arrival_time=kw["arrival_time"], priority=kw["priority"],
                                        output_kind=OutputKind.DELTA,
                                        prompt_token_ids=kw["prompt_token_ids"],
                                        prompt_text=kw["prompt_text"],
                                        kv_transfer_params=kw["kv_transfer_params"])
            except _CoreSleepingError as e:
                self._forget(rid)
                deliveries.append((stream, EngineAsleepError(str(e))))
                continue
            except Exception as e:  # noqa: BLE001 - a bad request fails alone
                if not isinstance(e, ValueError):
                    logger.exception("adding request %s failed", rid)
                self._forget(rid)
                deliveries.append((stream, e))
                continue
            self._trackers[rid] = _Tracker(kw["arrival_time"],
                                           self.engine.get_scheduler_requests(rid))
            self._unscheduled.add(rid)
            deliveries.append((stream, _ACCEPTED))

    def _run_commands(self, commands: list, deliveries: list) -> None:
        for fn, loop, fut in commands:
            try:
                result, exc = fn(deliveries), None
            except Exception as e:  # noqa: BLE001 - the caller gets it; the engine goes on
                result, exc = None, e
            _settle(loop, fut, result, exc)

    def _apply_aborts(self, aborts: list[tuple[str, Optional[str]]], deliveries: list) -> None:
        for rid, message in aborts:
            if message:
                self._abort_messages[rid] = message
            for out in self.engine.abort_request(rid):
                self._handle_output(out, time.time(), deliveries, None)

    def _step(self, deliveries: list) -> None:
        outputs = self.engine.step()
        now = time.time()
        it = IterationStats()
        for out in outputs:
            self._handle_output(out, now, deliveries, it)
        self._update_queue_times()
        if not it.empty():
            for lg in self.stat_loggers:
                _safe(lg.record_iteration, it)

    def _handle_output(self, out: RequestOutput, now: float, deliveries: list,
                       it: Optional[IterationStats]) -> None:
        rid = out.request_id
        stream = self._streams.get(rid)
        tr = self._trackers.get(rid)
        if tr is not None:
            n = sum(len(c.token_ids) for c in out.outputs)
            tr.num_cached_tokens = out.num_cached_tokens
            if n:
                if tr.first_token is None:
                    tr.first_token = now
                    tr.num_prompt_tokens = len(out.prompt_token_ids)
                    if it is not None:
                        it.num_prompt_tokens += tr.num_prompt_tokens
                        it.time_to_first_tokens.append(now - tr.arrival)
                elif it is not None:
                    it.inter_token_latencies.append(now - tr.last_token)
                tr.last_token = now
                tr.num_generation_tokens += n
                if it is not None:
                    it.num_generation_tokens += n
        if out.finished:
            message = self._abort_messages.pop(rid, None)
            if message and out.error is None:
                out.error = message
            if tr is not None:
                self._record_finished(rid, out, tr, now)
            self._forget(rid)
        if stream is not None:
            deliveries.append((stream, out))

    def _record_finished(self, rid: str, out: RequestOutput, tr: _Tracker, now: float) -> None:
        reasons = [c.finish_reason for c in out.outputs]
        if "error" in reasons or (out.error and "abort" not in reasons):
            reason = "error"
        elif "abort" in reasons:
            reason = "abort"
        else:
            reason = next((r for r in reasons if r), "stop")
        if tr.queue_time is None:
            tr.queue_time = self._queue_time(tr)
        stats = FinishedRequestStats(
            request_id=rid, finish_reason=reason, num_prompt_tokens=len(out.prompt_token_ids),
            num_generation_tokens=tr.num_generation_tokens, num_cached_tokens=tr.num_cached_tokens,
            e2e_latency=now - tr.arrival, queue_time=tr.queue_time,
            ttft=None if tr.first_token is None else tr.first_token - tr.arrival)
        for lg in self.stat_loggers:
            _safe(lg.record_finished, stats)

    @staticmethod
    def _queue_time(tr: _Tracker) -> Optional[float]:
        times = [r.first_scheduled_time for r in tr.core_requests
                 if r.first_scheduled_time is not None]
        return max(0.0, min(times) - tr.arrival) if times else None

    def _update_queue_times(self) -> None:
        for rid in list(self._unscheduled):
            tr = self._trackers.get(rid)
            if tr is None:
                self._unscheduled.discard(rid)
                continue
            tr.queue_time = self._queue_time(tr)
            if tr.queue_time is not None:
                self._unscheduled.discard(rid)

    def _forget(self, rid: str) -> None:
        self._trackers.pop(rid, None)
        self._unscheduled.discard(rid)
        self._abort_messages.pop(rid, None)
        with self._cond:
            self._streams.pop(rid, None)
            if not self._streams:
                self._cond.notify_all()  # wait_idle

    def _deliver(self, deliveries: list[tuple[RequestStream, Any]]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for stream, item in deliveries:
            by_loop.setdefault(stream.loop, []).append((stream, item))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:
                # The consumer's event loop is closed: nobody will read; free the requests.
                for stream, _ in items:
                    if stream.request_id in self._streams:
                        self.abort(stream.request_id)

    def _read_stats(self) -> EngineStats:
        s = self.engine.stats()
        return EngineStats(num_running=s["num_running"], num_waiting=s["num_waiting"],
                           kv_cache_usage=s["kv_cache_usage"],
                           num_free_blocks=self.engine.num_free_blocks(),
                           num_total_blocks=self.engine.num_total_blocks(),
                           prefix_cache_queries=s["prefix_cache_queries"],
                           prefix_cache_hits=s["prefix_cache_hits"],
                           num_preemptions=s["num_preemptions"])

    # periodic engine log line: only while there was activity since the last one
    def _log_due(self) -> bool:
        return bool(self.log_interval) and self._activity and time.monotonic() >= self._next_log

    def _log_wait(self) -> Optional[float]:
        if not self.log_interval or not self._activity:
            return None  # sleep until notified
        return max(0.0, self._next_log - time.monotonic())

    def _maybe_log(self) -> None:
        if not self._log_due():
            return
        now = time.monotonic()
        for lg in self.stat_loggers:
            _safe(lg.log_engine, self._snapshot, now)
        self._activity = self.engine.has_unfinished_requests()
        self._next_log = now + self.log_interval

    def _stop_all(self) -> None:
        """Stop requested: refuse what was never added, abort what runs, then exit."""
        with self._cond:
            new, self._new = list(self._new), deque()
            aborts, self._aborts = list(self._aborts), deque()
            commands, self._commands = list(self._commands), deque()
        _fail_commands(commands, EngineShutdownError(SHUTDOWN_MESSAGE))
        deliveries: list = [(stream, EngineShutdownError(SHUTDOWN_MESSAGE)) for stream, _ in new]
        for stream, _ in new:
            self._forget(stream.request_id)
        self._apply_aborts(aborts, deliveries)
        for rid in list(self._trackers):
            self._apply_aborts([(rid, SHUTDOWN_MESSAGE)], deliveries)
        self._deliver(deliveries)
        self._snapshot = self._read_stats()

    def _die(self, exc: BaseException) -> None:
        logger.critical("the engine thread died; failing all in-flight requests", exc_info=exc)
        with self._cond:
            self._dead = exc
            self._accepting = False
            streams = list(self._streams.values())
            self._streams.clear()
            self._new.clear()
            self._aborts.clear()
            commands, self._commands = list(self._commands), deque()
            self._cond.notify_all()
        err = f"the engine died: {type(exc).__name__}: {exc}"
        _fail_commands(commands, EngineDeadError(err))
        try:
            self._deliver([(s, EngineDeadError(err)) for s in streams])
        except BaseException:  # noqa: BLE001 - best effort; the thread is ending anyway
            logger.exception("could not notify requests of the engine's death")


def _settle(loop: asyncio.AbstractEventLoop, fut: asyncio.Future, result: Any,
            exc: Optional[BaseException]) -> None:
    def done() -> None:
        if not fut.done():  # the caller may have been cancelled
            fut.set_exception(exc) if exc is not None else fut.set_result(result)
    try:
        loop.call_soon_threadsafe(done)
    except RuntimeError:
        pass  # the caller's loop is closed: nobody waits for the result


def _fail_commands(commands: list, exc: BaseException) -> None:
    for _, loop, fut in commands:
        _settle(loop, fut, None, exc)


def _put_all(items: list[tuple[RequestStream, Any]]) -> None:
    for stream, item in items:
        stream._put(item)


def _safe(fn, *args) -> None:
    # A broken stat logger must not take the engine down with it.
    try:
        fn(*args)
    except Exception:  # noqa: BLE001
        logger.exception("stat logger %r failed", fn)

