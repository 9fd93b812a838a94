"""Worker side of a multi-rank executor, shared by every way of starting the ranks (worker
processes in multiproc.py, Ray actors in ray_executor.py): join the process group, build the
ordinary `Worker`, answer the driver's requests.

Protocol (the transport only moves bytes/objects): the driver sends `(method, payload)`, pickled
once for all ranks; `RankWorker.handle` returns the result. Rank 0 returns results (RunnerOutput,
MemoryPlan); other ranks return None for a step, so the driver still learns that every rank
finished (see ranked.py). Exceptions propagate to the transport, which reports them with
`error_reply`.
"""
from __future__ import annotations

import os
import traceback
from dataclasses import replace
from typing import Any, Optional

import torch

from kvflow.config import EngineConfig


def rank_device(config: EngineConfig, cuda_index: int, size: int) -> torch.device:
    """The device of one rank: cuda:<cuda_index> on GPU (the rank under multiproc, 0 under Ray,
    which shows each actor only its own GPU); on CPU the ranks share the host's cores, and
    oversubscribing them slows every collective."""
    if config.device.type == "cuda":
        return torch.device("cuda", cuda_index)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))
    return config.device


def error_reply(e: BaseException) -> tuple:
    """("error", exception, traceback) as sent to the driver; an exception that cannot be
    pickled is replaced by a RuntimeError carrying its text."""
    import pickle
    tb = traceback.format_exc()
    try:
        pickle.dumps(e)
        return ("error", e, tb)
    except Exception:  # noqa: BLE001
        return ("error", RuntimeError(f"{type(e).__name__}: {e}"), tb)


class RankWorker:
    """One rank: in the group (TP, and EP when enabled) before the model is built, because
    layers size their shards at construction."""

    def __init__(self, rank: int, size: int, config: EngineConfig,
                 attention_backend: Optional[str], init_method: str, device: torch.device):
        from kvflow.distributed import init_tp_group
        from kvflow.worker.worker import Worker

        self.rank = rank
        config = config.replace(device=device, parallel=replace(config.parallel, rank=rank))
        init_tp_group(rank, size, init_method, device,
                      expert_parallel=config.parallel.enable_expert_parallel)
        self.worker = Worker(config, attention_backend)

    @property
    def timings(self) -> dict[str, float]:
        return dict(self.worker.timings)

    def handle(self, method: str, payload: Any) -> Any:
        worker = self.worker
        if method == "execute_model":
            so, prev_tokens = payload
            if self.rank:
                worker.apply_sampled_tokens(prev_tokens)
            out = worker.execute_model(so)
            return out if self.rank == 0 else None
        if method == "plan_memory":
            return worker.plan_memory()
        if method == "initialize_cache":
            worker.initialize_cache(payload)
            # The rank's last startup step: its long-lived objects leave the GC's scans.
            from kvflow.gc_heap import freeze_startup_heap
            freeze_startup_heap()
            return self.timings
        if method == "memory_stats":
            return worker.memory_stats(payload)
        if method == "sleeper":  # sleep mode: (name, args) on the SleepManager
            name, args = payload
            attr = getattr(worker.sleeper, name)
            return attr(*args) if callable(attr) else attr
        raise ValueError(f"unknown worker method {method!r}")

    @staticmethod
    def close() -> None:
        from kvflow.distributed import destroy_tp_group
        try:
            destroy_tp_group()
        except Exception:  # noqa: BLE001 - exiting anyway
            pass
