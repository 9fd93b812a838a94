"""KV admission control: admit a waiting request only if the KV pool can hold it and every
running request until each one finishes.

Why. vLLM admits any request whose prompt fits the free blocks now; when the running requests'
growth then runs the pool dry, it preempts one (by recompute), and its computed tokens are
thrown away. Where the pool holds fewer requests than max_num_seqs this repeats every few steps:
Mixtral-8x7B on one H200 holds ~282K tokens, ~370 throughput8k requests, and at the default
1024 sequences it ran at 4673 tok/s against 5196 with admission control (docs/performance.md,
session 18).

The estimate. A running request's KV grows by one token a step until it finishes, when all its
blocks return to the pool. The pool's future use is therefore a sum of sawtooth curves, whose
peak comes just before some request finishes; it is not the sum of final sizes (requests of
different lengths, as nanovllm's, never all peak at once). For each running request r:

    cur_r  tokens it holds, its whole prompt counted at once (chunked prefill brings the rest
           in within a few steps);
    e_r    tokens it will still add: ceil(ratio * min(max_tokens left, CLIP_TOKENS)).

`ratio` is the expected fraction of its max_tokens a request uses. It starts at 1.0 (requests
that run to max_tokens - ignore_eos, benchmarks, short max_tokens - are then never preempted),
follows an EMA of the fraction that finished requests actually used (chat requests stop at EOS
long before), and doubles after a preemption (the estimate was short). CLIP_TOKENS bounds the
estimate of requests without max_tokens, which may otherwise run to the context window.

Prefix-cache sharing. A request's hit blocks are held by another request too: each request
counts only its own blocks (its blocks minus the hit ones), and the capacity is the free blocks
plus the running requests' own ones, so a shared prefix is counted once.

Invariant kept: with at least one running request, a waiting one is admitted only when the
estimated peak of (running + admitted this step + it) fits the capacity; with none running the
head of the queue is always admitted (progress; check_request guarantees its prompt fits).
Estimates can be wrong in either direction: preemption stays the safety net.
"""
from __future__ import annotations

import math

import numpy as np

from kvflow.core.kv_cache_manager import cdiv
from kvflow.request import Request, RequestStatus

# A request's remaining growth is estimated over at most this many tokens (a request without
# max_tokens may run to the context window, but rarely does).
CLIP_TOKENS = 4096
MIN_RATIO = 0.02
EMA_WEIGHT = 0.1
# The future is cut into at most this many segments of equal length; on each, a request's use
# is bounded by its use at the segment's last step (over-counting by < one segment of tokens).
MAX_SEGMENTS = 512


class KVAdmission:
    """Per-scheduler state: the learned ratio and each running request's hit blocks."""

    def __init__(self, block_size: int, max_model_len: int, enabled: bool = True):
        self.block_size = block_size
        self.enabled = enabled
        self.ratio = 1.0
        self._hit_blocks: dict[str, int] = {}
        # Segment g covers future steps [g * seg, (g + 1) * seg - 1]. No request adds more than
        # max_model_len tokens, so MAX_SEGMENTS segments cover every request's remaining life; a
        # curve uses only those up to its longest request's end.
        self.seg = max(1, cdiv(max_model_len + 1, MAX_SEGMENTS))

    # ------------------------------------------------------------------ bookkeeping
    def on_admit(self, req: Request, hit_blocks: int) -> None:
        """`req` now runs; `hit_blocks` of its blocks are shared with a running request."""
        self._hit_blocks[req.request_id] = hit_blocks

    def on_release(self, req: Request) -> None:
        """`req` gave its blocks back (finished, aborted or preempted)."""
        self._hit_blocks.pop(req.request_id, None)

    def on_finished(self, req: Request) -> None:
        """Learn from a request that ended on its own (a stop or its length), not an abort."""
        if req.status not in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH):
            return
        allowed = min(req.max_tokens, CLIP_TOKENS)
        if allowed <= 0:
            return
        used = min(req.num_output_tokens, CLIP_TOKENS) / allowed
        self.ratio = max(MIN_RATIO, min(1.0, (1 - EMA_WEIGHT) * self.ratio + EMA_WEIGHT * used))

    def on_preempt(self) -> None:
        self.ratio = min(1.0, 2 * self.ratio)

    # ------------------------------------------------------------------ estimate
    def remaining(self, req: Request, cur: int) -> int:
        """Tokens `req`, holding `cur`, is expected to add. The last sampled token is never
        written to the cache, so a request ends holding prompt + max_tokens - 1 at most."""
        left = min(req.num_prompt_tokens + req.max_tokens - 1 - cur, CLIP_TOKENS)
        if left <= 0:
            return 0
        return left if self.ratio >= 1.0 else math.ceil(self.ratio * left)

    def plan(self, running: list[Request], scheduled: dict[str, int], kv) -> "AdmissionPlan":
        """The pool's estimated future use by `running` after this step's allocations
        (`scheduled`: tokens granted to each this step), against which candidates are checked."""
        n = len(running)
        cur, extra, hit = [0] * n, [0] * n, [0] * n
        own_held = 0
        hits, blocks, remaining = self._hit_blocks, kv.req_to_blocks, self.remaining
        for i, r in enumerate(running):
            rid = r.request_id
            c = max(r.num_computed_tokens + scheduled.get(rid, 0), r.num_tokens)
            h = hits.get(rid, 0)
            cur[i], extra[i], hit[i] = c, remaining(r, c), h
            own_held += len(blocks.get(rid, ())) - h
        return AdmissionPlan(self, np.array(cur, dtype=np.int64), np.array(extra, dtype=np.int64),
                             np.array(hit, dtype=np.int64), kv.num_free_blocks + own_held)


class AdmissionPlan:
    """One step's check. `fits` accepts a candidate only if the estimated peak use, with it and
    every candidate accepted before it, stays within `capacity` blocks."""

    def __init__(self, adm: KVAdmission, cur, extra, hit, capacity: int):
        self.adm = adm
        self.capacity = capacity
        self._cur, self._extra, self._hit = cur, extra, hit
        bs = adm.block_size
        # Upper bound of the peak: every request at its final size at once. When that fits,
        # the per-segment curve is not needed (most steps of a pool with room to spare).
        self._final = int((cdiv(cur + extra, bs) - hit).sum())
        self._curve = None                                                   # [G] blocks

    def _use(self, cur, extra, hit):
        """Blocks held per segment by requests (cur, extra, hit) [N] -> [N, G] summed to [G],
        G covering the longest one's life: on segment g a request is alive if it still holds
        blocks at the segment's first step, and holds at most what it holds at its last. A
        request adding `extra` tokens holds its blocks through step extra + 1: with async
        scheduling the step that ends it is applied (and its blocks freed) one step later."""
        seg = self.adm.seg
        first = np.arange((int(extra.max()) + 1) // seg + 1, dtype=np.int64)[None, :] * seg
        held = cdiv(cur[:, None] + np.minimum(extra[:, None], first + (seg - 1)),
                     self.adm.block_size) - hit[:, None]                               # [N, G]
        alive = extra[:, None] + 1 >= first
        return np.where(alive, held, 0).sum(axis=0)

    @staticmethod
    def _add(a, b):
        """Sum of two curves of possibly different lengths (zero past a curve's end)."""
        if len(a) < len(b):
            a, b = b, a
        out = a.copy()
        out[:len(b)] += b
        return out

    def fits(self, req: Request, hit_blocks: int) -> bool:
        """Admit `req` (its hit blocks shared with running requests: `hit_blocks`)? Records it
        in the plan when yes."""
        cur = req.num_tokens
        extra = self.adm.remaining(req, cur)
        final = cdiv(cur + extra, self.adm.block_size) - hit_blocks
        one = (np.array([cur], dtype=np.int64), np.array([extra], dtype=np.int64),
               np.array([hit_blocks], dtype=np.int64))
        if self._final + final > self.capacity:
            if self._curve is None:
                self._curve = self._use(self._cur, self._extra, self._hit)
            curve = self._add(self._curve, self._use(*one))
            if int(curve.max()) > self.capacity:
                return False
            self._curve = curve
        elif self._curve is not None:
            self._curve = self._add(self._curve, self._use(*one))
        else:   # the curve, if built later, must include it
            self._cur, self._extra, self._hit = (np.concatenate((a, b)) for a, b in zip(
                (self._cur, self._extra, self._hit), one))
        self._final += final
        return True
