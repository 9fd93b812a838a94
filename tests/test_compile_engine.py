"""torch.compile in the serving path: `LLM(..., compilation_config=3)` on CPU (inductor's C++
backend), against the same engine run eagerly.

Covered: the option's validation (levels, dict spellings, the CLI's -O); greedy tokens identical
and logprobs equal to rounding; no batch shape of a real run retraces; a restart (a fresh
process on the same KVFLOW_CACHE_DIR) is a compile-cache hit with identical outputs;
enforce_eager wins over the level; sleep / wake / reload_weights reach the parameters the
compiled code reads, without recompiling; MoE models (the experts are an opaque custom op)
compile as one graph. Compiles are real and take seconds each: those tests are marked slow but
run in the default suite (about a minute on 2 cores).
"""
from __future__ import annotations

import multiprocessing as mp
import os

import numpy as np
import pytest
import torch

from kvflow import SamplingParams
from kvflow.config import (COMPILE_FORWARD, DEFAULT_COMPILATION_LEVEL, NO_COMPILATION,
                           CompilationConfig, create_engine_config)
from tests.conftest import DEVICE

# Compiled vs eager logprobs in fp32: equal to rounding on CPU (see test_compile_cache.TOL).
TOL = 1e-4 if DEVICE == "cpu" else 2e-2
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=3,
                        prompt_logprobs=2)
LENGTHS = (3, 17, 40, 5, 29)


def _prompts(seed=0, lengths=LENGTHS, vocab=383):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=n).tolist() for n in lengths]


def _gen(llm, prompts, params=GREEDY):
    return llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)


def _summary(outs):
    """[(tokens, [per token: sorted (id, logprob, rank)], prompt logprobs likewise)]."""
    def lp(dicts):
        return [None if d is None else sorted((t, v.logprob, v.rank) for t, v in d.items())
                for d in dicts]
    return [(o.outputs[0].token_ids, lp(o.outputs[0].logprobs), lp(o.prompt_logprobs))
            for o in outs]


def _assert_same(got, ref, tol=TOL):
    for (toks, lps, plps), (rtoks, rlps, rplps) in zip(got, ref):
        assert toks == rtoks
        for a, b in zip(lps + plps, rlps + rplps):
            if a is None or b is None:
                assert a is b
                continue
            assert [t for t, _, _ in a] == [t for t, _, _ in b]
            np.testing.assert_allclose([v for _, v, _ in a], [v for _, v, _ in b],
                                       atol=tol, rtol=tol)


def _worker(llm):
    return llm.llm_engine.executor.worker


@pytest.fixture(scope="module")
def compile_cache_dir(tmp_path_factory):
    """One KVFLOW_CACHE_DIR for this module's compiled engines (compile_model reads it)."""
    path = str(tmp_path_factory.mktemp("compile-engine-cache"))
    saved = os.environ.get("KVFLOW_CACHE_DIR")
    os.environ["KVFLOW_CACHE_DIR"] = path
    yield path
    if saved is None:
        os.environ.pop("KVFLOW_CACHE_DIR", None)
    else:
        os.environ["KVFLOW_CACHE_DIR"] = saved


# ------------------------------------------------------------------------------ the option
def test_compilation_config_spellings():
    assert CompilationConfig().level == DEFAULT_COMPILATION_LEVEL
    assert CompilationConfig.parse(None).level == DEFAULT_COMPILATION_LEVEL
    for value, level in ((0, 0), (3, 3), (1, 3), (2, 3), ({"level": 3}, 3), ({"mode": 3}, 3),
                         ({"level": 3, "mode": 3}, 3), ({}, DEFAULT_COMPILATION_LEVEL),
                         ("3", 3), (" 0 ", 0), ('{"level": 3}', 3), ('{"mode": 2}', 3),
                         (CompilationConfig(level=3), 3)):
        cfg = CompilationConfig.parse(value)
        assert cfg.level == level, value
        assert cfg.compile_forward == (level == COMPILE_FORWARD)
    # enforce_eager wins: no compile (and no CUDA graphs), whatever the level.
    eager = CompilationConfig.parse(3, enforce_eager=True)
    assert eager.level == 3 and eager.enforce_eager and not eager.compile_forward
    assert not CompilationConfig.parse(CompilationConfig(level=3), enforce_eager=True).compile_forward
    assert CompilationConfig(level=NO_COMPILATION).compile_forward is False


@pytest.mark.parametrize("bad", [7, -1, 4, {"level": 7}, {"mode": 5}, {"level": "3"}, True, 3.0,
                                 "seven", '{"level": 9}', {"level": 3, "mode": 0},
                                 {"level": 3, "cudagraph_capture_sizes": [1]}, [3]])
def test_bad_compilation_config_is_a_value_error_naming_it(bad, tiny_llama):
    with pytest.raises(ValueError, match="compilation_config"):
        CompilationConfig.parse(bad)
    with pytest.raises(ValueError, match="compilation_config"):
        create_engine_config(tiny_llama[1], device=DEVICE, skip_tokenizer_init=True,
                             compilation_config=bad)


def test_cli_option(tiny_llama):
    from kvflow.cli import build_parser
    from kvflow.engine.arg_utils import engine_kwargs
    parser = build_parser()
    for argv, level in ((["-O3"], 3), (["-O", "0"], 0), (["--compilation-config", '{"level": 3}'], 3),
                        (["--compilation-config", "2"], 3), ([], DEFAULT_COMPILATION_LEVEL)):
        for cmd in (["generate", "hi"], ["bench", "latency"], ["serve", tiny_llama[1]]):
            try:
                args = parser.parse_args(cmd + argv)
            except SystemExit:  # a subcommand whose optional dependency is missing
                assert cmd[0] != "generate"
                continue
            kw = engine_kwargs(args)
            assert "compilation_config" in kw
            cfg = create_engine_config(tiny_llama[1], device=DEVICE, skip_tokenizer_init=True,
                                       compilation_config=kw["compilation_config"])
            assert cfg.compilation.level == level, (cmd, argv)


# ------------------------------------------------------------------------------ compiled engine
@pytest.fixture(scope="module")
def eager_reference(tiny_llama):
    from kvflow import LLM
    llm = LLM(tiny_llama[1], skip_tokenizer_init=True, kv_cache_memory=8 << 20, device=DEVICE,
              dtype="float32")
    assert _worker(llm).compiled is None and "compile_s" not in llm.llm_engine.startup_timings()
    ref = _summary(_gen(llm, _prompts()))
    llm.shutdown()
    return ref


def _child_engine(model_dir: str, cache_dir: str, threads: int, queue) -> None:
    """A restarted server: a fresh process on the same KVFLOW_CACHE_DIR."""
    try:
        os.environ["KVFLOW_CACHE_DIR"] = cache_dir
        torch.set_num_threads(threads)  # CPU code is specialised to it (a key factor)
        from kvflow import LLM
        llm = LLM(model_dir, skip_tokenizer_init=True, kv_cache_memory=8 << 20, device=DEVICE,
                  dtype="float32", compilation_config={"level": 3})
        info = _worker(llm).compiled.compile_info
        queue.put((info.key, info.cache_hit, info.graphs_compiled,
                   llm.llm_engine.startup_timings(), _summary(_gen(llm, _prompts()))))
    except BaseException:  # noqa: BLE001 - report to the parent instead of dying silently
        import traceback
        queue.put(("error", traceback.format_exc()[-3000:], None, None, None))


@pytest.fixture(scope="module")
def compiled_llm(tiny_llama, compile_cache_dir):
    """The compiled engine (the first compile of this module: a miss), shared by the tests
    below; sleep mode on so the sleep test needs no second compile (the key ignores it)."""
    import gc

    from kvflow import LLM
    # Models of earlier tests still alive would hold the attention layer names, and ours would
    # get suffixed ones ("...attn#1"), which are constants of the graph: see the restart test.
    gc.collect()
    llm = LLM(tiny_llama[1], skip_tokenizer_init=True, kv_cache_memory=8 << 20, device=DEVICE,
              dtype="float32", compilation_config=3, enable_sleep_mode=True)
    yield llm
    eng = llm.llm_engine
    assert not eng.has_unfinished_requests() and eng.num_free_blocks() == eng.num_total_blocks()
    llm.shutdown()


@pytest.mark.slow
def test_compiled_engine_equals_eager_and_restart_hits_the_cache(tiny_llama, compiled_llm,
                                                                 eager_reference,
                                                                 compile_cache_dir):
    from torch._dynamo.utils import counters
    llm = compiled_llm
    worker = _worker(llm)
    info = worker.compiled.compile_info
    assert not info.cache_hit and info.graphs_compiled >= 1  # a fresh cache dir
    assert info.entry_dir.startswith(os.path.join(compile_cache_dir, "compile"))
    assert worker.runner.model is worker.compiled and worker.compiled.model is worker.model
    timings = llm.llm_engine.startup_timings()
    assert timings["compile_s"] > 0 and timings["compile_cache_hit"] is False
    graphs = counters["stats"]["unique_graphs"]
    _assert_same(_summary(_gen(llm, _prompts())), eager_reference)
    # Prefills, decodes, mixed steps, prompt logprobs: one graph for every step shape.
    assert counters["stats"]["unique_graphs"] == graphs, "a step retraced the compiled forward"

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child_engine,
                       args=(tiny_llama[1], compile_cache_dir, torch.get_num_threads(), queue))
    proc.start()
    key, hit, compiled_graphs, child_timings, outs = queue.get(timeout=300)
    proc.join(timeout=60)
    assert key != "error", hit
    assert key == info.key and hit
    # The layer names are graph constants: the restarted process (no other model alive) uses
    # the plain module paths, so it compiles nothing unless ours had to take suffixed ones.
    names = [m.layer_name for m in worker.runner.attn_layers]
    if not any("#" in n for n in names):
        assert compiled_graphs == 0
    assert child_timings["compile_cache_hit"] is True
    # Identical to the first compiled engine (same compiled code), equal to eager to rounding.
    assert outs == _summary(_gen(llm, _prompts()))
    _assert_same(outs, eager_reference)


def test_enforce_eager_does_not_compile(tiny_llama, make_llm, tmp_path, monkeypatch):
    monkeypatch.setenv("KVFLOW_CACHE_DIR", str(tmp_path))
    llm = make_llm(tiny_llama[1], compilation_config=3, enforce_eager=True)
    worker = _worker(llm)
    assert llm.llm_engine.config.compilation.level == 3
    assert worker.compiled is None and worker.runner.model is worker.model
    assert "compile_s" not in llm.llm_engine.startup_timings()
    assert not os.path.exists(os.path.join(tmp_path, "compile"))  # nothing compiled or cached


@pytest.mark.slow
def test_sleep_wake_and_reload_reach_the_compiled_forward(compiled_llm, eager_reference):
    """Parameters are inputs of the compiled code: sleep (both levels), wake-up and
    reload_weights change what it computes, with no recompile."""
    from torch._dynamo.utils import counters
    llm = compiled_llm
    worker = _worker(llm)
    graphs = counters["stats"]["unique_graphs"]
    prompts = _prompts()
    first = _summary(_gen(llm, prompts))
    _assert_same(first, eager_reference)

    llm.sleep(level=1)
    llm.wake_up()
    assert _summary(_gen(llm, prompts)) == first

    llm.sleep(level=2)
    llm.wake_up()
    assert llm.reload_weights() > 0          # re-read the checkpoint into fresh storage
    assert _summary(_gen(llm, prompts)) == first

    # New values (in place, as an RL weight sync does): the compiled forward sees them, and
    # equals the eager forward of the same module.
    with torch.no_grad():
        new = [(n, p.detach().clone() * 1.5) for n, p in worker.model.named_parameters()
               if n.endswith("mlp.down_proj.weight")]
    assert llm.reload_weights(new) == len(new) > 0
    llm.llm_engine.reset_prefix_cache()
    changed = _summary(_gen(llm, prompts))
    assert [t for t, _, _ in changed] != [t for t, _, _ in first]
    worker.runner.model = worker.model        # the same engine, eager
    try:
        llm.llm_engine.reset_prefix_cache()
        _assert_same(changed, _summary(_gen(llm, prompts)))
    finally:
        worker.runner.model = worker.compiled
        llm.reload_weights()                  # back to the checkpoint for other tests
        llm.llm_engine.reset_prefix_cache()
    assert _summary(_gen(llm, prompts)) == first
    assert counters["stats"]["unique_graphs"] == graphs, "sleep / reload recompiled"


@pytest.mark.slow
def test_moe_compiles_as_one_graph(make_llm, tmp_path_factory, compile_cache_dir):
    """Mixtral: the experts are the opaque kvflow::fused_moe op, so fullgraph=True holds (a
    torch.compiler.disable'd call would be a graph break, rejected)."""
    from kvflow import LLM
    from tests.conftest import save_hf_model
    from tests.test_moe import make_hf_moe
    path = save_hf_model(make_hf_moe("mixtral", num_local_experts=4, num_experts_per_tok=2),
                         tmp_path_factory.mktemp("tiny-mixtral"))
    eager = LLM(path, skip_tokenizer_init=True, kv_cache_memory=8 << 20, device=DEVICE,
                dtype="float32")
    prompts = _prompts(lengths=(9, 23, 4))
    ref = _summary(_gen(eager, prompts))
    eager.shutdown()
    llm = make_llm(path, compilation_config=3)
    info = _worker(llm).compiled.compile_info
    assert info.graphs_compiled == 1 or info.cache_hit
    _assert_same(_summary(_gen(llm, prompts)), ref)
