"""Driver side of a multi-rank executor, independent of how the ranks are started.

Subclasses (multiproc.py: local processes and pipes; ray_executor.py: Ray actors) provide the
transport — `_broadcast` (one request, serialised once, to every rank), `_gather` (one reply per
rank, or ExecutorDeadError) — plus liveness and shutdown. Everything the engine calls is here,
so both backends behave the same:

- Every rank runs every step in full (the collectives are inside the model's layers), including
  sampling. Only rank 0's tokens count: `resolve` returns rank 0's RunnerOutput and the next
  `launch` sends rank 0's tokens of the previous step along with the new SchedulerOutput; ranks
  > 0 overwrite their host token history with them (`Worker.apply_sampled_tokens`) before
  running the step. Greedy and seeded sampling agree on all ranks anyway; this keeps unseeded
  random sampling (whose RNG stream is not guaranteed equal across ranks) and penalties exact.
- Steps are synchronous: `launch` sends, `resolve` waits for all replies, and a second `launch`
  before `resolve` is refused. The engine's overlapped (async) scheduling is therefore switched
  off for these executors (config.py): it would schedule step N+1 before rank 0's token of step
  N is known to the other ranks.
- Once dead (a rank exited or stopped answering) every call raises ExecutorDeadError; LLMEngine
  lets it escape step() and the async engine reports itself unhealthy (server health: 503).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional

from kvflow.core.sched_output import RunnerOutput, SchedulerOutput
from kvflow.executor import ExecutorDeadError

logger = logging.getLogger("kvflow")

_UNKNOWN = object()


@dataclass
class StepHandle:
    so: SchedulerOutput


class RankedExecutor:
    size: int
    timings: dict[str, float]

    def __init__(self) -> None:
        self._dead: Optional[str] = None
        self._in_flight: Optional[StepHandle] = None
        # Rank 0's tokens of the last completed step, sent with the next step.
        self._last_sampled: dict[str, list[int]] = {}
        self._serving_error: Any = _UNKNOWN
        self._is_sleeping: Any = _UNKNOWN

    # ------------------------------------------------------------------ transport (subclasses)
    def _broadcast(self, method: str, payload: Any) -> None:
        raise NotImplementedError

    def _gather(self, timeout: Optional[float] = None) -> list:
        """One reply per rank, in rank order. Raises ExecutorDeadError (via `_die`) when a rank
        exits or does not answer; re-raises a rank's exception when every rank answered."""
        raise NotImplementedError

    def workers_alive(self) -> bool:
        """Read-only, safe from a thread other than the one driving steps (health checks)."""
        raise NotImplementedError

    def check_health(self) -> None:
        raise NotImplementedError

    def shutdown(self) -> None:
        raise NotImplementedError

    def _is_shut_down(self) -> bool:
        raise NotImplementedError

    # ------------------------------------------------------------------ death
    def _die(self, reason: str) -> ExecutorDeadError:
        """Mark the executor dead, stop every worker, return the error to raise."""
        if self._dead is None:
            self._dead = reason
            logger.error("%s is dead: %s", type(self).__name__, reason)
        self.shutdown()
        return ExecutorDeadError(f"the engine's workers are dead: {self._dead}")

    def _check_alive(self) -> None:
        if self._dead is not None:
            raise ExecutorDeadError(f"the engine's workers are dead: {self._dead}")
        if self._is_shut_down():
            raise ExecutorDeadError("the executor was shut down")

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

    def launch(self, so: SchedulerOutput) -> StepHandle:
        if self._in_flight is not None:
            raise RuntimeError("a multi-rank executor runs one step at a time "
                               "(async scheduling is off with several ranks)")
        self._broadcast("execute_model", (so, self._last_sampled))
        self._last_sampled = {}
        self._in_flight = StepHandle(so)
        return self._in_flight

    def resolve(self, handle: StepHandle) -> RunnerOutput:
        if handle is not self._in_flight:
            raise RuntimeError("resolve() of a step that is not in flight")
        self._in_flight = None
        out: RunnerOutput = self._gather()[0]
        self._last_sampled = {r: t for r, t in out.sampled_token_ids.items() if t}
        return out

    def execute_model(self, so: SchedulerOutput) -> RunnerOutput:
        return self.resolve(self.launch(so))

    def memory_stats(self, reset: bool = False) -> list[dict[str, int]]:
        """Each rank's device memory peaks (Worker.memory_stats), in rank order."""
        self._broadcast("memory_stats", reset)
        return self._gather()

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
