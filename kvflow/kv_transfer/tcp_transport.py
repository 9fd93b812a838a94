"""TCP transport for KV transfers, over pyzmq: a producer-side server and a consumer-side pull.

Protocol (one DEALER socket per transfer on the consumer, one ROUTER socket on the producer;
every request and reply is a JSON frame, a payload follows as a second frame):

  consumer -> {"op": "handshake"}
  producer <- {"ok": true, "layout": KVLayout.to_dict()}
              the CONSUMER checks compatibility (wire.handshake): a different model
              fingerprint, dtype, KV cache dtype, ... fails here, naming the field, before any
              payload moves. Axis order, block size and TP split are converted on arrival.
  consumer -> {"op": "pull", "request_id": ..., "num_tokens": n}
  producer <- {"ok": true} + wire.encode_transfer(...) bytes (self-describing header, per-layer
              checksums), or {"ok": false, "retry": bool, "error": "..."}: retry is true while
              the producer has not yet registered the request (its step after the prefill
              finished), false when it never will (expired, unknown, too many tokens).

The producer frees a request's blocks once its payload has been copied out (or when nobody
pulled it within hold_timeout_s); a consumer-side failure after that (corrupt bytes, timeout)
is handled by the consumer's failure policy, never by re-reading blocks that may be reused.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from typing import Callable, Optional, Sequence

import torch

from kvflow.kv_transfer import wire
from kvflow.kv_transfer.layout import KVLayout

logger = logging.getLogger("kvflow")


class KVTransferError(RuntimeError):
    """A transfer could not complete; the message says why (shown to clients under 'fail')."""


def _zmq():
    try:
        import zmq
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise KVTransferError("the tcp KV transport needs pyzmq (pip install 'kvflow[serve]')") from e
    return zmq


# What a server needs from its owner (the worker connector): claim a registered request for
# sending (None + reason when it cannot be), and report that the claim is over.
Claim = Callable[[str, int], tuple[Optional[list[int]], Optional[str], bool]]


class TCPKVServer:
    """Answers handshakes and pulls from one thread. Gathers blocks from `kv_caches`; the owner
    guarantees that claimed blocks are not freed until `release` is called for them."""

    def __init__(self, host: str, port: int, layout: KVLayout, kv_caches: Sequence[torch.Tensor],
                 claim: Claim, release: Callable[[str], None], drop: Callable[[str], bool],
                 extra_ops: Optional[dict] = None):
        zmq = _zmq()
        self.layout = layout
        self.kv_caches = kv_caches
        self._claim, self._release, self._drop = claim, release, drop
        # op -> handler(msg) -> (reply frames, action run after the reply is sent or None):
        # how the NCCL transport adds its ops to this control channel.
        self._extra_ops = dict(extra_ops or {})
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.bind(f"tcp://{host}:{port}")
        self.port = int(self._sock.getsockopt(zmq.LAST_ENDPOINT).decode().rsplit(":", 1)[1])
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="kvflow-kv-server", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        zmq = _zmq()
        while not self._stop.is_set():
            try:
                if not self._sock.poll(100):
                    continue
                frames = self._sock.recv_multipart()
            except zmq.ZMQError:
                if self._stop.is_set():
                    return
                raise
            ident, body = frames[0], frames[-1]
            after = None
            try:
                msg = json.loads(body)
                handler = self._extra_ops.get(msg.get("op"))
                reply, after = handler(msg) if handler else (self._handle(msg), None)
            except Exception as e:  # noqa: BLE001 - a bad message fails that pull only
                logger.exception("KV server: request failed")
                reply = [{"ok": False, "retry": False, "error": f"{type(e).__name__}: {e}"}]
            head = json.dumps(reply[0]).encode()
            self._sock.send_multipart([ident, head, *reply[1:]], copy=False)
            if after is not None:
                try:
                    after()
                except Exception:  # noqa: BLE001 - the consumer sees it as a failed transfer
                    logger.exception("KV server: post-reply action failed")

    def _handle(self, msg: dict) -> list:
        op = msg.get("op")
        if op == "handshake":
            return [{"ok": True, "layout": self.layout.to_dict()}]
        if op == "release":
            return [{"ok": self._drop(str(msg.get("request_id")))}]
        if op != "pull":
            return [{"ok": False, "retry": False, "error": f"unknown op {op!r}"}]
        rid, n = str(msg.get("request_id")), msg.get("num_tokens")
        if not isinstance(n, int) or n < 1:
            return [{"ok": False, "retry": False, "error": f"num_tokens: bad value {n!r}"}]
        block_ids, why, retry = self._claim(rid, n)
        if block_ids is None:
            return [{"ok": False, "retry": retry, "error": why}]
        try:
            payload = wire.send(self.kv_caches, block_ids[:self.layout.num_blocks_for(n)], n,
                                self.layout, rid)
        finally:
            self._release(rid)  # the bytes are copied out: the blocks may be freed
        return [{"ok": True}, payload]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self._sock.close(0)
        self._ctx.term()


def _rpc(sock, msg: dict, deadline: float, where: str) -> list[bytes]:
    sock.send(json.dumps(msg).encode())
    remaining = deadline - time.monotonic()
    if remaining <= 0 or not sock.poll(int(remaining * 1000) + 1):
        raise TimeoutError(f"timeout: no answer from the KV producer at {where} "
                           f"({msg['op']}); is the prefill instance alive?")
    return sock.recv_multipart()


def release(host: str, port: int, remote_request_id: str, deadline: float) -> None:
    """Tell a producer that its request will not be pulled (it frees the blocks now)."""
    zmq = _zmq()
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(f"tcp://{host}:{port}")
        _rpc(sock, {"op": "release", "request_id": remote_request_id}, deadline, f"{host}:{port}")
    finally:
        sock.close(0)


def connect_handshaken(host: str, port: int, deadline: float, receiver: KVLayout):
    """-> (DEALER socket, "host:port") to a producer's transfer server, after its layout passed
    the handshake (wire.handshake raises KVLayoutError naming the mismatch). The caller closes
    the socket."""
    zmq = _zmq()
    where = f"{host}:{port}"
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(f"tcp://{host}:{port}")
        reply = json.loads(_rpc(sock, {"op": "handshake"}, deadline, where)[0])
        if not reply.get("ok"):
            raise KVTransferError(f"handshake refused by {where}: {reply.get('error')}")
        wire.handshake(receiver, reply["layout"])
    except BaseException:
        sock.close(0)
        raise
    return sock, where


def request_until_ready(sock, msg: dict, deadline: float, where: str,
                        request_id: str) -> tuple[dict, list]:
    """Send `msg` until the producer answers ok -> (reply, frames). It answers "retry" while the
    request is not registered yet (at its next step); a refusal or the deadline raises
    KVTransferError."""
    while True:
        frames = _rpc(sock, msg, deadline, where)
        reply = json.loads(frames[0])
        if reply.get("ok"):
            return reply, frames
        if not reply.get("retry") or time.monotonic() + 0.02 >= deadline:
            raise KVTransferError(f"producer {where} cannot send request "
                                  f"{request_id!r}: {reply.get('error')}")
        time.sleep(0.02)


def fetch(host: str, port: int, remote_request_id: str, num_tokens: int, deadline: float,
          receiver: KVLayout, device=None) -> wire.KVTransfer:
    """Handshake, then pull the first `num_tokens` tokens of a producer's finished request.
    Returns the decoded, checksum-verified transfer (compatibility already checked). The
    payload arrives in host memory whatever `device` (the scatter copies it over)."""
    sock, where = connect_handshaken(host, port, deadline, receiver)
    try:
        _, frames = request_until_ready(sock, {"op": "pull", "request_id": remote_request_id,
                                               "num_tokens": num_tokens},
                                        deadline, where, remote_request_id)
        if len(frames) != 2:
            raise KVTransferError(f"producer {where} sent {len(frames)} frames, expected 2")
        t = wire.decode_transfer(frames[1])   # checksums verified here
        if t.request_id != remote_request_id or t.num_tokens != num_tokens:
            raise KVTransferError(f"producer {where} sent request {t.request_id!r} with "
                                  f"{t.num_tokens} tokens, asked for {remote_request_id!r} "
                                  f"with {num_tokens}")
        wire.handshake(receiver, t.layout)   # the payload's own header, checked again
        return t
    finally:
        sock.close(0)
