"""Does torch's varlen flash attention (torch.nn.attention.varlen) run the prompt attention of
a paged cache faster than kvflow's kernel? 32 prompts x 512 tokens, fresh (throughput8k's
prompt steps), Llama-3.1-8B / Qwen3-0.6B head layouts, bf16, block size 64.

    source benchmarks/device_env.sh && python3 benchmarks/varlen_probe.py

Session 35 on the device's torch 2.11 (no paged or GQA varlen yet: K/V gathered and their
heads repeated first): ours 367 / 203 us, varlen 730 / 374 us. torch 2.13's varlen_attn takes
block_table, seqused_k and enable_gqa: rerun when the device has it (an equal-length SDPA
batch reads 182 / 96 us, benchmarks/prefill_attention_bench.py)."""
import inspect
import json
import sys

import torch

sys.path.insert(0, "benchmarks")
from graph_timing import graph_time_us  # noqa: E402
from kvflow.kernels.attention import unified_attention  # noqa: E402

try:
    from torch.nn.attention.varlen import varlen_attn
    print("varlen_attn", inspect.signature(varlen_attn))
except Exception as e:  # noqa: BLE001
    print("no varlen_attn:", e)
    raise SystemExit(0)
dev = torch.device("cuda")
for name, (h, kv, d) in {"llama3.1-8b": (32, 8, 128), "qwen3-0.6b": (16, 8, 128)}.items():
    n, L, bs = 32, 512, 64
    T = n * L
    q = torch.randn(T, h, d, dtype=torch.bfloat16, device=dev)
    nblocks = T // bs
    kc = torch.randn(nblocks, bs, kv, d, dtype=torch.bfloat16, device=dev)
    vc = torch.randn(nblocks, bs, kv, d, dtype=torch.bfloat16, device=dev)
    perm = torch.randperm(nblocks, device=dev).int()
    bt = perm.view(n, L // bs).contiguous()
    cu = torch.arange(0, T + 1, L, dtype=torch.int32, device=dev)
    seq_lens = torch.full((n,), L, dtype=torch.int32, device=dev)
    out = torch.empty_like(q)
    scale = d ** -0.5

    def ours():
        unified_attention(q, kc, vc, cu, seq_lens, bt, max_query_len=L, max_seq_len=L,
                          scale=scale, out=out)

    paged = "block_table" in inspect.signature(varlen_attn).parameters
    # Without a paged, GQA-aware varlen_attn (torch < 2.13): the prompts' K/V contiguous with
    # their heads repeated, as the engine would have to write them (the repeat is timed).
    kflat = kc[bt.flatten().long()].reshape(T, kv, d)
    vflat = vc[bt.flatten().long()].reshape(T, kv, d)

    def theirs():
        if paged:
            return varlen_attn(q, kc, vc, cu, None, L, L, scale=scale, window_size=(-1, 0),
                               enable_gqa=True, seqused_k=seq_lens, block_table=bt)
        k = kflat.repeat_interleave(h // kv, dim=1)
        v = vflat.repeat_interleave(h // kv, dim=1)
        return varlen_attn(q, k, v, cu, cu, L, L, scale=scale, window_size=(-1, 0))

    ours()
    ref = out.clone()
    try:
        got = theirs()
        err = (got.float() - ref.float()).abs().max().item()
        t_theirs = graph_time_us(theirs, reps=5, iters=20)
    except Exception as e:  # noqa: BLE001
        err, t_theirs = str(e)[:300], None
    t_ours = graph_time_us(ours, reps=5, iters=20)
    print(json.dumps(dict(model=name, paged=paged, ours_us=round(t_ours, 1),
                          varlen_us=t_theirs and round(t_theirs, 1), max_abs_diff=err)))
