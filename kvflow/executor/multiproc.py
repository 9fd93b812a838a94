"""Multi-process executor: one worker process per tensor-parallel rank, the scheduler in the driver.

Design
------
- The driver (the process that owns LLMEngine and its Scheduler) starts `tensor_parallel_size`
  worker processes with the *spawn* start method (fork is unsafe once torch / CUDA / Triton
  threads exist). Each worker joins one process group (gloo on CPU, NCCL on CUDA; rendezvous
  over TCP on 127.0.0.1), calls `init_tp_group` -> `set_tp(rank, size, group)` BEFORE building
  the model (layers size their shards at construction), then builds an ordinary `Worker`.
  Rank r uses `cuda:r` on CUDA.
- Control plane: one duplex `multiprocessing.Pipe` per worker. A request is pickled ONCE and the
  same bytes are written to every pipe (SchedulerOutput is plain dataclasses, a few KiB per step).
  Each worker answers every request: rank 0 with the result (RunnerOutput, MemoryPlan), other
  ranks with a tiny ack (None). The acks cost little and let the driver know every rank finished
  the step, so a failure on one rank is never mistaken for progress.
- Every rank runs every step in full (the collectives are inside the model's layers), including
  sampling. Only rank 0's tokens count: the driver returns rank 0's RunnerOutput, and sends rank
  0's sampled tokens of step N along with step N+1's SchedulerOutput; ranks > 0 overwrite their
  host token history with them (`Worker.apply_sampled_tokens`) before running the step. Greedy and
  seeded sampling agree on all ranks anyway; this keeps unseeded random sampling (whose global RNG
  stream is not guaranteed equal across ranks) and penalties exact too.
- Steps are synchronous: `launch` sends, `resolve` waits for all replies, and a second `launch`
  before `resolve` is refused. The engine's overlapped (async) scheduling is therefore switched off
  for tensor_parallel_size > 1 (config.py): it would schedule step N+1 before rank 0's token of
  step N is known to the other ranks.
- Failure model:
  * A worker process that exits (crash, OOM kill, SIGKILL) is seen through its process sentinel or
    pipe EOF while the driver waits; the executor is then dead: the remaining workers are
    terminated and `ExecutorDeadError` is raised now and from every later call. LLMEngine lets
    that error escape `step()` (the async engine then reports itself dead: health 503).
  * An exception inside a step on some rank: if every rank still answers within
    `_ERROR_GRACE_S` the ranks are in lockstep and the exception is re-raised as an ordinary step
    failure (that step's requests fail, serving continues, as with one process). If some rank does
    not answer (stuck in a collective its peer never entered), the executor is dead.
  * No step timeout otherwise: a first step may legitimately compile for minutes.
- Shutdown: `shutdown()` (idempotent) asks workers to exit, then terminates / kills stragglers. A
  `weakref.finalize` does the same when the executor is collected or at interpreter exit; workers
  are also daemonic and exit on their own when the driver's end of the pipe closes (EOF).

Caveat (as for any spawn-based library): a script that builds an engine with
tensor_parallel_size > 1 must guard its entry point with `if __name__ == "__main__":`.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import multiprocessing.connection as mpc
import os
import pickle
import time
import traceback
import weakref
from dataclasses import dataclass, replace
from typing import Any, Optional

import torch

from kvflow.config import EngineConfig
from kvflow.core.sched_output import RunnerOutput, SchedulerOutput
from kvflow.executor import ExecutorDeadError

logger = logging.getLogger("kvflow")

# How long ranks that have not answered get after another rank reported a step error.
_ERROR_GRACE_S = 10.0
# Model loading + process-group rendezvous; generous for big checkpoints.
_STARTUP_TIMEOUT_S = float(os.environ.get("KVFLOW_WORKER_STARTUP_TIMEOUT", "1800"))
_SHUTDOWN_JOIN_S = 5.0


# ---------------------------------------------------------------------------------- worker side
def _reply_error(conn, e: BaseException) -> None:
    tb = traceback.format_exc()
    try:
        conn.send(("error", e, tb))
    except Exception:  # noqa: BLE001 - the exception itself may not pickle
        conn.send(("error", RuntimeError(f"{type(e).__name__}: {e}"), tb))


def _worker_main(rank: int, size: int, config: EngineConfig, attention_backend: Optional[str],
                 init_method: str, conn) -> None:
    """Entry point of worker process `rank`: join the group, build the worker, serve requests
    until 'shutdown' or the driver goes away."""
    from kvflow.distributed import destroy_tp_group, init_tp_group
    from kvflow.worker.worker import Worker

    device = config.device
    if device.type == "cuda":
        device = torch.device("cuda", rank)
    else:
        # The ranks share the host's cores; oversubscribing them slows every collective.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))
    config = config.replace(device=device, parallel=replace(config.parallel, rank=rank))
    try:
        try:
            init_tp_group(rank, size, init_method, device)
            worker = Worker(config, attention_backend)
        except BaseException as e:  # noqa: BLE001 - reported to the driver, then exit
            _reply_error(conn, e)
            return
        conn.send(("ok", dict(worker.timings)))
        while True:
            try:
                method, payload = pickle.loads(conn.recv_bytes())
            except (EOFError, OSError):
                return  # the driver is gone
            if method == "shutdown":
                return
            try:
                if method == "execute_model":
                    so, prev_tokens = payload
                    if rank:
                        worker.apply_sampled_tokens(prev_tokens)
                    out = worker.execute_model(so)
                    result = out if rank == 0 else None
                elif method == "plan_memory":
                    result = worker.plan_memory()
                elif method == "initialize_cache":
                    worker.initialize_cache(payload)
                    result = dict(worker.timings)
                elif method == "sleeper":  # sleep mode: (name, args) on the SleepManager
                    name, args = payload
                    attr = getattr(worker.sleeper, name)
                    result = attr(*args) if callable(attr) else attr
                else:
                    raise ValueError(f"unknown worker method {method!r}")
            except Exception as e:  # noqa: BLE001 - the driver decides what it means
                _reply_error(conn, e)
                continue
            conn.send(("ok", result))
    finally:
        try:
            destroy_tp_group()
        except Exception:  # noqa: BLE001 - exiting anyway
            pass
        conn.close()


# ---------------------------------------------------------------------------------- driver side
def _terminate(procs: list, conns: list) -> None:
    """Stop workers: polite request, then SIGTERM, then SIGKILL. Safe to call twice."""
    msg = pickle.dumps(("shutdown", None))
    for conn in conns:
        try:
            conn.send_bytes(msg)
        except Exception:  # noqa: BLE001 - already gone
            pass
    deadline = time.monotonic() + _SHUTDOWN_JOIN_S
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(2.0)
        if p.is_alive():
            p.kill()
            p.join(2.0)
    for conn in conns:
        try:
            conn.close()
        except Exception:  # noqa: BLE001
            pass


_UNKNOWN = object()


@dataclass
class _StepHandle:
    so: SchedulerOutput


class MultiprocExecutor:
    def __init__(self, config: EngineConfig, attention_backend: Optional[str] = None):
        from kvflow.distributed import free_tcp_port

        self.size = config.parallel.tensor_parallel_size
        ctx = mp.get_context("spawn")
        init_method = f"tcp://127.0.0.1:{free_tcp_port()}"
        self._procs: list = []
        self._conns: list = []
        self._dead: Optional[str] = None
        self._in_flight: Optional[_StepHandle] = None
        # Rank 0's tokens of the last completed step, sent with the next step (module docstring).
        self._last_sampled: dict[str, list[int]] = {}
        self._serving_error: Any = _UNKNOWN
        self._is_sleeping: Any = _UNKNOWN
        self._finalizer = weakref.finalize(self, _terminate, self._procs, self._conns)
        for rank in range(self.size):
            parent, child = ctx.Pipe(duplex=True)
            p = ctx.Process(target=_worker_main, name=f"kvflow-tp{rank}", daemon=True,
                            args=(rank, self.size, config, attention_backend, init_method, child))
            p.start()
            child.close()  # only the worker holds its end: its exit shows up as EOF here
            self._procs.append(p)
            self._conns.append(parent)
        try:
            self.timings: dict[str, float] = self._gather(timeout=_STARTUP_TIMEOUT_S)[0]
        except BaseException:
            self.shutdown()
            raise
        logger.info("tensor parallel: %d worker processes ready (pids %s)", self.size,
                    [p.pid for p in self._procs])

    # ------------------------------------------------------------------ plumbing
    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def _die(self, reason: str) -> ExecutorDeadError:
        """Mark the executor dead, stop every worker, return the error to raise."""
        if self._dead is None:
            self._dead = reason
            logger.error("tensor-parallel executor is dead: %s", reason)
        self.shutdown()
        return ExecutorDeadError(f"the engine's workers are dead: {self._dead}")

    def _check_alive(self) -> None:
        if self._dead is not None:
            raise ExecutorDeadError(f"the engine's workers are dead: {self._dead}")
        if self._finalizer.alive is False:
            raise ExecutorDeadError("the executor was shut down")

    def _broadcast(self, method: str, payload: Any) -> None:
        self._check_alive()
        data = pickle.dumps((method, payload), protocol=pickle.HIGHEST_PROTOCOL)
        for rank, conn in enumerate(self._conns):
            try:
                conn.send_bytes(data)
            except OSError as e:
                raise self._die(f"worker rank {rank} is unreachable ({e})") from None

    def _gather(self, timeout: Optional[float] = None) -> list:
        """One reply from every rank. Raises ExecutorDeadError when a worker exits or does not
        answer in time; re-raises a worker's exception when every rank answered."""
        pending = set(range(self.size))
        results: dict[int, Any] = {}
        error: Optional[tuple[int, BaseException, str]] = None
        deadline = None if timeout is None else time.monotonic() + timeout
        sentinels = {p.sentinel: rank for rank, p in enumerate(self._procs)}
        while pending:
            if error is not None and deadline is None:
                deadline = time.monotonic() + _ERROR_GRACE_S
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready = mpc.wait([self._conns[r] for r in pending] + list(sentinels), remaining)
            if not ready:
                what = (f"rank(s) {sorted(pending)} did not finish the step after rank {error[0]} "
                        f"failed:\n{error[2]}") if error else \
                    f"rank(s) {sorted(pending)} did not answer within {timeout:.0f} s"
                raise self._die(what)
            # Replies first: a worker that reported an error and then exited (startup failure)
            # is described by its error, not by a bare exit code.
            exited = [sentinels[obj] for obj in ready if obj in sentinels]
            for obj in ready:
                if obj in sentinels:
                    continue
                rank = self._conns.index(obj)
                try:
                    msg = obj.recv()
                except (EOFError, OSError):
                    exited.append(rank)  # pipe closed: the process is gone or going
                    continue
                pending.discard(rank)
                if msg[0] == "ok":
                    results[rank] = msg[1]
                elif error is None:
                    error = (rank, msg[1], msg[2])
            if exited:
                rank = min(exited)
                p = self._procs[rank]
                p.join(2.0)
                reason = f"worker rank {rank} (pid {p.pid}) exited with code {p.exitcode}"
                if error is not None and error[0] == rank:
                    reason += f" after an error:\n{error[2]}"
                raise self._die(reason)
        if error is not None:
            rank, exc, tb = error
            logger.error("worker rank %d failed:\n%s", rank, tb)
            raise exc
        return [results[r] for r in range(self.size)]

    # ------------------------------------------------------------------ executor API
    def plan_memory(self):
        """Every rank plans its own memory; the smallest KV pool decides (the scheduler's block
        ids must be valid on every rank)."""
        self._broadcast("plan_memory", None)
        plans = self._gather()
        return min(plans, key=lambda p: p.num_blocks)

    def initialize_cache(self, num_blocks: int) -> None:
        self._broadcast("initialize_cache", num_blocks)
        self.timings = self._gather()[0]

    def launch(self, so: SchedulerOutput) -> _StepHandle:
        if self._in_flight is not None:
            raise RuntimeError("the multi-process executor runs one step at a time "
                               "(async scheduling is off with tensor_parallel_size > 1)")
        self._broadcast("execute_model", (so, self._last_sampled))
        self._last_sampled = {}
        self._in_flight = _StepHandle(so)
        return self._in_flight

    def resolve(self, handle: _StepHandle) -> RunnerOutput:
        if handle is not self._in_flight:
            raise RuntimeError("resolve() of a step that is not in flight")
        self._in_flight = None
        out: RunnerOutput = self._gather()[0]
        self._last_sampled = {r: t for r, t in out.sampled_token_ids.items() if t}
        return out

    def execute_model(self, so: SchedulerOutput) -> RunnerOutput:
        return self.resolve(self.launch(so))

    # ------------------------------------------------------------------ sleep mode
    # Every rank sleeps / wakes its own shard. The serving state only changes through these
    # calls, so the driver caches rank 0's view after each (add_request asks on every request).
    def _sleeper(self, name: str, *args) -> list:
        self._broadcast("sleeper", (name, args))
        results = self._gather()
        self._refresh_sleep_state()
        return results

    def _refresh_sleep_state(self) -> None:
        self._broadcast("sleeper", ("serving_error", ()))
        self._serving_error = self._gather()[0]
        self._broadcast("sleeper", ("is_sleeping", ()))
        self._is_sleeping = bool(self._gather()[0])

    def sleep(self, level: int) -> int:
        return sum(self._sleeper("sleep", level))  # bytes freed on all ranks

    def wake_up(self, tags=None) -> None:
        self._sleeper("wake_up", tags)

    def reload_weights(self, weights=None) -> int:
        # Each rank slices its own shard out of the full tensors (their weight_loaders).
        return self._sleeper("reload_weights", None if weights is None else list(weights))[0]

    def serving_error(self):
        if self._dead is not None:
            return None  # not a sleep matter: the next step raises ExecutorDeadError
        if self._serving_error is _UNKNOWN:
            self._refresh_sleep_state()
        return self._serving_error

    def is_sleeping(self) -> bool:
        if self._dead is not None:
            return False
        if self._is_sleeping is _UNKNOWN:
            self._refresh_sleep_state()
        return self._is_sleeping

    def workers_alive(self) -> bool:
        """Read-only (no shutdown, no pipe traffic): safe from a thread other than the one
        driving steps, e.g. the server's health check."""
        return self._dead is None and self._finalizer.alive and all(p.is_alive() for p in self._procs)

    def check_health(self) -> None:
        self._check_alive()
        for rank, p in enumerate(self._procs):
            if not p.is_alive():
                raise self._die(f"worker rank {rank} (pid {p.pid}) exited with code {p.exitcode}")

    def shutdown(self) -> None:
        self._in_flight = None
        self._finalizer()  # runs _terminate once; later calls are no-ops
