"""Executors run the model for the engine: in-process (one device), one worker process per
tensor-parallel rank on this host (multiproc.py), or one Ray actor per rank (ray_executor.py,
several nodes). All expose plan_memory, initialize_cache, launch/resolve, execute_model,
check_health, shutdown and a `timings` dict."""
from __future__ import annotations


class ExecutorDeadError(RuntimeError):
    """A worker process died (or stopped answering): no step can run any more. LLMEngine lets
    this escape step() instead of failing only that step's requests."""


def make_executor(config, attention_backend=None):
    backend = config.parallel.executor_backend   # validated in config.py
    if backend == "ray":
        from kvflow.executor.ray_executor import RayExecutor
        return RayExecutor(config, attention_backend)
    if backend == "mp":
        from kvflow.executor.multiproc import MultiprocExecutor
        return MultiprocExecutor(config, attention_backend)
    from kvflow.executor.uniproc import UniProcExecutor
    return UniProcExecutor(config, attention_backend)
