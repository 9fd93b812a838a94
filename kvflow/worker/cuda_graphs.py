"""CUDA graphs for decode steps.

A decode step (every request computes exactly one token) of B requests runs a graph captured for
the smallest bucket >= B. Graph inputs live in persistent device buffers whose addresses never
change; each step copies the real inputs into their first B rows and pads the rest:

    input_ids [max_bs] int64, positions [max_bs] int64, slot_mapping [max_bs] int64 (-1 = no write)
    seq_lens [max_bs] int32 (pad rows: 1, reading slot 0 of block 0, finite and ignored)
    query_start_loc [max_bs + 1] int32 = arange (one query token per row, fixed)
    block_table [max_bs, max_blocks_per_req] int32 (only the used columns are refreshed; the
        attention kernel never reads past a row's seq_len)

Host inputs travel in one pinned-to-device copy per step: a flat int64 staging buffer
    [ids | positions | slots | seq_lens | fill_rows | rows] (max_bs each), then the block table
    (int32, max_bs x max_blocks_per_req, only the first B rows copied)
whose device copy holds the block table the graphs read (a view) and whose other parts the first
node of every graph unpacks into the buffers above (kvflow/kernels/decode_inputs.py), taking the
input token of a request whose previous token is still in flight from the runner's
`last_sampled` (fill_rows[i] = its row, else -1). `rows` (the requests' rows, batch order) lets
the runner record the sampled tokens without another copy (`staged_rows`).

The graph covers the model forward and the LM head (logits [bucket, vocab] in the model's
dtype, a static output written by the product itself); sampling runs outside, on logits[:B].
The attention backend must read every length from these tensors (host-side max_seq_len is
passed as the max_model_len upper bound), which the backend declares with
`supports_cuda_graphs`.

Chunked local attention (local_chunk set): a decode row is always exactly one virtual request,
so the local metadata has the batch's shape. Its persistent buffers (local_seq_lens,
local_seq_starts [max_bs] int32, local_block_table [max_bs, W], W the worst-case columns of one
chunk, kvflow.attention.local_attention.local_table_width) are recomputed from seq_lens /
block_table by device ops captured at the start of every graph, so a replay needs no extra
host work and no index can leave the real table.
"""
from __future__ import annotations

import logging
import time

import numpy as np
import torch

from kvflow import envs
from kvflow.attention.backend import AttentionMetadata
from kvflow.attention.local_attention import decode_local_into, local_is_global, local_table_width
from kvflow.forward_context import LOCAL, set_forward_context
from kvflow.kernels.attention_config import device_limits, dispatch_longest_first
from kvflow.kernels.decode_inputs import unpack_decode_inputs
from kvflow.kernels.decode_order import longest_first_order

logger = logging.getLogger("kvflow")


def capture_buckets(device: torch.device, buckets: list[int], body, pool,
                    before=None) -> tuple[dict, dict, float, int]:
    """One CUDA graph per bucket, largest first (smaller graphs reuse the pool's blocks):
    before(bucket) (optional) prepares its inputs, body(bucket) runs once outside the graph
    (kernel compilation, autotuning, lazy init), then is captured. Returns (graphs, what the
    captured body returned per bucket, seconds, device bytes the captures took).

    One eager run, not two: every first-call cost (a Triton specialization, a cuBLASLt plan or
    workspace, an autotuned config) is paid by the first, and a second repeated the whole
    host-bound forward: ~1/3 of the 8B model's capture time, ~2 s of its ready time."""
    t0 = time.perf_counter()
    torch.cuda.synchronize(device)
    free_before = torch.cuda.mem_get_info(device)[0]
    graphs, outputs = {}, {}
    for b in sorted(buckets, reverse=True):
        if before is not None:
            before(b)
        body(b)
        torch.cuda.synchronize(device)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=pool):
            outputs[b] = body(b)
        graphs[b] = g
    torch.cuda.synchronize(device)
    used = max(free_before - torch.cuda.mem_get_info(device)[0], 0)
    return graphs, outputs, time.perf_counter() - t0, used


# Largest decode batch captured: larger batches run eagerly. The graphs share one logits
# buffer [limit, vocab] in the model's dtype (311 MB at 1024 x 152K in bf16) and one memory
# pool, so a higher limit costs that buffer and some capture time (~1.5 s warm for 512->1024).
MAX_GRAPH_BATCH = 1024


def default_buckets(max_num_seqs: int, limit: int = MAX_GRAPH_BATCH) -> list[int]:
    top = min(max_num_seqs, limit)
    sizes = [1, 2, 4] + list(range(8, 32, 8)) + list(range(32, 256, 16)) + list(range(256, top + 1, 32))
    out = sorted({s for s in sizes if s <= top} | {top})
    return out


def captured_decode_order(seq_lens: torch.Tensor, num_kv_heads: int,
                          max_model_len: int) -> torch.Tensor | None:
    """Inside a graph capture: the longest-first order of a decode launch over these rows
    (attention_config.dispatch_longest_first's rule), sorted again at every replay from that
    replay's lengths; None where the order does not pay (or num_kv_heads is 0: unknown)."""
    if not (num_kv_heads and envs.attn_longest_first()):
        return None
    n = seq_lens.shape[0]
    if not dispatch_longest_first(n, num_kv_heads, device_limits(seq_lens.device)[0],
                                  max_model_len):
        return None
    return longest_first_order(seq_lens)


class DecodeGraphs:
    def __init__(self, model, device: torch.device, max_model_len: int, block_size: int,
                 max_blocks_per_req: int, buckets: list[int], local_chunk: int | None = None,
                 last_sampled: torch.Tensor | None = None, num_kv_heads: int = 0):
        """last_sampled: the runner's [max_num_reqs] int64 device tensor of each row's last
        sampled token (the source of fill_rows); None: inputs always come from the host.
        num_kv_heads: the attention layers' KV heads on this rank, which with the batch size
        decides whether a graph's attention dispatches the longest contexts first
        (kernels/attention_config.dispatch_longest_first); 0: never."""
        self.model = model
        self.num_kv_heads = num_kv_heads
        # As in ModelRunner.extra_metadata: local layers read the global metadata when it is
        # the same thing; otherwise the local virtual batch is rebuilt inside the graph.
        self.local_is_global = (local_chunk is not None
                                and local_is_global(local_chunk, max_model_len))
        local_chunk = None if self.local_is_global else local_chunk
        self.local_chunk = local_chunk
        self.device = device
        self.max_model_len = max_model_len
        self.block_size = block_size
        self.buckets = sorted(buckets)
        self.max_bs = self.buckets[-1]
        n = self.max_bs
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=device)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
        # Staging (see the module doc): 6 int64 rows of n, then the int32 block table.
        self._head = 6 * n
        self._mb = max_blocks_per_req
        stage_len = self._head + -(-n * max_blocks_per_req // 2)
        self._dev_stage = torch.zeros(stage_len, dtype=torch.int64, device=device)
        self.block_table = self._bt_view(self._dev_stage)
        self.last_sampled = (last_sampled if last_sampled is not None
                             else torch.zeros(1, dtype=torch.int64, device=device))
        if local_chunk is not None:
            w = local_table_width(local_chunk, block_size, max_blocks_per_req)
            self.local_seq_lens = torch.ones(n, dtype=torch.int32, device=device)
            self.local_seq_starts = torch.zeros(n, dtype=torch.int32, device=device)
            self.local_block_table = torch.zeros((n, w), dtype=torch.int32, device=device)
            # Host bound for kernel configuration: a chunk plus its offset in the first block.
            self.local_max_seq_len = min(max_model_len, local_chunk + block_size - 1)
        # Pinned host staging, two sets alternating by step parity (the runner's overlapped
        # scheduling may write step N+1's inputs while step N's copy is still queued).
        pin = device.type == "cuda"   # CPU: unpinned (tests drive _forward without graphs)
        self._stage = [torch.zeros(stage_len, dtype=torch.int64, pin_memory=pin)
                       for _ in range(2)]
        # One logits buffer shared by all graphs (a per-graph output would cost
        # sum(buckets) x vocab elements: gigabytes for a 150k vocabulary), in the model's
        # dtype: the LM head's GEMM writes it directly (see compute_logits).
        self.logits = torch.empty((n, model.config.vocab_size), dtype=model.config.dtype,
                                  device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.pool = None
        self.capture_s = 0.0
        self.capture_bytes = 0

    def _metadata(self, bs: int) -> AttentionMetadata:
        seq_lens = self.seq_lens[:bs]
        order = captured_decode_order(seq_lens, self.num_kv_heads, self.max_model_len)
        return AttentionMetadata(
            num_actual_tokens=bs, max_query_len=1, max_seq_len=self.max_model_len,
            query_start_loc=self.query_start_loc[:bs + 1], seq_lens=seq_lens,
            block_table=self.block_table[:bs], slot_mapping=self.slot_mapping[:bs],
            is_decode_only=True, decode_order=order)

    def _local_metadata(self, bs: int) -> AttentionMetadata:
        # Captured: recomputed from this replay's seq_lens / block_table.
        decode_local_into(self.seq_lens[:bs], self.block_table[:bs], self.local_chunk,
                          self.block_size, self.local_seq_lens[:bs], self.local_seq_starts[:bs],
                          self.local_block_table[:bs])
        return AttentionMetadata(
            num_actual_tokens=bs, max_query_len=1, max_seq_len=self.local_max_seq_len,
            query_start_loc=self.query_start_loc[:bs + 1], seq_lens=self.local_seq_lens[:bs],
            block_table=self.local_block_table[:bs], slot_mapping=self.slot_mapping[:bs],
            is_decode_only=True, seq_starts=self.local_seq_starts[:bs])

    def _bt_view(self, stage: torch.Tensor) -> torch.Tensor:
        """The block table part of a staging buffer: [max_bs, max_blocks_per_req] int32."""
        n, mb = self.max_bs, self._mb
        return stage.view(torch.int32)[2 * self._head:2 * self._head + n * mb].view(n, mb)

    def staged_rows(self, b: int) -> torch.Tensor:
        """The rows of the last run()'s B requests, on the device: [B] int64 (valid until the
        next run)."""
        n = self.max_bs
        return self._dev_stage[5 * n:5 * n + b]

    def _unpack(self, bs: int) -> None:
        unpack_decode_inputs(self._dev_stage, self.max_bs, bs, self.last_sampled,
                             self.input_ids, self.positions, self.slot_mapping, self.seq_lens)

    def _forward(self, bs: int) -> None:
        md = self._metadata(bs)
        if self.local_chunk is not None:
            extra = {LOCAL: self._local_metadata(bs)}
        else:
            extra = {LOCAL: md} if self.local_is_global else {}
        with set_forward_context(md, extra):
            hidden = self.model(self.input_ids[:bs], self.positions[:bs])
        self.model.compute_logits(hidden, out=self.logits[:bs])

    @torch.inference_mode()
    def capture(self) -> None:
        # The forward's inputs become inference tensors (clones made here, under inference
        # mode), like the eager runner's: a torch.compile'd forward was traced for those, and
        # dynamo guards on the inputs' dispatch keys (a normal tensor would trace and compile a
        # second graph now, outside the compile cache). Every later use (run(), from the
        # runner's launch) is under inference mode too.
        self.input_ids = self.input_ids.clone()
        self.positions = self.positions.clone()
        self.pool = torch.cuda.graph_pool_handle()

        def body(bs: int) -> None:
            self._unpack(bs)
            self._forward(bs)
        self.graphs, _, self.capture_s, self.capture_bytes = capture_buckets(
            self.device, self.buckets, body, self.pool)
        logger.info("captured %d CUDA graphs (decode batch sizes %d..%d) in %.2f s, %.2f GiB",
                    len(self.graphs), self.buckets[0], self.max_bs, self.capture_s,
                    self.capture_bytes / 2 ** 30)

    def can_run(self, num_reqs: int) -> bool:
        return bool(self.graphs) and num_reqs <= self.max_bs

    def run(self, input_ids: np.ndarray, positions: np.ndarray, slot_mapping: np.ndarray,
            seq_lens: np.ndarray, block_table: np.ndarray, parity: int = 0,
            fill_rows: np.ndarray | None = None, rows: np.ndarray | None = None) -> torch.Tensor:
        """All arrays describe B decode requests (B tokens); block_table is [B,
        max_blocks_per_req] (full rows); fill_rows [B]: the row of last_sampled holding request
        i's input token, or -1 (take input_ids[i]); rows [B]: the requests' rows (see
        staged_rows). Returns logits [B, vocab]."""
        bs = self.stage_inputs(input_ids, positions, slot_mapping, seq_lens, block_table, parity,
                               fill_rows, rows)
        self.graphs[bs].replay()
        return self.logits[:input_ids.shape[0]]

    def stage_inputs(self, input_ids: np.ndarray, positions: np.ndarray,
                     slot_mapping: np.ndarray, seq_lens: np.ndarray, block_table: np.ndarray,
                     parity: int = 0, fill_rows: np.ndarray | None = None,
                     rows: np.ndarray | None = None) -> int:
        """run()'s host part: pack the inputs and queue their one copy to the device; returns
        the bucket whose graph serves them."""
        b = input_ids.shape[0]
        bs = next(s for s in self.buckets if s >= b)
        n = self.max_bs
        stage = self._stage[parity]
        st = stage.numpy()
        st[0:b] = input_ids
        st[n:n + b] = positions
        st[2 * n:2 * n + b] = slot_mapping
        st[3 * n:3 * n + b] = seq_lens
        st[4 * n:4 * n + b] = -1 if fill_rows is None else fill_rows
        if rows is not None:
            st[5 * n:5 * n + b] = rows
        if bs > b:  # padding rows: no KV write, one harmless context token
            st[b:bs] = 0
            st[n + b:n + bs] = 0
            st[2 * n + b:2 * n + bs] = -1
            st[3 * n + b:3 * n + bs] = 1
            st[4 * n + b:4 * n + bs] = -1
        self._bt_view(stage).numpy()[:b] = block_table
        used = self._head + -(-b * self._mb // 2)   # int64 elements up to block-table row b
        self._dev_stage[:used].copy_(stage[:used], non_blocking=True)
        return bs
