"""KV admission control: admit a waiting request only if the KV pool can hold it and every
running request until each one finishes.

Why. vLLM admits any request whose prompt fits the free blocks now; when the running requests'
growth then runs the pool dry, it preempts one (by recompute), and its computed tokens are
thrown away. Where the pool holds fewer requests than max_num_seqs this repeats every few steps:
Mixtral-8x7B on one H200 holds ~282K tokens, ~370 throughput8k requests, and at the default
1024 sequences it ran at 4673 tok/s against 5196 with admission control (docs/performance.md,
session 18).

The estimate. A running request's KV grows by one token a step until it finishes, when all its
blocks return to the pool. Its output length is unknown, so each request r is alive at future
step t with a probability S_r(t), and then holds held_r(t) blocks (its tokens now plus t). The
pool's use at step t is a sum of independent terms with mean E(t) = sum S_r held_r and variance
V(t) = sum S_r (1 - S_r) held_r^2; a candidate is admitted when E + Z sqrt(V) stays within the
capacity at every future step. The check is on the whole curve, not on the sum of final sizes:
requests of different lengths (nanovllm's) never all peak at once.

S_r comes from the lengths of requests that finished (`LengthModel`): the empirical distribution
of the fraction f of its allowed output (min(max_tokens, CLIP_TOKENS)) a request used, over the
last WINDOW that ended on their own (recent ones weigh more), conditioned on r having already
produced what it has.
  * Requests that run to max_tokens (ignore_eos, benchmarks, short max_tokens) all have f = 1:
    S is 0 or 1, V = 0, and the check is the exact peak of the running requests' sawtooth.
  * Chat requests stop at EOS long before max_tokens (or the context window when it is unset):
    f spreads out, most requests are expected to end soon, and the variance term keeps a margin
    for the ones that do not. (A single mean fraction for everyone, session 18's estimate,
    reserved each request's mean length at once and admitted ~10% fewer chat requests than
    vLLM: -3% in benchmarks/admission_sim.py.)
  * Until PRIOR requests have finished, the missing samples count as f = 1 (no preemption on a
    cold start); a preemption means the estimate was short and stretches every fraction x2
    (decaying back as requests finish). CLIP_TOKENS bounds the horizon of requests without
    max_tokens, which may otherwise run to the context window.

Prefix-cache sharing. A request's hit blocks are held by another request too: each request
counts only its own blocks (its blocks minus the hit ones), and the capacity is the free blocks
plus the running requests' own ones, so a shared prefix is counted once.

Invariant kept: with at least one running request, a waiting one is admitted only when the
bound for (running + admitted this step + it) fits the capacity, or when even every request at
its largest possible size fits; with none running the head of the queue is always admitted
(progress; check_request guarantees its prompt fits). Estimates can be wrong in either
direction: preemption stays the safety net.
"""
from __future__ import annotations

import collections
from typing import NamedTuple, Optional

import numpy as np

from kvflow.core.kv_cache_manager import cdiv
from kvflow.request import Request, RequestStatus

# A request's remaining growth is followed over at most this many tokens (a request without
# max_tokens may run to the context window, but rarely does).
CLIP_TOKENS = 4096
# Finished requests whose used fractions make the length distribution, how fast an older
# one's weight fades (e-fold per MEMORY finishes), and how many there must be before it
# replaces the cold-start assumption (every request runs to its limit).
WINDOW = 512
MEMORY = 128
PRIOR = 4
# Margin in standard deviations of the pool's use at each future step.
Z = 2.0
# After a preemption fractions are stretched by this factor; each finished request takes
# STRETCH_DECAY of the excess over 1 away again.
STRETCH_ON_PREEMPT = 2.0
STRETCH_DECAY = 0.05
MAX_STRETCH = 64.0
# Resolution of the fractions in count_at_least.
BINS = 1024
# The future is cut into at most this many segments of equal length; on each, a request's use
# is bounded by its use at the segment's last step (over-counting by < one segment of tokens)
# and its chance of being alive by that at the segment's first step.
MAX_SEGMENTS = 128


class LengthModel:
    """The distribution of the fraction of its allowed output tokens a request uses: the last
    WINDOW finished requests, the one that finished k requests ago weighted exp(-k / MEMORY),
    so a load that changes (long batch jobs, then chat) moves the estimate within ~MEMORY
    requests while a steady one keeps ~MEMORY requests' worth of samples."""

    def __init__(self):
        self._recent: collections.deque = collections.deque(maxlen=WINDOW)
        self._sorted = np.ones(PRIOR)                 # ascending; PRIOR x 1.0 until learned
        self._weights = np.ones(PRIOR)                # of _sorted's samples
        self.stretch = 1.0
        self._table = None                            # count_at_least by bin, built lazily

    @property
    def deterministic(self) -> bool:
        """Every request is expected to run to its limit (S is 0 or 1)."""
        return float(self._sorted[0]) * self.stretch >= 1.0

    def observe(self, fraction: float) -> None:
        self._recent.append(min(1.0, max(0.0, fraction)))
        n = len(self._recent)
        pad = max(0, PRIOR - n)
        fr = np.concatenate((np.fromiter(self._recent, float), np.ones(pad)))
        w = np.concatenate((np.exp(-np.arange(n - 1, -1, -1) / MEMORY), np.ones(pad)))
        order = np.argsort(fr, kind="stable")
        self._sorted, self._weights = fr[order], w[order]
        self.stretch = 1.0 + (1.0 - STRETCH_DECAY) * (self.stretch - 1.0)
        self._table = None

    def on_preempt(self) -> None:
        self.stretch = min(MAX_STRETCH, self.stretch * STRETCH_ON_PREEMPT)
        self._table = None

    def count_at_least(self, x: np.ndarray) -> np.ndarray:
        """Weight of the samples whose stretched fraction min(1, f * stretch) is >= x, x > 0,
        with x rounded down to a multiple of 1/BINS (a table lookup: searchsorted over the
        [requests, segments] grid was the curves' costliest pass). Rounding down counts a few
        more samples alive, never fewer; x >= 1 + 1/BINS counts none."""
        if self._table is None:
            fs = np.minimum(1.0, self._sorted * self.stretch)
            above = np.append(np.cumsum(self._weights[::-1])[::-1], 0.0)   # weight of fs[j:]
            edges = np.arange(BINS + 1) / BINS
            self._table = np.append(above[np.searchsorted(fs, edges, side="left")],
                                    0.0).astype(np.float32)
        return self._table[np.minimum((x * BINS).astype(np.int32), BINS + 1)]

    def max_fraction(self) -> float:
        return min(1.0, float(self._sorted[-1]) * self.stretch)

    def mean(self) -> float:
        return float(np.average(np.minimum(1.0, self._sorted * self.stretch),
                                weights=self._weights))


class KVAdmission:
    """Per-scheduler state: the length model and each running request's hit blocks."""

    def __init__(self, block_size: int, enabled: bool = True):
        self.block_size = block_size
        self.enabled = enabled
        self.lengths = LengthModel()
        self._hit_blocks: dict[str, int] = {}

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
        if allowed > 0:
            self.lengths.observe(min(req.num_output_tokens, CLIP_TOKENS) / allowed)

    def on_preempt(self) -> None:
        self.lengths.on_preempt()

    # ------------------------------------------------------------------ estimate
    @staticmethod
    def left(req: Request, cur: int) -> int:
        """Tokens `req`, holding `cur`, may still add (clipped). The last sampled token is
        never written to the cache, so a request ends holding prompt + max_tokens - 1 at most."""
        return max(0, min(req.num_prompt_tokens + req.max_tokens - 1 - cur, CLIP_TOKENS))

    def row(self, req: Request, cur: int, hit: int) -> tuple[int, int, int, int, int]:
        """What the estimate needs of `req`, holding `cur` tokens of which `hit` blocks are
        shared: (cur, tokens it may still add, outputs so far, allowed outputs, hit)."""
        return (cur, self.left(req, cur), req.num_output_tokens,
                max(1, min(req.max_tokens, CLIP_TOKENS)), hit)

    def plan(self, running: list[Request], scheduled: dict[str, int], kv) -> "AdmissionPlan":
        """The pool's estimated future use by `running` after this step's allocations
        (`scheduled`: tokens granted to each this step), against which candidates are checked."""
        rows = []
        own_held = 0
        hits, blocks = self._hit_blocks, kv.req_to_blocks
        for r in running:
            rid = r.request_id
            h = hits.get(rid, 0)
            rows.append(self.row(r, max(r.num_computed_tokens + scheduled.get(rid, 0),
                                        r.num_tokens), h))
            own_held += len(blocks.get(rid, ())) - h
        return AdmissionPlan(self, *np.array(rows, dtype=np.int64).reshape(-1, 5).T,
                             capacity=kv.num_free_blocks + own_held)


class _Rows(NamedTuple):
    """Requests' columns [N] and what their curves take from the length model (see
    AdmissionPlan._rows); cond is None while every request is expected to run to its limit."""
    cur: np.ndarray
    left: np.ndarray
    out: np.ndarray
    allowed: np.ndarray
    hit: np.ndarray
    horizon: np.ndarray
    cond: Optional[np.ndarray]

    def concat(self, other: "_Rows") -> "_Rows":
        return _Rows(*(None if a is None else np.concatenate((a, b))
                       for a, b in zip(self, other)))


class AdmissionPlan:
    """One step's check. `fits` accepts a candidate only if the bound on the pool's use, with it
    and every candidate accepted before it, stays within `capacity` blocks."""

    def __init__(self, adm: KVAdmission, cur, left, out, allowed, hit, capacity: int):
        self.adm = adm
        self.capacity = capacity
        self._reqs = self._rows(cur, left, out, allowed, hit)
        # Upper bound: every request at its largest possible size at once. When that fits,
        # the curves are not needed (most steps of a pool with room to spare).
        self._final = int((cdiv(cur + left, adm.block_size) - hit).sum())
        # Segment g covers future steps [g * seg, (g + 1) * seg - 1]; MAX_SEGMENTS of them
        # cover the running requests' longest possible remaining life (candidates' curves
        # may run longer, on the same segments).
        self.seg = max(1, cdiv(int(self._reqs.horizon.max()) + 2, MAX_SEGMENTS))
        self._mean = self._var = None                                        # [G] blocks

    def _rows(self, cur, left, out, allowed, hit) -> _Rows:
        """Requests' columns [N] plus what their curves depend on from the length model,
        computed once per request (the segment length and the curves both need it):
        horizon, the most tokens each may still add given the lengths seen (a request that
        outlived every one of them may run to its limit), and cond, the weight of finished
        requests that ran at least as long as it has (None while every request is expected
        to run to its limit)."""
        lm = self.adm.lengths
        if lm.deterministic:
            return _Rows(cur, left, out, allowed, hit, left, None)
        cond = lm.count_at_least((out + 1) / allowed)
        seen = np.ceil(lm.max_fraction() * allowed).astype(np.int64) - 1 - out
        return _Rows(cur, left, out, allowed, hit,
                     np.where(cond > 0, np.clip(seen, 0, left), left), cond)

    def _curves(self, cur, left, out, allowed, hit, horizon, cond):
        """Mean and variance [G] of the blocks requests [N] (columns as `_rows` gives them)
        hold on each segment g (covering future steps [g * seg, (g + 1) * seg - 1] up to the
        longest one's end). A request holds its blocks through step growth + 1: with async
        scheduling the step that ends it is applied (and its blocks freed) one step later."""
        seg, lm = self.seg, self.adm.lengths
        # float32 throughout: block counts and token positions are integers far below 2^24,
        # and at 1024 requests x 128 segments each pass over the grid costs ~0.2 ms.
        f32 = np.float32
        first = (np.arange((int(horizon.max()) + 1) // seg + 1, dtype=f32) * seg)[None, :]
        held = (np.ceil((cur.astype(f32)[:, None]
                         + np.minimum(left.astype(f32)[:, None], first + (seg - 1)))
                        / f32(self.adm.block_size)) - hit.astype(f32)[:, None])  # [N, G]
        possible = horizon.astype(f32)[:, None] + 1 >= first
        if cond is None:
            return np.where(possible, held, f32(0)).sum(axis=0), None
        # cur = prompt + out (the tokens it has, the last sampled one not yet cached), so with
        # L outputs in all its growth is L - 1 - out, and it is alive at step t >= 1 when
        # L >= out + t, i.e. f * allowed >= out + t. Conditioned on its still running (L >=
        # out + 1); if no finished request ran that long, it is taken to run to its limit.
        cond = cond.astype(f32)[:, None]                                          # [N, 1]
        alive = lm.count_at_least((out.astype(f32)[:, None] + np.maximum(first, 1))
                                  / allowed.astype(f32)[:, None]).astype(f32)     # [N, G]
        s = np.where(cond > 0, alive / np.maximum(cond, 1), f32(1))
        s = np.where(possible, np.minimum(s, 1), f32(0))
        s[:, 0] = possible[:, 0]                    # every request holds its blocks now
        return (s * held).sum(axis=0), (s * (1 - s) * held * held).sum(axis=0)

    @staticmethod
    def _add(a, b):
        """Sum of two curves of possibly different lengths (zero past a curve's end)."""
        if a is None or b is None:
            return a if b is None else b
        if len(a) < len(b):
            a, b = b, a
        out = a.copy()
        out[:len(b)] += b
        return out

    def _bound(self, mean, var) -> float:
        if var is None:
            return float(mean.max())
        return float((mean + Z * np.sqrt(var)).max())

    def fits(self, req: Request, hit_blocks: int) -> bool:
        """Admit `req` (its hit blocks shared with running requests: `hit_blocks`)? Records it
        in the plan when yes."""
        one = self._rows(*(np.array([v], dtype=np.int64)
                           for v in self.adm.row(req, req.num_tokens, hit_blocks)))
        cur, left = one.cur[0], one.left[0]
        final = int(cdiv(cur + left, self.adm.block_size)) - hit_blocks
        fits_final = self._final + final <= self.capacity
        if not fits_final and self._mean is None:
            self._mean, self._var = self._curves(*self._reqs)
        if self._mean is not None:
            m1, v1 = self._curves(*one)
            mean, var = self._add(self._mean, m1), self._add(self._var, v1)
            if not fits_final and self._bound(mean, var) > self.capacity:
                return False
            self._mean, self._var = mean, var
        else:   # the curves, if built later, must include it
            self._reqs = self._reqs.concat(one)
        self._final += final
        return True
