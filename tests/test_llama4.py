"""Llama 4 text model against Hugging Face transformers on tiny random checkpoints (fp32, CPU):
interleaved MoE / dense layers, sigmoid top-1 routing with a shared expert, QK L2 norm, NoPE
layers with temperature tuning, interleaved rotary, and chunked local attention across chunk
boundaries for every max_model_len / block size / chunked prefill / prefix caching setting.
"""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from kvflow.attention.backend import AttentionMetadata
from kvflow.forward_context import set_forward_context

CHUNK = 32
VOCAB = 384


def make_llama4(conditional: bool = False, **overrides):
    from transformers import (Llama4Config, Llama4ForCausalLM, Llama4ForConditionalGeneration,
                              Llama4TextConfig)
    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=48, intermediate_size_mlp=80,
              num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
              num_local_experts=4, num_experts_per_tok=1, interleave_moe_layer_step=2,
              attention_chunk_size=CHUNK, max_position_embeddings=1024,
              # floor_scale 8: temperature tuning changes queries from position 7 on.
              floor_scale=8, attn_scale=0.5, no_rope_layer_interval=2,
              rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 64},
              eos_token_id=VOCAB - 1, bos_token_id=1, pad_token_id=0)
    kw.update(overrides)
    torch.manual_seed(1234)
    text = Llama4TextConfig(**kw)
    if conditional:
        from transformers import Llama4VisionConfig
        vision = Llama4VisionConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                    intermediate_size=64, vision_output_dim=32,
                                    projector_input_dim=32, projector_output_dim=32,
                                    image_size=28, patch_size=14)
        model = Llama4ForConditionalGeneration(Llama4Config(text_config=text.to_dict(),
                                                            vision_config=vision.to_dict()))
    else:
        model = Llama4ForCausalLM(text)
    model = model.eval()
    with torch.no_grad():   # norms at 1 would hide a missing norm weight: perturb them
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
            elif "router" in name:   # spread routing so every expert is used
                p.mul_(20.0)
    return model


@pytest.fixture(scope="module")
def llama4(tmp_path_factory):
    model = make_llama4()
    path = tmp_path_factory.mktemp("tiny-llama4")
    model.save_pretrained(path)
    return model, str(path)


def runner_logits(llm, ids: list[int], splits: list[int]) -> torch.Tensor:
    """Logits at every position, computed in consecutive pieces over the paged cache (each
    attending to the cached earlier ones), through the runner's local metadata."""
    eng = llm.llm_engine
    runner = eng.executor.worker.runner
    n, bs, dev = len(ids), runner.block_size, runner.device
    table = torch.arange(-(-n // bs), dtype=torch.int32, device=dev).unsqueeze(0)
    outs = []
    bounds = [0, *splits, n]
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        qsl = torch.tensor([0, hi - lo], dtype=torch.int32)
        seq = torch.tensor([hi], dtype=torch.int32)
        md = AttentionMetadata(
            num_actual_tokens=hi - lo, max_query_len=hi - lo, max_seq_len=hi,
            query_start_loc=qsl.to(dev), seq_lens=seq.to(dev), block_table=table,
            slot_mapping=torch.arange(lo, hi, dtype=torch.int64, device=dev),
            query_start_loc_cpu=qsl, seq_lens_cpu=seq)
        with torch.inference_mode(), set_forward_context(md, runner.extra_metadata(md)):
            h = runner.model(torch.tensor(ids[lo:hi], device=dev), torch.arange(lo, hi, device=dev))
            outs.append(runner.model.compute_logits(h).cpu())
    eng.reset_prefix_cache()  # blocks 0.. were written behind the scheduler's back
    return torch.cat(outs)


@pytest.mark.parametrize("chunk,block_size", [(32, 16), (24, 16), (20, 32)])
def test_logits_match_hf(chunk, block_size, tmp_path, make_llm):
    """Chunk sizes that are and are not multiples of the block size (a chunk starting inside a
    block); pieces that start mid-chunk and cross chunk boundaries."""
    hf = make_llama4(attention_chunk_size=chunk)
    hf.save_pretrained(tmp_path)
    llm = make_llm(str(tmp_path), block_size=block_size, max_model_len=256)
    ids = np.random.default_rng(0).integers(0, VOCAB - 1, size=130).tolist()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].float()
    ours = runner_logits(llm, ids, splits=[37, 38, 90])
    diff = (ours - ref).abs().max().item()
    assert diff < 1e-4, f"max abs logit diff {diff}"


# Prompt lengths: inside chunk 0 (20), crossing chunk 0 -> 1 during decode (28 + 8), crossing one
# boundary (45) and two (75) in the prompt, and four (130). Each runs where it fits.
PROMPT_LENS = (20, 28, 45, 75, 130)


def hf_greedy_nocache(model, prompt: list[int], n: int) -> list[int]:
    """Greedy continuation by full recomputation (no KV cache): HF's chunked mask over absolute
    positions is the whole definition, with no cache-layer subtleties."""
    cache = model.__dict__.setdefault("_greedy_cache", {})   # per model: several are tested
    key = (tuple(prompt), n)
    if key not in cache:
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(n):
                ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
        cache[key] = ids[len(prompt):]
    return cache[key]


def _prompts(max_model_len: int) -> list[tuple[list[int], int]]:
    rng = np.random.default_rng(7)
    base = rng.integers(2, VOCAB - 1, size=max(PROMPT_LENS)).tolist()
    out = []
    for i, n in enumerate(PROMPT_LENS):
        if n >= max_model_len:
            continue
        # Shared prefixes (the first tokens of `base`) so prefix caching has something to hit;
        # distinct tails.
        prompt = base[:n - 3] + [3 + i, 5 + i, 7 + i]
        out.append((prompt, min(8, max_model_len - n)))
    return out


@pytest.mark.parametrize("prefix_caching", [False, True], ids=["nocache", "prefixcache"])
@pytest.mark.parametrize("chunked_prefill", [False, True], ids=["whole", "chunked"])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("max_model_len", [24, 32, 48, 100, 256])
def test_greedy_matches_hf(llama4, make_llm, max_model_len, block_size, chunked_prefill,
                           prefix_caching):
    from kvflow import SamplingParams
    hf, path = llama4
    llm = make_llm(path, max_model_len=max_model_len, block_size=block_size,
                   enable_chunked_prefill=chunked_prefill, enable_prefix_caching=prefix_caching,
                   max_num_batched_tokens=16 if chunked_prefill else max_model_len,
                   max_num_seqs=4)
    prompts = _prompts(max_model_len)
    for rnd in range(2):   # the second round re-reads cached prefixes when caching is on
        outs = llm.generate([{"prompt_token_ids": p} for p, _ in prompts],
                            [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
                             for _, n in prompts], use_tqdm=False)
        for (p, n), o in zip(prompts, outs):
            assert o.outputs[0].token_ids == hf_greedy_nocache(hf, p, n), (len(p), rnd)
        if rnd == 1 and prefix_caching and max_model_len > 2 * block_size:
            assert max(o.num_cached_tokens for o in outs) > 0


@pytest.mark.parametrize("chunk,block_size", [(24, 16), (20, 32)])
def test_greedy_chunk_not_a_multiple_of_block_size(chunk, block_size, tmp_path, make_llm):
    """Chunks starting inside a KV block, through the engine with chunked prefill and prefix
    caching (second round hits the cache)."""
    from kvflow import SamplingParams
    hf = make_llama4(attention_chunk_size=chunk)
    hf.save_pretrained(tmp_path)
    llm = make_llm(str(tmp_path), max_model_len=100, block_size=block_size,
                   max_num_batched_tokens=16, max_num_seqs=4)
    prompts = _prompts(100)
    for _ in range(2):
        outs = llm.generate([{"prompt_token_ids": p} for p, _ in prompts],
                            [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
                             for _, n in prompts], use_tqdm=False)
        for (p, n), o in zip(prompts, outs):
            assert o.outputs[0].token_ids == hf_greedy_nocache(hf, p, n), len(p)


def test_conditional_generation_checkpoint_serves_text(tmp_path, make_llm, caplog):
    """A Llama4ForConditionalGeneration checkpoint: the language model loads from under
    `language_model.`, the vision tower and projector are skipped with one log line."""
    hf = make_llama4(conditional=True)
    hf.save_pretrained(tmp_path)
    with caplog.at_level(logging.INFO, logger="kvflow"):
        llm = make_llm(str(tmp_path), max_model_len=128)
    skipped = [r for r in caplog.records if "does not serve" in r.getMessage()]
    assert len(skipped) == 1 and "vision_model" in skipped[0].getMessage()
    assert not [r for r in caplog.records if "ignored" in r.getMessage()]
    ids = np.random.default_rng(2).integers(0, VOCAB - 1, size=70).tolist()
    with torch.no_grad():
        ref = hf.language_model(torch.tensor([ids])).logits[0].float()
    assert (runner_logits(llm, ids, splits=[33]) - ref).abs().max().item() < 1e-4


def test_decode_graph_inputs_build_local_metadata(llama4, make_llm):
    """The CUDA-graph decode path (DecodeGraphs._forward, driven eagerly on CPU: capture needs
    a GPU) recomputes the local metadata from its persistent buffers and gives the eager
    runner's logits, for decodes in chunk 0, at a chunk's first position and past it."""
    from kvflow.worker.cuda_graphs import DecodeGraphs
    hf, path = llama4
    bs_ = 16
    llm = make_llm(path, max_model_len=100, block_size=bs_)
    runner = llm.llm_engine.executor.worker.runner
    graphs = DecodeGraphs(runner.model, runner.device, runner.max_model_len, bs_,
                          runner.max_blocks_per_req, [4], local_chunk=runner.local_chunk)
    ids = np.random.default_rng(4).integers(0, VOCAB - 1, size=90).tolist()
    ref = runner_logits(llm, ids, splits=[])     # writes the KV of all 90 positions
    seq = [10, 33, 65]                           # decode of position seq - 1 (rows 0..2), 1 pad
    b = len(seq)
    graphs.input_ids[:b] = torch.tensor([ids[s - 1] for s in seq])
    graphs.positions[:b] = torch.tensor([s - 1 for s in seq])
    graphs.slot_mapping[:b] = torch.tensor([s - 1 for s in seq])   # rewrite the same K/V
    graphs.seq_lens[:b] = torch.tensor(seq, dtype=torch.int32)
    graphs.block_table[:b] = torch.arange(runner.max_blocks_per_req, dtype=torch.int32)
    with torch.inference_mode():
        graphs._forward(4)
    for row, s in enumerate(seq):
        assert (graphs.logits[row].cpu() - ref[s - 1]).abs().max().item() < 1e-4
    llm.llm_engine.reset_prefix_cache()


def test_decode_graphs_when_max_model_len_fits_one_chunk(llama4, make_llm):
    """max_model_len <= attention_chunk_size: local layers read the global metadata inside the
    decode graph too (the Scout TP=2 device run at 4096/8192 < 8192-chunk failed capture with
    'the step provides metadata only for global' before this)."""
    from kvflow.worker.cuda_graphs import DecodeGraphs
    hf, path = llama4
    llm = make_llm(path, max_model_len=32, block_size=16)     # chunk 32: one chunk
    runner = llm.llm_engine.executor.worker.runner
    assert runner.local_chunk == 32
    graphs = DecodeGraphs(runner.model, runner.device, runner.max_model_len, 16,
                          runner.max_blocks_per_req, [2], local_chunk=runner.local_chunk)
    assert graphs.local_is_global and graphs.local_chunk is None
    ids = np.random.default_rng(5).integers(0, VOCAB - 1, size=20).tolist()
    ref = runner_logits(llm, ids, splits=[])
    graphs.input_ids[:1] = ids[19]
    graphs.positions[:1] = 19
    graphs.slot_mapping[:1] = 19
    graphs.seq_lens[:1] = 20
    graphs.block_table[:1] = torch.arange(runner.max_blocks_per_req, dtype=torch.int32)
    with torch.inference_mode():
        graphs._forward(2)
    assert (graphs.logits[0].cpu() - ref[19]).abs().max().item() < 1e-4
    llm.llm_engine.reset_prefix_cache()


def test_sigmoid_top1_routing_and_input_weighting():
    """Llama 4 routing: top-1 of the raw logits, weight sigmoid(logit), applied to the expert's
    input (expert(w * x), not w * expert(x)); the softmax path is unchanged."""
    from kvflow.layers.moe import FusedMoE, fused_moe_torch, select_experts
    g = torch.Generator().manual_seed(0)
    t, h, inter, e = 9, 8, 6, 4
    logits = torch.randn(t, e, generator=g)
    w, ids = select_experts(logits, 1, renormalize=False, scoring="sigmoid")
    assert torch.equal(ids[:, 0], logits.argmax(-1))
    assert torch.allclose(w[:, 0], torch.sigmoid(logits.max(-1).values))
    sw, sids = select_experts(logits, 2, renormalize=True)        # softmax path intact
    assert torch.allclose(sw.sum(-1), torch.ones(t)) and sids.shape == (t, 2)
    layer = FusedMoE(e, h, inter)
    with torch.no_grad():
        layer.w13.normal_(generator=g)
        layer.w2.normal_(generator=g)
    x = torch.randn(t, h, generator=g)
    ours = layer(x, w, ids, weights_on_input=True)
    ref = fused_moe_torch(x * w, layer.w13, layer.w2, torch.ones_like(w), ids)
    assert torch.allclose(ours, ref, atol=1e-5)
    assert not torch.allclose(ours, layer(x, w, ids), atol=1e-3)   # the two orders differ
    with pytest.raises(ValueError, match="top_k == 1"):
        layer(x, sw, sids, weights_on_input=True)


def test_stacked_expert_loader_tp_shards_sum_to_full():
    """HF Llama 4 fused expert tensors (gate_up_proj [E, H, 2I], down_proj [E, I, H]) loaded
    under tp=2: the ranks' partial outputs sum to the unsharded layer, which equals HF's bmm."""
    from kvflow.distributed import get_tp_rank, get_tp_size, set_tp
    from kvflow.layers.moe import FusedMoE, fused_moe_torch
    g = torch.Generator().manual_seed(2)
    e, h, inter, t = 3, 8, 12, 7
    gate_up = torch.randn(e, h, 2 * inter, generator=g)
    down = torch.randn(e, inter, h, generator=g)
    x = torch.randn(t, h, generator=g)
    ids = torch.randint(0, e, (t, 1), generator=g)
    ones = torch.ones(t, 1)
    prev = (get_tp_rank(), get_tp_size())

    def build():
        layer = FusedMoE(e, h, inter)
        layer.w13.weight_loader(layer.w13, gate_up, (None, "gate_up_stacked"))
        layer.w2.weight_loader(layer.w2, down, (None, "down_stacked"))
        return layer

    try:
        set_tp(0, 1)
        full = build()
        parts = []
        for rank in range(2):
            set_tp(rank, 2)
            layer = build()
            parts.append(fused_moe_torch(x, layer.w13, layer.w2, ones, ids))
    finally:
        set_tp(*prev)
    # HF: gate, up = (x @ gate_up_proj[e]).chunk(2); out = (up * silu(gate)) @ down_proj[e]
    gu = torch.einsum("th,thi->ti", x, gate_up[ids[:, 0]])
    gate, up = gu.chunk(2, dim=-1)
    hf = torch.einsum("ti,tih->th", up * torch.nn.functional.silu(gate), down[ids[:, 0]])
    ref = fused_moe_torch(x, full.w13, full.w2, ones, ids)
    assert torch.allclose(ref, hf, atol=1e-4)
    assert torch.allclose(parts[0] + parts[1], ref, atol=1e-4)
    with pytest.raises(ValueError, match="shape mismatch"):
        full.w13.weight_loader(full.w13, gate_up.transpose(1, 2), (None, "gate_up_stacked"))


def test_tensor_parallel_2_matches_tp1(llama4):
    """TP=2 over gloo (2 worker processes): experts' intermediate dim, shared expert, dense MLP
    and attention heads sharded; greedy tokens identical to TP=1 across chunk boundaries."""
    from kvflow import LLM, SamplingParams
    hf, path = llama4
    kw = dict(skip_tokenizer_init=True, kv_cache_memory=8 << 20, device="cpu", dtype="float32",
              max_model_len=100, max_num_batched_tokens=16, block_size=16)
    prompts = [{"prompt_token_ids": p} for p, _ in _prompts(100)]
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    one = [o.outputs[0].token_ids for o in LLM(path, **kw).generate(prompts, sp, use_tqdm=False)]
    two_llm = LLM(path, tensor_parallel_size=2, **kw)
    try:
        two = [o.outputs[0].token_ids for o in two_llm.generate(prompts, sp, use_tqdm=False)]
    finally:
        two_llm.shutdown()
    assert one == two
