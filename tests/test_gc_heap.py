"""The garbage-collector freeze at the end of engine startup (kvflow/gc_heap.py) and the
invariant that makes it safe: a dropped engine, its model's weights included, is freed by
reference counting alone, so nothing of it can be pinned by the frozen heap."""
from __future__ import annotations

import gc
import json
import weakref

import pytest

from kvflow import LLM, SamplingParams
from kvflow.gc_heap import freeze_startup_heap, full_collect
from tests.conftest import DEVICE, make_hf_model, save_hf_model

GREEDY = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)


def _llm(path, **kw):
    # conftest's make_llm defaults, without its fixture: that keeps every engine it built
    # until teardown, and these tests must hold the only reference.
    kw.setdefault("skip_tokenizer_init", True)
    kw.setdefault("kv_cache_memory", 8 << 20)
    kw.setdefault("device", DEVICE)
    kw.setdefault("dtype", "float32")
    return LLM(path, **kw)


def _refs(llm) -> dict:
    eng = llm.llm_engine
    worker = eng.executor.worker
    model = worker.runner.model
    refs = dict(engine=eng, worker=worker, runner=worker.runner, model=model,
                sleeper=worker.sleeper)
    refs.update({f"param {n}": p for n, p in list(model.named_parameters())[:3]})
    return {k: weakref.ref(v) for k, v in refs.items()}


def _drop_and_check(holder: list) -> None:
    """holder: [llm], the only reference to the engine. Drops it with the cyclic collector
    off: only reference counting may free it."""
    refs = _refs(holder[0])
    gc.disable()
    try:
        holder.clear()
        alive = [k for k, r in refs.items() if r() is not None]
    finally:
        gc.enable()
    assert not alive, f"kept alive by a reference cycle after the engine was dropped: {alive}"


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return save_hf_model(make_hf_model("llama"), tmp_path_factory.mktemp("gc-llama"))


def test_startup_freezes_the_heap(tiny_path, monkeypatch, request):
    # Other libraries may freeze the heap too (torch does on some paths), so count kvflow's
    # own calls rather than the frozen objects.
    calls = []
    real_freeze = gc.freeze
    monkeypatch.setattr(gc, "freeze", lambda: calls.append(1) or real_freeze())
    thresholds = gc.get_threshold()
    gc.set_threshold(700, 10, 10)                       # Python's defaults
    request.addfinalizer(lambda: gc.set_threshold(*thresholds))
    monkeypatch.setenv("KVFLOW_GC_FREEZE", "0")
    held = [_llm(tiny_path)]
    llm = held[0]
    assert not calls, "KVFLOW_GC_FREEZE=0 still froze the heap"
    assert gc.get_threshold() == (700, 10, 10), "KVFLOW_GC_FREEZE=0 changed the thresholds"
    del llm
    _drop_and_check(held)
    monkeypatch.setenv("KVFLOW_GC_FREEZE", "1")
    gc.unfreeze()
    held = [_llm(tiny_path)]
    llm = held[0]
    assert calls
    assert gc.get_freeze_count() > 1000, gc.get_freeze_count()
    assert gc.get_threshold() == (700, 10, 100)         # KVFLOW_GC_GEN2_THRESHOLD's default
    assert llm.generate([[1, 2, 3]], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    del llm
    _drop_and_check(held)


def test_dropped_engine_is_freed_by_refcount_after_serving(tiny_path):
    held = [_llm(tiny_path, max_num_seqs=4)]
    llm = held[0]
    outs = llm.generate([[1, 2, 3], list(range(5, 40))], GREEDY, use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 4 for o in outs)
    del llm
    _drop_and_check(held)


def test_dropped_sleep_mode_engine_is_freed_by_refcount(tiny_path):
    held = [_llm(tiny_path, enable_sleep_mode=True)]
    llm = held[0]
    llm.sleep(level=1)
    llm.wake_up()
    assert llm.generate([[1, 2, 3]], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    del llm
    _drop_and_check(held)


def test_dropped_moe_engine_is_freed_by_refcount(tmp_path):
    cfg = dict(architectures=["MixtralForCausalLM"], model_type="mixtral", hidden_size=64,
               intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
               vocab_size=384, max_position_embeddings=256, rms_norm_eps=1e-5,
               rope_theta=10000.0, tie_word_embeddings=False)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    held = [_llm(str(tmp_path), load_format="dummy")]
    llm = held[0]
    assert llm.generate([[1, 2, 3]], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    del llm
    _drop_and_check(held)


def test_dropped_gptq_engine_is_freed_by_refcount(tmp_path):
    from tests.gptq_utils import quantize_hf_model
    hf = make_hf_model("llama")
    path = save_hf_model(hf, tmp_path / "gptq")
    quantize_hf_model(hf, path, bits=4, group_size=32, sym=True, act_order=False, v2=False)
    held = [_llm(path)]
    llm = held[0]
    layer = llm.llm_engine.executor.worker.runner.model.model.layers[0]
    assert not hasattr(layer.self_attn.qkv_proj, "weight")     # really the GPTQ path
    del layer
    assert llm.generate([[1, 2, 3]], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    del llm
    _drop_and_check(held)


def test_weight_loader_outliving_its_module_says_so():
    from kvflow.layers.linear import RowParallelLinear
    layer = RowParallelLinear(8, 4, bias=False)
    param = layer.weight
    loader = param.weight_loader
    del layer
    with pytest.raises(RuntimeError, match="no longer exists"):
        loader(param, param.detach().clone())


class _Cycle:
    def __init__(self):
        self.me = self


def test_full_collect_sees_frozen_garbage_and_keeps_the_freeze():
    obj = _Cycle()
    ref = weakref.ref(obj)
    freeze_startup_heap()
    del obj
    gc.collect()
    assert ref() is not None        # frozen: an ordinary collection skips it
    full_collect()
    assert ref() is None
    assert gc.get_freeze_count() > 0
