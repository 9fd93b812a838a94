"""torch.compile of the model forward and the compile cache that can never be stale.

One tiny Llama is compiled for real (inductor; the C++ backend on CPU) a handful of times; the
compiled results are shared through one module-scoped cache directory. Covered: the key covers
every config field; every factor flips the key; a second compile of the same config is a hit
that compiles nothing; corrupt, truncated and foreign entries are logged, discarded and rebuilt
with outputs still equal to eager; two processes compiling one key at once both succeed.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import multiprocessing as mp
import os
import shutil

import numpy as np
import pytest
import torch

from kvflow.attention.backend import AttentionMetadata
from kvflow.compilation import cache_key
from kvflow.compilation import compile as compile_mod
from kvflow.compilation.cache_key import compute_factors, key_of
from kvflow.compilation.compile import compile_factors_extra, compile_model
from kvflow.compilation.store import CompileStore, CorruptEntry
from kvflow.config import CacheConfig, create_engine_config
from kvflow.forward_context import set_forward_context
from tests.conftest import DEVICE

# Compiled vs eager logits in fp32. On CPU they agree to rounding. On CUDA even the eager paths
# disagree among themselves by ~5e-3 (fused Triton elementwise kernels vs the torch ops, with
# either attention backend; seen on an H200 with torch 2.11, matmuls in true fp32), so there the
# check is looser.
TOL = 1e-5 if DEVICE == "cpu" else 2e-2

# (tokens already in the KV cache, tokens computed this step) per request: a fresh prefill, two
# decodes, a chunked prefill continuing a cached prefix, and a decode crossing a block boundary.
MIXED = ((0, 7), (5, 1), (19, 1), (3, 4), (15, 1))


def _build_worker(model_dir: str, **kw):
    from kvflow.worker.worker import Worker
    cfg = create_engine_config(model_dir, device=DEVICE, skip_tokenizer_init=True,
                               kv_cache_memory=8 << 20, **kw)
    worker = Worker(cfg)
    worker.initialize_cache(worker.plan_memory().num_blocks)
    return worker


def _batch(block_size: int, specs=MIXED, seed: int = 0, device=DEVICE):
    """Inputs and metadata of one step; request i owns blocks [1 + 8i, 1 + 8i + 8)."""
    rng = np.random.default_rng(seed)
    q = np.array([n for _, n in specs])
    ctx = np.array([c for c, _ in specs])
    seq = ctx + q
    nb = int(-(-seq.max() // block_size))
    table = np.array([[1 + 8 * i + j for j in range(nb)] for i in range(len(specs))], np.int32)
    pos = np.concatenate([np.arange(c, c + n) for c, n in specs])
    req = np.repeat(np.arange(len(specs)), q)
    slots = table[req, pos // block_size].astype(np.int64) * block_size + pos % block_size
    cu = np.concatenate([[0], np.cumsum(q)]).astype(np.int32)
    dev = torch.device(device)
    md = AttentionMetadata(
        num_actual_tokens=int(q.sum()), max_query_len=int(q.max()), max_seq_len=int(seq.max()),
        query_start_loc=torch.from_numpy(cu).to(dev),
        seq_lens=torch.from_numpy(seq.astype(np.int32)).to(dev),
        block_table=torch.from_numpy(table).to(dev),
        slot_mapping=torch.from_numpy(slots).to(dev),
        query_start_loc_cpu=torch.from_numpy(cu), seq_lens_cpu=torch.from_numpy(seq.astype(np.int32)),
        is_decode_only=bool((q == 1).all()))
    ids = torch.from_numpy(rng.integers(0, 384, size=int(q.sum()))).to(dev)
    return ids, torch.from_numpy(pos).to(dev), md


def _run(worker, fn, specs=MIXED, seed=0):
    """(logits, KV caches after the step) of fn on a batch over a random (seeded) KV cache, so
    cached prefixes hold data and the cache writes are compared too."""
    gen = torch.Generator().manual_seed(seed)
    for cache in worker.runner.kv_caches:
        cache.copy_(torch.randn(cache.shape, generator=gen, dtype=cache.dtype))
    with torch.inference_mode():  # inputs are inference tensors, as the runner's
        ids, pos, md = _batch(worker.config.cache.block_size, specs, seed, worker.device)
        with set_forward_context(md):
            logits = worker.model.compute_logits(fn(ids, pos))
    # float32: numpy has no bfloat16 (the GPU run's dtype), and the comparisons are in fp32.
    return logits.float().cpu(), [c.cpu().clone() for c in worker.runner.kv_caches]


def _assert_same_as_eager(worker, compiled, specs=MIXED, seed=0, tol=TOL):
    ref_logits, ref_caches = _run(worker, worker.model, specs, seed)
    logits, caches = _run(worker, compiled, specs, seed)
    torch.testing.assert_close(logits, ref_logits, atol=tol, rtol=tol)
    for got, ref in zip(caches, ref_caches):
        torch.testing.assert_close(got, ref, atol=tol, rtol=tol)


@pytest.fixture(scope="module", autouse=True)
def _room_for_many_compiles():
    # Every compile_model call adds one dynamo cache entry on the model's forward; this module
    # compiles the same model more often than the default recompile limit allows.
    with torch._dynamo.config.patch(recompile_limit=64):
        yield


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("compile-store"))


@pytest.fixture(scope="module")
def worker(tiny_llama):
    return _build_worker(tiny_llama[1])


@pytest.fixture(scope="module")
def base(worker, root):
    """The first compile of the tiny model: a miss that publishes the entry."""
    return compile_model(worker.model, worker.config, cache_dir=root)


def _factors(worker, config=None):
    return compute_factors(config or worker.config, torch.device(DEVICE),
                           compile_factors_extra(worker.model))


# ------------------------------------------------------------------------------ the key
def test_every_config_field_is_classified(worker):
    assert cache_key.unclassified_fields(worker.config) == []
    assert cache_key.stale_classifications(worker.config) == []
    assert not set(cache_key.KEYED) & set(cache_key.IGNORED)
    assert all(reason.strip() for reason in cache_key.IGNORED.values())
    factors = _factors(worker)
    for path in cache_key.KEYED:
        assert f"config.{path}" in factors
    for path in cache_key.IGNORED:
        assert f"config.{path}" not in factors


@dataclasses.dataclass(frozen=True)
class _CacheConfigPlusKnob(CacheConfig):
    new_knob: int = 3


@dataclasses.dataclass(frozen=True)
class _CacheConfigPlusObject(CacheConfig):
    hook: object = dataclasses.field(default_factory=object)


def test_new_config_field_fails_classification_and_is_keyed_meanwhile(worker, caplog):
    cfg = worker.config.replace(cache=_CacheConfigPlusKnob(**vars(worker.config.cache)))
    new = set(cache_key.unclassified_fields(cfg)) - set(cache_key.unclassified_fields(worker.config))
    assert new == {"cache.new_knob"}
    with caplog.at_level(logging.WARNING, logger="kvflow"):
        factors = _factors(worker, cfg)
    assert factors["config.cache.new_knob"] == 3      # the safe side: keyed until classified
    assert "cache.new_knob is not classified" in caplog.text
    flipped = worker.config.replace(cache=_CacheConfigPlusKnob(**vars(worker.config.cache),
                                                               new_knob=4))
    assert key_of(_factors(worker, flipped)) != key_of(factors)


def test_field_of_unknown_kind_raises(worker):
    cfg = worker.config.replace(cache=_CacheConfigPlusObject(**vars(worker.config.cache)))
    with pytest.raises(TypeError, match="cache.hook"):
        _factors(worker, cfg)


def _flip_config(**sub):
    """sub: {sub-config: {field: new value, or a function of the current value}}."""
    def flip(worker, monkeypatch):
        (name, changes), = sub.items()
        current = getattr(worker.config, name)
        changes = {k: v(getattr(current, k)) if callable(v) else v for k, v in changes.items()}
        return worker.config.replace(**{name: dataclasses.replace(current, **changes)})
    return flip


def _flip_env(name, value):
    def flip(worker, monkeypatch):
        monkeypatch.setenv(name, value)
        return worker.config
    return flip


def _flip_attr(target, name, value):
    def flip(worker, monkeypatch):
        monkeypatch.setattr(target, name, value)
        return worker.config
    return flip


def _flip_hf(**changes):
    def flip(worker, monkeypatch):
        hf = dict(worker.config.model.hf_config, **changes)
        return worker.config.replace(model=dataclasses.replace(worker.config.model, hf_config=hf))
    return flip


KEYED_FLIPS = {
    "block_size": _flip_config(cache=dict(block_size=lambda b: 2 * b)),
    "dtype": _flip_config(model=dict(dtype=lambda d: torch.bfloat16 if d != torch.bfloat16
                                     else torch.float16)),
    "tp_size": _flip_config(parallel=dict(tensor_parallel_size=2)),
    "tp_rank": _flip_config(parallel=dict(rank=1)),
    "hidden_size": _flip_config(model=dict(hidden_size=lambda h: h + 64)),
    "num_layers": _flip_config(model=dict(num_hidden_layers=lambda n: n + 1)),
    "architecture": _flip_config(model=dict(architecture="MixtralForCausalLM")),
    "rope_scaling": _flip_config(model=dict(rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "max_model_len": _flip_config(model=dict(max_model_len=lambda n: n // 2)),
    "max_num_seqs": _flip_config(scheduler=dict(max_num_seqs=lambda n: n + 1)),
    "enforce_eager": _flip_config(compilation=dict(enforce_eager=True)),
    "compilation_level": _flip_config(compilation=dict(level=lambda lv: 3 - lv)),
    "hf_config_switch": _flip_hf(mlp_bias=True),
    "torch_version": _flip_attr(torch, "__version__", "2.11.0+cu128"),
    "kvflow_sources": _flip_attr(cache_key, "kvflow_source_hash", lambda: "0" * 64),
    "kvflow_version": _flip_attr(__import__("kvflow"), "__version__", "9.9.9"),
    "device_name": _flip_attr(cache_key, "device_factors",
                              lambda d: {"device.type": "cuda", "device.name": "NVIDIA H200",
                                         "device.capability": "9.0"}),
    "inductor_env": _flip_env("TORCHINDUCTOR_MAX_AUTOTUNE", "1"),
    "kvflow_env": _flip_env("KVFLOW_SOMETHING_NEW", "1"),
    "inductor_config": _flip_attr(torch._inductor.config, "max_autotune", True),
    "cpu_threads": _flip_attr(torch, "get_num_threads", lambda: 7),
}

IGNORED_FLIPS = {
    "seed": _flip_config(model=dict(seed=7)),
    "gpu_memory_utilization": _flip_config(cache=dict(gpu_memory_utilization=lambda u: u / 2)),
    "num_blocks": _flip_config(cache=dict(num_blocks=1234)),
    "prefix_caching": _flip_config(cache=dict(enable_prefix_caching=False)),
    "model_path": _flip_config(model=dict(model="/elsewhere/same-model")),
    "hf_name_or_path": _flip_hf(_name_or_path="/elsewhere"),
    "cache_dir_env": _flip_env("KVFLOW_CACHE_DIR", "/elsewhere"),
    "visible_devices": _flip_env("CUDA_VISIBLE_DEVICES", "3"),
    "commit_label_env": _flip_env("KVFLOW_COMMIT", "deadbee"),
    "step_trace_env": _flip_env("KVFLOW_STEP_TRACE", "1"),
}


@pytest.mark.parametrize("name", sorted(KEYED_FLIPS))
def test_each_keyed_factor_flips_the_key(worker, monkeypatch, name):
    if name == "cpu_threads" and DEVICE != "cpu":
        pytest.skip("the thread count is keyed for CPU code only")
    base_key = key_of(_factors(worker))
    cfg = KEYED_FLIPS[name](worker, monkeypatch)
    assert key_of(_factors(worker, cfg)) != base_key


@pytest.mark.parametrize("name", sorted(IGNORED_FLIPS))
def test_ignored_fields_keep_the_key(worker, monkeypatch, name):
    base_key = key_of(_factors(worker))
    cfg = IGNORED_FLIPS[name](worker, monkeypatch)
    assert key_of(_factors(worker, cfg)) == base_key


# ------------------------------------------------------------------------------ compile
def test_compiled_matches_eager_for_every_batch_shape(worker, base):
    from torch._dynamo.utils import counters
    assert base.compile_info.cache_hit is False and base.compile_info.graphs_compiled >= 1
    if compile_mod._HAS_UNBACKED:  # one graph serves every T, T=1 included
        assert base.compile_info.token_dim == "unbacked" and base.compile_info.graphs_compiled == 1
    graphs = counters["stats"]["unique_graphs"]
    _assert_same_as_eager(worker, base)                        # mixed prefill / decode
    _assert_same_as_eager(worker, base, specs=((9, 1),))       # T = 1
    _assert_same_as_eager(worker, base, specs=((0, 33), (2, 1)), seed=1)
    assert counters["stats"]["unique_graphs"] == graphs, "a batch shape recompiled"


def test_same_config_is_a_hit(worker, root, base, caplog):
    with caplog.at_level(logging.INFO, logger="kvflow"):
        again = compile_model(worker.model, worker.config, cache_dir=root)
    info = again.compile_info
    assert info.key == base.compile_info.key
    assert info.cache_hit and info.graphs_compiled == 0 and info.graphs_loaded >= 1
    assert "torch.compile took" in caplog.text and "compile cache hit" in caplog.text
    _assert_same_as_eager(worker, again)


@pytest.mark.parametrize("flip", ["block_size", "torch_version"])
def test_flipped_config_compiles_into_a_new_entry(worker, root, base, monkeypatch, flip):
    cfg = KEYED_FLIPS[flip](worker, monkeypatch)
    compiled = compile_model(worker.model, cfg, cache_dir=root)
    info = compiled.compile_info
    assert info.key != base.compile_info.key and not info.cache_hit
    CompileStore(root).read(info.key, _factors(worker, cfg))   # published and valid
    _assert_same_as_eager(worker, compiled)


class _BranchOnTokens(torch.nn.Module):
    """Model code that cannot be traced with an unbacked token count: a Python branch on T."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, positions):
        hidden = self.inner(input_ids, positions)
        return hidden + 0.0 if input_ids.shape[0] > 4 else hidden * 1.0

    def compute_logits(self, hidden, out=None):
        return self.inner.compute_logits(hidden, out=out)


def test_untraceable_unbacked_falls_back_to_backed_shapes(worker, tmp_path, caplog):
    model = _BranchOnTokens(worker.model)
    with caplog.at_level(logging.INFO, logger="kvflow"):
        compiled = compile_model(model, worker.config, cache_dir=str(tmp_path))
    if compile_mod._HAS_UNBACKED:
        assert "cannot be traced with an unbacked token count" in caplog.text
    assert compiled.compile_info.token_dim == "backed"
    for specs in (MIXED, ((4, 1),)):
        _assert_same_as_eager(worker, compiled, specs=specs)
    again = compile_model(model, worker.config, cache_dir=str(tmp_path))  # mode from the entry
    assert again.compile_info.cache_hit and again.compile_info.token_dim == "backed"
    _assert_same_as_eager(worker, again)


def _plant(entry_dir: str, how: str, root: str, other_key: str) -> None:
    if how == "truncated_artifacts":
        path = os.path.join(entry_dir, "artifacts.bin")
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    elif how == "flipped_inductor_library":
        lib = next(os.path.join(d, n) for d, _, names in os.walk(entry_dir) for n in sorted(names)
                   if n.endswith((".so", ".cubin", ".py")) and "locks" not in d)
        data = bytearray(open(lib, "rb").read())
        data[len(data) // 2] ^= 0xFF
        open(lib, "wb").write(bytes(data))
    elif how == "edited_factors":
        path = os.path.join(entry_dir, "factors.json")
        factors = json.load(open(path))
        factors["config.cache.block_size"] = 32
        open(path, "w").write(json.dumps(factors))
    elif how == "foreign_entry":
        # The Mixtral failure mode: an artifact compiled for another config at this key's path.
        shutil.rmtree(entry_dir)
        shutil.copytree(os.path.join(root, other_key), entry_dir)
    elif how == "missing_manifest":
        os.remove(os.path.join(entry_dir, "manifest.json"))


@pytest.mark.parametrize("how", ["truncated_artifacts", "flipped_inductor_library",
                                 "edited_factors", "foreign_entry", "missing_manifest"])
def test_corrupt_entry_is_logged_discarded_and_rebuilt(worker, root, base, how, caplog):
    key = base.compile_info.key
    store = CompileStore(root)
    factors = _factors(worker)
    if store.load(key, factors) is None:  # an earlier case left it discarded: rebuild first
        compile_model(worker.model, worker.config, cache_dir=root)
    other = next(k for k in store.keys() if k != key)
    _plant(store.entry_path(key), how, root, other)
    with pytest.raises(CorruptEntry):
        store.read(key, factors)
    with caplog.at_level(logging.WARNING, logger="kvflow"):
        compiled = compile_model(worker.model, worker.config, cache_dir=root)
    assert store.entry_path(key) in caplog.text  # logged with its path
    assert not compiled.compile_info.cache_hit
    store.read(key, factors)                      # rebuilt and valid
    _assert_same_as_eager(worker, compiled)


def _compile_in_child(model_dir: str, root: str, threads: int, barrier, queue) -> None:
    torch.set_num_threads(threads)  # CPU code is specialised to it: the parent's, to share keys
    try:
        worker = _build_worker(model_dir)
        barrier.wait(timeout=120)  # start compiling together
        compiled = compile_model(worker.model, worker.config, cache_dir=root)
        logits, _ = _run(worker, compiled)
        queue.put((compiled.compile_info.key, compiled.compile_info.cache_hit, logits.numpy()))
    except BaseException:  # noqa: BLE001 - report to the parent instead of dying silently
        import traceback
        queue.put(("error", traceback.format_exc()[-3000:], None))


def test_two_processes_compiling_one_key_both_succeed(worker, tiny_llama, tmp_path):
    root = str(tmp_path / "concurrent")
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_compile_in_child, args=(tiny_llama[1], root, torch.get_num_threads(), barrier, queue))
             for _ in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=400) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert all(r[0] != "error" for r in results), results
    assert results[0][0] == results[1][0]
    # The lock serialises the builders: one compiles and publishes, the other loads its entry.
    assert sorted(r[1] for r in results) == [False, True]
    ref, _ = _run(worker, worker.model)
    for _, _, logits in results:
        torch.testing.assert_close(torch.from_numpy(logits), ref, atol=TOL, rtol=TOL)
    key = results[0][0]
    store = CompileStore(root)
    store.read(key, _factors(worker))
    report = store.info()
    assert [e["key"] for e in report["entries"]] == [key] and report["pending"] == []
    hit = compile_model(worker.model, worker.config, cache_dir=root)  # a third process's view
    assert hit.compile_info.cache_hit and hit.compile_info.graphs_compiled == 0


# ------------------------------------------------------------------------------ store and CLI
def _fake_entry(store: CompileStore, value: int) -> str:
    factors = {"config.x": value}
    key = key_of(factors)
    with store.lock(key):
        inductor_dir = store.begin_build(key)
        with open(os.path.join(inductor_dir, "graph.py"), "w") as f:
            f.write("# compiled code")
        store.publish(key, factors, b"artifact-%d" % value)
    return key


def test_store_publish_read_and_crashed_builds(tmp_path):
    store = CompileStore(str(tmp_path))
    key = _fake_entry(store, 1)
    entry = store.read(key, {"config.x": 1})
    assert entry.artifacts == b"artifact-1"
    assert entry.manifest["inductor_files"].keys() == {"graph.py"}
    assert not [n for n in os.listdir(entry.path) if n.endswith(".tmp")]  # atomic writes
    # Stored factors that differ yet hash to the key need a hash collision; the equality guard
    # is checked by handing read() another configuration for the same key.
    with pytest.raises(CorruptEntry, match="differ"):
        store.read(key, {"config.x": 2})
    with open(os.path.join(entry.inductor_dir, "graph.py"), "w") as f:
        f.write("# damaged")
    with pytest.raises(CorruptEntry, match="graph.py"):
        store.read(key)
    # A build that died before its manifest is no entry; the next build starts clean.
    with store.lock(key):
        inductor_dir = store.begin_build(key)
    assert os.listdir(inductor_dir) == [] and store.load(key, {"config.x": 1}) is None
    with pytest.raises(CorruptEntry, match="no manifest"):
        store.read(key)
    assert store.info()["entries"][0]["status"].startswith("corrupt: no manifest")


def _cli(*argv) -> int:
    from kvflow.cli_cache import add_cache_parser
    parser = argparse.ArgumentParser()
    add_cache_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    return args.func(args)


def test_cli_info_and_clear(tmp_path, capsys):
    store = CompileStore(str(tmp_path))
    good, bad = _fake_entry(store, 1), _fake_entry(store, 2)
    with open(os.path.join(store.entry_path(bad), "artifacts.bin"), "ab") as f:
        f.write(b"!")
    assert _cli("cache", "info", "--cache-dir", str(tmp_path)) == 0
    out = capsys.readouterr().out
    assert "2 entries" in out and f"{good}" in out and "corrupt" in out
    assert _cli("cache", "info", "--json", "--cache-dir", str(tmp_path)) == 0
    report = json.loads(capsys.readouterr().out)
    assert {e["key"]: e["status"] == "ok" for e in report["entries"]} == {good: True, bad: False}
    assert _cli("cache", "clear", "--key", bad, "--cache-dir", str(tmp_path)) == 0
    assert store.keys() == [good]
    assert _cli("cache", "clear", "--cache-dir", str(tmp_path)) == 0
    assert store.keys() == [] and store.info()["pending"] == []


# ------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
def test_gpu_bf16_triton_attention_compiled_and_graph_captured(tmp_path):
    """bf16 with the Triton attention backend (head_dim 64), and a CUDA graph captured around
    the compiled forward, as the runner's decode graphs will do."""
    from kvflow.worker.worker import Worker
    from tests.conftest import make_hf_model, save_hf_model
    hf = make_hf_model("llama", hidden_size=256, intermediate_size=512, num_attention_heads=4,
                       num_key_value_heads=2)
    cfg = create_engine_config(save_hf_model(hf, tmp_path / "model"), device="cuda",
                               dtype="bfloat16", skip_tokenizer_init=True, kv_cache_memory=64 << 20)
    worker = Worker(cfg, attention_backend="triton")
    worker.runner.allocate_kv_cache(worker.plan_memory().num_blocks)
    compiled = compile_model(worker.model, cfg, cache_dir=str(tmp_path / "cache"))
    assert not compiled.compile_info.cache_hit
    _assert_same_as_eager(worker, compiled, tol=3e-2)
    _assert_same_as_eager(worker, compiled, specs=((30, 1), (2, 1), (17, 1)), tol=3e-2)
    again = compile_model(worker.model, cfg, cache_dir=str(tmp_path / "cache"))
    assert again.compile_info.cache_hit and again.compile_info.graphs_compiled == 0

    specs = ((30, 1), (2, 1), (17, 1), (5, 1))  # a decode step of 4
    with torch.inference_mode():
        ids, pos, md = _batch(cfg.cache.block_size, specs, 0, "cuda")
    with torch.inference_mode(), set_forward_context(md):
        expected = compiled(ids, pos).clone()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = compiled(ids, pos)
        out.zero_()
        graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
