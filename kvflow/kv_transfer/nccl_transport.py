"""GPU-to-GPU KV transport: payload over NCCL point-to-point, control over the TCP channel.

Why a separate process group per (producer, consumer) pair: the two instances are independent
processes (each may run its own tensor-parallel group), so they cannot join one global
torch.distributed world. Each pair builds a 2-rank group directly from a store (producer rank 0,
consumer rank 1), without init_process_group, so nothing global changes. On CPU the same code
runs over gloo, which keeps its logic testable without GPUs.

Control (the zmq channel of tcp_transport, same handshake and layout checks):
  consumer -> {"op": "nccl_connect", "pair": id}
  producer <- {"ok": true, "store_port": P}; both sides then build the pair's group on a
              TCPStore that the producer hosts on nccl_port (prefix "pair/<id>").
  consumer -> {"op": "pull_nccl", "pair": id, "request_id": ..., "num_tokens": n}
  producer <- {"ok": true, "layout": ..., "nbytes": N, "checksums": [...]}, then sends the
              N-byte uint8 tensor (gathered on its device) over the pair's group.
The consumer receives into a tensor on its device, verifies the per-layer checksums ON the
device (an error-detecting weighted sum, computed without copying to host; not cryptographic)
and scatters into its cache (wire.scatter_blocks; conversions as for TCP).

Limits: a producer serves one NCCL send at a time (its control thread waits for the send);
a consumer that dies between the reply and its recv makes the producer's send fail after the
group timeout (timeout_s); the pair is then dropped and rebuilt on the next connect.
"""
from __future__ import annotations

import datetime
import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass

import torch

from kvflow.kv_transfer import wire
from kvflow.kv_transfer.layout import KVLayout
from kvflow.kv_transfer.tcp_transport import (  # noqa: F401 - release re-exported
    KVTransferError, TCPKVServer, _rpc, connect_handshaken, release, request_until_ready)

logger = logging.getLogger("kvflow")

_CHUNK = 1 << 22


def device_checksum(t: torch.Tensor) -> int:
    """Weighted sum of a flat uint8 tensor's 32-bit words (wrapping int64 arithmetic, so the
    result does not depend on reduction order), computed where the tensor lives."""
    return int(_checksum_tensor(t))


def layer_checksums(buf: torch.Tensor, per_layer: int, num_layers: int) -> list[int]:
    """device_checksum of each layer's slice, with one device-to-host copy for all of them."""
    return torch.stack([_checksum_tensor(buf[i * per_layer:(i + 1) * per_layer])
                        for i in range(num_layers)]).tolist()


def _checksum_tensor(t: torch.Tensor) -> torch.Tensor:
    if t.numel() % 4:
        t = torch.cat([t, t.new_zeros(4 - t.numel() % 4)])
    words = t.view(torch.int32)
    total = torch.zeros((), dtype=torch.int64, device=t.device)
    for s in range(0, words.numel(), _CHUNK):
        seg = words[s:s + _CHUNK].to(torch.int64)
        w = torch.arange(s + 1, s + 1 + seg.numel(), dtype=torch.int64, device=t.device)
        total += (seg * w).sum()
    return total


def _make_group(store, rank: int, device: torch.device, timeout_s: float):
    timeout = datetime.timedelta(seconds=max(timeout_s, 1.0))
    if device.type == "cuda":
        from torch.distributed import ProcessGroupNCCL
        opts = ProcessGroupNCCL.Options()
        opts._timeout = timeout
        return ProcessGroupNCCL(store, rank, 2, opts)
    from torch.distributed import ProcessGroupGloo
    return ProcessGroupGloo(store, rank, 2, timeout)


def _store(host: str, port: int, is_master: bool, timeout_s: float):
    from torch.distributed import TCPStore
    return TCPStore(host, port, 2 if not is_master else None, is_master,
                    timeout=datetime.timedelta(seconds=max(timeout_s, 1.0)),
                    wait_for_workers=False)


class NCCLKVServer:
    """Producer side: the TCP control server plus the NCCL ops."""

    def __init__(self, cfg, layout: KVLayout, kv_caches, claim, release_cb, device, drop=None):
        self.cfg, self.layout, self.kv_caches, self.device = cfg, layout, kv_caches, device
        self._claim, self._release = claim, release_cb
        self._groups: dict[str, object] = {}
        # The control port first: the engine picked it free a moment ago and released it
        # (llm_engine._bind_kv_transfer_port), and the store's ephemeral port (nccl_port 0)
        # could otherwise be handed that very port. No client can ask for the store before
        # this constructor returns: the producer is advertised only after engine startup.
        self.control = TCPKVServer(cfg.host, cfg.port, layout, kv_caches, claim, release_cb,
                                   drop or (lambda rid: False),
                                   {"nccl_connect": self._connect, "pull_nccl": self._pull})
        self.port = self.control.port
        try:
            self._store = _store(cfg.host if cfg.host not in ("*", "::") else "0.0.0.0",
                                 cfg.nccl_port, True, cfg.timeout_s)
        except Exception:
            self.control.close()      # no serving thread left behind a failed start
            raise
        self.store_port = self._store.port

    def _on_device(self) -> None:
        if self.device.type == "cuda":  # the control thread's current device, for NCCL
            torch.cuda.set_device(self.device)

    def _connect(self, msg: dict):
        pair = str(msg.get("pair"))
        self._on_device()

        def build():  # after the reply: the consumer builds its side concurrently
            from torch.distributed import PrefixStore
            self._groups[pair] = _make_group(PrefixStore(f"pair/{pair}", self._store), 0,
                                             self.device, self.cfg.timeout_s)
        return [{"ok": True, "store_port": self.store_port}], build

    def _pull(self, msg: dict):
        pair, rid, n = str(msg.get("pair")), str(msg.get("request_id")), msg.get("num_tokens")
        self._on_device()
        group = self._groups.get(pair)
        if group is None:
            return [{"ok": False, "retry": False, "error": f"no NCCL pair {pair!r}"}], None
        if not isinstance(n, int) or n < 1:
            return [{"ok": False, "retry": False, "error": f"num_tokens: bad value {n!r}"}], None
        block_ids, why, retry = self._claim(rid, n)
        if block_ids is None:
            return [{"ok": False, "retry": retry, "error": why}], None
        try:
            payload = wire.gather_blocks_tensor(
                self.kv_caches, block_ids[:self.layout.num_blocks_for(n)], n, self.layout)
        finally:
            self._release(rid)  # gathered into a copy: the blocks may be freed
        per = self.layout.layer_nbytes(n)
        sums = layer_checksums(payload, per, self.layout.num_layers)

        def send():
            try:
                group.send([payload], 1, 0).wait()
            except Exception:
                self._groups.pop(pair, None)  # broken pair: the consumer reconnects
                raise
        return [{"ok": True, "layout": self.layout.to_dict(), "nbytes": int(payload.numel()),
                 "checksums": sums}], send

    def close(self) -> None:
        self.control.close()
        self._groups.clear()


@dataclass
class _Received:
    layout: KVLayout
    num_tokens: int
    payload: torch.Tensor


class _Pairs:
    """Consumer side: one group per producer address, built on first use."""

    def __init__(self):
        self.lock = threading.Lock()
        self.groups: dict[tuple[str, int], tuple[str, object]] = {}


_PAIRS = _Pairs()


def fetch(host: str, port: int, remote_request_id: str, num_tokens: int, deadline: float,
          receiver: KVLayout, device: torch.device = torch.device("cpu")) -> _Received:
    sock, where = connect_handshaken(host, port, deadline, receiver)
    try:
        with _PAIRS.lock:
            entry = _PAIRS.groups.get((host, port))
            if entry is None:
                pair = uuid.uuid4().hex
                r = json.loads(_rpc(sock, {"op": "nccl_connect", "pair": pair}, deadline, where)[0])
                from torch.distributed import PrefixStore
                store = _store(host, r["store_port"], False, deadline - time.monotonic())
                group = _make_group(PrefixStore(f"pair/{pair}", store), 1, device,
                                    max(deadline - time.monotonic(), 1.0))
                entry = _PAIRS.groups[(host, port)] = (pair, group)
        pair, group = entry
        try:
            reply, _ = request_until_ready(sock, {"op": "pull_nccl", "pair": pair,
                                                  "request_id": remote_request_id,
                                                  "num_tokens": num_tokens},
                                           deadline, where, remote_request_id)
        except KVTransferError as e:
            if "no NCCL pair" in str(e):
                _PAIRS.groups.pop((host, port), None)  # the producer restarted
            raise
        sender = wire.handshake(receiver, reply["layout"])
        per = sender.layer_nbytes(num_tokens)
        if reply["nbytes"] != per * sender.num_layers:
            raise KVTransferError(f"producer {where} announced {reply['nbytes']} bytes, layout "
                                  f"and num_tokens imply {per * sender.num_layers}")
        buf = torch.empty(reply["nbytes"], dtype=torch.uint8, device=device)
        try:
            group.recv([buf], 0, 0).wait()
        except Exception as e:
            _PAIRS.groups.pop((host, port), None)
            raise KVTransferError(f"NCCL receive from {where} failed: {e}") from e
        got = layer_checksums(buf, per, sender.num_layers)
        for i, want in enumerate(reply["checksums"]):
            if got[i] != want:
                raise KVTransferError(f"corrupt layer {i}: device checksum mismatch")
        return _Received(sender, num_tokens, buf)
    finally:
        sock.close(0)
