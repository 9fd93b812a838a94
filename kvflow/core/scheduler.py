"""Continuous-batching scheduler.

One rule drives everything (see kvflow/request.py): each step, running requests and then waiting
ones are granted tokens under a budget until num_computed_tokens meets num_tokens. A prompt larger
than the budget is split across steps (chunked prefill) and shares steps with decodes. When the
KV pool runs dry the most recently admitted running request is preempted: its blocks are freed and
it is recomputed later from the prefix cache and its token history (preemption by recompute).

Fairness: running requests are served in admission order before any waiting one is admitted, and
a preempted request goes back to the front of the waiting queue, so nothing starves.

Disaggregated prefill/decode (kvflow/kv_transfer): the scheduler always holds a connector (the
null one by default). On a consumer, a waiting request whose prompt KV can be pulled from a
producer gets its blocks allocated and waits in `loading` (WAITING_FOR_REMOTE_KV) until the
worker reports the load; it then re-enters the waiting queue with those tokens computed, or, if
the load failed, either prefills locally ("recompute") or fails ("fail"). On a producer, a
finished request's blocks may be kept in `sending` until the worker reports them pulled.
Blocks of a load are never freed while the worker may still write them (an abort during a load
frees them when the load's report arrives).

Policies: "fcfs" (default) orders by arrival; "priority" orders waiting and running requests by
(priority, arrival) — lower value first, as vLLM — so the lowest-priority running request is the
one preempted and the highest-priority waiting one is admitted first.
"""
from __future__ import annotations

import bisect
import itertools
import time
from collections import deque
from dataclasses import dataclass
from typing import Iterable, Optional

from kvflow.core.admission import KVAdmission
from kvflow.core.kv_cache_manager import KVCacheManager
from kvflow.kv_transfer.base import KVTransferResult, NullSchedulerConnector
from kvflow.core.sched_output import (CachedRequestData, EngineCoreOutput, NewRequestData,
                                      RunnerOutput, SchedulerOutput)
from kvflow.request import Request, RequestStatus
from kvflow.sampling_params import SamplingParamError


@dataclass
class SchedulerStats:
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    num_preemptions: int = 0


class FCFSQueue:
    """Waiting requests in arrival order; preempted ones go back to the front.

    num_tokens: the tokens left to compute of the queued requests, as of when each was queued
    (O(1) to read; LLM.generate uses it to keep the queue a few steps deep)."""

    def __init__(self):
        self._q: deque[Request] = deque()
        self._init_tokens()

    def _init_tokens(self) -> None:
        self._queued: dict[str, int] = {}   # request id -> its tokens left when queued
        self.num_tokens = 0

    def _enter(self, req: Request) -> Request:
        n = req.num_tokens - req.num_computed_tokens
        self._queued[req.request_id] = n
        self.num_tokens += n
        return req

    def _leave(self, req: Request) -> Request:
        self.num_tokens -= self._queued.pop(req.request_id)
        return req

    def add(self, req: Request) -> None:
        self._q.append(self._enter(req))

    def add_preempted(self, req: Request) -> None:
        self._q.appendleft(self._enter(req))

    def peek(self) -> Request:
        return self._q[0]

    def pop(self) -> Request:
        return self._leave(self._q.popleft())

    def remove(self, req: Request) -> None:
        self._q.remove(req)
        self._leave(req)

    def __iter__(self):
        return iter(self._q)

    def __len__(self) -> int:
        return len(self._q)

    def __bool__(self) -> bool:
        return bool(self._q)


class PriorityQueue(FCFSQueue):
    """Waiting requests ordered by (priority, arrival); a preempted request keeps its key, so it
    comes back before later arrivals of its priority."""

    def __init__(self):
        self._q: list = []  # sorted (priority, arrival, seq, request)
        self._seq = itertools.count()
        self._init_tokens()

    def add(self, req: Request) -> None:
        bisect.insort(self._q, (req.priority, req.arrival_time, next(self._seq), self._enter(req)),
                      key=lambda e: e[:3])

    add_preempted = add

    def peek(self) -> Request:
        return self._q[0][3]

    def pop(self) -> Request:
        return self._leave(self._q.pop(0)[3])

    def __iter__(self):
        return (e[3] for e in self._q)

    def remove(self, req: Request) -> None:
        kept = [e for e in self._q if e[3] is not req]
        if len(kept) != len(self._q):
            self._q = kept
            self._leave(req)


class Scheduler:
    def __init__(self, *, max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int,
                 num_blocks: int, block_size: int, enable_prefix_caching: bool,
                 enable_chunked_prefill: bool = True, long_prefill_token_threshold: int = 0,
                 policy: str = "fcfs", connector=None, admission_control: bool = True,
                 ride_budget: int = 0, ride_granule: int = 0, ride_chunk: int = 0,
                 ride_fill: int = 0):
        if policy not in ("fcfs", "priority"):
            raise ValueError(f"scheduling_policy: must be 'fcfs' or 'priority', got {policy!r}")
        self.policy = policy
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.block_size = block_size
        self.enable_chunked_prefill = enable_chunked_prefill
        self.long_prefill_token_threshold = long_prefill_token_threshold
        self.ride_budget = ride_budget
        self.ride_granule = ride_granule
        self.ride_chunk = ride_chunk
        self.ride_fill = ride_fill
        # Prompt tokens the paced rate has asked for and no step has taken yet (ride_chunk);
        # negative when a step's rounding took more.
        self._ride_credit = 0
        self.kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching)
        # Off: admit whatever fits the pool now and preempt when it runs dry (vLLM's way).
        self.admission = KVAdmission(block_size, enabled=admission_control)
        self.requests: dict[str, Request] = {}
        self.waiting = PriorityQueue() if policy == "priority" else FCFSQueue()
        self.running: list[Request] = []
        # Requests the runner should forget at the next step.
        self._finished_for_runner: set[str] = set()
        self.num_preemptions = 0
        self.connector = connector if connector is not None else NullSchedulerConnector()
        self.loading: dict[str, Request] = {}   # waiting for remote KV (blocks allocated)
        self.sending: dict[str, Request] = {}   # finished; blocks kept until pulled

    # ------------------------------------------------------------------ requests
    def check_request(self, request: Request) -> None:
        """Raise SamplingParamError (a ValueError naming the field) if the request can never run."""
        if request.request_id in self.requests:
            raise SamplingParamError("request_id", f"request_id: {request.request_id!r} is already in use")
        if request.max_tokens < 1:
            raise SamplingParamError("prompt", f"prompt: prompt has {request.num_prompt_tokens} tokens but max_model_len is "
                             f"{self.max_model_len}: the prompt must be shorter than max_model_len "
                             "so at least one token can be generated")
        if request.num_tokens > self.kv.pool.num_blocks * self.block_size:
            raise SamplingParamError("prompt", f"prompt: prompt has {request.num_prompt_tokens} tokens but the KV cache holds "
                             f"only {self.kv.pool.num_blocks * self.block_size}")
        if request.priority != 0 and self.policy != "priority":
            raise SamplingParamError("priority", "priority: request priorities need "
                                                 "scheduling_policy='priority'")
        self.connector.check_request(request)

    def add_request(self, request: Request) -> None:
        self.check_request(request)
        self.requests[request.request_id] = request
        self.waiting.add(request)

    def num_waiting_tokens(self) -> int:
        """Tokens left to compute of the waiting requests (as of when each was queued)."""
        return self.waiting.num_tokens

    def finish_requests(self, request_ids: Iterable[str], status: RequestStatus) -> list[Request]:
        """Finish requests from outside the step loop (abort, stop string, error)."""
        assert status.finished
        done = []
        for rid in request_ids:
            req = self.requests.get(rid)
            if req is None or req.is_finished:
                continue
            if req.status == RequestStatus.WAITING_FOR_REMOTE_KV:
                # The worker may still be writing its blocks: they are freed when the load's
                # report arrives (_update_transfers), not now.
                req.status = status
                del self.requests[rid]
                done.append(req)
                continue
            if req.status == RequestStatus.RUNNING:
                self.running.remove(req)
            else:
                self.waiting.remove(req)
            req.status = status
            self.admission.on_finished(req)   # a stop string; aborts teach nothing
            # Finished from outside the step: its last output is already out, so nobody would
            # receive kv_transfer_params. Never hold its blocks for a transfer.
            self._free(req, may_hold=False)
            done.append(req)
        return done

    def _free(self, req: Request, may_hold: bool = True) -> None:
        hold = False
        if may_hold:
            hold, req.kv_transfer_params_out = self.connector.request_finished(
                req, self.kv.get_block_ids(req.request_id))
        self.admission.on_release(req)
        if hold:
            self.sending[req.request_id] = req  # freed when the worker reports it sent
        else:
            self.kv.free(req)
        self._finished_for_runner.add(req.request_id)
        del self.requests[req.request_id]

    def has_unfinished_requests(self) -> bool:
        # Loads and held sends keep the engine stepping: their reports arrive through steps.
        return bool(self.waiting or self.running or self.loading or self.sending) or \
            self.connector.has_pending_work()

    def get_num_unfinished_requests(self) -> int:
        return len(self.waiting) + len(self.running)

    # ------------------------------------------------------------------ schedule
    def _cap(self, req: Request, num_new: int, budget: int) -> int:
        if self.long_prefill_token_threshold:
            num_new = min(num_new, self.long_prefill_token_threshold)
        return min(num_new, budget)

    def _preempt(self, victim: Request) -> None:
        self.kv.free(victim)
        self.admission.on_release(victim)
        self.admission.on_preempt()
        victim.status = RequestStatus.PREEMPTED
        victim.num_computed_tokens = 0
        victim.num_preemptions += 1
        self.num_preemptions += 1
        self._finished_for_runner.add(victim.request_id)
        self.waiting.add_preempted(victim)

    def _step_budget(self) -> int:
        """This step's token budget: at most ride_budget while prompts can ride in the running
        decodes' steps, else max_num_batched_tokens.

        Why. A decode step reads all its weights whatever its batch (a MoE step every expert's),
        so up to some size a step costs about the same: prompt tokens added to it are nearly
        free, where a large prefill-only step pays for each one. Riding delays prompts, so it is
        worth it only while that delay costs no steps: every prompt left, prefilled in turn in
        the step's spare room, must still finish its output (max_tokens) before the longest
        running request finishes. Offline batches started longest output first (LLM.generate)
        pass; a stream of equal requests (throughput8k) does not, and keeps large prefill steps.
        Evaluated every step: the choice follows the queue.

        How much room. ride_granule 0 (MoE models): the step takes all of ride_budget. A MoE
        step costs the same up to its budget (one row tile an expert), so room left empty is
        lost. ride_granule > 0 (dense models): the step takes the smallest multiple of the
        granule that still gets every prompt in on time ("paced"). Past the ~160 rows a dense
        step's products stay weight-bound, each row costs about what it costs in a prefill
        step, so filling a step early buys nothing. Worse, prompts started early end early,
        and the run's last steps then carry a few long decodes each at a whole weight read.
        Paced, the prompts start about as late as their outputs allow and end with the longest
        requests, which keeps the last steps full. benchmarks/ride_sim.py models Llama-3.1-8B
        nanovllm at 12.07 s with 256-token steps and 11.55 s paced up to 512 by 64; the H200
        read +1.3%, as pacing makes twice as many steps mixed, whose attention costs more than
        the model charges (docs/performance.md, session 31).
        A paced batch also rides from its first step: the head of the queue (its longest
        output) sets the horizon. A MoE batch's first step is a large prefill instead, since a
        riding MoE step of mostly prompt tokens costs more per token than a large one.

        How often (ride_chunk > 0, paced only: "lazy"). A mixed step costs more than its
        products and KV reads predict (its two attention launches, the prompt chunk's prefix
        walk; ~1 ms on Llama-3.1-8B by the A/B below). A step of at least ride_fill decodes
        banks its paced room and rides only once the bank holds ride_chunk tokens (or all the
        room the step has), or when taking nothing would make a prompt late; the steps between
        carry the decodes alone. The paced room still sets the rate, so prompts stay on time,
        now in fewer, larger mixed steps. A step of fewer decodes rides every time, filled to
        ride_fill rows: that room is weight-bound, nearly free. Llama-3.1-8B nanovllm on an
        H200: +0.9-1.2% at 384 / 160 on three leases (config.DENSE_RIDE_CHUNK). Call once per
        step: the bank is this method's state."""
        full = self.max_num_batched_tokens
        room, skippable, decoding = self._paced_room()
        if room is None:
            self._ride_credit = 0
            return full
        g = self.ride_granule or self.ride_budget
        lazy = bool(self.ride_chunk and decoding)
        if lazy:
            # Lazy: bank the paced rate and ride only once it adds up to a chunk (or to all the
            # room there is), so the same prompt tokens ride in fewer, larger mixed steps.
            self._ride_credit += room
            fill = self.ride_fill
            if (skippable and decoding >= fill
                    and self._ride_credit < min(self.ride_chunk, self.ride_budget - decoding)):
                return decoding
            room = max(room, self._ride_credit, fill - decoding)
        budget = min(full, self.ride_budget, -(-(decoding + room) // g) * g)
        # A step that takes more than the bank (rounding up to the granule, filling) is ahead.
        self._ride_credit = self._ride_credit - (budget - decoding) if lazy else 0
        return budget

    def _paced_room(self) -> tuple[Optional[int], bool, int]:
        """(room: the prompt tokens this step must take to keep every prompt on time,
        skippable: whether taking none keeps them on time as well, running decodes);
        room None: no riding this step (nothing waits, no room left, or a prompt is late)."""
        decoding = horizon = 0
        if not self.ride_budget or not self.waiting:
            return None, False, decoding
        prefilling = []
        for r in self.running:
            if r.num_computed_tokens < r.num_prompt_tokens:
                prefilling.append(r)
            elif not self._ends_in_flight(r):   # it takes no row
                decoding += 1
                horizon = max(horizon, self._tokens_left(r))
        max_room = self.ride_budget - decoding
        if max_room <= 0:
            return None, False, decoding
        if not decoding:
            if not self.ride_granule:
                return None, False, decoding
            # The head (the longest output) sets the horizon, prefilled at full room (so its
            # own constraint below keeps it at full room); the rest must fit in it.
            head = prefilling[0] if prefilling else next(iter(self.waiting))
            horizon = (self._tokens_left(head)
                       + -(-(head.num_tokens - head.num_computed_tokens) // max_room))
        # The smallest room that prefills every prompt in turn before its own output would
        # outlast the horizon: the k-th finishes at ceil(tokens before and in it / room) +
        # its output, so room >= that sum / (horizon - its output).
        # skippable: the same still holds one step later (a lazy step may take no prompt).
        room = 1
        to_prefill = 0
        skippable = True
        for r in itertools.chain(prefilling, self.waiting):
            to_prefill += r.num_tokens - r.num_computed_tokens
            slack = horizon - self._tokens_left(r)
            if slack <= 0:
                return None, False, decoding
            room = max(room, -(-to_prefill // slack))
            if room > max_room:
                return None, False, decoding
            skippable = skippable and slack > 1 and -(-to_prefill // (slack - 1)) <= max_room
        return room, skippable, decoding

    def _ends_in_flight(self, r: Request) -> bool:
        """Whether r's token still in flight (async scheduling) is its last."""
        pending = r.num_output_placeholders
        return bool(pending) and (r.num_output_tokens + pending >= r.max_tokens
                                  or r.num_tokens + pending >= self.max_model_len)

    def _tokens_left(self, r: Request) -> int:
        """Output tokens r may still produce (max_tokens is already capped by the prompt's
        room in max_model_len)."""
        return r.max_tokens - r.num_output_tokens

    def schedule(self) -> SchedulerOutput:
        budget = step_budget = self._step_budget()
        num_scheduled: dict[str, int] = {}
        cached: list[CachedRequestData] = []
        new: list[NewRequestData] = []
        preempted_any = False

        if self.policy == "priority":
            # Highest priority first; the tail (popped on preemption) is the lowest.
            self.running.sort(key=lambda r: (r.priority, r.arrival_time))
        # 1) Running requests, in admission order.
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            if self._ends_in_flight(req):
                i += 1  # nothing more to compute
                continue
            num_new = self._cap(req, req.num_tokens + req.num_output_placeholders
                                - req.num_computed_tokens, budget)
            if num_new <= 0:
                i += 1
                continue
            while True:
                new_blocks = self.kv.allocate_slots(req, num_new)
                if new_blocks is not None:
                    break
                victim = self.running.pop()  # the latest admitted, never one already scheduled
                self._preempt(victim)
                preempted_any = True
                if victim is req:
                    break
            if new_blocks is None:
                break
            num_scheduled[req.request_id] = num_new
            budget -= num_new
            cached.append(CachedRequestData(req.request_id, [b.block_id for b in new_blocks],
                                            req.num_computed_tokens))
            i += 1

        # 2) Waiting requests, while there is room. After a preemption nothing new is admitted
        #    this step: the pool is known to be short. With admission control (core/admission.py)
        #    a request also waits while the pool could not hold it and the running requests
        #    until they finish.
        plan = None
        while (not preempted_any and self.waiting and budget > 0
               and len(self.running) < self.max_num_seqs):
            req = self.waiting.peek()
            if req.num_output_placeholders:
                break  # preempted with a token still in flight: resume once it has arrived
            if req.num_computed_tokens:
                # Its KV was loaded from a producer: the blocks are already its own (and not
                # taken from the free pool again).
                hits, num_hit = [], req.num_computed_tokens
                shared = len(self.kv.req_to_blocks.get(req.request_id, ()))
            else:
                hits, num_hit = self.kv.get_computed_blocks(req)
                # Hits another running request holds too count as that one's.
                shared = sum(1 for b in hits if b.ref_cnt > 0)
                num_remote = self.connector.get_num_new_matched_tokens(req, num_hit)
                if num_remote:
                    if not self._start_load(req, hits, num_hit, num_remote):
                        break
                    continue
            num_new = req.num_tokens - num_hit
            if not self.enable_chunked_prefill and num_new > budget:
                break
            num_new = self._cap(req, num_new, budget)
            if self.admission.enabled and self.running:
                if plan is None:
                    plan = self.admission.plan(self.running, num_scheduled, self.kv)
                if not plan.fits(req, shared):
                    break  # it would crowd out the running requests' growth: wait
            new_blocks = self.kv.allocate_slots(req, num_new, hits)
            if new_blocks is None:
                break
            self._admit(req, RequestStatus.RUNNING, num_hit)
            self.admission.on_admit(req, shared)
            self.running.append(req)
            num_scheduled[req.request_id] = num_new
            budget -= num_new
            new.append(NewRequestData(req.request_id, list(req.all_token_ids), req.num_prompt_tokens,
                                      req.sampling_params, self.kv.get_block_ids(req.request_id),
                                      num_hit))

        out = SchedulerOutput(new_reqs=new, cached_reqs=cached, num_scheduled_tokens=num_scheduled,
                              total_num_scheduled_tokens=step_budget - budget,
                              finished_req_ids=self._finished_for_runner,
                              kv_connector_metadata=self.connector.build_connector_meta())
        self._finished_for_runner = set()
        # The runner computes these tokens in this step; advance now so the next schedule()
        # (possibly before update_from_output, in an overlapped loop) sees them as computed.
        # A request that catches up samples a token: count it as a placeholder until it arrives.
        for rid, n in num_scheduled.items():
            req = self.requests[rid]
            req.num_computed_tokens += n
            if req.num_computed_tokens == req.num_tokens + req.num_output_placeholders:
                req.num_output_placeholders += 1
        return out

    def _admit(self, req: Request, status: RequestStatus, num_hit: int) -> None:
        """Move the head of the waiting queue (`req`, its blocks allocated) to `status`, with its
        first num_hit tokens already computed (prefix-cache hits)."""
        self.waiting.pop()
        req.status = status
        req.num_computed_tokens = num_hit
        if req.num_cached_tokens < 0:
            req.num_cached_tokens = num_hit
        if req.first_scheduled_time is None:
            req.first_scheduled_time = time.time()

    # ------------------------------------------------------------------ KV transfer
    def _start_load(self, req: Request, hits: list, num_hit: int, num_remote: int) -> bool:
        """Allocate blocks for the remote tokens and park the request until they are loaded.
        False (nothing changed) when the pool cannot supply them now."""
        # Not registered in the prefix cache until the bytes are there (cache=False).
        if self.kv.allocate_slots(req, num_remote, hits, cache=False) is None:
            return False
        self._admit(req, RequestStatus.WAITING_FOR_REMOTE_KV, num_hit)
        self.loading[req.request_id] = req
        self.connector.update_state_after_alloc(req, self.kv.get_block_ids(req.request_id),
                                                num_hit, num_remote)
        return True

    def _update_transfers(self, kt: KVTransferResult) -> list[EngineCoreOutput]:
        results = []
        for rid in kt.finished_sending:
            req = self.sending.pop(rid, None)
            if req is not None:
                self.kv.free(req)
        for rid in kt.finished_recving:
            req = self.loading.pop(rid, None)
            num_remote = self.connector.load_finished(rid)
            if req is None:
                continue
            if req.is_finished:  # aborted while loading
                self.kv.free(req)
                continue
            req.num_computed_tokens += num_remote
            req.status = RequestStatus.WAITING
            self.waiting.add_preempted(req)  # it was admitted already: first in line
        for rid, why in kt.failed_recving.items():
            req = self.loading.pop(rid, None)
            self.connector.load_finished(rid)
            if req is None:
                continue
            self.kv.free(req)
            if req.is_finished:
                continue
            if self.connector.failure_policy == "fail":
                req.status = RequestStatus.FINISHED_ERROR
                del self.requests[rid]
                results.append(EngineCoreOutput(rid, [], "error", error=why))
            else:  # recompute: an ordinary request from here on
                req.num_computed_tokens = 0
                req.status = RequestStatus.WAITING
                self.waiting.add_preempted(req)
        return results

    # ------------------------------------------------------------------ update
    def update_from_output(self, sched: SchedulerOutput, out: RunnerOutput) -> list[EngineCoreOutput]:
        results = self._update_transfers(out.kv_transfers) if not out.kv_transfers.empty else []
        for rid in sched.num_scheduled_tokens:
            req = self.requests.get(rid)
            if req is None or req.is_finished:
                continue  # aborted while the step ran
            if rid in out.sampled_token_ids and out.sampled_token_ids[rid] and req.num_output_placeholders:
                req.num_output_placeholders -= 1
            if rid in out.errors:
                req.status = RequestStatus.FINISHED_ERROR
                self.running.remove(req)
                self._free(req)
                results.append(EngineCoreOutput(rid, [], "error", error=out.errors[rid],
                                                num_cached_tokens=max(req.num_cached_tokens, 0)))
                continue
            new_tokens = out.sampled_token_ids.get(rid) or []
            accepted = []
            for tok in new_tokens:
                req.append_output_token(tok)
                accepted.append(tok)
                if self._check_stop(req, tok):
                    break
            prompt_lp = out.prompt_logprobs.get(rid)
            if not accepted and prompt_lp is None:
                continue  # partial prefill: nothing to report
            if accepted and req.first_token_time is None:
                req.first_token_time = time.time()
            results.append(EngineCoreOutput(
                rid, accepted, req.status.finish_reason, req.stop_reason,
                logprobs=out.logprobs.get(rid), prompt_logprobs=prompt_lp,
                num_cached_tokens=max(req.num_cached_tokens, 0)))
            if req.is_finished:
                self.admission.on_finished(req)
                if req in self.running:
                    self.running.remove(req)
                else:  # preempted while its last token was in flight
                    self.waiting.remove(req)
                self._free(req)
                results[-1].kv_transfer_params = req.kv_transfer_params_out
        return results

    def _check_stop(self, req: Request, tok: int) -> bool:
        sp = req.sampling_params
        if tok in req.stop_token_ids and req.num_output_tokens >= sp.min_tokens:
            req.status = RequestStatus.FINISHED_STOPPED
            # vLLM: stop_reason is the stop token id; None when it was EOS.
            req.stop_reason = tok if tok in sp.stop_token_ids else None
        elif req.num_output_tokens >= req.max_tokens or req.num_tokens >= self.max_model_len:
            req.status = RequestStatus.FINISHED_LENGTH
        else:
            return False
        return True

    # ------------------------------------------------------------------ stats
    def stats(self) -> SchedulerStats:
        return SchedulerStats(num_running=len(self.running), num_waiting=len(self.waiting),
                              kv_cache_usage=self.kv.usage,
                              prefix_cache_queries=self.kv.stats.queries,
                              prefix_cache_hits=self.kv.stats.hits,
                              num_preemptions=self.num_preemptions)

    def reset_prefix_cache(self) -> bool:
        return self.kv.reset_prefix_cache()

    def get_request(self, rid: str) -> Optional[Request]:
        return self.requests.get(rid)
