"""Scheduler, KV cache manager and block pool, without a model: invariants under random load."""
from __future__ import annotations

import itertools
import random

import pytest

from kvflow.core.block_hash import extend_block_hashes, hash_block
from kvflow.core.block_pool import BlockPool
from kvflow.core.sched_output import RunnerOutput
from kvflow.core.scheduler import Scheduler
from kvflow.request import Request, RequestStatus
from kvflow.sampling_params import SamplingParams


def _req(rid, n_prompt, max_tokens=8, seed=0, prefix=()):
    rng = random.Random(seed)
    ids = list(prefix) + [rng.randrange(1000) for _ in range(n_prompt - len(prefix))]
    return Request(rid, ids, SamplingParams(max_tokens=max_tokens, ignore_eos=True), max_model_len=4096)


def _fake_step(s: Scheduler, rng: random.Random, vocab=1000):
    so = s.schedule()
    sampled = {}
    for rid, n in so.num_scheduled_tokens.items():
        req = s.requests[rid]
        # Mirrors the runner: sample once a request has caught up with its tokens.
        sampled[rid] = [rng.randrange(vocab)] if req.num_computed_tokens == req.num_tokens else []
    return so, s.update_from_output(so, RunnerOutput(sampled_token_ids=sampled))


def _check_invariants(s: Scheduler):
    kv = s.kv
    in_use = {b.block_id for blocks in kv.req_to_blocks.values() for b in blocks}
    held = sum(b.ref_cnt > 0 for b in kv.pool.blocks)
    assert held == len(in_use)
    assert kv.pool.num_free_blocks + held == kv.pool.num_blocks
    for r in s.running:
        assert r.status == RequestStatus.RUNNING
        assert r.num_computed_tokens <= r.num_tokens
        assert len(kv.req_to_blocks.get(r.request_id, [])) * s.block_size >= r.num_computed_tokens
    for b in kv.pool.blocks:
        assert (b.ref_cnt == 0) == (b.block_id in kv.pool.free_queue)
        if b.block_hash is not None:
            assert kv.pool.cached[b.block_hash] is b
    assert len(s.running) <= s.max_num_seqs
    # The waiting queue's token count (tokens left when each request was queued): zero exactly
    # when the queue is empty, and within one token a request of the exact count (a preempted
    # request's in-flight token may land while it waits).
    exact = sum(r.num_tokens - r.num_computed_tokens for r in s.waiting)
    assert (s.num_waiting_tokens() == 0) == (not s.waiting)
    assert abs(s.num_waiting_tokens() - exact) <= len(s.waiting)


def test_block_hash_chain():
    a = hash_block(None, [1, 2, 3, 4])
    assert a == hash_block(None, [1, 2, 3, 4]) and a != hash_block(None, [1, 2, 3, 5])
    assert hash_block(a, [5, 6]) != hash_block(hash_block(None, [9, 9, 9, 9]), [5, 6])
    hs = []
    extend_block_hashes(hs, list(range(10)), 4)
    assert len(hs) == 2 and hs[1] == hash_block(hs[0], [4, 5, 6, 7])


def test_block_pool_lru_and_refcounts():
    pool = BlockPool(4, enable_caching=True)
    blocks = pool.get_new_blocks(3)
    for i, b in enumerate(blocks):
        pool.cache_block(b, bytes([i]))
    pool.free_blocks(reversed(blocks))        # tail first: block 2 evicted first
    assert pool.num_free_blocks == 4
    hit = pool.get_cached_block(bytes([0]))
    pool.touch([hit])
    assert hit.ref_cnt == 1 and pool.num_free_blocks == 3
    new = pool.get_new_blocks(2)               # block 3 (never cached), then block 2 (evicted)
    assert [b.block_id for b in new] == [3, 2]
    assert pool.get_cached_block(bytes([2])) is None and pool.get_cached_block(bytes([1])) is not None
    with pytest.raises(RuntimeError):
        pool.get_new_blocks(5)
    assert not pool.reset_prefix_cache()       # blocks in use
    pool.free_blocks([hit] + new)
    assert pool.reset_prefix_cache() and not pool.cached


def test_prefix_hit_leaves_one_token_to_compute():
    s = Scheduler(max_num_seqs=4, max_num_batched_tokens=256, max_model_len=4096, num_blocks=32,
                  block_size=4, enable_prefix_caching=True)
    rng = random.Random(0)
    r1 = _req("a", 16)
    s.add_request(r1)
    while s.has_unfinished_requests():
        _fake_step(s, rng)
    r2 = _req("b", 16)       # same prompt (same seed), block-aligned
    s.add_request(r2)
    so = s.schedule()
    assert r2.num_cached_tokens == 12  # 3 of 4 blocks: the last token must be recomputed
    assert so.num_scheduled_tokens["b"] == 4
    s.finish_requests(["b"], RequestStatus.FINISHED_ABORTED)
    assert s.kv.num_free_blocks == 32


@pytest.mark.parametrize("admission", [True, False], ids=["admission", "no-admission"])
@pytest.mark.parametrize("seed", range(6))
def test_random_load_no_leaks_no_starvation(seed, admission):
    rng = random.Random(seed)
    block_size = rng.choice([2, 4, 16])
    s = Scheduler(max_num_seqs=rng.choice([2, 5, 64]), max_num_batched_tokens=rng.choice([7, 32, 512]),
                  max_model_len=4096, num_blocks=rng.choice([40, 80, 400]), block_size=block_size,
                  enable_prefix_caching=rng.random() < 0.7, enable_chunked_prefill=True,
                  admission_control=admission, ride_budget=rng.choice([0, 3, 24]))
    shared = [rng.randrange(1000) for _ in range(24)]
    added, finished, aborted = 0, set(), set()
    for step in range(3000):
        if added < 60 and rng.random() < 0.3:
            prefix = shared if rng.random() < 0.5 else ()
            s.add_request(_req(f"r{added}", rng.randint(len(prefix) + 1, 60), rng.randint(1, 20),
                               seed=rng.randrange(10 ** 6), prefix=prefix))
            added += 1
        if rng.random() < 0.03 and s.requests:
            victim = rng.choice(list(s.requests))
            for r in s.finish_requests([victim], RequestStatus.FINISHED_ABORTED):
                aborted.add(r.request_id)
        so, outs = _fake_step(s, rng)
        assert so.total_num_scheduled_tokens <= s.max_num_batched_tokens
        finished |= {o.req_id for o in outs if o.finish_reason}
        _check_invariants(s)
        if added >= 60 and not s.has_unfinished_requests():
            break
    assert not s.has_unfinished_requests(), "requests starved"
    assert finished | aborted == {f"r{i}" for i in range(added)}
    assert s.kv.num_free_blocks == s.kv.pool.num_blocks
    assert not s.kv.req_to_blocks


def test_preemption_recomputes_from_scratch():
    # Without admission control (vLLM's way) all three are admitted and outgrow the pool.
    s = Scheduler(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=4096, num_blocks=6,
                  block_size=4, enable_prefix_caching=False, admission_control=False)
    rng = random.Random(1)
    for i in range(3):
        s.add_request(_req(f"p{i}", 6, max_tokens=12, seed=i))
    seen_preempt = False
    for _ in range(500):
        so, _ = _fake_step(s, rng)
        if s.num_preemptions:
            seen_preempt = True
            for nr in so.new_reqs:  # a resumed request restarts with its whole history
                assert len(nr.token_ids) == s.requests[nr.req_id].num_tokens or nr.num_computed_tokens == 0
        _check_invariants(s)
        if not s.has_unfinished_requests():
            break
    assert seen_preempt and not s.has_unfinished_requests()
    assert s.kv.num_free_blocks == 6


def test_prompt_larger_than_cache_rejected():
    s = Scheduler(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=4096, num_blocks=2,
                  block_size=4, enable_prefix_caching=False)
    with pytest.raises(ValueError, match="KV cache holds only 8"):
        s.add_request(_req("x", 20))


def test_priority_policy_orders_admission_and_preemption():
    s = Scheduler(max_num_seqs=1, max_num_batched_tokens=256, max_model_len=4096, num_blocks=64,
                  block_size=4, enable_prefix_caching=False, policy="priority")
    reqs = [_req("low", 8, seed=1), _req("high", 8, seed=2), _req("mid", 8, seed=3)]
    for r, prio in zip(reqs, (5, -1, 2)):
        r.priority = prio
        s.add_request(r)
    order = []
    rng = random.Random(0)
    while s.has_unfinished_requests():
        so, _ = _fake_step(s, rng)
        order.extend(nr.req_id for nr in so.new_reqs)
    assert order == ["high", "mid", "low"]
    assert s.num_waiting_tokens() == 0 and not list(s.waiting)


@pytest.mark.parametrize("policy", ["fcfs", "priority"])
def test_waiting_token_count_follows_the_queue(policy):
    s = Scheduler(max_num_seqs=2, max_num_batched_tokens=16, max_model_len=4096, num_blocks=64,
                  block_size=4, enable_prefix_caching=False, policy=policy)
    for i, n in enumerate((10, 7, 5, 9)):
        s.add_request(_req(f"r{i}", n))
    assert s.num_waiting_tokens() == 31
    s.finish_requests(["r2"], RequestStatus.FINISHED_ABORTED)   # removed while waiting
    assert s.num_waiting_tokens() == 26
    so, _ = _fake_step(s, random.Random(0))   # admits r0 (10) and r1 (6 of 7): max_num_seqs 2
    assert set(so.num_scheduled_tokens) == {"r0", "r1"}
    assert s.num_waiting_tokens() == 9 and [r.request_id for r in s.waiting] == ["r3"]


def test_priority_needs_priority_policy():
    s = Scheduler(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=4096, num_blocks=8,
                  block_size=4, enable_prefix_caching=False)
    r = _req("x", 4)
    r.priority = 3
    with pytest.raises(ValueError, match="priority"):
        s.add_request(r)


def _ride_scheduler(ride_budget=50, budget=1000, ride_granule=0):
    return Scheduler(max_num_seqs=64, max_num_batched_tokens=budget, max_model_len=4096,
                     num_blocks=4096, block_size=16, enable_prefix_caching=False,
                     ride_budget=ride_budget, ride_granule=ride_granule)


def test_prompts_ride_decode_steps_while_the_decodes_outlast_them():
    """Steps take ride_budget tokens while every waiting prompt, prefilled in turn in the
    spare room (49 tokens a step beside one decode), still finishes its output before the
    running decode's 499 remaining tokens; prompts that would outlast it, or whose own output
    would (a stream of equal requests), get the full budget, and so does a step with no
    decode to ride on."""
    rng = random.Random(0)
    s = _ride_scheduler()
    s.add_request(_req("long", 10, max_tokens=500))
    so, _ = _fake_step(s, rng)
    assert so.total_num_scheduled_tokens == 10          # nothing decoding yet: full budget
    for i in range(5):
        s.add_request(_req(f"p{i}", 40, seed=i))
    so, _ = _fake_step(s, rng)
    assert so.num_scheduled_tokens["long"] == 1
    assert so.total_num_scheduled_tokens == 50           # 1 decode + 49 prompt tokens
    while s.waiting or any(r.num_computed_tokens < r.num_prompt_tokens for r in s.running):
        so, _ = _fake_step(s, rng)
        assert so.total_num_scheduled_tokens <= 50
        _check_invariants(s)

    # 30 prompts of 1000 tokens: the 25th would start after 25000 / 49 > 497 steps.
    big = _ride_scheduler()
    big.add_request(_req("long", 10, max_tokens=500))
    _fake_step(big, rng)
    for i in range(30):
        big.add_request(_req(f"q{i}", 1000, seed=i))
    so, _ = _fake_step(big, rng)
    assert so.total_num_scheduled_tokens == 1000

    # Equal requests: a late prompt riding would finish after the running one.
    equal = _ride_scheduler()
    equal.add_request(_req("first", 10, max_tokens=8))
    _fake_step(equal, rng)
    equal.add_request(_req("second", 10, max_tokens=8, seed=1))
    assert equal._step_budget() == 1000
    equal.add_request(_req("shorter", 10, max_tokens=5, seed=2))   # behind it: no difference
    assert equal._step_budget() == 1000
    equal.finish_requests(["second"], RequestStatus.FINISHED_ABORTED)
    assert equal._step_budget() == 50                               # 1 + 5 <= 7 steps left
    equal.finish_requests(["first", "shorter"], RequestStatus.FINISHED_ABORTED)


def test_ride_budget_never_starves_prompts_behind_many_decodes():
    """More decodes than ride_budget leave no room: steps use the full budget again."""
    rng = random.Random(1)
    s = _ride_scheduler(ride_budget=4, budget=64)
    for i in range(6):
        s.add_request(_req(f"d{i}", 3, max_tokens=200, seed=i))
    _fake_step(s, rng)
    assert len(s.running) == 6
    s.add_request(_req("late", 30, seed=9))
    so, _ = _fake_step(s, rng)
    assert so.num_scheduled_tokens["late"] == 30 and so.total_num_scheduled_tokens == 36


def _add_random_queue(s: Scheduler, rng: random.Random) -> list[tuple[int, int]]:
    """1-40 requests of random (prompt, output) lengths, longest output first (as
    LLM.generate feeds a riding engine); returns them in that order."""
    reqs = [(rng.randint(5, 120), rng.randint(2, 200)) for _ in range(rng.randint(1, 40))]
    reqs.sort(key=lambda pm: -pm[1])
    for i, (p, m) in enumerate(reqs):
        s.add_request(_req(f"r{i}", p, max_tokens=m, seed=i))
    return reqs


def _fixed_rides(s: Scheduler, budget: int) -> bool:
    """Whether the unpaced rule (a riding step takes all of `budget`) would ride now."""
    saved = s.ride_budget, s.ride_granule
    s.ride_budget, s.ride_granule = budget, 0
    try:
        return s._step_budget() == min(budget, s.max_num_batched_tokens)
    finally:
        s.ride_budget, s.ride_granule = saved


@pytest.mark.parametrize("seed", range(6))
def test_paced_riding_takes_the_smallest_step_that_keeps_prompts_on_time(seed):
    """Paced (ride_granule > 0), a riding step takes the smallest multiple of the granule with
    which the unpaced rule would ride: every waiting prompt, prefilled in turn in that step's
    spare room, still finishes its output before the longest running request. Checked on
    random queues (longest outputs first, as LLM.generate feeds them) through whole runs, which
    the horizon also bounds: the run takes no more steps than its longest request's prefill and
    output."""
    rng = random.Random(seed)
    g, rb = 8, 96
    s = _ride_scheduler(ride_budget=rb, budget=2000, ride_granule=g)
    reqs = _add_random_queue(s, rng)
    steps = rides = 0
    while s.has_unfinished_requests():
        budget = s._step_budget()
        decoding = sum(r.num_computed_tokens >= r.num_prompt_tokens for r in s.running)
        if s.waiting and decoding:
            smallest = next((b for b in range(g, rb + 1, g) if b > decoding
                             and _fixed_rides(s, b)), 2000)
            assert budget == smallest, (steps, decoding)
        if budget < 2000:
            assert budget % g == 0 and budget <= rb
            rides += 1
        so, _ = _fake_step(s, rng)
        assert so.total_num_scheduled_tokens <= budget
        _check_invariants(s)
        steps += 1
    head_p, head_m = reqs[0]
    assert steps <= -(-head_p // rb) + head_m
    if len(reqs) > 1:
        assert rides


def test_paced_riding_starts_at_the_first_step_and_equal_requests_never_ride():
    """Nothing decoding yet: paced, the head of the queue (its longest output) sets the
    horizon, so the batch rides from its first step; unpaced, the first step is a full
    prefill. A stream of equal requests cannot ride either way: a later prompt would finish
    after the first."""
    paced = _ride_scheduler(ride_budget=64, budget=1000, ride_granule=16)
    fixed = _ride_scheduler(ride_budget=64, budget=1000)
    for s in (paced, fixed):
        s.add_request(_req("long", 100, max_tokens=500))
        for i in range(3):
            s.add_request(_req(f"p{i}", 40, max_tokens=300, seed=i))
    # The head's 100 tokens take 2 steps at 64: horizon 502, and the head itself needs 50
    # tokens a step (rounded up to 64) to keep it.
    assert paced._step_budget() == 64
    assert fixed._step_budget() == 1000
    # Once the head is in, each later prompt has 201 steps of slack: ceil(160 / 201) = 1
    # token a step, rounded up to 16 beside the one decode.
    rng = random.Random(0)
    while not any(r.num_output_tokens for r in paced.running):
        _fake_step(paced, rng)
    assert paced._step_budget() == 16
    equal = _ride_scheduler(ride_budget=64, budget=1000, ride_granule=16)
    for i in range(4):
        equal.add_request(_req(f"e{i}", 30, max_tokens=8, seed=i))
    assert equal._step_budget() == 1000
    _fake_step(equal, random.Random(0))
    assert equal._step_budget() == 1000


def _lazy_scheduler(ride_chunk, ride_fill=0, ride_budget=64, budget=1000, ride_granule=8):
    return Scheduler(max_num_seqs=64, max_num_batched_tokens=budget, max_model_len=4096,
                     num_blocks=4096, block_size=16, enable_prefix_caching=False,
                     ride_budget=ride_budget, ride_granule=ride_granule,
                     ride_chunk=ride_chunk, ride_fill=ride_fill)


def test_lazy_riding_banks_the_paced_room_into_chunks():
    """ride_chunk: one long decode with 3 x 40 prompt tokens behind it. Paced, every step
    rides until the prompts are in, each rounded up to the granule (7 prompt tokens beside the
    decode where 1 would keep them on time): 14 mixed steps. Lazy, the steps carry the decodes
    alone while the paced room (1 token) banks up, and a step rides once the bank holds a chunk
    (32 -> 1 decode + 39 prompt tokens, rounded up to the granule): 4 mixed steps. Both get
    every prompt in on time: the run ends with the long request."""
    rng = random.Random(0)

    def run(s):
        s.add_request(_req("long", 10, max_tokens=500))
        for i in range(3):
            s.add_request(_req(f"p{i}", 40, max_tokens=300, seed=i))
        steps = []
        while s.has_unfinished_requests():
            so, _ = _fake_step(s, rng)
            steps.append((so.total_num_scheduled_tokens, len(so.num_scheduled_tokens)))
            _check_invariants(s)
        return steps

    paced, lazy = run(_lazy_scheduler(0)), run(_lazy_scheduler(32))
    # The head's 10 tokens and the paced room (6) of the first prompt, rounded up to 16.
    assert paced[0] == lazy[0] == (16, 2)
    assert len(paced) == len(lazy) == 500          # "long"'s 500 tokens, the first at prefill
    mixed = lambda steps: [i for i, (n, reqs) in enumerate(steps) if n > reqs]  # noqa: E731
    assert mixed(paced) == list(range(14))
    # 31 decode-only steps bank 1 token each; the 32nd rides 39 (the bank goes to -7), ...
    assert lazy[1:32] == [(1, 1)] * 31 and lazy[32] == (40, 3)
    assert mixed(lazy) == [0, 32, 71, 72]
    assert all(n == reqs for n, reqs in lazy[73:])   # all prompts in: decodes only


def test_lazy_riding_fills_steps_of_few_decodes():
    """ride_fill: a step with fewer decodes than ride_fill rides, at least up to ride_fill rows
    (room the weight read pays for anyway) or more if its bank holds more, until every prompt
    is in."""
    rng = random.Random(0)
    s = _lazy_scheduler(32, ride_fill=24)
    s.add_request(_req("long", 10, max_tokens=500))
    for i in range(3):
        s.add_request(_req(f"p{i}", 40, max_tokens=300, seed=i))
    _fake_step(s, rng)
    while s.waiting or any(r.num_computed_tokens < r.num_prompt_tokens for r in s.running):
        decoding = sum(r.num_computed_tokens >= r.num_prompt_tokens for r in s.running)
        left = sum(r.num_tokens - r.num_computed_tokens
                   for r in itertools.chain(s.running, s.waiting)
                   if r.num_computed_tokens < r.num_prompt_tokens)
        so, _ = _fake_step(s, rng)
        assert decoding < 24
        assert so.total_num_scheduled_tokens >= min(24, decoding + left)
        _check_invariants(s)


@pytest.mark.parametrize("seed", range(8))
def test_lazy_riding_keeps_prompts_on_time_in_fewer_mixed_steps(seed):
    """On random queues (longest outputs first), lazy riding ends each run when paced riding
    does (within the head's prefill and output: no prompt outlasts the longest request), in
    at most half as many mixed steps (a 32-token chunk against 8-token granules)."""
    def run(chunk):
        rng = random.Random(seed)
        s = _lazy_scheduler(chunk, ride_budget=96, budget=2000)
        reqs = _add_random_queue(s, rng)
        steps = mixed = 0
        while s.has_unfinished_requests():
            so, _ = _fake_step(s, rng)
            mixed += so.total_num_scheduled_tokens > len(so.num_scheduled_tokens)
            _check_invariants(s)
            steps += 1
        head_p, head_m = reqs[0]
        assert steps <= -(-head_p // 96) + head_m
        return steps, mixed

    (paced_steps, paced_mixed), (lazy_steps, lazy_mixed) = run(0), run(32)
    assert lazy_steps == paced_steps
    assert lazy_mixed <= paced_mixed / 2


def test_a_decode_whose_last_token_is_in_flight_takes_no_row_in_the_paced_room():
    """Async scheduling: a request whose token in flight is its last is skipped by schedule()
    and so is not one of the step's decodes when the paced room is sized (nor a horizon)."""
    s = _lazy_scheduler(0)
    s.add_request(_req("long", 10, max_tokens=500))
    s.add_request(_req("one", 4, max_tokens=1, seed=1))
    so = s.schedule()       # both prefilled, a token each in flight (no update yet)
    assert so.num_scheduled_tokens == {"long": 10, "one": 4}
    s.add_request(_req("p", 40, max_tokens=100, seed=2))
    room, skippable, decoding = s._paced_room()
    assert decoding == 1 and room >= 1 and skippable
    so = s.schedule()
    assert "one" not in so.num_scheduled_tokens
    assert so.num_scheduled_tokens["long"] == 1 and so.num_scheduled_tokens["p"] == 7
