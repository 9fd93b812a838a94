"""CUDA graphs for small steps that are not pure decodes: a prompt's prefill, or decodes mixed
with prefill chunks, of at most the largest token bucket (512) tokens.

Why: run eagerly, such a step costs its kernel launches on the host. On the H200 a 128-token
prompt took 17-19 ms of host time for 1.3 ms (Qwen3-0.6B) to 5.2 ms (Llama-3.1-8B) of GPU work
(benchmarks/results/profiles/*-first-token-871d1f7-nvidia-h200.json): every new request paid it
as its first token's latency, and in serving so did every step in which a prompt joined
running decodes. A graph replay is one launch.

A step of T tokens and B requests replays the graph of the smallest token bucket >= T. The graph
of bucket T has R = min(T, max_num_reqs) request rows (B <= T: a scheduled request has at least
one token). Its inputs live in one device staging buffer at fixed addresses, laid out per bucket:

    int64: ids [T] | positions [T] | slot_mapping [T] | fill_rows [T] | logits_indices [R]
           | sample_rows [R]
    int32: query_start_loc [R + 1] | seq_lens [R] | block_table [R, max_blocks_per_req]

and filled by one host-to-device copy per step (only the block table's first B rows travel).
The graph's first nodes take the input token of each request whose previous token is still in
flight (fill_rows[t] = its row of the runner's `last_sampled`, else -1) like the decode graphs.

Padding: tokens [total, T) lie past query_start_loc[B] (attention ignores them) and have slot -1
(no KV write); requests [B, R) have no query token (query_start_loc = total) and seq_len 1. The
attention metadata carries bounds (max_query_len = T, max_seq_len = max_model_len) and
split_decodes: the decode count is not a host int, so the Triton backend runs a decode launch
and a prefill launch over all R rows, each skipping the other's requests. (One launch of prefill
tiles gives every decode a 128-row tile holding its QPK query heads: Mixtral-8x7B nanovllm run as
606 such steps of ~383 tokens spent 6.15 s in attention against 4.27 s run in order, H200,
benchmarks/results/ridden-s25/.) A step replays only with at most MAX_PROMPTS prompt chunks
(max_prompt_reqs, which sizes the prefill launch's grid); one with more runs eagerly.
Backends that declare supports_cuda_graphs read every length from the tensors.

The graph ends at the hidden states [T, hidden] (a static output per bucket); the runner gathers
the sampled rows, computes their logits and samples eagerly (a few launches), so prompt logprobs
work unchanged. Not used with a KV connector (its per-layer hooks run on the host) nor for
chunked local attention whose virtual batch differs from the step's (built on the host).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from kvflow import envs
from kvflow.attention.backend import AttentionMetadata
from kvflow.forward_context import LOCAL, set_forward_context
from kvflow.worker.cuda_graphs import capture_buckets, captured_decode_order

logger = logging.getLogger("kvflow")

MAX_TOKENS = 512
# Most requests with more than one query token (prompt chunks) a replayed step may hold: it
# bounds the graphs' prompt attention grid (AttentionMetadata.max_prompt_reqs), sized for T / 2
# two-token prompts without it. A step with more runs eagerly. Riding steps hold one to three;
# serving many short prompts at once takes its large steps eagerly anyway. The attention pair
# of a 320-384-token step beside 150-240 decodes: 166-252 us bounded by 4-16 against 176-262
# unbounded (Llama-3.1-8B heads, H200, benchmarks/results/mixed-prompts-s32/).
MAX_PROMPTS = 16


def default_token_buckets(max_num_batched_tokens: int, ride_budget: int = 0,
                          ride_granule: int = 0, limit: int = MAX_TOKENS) -> list[int]:
    """Powers of two up to min(max_num_batched_tokens, limit), that bound itself, and the sizes
    riding steps take (core/scheduler.py): the ride budget, and with a granule each multiple of
    it below the budget. Riding steps hold exactly one of those, and padded to the next power
    of two the pad rows would cost real work (a MoE routes them too: Mixtral's 384-token steps
    padded to 512 spill experts into a second 128-row tile, 3630 against 4148 tok/s on
    nanovllm, H200, benchmarks/results/ride-s26)."""
    top = min(max_num_batched_tokens, limit)
    out = [s for s in (16, 32, 64, 128, 256, 512) if s < top] + [top]
    if ride_budget:
        out.append(ride_budget)
        if ride_granule:
            out += range(ride_granule, ride_budget, ride_granule)
    return sorted(s for s in set(out) if s <= top)


def scheduler_token_buckets(sc) -> list[int]:
    """The buckets of a SchedulerConfig: the ones the runner captures and the worker's memory
    plan reserves for (both call this, so they cannot disagree)."""
    return default_token_buckets(sc.max_num_batched_tokens, sc.ride_budget, sc.ride_granule)


@dataclass
class _Layout:
    """Offsets of bucket T's inputs in the staging buffer (int64 elements; int32 ones for the
    block table part, which starts at int32 element 2 * i64_end)."""
    T: int
    R: int
    mb: int

    @property
    def i64_end(self) -> int:
        return 4 * self.T + 2 * self.R

    @property
    def qsl32(self) -> int:
        return 2 * self.i64_end

    @property
    def lens32(self) -> int:
        return self.qsl32 + self.R + 1

    @property
    def bt32(self) -> int:
        return self.lens32 + self.R

    def used64(self, b: int) -> int:
        """int64 elements to copy for a batch of b requests (block table rows < b)."""
        return -(-(self.bt32 + b * self.mb) // 2)

    @property
    def size64(self) -> int:
        return self.used64(self.R)


class _Views:
    """Bucket T's typed views of one staging buffer (host or device)."""

    def __init__(self, stage: torch.Tensor, lay: _Layout):
        T, R = lay.T, lay.R
        self.ids = stage[0:T]
        self.positions = stage[T:2 * T]
        self.slots = stage[2 * T:3 * T]
        self.fill = stage[3 * T:4 * T]
        self.logits_idx = stage[4 * T:4 * T + R]
        self.sample_rows = stage[4 * T + R:4 * T + 2 * R]
        s32 = stage.view(torch.int32)
        self.qsl = s32[lay.qsl32:lay.qsl32 + R + 1]
        self.seq_lens = s32[lay.lens32:lay.lens32 + R]
        self.block_table = s32[lay.bt32:lay.bt32 + R * lay.mb].view(R, lay.mb)


class MixedGraphs:
    def __init__(self, model, device: torch.device, max_model_len: int,
                 max_blocks_per_req: int, max_num_reqs: int, buckets: list[int],
                 last_sampled: torch.Tensor, local_is_global: bool = False,
                 num_kv_heads: int = 0):
        """last_sampled: the runner's [max_num_reqs] int64 device tensor of each row's last
        sampled token. local_is_global: the model has chunked local attention layers whose
        virtual batch is the step's own batch (they read the same metadata). num_kv_heads:
        the attention layers' KV heads on this rank (the decode launch's dispatch order)."""
        self.model = model
        self.num_kv_heads = num_kv_heads
        self.device = device
        self.max_model_len = max_model_len
        self.buckets = sorted(buckets)
        self.max_tokens = self.buckets[-1]
        self.layouts = {t: _Layout(t, min(t, max_num_reqs), max_blocks_per_req)
                        for t in self.buckets}
        self.local_is_global = local_is_global
        size = max(lay.size64 for lay in self.layouts.values())
        self._dev_stage = torch.zeros(size, dtype=torch.int64, device=device)
        # Pinned host staging, two sets alternating by step parity (as the decode graphs').
        pin = device.type == "cuda"
        self._stage = [torch.zeros(size, dtype=torch.int64, pin_memory=pin) for _ in range(2)]
        self._dev_views = {t: _Views(self._dev_stage, lay) for t, lay in self.layouts.items()}
        self._host_views = [{t: _Views(s, lay) for t, lay in self.layouts.items()}
                            for s in self._stage]
        self.input_ids = torch.zeros(self.max_tokens, dtype=torch.int64, device=device)
        self.last_sampled = last_sampled
        self.hidden: dict[int, torch.Tensor] = {}      # bucket -> static output [T, hidden]
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        # Set by capture(). CPU tests set it without capturing: run() then executes the graph
        # body (staged inputs, unpack, forward at the bucket's size) eagerly.
        self.ready = False
        self.capture_s = 0.0
        self.capture_bytes = 0

    def bucket(self, num_tokens: int) -> int:
        return next(t for t in self.buckets if t >= num_tokens)

    def can_run(self, num_tokens: int, num_prompts: int = 0) -> bool:
        """num_prompts: the step's requests with more than one query token."""
        return self.ready and num_tokens <= self.max_tokens and num_prompts <= MAX_PROMPTS

    # ------------------------------------------------------------------ graph body
    def _unpack(self, T: int) -> None:
        v = self._dev_views[T]
        taken = self.last_sampled[v.fill.clamp(min=0)]
        torch.where(v.fill >= 0, taken, v.ids, out=self.input_ids[:T])

    def _forward(self, T: int) -> torch.Tensor:
        v = self._dev_views[T]
        split = envs.attn_split_decodes()
        order = (captured_decode_order(v.seq_lens, self.num_kv_heads, self.max_model_len)
                 if split else None)
        md = AttentionMetadata(
            num_actual_tokens=T, max_query_len=T, max_seq_len=self.max_model_len,
            query_start_loc=v.qsl, seq_lens=v.seq_lens, block_table=v.block_table,
            slot_mapping=v.slots, is_decode_only=False, split_decodes=split,
            decode_order=order, max_prompt_reqs=MAX_PROMPTS)
        with set_forward_context(md, {LOCAL: md} if self.local_is_global else {}):
            return self.model(self.input_ids[:T], v.positions)

    @torch.inference_mode()
    def capture(self, pool=None) -> None:
        """Capture every bucket (largest first: smaller graphs reuse the pool's blocks). pool:
        share the decode graphs' memory pool (one step runs at a time)."""
        self.input_ids = self.input_ids.clone()     # an inference tensor, as DecodeGraphs does
        pool = pool if pool is not None else torch.cuda.graph_pool_handle()

        def body(T: int) -> torch.Tensor:
            self._unpack(T)
            return self._forward(T)
        # Buckets' staging views overlap: each is given an all-padding step right before its
        # warm-up runs.
        self.graphs, self.hidden, self.capture_s, self.capture_bytes = capture_buckets(
            self.device, self.buckets, body, pool, before=self._stage_padding)
        self.ready = True
        logger.info("captured %d CUDA graphs (mixed steps of %d..%d tokens) in %.2f s, %.2f GiB",
                    len(self.graphs), self.buckets[0], self.max_tokens, self.capture_s,
                    self.capture_bytes / 2 ** 30)

    def _stage_padding(self, T: int) -> None:
        """Device inputs of an all-padding step (what capture's warm-up runs on)."""
        v = self._dev_views[T]
        v.ids.zero_(); v.positions.zero_(); v.slots.fill_(-1); v.fill.fill_(-1)
        v.qsl.zero_(); v.seq_lens.fill_(1)

    # ------------------------------------------------------------------ per step
    def run(self, input_ids: np.ndarray, positions: np.ndarray, slot_mapping: np.ndarray,
            fill_rows: np.ndarray, query_start_loc: np.ndarray, seq_lens: np.ndarray,
            block_table: np.ndarray, logits_indices: np.ndarray, sample_rows: np.ndarray,
            parity: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One step of B requests and T tokens (T <= max_tokens). Token arrays are [T]
        (fill_rows: the last_sampled row holding that token, or -1), query_start_loc [B + 1],
        seq_lens [B], block_table [B, max_blocks_per_req] (full rows), logits_indices and
        sample_rows [S]. Returns (hidden [T, hidden], logits_indices [S], sample_rows [S]) on
        the device, valid until the next step."""
        T = self.stage_inputs(input_ids, positions, slot_mapping, fill_rows, query_start_loc,
                              seq_lens, block_table, logits_indices, sample_rows, parity)
        graph = self.graphs.get(T)
        if graph is not None:
            graph.replay()
            hidden = self.hidden[T]
        else:               # not captured (CPU tests): the same body, run eagerly
            self._unpack(T)
            hidden = self._forward(T)
        v, s = self._dev_views[T], logits_indices.shape[0]
        return hidden[:input_ids.shape[0]], v.logits_idx[:s], v.sample_rows[:s]

    def stage_inputs(self, input_ids, positions, slot_mapping, fill_rows, query_start_loc,
                     seq_lens, block_table, logits_indices, sample_rows, parity: int = 0) -> int:
        """run()'s host part: pack the inputs, pad to the bucket and queue the one copy to the
        device; returns the bucket."""
        t, b, s = input_ids.shape[0], seq_lens.shape[0], logits_indices.shape[0]
        T = self.bucket(t)
        lay = self.layouts[T]
        assert b <= lay.R, (b, lay.R)
        h = self._host_views[parity][T]
        for dst, src, pad in ((h.ids, input_ids, 0), (h.positions, positions, 0),
                              (h.slots, slot_mapping, -1), (h.fill, fill_rows, -1)):
            a = dst.numpy()
            a[:t] = src
            a[t:] = pad
        h.logits_idx.numpy()[:s] = logits_indices
        h.sample_rows.numpy()[:s] = sample_rows
        q = h.qsl.numpy()
        q[:b + 1] = query_start_loc
        q[b + 1:] = t
        lens = h.seq_lens.numpy()
        lens[:b] = seq_lens
        lens[b:] = 1
        h.block_table.numpy()[:b] = block_table
        n = lay.used64(b)
        self._dev_stage[:n].copy_(self._stage[parity][:n], non_blocking=True)
        return T
