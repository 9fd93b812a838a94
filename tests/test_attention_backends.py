"""Attention backends declare what they support, and the declaration is the whole contract.

* Backend x feature matrix (head size, dtype, KV cache dtype, block size, local attention,
  device, compute capability): every combination either constructs an impl that matches the
  dense reference (Triton under TRITON_INTERPRET=1 on CPU tensors in CI, compiled on the GPU
  machine's run of the suite) or is refused by the selector with a ValueError naming the
  reasons -- never a TypeError or an error from inside the impl.
* Every registered model architecture builds, and its layers' specs go through every backend the
  same way (model code passes only generic arguments).
* An explicit attention_backend that cannot serve the model fails at engine startup listing
  the reasons; automatic selection logs rejections; a GPU below compute capability 8.0
  (simulated) gets a working backend.
"""
from __future__ import annotations

import itertools
import logging

import numpy as np
import pytest
import torch

from kvflow.attention import selector
from kvflow.attention.backend import AttentionSpec, unsupported_reasons
from kvflow.attention.local_attention import build_local_metadata
from tests.test_local_attention import _dense_local_reference, _paged_case, metadata_to

BACKENDS = selector._registry()
CUDA = torch.device("cuda", 0)
CPU = torch.device("cpu")
_TOL = {torch.float32: 2e-3, torch.float16: 2e-2, torch.bfloat16: 6e-2}


def _impl_device(backend) -> torch.device:
    """Where the backend's impl runs in this session: the Triton kernels under the interpreter
    (CPU tensors) in CI, compiled on the GPU machine (KVFLOW_TEST_DEVICE=cuda); torch on CPU."""
    if backend.name != "triton":
        return CPU
    from kvflow.kernels.attention import _attention_kernel
    from tests.conftest import kernel_device
    return torch.device(kernel_device(_attention_kernel))


def _run_against_reference(backend, spec: AttentionSpec, seed: int = 0) -> None:
    """One mixed batch (decode + prefill chunks over cached context) through the backend's impl
    (on `_impl_device`), against the dense masked reference."""
    rng = np.random.default_rng(seed)
    chunk = spec.local_attention_chunk or (1 << 30)
    q, cache, md, ks, vs, qsl, seq = _paged_case(rng, chunk, spec.block_size, 70, 3,
                                                 h=spec.num_heads, kvh=spec.num_kv_heads,
                                                 d=spec.head_size)
    cache_dtype = torch.float8_e4m3fn if spec.kv_cache_dtype == "fp8" else spec.dtype
    cache = cache.to(cache_dtype)
    q = q.to(spec.dtype)
    # The reference sees exactly what the cache and queries hold.
    ks = [k.to(cache_dtype).float() for k in ks]
    vs = [v.to(cache_dtype).float() for v in vs]
    if spec.local_attention_chunk:
        md = build_local_metadata(md, spec.local_attention_chunk, spec.block_size)
    impl = backend.make_impl(spec)
    t = q.shape[0]
    dev = _impl_device(backend)
    zeros = torch.zeros(t, spec.num_kv_heads, spec.head_size, dtype=spec.dtype, device=dev)
    ones = torch.ones(1, device=dev)
    out = impl.forward(q.to(dev), zeros, zeros, cache.to(dev), metadata_to(md, dev), ones,
                       ones)                                                  # slots -1
    ref = _dense_local_reference(q.float(), ks, vs, qsl, seq, chunk, spec.scale)
    err = (out.float().cpu() - ref).abs().max().item()
    assert err < _TOL[spec.dtype], (backend.name, spec, err)


HEAD_SIZES = (16, 64, 80)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
KV_DTYPES = ("auto", "fp8")
BLOCK_SIZES = (1, 16, 32)
LOCAL = (None, 24)
PLACES = (("cpu", None), ("cuda", (7, 0)), ("cuda", (9, 0)))


def _matrix():
    for name, head, dtype, kv, bs, local, place in itertools.product(
            sorted(BACKENDS), HEAD_SIZES, DTYPES, KV_DTYPES, BLOCK_SIZES, LOCAL, PLACES):
        yield pytest.param(name, head, dtype, kv, bs, local, place,
                           id=f"{name}-d{head}-{str(dtype)[6:]}-{kv}-bs{bs}-"
                              f"{'local' if local else 'global'}-{place[0]}{place[1] or ''}")


@pytest.mark.parametrize("name,head,dtype,kv,block_size,local,place", list(_matrix()))
def test_backend_feature_matrix(name, head, dtype, kv, block_size, local, place, monkeypatch):
    backend = BACKENDS[name]
    dev_type, cc = place
    device = CPU if dev_type == "cpu" else CUDA
    monkeypatch.setattr(selector, "device_compute_capability", lambda d: cc)
    spec = AttentionSpec(num_heads=4, num_kv_heads=2, head_size=head, scale=head ** -0.5,
                         dtype=dtype, kv_cache_dtype=kv, block_size=block_size,
                         local_attention_chunk=local)
    reasons = unsupported_reasons(backend, spec, device, cc)
    if reasons:
        with pytest.raises(ValueError) as err:
            selector.select_backend([spec], device, requested=name)
        for r in reasons:
            assert r in str(err.value)
        return
    assert selector.select_backend([spec], device, requested=name).name == name
    # Accepted: it must run and be right, where its kernels run in this session
    # (`_impl_device`); each accepted (backend, spec) pair runs once, on its first place.
    if dev_type == "cuda" and not unsupported_reasons(backend, spec, CPU, None):
        return            # already run on the CPU row
    _run_against_reference(backend, spec)


def _tiny_checkpoints():
    """A tiny random checkpoint maker for every registered architecture."""
    from tests.conftest import make_hf_model
    from tests.test_llama4 import make_llama4
    from tests.test_moe import make_hf_moe
    return {
        "LlamaForCausalLM": lambda: make_hf_model("llama"),
        "Qwen2ForCausalLM": lambda: make_hf_model("qwen2"),
        "Qwen3ForCausalLM": lambda: make_hf_model("qwen3"),
        "MixtralForCausalLM": lambda: make_hf_moe("mixtral", num_local_experts=4,
                                                  num_experts_per_tok=2),
        "Qwen3MoeForCausalLM": lambda: make_hf_moe("qwen3_moe", num_experts=4,
                                                   num_experts_per_tok=2),
        "Llama4ForCausalLM": lambda: make_llama4(head_dim=32),
        "Llama4ForConditionalGeneration": lambda: make_llama4(conditional=True, head_dim=32),
    }


def test_every_architecture_has_a_tiny_checkpoint():
    from kvflow.models.registry import supported_architectures
    assert sorted(_tiny_checkpoints()) == supported_architectures()


@pytest.fixture(scope="module", params=sorted(_tiny_checkpoints()))
def arch_checkpoint(request, tmp_path_factory):
    model = _tiny_checkpoints()[request.param]()
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    return request.param, str(path)


@pytest.mark.parametrize("place", PLACES, ids=lambda p: f"{p[0]}{p[1] or ''}")
def test_every_model_x_backend_runs_or_is_refused(arch_checkpoint, make_llm, monkeypatch, place):
    """The specs each model's layers produce (generic arguments only) go through every backend:
    served and correct, or refused with reasons."""
    arch, path = arch_checkpoint
    llm = make_llm(path, max_model_len=128, block_size=16)
    runner = llm.llm_engine.executor.worker.runner
    specs = list(dict.fromkeys(runner.attention_spec(layer) for layer in runner.attn_layers))
    assert any(s.local_attention_chunk for s in specs) == arch.startswith("Llama4")
    dev_type, cc = place
    device = CPU if dev_type == "cpu" else CUDA
    monkeypatch.setattr(selector, "device_compute_capability", lambda d: cc)
    for name, backend in BACKENDS.items():
        reasons = selector.all_reasons(backend, specs, device, cc)
        try:
            chosen = selector.select_backend(specs, device, requested=name)
        except ValueError as e:
            assert reasons and all(r in str(e) for r in reasons), (arch, name, e)
            continue
        assert chosen.name == name and not reasons
        if name == "triton" and dev_type == "cuda" and cc < (8, 0):
            raise AssertionError("triton accepted below its declared compute capability")
        for spec in specs:
            if dev_type == "cpu" or name == "triton":
                _run_against_reference(backend, spec)


def test_explicit_backend_that_cannot_serve_fails_at_startup(tmp_path):
    from kvflow import LLM
    from tests.test_llama4 import make_llama4
    make_llama4().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"attention_backend: 'triton' cannot serve this model: "
                                         r"runs on \('cuda',\), not cpu.*head size 16"):
        LLM(str(tmp_path), skip_tokenizer_init=True, kv_cache_memory=1 << 20, device="cpu",
            dtype="float32", attention_backend="triton")
    with pytest.raises(ValueError, match="'nonesuch' is not available; available:"):
        LLM(str(tmp_path), skip_tokenizer_init=True, kv_cache_memory=1 << 20, device="cpu",
            dtype="float32", attention_backend="nonesuch")


def _llama4_like_specs(dtype=torch.bfloat16):
    common = dict(num_heads=8, num_kv_heads=2, head_size=128, scale=128 ** -0.5, dtype=dtype,
                  block_size=16)
    return [AttentionSpec(**common), AttentionSpec(**common, local_attention_chunk=8192)]


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton not installed")
def test_old_gpu_gets_a_working_backend_and_rejections_are_logged(monkeypatch, caplog):
    """A simulated sm_70 GPU: Triton (declares >= 8.0) is rejected with its reason logged and
    the torch backend, which runs anywhere, is chosen; forcing triton names the reason."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    with caplog.at_level(logging.INFO, logger="kvflow"):
        chosen = selector.select_backend(_llama4_like_specs(torch.float16), CUDA)
    assert chosen.name == "torch"
    msg = " ".join(r.getMessage() for r in caplog.records)
    assert "attention backend torch" in msg
    assert "triton: needs compute capability >= (8, 0), device has (7, 0)" in msg
    with pytest.raises(ValueError, match=r"'triton' cannot serve.*compute capability"):
        selector.select_backend(_llama4_like_specs(torch.float16), CUDA, requested="triton")
    # The same model on sm_90 gets Triton, local layers included.
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert selector.select_backend(_llama4_like_specs(), CUDA).name == "triton"


def test_no_backend_error_lists_every_backend(monkeypatch):
    spec = AttentionSpec(num_heads=4, num_kv_heads=2, head_size=64, scale=0.125,
                         dtype=torch.float64)
    with pytest.raises(ValueError, match="no attention backend can serve this model: .*torch: "
                                         "dtype torch.float64"):
        selector.select_backend(spec, CPU)


def test_cuda_graphs_follow_the_backend_declaration():
    """supports_cuda_graphs is enforced by the worker: graphs only with a backend that
    declares them (the torch backend does not)."""
    from kvflow.config import CompilationConfig
    from kvflow.worker.worker import Worker

    class _W:
        device = CUDA
        config = type("C", (), {"compilation": CompilationConfig()})()
        model = object()

        def __init__(self, backend):
            self.runner = type("R", (), {"backend": backend})()

    assert Worker.use_cuda_graphs.fget(_W(BACKENDS["torch"])) is False
    if "triton" in BACKENDS:
        assert Worker.use_cuda_graphs.fget(_W(BACKENDS["triton"])) is True
        off = _W(BACKENDS["triton"])
        off.config = type("C", (), {"compilation": CompilationConfig(cudagraph_mode="NONE")})()
        assert Worker.use_cuda_graphs.fget(off) is False
