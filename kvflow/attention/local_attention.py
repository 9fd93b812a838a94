"""Chunked local attention for every backend: per-chunk virtual requests.

Semantics (HF Llama 4 `chunked_attention` layers): with chunk size C, the query at position p
attends to the keys at positions [p // C * C, p] — causal attention restricted to its chunk.

Instead of teaching every kernel that mask, each step's batch is rewritten once into a virtual
batch in which every request lies inside one chunk; the ordinary causal kernels then compute
exactly the local attention. A real request whose query positions [seq_len - q_len, seq_len)
touch chunks c0..c1 becomes c1 - c0 + 1 virtual requests. Virtual request (i, c):

    queries   the real positions [max(first_q, c*C), min(seq_len, (c+1)*C)), i.e. a contiguous
              slice of request i's query tokens; virtual requests are emitted in (i, c) order,
              so the flattened query tokens are exactly the real ones, in the same order (no
              permutation of q or of the output, and the same slot_mapping for the KV write).
    keys      the real positions [c*C, min(seq_len, (c+1)*C)).
    table     the real row i from column b0 = c*C // block_size on: virtual position v is real
              position b0*block_size + v. Since C need not be a multiple of the block size, the
              chunk may start inside block b0: seq_starts = c*C - b0*block_size (< block_size)
              masks the keys of the previous chunk that share that block.
    seq_len   min(seq_len, (c+1)*C) - b0*block_size.

Invariants (tested over a grid in tests/test_local_attention.py): every block-table column
gathered is < the real table's width and < the request's own block count (never past the table,
whatever max_model_len, block size or chunk size), query tokens are conserved, every virtual KV
range [b0*bs + seq_starts, b0*bs + seq_len) lies inside one chunk and ends at the last query.

Two builders: `build_local_metadata` (host plan, any batch: prefill, chunked prefill with a
cached prefix, decode, mixed) and `decode_local_into` (device ops only, for CUDA graphs: a decode
row always maps to exactly one virtual request, so the virtual batch has the real batch's shape
and is recomputed inside the captured graph from the graph's persistent inputs).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kvflow.attention.backend import AttentionMetadata


def local_is_global(chunk: int, max_model_len: int) -> bool:
    """Every position of every request lies in chunk 0: local layers attend exactly like global
    ones and read the step's global metadata (no virtual batch is built)."""
    return max_model_len <= chunk


def local_table_width(chunk: int, block_size: int, max_blocks_per_req: int) -> int:
    """Most block-table columns a virtual request can need: a chunk of C tokens starting at
    offset < block_size within its first block spans at most ceil((C + bs - 1) / bs) blocks."""
    return max(1, min(-(-(chunk + block_size - 1) // block_size), max_blocks_per_req))


@dataclass
class VirtualBatch:
    """Host plan of a virtual batch of V requests (numpy, int64)."""
    query_start_loc: np.ndarray   # [V + 1]
    seq_lens: np.ndarray          # [V]
    seq_starts: np.ndarray        # [V]   first attended virtual position, < block_size
    req: np.ndarray               # [V]   real request of each virtual request
    first_block: np.ndarray       # [V]   real table column of virtual block 0
    block_cols: np.ndarray        # [V, W] real table columns, clamped into the request's blocks


def plan_virtual_batch(query_start_loc: np.ndarray, seq_lens: np.ndarray, chunk: int,
                       block_size: int, table_width: int) -> VirtualBatch:
    """query_start_loc [B + 1], seq_lens [B] of the real batch; table_width = columns of the
    real block table. Vectorised: no Python loop over requests or tokens."""
    qsl = np.asarray(query_start_loc, dtype=np.int64)
    seq = np.asarray(seq_lens, dtype=np.int64)
    q_len = qsl[1:] - qsl[:-1]                                        # [B]
    first = seq - q_len                                               # first query position
    c0 = first // chunk
    c1 = (seq - 1) // chunk
    # A request without queries (padding) still gets one (empty) virtual request.
    n = np.maximum(c1 - c0 + 1, 1)                                    # [B]
    v_total = int(n.sum())
    req = np.repeat(np.arange(seq.shape[0]), n)                       # [V]
    j = np.arange(v_total) - np.repeat(np.cumsum(n) - n, n)           # index within request
    c = c0[req] + j                                                   # chunk of each virtual req
    kv_lo = c * chunk
    kv_end = np.minimum(seq[req], kv_lo + chunk)                      # = end of its queries
    q_lo = np.maximum(first[req], kv_lo)
    vq = np.maximum(kv_end - q_lo, 0)                                 # [V]
    b0 = kv_lo // block_size
    starts = kv_lo - b0 * block_size                                  # [V] in [0, block_size)
    vseq = np.maximum(kv_end - b0 * block_size, 0)                    # [V]
    vqsl = np.concatenate([[0], np.cumsum(vq)]) + qsl[0]
    width = int(-(-max(int(vseq.max(initial=0)), 1) // block_size))
    # Columns past a request's own blocks (or past the table) are never read by a correct
    # kernel (they lie beyond seq_len); clamping keeps even their indices inside the table.
    own = np.minimum(-(-seq // block_size), table_width)              # [B] real blocks
    last = np.maximum(own[req] - 1, 0)[:, None]
    cols = np.minimum(b0[:, None] + np.arange(width)[None, :], last)  # [V, W]
    return VirtualBatch(vqsl, vseq, starts, req, b0, cols)


def build_local_metadata(md: AttentionMetadata, chunk: int, block_size: int) -> AttentionMetadata:
    """The virtual batch of `md` for chunk size `chunk` (see module doc). Uses md's host copies
    of query_start_loc / seq_lens when present (the runner provides them; no device sync)."""
    qsl = md.query_start_loc_cpu if md.query_start_loc_cpu is not None else md.query_start_loc.cpu()
    seq = md.seq_lens_cpu if md.seq_lens_cpu is not None else md.seq_lens.cpu()
    plan = plan_virtual_batch(qsl.numpy(), seq.numpy(), chunk, block_size, md.block_table.shape[1])
    dev = md.block_table.device
    rows = torch.from_numpy(plan.req).to(dev, non_blocking=True)
    cols = torch.from_numpy(plan.block_cols).to(dev, non_blocking=True)
    table = md.block_table[rows[:, None], cols]                       # [V, W] int32
    qsl_v = torch.from_numpy(plan.query_start_loc.astype(np.int32))
    seq_v = torch.from_numpy(plan.seq_lens.astype(np.int32))
    # Every decode row (q_len 1) is one virtual request and decodes come first, so the count of
    # leading decode requests carries over unchanged.
    return AttentionMetadata(
        num_actual_tokens=md.num_actual_tokens,
        max_query_len=int(np.diff(plan.query_start_loc).max(initial=0)),
        max_seq_len=int(plan.seq_lens.max(initial=0)),
        query_start_loc=qsl_v.to(dev, non_blocking=True),
        seq_lens=seq_v.to(dev, non_blocking=True),
        block_table=table,
        slot_mapping=md.slot_mapping,
        query_start_loc_cpu=qsl_v, seq_lens_cpu=seq_v,
        is_decode_only=md.is_decode_only, num_decode_reqs=md.num_decode_reqs,
        seq_starts=torch.from_numpy(plan.seq_starts.astype(np.int32)).to(dev, non_blocking=True))


def decode_local_into(seq_lens: torch.Tensor, block_table: torch.Tensor, chunk: int,
                      block_size: int, out_seq_lens: torch.Tensor, out_seq_starts: torch.Tensor,
                      out_block_table: torch.Tensor) -> None:
    """Decode batch (one query per request) -> its virtual batch, with device ops only (CUDA
    graph capturable), written into persistent buffers:
        seq_lens [n] int32, block_table [n, M] int32  (the real batch; padding rows seq_len >= 1)
        out_seq_lens / out_seq_starts [n] int32, out_block_table [n, W] int32
    The query sits at position seq_len - 1, in chunk c = (seq_len - 1) // C."""
    seq = seq_lens.long().clamp(min=1)                                 # [n]
    kv_lo = (seq - 1) // chunk * chunk
    b0 = kv_lo // block_size
    out_seq_lens.copy_(seq - b0 * block_size)
    out_seq_starts.copy_(kv_lo - b0 * block_size)
    width = out_block_table.shape[1]
    last = ((seq + block_size - 1) // block_size).clamp(max=block_table.shape[1]) - 1   # [n]
    cols = torch.minimum(b0[:, None] + torch.arange(width, device=seq.device)[None, :],
                         last[:, None])                                # [n, W]
    out_block_table.copy_(torch.gather(block_table, 1, cols))
