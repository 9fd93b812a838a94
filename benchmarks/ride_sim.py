"""Llama-3.1-8B nanovllm schedules under ride budgets, on the scheduler alone (CPU).

    python3 benchmarks/ride_sim.py [--budgets 0,256,384] [--granule G] [--chunks 0,384]
        [--fill F] [--mixed-ms M] [--predicted-room]

Drives kvflow's Scheduler (admission control on, the H200's 864K-token cache in 64-token
blocks, requests fed longest max_tokens first when riding, as LLM.generate does) and prices
each step with what session 21 measured on the H200: the products of a step of N rows
(`PRODUCT_MS`, cuBLAS, interpolated; 20.7 us a row past 1000), its KV reads at 4.0 TB/s and
0.35 ms for the rest. Unlike admission_sim.py's flat per-request cost, this ranks step budgets:
it put 0 / 128 / 192 / 256 / 384 / 512 at 12.73 / 12.69 / 12.52 / 12.07 / 11.94 / 12.04 s,
where the H200 read 12.88 / 12.84 / 12.69 / 12.45 / 12.46 / 12.53 s (session 29: the right
order, ~60% of the gain). It prints how many steps hold fewer rows than the ~160 up to which
a step's products cost its weight read: the room riding leaves unused.

--granule G paces the riding steps (the scheduler's ride_granule, session 31): each takes
the smallest multiple of G that keeps every prompt on time. The model put 512 paced by 64 at
11.55 s against 12.07 at a fixed 256 (-4.3%); the H200 read -1.3%. Its steps leave out what a
mixed step costs beyond its products and KV reads: ~2.1 ms a step on Llama-3.1-8B, mostly the
mixed-step graph's two attention launches (results/paced-ride-s31), which pacing makes more
of (911 mixed steps against 466).

--chunks C1,C2 --fill F run lazy riding (the scheduler's ride_chunk / ride_fill, session 34);
--mixed-ms M adds M ms to each step with prompt tokens (~1.3 by session 33's profile, ~0.6-1
by the A/B). At 1.3 ms the model put 384 / 160 at 12.41 s against 12.73 every step paced
(-2.5%), at 0.6 ms -1.2%, at 0 -0.2%; the H200 read +1.0-1.2% tok/s
(results/lazy-ride-s34). The model puts fill 128-192 within 0.3% of each other; the H200
put 160 first (128 -0.5%, 192 -0.3%, 224 -1.0%).

--predicted-room replaces Scheduler._step_budget's check with one that lets the room of
future steps grow as running decodes finish (their tokens left are known) instead of holding
it at this step's: at 256 the model gained ~1% (11.95 s), at 384 nothing. Not built; pacing
(--granule) took its place.
"""
from __future__ import annotations

import argparse
import bisect
import itertools

import numpy as np

import admission_sim
from kvflow.core.scheduler import Scheduler

PRODUCT_ROWS = [1, 32, 64, 128, 200, 256, 512, 1000]
PRODUCT_MS = [4.25, 4.29, 4.39, 4.60, 5.28, 6.21, 10.61, 20.71]
KV_BYTES = 131072           # per token
WEIGHT_BOUND_ROWS = 160


def step_ms(tokens: int, kv_tokens: int, mixed_ms: float = 0.0, mixed: bool = False) -> float:
    products = (float(np.interp(tokens, PRODUCT_ROWS, PRODUCT_MS)) if tokens <= 1000
                else tokens * 0.0207)
    return products + kv_tokens * KV_BYTES / 4.0e9 + 0.35 + (mixed_ms if mixed else 0.0)


def simulate(ride_budget: int, ride_granule: int = 0, ride_chunk: int = 0,
             mixed_ms: float = 0.0, ride_fill: int = 0) -> dict:
    reqs, out = admission_sim.anchors("nanovllm")
    rows: list[int] = []
    mixed = [0]

    def cost(tokens: int, num_reqs: int, kv: int) -> float:
        is_mixed = tokens > num_reqs   # a prompt chunk in the step
        mixed[0] += is_mixed
        return step_ms(tokens, kv, mixed_ms, is_mixed)

    r = admission_sim.simulate(reqs, cost, cap_tokens=864768, block_size=64, max_num_seqs=1024,
                               budget=16384, admission=True, ride_budget=ride_budget,
                               ride_granule=ride_granule, ride_chunk=ride_chunk, ride_fill=ride_fill,
                               step_tokens=rows)
    big = [i for i, n in enumerate(rows) if n > ride_budget] if ride_budget else []
    return dict(model_s=r["model_s"], tok_s=round(out / r["model_s"]), steps=r["steps"],
                steps_with_prompts=mixed[0],
                steps_under_weight_bound=sum(n < WEIGHT_BOUND_ROWS for n in rows),
                full_budget_steps=big[:12])


def predicted_room_budget(self: Scheduler) -> int:
    """_step_budget with future room = ride_budget - decodes still running then."""
    full = self.max_num_batched_tokens
    if not self.ride_budget or not self.waiting or not self.running:
        return full
    ends, prefilling = [], []
    for r in self.running:
        if r.num_computed_tokens >= r.num_prompt_tokens:
            ends.append(self._tokens_left(r))
        else:
            prefilling.append(r)
    if not ends:
        return full
    horizon = max(ends)
    ends.sort()
    t = done = 0                # a future step; decodes finished by then
    for r in itertools.chain(prefilling, self.waiting):
        need = r.num_tokens - r.num_computed_tokens
        while need > 0:
            while done < len(ends) and ends[done] <= t:
                done += 1
            room = self.ride_budget - (len(ends) - done)
            if room <= 0:
                if done == len(ends):
                    return full
                t = ends[done]
                continue
            until_next_end = ends[done] - t if done < len(ends) else need
            steps = min(-(-need // room), until_next_end)
            need -= steps * room
            t += steps
        if t + self._tokens_left(r) > horizon:
            return full
        bisect.insort(ends, t + self._tokens_left(r))
    return min(full, self.ride_budget)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budgets", default="0,128,192,256,384,512")
    ap.add_argument("--granule", type=int, default=0)
    ap.add_argument("--chunks", default="0",
                    help="the scheduler's ride_chunk values to run (with --granule)")
    ap.add_argument("--fill", type=int, default=0, help="the scheduler's ride_fill")
    ap.add_argument("--mixed-ms", type=float, default=0.0,
                    help="what a step with prompt tokens costs beyond its products and KV reads")
    ap.add_argument("--predicted-room", action="store_true")
    args = ap.parse_args()
    if args.predicted_room:
        Scheduler._step_budget = predicted_room_budget
    for b in (int(x) for x in args.budgets.split(",")):
        for c in (int(x) for x in args.chunks.split(",")):
            print(f"ride_budget {b} ride_chunk {c}: "
                  f"{simulate(b, args.granule, c, args.mixed_ms, args.fill)}", flush=True)


if __name__ == "__main__":
    main()
