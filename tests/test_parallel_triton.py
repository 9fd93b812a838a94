"""kvflow/compilation/parallel_triton.py: specializations recorded in a dry pass are compiled by
worker processes into Triton's cache, where the engine's own compile then finds them.

On CPU the workers compile for an sm90 target (Triton builds the cubin with its bundled ptxas,
no device needed); the GPU test checks the part only a device can: that a real launch after
the workers' build is a cache hit, i.e. that the workers reproduce the engine process's key."""
from __future__ import annotations

import os

import pytest
import torch

from kvflow.compilation import parallel_triton as pt
from tests import parallel_triton_kernels as k

SM90 = ("cuda", 90, 32)
MODULE = "tests.parallel_triton_kernels"


def _artifacts(cache_dir) -> set[str]:
    return {os.path.join(d, f) for d, _, files in os.walk(cache_dir) for f in files}


def test_workers_fill_the_cache_and_a_second_build_only_hits(tmp_path):
    tasks = [(MODULE, "scale_kernel", k.spec(b)) for b in (64, 128, 256)]
    compiled, failed = pt.compile_in_workers(tasks, SM90, str(tmp_path), workers=2)
    assert (compiled, failed) == (3, [])
    first = _artifacts(tmp_path)
    assert sum(f.endswith(".cubin") for f in first) == 3      # one binary per BLOCK
    # The same specializations from other processes: every one found, nothing new written.
    compiled, failed = pt.compile_in_workers(tasks, SM90, str(tmp_path), workers=3)
    assert (compiled, failed) == (3, []) and _artifacts(tmp_path) == first


def test_a_task_that_cannot_build_is_reported_not_raised(tmp_path):
    tasks = [(MODULE, "no_such_kernel", k.spec(64)), (MODULE, "scale_kernel", k.spec(32)),
             ("kvflow.no_such_module", "x", k.spec(32))]
    compiled, failed = pt.compile_in_workers(tasks, SM90, str(tmp_path), workers=1)
    assert compiled == 1
    assert len(failed) == 2 and "no_such_kernel" in failed[0] and "no_such_module" in failed[1]


def test_worker_count_follows_cores_ranks_and_the_override(monkeypatch):
    monkeypatch.delenv("KVFLOW_COMPILE_WORKERS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert pt.num_workers(500) == 16 and pt.num_workers(3) == 3 and pt.num_workers(0) == 0
    assert pt.num_workers(500, ranks_per_host=8) == 7
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert pt.num_workers(500) == 1
    monkeypatch.setenv("KVFLOW_COMPILE_WORKERS", "4")
    assert pt.num_workers(500) == 4
    monkeypatch.setenv("KVFLOW_PARALLEL_COMPILE", "0")
    assert not pt.enabled()


def test_a_failing_dry_pass_keeps_its_records_and_restores_the_hook():
    from triton import knobs
    before = knobs.runtime.jit_cache_hook
    seen = []

    def fails():
        seen.append(knobs.runtime.jit_cache_hook)
        raise RuntimeError("host code read a skipped kernel's output")

    errors = []
    assert pt.record_specializations([fails, lambda: seen.append(1)], errors) == []
    assert isinstance(seen[0], pt._Recorder) and seen[1] == 1      # the next pass still ran
    assert errors == ["RuntimeError: host code read a skipped kernel's output"]
    assert knobs.runtime.jit_cache_hook is before


@pytest.mark.gpu
def test_engine_launch_after_the_workers_is_a_cache_hit(tmp_path, monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from triton import knobs
    monkeypatch.setattr(knobs.cache, "dir", str(tmp_path))
    x = torch.arange(1000, dtype=torch.float32, device="cuda")
    y = torch.zeros_like(x)
    block = 1024             # a BLOCK no other test compiles: not in this process's memory

    def launch():
        k.scale_kernel[(triton_cdiv(1000, block),)](x, y, 1000, 2.0, BLOCK=block)

    tasks = pt.record_specializations([launch])
    torch.cuda.synchronize()
    assert len(tasks) == 1 and not y.any()        # recorded, not launched
    compiled, failed = pt.compile_in_workers(tasks, pt.current_target(), str(tmp_path), 1)
    assert (compiled, failed) == (1, [])
    built = _artifacts(tmp_path)
    launch()
    torch.cuda.synchronize()
    assert torch.equal(y, 2 * x)
    # Loaded from the workers' build: no kernel artifact is new (the first launch of a
    # signature also builds its C launcher stub, a separate cache entry).
    new = {f for f in _artifacts(tmp_path) - built if "__triton_launcher" not in f}
    assert not new, new


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def test_in_cache_uses_tritons_own_key(tmp_path, monkeypatch):
    """The engine-side check (is this specialization already built?) against what a worker
    built: a compiled-mode twin of the kernel module stands in for the engine's kernel."""
    import importlib.util

    from triton import knobs
    monkeypatch.setattr(knobs.runtime, "interpret", False)
    monkeypatch.setattr(knobs.cache, "dir", str(tmp_path))
    spec = importlib.util.spec_from_file_location("parallel_triton_kernels_jit", k.__file__)
    twin = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(twin)
    fn = twin.scale_kernel
    assert not pt.in_cache(fn, k.spec(128), SM90)
    assert pt.compile_in_workers([(MODULE, "scale_kernel", k.spec(128))], SM90,
                                 str(tmp_path), workers=1) == (1, [])
    assert pt.in_cache(fn, k.spec(128), SM90)
    assert not pt.in_cache(fn, k.spec(256), SM90)           # another BLOCK: another binary
    assert not pt.in_cache(fn, k.spec(128), ("cuda", 80, 32))   # another architecture


def test_dry_pass_allocations_are_zeros():
    """What makes a skipped kernel's output safe to index with (see the module doc)."""
    def allocate():
        seen.extend([torch.empty(64, dtype=torch.int64), torch.empty_like(torch.ones(8)),
                     torch.ones(3).new_empty((5,)), torch.empty_strided((4, 4), (1, 4))])
    seen = []
    for fill in (7, -1):                      # dirty the allocator's free blocks first
        torch.full((4096,), fill)
    pt.record_specializations([allocate])
    assert len(seen) == 4 and all(not t.any() for t in seen)


_ENGINE_SCRIPT = """
import json, sys
from kvflow import LLM, SamplingParams
path, prompts = sys.argv[1], json.loads(sys.argv[2])
llm = LLM(path, skip_tokenizer_init=True, device="cuda", dtype="bfloat16", max_model_len=2048,
          max_num_batched_tokens=2048, max_num_seqs=16, kv_cache_memory=256 << 20)
outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                    SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
print(json.dumps({"tokens": [o.outputs[0].token_ids for o in outs],
                  "timings": llm.llm_engine.startup_timings()}))
"""


@pytest.mark.gpu
def test_engine_cold_start_with_and_without_workers_gives_the_same_tokens(tmp_path):
    """A fresh process on an empty Triton cache, three times: workers on (dry pass, build,
    warm-up from the cache), workers off (every kernel compiled in-process), and workers on
    over the first run's cache (a restart: no dry pass beyond the warm-up). A Qwen3-MoE with
    128 experts and 2048-token steps takes the torch alignment path, which indexes with the
    router kernel's output: the dry pass must not feed it garbage."""
    import json
    import subprocess
    import sys
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from tests.conftest import save_hf_model
    from tests.test_moe import make_hf_moe
    path = save_hf_model(make_hf_moe("qwen3_moe", num_experts=128, num_experts_per_tok=8,
                                     moe_intermediate_size=48), tmp_path / "m")
    prompts = [[(7 * i + j) % 300 for j in range(n)] for i, n in enumerate((5, 40, 300, 1))]

    def run(cache: str, workers_on: bool) -> dict:
        env = dict(os.environ, TRITON_CACHE_DIR=str(tmp_path / cache),
                   KVFLOW_PARALLEL_COMPILE="1" if workers_on else "0")
        r = subprocess.run([sys.executable, "-c", _ENGINE_SCRIPT, path, json.dumps(prompts)],
                           env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        return json.loads(r.stdout.strip().splitlines()[-1])

    cold = run("a", True)
    serial = run("b", False)
    restart = run("a", True)
    assert cold["tokens"] == serial["tokens"] == restart["tokens"]
    assert cold["timings"]["triton_precompile_s"] > 0
    assert "triton_precompile_s" not in serial["timings"]
    assert "triton_precompile_s" not in restart["timings"]      # the cache was warm
