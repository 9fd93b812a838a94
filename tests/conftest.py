"""Shared fixtures: tiny random Hugging Face models written to disk, and engine helpers.

Every engine built through `make_llm` is checked after each test: all KV blocks must be back in
the pool (nothing leaked), whatever the test did.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
# Without a GPU, Triton kernels can only run in its interpreter. Decide once for the whole session,
# before any test module imports kvflow.kernels: a kernel module imported in compiled mode and
# another in interpreted mode cannot call each other.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def run_compiler_script(module: str, timeout: int) -> subprocess.CompletedProcess:
    """Run `python -m module` from the repository root without TRITON_INTERPRET, which this
    suite sets on CPU: for checks that need Triton's real compiler front end (sm_90 compiles,
    its argument binder) rather than the interpreter."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", module], cwd=root, env=env,
                          capture_output=True, text=True, timeout=timeout)


def kernel_device(kernel) -> str:
    """Where a Triton kernel module's tests run, given one of its jitted kernels: "cpu" when
    kvflow.kernels was built for the interpreter (above), "cuda" when compiled on a GPU. Compiled
    without a GPU (TRITON_INTERPRET=0 on a CPU machine) nothing can run: the module is skipped."""
    from triton.runtime.interpreter import InterpretedFunction
    if isinstance(kernel, InterpretedFunction):
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    pytest.skip("kvflow.kernels was imported without TRITON_INTERPRET=1 and there is no GPU",
                allow_module_level=True)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _kvflow_cache_dir(tmp_path_factory):
    # GGUF conversions etc. go to a per-session cache unless the caller chose one (CI keeps one
    # across runs to make the second start fast).
    if "KVFLOW_CACHE_DIR" not in os.environ:
        os.environ["KVFLOW_CACHE_DIR"] = str(tmp_path_factory.mktemp("kvflow-cache"))
    yield


# The same suite runs on the GPU machine with KVFLOW_TEST_DEVICE=cuda (fp32, so HF parity holds
# to the same tolerances; bf16 has its own tests in test_gpu.py).
DEVICE = os.environ.get("KVFLOW_TEST_DEVICE", "cpu")

TINY = dict(vocab_size=384, hidden_size=128, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
            eos_token_id=383, bos_token_id=1)


def make_hf_model(kind: str, **overrides):
    from transformers import (LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM,
                              Qwen3Config, Qwen3ForCausalLM)
    classes = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
               "qwen3": (Qwen3Config, Qwen3ForCausalLM)}
    cfg_cls, model_cls = classes[kind]
    kw = dict(TINY)
    if kind == "qwen3":
        kw["head_dim"] = 32
    kw.update(overrides)
    torch.manual_seed(1234)
    model = model_cls(cfg_cls(**kw)).eval()
    # Random init leaves norms at 1 and biases at 0; perturb them so those paths are tested too.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


def save_hf_model(model, path, rope_spelling: str = "v5") -> str:
    """Write the model; rope_spelling 'v4' rewrites config.json to rope_theta/rope_scaling."""
    model.save_pretrained(path)
    if rope_spelling == "v4":
        cfg_path = os.path.join(path, "config.json")
        with open(cfg_path) as f:
            cfg = json.load(f)
        params = cfg.pop("rope_parameters")
        cfg["rope_theta"] = params.pop("rope_theta")
        if params.get("rope_type", "default") != "default":
            cfg["rope_scaling"] = params
        with open(cfg_path, "w") as f:
            json.dump(cfg, f)
    return str(path)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    model = make_hf_model("llama")
    return model, save_hf_model(model, tmp_path_factory.mktemp("tiny-llama"))


_ENGINES = []


@pytest.fixture
def make_llm():
    from kvflow import LLM

    def make(model_dir, **kw):
        kw.setdefault("skip_tokenizer_init", True)
        kw.setdefault("kv_cache_memory", 8 << 20)
        kw.setdefault("device", DEVICE)
        # dtype "auto" would pick bf16 on CUDA; the HF-parity suite is an fp32 suite.
        kw.setdefault("dtype", "float32")
        llm = LLM(model_dir, **kw)
        _ENGINES.append(llm)
        return llm

    yield make
    engines = list(_ENGINES)
    _ENGINES.clear()
    for llm in engines:
        eng = llm.llm_engine
        assert not eng.has_unfinished_requests(), "test left requests in the engine"
        assert eng.num_free_blocks() == eng.num_total_blocks(), "KV blocks leaked"


def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    # An explicit attention mask: otherwise generate() infers padding from pad_token_id and
    # masks real prompt tokens that happen to equal it.
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, eos_token_id=None, pad_token_id=0,
                         min_new_tokens=max_new_tokens)
    toks = out[0, len(prompt):].tolist()
    assert len(toks) == max_new_tokens
    return toks
