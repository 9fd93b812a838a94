"""Ray executor (`distributed_executor_backend="ray"`): one Ray actor per tensor-parallel rank, so
the ranks can span several nodes; the scheduler stays in the driver.

Design
------
- Cluster: join a running cluster (`ray.init(address="auto")`, or RAY_ADDRESS) when there is
  one, else start a local one (single node: the same code runs on a laptop, in CI and on a
  multi-node cluster). Ray is optional (`pip install kvflow[ray]`); it is imported only here.
- Placement: one placement group with one bundle per rank — {"GPU": 1, "CPU": 1} on CUDA,
  {"CPU": 1} otherwise — strategy PACK (fill a node before the next). Rank r's actor is pinned
  to bundle r. Ray shows each GPU actor only its own GPU, so every rank uses `cuda:0` locally.
- Rendezvous: rank 0's actor reports its node IP and a free port; every actor then joins the
  process group at tcp://ip:port (NCCL on CUDA, gloo on CPU) and builds its model through the
  same `RankWorker` as the multi-process workers (rank_worker.py). CPU runs are meant for one
  node (gloo is pinned to the loopback interface, see kvflow/distributed.py).
- Control plane: the request is pickled ONCE and `ray.put` once; every actor's `call` gets the
  same object reference (each node fetches the bytes once from the object store). Rank 0
  returns the result, others an ack — the protocol of `RankedExecutor` (ranked.py), which also
  carries rank 0's sampled tokens to the other ranks with the next step.
- Failure model: each actor runs a `sentinel` method in its own concurrency group that never
  returns; when the actor dies (crash, kill, node loss) Ray fails it, like a process sentinel.
  `_gather` waits on the step replies and the sentinels together, so a dead rank is seen while
  its peers are stuck in a collective: the executor is then dead (all actors killed,
  ExecutorDeadError now and from every later call). `workers_alive` polls the sentinels without
  blocking (server health check, any thread). Exceptions inside a step follow the multi-process
  rules (re-raised when every rank answers within the grace period, else dead).
- Shutdown kills the actors and removes the placement group (idempotent, also on collection);
  a local cluster this executor started is left to Ray's own exit hook, so later engines in the
  process reuse it.
"""
from __future__ import annotations

import logging
import os
import pickle
import socket
import time
import weakref
from typing import Any, Optional

from kvflow.config import EngineConfig
from kvflow.executor.ranked import RankedExecutor

logger = logging.getLogger("kvflow")

_ERROR_GRACE_S = 10.0
_STARTUP_TIMEOUT_S = float(os.environ.get("KVFLOW_WORKER_STARTUP_TIMEOUT", "1800"))
# How long the cluster may take to grant the placement group before we give up with an error.
_PLACEMENT_TIMEOUT_S = float(os.environ.get("KVFLOW_RAY_PLACEMENT_TIMEOUT", "120"))


def _import_ray():
    try:
        import ray
    except ImportError as e:
        raise ImportError("distributed_executor_backend='ray' needs Ray: pip install 'kvflow[ray]'"
                          ) from e
    return ray


def connect_ray(num_cpus_hint: int) -> None:
    """Join a running cluster if there is one, else start a local one. Idempotent."""
    ray = _import_ray()
    if ray.is_initialized():
        return
    try:
        ray.init(address="auto", logging_level=logging.WARNING)
        logger.info("ray: joined the running cluster")
    except ConnectionError:
        ray.init(address="local", num_cpus=max(num_cpus_hint, os.cpu_count() or 1),
                 include_dashboard=False, logging_level=logging.WARNING)
        logger.info("ray: started a local cluster")


# ---------------------------------------------------------------------------------- actor
class _RankActor:
    """Body of one rank's actor (made a Ray actor class by `_actor_class`). Replies are tuples
    ("ok", result) / ("error", exc, traceback): a raised exception would be indistinguishable
    from the actor's death on the driver side."""

    def __init__(self) -> None:
        self._rw = None

    def pid(self) -> int:
        return os.getpid()

    def rendezvous_address(self) -> str:
        """tcp://<node ip>:<free port> (rank 0 hosts the process group's TCP store)."""
        import ray
        ip = ray.util.get_node_ip_address()
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return f"tcp://{ip}:{port}"

    def start(self, rank: int, size: int, config: EngineConfig,
              attention_backend: Optional[str], init_method: str) -> tuple:
        from kvflow.executor.rank_worker import RankWorker, error_reply, rank_device
        try:
            self._rw = RankWorker(rank, size, config, attention_backend, init_method,
                                  rank_device(config, 0, size))
            return ("ok", self._rw.timings)
        except BaseException as e:  # noqa: BLE001 - reported to the driver
            return error_reply(e)

    def call(self, data: bytes) -> tuple:
        from kvflow.executor.rank_worker import error_reply
        try:
            method, payload = pickle.loads(data)
            return ("ok", self._rw.handle(method, payload))
        except Exception as e:  # noqa: BLE001 - the driver decides what it means
            return error_reply(e)

    def sentinel(self) -> None:
        """Never returns: fails (ActorDiedError) exactly when this actor dies."""
        import threading
        threading.Event().wait()


_ACTOR_CLASS = None


def _actor_class():
    global _ACTOR_CLASS
    if _ACTOR_CLASS is None:
        ray = _import_ray()

        class RankActor(_RankActor):
            @ray.method(concurrency_group="sentinel")
            def sentinel(self) -> None:
                super().sentinel()

        # The default group (every other method) stays one-at-a-time, in submission order.
        _ACTOR_CLASS = ray.remote(concurrency_groups={"sentinel": 1})(RankActor)
    return _ACTOR_CLASS


def _kill(actors: list, pg_holder: list) -> None:
    """Stop every actor and free the placement group. Safe to call twice."""
    try:
        import ray
        from ray.util.placement_group import remove_placement_group
    except ImportError:  # pragma: no cover - nothing was started without ray
        return
    if not ray.is_initialized():
        return
    for a in actors:
        try:
            ray.kill(a, no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass
    actors.clear()
    for pg in pg_holder:
        try:
            remove_placement_group(pg)
        except Exception:  # noqa: BLE001
            pass
    pg_holder.clear()


# ---------------------------------------------------------------------------------- driver
class RayExecutor(RankedExecutor):
    def __init__(self, config: EngineConfig, attention_backend: Optional[str] = None):
        super().__init__()
        ray = _import_ray()
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.size = config.parallel.tensor_parallel_size
        connect_ray(self.size)
        self._actors: list = []
        self._pg: list = []
        self._calls: list = []          # this request's reply refs, in rank order
        self._finalizer = weakref.finalize(self, _kill, self._actors, self._pg)
        try:
            gpu = config.device.type == "cuda"
            bundle = {"GPU": 1, "CPU": 1} if gpu else {"CPU": 1}
            pg = placement_group([dict(bundle) for _ in range(self.size)], strategy="PACK")
            self._pg.append(pg)
            ready, _ = ray.wait([pg.ready()], timeout=_PLACEMENT_TIMEOUT_S)
            if not ready:
                raise RuntimeError(
                    f"ray: the cluster did not grant {self.size} x {bundle} within "
                    f"{_PLACEMENT_TIMEOUT_S:.0f} s (resources: {ray.cluster_resources()})")
            cls = _actor_class()
            for rank in range(self.size):
                self._actors.append(cls.options(
                    name=None, num_cpus=bundle["CPU"], num_gpus=bundle.get("GPU", 0),
                    scheduling_strategy=PlacementGroupSchedulingStrategy(
                        placement_group=pg, placement_group_bundle_index=rank)).remote())
            self._sentinels = [a.sentinel.remote() for a in self._actors]
            self.pids: list[int] = self._get_all([a.pid.remote() for a in self._actors])
            init_method = self._get_all([self._actors[0].rendezvous_address.remote()])[0]
            self._calls = [a.start.remote(r, self.size, config, attention_backend, init_method)
                           for r, a in enumerate(self._actors)]
            self.timings: dict[str, float] = self._gather(timeout=_STARTUP_TIMEOUT_S)[0]
        except BaseException:
            self.shutdown()
            raise
        logger.info("tensor parallel over Ray: %d actors ready (pids %s)", self.size, self.pids)

    # ------------------------------------------------------------------ plumbing
    def _get_all(self, refs: list) -> list:
        """ray.get of setup calls; an actor that dies or fails to start is fatal."""
        ray = _import_ray()
        try:
            return ray.get(refs, timeout=_STARTUP_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001 - RayActorError, GetTimeoutError, ...
            raise self._die(f"a worker actor failed to start: {type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}") from None

    def _is_shut_down(self) -> bool:
        return not self._finalizer.alive

    def _broadcast(self, method: str, payload: Any) -> None:
        self._check_alive()
        ray = _import_ray()
        ref = ray.put(pickle.dumps((method, payload), protocol=pickle.HIGHEST_PROTOCOL))
        self._calls = [a.call.remote(ref) for a in self._actors]

    def _gather(self, timeout: Optional[float] = None) -> list:
        ray = _import_ray()
        from ray.exceptions import RayActorError

        pending = {ref: rank for rank, ref in enumerate(self._calls)}
        self._calls = []
        sentinels = {ref: rank for rank, ref in enumerate(self._sentinels)}
        results: dict[int, Any] = {}
        error: Optional[tuple[int, BaseException, str]] = None
        deadline = None if timeout is None else time.monotonic() + timeout
        while pending:
            if error is not None and deadline is None:
                deadline = time.monotonic() + _ERROR_GRACE_S
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _ = ray.wait(list(pending) + list(sentinels), num_returns=1, timeout=remaining)
            if not ready:
                what = (f"rank(s) {sorted(pending.values())} did not finish the step after rank "
                        f"{error[0]} failed:\n{error[2]}") if error else \
                    f"rank(s) {sorted(pending.values())} did not answer within {timeout:.0f} s"
                raise self._die(what)
            ref = ready[0]
            if ref in sentinels:
                raise self._die(self._death_reason(sentinels[ref], ref))
            rank = pending.pop(ref)
            try:
                msg = ray.get(ref)
            except RayActorError:
                raise self._die(self._death_reason(rank, self._sentinels[rank])) from None
            if msg[0] == "ok":
                results[rank] = msg[1]
            elif error is None:
                error = (rank, msg[1], msg[2])
        if error is not None:
            rank, exc, tb = error
            logger.error("worker rank %d failed:\n%s", rank, tb)
            raise exc
        return [results[r] for r in range(self.size)]

    def _death_reason(self, rank: int, sentinel) -> str:
        ray = _import_ray()
        try:
            ray.get(sentinel, timeout=5)
            detail = "sentinel returned"
        except Exception as e:  # noqa: BLE001 - the expected ActorDiedError (or a timeout)
            lines = str(e).strip().splitlines()
            detail = f"{type(e).__name__}: {lines[0] if lines else ''}"
        pid = self.pids[rank] if getattr(self, "pids", None) else "?"
        return f"worker rank {rank} (Ray actor, pid {pid}) died ({detail})"

    # ------------------------------------------------------------------ liveness
    def workers_alive(self) -> bool:
        """Non-blocking poll of the actors' sentinels: read-only, any thread."""
        if self._dead is not None or not self._finalizer.alive:
            return False
        ray = _import_ray()
        ready, _ = ray.wait(list(self._sentinels), num_returns=1, timeout=0)
        return not ready

    def check_health(self) -> None:
        self._check_alive()
        ray = _import_ray()
        ready, _ = ray.wait(list(self._sentinels), num_returns=1, timeout=0)
        if ready:
            raise self._die(self._death_reason(self._sentinels.index(ready[0]), ready[0]))

    def shutdown(self) -> None:
        self._in_flight = None
        self._finalizer()  # runs _kill once; later calls are no-ops
