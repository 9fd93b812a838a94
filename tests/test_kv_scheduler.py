"""The scheduler's side of the connector protocol, with a scripted connector (no network, no
model): loads park requests without computing them, blocks are never freed while a load may
still write them, failures follow the policy, held sends keep their blocks until reported."""
from __future__ import annotations

import pytest

from kvflow.core.sched_output import RunnerOutput
from kvflow.core.scheduler import Scheduler
from kvflow.kv_transfer.base import KVConnectorMetadata, KVTransferResult, LoadSpec, SaveSpec
from kvflow.request import Request, RequestStatus
from kvflow.sampling_params import SamplingParams


class ScriptedConnector:
    """Claims `remote` tokens for requests whose id starts with 'r'; holds finished 'h*'."""

    def __init__(self, remote: int, policy: str = "recompute"):
        self.remote, self.failure_policy = remote, policy
        self.loads, self.saves, self.asked, self.pending = [], [], 0, {}

    def check_request(self, request):
        pass

    def get_num_new_matched_tokens(self, request, num_local):
        self.asked += 1
        if not request.request_id.startswith("r") or request.request_id in self.pending or \
                getattr(request, "_tried", False):
            return 0
        return self.remote

    def update_state_after_alloc(self, request, block_ids, num_local, num_ext):
        request._tried = True
        self.pending[request.request_id] = num_ext
        self.loads.append(LoadSpec(request.request_id, block_ids, num_local + num_ext, {}))

    def load_finished(self, rid):
        return self.pending.pop(rid, 0)

    def build_connector_meta(self):
        meta = KVConnectorMetadata(self.loads, self.saves)
        self.loads, self.saves = [], []
        return meta

    def request_finished(self, request, block_ids):
        if request.request_id.startswith("h"):
            self.saves.append(SaveSpec(request.request_id, block_ids, 1, 0.0))
            return True, {"held": True}
        return False, None

    def has_pending_work(self):
        return bool(self.loads or self.saves)

    def shutdown(self):
        pass


def make(conn, num_blocks=8):
    return Scheduler(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=128,
                     num_blocks=num_blocks, block_size=4, enable_prefix_caching=True,
                     connector=conn)


def req(rid, n=10, max_tokens=3, first=1):
    return Request(rid, list(range(first, first + n)), SamplingParams(max_tokens=max_tokens), 128)


def step(s, report=KVTransferResult(), sample=True):
    so = s.schedule()
    toks = {r: [7] for r in so.num_scheduled_tokens} if sample else {}
    return so, s.update_from_output(so, RunnerOutput(sampled_token_ids=toks, kv_transfers=report))


def test_load_parks_then_computes_only_the_rest():
    conn = ScriptedConnector(remote=9)
    s = make(conn)
    s.add_request(req("r1"))
    so, _ = step(s)
    assert so.num_scheduled_tokens == {} and so.kv_connector_metadata.loads[0].num_tokens == 9
    assert s.loading and s.kv.num_free_blocks == 8 - 3
    so, _ = step(s)                                    # still loading: nothing computed
    assert so.num_scheduled_tokens == {}
    so, _ = step(s, KVTransferResult(finished_recving={"r1"}))
    so, _ = step(s)
    assert so.num_scheduled_tokens == {"r1": 1}        # only the last prompt token
    assert so.new_reqs[0].num_computed_tokens == 9


@pytest.mark.parametrize("policy", ["recompute", "fail"])
def test_failed_load_follows_policy(policy):
    s = make(ScriptedConnector(remote=9, policy=policy))
    s.add_request(req("r1"))
    step(s)
    _, outs = step(s, KVTransferResult(failed_recving={"r1": "KV transfer failed: boom"}))
    if policy == "fail":
        assert outs[0].finish_reason == "error" and "boom" in outs[0].error
        assert not s.has_unfinished_requests()
    else:
        so, _ = step(s)
        assert so.num_scheduled_tokens == {"r1": 10}   # the whole prompt, locally
    assert s.kv.num_free_blocks == 8 or policy == "recompute"


def test_abort_during_load_frees_blocks_only_after_the_report():
    s = make(ScriptedConnector(remote=9))
    s.add_request(req("r1"))
    step(s)
    s.finish_requests(["r1"], RequestStatus.FINISHED_ABORTED)
    assert s.kv.num_free_blocks == 8 - 3               # the worker may still be writing
    step(s, KVTransferResult(finished_recving={"r1"}))
    assert s.kv.num_free_blocks == 8 and not s.has_unfinished_requests()


def test_full_pool_defers_the_load_instead_of_dropping_it():
    conn = ScriptedConnector(remote=9)
    s = make(conn, num_blocks=4)
    s.add_request(req("x", n=12, max_tokens=2, first=50))  # takes 3, then 4 of 4 blocks
    step(s, sample=False)
    s.add_request(req("r1"))
    so, _ = step(s)                                    # no room for r1's 3 blocks
    assert "r1" not in s.loading and not so.kv_connector_metadata.loads
    s.finish_requests(["x"], RequestStatus.FINISHED_ABORTED)
    so, _ = step(s)
    assert "r1" in s.loading and so.kv_connector_metadata.loads  # asked again, loaded now


def test_held_blocks_until_sent():
    s = make(ScriptedConnector(remote=0))
    s.add_request(req("h1", max_tokens=1))
    _, outs = step(s)
    assert outs[0].finish_reason == "length" and outs[0].kv_transfer_params == {"held": True}
    assert s.kv.num_free_blocks < 8 and s.has_unfinished_requests()
    step(s, KVTransferResult(finished_sending={"h1"}))
    assert s.kv.num_free_blocks == 8 and not s.has_unfinished_requests()
