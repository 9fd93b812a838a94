"""Disaggregated prefill/decode at the engine level: a producer and a consumer LLMEngine in one
process (stepped in turn by the test), KV moving over the real TCP transport on localhost.

Greedy outputs must equal a colocated engine's token for token; every failure (incompatible
layout, producer gone, timeout, corrupt or truncated bytes) must end in the configured policy
(recompute: same tokens as colocated; fail: an error, no tokens); and every KV block must be
back in both pools afterwards.
"""
from __future__ import annotations

import json
import threading
import time

import pytest

from kvflow.config import KVTransferConfig
from kvflow.sampling_params import SamplingParams
from tests.conftest import make_hf_model, save_hf_model

zmq = pytest.importorskip("zmq")
pytestmark = pytest.mark.timeout(120)

PROMPTS = [[5, 17, 99, 3, 250, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23],
           list(range(40, 57)),          # 17 tokens: one past a block boundary
           list(range(100, 116)),        # 16 tokens: exactly one block
           [42, 43],                     # 1 token remote, 1 local
           [7]]                          # nothing to transfer: computed locally


def engine(model_dir, kv=None, **kw):
    from kvflow.engine.llm_engine import LLMEngine
    kw.setdefault("device", "cpu")
    kw.setdefault("dtype", "float32")
    kw.setdefault("kv_cache_memory", 4 << 20)
    kw.setdefault("max_model_len", 256)
    return LLMEngine.from_engine_args(model_dir, skip_tokenizer_init=True,
                                      kv_transfer_config=kv, **kw)


def producer_cfg(**kw):
    return dict({"connector": "p2p", "role": "producer", "hold_timeout_s": 30}, **kw)


def consumer_cfg(**kw):
    return dict({"connector": "p2p", "role": "consumer", "timeout_s": 10}, **kw)


def run(eng, rid, prompt, max_tokens, kv_params=None, others=()):
    """Add one request and step `eng` (and `others`, so a producer keeps serving) until it
    finishes; returns its final RequestOutput."""
    from kvflow.engine.output_processor import OutputKind
    eng.add_request(rid, prompt, SamplingParams(temperature=0.0, max_tokens=max_tokens,
                                                ignore_eos=True),
                    output_kind=OutputKind.FINAL_ONLY, kv_transfer_params=kv_params)
    deadline = time.monotonic() + 60
    while True:
        for out in eng.step():
            if out.request_id == rid and out.finished:
                return out
        for o in others:
            if o.has_unfinished_requests():
                o.step()
        assert time.monotonic() < deadline, "request did not finish"


def drain(*engines, timeout=20.0):
    """Step until nothing is left (held sends pulled or expired), then check block counts."""
    deadline = time.monotonic() + timeout
    while any(e.has_unfinished_requests() for e in engines):
        for e in engines:
            if e.has_unfinished_requests():
                e.step()
        assert time.monotonic() < deadline, "engines did not drain"
    for e in engines:
        assert e.num_free_blocks() == e.num_total_blocks(), "KV blocks leaked"


def prefill(prod, rid, prompt):
    out = run(prod, rid, prompt, 1, {"do_remote_decode": True})
    assert out.error is None
    return out.kv_transfer_params


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_hf_model(make_hf_model("llama"), tmp_path_factory.mktemp("kv-tiny"))


@pytest.fixture(scope="module")
def reference(model_dir):
    eng = engine(model_dir)
    outs = {i: run(eng, f"ref{i}", p, 8).outputs[0].token_ids for i, p in enumerate(PROMPTS)}
    eng.shutdown()
    return outs


# ---------------------------------------------------------------------------- config
def test_config_parse_and_validate():
    c = KVTransferConfig.parse('{"kv_connector": "p2p", "kv_role": "kv_consumer"}')
    assert (c.connector, c.role, c.transport, c.failure_policy) == ("p2p", "consumer", "tcp",
                                                                   "recompute")
    assert c.is_consumer and not c.is_producer
    assert not KVTransferConfig.parse(None).is_enabled
    for bad, field in (('{"connector": "nixl"}', "connector"), ('{"role": "decoder"}', "role"),
                       ('{"role": "producer", "failure_policy": "retry"}', "failure_policy"),
                       ('{"role": "producer", "timeout_s": 0}', "timeout_s"),
                       ('{"role": "producer", "port": 70000}', "port"),
                       ('{"role": "producer", "prot": 1}', "prot"), ("[1]", "kv_transfer_config"),
                       ("{", "kv_transfer_config")):
        with pytest.raises(ValueError, match=field):
            KVTransferConfig.parse(bad)


def test_cli_flag_reaches_engine_config(model_dir):
    from kvflow.config import create_engine_config
    from kvflow.engine.arg_utils import engine_kwargs
    from kvflow.server.cli_args import parse_serve_args
    args = parse_serve_args([model_dir, "--device", "cpu", "--kv-transfer-config",
                             json.dumps(producer_cfg(failure_policy="fail"))])
    kw = engine_kwargs(args)
    kw.pop("attention_backend")
    cfg = create_engine_config(model_dir, **kw)
    assert cfg.kv_transfer.role == "producer" and cfg.kv_transfer.failure_policy == "fail"
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        create_engine_config(model_dir, device="cpu", tensor_parallel_size=2,
                             kv_transfer_config=producer_cfg())


def test_llm_accepts_kv_transfer_config(model_dir, make_llm):
    llm = make_llm(model_dir, kv_transfer_config={"role": "consumer", "failure_policy": "fail"})
    kt = llm.llm_engine.config.kv_transfer
    assert (kt.connector, kt.role, kt.failure_policy) == ("p2p", "consumer", "fail")
    out = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=3), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3


def test_params_without_connector_are_rejected(model_dir):
    eng = engine(model_dir)
    try:
        with pytest.raises(ValueError, match="kv_transfer_params"):
            run(eng, "x", [1, 2, 3], 1, {"do_remote_decode": True})
    finally:
        eng.shutdown()


# ---------------------------------------------------------------------------- transfers
@pytest.mark.parametrize("consumer_block", [16, 32, 8])
def test_disaggregated_greedy_equals_colocated(model_dir, reference, consumer_block):
    """Block size conversion included: the producer uses 16-token blocks."""
    prod = engine(model_dir, producer_cfg())
    cons = engine(model_dir, consumer_cfg(), block_size=consumer_block)
    try:
        for i, p in enumerate(PROMPTS):
            params = prefill(prod, f"p{i}", p)
            if len(p) == 1:  # the consumer computes the last prompt token: nothing to hold
                assert params is None
            else:
                assert params["do_remote_prefill"] and params["remote_num_tokens"] == len(p)
            out = run(cons, f"d{i}", p, 8, params, others=[prod])
            assert out.error is None, out.error
            assert out.outputs[0].token_ids == reference[i], f"prompt {i}"
        drain(prod, cons)
    finally:
        prod.shutdown()
        cons.shutdown()


def test_consumer_really_skips_the_prefill(model_dir, reference):
    """The transferred KV is used: poisoning the producer's cache after its prefill changes
    the consumer's tokens (so the equality above is not a local recompute in disguise)."""
    prod = engine(model_dir, producer_cfg())
    cons = engine(model_dir, consumer_cfg())
    try:
        params = prefill(prod, "p", PROMPTS[0])
        for cache in prod.executor.worker.runner.kv_caches:
            cache.normal_()
        out = run(cons, "d", PROMPTS[0], 8, params, others=[prod])
        assert out.error is None and out.outputs[0].token_ids != reference[0]
        drain(prod, cons)
    finally:
        prod.shutdown()
        cons.shutdown()


def test_incompatible_model_rejected_at_handshake(model_dir, tmp_path):
    other = save_hf_model(make_hf_model("llama", rms_norm_eps=1e-5), tmp_path / "other")
    prod = engine(other, producer_cfg())
    cons = engine(model_dir, consumer_cfg(failure_policy="fail"))
    try:
        params = prefill(prod, "p", PROMPTS[0])
        out = run(cons, "d", PROMPTS[0], 8, params, others=[prod])
        assert out.outputs[0].finish_reason == "error" and not out.outputs[0].token_ids
        assert "fingerprint" in out.error
        drain(prod, cons, timeout=40)
    finally:
        prod.shutdown()
        cons.shutdown()


def test_dtype_mismatch_rejected_at_handshake(model_dir):
    prod = engine(model_dir, producer_cfg(hold_timeout_s=1), dtype="bfloat16")
    cons = engine(model_dir, consumer_cfg(failure_policy="fail"))
    try:
        params = prefill(prod, "p", PROMPTS[1])
        out = run(cons, "d", PROMPTS[1], 4, params, others=[prod])
        assert out.outputs[0].finish_reason == "error"
        assert "dtype" in out.error
        drain(prod, cons)
    finally:
        prod.shutdown()
        cons.shutdown()


# ---------------------------------------------------------------------------- faults
class Tamper:
    """A man in the middle on localhost: forwards the consumer's messages to the producer and
    rewrites (or drops) the payload of pull replies."""

    def __init__(self, target_port: int, mode: str):
        self.mode = mode
        self.ctx = zmq.Context()
        self.front = self.ctx.socket(zmq.ROUTER)
        self.port = self.front.bind_to_random_port("tcp://127.0.0.1")
        self.target = target_port
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.loop, daemon=True)
        self.thread.start()

    def loop(self):
        while not self.stop.is_set():
            if not self.front.poll(50):
                continue
            ident, body = self.front.recv_multipart()
            back = self.ctx.socket(zmq.DEALER)
            back.connect(f"tcp://127.0.0.1:{self.target}")
            back.send(body)
            if not back.poll(5000):
                back.close(0)
                continue
            frames = back.recv_multipart()
            back.close(0)
            if json.loads(body)["op"] == "pull" and len(frames) == 2:
                payload = bytearray(frames[1])
                if self.mode == "drop":
                    continue  # never answer: the consumer times out
                if self.mode == "corrupt":
                    payload[-10] ^= 0xFF
                elif self.mode == "truncate":
                    payload = payload[:len(payload) // 2]
                frames = [frames[0], bytes(payload)]
            self.front.send_multipart([ident, *frames])

    def close(self):
        self.stop.set()
        self.thread.join(2)
        self.front.close(0)
        self.ctx.term()


@pytest.mark.parametrize("policy", ["recompute", "fail"])
@pytest.mark.parametrize("fault", ["corrupt", "truncate", "drop", "dead", "expired"])
def test_faults_follow_the_policy(model_dir, reference, fault, policy):
    hold = 0.3 if fault == "expired" else 30
    prod = engine(model_dir, producer_cfg(hold_timeout_s=hold))
    cons = engine(model_dir, consumer_cfg(failure_policy=policy, timeout_s=1.5))
    tamper = None
    try:
        params = prefill(prod, "p", PROMPTS[0])
        others = [prod]
        if fault in ("corrupt", "truncate", "drop"):
            tamper = Tamper(params["remote_port"], fault)
            params = dict(params, remote_port=tamper.port)
        elif fault == "dead":
            prod.shutdown()  # the prefill instance is gone (its port closed)
            others = []
        elif fault == "expired":
            drain(prod)  # nobody pulled in time: the producer freed the blocks
            others = []
        t0 = time.monotonic()
        out = run(cons, "d", PROMPTS[0], 8, params, others=others)
        if policy == "recompute":
            assert out.error is None and out.outputs[0].token_ids == reference[0]
        else:
            assert out.outputs[0].finish_reason == "error" and not out.outputs[0].token_ids
            assert "KV transfer failed" in out.error
        assert time.monotonic() - t0 < 10
        drain(cons)
        if fault != "dead":
            drain(prod)
    finally:
        if tamper is not None:
            tamper.close()
        prod.shutdown()
        cons.shutdown()


def test_abort_while_loading_frees_blocks_after_the_load(model_dir):
    prod = engine(model_dir, producer_cfg())
    cons = engine(model_dir, consumer_cfg(timeout_s=1))
    try:
        params = prefill(prod, "p", PROMPTS[0])
        from kvflow.engine.output_processor import OutputKind
        cons.add_request("d", PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=4),
                         output_kind=OutputKind.FINAL_ONLY, kv_transfer_params=params)
        cons.step()  # admitted: blocks allocated, load started (the producer is not stepped)
        assert cons.scheduler.loading and cons.num_free_blocks() < cons.num_total_blocks()
        cons.abort_request("d")
        drain(cons, prod)
    finally:
        prod.shutdown()
        cons.shutdown()


# ---------------------------------------------------------------------------- NCCL (gloo on CPU)
def test_nccl_transport_logic_over_gloo(model_dir, reference):
    """The GPU-to-GPU transport's protocol (pair groups, device-side checksums) on CPU: gloo
    stands in for NCCL. The 2-GPU run is benchmarks/disagg_device.sh."""
    prod = engine(model_dir, producer_cfg(transport="nccl"))
    cons = engine(model_dir, consumer_cfg(transport="nccl"), block_size=32)
    try:
        for i, p in enumerate(PROMPTS[:3]):
            params = prefill(prod, f"p{i}", p)
            assert params["transport"] == "nccl"
            out = run(cons, f"d{i}", p, 8, params, others=[prod])
            assert out.error is None and out.outputs[0].token_ids == reference[i]
        assert cons.executor.worker.runner.kv_connector.stats["loaded"] == 3
        drain(prod, cons)
    finally:
        prod.shutdown()
        cons.shutdown()


def test_nccl_producer_binds_its_control_port_before_the_store(model_dir, monkeypatch):
    """The engine picks the producer's control port free and releases it; the NCCL server must
    bind it again before the rendezvous store asks the OS for an ephemeral port, which could
    otherwise be that very port (seen in CI: 'Address already in use')."""
    import kvflow.kv_transfer.nccl_transport as nt
    order = []
    real_server, real_store = nt.TCPKVServer, nt._store

    def server(*a, **kw):
        order.append("control")
        return real_server(*a, **kw)

    def store(*a, **kw):
        order.append("store")
        return real_store(*a, **kw)
    monkeypatch.setattr(nt, "TCPKVServer", server)
    monkeypatch.setattr(nt, "_store", store)
    prod = engine(model_dir, producer_cfg(transport="nccl"))
    try:
        assert order == ["control", "store"]
    finally:
        prod.shutdown()


def test_device_checksum_detects_a_flipped_byte():
    import torch
    from kvflow.kv_transfer.nccl_transport import device_checksum
    t = torch.randint(0, 256, (4099,), dtype=torch.uint8)
    base = device_checksum(t)
    assert device_checksum(t.clone()) == base
    for i in (0, 1, 2048, 4098):
        u = t.clone()
        u[i] ^= 0x01
        assert device_checksum(u) != base
    swapped = t.clone()
    swapped[[0, 4]] = swapped[[4, 0]]
    assert t[0] == t[4] or device_checksum(swapped) != base  # order matters


@pytest.mark.parametrize("policy", ["recompute", "fail"])
def test_prompt_mismatch_is_caught(model_dir, reference, policy):
    prod = engine(model_dir, producer_cfg())
    cons = engine(model_dir, consumer_cfg(failure_policy=policy))
    try:
        params = prefill(prod, "p", PROMPTS[1])   # the producer computed another prompt
        if policy == "fail":
            with pytest.raises(ValueError, match="remote_prompt_hash"):
                run(cons, "d", PROMPTS[0], 8, params)
        else:
            out = run(cons, "d", PROMPTS[0], 8, params, others=[prod])
            assert out.outputs[0].token_ids == reference[0]
        drain(cons)
    finally:
        prod.shutdown()
        cons.shutdown()


def test_local_prefix_hit_releases_the_producer_blocks(model_dir, reference):
    prod = engine(model_dir, producer_cfg())
    cons = engine(model_dir, consumer_cfg())
    try:
        p = PROMPTS[1]                                  # 17 tokens: 16 are one full block
        run(cons, "warm", p, 8)                         # the consumer has the block cached
        params = prefill(prod, "p", p)
        out = run(cons, "d", p, 8, params, others=[prod])
        assert out.outputs[0].token_ids == reference[1]
        drain(prod, cons)                               # freed long before hold_timeout_s
        assert prod.executor.worker.runner.kv_connector.stats["released"] == 1
    finally:
        prod.shutdown()
        cons.shutdown()


def test_forward_context_is_per_thread():
    """Two engines in one process (a prefill and a decode server) run forwards on their own
    threads at once: neither may see the other's attention metadata."""
    from kvflow.forward_context import get_forward_context, set_forward_context
    inside, release, seen = threading.Event(), threading.Event(), []

    def other():
        with set_forward_context("B"):
            inside.set()
            release.wait(5)
            seen.append(get_forward_context().attn_metadata)

    with set_forward_context("A"):
        t = threading.Thread(target=other)
        t.start()
        inside.wait(5)
        seen.append(get_forward_context().attn_metadata)   # while B's context is open
        release.set()
        t.join(5)
    assert seen == ["A", "B"]
