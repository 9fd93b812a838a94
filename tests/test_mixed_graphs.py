"""CUDA graphs for small mixed / prefill steps (kvflow/worker/mixed_graphs.py).

On CPU nothing is captured: the runner is given a MixedGraphs whose run() executes the graph
body eagerly (staging, one copy, unpack, forward at the bucket's padded size with bound-valued
metadata). That is everything a replay computes, so the engine's outputs through it must match
the plain eager path, padding tokens and padding requests included. The GPU test
(test_gpu.py::test_fp32_greedy_equals_hf) runs the captured graphs against HF."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kvflow import SamplingParams
from kvflow.config import CompilationConfig
from kvflow.worker import mixed_graphs
from kvflow.worker.mixed_graphs import MixedGraphs, default_token_buckets
from tests.conftest import DEVICE, hf_greedy


def test_default_decode_buckets():
    """Decode graphs: fine buckets at small batch, steps of 32 from 256, up to max_num_seqs or
    MAX_GRAPH_BATCH (vLLM's default max_num_seqs on large GPUs is 1024)."""
    from kvflow.worker.cuda_graphs import MAX_GRAPH_BATCH, default_buckets
    assert MAX_GRAPH_BATCH == 1024
    b = default_buckets(1024)
    assert b[:6] == [1, 2, 4, 8, 16, 24] and b[-3:] == [960, 992, 1024] and len(b) == 45
    assert default_buckets(4096)[-1] == 1024
    assert default_buckets(300)[-2:] == [288, 300]
    assert default_buckets(1) == [1]


def test_default_buckets():
    assert default_token_buckets(8192) == [16, 32, 64, 128, 256, 512]
    assert default_token_buckets(64) == [16, 32, 64]
    assert default_token_buckets(48) == [16, 32, 48]
    assert default_token_buckets(8) == [8]
    # Riding steps hold exactly ride_budget tokens: a bucket of their own, not padded.
    assert default_token_buckets(16384, 384) == [16, 32, 64, 128, 256, 384, 512]
    assert default_token_buckets(16384, 1536) == [16, 32, 64, 128, 256, 512]


def test_cudagraph_mode_config():
    assert CompilationConfig().mixed_graphs and CompilationConfig().decode_graphs
    c = CompilationConfig.parse({"cudagraph_mode": "full_decode_only"})
    assert c.cudagraph_mode == "FULL_DECODE_ONLY" and c.decode_graphs and not c.mixed_graphs
    c = CompilationConfig.parse('{"cudagraph_mode": "FULL_AND_PIECEWISE", "level": 0}')
    assert c.cudagraph_mode == "FULL" and c.mixed_graphs
    c = CompilationConfig.parse({"cudagraph_mode": "NONE"})
    assert not c.decode_graphs and not c.mixed_graphs
    assert not CompilationConfig.parse(None, enforce_eager=True).mixed_graphs
    with pytest.raises(ValueError, match="cudagraph_mode.*no piecewise graphs"):
        CompilationConfig.parse({"cudagraph_mode": "PIECEWISE"})
    with pytest.raises(ValueError, match="cudagraph_mode must be one of"):
        CompilationConfig.parse({"cudagraph_mode": 3})


def test_stage_inputs_layout_and_unpack():
    """One step of 3 requests (a decode whose token is still on the device, a 4-token chunk,
    a 2-token prompt) in bucket 16: the device views hold the inputs, padding tokens write no
    KV, padding requests are empty, and the in-flight token comes from last_sampled."""
    last = torch.tensor([70, 71, 72, 73], dtype=torch.int64)
    g = MixedGraphs(model=None, device=torch.device("cpu"), max_model_len=64,
                    max_blocks_per_req=4, max_num_reqs=8, buckets=[16, 32], last_sampled=last)
    ids = np.array([0, 5, 6, 7, 8, 9, 10]); pos = np.array([9, 0, 1, 2, 3, 0, 1])
    slots = np.array([25, 32, 33, 34, 35, 48, 49]); fill = np.array([2, -1, -1, -1, -1, -1, -1])
    qsl = np.array([0, 1, 5, 7]); lens = np.array([10, 4, 2])
    bt = np.array([[1, 9, 0, 0], [2, 0, 0, 0], [3, 0, 0, 0]], dtype=np.int32)
    for parity in (0, 1):
        T = g.stage_inputs(ids, pos, slots, fill, qsl, lens, bt, np.array([0, 6]),
                           np.array([2, 5]), parity)
        assert T == 16
        v = g._dev_views[16]
        g._unpack(T)
        assert g.input_ids[:7].tolist() == [72, 5, 6, 7, 8, 9, 10]
        assert g.input_ids[7:16].tolist() == [0] * 9
        assert v.positions.tolist() == pos.tolist() + [0] * 9
        assert v.slots.tolist() == slots.tolist() + [-1] * 9          # padding: no KV write
        assert v.qsl.tolist() == [0, 1, 5, 7] + [7] * 5                # R = min(16, 8) rows
        assert v.seq_lens.tolist() == [10, 4, 2] + [1] * 5
        assert v.block_table[:3].tolist() == bt.tolist()
        assert v.logits_idx[:2].tolist() == [0, 6] and v.sample_rows[:2].tolist() == [2, 5]
    # A bigger step lands in the next bucket; its views are separate.
    T = g.stage_inputs(np.arange(20), np.arange(20), np.arange(20), np.full(20, -1),
                       np.array([0, 20]), np.array([20]), bt[:1], np.array([19]),
                       np.array([0]))
    assert T == 32 and g._dev_views[32].qsl[:3].tolist() == [0, 20, 20]


def test_graph_metadata_splits_decodes(monkeypatch):
    """The graph body's attention metadata: bounds (the bucket, max_model_len) and
    split_decodes, since decodes may be any of the rows; the decode launch's longest-first
    order over all R rows where the dispatch rule calls for it (512 rows x 8 KV heads: more
    programs than an H200 holds at once). KVFLOW_ATTN_SPLIT_DECODES=0: one launch, no order."""
    from kvflow.forward_context import get_forward_context
    from kvflow.kernels.decode_order import longest_first_order_ref
    seen = []

    def model(ids, positions):
        seen.append(get_forward_context().attn_metadata)
        return torch.zeros(ids.shape[0], 4)
    g = MixedGraphs(model=model, device=torch.device("cpu"), max_model_len=4096,
                    max_blocks_per_req=4, max_num_reqs=512, buckets=[512],
                    last_sampled=torch.zeros(512, dtype=torch.int64), num_kv_heads=8)
    g._stage_padding(512)
    g._dev_views[512].seq_lens[:3] = torch.tensor([7, 900, 40], dtype=torch.int32)
    g._forward(512)
    md = seen[-1]
    assert md.split_decodes and md.max_query_len == 512 and md.max_seq_len == 4096
    assert md.max_prompt_reqs == mixed_graphs.MAX_PROMPTS       # can_run guarantees it
    assert md.decode_order is not None
    assert md.decode_order.tolist() == longest_first_order_ref(md.seq_lens).tolist()
    monkeypatch.setenv("KVFLOW_ATTN_SPLIT_DECODES", "0")
    g._forward(512)
    assert not seen[-1].split_decodes and seen[-1].decode_order is None


def _attach(llm, buckets):
    """Give the engine's runner an uncaptured MixedGraphs; returns, per step it ran, (tokens,
    tokens taken from last_sampled)."""
    runner = llm.llm_engine.executor.worker.runner
    g = MixedGraphs(runner.model, runner.device, runner.max_model_len,
                    runner.max_blocks_per_req, runner.max_num_reqs, buckets,
                    runner.last_sampled)
    g.ready = True
    calls = []
    run = g.run

    def counting_run(*args, **kw):
        calls.append((args[0].shape[0], int((args[3] >= 0).sum())))
        return run(*args, **kw)
    g.run = counting_run
    runner.mixed_graphs = g
    return calls


def _prompts(seed, lengths):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 383, size=n).tolist() for n in lengths]


@pytest.mark.parametrize("model", ["llama", "qwen3"])
def test_engine_outputs_match_eager(model, make_llm, tmp_path, tiny_llama):
    """Chunked prefill (32-token budget) mixes prompt chunks with running decodes whose last
    token is still in flight (async scheduling); through the mixed-graph body the greedy tokens
    equal the eager runner's and HF's, and the logprobs (sampled and prompt) match the eager
    ones. (No decode graphs on CPU: decode steps run the mixed body too.)"""
    if model == "llama":
        hf, path = tiny_llama
    else:
        from tests.conftest import make_hf_model, save_hf_model
        hf = make_hf_model("qwen3")
        path = save_hf_model(hf, tmp_path / "qwen3")
    prompts = _prompts(3, (1, 7, 40, 13, 70, 2))
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=2)
    lp = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, prompt_logprobs=1)
    results = []
    for mixed in (False, True):
        llm = make_llm(path, max_num_batched_tokens=32, max_model_len=128, max_num_seqs=4,
                       async_scheduling=True)
        calls = _attach(llm, [16, 32]) if mixed else None
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy, use_tqdm=False)
        plp = llm.generate([{"prompt_token_ids": prompts[4]}], lp, use_tqdm=False)[0]
        results.append((outs, plp))
        if mixed:
            tokens = [t for t, _ in calls]
            assert max(tokens) == 32 and min(tokens) <= 16          # both buckets
            # A prompt chunk rode with a decode whose input token came from the device.
            assert any(f and t > f for t, f in calls)
    (eager, eager_plp), (graph, graph_plp) = results
    for p, e, g in zip(prompts, eager, graph):
        assert g.outputs[0].token_ids == e.outputs[0].token_ids == hf_greedy(hf, p, 12)
        for le, lg in zip(e.outputs[0].logprobs, g.outputs[0].logprobs):
            assert le.keys() == lg.keys()
            for k in le:
                assert lg[k].logprob == pytest.approx(le[k].logprob, abs=1e-4)
    assert graph_plp.outputs[0].token_ids == eager_plp.outputs[0].token_ids
    for le, lg in zip(eager_plp.prompt_logprobs[1:], graph_plp.prompt_logprobs[1:]):
        assert le.keys() == lg.keys()
        for k in le:
            assert lg[k].logprob == pytest.approx(le[k].logprob, abs=1e-4)


def test_runner_skips_graphs_for_large_steps(make_llm, tiny_llama):
    """Steps above the largest bucket run eagerly (the graph body never sees them): the first
    step (55 tokens) does, the last prompt's (3 tokens, once a sequence slot frees) does not."""
    llm = make_llm(tiny_llama[1], max_num_batched_tokens=64, max_model_len=128, max_num_seqs=2)
    calls = _attach(llm, [16])
    prompts = _prompts(4, (50, 5, 3))
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=4, ignore_eos=True),
                        use_tqdm=False)
    assert calls and all(t <= 16 for t, _ in calls)
    for p, o in zip(prompts, outs):
        assert o.outputs[0].token_ids == hf_greedy(tiny_llama[0], p, 4)


def test_runner_skips_graphs_for_many_prompts(make_llm, tiny_llama, monkeypatch):
    """A step with more prompt chunks than MAX_PROMPTS (the bound the graphs' prompt attention
    grid is sized for) runs eagerly: with a bound of 1, the first step (three prompts, 15
    tokens) does; the step of the fourth prompt, once a sequence slot frees, replays the graph
    body (so do the decode steps on CPU, which has no decode graphs)."""
    monkeypatch.setattr(mixed_graphs, "MAX_PROMPTS", 1)
    seen = []
    llm = make_llm(tiny_llama[1], max_num_batched_tokens=32, max_model_len=128, max_num_seqs=3)
    calls = _attach(llm, [16, 32])
    runner = llm.llm_engine.executor.worker.runner
    real_eager = runner._eager_forward

    def eager(nsched, *args, **kw):
        seen.append(int((nsched > 1).sum()))
        return real_eager(nsched, *args, **kw)
    monkeypatch.setattr(runner, "_eager_forward", eager)
    prompts = _prompts(5, (5, 7, 3, 6))
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=4, ignore_eos=True),
                        use_tqdm=False)
    assert seen == [3]                  # only the three-prompt step ran eagerly
    assert 6 in [t for t, _ in calls]   # the fourth prompt's step replayed the graph body
    for p, o in zip(prompts, outs):
        assert o.outputs[0].token_ids == hf_greedy(tiny_llama[0], p, 4)


@pytest.mark.skipif(DEVICE != "cpu", reason="the CPU worker never captures")
def test_cpu_worker_captures_nothing(make_llm, tiny_llama):
    llm = make_llm(tiny_llama[1])
    runner = llm.llm_engine.executor.worker.runner
    assert runner.graphs is None and runner.mixed_graphs is None
