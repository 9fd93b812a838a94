"""kvflow/compilation/eager.py: kernels marked eager_only stay out of torch.compile's traces,
and an engine start with compilation off never imports torch._dynamo (~3 s of the 8B model's
warm ready time on the H200: docs/performance.md, session 36)."""
import subprocess
import sys
import textwrap

import pytest


def _run(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def _save(kind: str, path) -> str:
    from tests.conftest import make_hf_model, save_hf_model
    if kind == "mixtral":
        from tests.test_moe import make_hf_moe
        return save_hf_model(make_hf_moe("mixtral"), str(path))
    if kind == "llama4":
        from tests.test_llama4 import make_llama4
        return save_hf_model(make_llama4(), str(path))
    if kind == "gptq":   # int4 linears (dummy codes): their own custom op
        from tests.test_gptq import save_gptq_config_model
        return save_gptq_config_model(str(path))
    return save_hf_model(make_hf_model(kind), str(path))


@pytest.mark.parametrize("kind,load_format", [("llama", "auto"), ("llama", "dummy"),
                                              ("qwen3", "dummy"), ("mixtral", "dummy"),
                                              ("llama4", "dummy"), ("gptq", "dummy")])
def test_engine_start_without_compile_leaves_dynamo_unloaded(tmp_path, kind, load_format):
    # What used to import it: kernels decorated with torch.compiler.disable, meta-device ops
    # in the dummy reference build (1.0 / t, torch.where: reference decompositions), and the
    # first eager call of a custom op (fused_moe for Mixtral / Llama 4, gptq_gemm).
    path = _save(kind, tmp_path)
    out = _run(f"""
        import sys
        from kvflow import LLM, SamplingParams
        llm = LLM({path!r}, max_model_len=64, max_num_batched_tokens=64, load_format={load_format!r},
                  skip_tokenizer_init=True, kv_cache_memory=2 ** 22)
        o = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=3, temperature=0.8, seed=0))
        assert len(o[0].outputs[0].token_ids) == 3
        print("dynamo" if "torch._dynamo" in sys.modules else "no dynamo")
    """)
    assert out.strip().splitlines()[-1] == "no dynamo"


@pytest.mark.parametrize("kind", ["llama", "mixtral", "llama4", "gptq"])
def test_dummy_reference_build_of_a_sharded_model_leaves_dynamo_unloaded(tmp_path, kind):
    # Under TP > 1 the dummy initialiser builds a single-rank copy of the model on the meta
    # device (models/dummy.py); ops on meta tensors there (GPTQ's default g_idx) used to run
    # reference decompositions that import torch._dynamo. The rank count is faked so the
    # build runs in one process; its weights must still come out the same as TP == 1's.
    path = _save(kind, tmp_path)
    out = _run(f"""
        import sys
        import torch
        from kvflow.config import create_engine_config
        from kvflow.models import dummy
        from kvflow.models.loader import build_model
        cfg = create_engine_config({path!r}, load_format="dummy", device="cpu",
                                   max_model_len=64).model
        one = build_model(cfg, torch.device("cpu"))
        dummy.get_tp_size = lambda: 2        # take the reference-build branch
        two = build_model(cfg, torch.device("cpu"))
        assert "torch._dynamo" not in sys.modules, "dynamo"
        a, b = one.state_dict(), two.state_dict()
        assert a.keys() == b.keys()
        differ = [k for k in a if not torch.equal(a[k], b[k])]
        assert not differ, differ
        print("ok", sum(1 for k in a if "g_idx" in k))
    """)
    ok, n_gidx = out.strip().splitlines()[-1].split()
    assert ok == "ok" and (int(n_gidx) > 0) == (kind == "gptq")


def test_eager_only_is_a_graph_break_once_compile_is_loaded():
    # Decorated before dynamo exists (as kernels are at import), then traced with fullgraph=True:
    # a disabled function is a graph break, which fullgraph rejects; a plain one would be
    # inlined and compile fine. Without fullgraph it runs eagerly and the result is unchanged.
    out = _run("""
        import sys
        import torch
        from kvflow.compilation.eager import eager_only
        assert "torch._dynamo" not in sys.modules
        calls = []

        @eager_only
        def bump(x):
            calls.append(1)
            return x + 1

        assert bump(torch.zeros(2)).tolist() == [1.0, 1.0]  # plain call before compile loads
        import kvflow.compilation.compile  # noqa: F401  (marks every eager_only function)

        def f(x):
            return bump(x * 2) * 3

        try:
            torch.compile(f, fullgraph=True, backend="eager")(torch.ones(2))
            print("traced")
        except Exception as e:
            print("graph break:", type(e).__name__)
        calls.clear()
        assert torch.compile(f, backend="eager")(torch.ones(2)).tolist() == [9.0, 9.0]
        assert calls == [1]

        @eager_only  # decorated once dynamo is loaded: disabled at once
        def late(x):
            return x - 1

        try:
            torch.compile(lambda x: late(x), fullgraph=True, backend="eager")(torch.ones(2))
            print("late traced")
        except Exception as e:
            print("late graph break:", type(e).__name__)
    """)
    lines = out.strip().splitlines()
    assert lines[0].startswith("graph break:"), out
    assert lines[1].startswith("late graph break:"), out
