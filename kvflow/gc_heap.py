"""Python's garbage collector and the objects that live as long as the engine.

After startup a serving process holds 0.3-1 M objects that the cyclic collector tracks (torch,
Triton and transformers internals, the model's modules, compiled-kernel caches) and that live as
long as the engine. A full (generation 2) collection walks all of them: 140-190 ms, during which
the host launches nothing. On an H200, Qwen3-0.6B's throughput8k run triggered four such
collections, 0.69 s of the device idling in an 8 s run
(benchmarks/results/profiles/workload-*-da67ccc-t8k-nvidia-h200.json). After startup the
engine therefore freezes the heap (gc.freeze: the objects move to a permanent generation that
collections skip), as vLLM's engine core does; later collections walk only what was created
since (requests, outputs).

With the startup objects frozen, CPython's guard against frequent full collections (one runs
only when the objects that survived since the last one exceed a quarter of the long-lived
ones) no longer holds them back: every 10th generation-1 collection became a full one, ten in
the same run, 19 ms each, walking every live request's objects. The engine raises that 10 to
KVFLOW_GC_GEN2_THRESHOLD (default 100): young cyclic garbage is still collected by the
generation 0 and 1 passes.

Invariant that makes this safe: an engine (and its model's weights) is freed by reference
counting alone once the user drops it -- no reference cycles run through the model, the worker
or the runner (parameters' loaders refer to their modules weakly, layers/loader_ref.py;
tests/test_gc_heap.py checks it). A frozen cycle would never be collected.
KVFLOW_GC_FREEZE=0 turns the freeze off.
"""
from __future__ import annotations

import gc
import logging

from kvflow import envs

logger = logging.getLogger("kvflow")


def freeze_startup_heap() -> None:
    """Collect startup garbage, then freeze every object alive now (end of engine startup)."""
    if not envs.gc_freeze():
        return
    gc.collect()
    gc.freeze()
    g0, g1, g2 = gc.get_threshold()
    gc.set_threshold(g0, g1, max(g2, envs.gc_gen2_threshold()))
    logger.debug("froze %d startup objects out of the garbage collector's scans",
                 gc.get_freeze_count())


def full_collect() -> None:
    """A collection that also sees the frozen objects (sleep mode releasing device memory):
    unfreeze, collect, freeze again what survives."""
    frozen = gc.get_freeze_count() > 0
    if frozen:
        gc.unfreeze()
    gc.collect()
    if frozen:
        gc.freeze()
