"""Turns a SchedulerOutput into one forward pass and a RunnerOutput.

The runner keeps, per live request, a row in two persistent host arrays — its token ids and its
block table — so each step's inputs are gathered with a handful of vectorised numpy operations
instead of Python loops over tokens:

    token_buf   [max_num_seqs, max_model_len]        int32
    block_buf   [max_num_seqs, max_blocks_per_req]   int32

Per step, for B scheduled requests and T scheduled tokens (request order = scheduler order):
    positions [T], input_ids [T], slot_mapping [T], query_start_loc [B+1], seq_lens [B],
    block_table [B, max_blocks], logits_indices [S] (last token of each request that catches up
    with its num_tokens this step, S <= B).
"""
from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
from torch import nn

from kvflow.attention.backend import AttentionMetadata, AttentionSpec
from kvflow.attention.layer import Attention
from kvflow.attention.local_attention import build_local_metadata, local_is_global
from kvflow.attention.selector import select_backend
from kvflow.config import EngineConfig
from kvflow.core.sched_output import LogprobsLists, RunnerOutput, SchedulerOutput
from kvflow.forward_context import LOCAL, set_forward_context
from kvflow.kv_transfer.base import NULL_WORKER_CONNECTOR
from kvflow.sample import Sampler, SamplingMetadata, compute_topk_logprobs
from kvflow.sampling_params import SamplingParams

logger = logging.getLogger("kvflow")


@dataclass
class RequestState:
    req_id: str
    row: int
    num_prompt_tokens: int
    params: SamplingParams
    num_tokens: int
    num_computed_tokens: int
    num_blocks: int
    generator: Optional[torch.Generator]
    # Trailing tokens of num_tokens whose ids are still on the device (launched, not resolved).
    pending: int = 0


@dataclass
class StepHandle:
    """A launched step: device results plus what resolve() needs to turn them into a
    RunnerOutput. `event` marks the end of the step's device work."""
    out: RunnerOutput
    sample_states: list = field(default_factory=list)
    tokens_host: Optional[torch.Tensor] = None        # pinned [S] int64, filled asynchronously
    logprobs: Optional[tuple] = None                  # (ids, vals, ranks) device tensors
    event: Optional[torch.cuda.Event] = None


class ModelRunner:
    def __init__(self, config: EngineConfig, model: nn.Module, device: torch.device):
        self.config = config
        self.model = model
        self.device = device
        mc, sc = config.model, config.scheduler
        self.vocab_size = mc.vocab_size
        self.block_size = config.cache.block_size
        self.max_model_len = mc.max_model_len
        self.max_num_reqs = sc.max_num_seqs
        self.max_blocks_per_req = -(-self.max_model_len // self.block_size)
        self.token_buf = np.zeros((self.max_num_reqs, self.max_model_len), dtype=np.int32)
        self.block_buf = np.zeros((self.max_num_reqs, self.max_blocks_per_req), dtype=np.int32)
        self.free_rows = list(range(self.max_num_reqs - 1, -1, -1))
        self.requests: dict[str, RequestState] = {}
        self.sampler = Sampler()
        self.attn_layers = [m for m in model.modules() if isinstance(m, Attention)]
        # Chunked local attention (Llama 4): one chunk size per model; its layers read a
        # virtual batch built once per step (kvflow/attention/local_attention.py).
        chunks = {l.local_attention_chunk for l in self.attn_layers if l.local_attention_chunk}
        if len(chunks) > 1:
            raise ValueError(f"model: several local attention chunk sizes {sorted(chunks)} are "
                             "not supported")
        self.local_chunk: Optional[int] = chunks.pop() if chunks else None
        self.kv_caches: list[torch.Tensor] = []
        self.backend = None
        # Persistent pinned host buffers for H2D copies (allocating pinned memory per step is slow).
        self._pinned: dict[str, torch.Tensor] = {}
        self.graphs = None  # DecodeGraphs once captured
        # Row counts the LM head runs at outside the graphs (_sampled_logits): the decode
        # graphs' batch sizes once captured, else none (no padding).
        self.logits_row_buckets: list[int] = []
        self.mixed_graphs = None  # MixedGraphs once captured (small steps that are not decodes)
        # Moves KV blocks to / from other instances (disaggregated prefill); null by default.
        self.kv_connector = NULL_WORKER_CONNECTOR
        # Last sampled token of each row, on the device: the next step's input for a decode
        # whose token is still in flight (overlapped scheduling).
        self.last_sampled = torch.zeros(self.max_num_reqs, dtype=torch.int64, device=device)
        # Host staging alternates between two sets by step parity: with overlapped scheduling
        # the device may still be reading step N's inputs while step N+1's are written; step
        # N-1 (same parity as N+1) must have read its inputs before N+1 is staged, which
        # launch() makes sure of with an event per parity (after that step's device work).
        self._parity = 0
        self._staging_done: list[Optional[torch.cuda.Event]] = [None, None]
        self._tokens_host = [torch.zeros(self.max_num_reqs, dtype=torch.int64,
                                         pin_memory=device.type == "cuda") for _ in range(2)]

    # ------------------------------------------------------------------ setup
    def attention_spec(self, layer: Attention) -> AttentionSpec:
        return AttentionSpec(num_heads=layer.num_heads, num_kv_heads=layer.num_kv_heads,
                             head_size=layer.head_dim, scale=layer.scale, dtype=self.config.model.dtype,
                             kv_cache_dtype=self.config.cache.kv_cache_dtype,
                             block_size=self.block_size,
                             local_attention_chunk=layer.local_attention_chunk)

    def bind_attention_backend(self, requested: Optional[str] = None) -> None:
        specs = [self.attention_spec(layer) for layer in self.attn_layers]
        # One backend for all layers: it must serve every distinct spec (global and local).
        self.backend = select_backend(list(dict.fromkeys(specs)), self.device, requested)
        for layer, spec in zip(self.attn_layers, specs):
            layer.bind_impl(self.backend.make_impl(spec), self.backend.capabilities)

    def extra_metadata(self, md: AttentionMetadata) -> dict[str, AttentionMetadata]:
        """Metadata of the non-global attention kinds for a step described by `md`."""
        if self.local_chunk is None:
            return {}
        if local_is_global(self.local_chunk, self.max_model_len):
            return {LOCAL: md}
        return {LOCAL: build_local_metadata(md, self.local_chunk, self.block_size)}

    def kv_cache_shape(self, num_blocks: int, layer: Attention) -> tuple[int, ...]:
        return (2, num_blocks, self.block_size, layer.num_kv_heads, layer.head_dim)

    @property
    def kv_cache_torch_dtype(self) -> torch.dtype:
        """Storage dtype of the KV cache tensors: the model dtype, or float8 e4m3 for "fp8"."""
        if self.config.cache.kv_cache_dtype == "fp8":
            return torch.float8_e4m3fn
        return self.config.model.dtype

    def kv_scales(self) -> Optional[list[tuple[float, float]]]:
        """Per-layer (k_scale, v_scale) of an fp8 cache (for KVLayout.from_config), else None."""
        if self.config.cache.kv_cache_dtype != "fp8":
            return None
        return [(float(l.k_scale), float(l.v_scale)) for l in self.attn_layers]

    def bytes_per_block(self) -> int:
        # 1 byte per element for fp8: the same kv_cache_memory holds 2x the blocks of bf16.
        itemsize = torch.empty((), dtype=self.kv_cache_torch_dtype).element_size()
        return sum(2 * self.block_size * layer.num_kv_heads * layer.head_dim * itemsize
                   for layer in self.attn_layers)

    def allocate_kv_cache(self, num_blocks: int) -> None:
        # Zeroed: padded reads of never-written slots must not inject NaN/Inf.
        self.kv_caches = [torch.zeros(self.kv_cache_shape(num_blocks, layer),
                                      dtype=self.kv_cache_torch_dtype, device=self.device)
                          for layer in self.attn_layers]
        for layer, cache in zip(self.attn_layers, self.kv_caches):
            layer.kv_cache = cache

    def release_kv_cache(self) -> None:
        for layer in self.attn_layers:
            layer.kv_cache = None
        self.kv_caches = []

    # ------------------------------------------------------------------ state
    def _update_states(self, so: SchedulerOutput) -> None:
        for rid in so.finished_req_ids:
            st = self.requests.pop(rid, None)
            if st is not None:
                self.free_rows.append(st.row)
        for nr in so.new_reqs:
            if nr.req_id in self.requests:  # resumed without an explicit drop; start over
                self.free_rows.append(self.requests.pop(nr.req_id).row)
            row = self.free_rows.pop()
            n = len(nr.token_ids)
            self.token_buf[row, :n] = nr.token_ids
            self.block_buf[row, :len(nr.block_ids)] = nr.block_ids
            gen = None
            if nr.sampling_params.seed is not None:
                gen = torch.Generator(device=self.device).manual_seed(nr.sampling_params.seed)
            self.requests[nr.req_id] = RequestState(nr.req_id, row, nr.num_prompt_tokens,
                                                    nr.sampling_params, n, nr.num_computed_tokens,
                                                    len(nr.block_ids), gen)
        for cr in so.cached_reqs:
            st = self.requests[cr.req_id]
            if cr.new_block_ids:
                self.block_buf[st.row, st.num_blocks:st.num_blocks + len(cr.new_block_ids)] = cr.new_block_ids
                st.num_blocks += len(cr.new_block_ids)
            st.num_computed_tokens = cr.num_computed_tokens

    def _to_device(self, arr: np.ndarray, dtype: torch.dtype, name: str = "") -> torch.Tensor:
        """Copy a host array to the device through a persistent pinned buffer (per name and
        step parity; see __init__)."""
        if self.device.type == "cpu":
            return torch.from_numpy(np.ascontiguousarray(arr)).to(dtype)
        key = (name or str(arr.shape), self._parity)
        buf = self._pinned.get(key)
        if buf is None or buf.dtype != dtype or buf.numel() < arr.size:
            buf = torch.empty(max(arr.size, 1024), dtype=dtype).pin_memory()
            self._pinned[key] = buf
        view = buf[:arr.size].view(arr.shape)
        view.numpy()[...] = arr
        return view.to(self.device, non_blocking=True)

    # ------------------------------------------------------------------ step
    @torch.inference_mode()
    def execute_model(self, so: SchedulerOutput) -> RunnerOutput:
        return self.resolve(self.launch(so))

    @torch.inference_mode()
    def launch(self, so: SchedulerOutput) -> StepHandle:
        """Queue the step's device work; returns before the GPU is done. Inputs of decodes
        whose previous token is still in flight are taken from `last_sampled` on the device."""
        self._update_states(so)
        self.kv_connector.start_load_kv(so.kv_connector_metadata)
        if so.is_empty:  # nothing to compute: wait (briefly) for a transfer to end instead
            return StepHandle(RunnerOutput(sampled_token_ids={},
                                           kv_transfers=self.kv_connector.get_finished(wait=True)))
        self._parity ^= 1
        # This parity's pinned staging was last read by the HtoD copies of the step launched
        # two steps ago. A step that samples nothing (a prompt chunk) is resolved without
        # waiting for the device, so that copy may still be queued: wait for it before the
        # buffers are overwritten. (Found on the H200: with graph replays the host ran two
        # chunks ahead and a chunk computed with a later chunk's inputs.) Usually long done.
        done = self._staging_done[self._parity]
        if done is not None:
            done.synchronize()
        handle = self._launch_step(so)
        if self.device.type == "cuda":
            # The end of the step's device work: what resolve() waits for (sampled steps) and
            # what the step after next waits for before reusing this parity's staging.
            handle.event = self._staging_done[self._parity] = torch.cuda.Event()
            handle.event.record()
        return handle

    def _launch_step(self, so: SchedulerOutput) -> StepHandle:
        """launch()'s body, once this step's staging parity is free."""
        # Decodes first (stable): attention backends give them decode-shaped tiles.
        req_ids = sorted(so.num_scheduled_tokens, key=lambda r: so.num_scheduled_tokens[r] != 1)
        states = [self.requests[r] for r in req_ids]
        b = len(states)
        rows = np.fromiter((s.row for s in states), dtype=np.int64, count=b)
        nsched = np.fromiter((so.num_scheduled_tokens[r] for r in req_ids), dtype=np.int64, count=b)
        computed = np.fromiter((s.num_computed_tokens for s in states), dtype=np.int64, count=b)
        num_tokens = np.fromiter((s.num_tokens for s in states), dtype=np.int64, count=b)
        pending = np.fromiter((s.pending for s in states), dtype=np.int64, count=b)

        cu = np.cumsum(nsched)
        total = int(cu[-1])
        starts = cu - nsched
        req_idx = np.repeat(np.arange(b), nsched)                         # [T]
        positions = computed[req_idx] + np.arange(total) - starts[req_idx]  # [T]
        input_ids = self.token_buf[rows[req_idx], np.minimum(positions, self.max_model_len - 1)]
        # Tokens not on the host yet: at most the last position of a request with a pending token.
        from_device = np.flatnonzero(positions >= (num_tokens - pending)[req_idx])
        seq_lens = computed + nsched                                       # [B]
        slot_mapping = (self.block_buf[rows[req_idx], positions // self.block_size].astype(np.int64)
                        * self.block_size + positions % self.block_size)
        max_blocks = int(-(-seq_lens.max() // self.block_size))
        block_table = self.block_buf[rows, :max_blocks]
        sampling = seq_lens == num_tokens                                  # [B] caught up -> sample
        logits_indices = cu[sampling] - 1

        out = RunnerOutput(sampled_token_ids={r: [] for r in req_ids},
                           kv_transfers=self.kv_connector.get_finished())
        handle = StepHandle(out)
        sample_states = [s for s, flag in zip(states, sampling) if flag]
        decode_only = total == b
        sample_rows = None                       # [S] rows of the sampled requests, on device
        if (decode_only and self.graphs is not None and self.graphs.can_run(b)
                and not any(s.params.prompt_logprobs is not None for s in states)):
            fill_rows = np.full(b, -1, dtype=np.int64)
            fill_rows[from_device] = rows[from_device]       # decode only: token i = request i
            logits = self.graphs.run(input_ids, positions, slot_mapping, seq_lens,
                                     self.block_buf[rows], self._parity, fill_rows=fill_rows,
                                     rows=rows)
            if len(sample_states) == b:
                sample_rows = self.graphs.staged_rows(b)
            if not sample_states:
                return handle
            if len(sample_states) < b:
                logits = logits[torch.from_numpy(np.flatnonzero(sampling)).to(self.device)]
        else:
            logits_idx_t = None                  # [S] positions of the sampled rows, on device
            if (self.mixed_graphs is not None
                    and self.mixed_graphs.can_run(total, int(np.count_nonzero(nsched > 1)))):
                fill_tok = np.full(total, -1, dtype=np.int64)
                fill_tok[from_device] = rows[req_idx[from_device]]
                hidden, logits_idx_t, sample_rows = self.mixed_graphs.run(
                    input_ids, positions, slot_mapping, fill_tok, np.concatenate([[0], cu]),
                    seq_lens, self.block_buf[rows], logits_indices, rows[sampling],
                    self._parity)
            else:
                hidden = self._eager_forward(nsched, cu, seq_lens, block_table, slot_mapping,
                                             input_ids, positions, from_device,
                                             rows[req_idx[from_device]], decode_only)
            self._prompt_logprobs(states, starts, computed, nsched, hidden, out)
            if not sample_states:
                return handle
            if logits_idx_t is None:
                logits_idx_t = self._to_device(logits_indices, torch.int64, "logits_idx")
            logits = self._sampled_logits(hidden, logits_idx_t)
        result = self.sampler(logits, self._sampling_metadata(sample_states))
        tokens = result.sampled_token_ids                                  # [S] on device
        if sample_rows is None:
            sample_rows = self._to_device(np.fromiter((s.row for s in sample_states),
                                                      dtype=np.int64, count=len(sample_states)),
                                          torch.int64, "srows")
        self.last_sampled[sample_rows] = tokens
        n = len(sample_states)
        handle.tokens_host = self._tokens_host[self._parity][:n]
        handle.tokens_host.copy_(tokens, non_blocking=True)
        if result.logprobs is not None:
            lp = result.logprobs
            handle.logprobs = (lp.token_ids, lp.logprobs, lp.ranks)
        for st in sample_states:  # the token exists from now on; its id arrives at resolve()
            st.num_tokens += 1
            st.pending += 1
        handle.sample_states = sample_states
        return handle

    def _sampled_logits(self, hidden: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Logits [S, vocab] of hidden's rows idx [S], outside the decode graphs (steps with
        prompt tokens, or too large for a graph). The LM head runs on the rows padded to the
        smallest decode-graph batch size >= S (extra rows repeat row 0; their logits are
        dropped): cuBLAS picks its kernel by shape, and the first call of a kernel variant
        loads it, 12-25 ms of host time on the H200 (torch 2.11, nvjet kernels; a Qwen3-0.6B
        nanovllm trace had three such stalls in six prefill steps, each idling the device as
        long). The graph sizes' variants were loaded when the graphs were captured."""
        n = idx.shape[0]
        rows = next((b for b in self.logits_row_buckets if b >= n), n)
        if rows > n:
            idx = torch.nn.functional.pad(idx, (0, rows - n))
        return self.model.compute_logits(hidden[idx])[:n]

    def _eager_forward(self, nsched, cu, seq_lens, block_table, slot_mapping, input_ids,
                       positions, from_device, fill_rows, decode_only: bool) -> torch.Tensor:
        """The model forward of a step outside the CUDA graphs; returns hidden [T, hidden].
        from_device [F]: token indices whose ids come from last_sampled[fill_rows [F]]."""
        b, total = seq_lens.shape[0], input_ids.shape[0]
        qsl = np.concatenate([[0], cu])
        md = AttentionMetadata(
            num_actual_tokens=total, max_query_len=int(nsched.max()),
            max_seq_len=int(seq_lens.max()),
            query_start_loc=self._to_device(qsl, torch.int32, "qsl"),
            seq_lens=self._to_device(seq_lens, torch.int32, "seq_lens"),
            block_table=self._to_device(np.ascontiguousarray(block_table), torch.int32, "bt"),
            slot_mapping=self._to_device(slot_mapping, torch.int64, "slots"),
            query_start_loc_cpu=torch.from_numpy(qsl.astype(np.int32)),
            seq_lens_cpu=torch.from_numpy(seq_lens.astype(np.int32)),
            is_decode_only=decode_only,
            num_decode_reqs=b if decode_only else int(np.argmax(nsched != 1)))
        ids_t = self._to_device(input_ids, torch.int64, "ids")
        if from_device.size:
            ids_t[self._to_device(from_device, torch.int64, "fill_idx")] = \
                self.last_sampled[self._to_device(fill_rows, torch.int64, "fill_rows")]
        pos_t = self._to_device(positions, torch.int64, "pos")
        with set_forward_context(md, self.extra_metadata(md), kv_connector=self.kv_connector):
            return self.model(ids_t, pos_t)                                # [T, hidden]

    def resolve(self, handle: StepHandle) -> RunnerOutput:
        """Wait for a launched step and return its sampled tokens (and logprobs)."""
        out = handle.out
        if not handle.sample_states:
            return out
        if handle.event is not None:
            handle.event.synchronize()
        tokens = handle.tokens_host.tolist()
        if handle.logprobs is not None:
            lp_ids, lp_vals, lp_ranks = (t.tolist() for t in handle.logprobs)
        for i, (st, tok) in enumerate(zip(handle.sample_states, tokens)):
            out.sampled_token_ids[st.req_id] = [tok]
            if self.requests.get(st.req_id) is st:  # still live (not dropped meanwhile)
                pos = st.num_tokens - st.pending
                if pos < self.max_model_len:
                    self.token_buf[st.row, pos] = tok
                st.pending -= 1
            k = st.params.logprobs
            if k is not None and handle.logprobs is not None:
                out.logprobs[st.req_id] = LogprobsLists([lp_ids[i][:k + 1]], [lp_vals[i][:k + 1]],
                                                        [lp_ranks[i]])
        return out

    def _sampling_metadata(self, states: list[RequestState]) -> SamplingMetadata:
        params = [s.params for s in states]
        needs_history = any(p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0
                            or p.min_tokens for p in params)
        if needs_history:
            outs = [self.token_buf[s.row, s.num_prompt_tokens:s.num_tokens].tolist() for s in states]
            prompts = [self.token_buf[s.row, :s.num_prompt_tokens].tolist() for s in states]
        else:
            outs = [[] for _ in states]
            prompts = outs
        gens = {i: s.generator for i, s in enumerate(states) if s.generator is not None}
        return SamplingMetadata.build(params, outs, prompts, gens, self.vocab_size, self.device)

    def _prompt_logprobs(self, states, starts, computed, nsched, hidden, out: RunnerOutput) -> None:
        """Logprobs of each prompt token given its prefix, for requests that asked. Position p's
        hidden state predicts token p+1; positions p+1 < num_prompt_tokens are prompt targets."""
        for i, st in enumerate(states):
            k = st.params.prompt_logprobs
            if k is None:
                continue
            first, last = int(computed[i]), int(computed[i] + nsched[i])  # positions [first, last)
            last = min(last, st.num_prompt_tokens - 1)
            if last <= first:
                continue
            idx = torch.arange(int(starts[i]), int(starts[i]) + last - first, device=hidden.device)
            logits = self.model.compute_logits(hidden[idx])
            targets = torch.from_numpy(self.token_buf[st.row, first + 1:last + 1].astype(np.int64))
            lp = compute_topk_logprobs(logits, targets.to(hidden.device), k)
            out.prompt_logprobs[st.req_id] = LogprobsLists(lp.token_ids.tolist(), lp.logprobs.tolist(),
                                                           lp.ranks.tolist())

    def capture_cuda_graphs(self, buckets: Optional[list[int]] = None) -> None:
        from kvflow.worker.cuda_graphs import DecodeGraphs, default_buckets
        self.graphs = DecodeGraphs(self.model, self.device, self.max_model_len, self.block_size,
                                   self.max_blocks_per_req,
                                   buckets or default_buckets(self.max_num_reqs),
                                   local_chunk=self.local_chunk,
                                   last_sampled=self.last_sampled,
                                   num_kv_heads=max((l.num_kv_heads for l in self.attn_layers),
                                                    default=0))
        self.graphs.capture()
        self.logits_row_buckets = list(self.graphs.buckets)
        if self._mixed_graphs_ok():
            from kvflow.worker.mixed_graphs import MixedGraphs, scheduler_token_buckets
            self.mixed_graphs = MixedGraphs(
                self.model, self.device, self.max_model_len, self.max_blocks_per_req,
                self.max_num_reqs,
                scheduler_token_buckets(self.config.scheduler),
                self.last_sampled, local_is_global=self.local_chunk is not None,
                num_kv_heads=self.graphs.num_kv_heads)
            self.mixed_graphs.capture(pool=self.graphs.pool)

    def _mixed_graphs_ok(self) -> bool:
        """Small mixed steps replay graphs unless the config says no, a KV connector hooks the
        forward's layers (host code) or chunked local attention needs its host-built virtual
        batch."""
        return (self.config.compilation.mixed_graphs
                and self.kv_connector is NULL_WORKER_CONNECTOR
                and (self.local_chunk is None
                     or local_is_global(self.local_chunk, self.max_model_len)))

    def drop_cuda_graphs(self) -> None:
        """Release every captured graph (and with them their memory pool)."""
        self.graphs = None
        self.mixed_graphs = None
        self.logits_row_buckets = []

    # ------------------------------------------------------------------ profiling
    @torch.inference_mode()
    def dummy_run(self, query_lens: list[int], context_lens: Optional[list[int]] = None,
                  sample: bool = True) -> None:
        """A forward (+ sampling) pass of a given batch shape that writes no KV (slots -1) and
        reads only block 0. Used to measure peak activation memory before the KV cache is sized,
        and to compile every kernel configuration a real step will need before serving."""
        context_lens = context_lens or query_lens
        b = len(query_lens)
        cu = np.cumsum(query_lens)
        t = int(cu[-1])
        nb = -(-max(context_lens) // self.block_size)
        md = AttentionMetadata(
            num_actual_tokens=t, max_query_len=max(query_lens), max_seq_len=max(context_lens),
            query_start_loc=self._to_device(np.concatenate([[0], cu]), torch.int32),
            seq_lens=self._to_device(np.array(context_lens), torch.int32),
            block_table=self._to_device(np.zeros((b, nb), dtype=np.int32), torch.int32),
            slot_mapping=self._to_device(np.full(t, -1, dtype=np.int64), torch.int64),
            query_start_loc_cpu=torch.from_numpy(np.concatenate([[0], cu]).astype(np.int32)),
            seq_lens_cpu=torch.tensor(context_lens, dtype=torch.int32),
            is_decode_only=max(query_lens) == 1,
            num_decode_reqs=sum(1 for _ in itertools.takewhile(lambda q: q == 1, query_lens)))
        ids = torch.zeros(t, dtype=torch.int64, device=self.device)
        pos = torch.from_numpy(np.concatenate([np.arange(c - q, c) for q, c in
                                               zip(query_lens, context_lens)])).to(self.device)
        with set_forward_context(md, self.extra_metadata(md)):
            hidden = self.model(ids, pos)
        if not sample:
            return
        logits = self.model.compute_logits(hidden[torch.from_numpy(cu - 1).to(self.device)])
        params = [SamplingParams(temperature=1.0, top_p=0.9, top_k=50)] * b
        self.sampler(logits, SamplingMetadata.build(params, [[]] * b, [[]] * b, {},
                                                    self.vocab_size, self.device))

    def _warm_up_sampling(self) -> None:
        """Compile the sampling kernels (greedy argmax and the fused random draw) for every
        chunk size they can pick, on a dummy row of the vocabulary: they run outside the CUDA
        graphs, and the dummy steps sample with top-k / top-p (the torch path) at one batch
        size only."""
        if self.device.type != "cuda":
            return
        from kvflow import kernels
        if not kernels.HAS_TRITON:
            return
        from kvflow.kernels import argmax, sampling
        temperature = torch.ones((1,), dtype=torch.float32, device=self.device)
        # Logits are in the model's dtype in every step (Model.compute_logits); a sampling
        # stage that modifies them works on a float32 copy with torch ops.
        logits = torch.zeros((1, self.vocab_size), dtype=self.config.model.dtype,
                             device=self.device)
        for chunk in argmax.CHUNKS:
            argmax.argmax_rows(logits, chunk)
        for chunk in sampling.CHUNKS:
            sampling.sample_rows(logits, temperature, 0, chunk)

    def warm_up(self, max_num_tokens: int) -> None:
        """Run the batch shapes serving will hit (long prefill, many prefills, decodes mixed
        with prefill chunks, chunks over long contexts, eager decode) so that Triton compiles
        their kernel configurations now, not inside the first requests."""
        L = self.max_model_len
        chunk = min(max_num_tokens, L)
        # The longest query that still runs as one q-block per request in the prefill tiles:
        # the "direct" attention variant.
        from kvflow.kernels.attention_config import prefill_block_q
        layer = self.attn_layers[0] if self.attn_layers else None
        block_q = (prefill_block_q(layer.num_heads, layer.num_kv_heads, layer.head_dim,
                                   self.config.model.dtype) if layer else 128)
        direct_q = min(max(2, block_q), L - 1)
        # Enough of them that the step fills the GPU: smaller steps take smaller prefill tiles
        # (attention_config.SMALL_GRID_BLOCK_M), which the mixed shape below compiles.
        from kvflow.kernels.attention_config import device_limits
        kv_heads = layer.num_kv_heads if layer else 1
        n_direct = max(16, -(-2 * device_limits(self.device)[0] // kv_heads))
        n_direct = max(1, min(n_direct, self.max_num_reqs, max_num_tokens // direct_q))
        shapes = [
            ([chunk], [chunk]),                                       # one long prefill
            ([direct_q] * n_direct, None),                            # short prefills, direct
            ([direct_q], [L]),                                        # same over a long prefix (split-KV)
            ([min(256, L // 2)], [L]),                                # q-blocked, split-KV
            ([min(512, L - 1)] * max(1, min(8, max_num_tokens // 512)), None),  # many prefills
            ([min(256, L - 1)] * max(1, min(16, max_num_tokens // 256)), None),  # 16 of them
            ([1] * 64 + [min(256, L // 2)], [min(1024, L)] * 64 + [min(1024, L)]),  # mixed
            ([min(16, L // 4)], [L]),                                 # chunk over a long prefix
            ([1] * min(self.max_num_reqs, 8), [L] * min(self.max_num_reqs, 8)),  # eager decode
        ]
        # Triton specializes integer arguments on divisibility by 16 (and == 1): run each shape
        # with an even and an odd token count so both variants are compiled now. (Per-step
        # counts of the attention, routing and input kernels are not specialized at all,
        # tests/specializations.py; this pass covers any kernel whose arguments still are.)
        for q, c in shapes:
            self.dummy_run(q, c, sample=False)
            q_odd = q[:-1] + [max(1, q[-1] - 1)] if q[-1] > 1 else q[:-1] + [2]
            c_odd = None if c is None else c[:-1] + [max(c[-1], q_odd[-1])]
            self.dummy_run(q_odd, c_odd, sample=False)
        self._warm_up_sampling()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
