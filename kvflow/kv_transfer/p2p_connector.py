"""The p2p connector: a decode instance (consumer) pulls a finished prefill's KV from the
prefill instance (producer) that computed it. Both halves of the protocol in kvflow/kv_transfer/
base.py; the bytes move through a transport (tcp_transport.py, nccl_transport.py).

kv_transfer_params, as vLLM's proxies use them:
  client -> producer  {"do_remote_decode": true}: compute the prompt (the proxy asks for one
                      token) and keep its blocks until a consumer pulled them or hold_timeout_s
                      passed.
  producer -> client  {"do_remote_prefill": true, "remote_host", "remote_port",
                      "remote_request_id", "remote_block_ids", "remote_num_tokens",
                      "remote_prompt_hash", "transport"} in the response's kv_transfer_params.
  client -> consumer  the same object: the consumer loads the first num_prompt_tokens - 1
                      tokens' KV and computes the last prompt token itself. That last step gives
                      it its own logits for the first output token, so greedy outputs are those of
                      a single instance, token for token.

The consumer verifies the prompt hash (the proxy must have sent the same prompt to both), the
layout at handshake and the checksums of every layer. Any failure goes to failure_policy:
"recompute" (the request is scheduled like any other and prefills locally) or "fail" (the
request finishes with an error). A load is attempted at most once per request: after it (or
after a preemption) the request never waits on the network again.
"""
from __future__ import annotations

import hashlib
import logging
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional

from kvflow.kv_transfer.base import (EMPTY_METADATA, NO_RESULT, KVConnectorMetadata, KVTransferResult, LoadSpec,
                                     SaveSpec)
from kvflow.sampling_params import SamplingParamError

logger = logging.getLogger("kvflow")

_KNOWN_KEYS = {"do_remote_decode", "do_remote_prefill", "remote_engine_id", "remote_host",
               "remote_port", "remote_request_id", "remote_block_ids", "remote_num_tokens",
               "remote_prompt_hash", "transport"}


def prompt_hash(token_ids) -> str:
    return hashlib.sha256(",".join(map(str, token_ids)).encode()).hexdigest()


def _bad(msg: str) -> SamplingParamError:
    return SamplingParamError("kv_transfer_params", f"kv_transfer_params: {msg}")


def validate_params(params: Any, *, is_producer: bool, is_consumer: bool, transport: str,
                    n: int) -> None:
    """Raise SamplingParamError (HTTP 400 naming kv_transfer_params) for params this instance
    cannot act on. Called once, when the request is added."""
    if params is None:
        return
    if not isinstance(params, dict):
        raise _bad("must be an object")
    unknown = sorted(set(params) - _KNOWN_KEYS)
    if unknown:
        raise _bad(f"unknown keys {unknown}")
    if params.get("do_remote_decode"):
        if not is_producer:
            raise _bad("do_remote_decode needs an instance started with a producer "
                       "--kv-transfer-config (role producer or both)")
        if n != 1:
            raise _bad("do_remote_decode supports n=1 only")
    if params.get("do_remote_prefill"):
        if not is_consumer:
            raise _bad("do_remote_prefill needs an instance started with a consumer "
                       "--kv-transfer-config (role consumer or both)")
        if n != 1:
            raise _bad("do_remote_prefill supports n=1 only")
        for key, typ in (("remote_host", str), ("remote_port", int), ("remote_request_id", str),
                         ("remote_num_tokens", int), ("remote_prompt_hash", str)):
            v = params.get(key)
            if not isinstance(v, typ) or isinstance(v, bool):
                raise _bad(f"{key} missing or not {typ.__name__}")
        if not 0 < params["remote_port"] < 65536 or params["remote_num_tokens"] < 1:
            raise _bad("remote_port / remote_num_tokens out of range")
        if params.get("transport", transport) != transport:
            raise _bad(f"the producer used transport {params.get('transport')!r}, this "
                       f"instance {transport!r}")


def _advertised_host(cfg) -> str:
    if cfg.advertise_host:
        return cfg.advertise_host
    if cfg.host in ("0.0.0.0", "::", "*"):
        return socket.gethostname()
    return cfg.host


class P2PSchedulerConnector:
    """Scheduler half. Holds no tensors; plain bookkeeping of what to tell the worker."""

    def __init__(self, cfg, block_size: int):
        self.cfg = cfg
        self.block_size = block_size
        self.failure_policy = cfg.failure_policy
        self.engine_id = uuid.uuid4().hex
        self._host = _advertised_host(cfg)
        self._loads: list[LoadSpec] = []
        self._saves: list[SaveSpec] = []
        self._releases: list[dict] = []
        self._pending_loads: dict[str, int] = {}   # req id -> external tokens being loaded

    # ------------------------------------------------------------------ consumer
    def check_request(self, request) -> None:
        p = request.kv_transfer_params
        validate_params(p, is_producer=self.cfg.is_producer, is_consumer=self.cfg.is_consumer,
                        transport=self.cfg.transport, n=request.sampling_params.n)
        if p and p.get("do_remote_prefill") and \
                p["remote_prompt_hash"] != prompt_hash(request.prompt_token_ids):
            # The proxy sent another prompt to the producer: its KV is not this prompt's.
            if self.failure_policy == "fail":
                raise _bad("remote_prompt_hash: the producer computed another prompt")
            logger.warning("KV transfer: %s: the producer computed another prompt; computing "
                           "it here", request.request_id)
            request.kv_transfer_params = {**p, "do_remote_prefill": False}

    def get_num_new_matched_tokens(self, request, num_local_tokens: int) -> int:
        p = request.kv_transfer_params
        if not p or not p.get("do_remote_prefill"):
            return 0
        # The last prompt token is always computed here (its logits give the first token).
        n = min(p["remote_num_tokens"], request.num_prompt_tokens - 1) - num_local_tokens
        if n <= 0:
            request.kv_transfer_params = {**p, "do_remote_prefill": False}
            self._releases.append(dict(p))
            return 0
        return n  # asked again if the blocks cannot be allocated now

    def update_state_after_alloc(self, request, block_ids: list[int], num_local_tokens: int,
                                 num_external_tokens: int) -> None:
        p = request.kv_transfer_params
        # One attempt per request, whatever happens next (failure, preemption).
        request.kv_transfer_params = {**p, "do_remote_prefill": False}
        total = num_local_tokens + num_external_tokens
        # Whole blocks are transferred from the request's first token (wire.py): the local
        # prefix-hit blocks are rewritten with identical values, which is harmless.
        nb = -(-total // self.block_size)
        self._loads.append(LoadSpec(request.request_id, list(block_ids[:nb]), total, dict(p)))
        self._pending_loads[request.request_id] = num_external_tokens

    def load_finished(self, request_id: str) -> int:
        """External tokens of a load that ended (the scheduler's bookkeeping)."""
        return self._pending_loads.pop(request_id, 0)

    # ------------------------------------------------------------------ producer
    def request_finished(self, request, block_ids: list[int]) -> tuple[bool, Optional[dict]]:
        p = request.kv_transfer_params
        if not p or not p.get("do_remote_decode") or request.status.finish_reason not in (
                "stop", "length"):
            return False, None
        n = min(request.num_prompt_tokens, request.num_computed_tokens)
        if n < 2:  # a consumer computes the last prompt token itself: nothing to pull
            return False, None
        nb = -(-n // self.block_size)
        self._saves.append(SaveSpec(request.request_id, list(block_ids[:nb]), n,
                                    time.monotonic() + self.cfg.hold_timeout_s))
        return True, {"do_remote_prefill": True, "remote_engine_id": self.engine_id,
                      "remote_host": self._host, "remote_port": self.cfg.port,
                      "remote_request_id": request.request_id,
                      "remote_block_ids": list(block_ids[:nb]), "remote_num_tokens": n,
                      "remote_prompt_hash": prompt_hash(request.prompt_token_ids),
                      "transport": self.cfg.transport}

    # ------------------------------------------------------------------ both
    def build_connector_meta(self) -> KVConnectorMetadata:
        if not self._loads and not self._saves and not self._releases:
            return EMPTY_METADATA
        meta = KVConnectorMetadata(self._loads, self._saves, self._releases)
        self._loads, self._saves, self._releases = [], [], []
        return meta

    def has_pending_work(self) -> bool:
        return bool(self._loads or self._saves or self._releases)

    def shutdown(self) -> None:
        pass


class P2PWorkerConnector:
    """Worker half: serves registered sends (producer) and runs loads on one background thread
    (consumer), reporting both through get_finished()."""

    def __init__(self, cfg, device):
        self.cfg = cfg
        self.device = device
        self.layout = None
        self.kv_caches: list = []
        self.server = None
        self._lock = threading.Lock()
        self._event = threading.Event()
        self._held: dict[str, SaveSpec] = {}      # registered, not yet sent
        self._claimed: set[str] = set()           # being copied out right now
        self._gone: dict[str, str] = {}           # recently expired / sent: why a pull fails
        self._result = KVTransferResult()
        self._loads_in_flight = 0
        self._pool: Optional[ThreadPoolExecutor] = None
        # Counters for logs and tests (read without the lock: approximate is fine).
        self.stats = {"sent": 0, "expired": 0, "released": 0, "loaded": 0, "load_failed": 0}

    def register_kv_caches(self, kv_caches: list, layout) -> None:
        self.kv_caches, self.layout = kv_caches, layout
        if self.cfg.is_producer and self.server is None:
            self.server = self._make_server()
            logger.info("KV transfer: producer serving %s pulls on %s:%d", self.cfg.transport,
                        self.cfg.host, self.server.port)
        if self.cfg.is_consumer and self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvflow-kv-load")

    def _make_server(self):
        if self.cfg.transport == "nccl":
            from kvflow.kv_transfer.nccl_transport import NCCLKVServer
            return NCCLKVServer(self.cfg, self.layout, self.kv_caches, self._claim, self._release,
                                self.device, self._drop)
        from kvflow.kv_transfer.tcp_transport import TCPKVServer
        return TCPKVServer(self.cfg.host, self.cfg.port, self.layout, self.kv_caches,
                           self._claim, self._release, self._drop)

    # ------------------------------------------------------------------ producer
    def _claim(self, rid: str, num_tokens: int):
        with self._lock:
            spec = self._held.get(rid)
            if spec is None:
                why = self._gone.get(rid)
                if why is not None:
                    return None, why, False
                return None, f"request {rid!r} is not (yet) held here", True
            if num_tokens > spec.num_tokens:
                return None, f"asked for {num_tokens} tokens, {spec.num_tokens} were computed", False
            del self._held[rid]
            self._claimed.add(rid)
            return spec.block_ids, None, False

    def _drop(self, rid: str) -> bool:
        """A consumer will not pull `rid`: free its blocks now."""
        with self._lock:
            self._gone[rid] = f"request {rid!r} was released by its consumer"
            if self._held.pop(rid, None) is None:
                return False  # not registered yet: start_load_kv drops it on arrival
            self._result.finished_sending.add(rid)
            self.stats["released"] += 1
        self._event.set()
        return True

    def _release(self, rid: str) -> None:
        with self._lock:
            self._claimed.discard(rid)
            self._gone[rid] = f"request {rid!r} was already sent"
            self._result.finished_sending.add(rid)
            self.stats["sent"] += 1
        self._event.set()

    def _expire(self) -> None:
        now = time.monotonic()
        with self._lock:
            for rid in [r for r, s in self._held.items() if s.deadline <= now]:
                del self._held[rid]
                self._gone[rid] = f"request {rid!r} expired: not pulled within " \
                                  f"{self.cfg.hold_timeout_s:g} s"
                self._result.finished_sending.add(rid)
                self.stats["expired"] += 1
                logger.warning("KV transfer: %s was not pulled within %g s; blocks freed",
                               rid, self.cfg.hold_timeout_s)
            while len(self._gone) > 4096:  # bounded memory of old ids
                self._gone.pop(next(iter(self._gone)))

    # ------------------------------------------------------------------ consumer
    def _load(self, spec: LoadSpec) -> None:
        p = spec.params
        try:
            if self.device.type == "cuda":  # this thread's current device (NCCL, allocations)
                import torch
                torch.cuda.set_device(self.device)
            deadline = time.monotonic() + self.cfg.timeout_s
            t = self._transport().fetch(p["remote_host"], p["remote_port"],
                                        p["remote_request_id"], spec.num_tokens, deadline,
                                        self.layout, device=self.device)
            from kvflow.kv_transfer import wire
            wire.scatter_blocks(self.kv_caches, spec.block_ids, t.payload, t.layout, self.layout,
                                num_tokens=spec.num_tokens)
            if self.device.type == "cuda":
                import torch
                torch.cuda.synchronize(self.device)
            with self._lock:
                self._result.finished_recving.add(spec.req_id)
                self.stats["loaded"] += 1
        except Exception as e:  # noqa: BLE001 - every failure goes to the failure policy
            logger.warning("KV transfer: loading %s from %s:%s failed: %s: %s", spec.req_id,
                           p.get("remote_host"), p.get("remote_port"), type(e).__name__, e)
            with self._lock:
                self._result.failed_recving[spec.req_id] = f"KV transfer failed: {e}"
                self.stats["load_failed"] += 1
        finally:
            with self._lock:
                self._loads_in_flight -= 1
            self._event.set()

    # ------------------------------------------------------------------ protocol
    def start_load_kv(self, meta: KVConnectorMetadata) -> None:
        if meta.saves:
            with self._lock:
                for s in meta.saves:
                    if s.req_id in self._gone:  # released before it was registered
                        self._result.finished_sending.add(s.req_id)
                        self.stats["released"] += 1
                    else:
                        self._held[s.req_id] = s
        for spec in meta.loads:
            with self._lock:
                self._loads_in_flight += 1
            self._pool.submit(self._load, spec)
        for p in meta.releases:
            self._pool.submit(self._release_remote, p)

    def _release_remote(self, p: dict) -> None:
        """Best effort: a producer that misses this frees the blocks at its hold timeout."""
        try:
            self._transport().release(p["remote_host"], p["remote_port"],
                                      p["remote_request_id"], time.monotonic() + 2.0)
        except Exception as e:  # noqa: BLE001
            logger.info("KV transfer: releasing %s at %s:%s failed (%s); it expires there",
                        p.get("remote_request_id"), p.get("remote_host"), p.get("remote_port"), e)

    def _transport(self):
        if self.cfg.transport == "nccl":
            from kvflow.kv_transfer import nccl_transport as t
        else:
            from kvflow.kv_transfer import tcp_transport as t
        return t

    def wait_for_layer_load(self, layer_name: str) -> None:
        pass  # whole requests are loaded before they are scheduled

    def save_kv_layer(self, layer_name: str, kv_cache, attn_metadata) -> None:
        pass  # pulled from the paged cache after the prefill finished

    def get_finished(self, wait: bool = False) -> KVTransferResult:
        self._expire()
        if wait and self._result.empty:
            # Nothing else to compute: sleep until a transfer ends (bounded, so expiry and new
            # requests are still seen), instead of spinning the engine loop.
            with self._lock:
                busy = bool(self._held or self._claimed or self._loads_in_flight)
            if busy:
                self._event.wait(0.01)
        self._event.clear()
        with self._lock:
            if self._result.empty:
                return NO_RESULT  # never self._result: other threads keep filling that one
            out, self._result = self._result, KVTransferResult()
        return out

    def shutdown(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
