"""Compile the Triton kernels a startup will need in parallel processes, before it needs them.

Why: on a machine whose Triton cache is cold (a fresh container, a new kvflow or Triton
version) the kernel warm-up and the CUDA-graph capture compile a few hundred kernel
specializations one after another in the engine's process: 35-80 s of an 8B / 8x7B model's
startup on an H200 host (docs/performance.md, session 22), against ~1 s once the cache is warm.
Triton compiles on first launch and holds the GIL for much of it, so the work cannot spread over
threads; separate processes can do it.

How (three steps, each safe to fail):
1. Dry pass. The warm-up and the graph capture run their forwards once with Triton's
   `jit_cache_hook` set: a launch that would compile records its specialization (Triton's own
   serialized form, the one `JITFunction.preload` reads) and is skipped instead. Kernels
   already compiled, or found in Triton's cache, run; torch ops run as usual. A skipped
   kernel leaves its outputs as they were allocated, and every CUDA allocation of the dry
   pass is zero-filled (`_ZeroAllocations`): torch ops that index with a skipped kernel's
   output (MoE expert ids, say) then read index 0, never an out-of-range garbage index,
   which would be a device-side assert that kills the process. When the first pass (the
   warm-up) finds every kernel in the cache, it was a normal warm-up and the rest is skipped.
2. Workers. `python -m kvflow.compilation.parallel_triton` subprocesses (no CUDA device:
   CUDA_VISIBLE_DEVICES is empty; the target is passed explicitly) compile those
   specializations into the same Triton cache directory. Plain subprocesses, not
   multiprocessing: spawning would re-import the user's __main__ script.
3. The real warm-up and capture then run as before; each compile is a cache hit, and anything
   the dry pass missed or a worker failed to compile is compiled there as it always was.

Correctness does not depend on this module: the cache is Triton's, keyed by its own hash of
source, signature, constants, options and toolchain, so a worker's artifact is used only where
the engine's process would have built the same one. `KVFLOW_PARALLEL_COMPILE=0` turns it off;
`KVFLOW_COMPILE_WORKERS` caps the processes (default: CPU cores - 1, at most 16).
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

logger = logging.getLogger("kvflow")

_MAX_WORKERS = 16
_WORKER_TIMEOUT_S = 900


@dataclass
class PrecompileStats:
    specializations: int = 0      # distinct ones the dry pass recorded
    compiled: int = 0             # built by the workers (or found in the cache)
    failed: list[str] = field(default_factory=list)   # "module.name: error", first lines
    workers: int = 0
    dry_s: float = 0.0
    compile_s: float = 0.0
    dry_errors: list[str] = field(default_factory=list)


def enabled() -> bool:
    return os.environ.get("KVFLOW_PARALLEL_COMPILE", "1") != "0"


def num_workers(n_tasks: int, ranks_per_host: int = 1) -> int:
    """Processes for n_tasks compiles: the CPU cores less one, at most 16, shared by the ranks
    of one host (each rank of a TP group precompiles the same kernels)."""
    cap = os.environ.get("KVFLOW_COMPILE_WORKERS")
    limit = (int(cap) if cap else
             min(_MAX_WORKERS, max(1, ((os.cpu_count() or 2) - 1) // max(1, ranks_per_host))))
    return max(0, min(limit, n_tasks))


class _Recorder:
    """Triton's jit_cache_hook for the dry pass. A specialization already in Triton's cache is
    left alone (Triton loads it and the launch runs for real); any other is recorded and its
    launch skipped (a True return tells Triton not to compile, and run() then returns before
    launching)."""

    def __init__(self, target: tuple | None):
        self.target = target
        self.tasks: dict[tuple[str, str, str], str] = {}

    def __call__(self, *, key, repr, fn, compile, is_manual_warmup, already_compiled):
        spec = compile["specialization_data"]
        if self.target is not None:
            try:
                if in_cache(fn.jit_function, spec, self.target):
                    return None
            except Exception:  # noqa: BLE001 - Triton internals moved: treat it as a miss
                self.target = None
        self.tasks.setdefault((fn.module, fn.name, str(key)), spec)
        return True


def _zero_allocations():
    """A TorchDispatchMode that zero-fills every tensor the empty* ops allocate."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    aten = torch.ops.aten
    empties = {aten.empty.memory_format, aten.empty_like.default, aten.empty_strided.default,
               aten.new_empty.default, aten.new_empty_strided.default}

    class _ZeroAllocations(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func in empties and isinstance(out, torch.Tensor):
                out.zero_()             # the mode is off inside this handler: no recursion
            return out

    return _ZeroAllocations()


def record_specializations(passes: Iterable[Callable[[], None]],
                           errors: list[str] | None = None, target: tuple | None = None,
                           stop_if_first_is_warm: bool = False) -> list[tuple[str, str, str]]:
    """Run each pass with Triton's compile-and-launch of uncached kernels replaced by
    recording; returns [(module, qualname, specialization JSON)]. target: check Triton's cache
    for this target first (None: record every specialization this process has not compiled).
    A pass that raises (host code that read a skipped kernel's garbage output) stops there:
    what it recorded so far is kept. stop_if_first_is_warm: when the first pass records
    nothing, the cache is warm (a restart): the first pass ran for real and the rest are
    skipped."""
    from triton import knobs
    rec = _Recorder(target)
    previous = knobs.runtime.jit_cache_hook
    knobs.runtime.jit_cache_hook = rec
    try:
        for i, run_pass in enumerate(passes):
            try:
                with _zero_allocations():
                    run_pass()
            except Exception as e:  # noqa: BLE001 - any failure only shortens the dry pass
                if errors is not None:
                    errors.append(f"{type(e).__name__}: {str(e)[:200]}")
            if i == 0 and stop_if_first_is_warm and not rec.tasks:
                break
    finally:
        knobs.runtime.jit_cache_hook = previous
    return [(m, n, spec) for (m, n, _), spec in rec.tasks.items()]


def _worker_env(cache_dir: str) -> dict[str, str]:
    import kvflow
    env = dict(os.environ)
    env["CUDA_VISIBLE_DEVICES"] = ""          # compile only: no context, no device memory
    env["TRITON_CACHE_DIR"] = cache_dir
    env.pop("TRITON_INTERPRET", None)
    root = os.path.dirname(os.path.dirname(os.path.abspath(kvflow.__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in
                                                  env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def compile_in_workers(tasks: list[tuple[str, str, str]], target: tuple,
                       cache_dir: str, workers: int,
                       timeout_s: float = _WORKER_TIMEOUT_S) -> tuple[int, list[str]]:
    """Compile `tasks` in `workers` subprocesses (task i goes to worker i % workers, the
    recorded order spreading each kernel's variants); returns (compiled, failures)."""
    if not tasks or workers < 1:
        return 0, []
    env = _worker_env(cache_dir)
    procs = []
    for w in range(workers):
        payload = json.dumps({"target": list(target), "tasks": tasks[w::workers]})
        p = subprocess.Popen([sys.executable, "-m", "kvflow.compilation.parallel_triton"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, env=env, text=True)
        procs.append((p, payload))
    compiled, failed = 0, []
    deadline = time.monotonic() + timeout_s
    for p, payload in procs:
        try:
            out, err = p.communicate(payload, timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.communicate()
            failed.append("worker timed out")
            continue
        try:
            result = json.loads(out.strip().splitlines()[-1])
        except (ValueError, IndexError):
            failed.append(f"worker exited {p.returncode}: {err.strip()[-300:]}")
            continue
        compiled += result["compiled"]
        failed.extend(result["failed"])
        logger.debug("Triton precompile worker: %.1f s, slowest %s", result["wall_s"],
                     sorted(result["times"], key=lambda t: -t[1])[:3])
    return compiled, failed


def current_target() -> tuple:
    from triton.runtime import driver
    t = driver.active.get_current_target()
    return (t.backend, t.arch, t.warp_size)


def precompile(passes: list[Callable[[], None]], sync: Callable[[], None] | None = None,
               ranks_per_host: int = 1) -> PrecompileStats:
    """Steps 1 and 2 of the module doc for `passes` (callables running the forwards a startup
    will run). Afterwards the caller runs those forwards for real, except when the first pass
    found everything in the cache (stats.specializations == 0): then it was the real run."""
    from triton import knobs
    stats = PrecompileStats()
    t0 = time.perf_counter()
    target = current_target()
    tasks = record_specializations(passes, stats.dry_errors, target, stop_if_first_is_warm=True)
    dump = os.environ.get("KVFLOW_PRECOMPILE_DUMP")
    if dump:   # for diagnosis: the worker input, replayable by `python -m ... < dump`
        with open(dump, "w") as f:
            json.dump({"target": list(target), "tasks": tasks}, f)
    if sync is not None:
        sync()
    stats.dry_s = time.perf_counter() - t0
    stats.specializations = len(tasks)
    stats.workers = num_workers(len(tasks), ranks_per_host)
    t1 = time.perf_counter()
    stats.compiled, stats.failed = compile_in_workers(tasks, target, knobs.cache.dir,
                                                      stats.workers)
    stats.compile_s = time.perf_counter() - t1
    return stats


# ------------------------------------------------------------------------------- worker side
def _resolve(module: str, qualname: str):
    import importlib
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _decode(fn, spec_json: str, target: tuple):
    """(ASTSource, GPUTarget, backend, parsed options) of a recorded specialization, decoded as
    JITFunction.preload does, for an explicit target instead of the current device's."""
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    d = json.loads(spec_json)
    constexprs = {
        tuple(k): (tl.dtype(v) if tl.dtype.is_dtype(v) else
                   tl.constexpr(v["constexpr"]) if isinstance(v, dict) and "constexpr" in v else v)
        for k, v in zip(d["constant_keys"], d["constant_vals"])}
    attrs = {tuple(k): v for k, v in zip(d["attrs_keys"], d["attrs_vals"])}
    signature = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d["signature"].items()}
    options = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d["options"].items()}
    gpu = GPUTarget(*target)
    backend = make_backend(gpu)
    src = ASTSource(fn, signature, constexprs, attrs)
    return src, gpu, backend, backend.parse_options(dict(options, **src.parse_options()))


def in_cache(fn, spec_json: str, target: tuple) -> bool:
    """Whether triton.compile would find this specialization in its cache (its own key and
    lookup, triton/compiler/compiler.py)."""
    import hashlib

    from triton.compiler.compiler import get_cache_invalidating_env_vars, get_cache_key
    from triton.runtime.cache import get_cache_manager
    src, _, backend, opts = _decode(fn, spec_json, target)
    key = get_cache_key(src, backend, opts, env_vars=get_cache_invalidating_env_vars())
    name = f"{src.name[:150]}.json"
    group = get_cache_manager(hashlib.sha256(key.encode("utf-8")).hexdigest()).get_group(name)
    return bool(group) and name in group


def compile_specialization(fn, spec_json: str, target: tuple):
    """Build one recorded specialization for `target` (backend, arch, warp size) without a
    device."""
    import triton
    src, gpu, _, opts = _decode(fn, spec_json, target)
    return triton.compile(src, target=gpu, options=opts.__dict__)


def _worker_main() -> None:
    t0 = time.perf_counter()
    job = json.loads(sys.stdin.read())
    target = tuple(job["target"])
    compiled, failed, times = 0, [], []
    for module, qualname, spec in job["tasks"]:
        t1 = time.perf_counter()
        try:
            compile_specialization(_resolve(module, qualname), spec, target)
            compiled += 1
        except Exception as e:  # noqa: BLE001 - reported; the engine compiles it itself
            first = (str(e).splitlines() or [""])[0][:200]
            failed.append(f"{module}.{qualname}: {type(e).__name__}: {first}")
        times.append([qualname, round(time.perf_counter() - t1, 3)])
    sys.stdout.write("\n" + json.dumps({"compiled": compiled, "failed": failed, "times": times,
                                         "wall_s": round(time.perf_counter() - t0, 3)}) + "\n")


if __name__ == "__main__":
    _worker_main()
