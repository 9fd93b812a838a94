"""Multi-process executor: one worker process per tensor-parallel rank, the scheduler in the driver.

Design
------
- The driver (the process that owns LLMEngine and its Scheduler) starts `tensor_parallel_size`
  worker processes with the *spawn* start method (fork is unsafe once torch / CUDA / Triton
  threads exist). Each runs a `RankWorker` (rank_worker.py: joins one process group — gloo on
  CPU, NCCL on CUDA, rendezvous over TCP on 127.0.0.1 — BEFORE building the model, because
  layers size their shards at construction, then builds an ordinary `Worker`). Rank r uses
  `cuda:r` on CUDA. The step protocol (rank 0's tokens, synchronous steps, sleep mode) is
  `RankedExecutor`'s (ranked.py), shared with the Ray executor.
- Control plane: one duplex `multiprocessing.Pipe` per worker. A request is pickled ONCE and the
  same bytes are written to every pipe (SchedulerOutput is plain dataclasses, a few KiB per step).
  Each worker answers every request: rank 0 with the result (RunnerOutput, MemoryPlan), other
  ranks with a tiny ack (None). The acks cost little and let the driver know every rank finished
  the step, so a failure on one rank is never mistaken for progress.
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
import weakref
from typing import Any, Optional

from kvflow.config import EngineConfig
from kvflow.executor.ranked import RankedExecutor

logger = logging.getLogger("kvflow")

# How long ranks that have not answered get after another rank reported a step error.
_ERROR_GRACE_S = 10.0
# Model loading + process-group rendezvous; generous for big checkpoints.
_STARTUP_TIMEOUT_S = float(os.environ.get("KVFLOW_WORKER_STARTUP_TIMEOUT", "1800"))
_SHUTDOWN_JOIN_S = 5.0


# ---------------------------------------------------------------------------------- worker side
def _worker_main(rank: int, size: int, config: EngineConfig, attention_backend: Optional[str],
                 init_method: str, conn) -> None:
    """Entry point of worker process `rank`: join the group, build the worker, serve requests
    until 'shutdown' or the driver goes away."""
    from kvflow.executor.rank_worker import RankWorker, error_reply, rank_device

    try:
        try:
            rw = RankWorker(rank, size, config, attention_backend, init_method,
                            rank_device(config, rank, size))
        except BaseException as e:  # noqa: BLE001 - reported to the driver, then exit
            conn.send(error_reply(e))
            return
        conn.send(("ok", rw.timings))
        while True:
            try:
                method, payload = pickle.loads(conn.recv_bytes())
            except (EOFError, OSError):
                return  # the driver is gone
            if method == "shutdown":
                return
            try:
                result = rw.handle(method, payload)
            except Exception as e:  # noqa: BLE001 - the driver decides what it means
                conn.send(error_reply(e))
                continue
            conn.send(("ok", result))
    finally:
        RankWorker.close()
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


class MultiprocExecutor(RankedExecutor):
    def __init__(self, config: EngineConfig, attention_backend: Optional[str] = None):
        from kvflow.distributed import free_tcp_port

        super().__init__()
        self.size = config.parallel.tensor_parallel_size
        ctx = mp.get_context("spawn")
        init_method = f"tcp://127.0.0.1:{free_tcp_port()}"
        self._procs: list = []
        self._conns: list = []
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

    def _is_shut_down(self) -> bool:
        return not self._finalizer.alive

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

    # ------------------------------------------------------------------ liveness
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
