"""Chunked local attention through virtual batches (kvflow/attention/local_attention.py).

* The host plan over a grid of chunk sizes, block sizes (dividing the chunk or not), context
  lengths and query lengths: every gathered column inside the real table and the request's own
  blocks, query tokens conserved in order, every KV range inside one chunk.
* The device decode builder (used inside CUDA graphs) equals the host plan on decode batches.
* Attention over the virtual batch (torch backend, and the Triton kernel under the interpreter)
  equals a dense masked reference of "query p sees keys [p // C * C, p]".
"""
from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
import torch

from kvflow.attention.backend import AttentionMetadata
from kvflow.attention.local_attention import (build_local_metadata, decode_local_into,
                                              local_table_width, plan_virtual_batch)
from kvflow.attention.torch_backend import paged_attention_ref


def _random_batch(rng, max_len: int, num_reqs: int):
    seq = rng.integers(1, max_len + 1, size=num_reqs)
    kind = rng.integers(0, 3, size=num_reqs)       # 0 decode, 1 whole prefill, 2 partial chunk
    q = np.where(kind == 0, 1, np.where(kind == 1, seq, rng.integers(1, seq + 1)))
    order = np.argsort(q != 1, kind="stable")      # decodes first, as the runner orders them
    seq, q = seq[order], q[order]
    qsl = np.concatenate([[0], np.cumsum(q)])
    return qsl, seq


GRID = list(itertools.product([7, 16, 24, 32, 50],          # chunk
                              [1, 4, 16, 32],               # block size
                              [24, 32, 48, 100, 256]))      # max_model_len


@pytest.mark.parametrize("chunk,block_size,max_len", GRID)
def test_plan_invariants(chunk, block_size, max_len):
    rng = np.random.default_rng(chunk * 1000 + block_size * 10 + max_len)
    for _ in range(20):
        qsl, seq = _random_batch(rng, max_len, int(rng.integers(1, 6)))
        # The runner's table is exactly as wide as the longest request's blocks.
        width = -(-int(seq.max()) // block_size)
        plan = plan_virtual_batch(qsl, seq, chunk, block_size, width)
        vq = np.diff(plan.query_start_loc)
        # Query tokens conserved, in order, each virtual request inside its real request.
        assert vq.sum() == qsl[-1] and plan.query_start_loc[0] == 0
        assert np.all(vq >= 1)
        own = -(-seq // block_size)
        for v in range(len(plan.req)):
            i = plan.req[v]
            assert qsl[i] <= plan.query_start_loc[v] and plan.query_start_loc[v + 1] <= qsl[i + 1]
            base = plan.first_block[v] * block_size
            lo, hi = base + plan.seq_starts[v], base + plan.seq_lens[v]   # real KV range
            assert 0 <= plan.seq_starts[v] < block_size
            assert lo % chunk == 0 and (hi - 1) // chunk == lo // chunk   # inside one chunk
            first_q = hi - vq[v]                                           # real position
            assert lo <= first_q and hi <= seq[i]
            # The queries are those real positions of request i.
            q_first_real = seq[i] - (qsl[i + 1] - qsl[i]) + (plan.query_start_loc[v] - qsl[i])
            assert q_first_real == first_q
            # Every column the virtual table holds is inside the table and the request's blocks;
            # the ones covering [0, seq_len) are exactly the right real blocks.
            cols = plan.block_cols[v]
            assert cols.min() >= 0 and cols.max() < min(width, own[i])
            need = -(-int(plan.seq_lens[v]) // block_size)
            assert np.array_equal(cols[:need], plan.first_block[v] + np.arange(need))
        assert plan.block_cols.shape[1] <= local_table_width(chunk, block_size, 1 << 30)


@pytest.mark.parametrize("chunk,block_size", [(7, 4), (32, 16), (24, 16), (20, 32), (16, 1)])
def test_device_decode_builder_equals_plan(chunk, block_size):
    rng = np.random.default_rng(3)
    max_len, n = 200, 9
    seq = rng.integers(1, max_len + 1, size=n)
    width = -(-max_len // block_size)
    table = torch.from_numpy(rng.integers(0, 1000, size=(n, width)).astype(np.int32))
    w = local_table_width(chunk, block_size, width)
    out_seq = torch.zeros(n, dtype=torch.int32)
    out_start = torch.zeros(n, dtype=torch.int32)
    out_bt = torch.zeros((n, w), dtype=torch.int32)
    decode_local_into(torch.from_numpy(seq.astype(np.int32)), table, chunk, block_size,
                      out_seq, out_start, out_bt)
    plan = plan_virtual_batch(np.arange(n + 1), seq, chunk, block_size, width)
    assert np.array_equal(out_seq.numpy(), plan.seq_lens)
    assert np.array_equal(out_start.numpy(), plan.seq_starts)
    for v in range(n):   # columns used for the KV range agree; the rest stay inside the table
        need = -(-int(plan.seq_lens[v]) // block_size)
        assert torch.equal(out_bt[v, :need], table[v, plan.block_cols[v, :need]])


def _dense_local_reference(q, k, v, qsl, seq, chunk, scale):
    """Per request: keys/values [seq, KV, D] for all positions; query rows of the request sit
    at the last positions. Query p attends to positions [p // chunk * chunk, p]."""
    out = torch.zeros_like(q)
    h, kvh = q.shape[1], k[0].shape[1]
    for i in range(len(seq)):
        n_q = qsl[i + 1] - qsl[i]
        for j in range(n_q):
            p = seq[i] - n_q + j
            lo = p // chunk * chunk
            kk = k[i][lo:p + 1].repeat_interleave(h // kvh, dim=1)       # [L, H, D]
            vv = v[i][lo:p + 1].repeat_interleave(h // kvh, dim=1)
            s = torch.einsum("hd,lhd->hl", q[qsl[i] + j], kk) * scale
            out[qsl[i] + j] = torch.einsum("hl,lhd->hd", s.softmax(-1), vv)
    return out


def _paged_case(rng, chunk, block_size, max_len, num_reqs, h=4, kvh=2, d=16):
    qsl, seq = _random_batch(rng, max_len, num_reqs)
    blocks = -(-seq // block_size)
    width = int(blocks.max())
    num_blocks = int(blocks.sum()) + 3
    perm = rng.permutation(num_blocks)                    # scattered physical blocks
    table = np.zeros((len(seq), width), dtype=np.int32)
    cache = torch.zeros(2, num_blocks, block_size, kvh, d)
    ks, vs, used = [], [], 0
    g = torch.Generator().manual_seed(int(rng.integers(1 << 30)))
    for i, s in enumerate(seq):
        table[i, :blocks[i]] = perm[used:used + blocks[i]]
        used += blocks[i]
        k, v = torch.randn(s, kvh, d, generator=g), torch.randn(s, kvh, d, generator=g)
        ks.append(k)
        vs.append(v)
        pos = torch.arange(s)
        slots = torch.from_numpy(table[i])[pos // block_size].long() * block_size + pos % block_size
        cache.view(2, -1, kvh, d)[0, slots] = k
        cache.view(2, -1, kvh, d)[1, slots] = v
    q = torch.randn(int(qsl[-1]), h, d, generator=g)
    qsl_t = torch.from_numpy(qsl.astype(np.int32))
    seq_t = torch.from_numpy(seq.astype(np.int32))
    md = AttentionMetadata(
        num_actual_tokens=int(qsl[-1]), max_query_len=int(np.diff(qsl).max()),
        max_seq_len=int(seq.max()), query_start_loc=qsl_t, seq_lens=seq_t,
        block_table=torch.from_numpy(table), slot_mapping=torch.full((int(qsl[-1]),), -1),
        query_start_loc_cpu=qsl_t, seq_lens_cpu=seq_t,
        num_decode_reqs=int(np.argmax(np.diff(qsl) != 1)) if (np.diff(qsl) != 1).any() else len(seq))
    return q, cache, md, ks, vs, qsl, seq


def metadata_to(md: AttentionMetadata, device: torch.device) -> AttentionMetadata:
    """md with its device tensors on `device` (the *_cpu fields stay on the host): the cases are
    built on CPU; compiled Triton kernels (the GPU machine's run of the suite) need CUDA inputs."""
    moved = {f.name: getattr(md, f.name).to(device)
             for f in dataclasses.fields(md) if not f.name.endswith("_cpu")
             and isinstance(getattr(md, f.name), torch.Tensor)}
    return dataclasses.replace(md, **moved)


@pytest.mark.parametrize("chunk,block_size,max_len",
                         [(32, 16, 100), (24, 16, 100), (20, 32, 90), (7, 4, 40), (32, 32, 24),
                          (16, 1, 50)])
def test_virtual_batch_attention_equals_dense_reference(chunk, block_size, max_len):
    rng = np.random.default_rng(chunk + block_size + max_len)
    for _ in range(4):
        q, cache, md, ks, vs, qsl, seq = _paged_case(rng, chunk, block_size, max_len,
                                                     int(rng.integers(1, 5)))
        local = build_local_metadata(md, chunk, block_size)
        ours = paged_attention_ref(q, cache, local, 0.25)
        ref = _dense_local_reference(q, ks, vs, qsl, seq, chunk, 0.25)
        assert torch.allclose(ours, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunk,block_size", [(24, 16), (20, 32), (32, 16)])
def test_triton_kernel_with_seq_starts(chunk, block_size):
    """The Triton kernel honors seq_starts (under TRITON_INTERPRET=1 on CPU), in its decode
    (direct) and prefill (search, split-KV) configurations."""
    pytest.importorskip("triton")
    from kvflow.kernels.attention import _attention_kernel, unified_attention
    from tests.conftest import kernel_device
    dev = torch.device(kernel_device(_attention_kernel))
    rng = np.random.default_rng(11)
    q, cache, md, ks, vs, qsl, seq = _paged_case(rng, chunk, block_size, 80, 3)
    local = metadata_to(build_local_metadata(md, chunk, block_size), dev)
    ref = _dense_local_reference(q, ks, vs, qsl, seq, chunk, 0.25)
    q, cache = q.to(dev), cache.to(dev)
    for splits in (1, 2):
        out = unified_attention(q, cache[0], cache[1], local.query_start_loc, local.seq_lens,
                                local.block_table, local.max_query_len, local.max_seq_len,
                                0.25, num_splits=splits, num_decode_reqs=local.num_decode_reqs,
                                seq_starts=local.seq_starts).cpu()
        assert torch.allclose(out, ref, atol=2e-3, rtol=2e-3), (splits, (out - ref).abs().max())
