"""One-token decode attention whose K/V tiles arrive by TMA (Hopper's tensor memory accelerator).

Why a second decode kernel: `attention._attention_kernel` gathers each K/V tile with pointer
loads, one address per 16 bytes, and spends most of an SM's issue slots on that address math
and the tile's layout changes: it reads ~55 GB/s of KV per SM whatever the tile
(benchmarks/overlap_probe.py --attn-sweep). With every SM that is enough for the copy rate
(4.3 TB/s needs ~33 GB/s an SM), but not on a share of the SMs, which is what overlapping the
attention with GEMMs needs. Here a KV block's tile of one KV head is one TMA copy ([block_size,
D] at (block * block_size, kv_head * D) of the cache seen as [slots, KV * D]), pipelined by
Triton over the request's blocks, so the SM's work per tile is two tensor-core dots and the
online softmax.

Measured (H200, Llama-3.1-8B heads, 64-slot blocks, session 20): on the whole GPU it reads
as fast as the pointer kernel at 500 requests (4.34 TB/s) and 100 (3.95), +3.6% at 200
(4.10 against 3.95); on 48 SMs 78 GB/s an SM (1 warp, 2 stages) against 55. On the engine's
own decode inputs (real lengths, block tables and longest-first order; benchmarks/
attention_replay.py --tma, session 24) it reads slower than the pointer kernel at 32-64 and
184-247 requests, and one tile wins 2-5% at 96-140: the engine does not dispatch it
(docs/performance.md, sessions 20 and 24); benchmarks/overlap_probe.py uses it.

Scope: one query token per request (decode), 16-bit caches, D a power of two <= 256, a KV
block of 16-128 slots (the tile is one block), no split-KV: a program per (KV head, request).
Semantics: `attention.unified_attention` with max_query_len = 1 (positions < seq_len attended);
the online-softmax steps are that kernel's own (`_attend_loaded`, `_softmax_step`).
Torch reference: kvflow.kernels.reference.ref_paged_attention.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvflow.kernels.attention_kernel import _attend_loaded, _softmax_step
from kvflow.kernels.pdl import pdl_launch, pdl_launch_dependents, pdl_wait

try:  # Triton >= 3.3 (host-side TMA descriptors)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton
    TensorDescriptor = None

_LOG2E = 1.4426950408889634


@triton.jit(do_not_specialize=["stride_bt"])
def _decode_tma_kernel(q_ptr, k_desc, v_desc, out_ptr, seq_lens_ptr, bt_ptr, stride_bt,
                       stride_qt, stride_qh, stride_ot, stride_oh, qk_scale,
                       QPK: tl.constexpr, QP: tl.constexpr, D: tl.constexpr,
                       BLOCK: tl.constexpr, HEADS_FIRST: tl.constexpr,
                       STAGES: tl.constexpr, USE_PDL: tl.constexpr,
                       order_ptr=None, HAS_ORDER: tl.constexpr = False):
    if HEADS_FIRST:                    # the KV heads of a request run together: whole slot rows
        kv_head = tl.program_id(0)
        row = tl.program_id(1)
    else:
        kv_head = tl.program_id(1)
        row = tl.program_id(0)
    pdl_wait(USE_PDL)                  # q and this step's KV slot come from the kernel before
    pdl_launch_dependents(USE_PDL)
    if HAS_ORDER:                      # grid row i serves request order[i] (longest first)
        row = tl.load(order_ptr + row)
    seq_len = tl.load(seq_lens_ptr + row)
    hq = tl.arange(0, QP)
    h_ok = hq < QPK
    dims = tl.arange(0, D)
    heads = (kv_head * QPK + hq).to(tl.int64)
    q = tl.load(q_ptr + row.to(tl.int64) * stride_qt + heads[:, None] * stride_qh
                + dims[None, :], mask=h_ok[:, None], other=0.0)        # [QP, D]
    m_i = tl.full([QP], float("-inf"), tl.float32)
    l_i = tl.zeros([QP], tl.float32)
    acc = tl.zeros([QP, D], tl.float32)
    bt_row = bt_ptr + row.to(tl.int64) * stride_bt
    col = kv_head * D
    n_full = seq_len // BLOCK
    offs = tl.arange(0, BLOCK)
    for b in tl.range(0, n_full, num_stages=STAGES):
        slot0 = tl.load(bt_row + b) * BLOCK
        k = k_desc.load([slot0, col])                                   # [BLOCK, D]
        v = v_desc.load([slot0, col])
        acc, m_i, l_i = _attend_loaded(acc, m_i, l_i, q, k, v, qk_scale, "tf32")
    if n_full * BLOCK < seq_len:       # the partly filled last block: slots past the end masked
        slot0 = tl.load(bt_row + n_full) * BLOCK
        kpos = n_full * BLOCK + offs                                    # [BLOCK]
        k = k_desc.load([slot0, col])
        v = v_desc.load([slot0, col])
        v = tl.where((kpos < seq_len)[:, None], v, 0.0)  # unwritten slots may hold NaN
        s = tl.dot(q, tl.trans(k))                                      # [QP, BLOCK]
        q_pos = tl.full([QP], 0, tl.int32) + (seq_len - 1)              # the decode token
        p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i, kpos, q_pos, seq_len, 0, qk_scale, True)
        acc = tl.dot(p.to(q.dtype), v, acc * alpha[:, None])
    out = acc / l_i[:, None]
    tl.store(out_ptr + row.to(tl.int64) * stride_ot + heads[:, None] * stride_oh
             + dims[None, :], out.to(out_ptr.dtype.element_ty), mask=h_ok[:, None])


def supported(query: torch.Tensor, key_cache: torch.Tensor) -> bool:
    """Whether `decode_attention_tma` serves these shapes and this device."""
    if TensorDescriptor is None:
        return False
    _, block, kv, d = key_cache.shape
    if query.dtype not in (torch.float16, torch.bfloat16) or key_cache.dtype != query.dtype:
        return False
    if key_cache.is_cuda and torch.cuda.get_device_capability(key_cache.device)[0] < 9:
        return False
    return (d in (64, 128, 256) and block in (16, 32, 64, 128) and key_cache.is_contiguous()
            and query.stride(2) == 1)


def decode_attention_tma(query: torch.Tensor, key_cache: torch.Tensor,
                         value_cache: torch.Tensor, seq_lens: torch.Tensor,
                         block_table: torch.Tensor, scale: float,
                         out: torch.Tensor | None = None, num_stages: int = 3,
                         num_warps: int = 4, heads_first: bool = True,
                         request_order: torch.Tensor | None = None) -> torch.Tensor:
    """query [B, H, D] (one token per request), key/value_cache [num_blocks, block, KV, D]
    (contiguous), seq_lens [B] int32 (>= 1, the query's own slot written), block_table
    [B, max_blocks] int32 -> out [B, H, D]. request_order [B] int32 (optional, a permutation
    of 0..B-1): grid row i serves request request_order[i], as in `unified_attention`."""
    b, h, d = query.shape
    _, block, kv, _ = key_cache.shape
    assert supported(query, key_cache), (query.shape, query.dtype, key_cache.shape)
    if out is None:
        out = torch.empty_like(query)
    if b == 0:
        return out
    slots = key_cache.shape[0] * block
    k_desc = TensorDescriptor.from_tensor(key_cache.view(slots, kv * d), [block, d])
    v_desc = TensorDescriptor.from_tensor(value_cache.view(slots, kv * d), [block, d])
    qpk = h // kv
    grid = (kv, b) if heads_first else (b, kv)
    order = {}
    if request_order is not None:
        assert request_order.shape == (b,), (request_order.shape, b)
        order = dict(order_ptr=request_order, HAS_ORDER=True)
    _decode_tma_kernel[grid](
        query, k_desc, v_desc, out, seq_lens, block_table, block_table.stride(0),
        query.stride(0), query.stride(1), out.stride(0), out.stride(1), scale * _LOG2E,
        QPK=qpk, QP=max(16, triton.next_power_of_2(qpk)), D=d, BLOCK=block,
        HEADS_FIRST=heads_first, STAGES=num_stages, num_warps=num_warps,
        **order, **pdl_launch(query.device))
    return out
