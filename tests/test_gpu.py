"""GPU-only checks (run on the device: `bash scripts/test.sh -m gpu`; the rest of the suite also
runs there with KVFLOW_TEST_DEVICE=cuda)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kvflow import SamplingParams
from tests.conftest import hf_greedy, make_hf_model, save_hf_model

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    hf = make_hf_model("qwen3", num_hidden_layers=3, hidden_size=128, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=64, intermediate_size=256)
    return hf, save_hf_model(hf, tmp_path_factory.mktemp("qwen3-gpu"))


def _prompts(seed, lengths):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 383, size=n).tolist() for n in lengths]


def test_triton_backend_and_graphs_selected(qwen3):
    from kvflow import LLM
    llm = LLM(qwen3[1], skip_tokenizer_init=True, device="cuda", kv_cache_memory=64 << 20)
    runner = llm.llm_engine.executor.worker.runner
    assert runner.backend.name == "triton"
    assert runner.graphs is not None and runner.graphs.graphs


@pytest.mark.parametrize("enforce_eager", [True, False])
def test_fp32_greedy_equals_hf(qwen3, enforce_eager):
    from kvflow import LLM
    hf, path = qwen3
    llm = LLM(path, skip_tokenizer_init=True, device="cuda", dtype="float32",
              kv_cache_memory=64 << 20, enforce_eager=enforce_eager, max_num_batched_tokens=64)
    prompts = _prompts(0, (1, 9, 31, 77, 130, 5, 64))
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False)
    for p, o in zip(prompts, outs):
        assert o.outputs[0].token_ids == hf_greedy(hf, p, 24)


def test_bf16_logits_close_to_fp32_reference(qwen3):
    from kvflow import LLM
    hf, path = qwen3
    llm = LLM(path, skip_tokenizer_init=True, device="cuda", dtype="bfloat16", kv_cache_memory=64 << 20)
    p = _prompts(1, (200,))[0]
    out = llm.generate([{"prompt_token_ids": p}], SamplingParams(temperature=0, max_tokens=1,
                                                                 prompt_logprobs=5), use_tqdm=False)[0]
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([p])).logits[0].float(), -1)
    ours = torch.tensor([out.prompt_logprobs[j][p[j]].logprob for j in range(1, len(p))])
    expect = ref[torch.arange(len(p) - 1), torch.tensor(p[1:])]
    rel = (ours - expect).norm() / expect.norm()
    assert rel < 2e-2, f"bf16 prompt logprobs relative error {rel:.4f}"


def test_bf16_greedy_mostly_agrees_with_hf(qwen3):
    from kvflow import LLM
    hf, path = qwen3
    llm = LLM(path, skip_tokenizer_init=True, device="cuda", dtype="bfloat16", kv_cache_memory=64 << 20)
    prompts = _prompts(2, (10, 40, 90))
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    agree = [o.outputs[0].token_ids[0] == hf_greedy(hf, p, 1)[0] for p, o in zip(prompts, outs)]
    assert sum(agree) >= 2  # bf16 may flip a near-tie; not most of them


def test_peak_memory_within_utilization(qwen3):
    from kvflow import LLM
    torch.cuda.empty_cache()
    free0, total = torch.cuda.mem_get_info()
    util = (total - free0) / total + 0.2   # leave whatever else is resident alone
    llm = LLM(qwen3[1], skip_tokenizer_init=True, device="cuda", gpu_memory_utilization=util,
              max_num_seqs=64)
    prompts = _prompts(3, [300] * 64)
    llm.generate([{"prompt_token_ids": p} for p in prompts],
                 SamplingParams(temperature=0.7, max_tokens=32, ignore_eos=True), use_tqdm=False)
    torch.cuda.synchronize()
    free, _ = torch.cuda.mem_get_info()
    assert (total - free) <= util * total * 1.01, \
        f"used {(total - free) / 2**30:.2f} GiB > {util * total / 2**30:.2f} GiB"
