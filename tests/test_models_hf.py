"""Models against Hugging Face transformers on tiny random checkpoints (fp32, CPU).

Covers Llama / Qwen2 / Qwen3, GQA and MHA, tied and untied embeddings, rope scaling types, and
both config spellings (transformers v4 rope_theta/rope_scaling, v5 rope_parameters).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kvflow.attention.backend import AttentionMetadata
from kvflow.forward_context import set_forward_context
from tests.conftest import hf_greedy, make_hf_model, save_hf_model

CASES = {
    "llama-gqa-v5": ("llama", {}, "v5"),
    "llama-tied-llama3rope-v4": ("llama", dict(tie_word_embeddings=True, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}), "v4"),
    "llama-mha-linear-v5": ("llama", dict(num_key_value_heads=4, rope_scaling={
        "rope_type": "linear", "factor": 2.0}), "v5"),
    "qwen2-tied-v4": ("qwen2", dict(tie_word_embeddings=True), "v4"),
    "qwen3-yarn-v5": ("qwen3", dict(tie_word_embeddings=False, max_position_embeddings=512, rope_scaling={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}), "v5"),
    "qwen3-tied-v4": ("qwen3", dict(tie_word_embeddings=True, num_key_value_heads=1), "v4"),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    kind, overrides, spelling = CASES[request.param]
    model = make_hf_model(kind, **overrides)
    path = save_hf_model(model, tmp_path_factory.mktemp(request.param), spelling)
    return model, path


def _kvflow_logits(llm, ids: list[int], split: int) -> torch.Tensor:
    """Logits at every position, computed in two chunks over the paged cache: [0, split) then
    [split, n) attending to the cached first chunk."""
    eng = llm.llm_engine
    runner = eng.executor.worker.runner
    assert not eng.has_unfinished_requests()
    n, bs, dev = len(ids), runner.block_size, runner.device
    table = torch.arange(-(-n // bs), dtype=torch.int32, device=dev).unsqueeze(0)
    outs = []
    for lo, hi in ((0, split), (split, n)):
        md = AttentionMetadata(
            num_actual_tokens=hi - lo, max_query_len=hi - lo, max_seq_len=hi,
            query_start_loc=torch.tensor([0, hi - lo], dtype=torch.int32, device=dev),
            seq_lens=torch.tensor([hi], dtype=torch.int32, device=dev), block_table=table,
            slot_mapping=torch.arange(lo, hi, dtype=torch.int64, device=dev))
        with torch.inference_mode(), set_forward_context(md):
            h = runner.model(torch.tensor(ids[lo:hi], device=dev), torch.arange(lo, hi, device=dev))
            outs.append(runner.model.compute_logits(h).cpu())
    eng.reset_prefix_cache()  # blocks 0.. were written behind the scheduler's back
    return torch.cat(outs)


def test_logits_match_hf(case, make_llm):
    hf, path = case
    llm = make_llm(path)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 383, size=150).tolist()   # long enough to use far rotary positions
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].float()
    ours = _kvflow_logits(llm, ids, split=67)
    diff = (ours - ref).abs().max().item()
    assert diff < 1e-4, f"max abs logit diff {diff}"


def test_greedy_matches_hf_generate(case, make_llm):
    hf, path = case
    llm = make_llm(path)
    from kvflow import SamplingParams
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, 383, size=n).tolist() for n in (1, 7, 16, 33, 90)]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    for p, o in zip(prompts, outs):
        assert o.outputs[0].token_ids == hf_greedy(hf, p, 12)
        assert o.outputs[0].finish_reason == "length"


def test_v4_and_v5_spellings_agree(tmp_path, make_llm):
    rope = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 128}
    hf = make_hf_model("llama", rope_scaling=rope)
    a = make_llm(save_hf_model(hf, tmp_path / "v4", "v4"))
    b = make_llm(save_hf_model(hf, tmp_path / "v5", "v5"))
    ca, cb = a.llm_engine.config.model, b.llm_engine.config.model
    assert (ca.rope_theta, ca.rope_scaling) == (cb.rope_theta, cb.rope_scaling)
    assert ca.rope_scaling["rope_type"] == "llama3"


def test_unknown_architecture_lists_supported(tmp_path):
    import json
    from kvflow import LLM
    hf = make_hf_model("llama")
    path = save_hf_model(hf, tmp_path / "m")
    cfg = json.load(open(f"{path}/config.json"))
    cfg["architectures"] = ["FancyNewForCausalLM"]
    json.dump(cfg, open(f"{path}/config.json", "w"))
    with pytest.raises(ValueError, match="FancyNewForCausalLM.*LlamaForCausalLM.*Qwen2ForCausalLM.*Qwen3ForCausalLM"):
        LLM(path, skip_tokenizer_init=True, kv_cache_memory=1 << 20)


def test_sharded_safetensors_checkpoint(tmp_path, make_llm):
    """A checkpoint split into shards with model.safetensors.index.json loads identically."""
    import os
    hf = make_hf_model("qwen2")
    path = tmp_path / "sharded"
    hf.save_pretrained(path, max_shard_size="100KB")
    assert os.path.isfile(path / "model.safetensors.index.json")
    assert len([f for f in os.listdir(path) if f.endswith(".safetensors")]) > 1
    llm = make_llm(str(path))
    ids = np.random.default_rng(5).integers(0, 383, size=40).tolist()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].float()
    assert (_kvflow_logits(llm, ids, split=17) - ref).abs().max().item() < 1e-4
