"""The self-describing KV wire format, and gather/scatter between it and the paged KV cache.

A transfer carries N tokens' KV of one request, for every attention layer:

    prefix   struct "<4sHHI": magic b"KVFW", version (1), flags (0, reserved), header_len
    header   header_len bytes of UTF-8 JSON (below)
    hdigest  16 bytes: blake2b-128 of prefix + header (the header is small: speed irrelevant)
    payload  num_layers slices, layer 0 first; layer i is the sender's cache tensor of layer i
             restricted to the request's ceil(N / block_size) blocks, in the SENDER's axis order,
             C-contiguous, raw little-endian bytes. Slots past token N-1 of the last block are
             zeroed by the sender (deterministic checksums; no stale KV of a block's previous
             owner leaves the host).

    header = {"layout": KVLayout.to_dict(), "request_id": str, "num_tokens": N,
              "byteorder": "little", "checksum": "xxh3_128" | "blake2b_128",
              "layer_nbytes": [int] * num_layers, "layer_checksums": [hex] * num_layers}

The receiver never trusts lengths it can derive: each layer's byte length is recomputed from the
layout and N (`KVLayout.layer_nbytes`) and must match the header's. Errors name what is wrong
(truncated where, corrupt layer i, which layout field). Checksums guard against corruption and
partial transfers, not adversaries: xxh3-128 (~10+ GB/s, so it never bottlenecks a NIC) when the
`xxhash` package is installed, else blake2b-128 (hashlib, ~1 GB/s, faster than sha256 without
SHA extensions). The sender's algorithm is named in the header; a receiver without it fails
clearly rather than skipping verification.

Conversions done by `scatter_blocks` (sender layout -> receiver layout; anything else is refused
with `KVLayoutError` naming the field):
  * axis order: any permutation of ("kv", "block", "token", "head", "dim") on either side;
  * block size: any power of two to any other; tokens keep their order (position p of the request
    goes to receiver slot block_ids[p // bs_r] * bs_r + p % bs_r), partial last blocks included;
  * TP split: the receiver rank writes the intersection of the sender rank's heads and its own
    (`KVLayout.head_range`); a receiver assembles its heads from the ranks `sender_ranks_for`
    names, one scatter per sender transfer. No overlap is an error (a routing bug).
Never converted: model (fingerprint), layer count, total KV heads, head_dim, dtype, KV cache dtype
or scales (a cast would be lossy or change meaning).

Limits (for the transport to come): a transfer always starts at the request's first token
(no offset/chunked transfers yet); payloads are copied through host memory.
"""
from __future__ import annotations

import hashlib
import json
import struct
import sys
import warnings
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import torch

from kvflow.kv_transfer.layout import AXES, KVLayout, KVLayoutError

try:  # optional: only changes speed, never the format's meaning
    import xxhash
except ImportError:  # pragma: no cover - depends on the environment
    xxhash = None

MAGIC = b"KVFW"
VERSION = 1
_PREFIX = struct.Struct("<4sHHI")
_HDIGEST_SIZE = 16
_MAX_HEADER = 16 << 20   # a header is a few KB; a huge length means a corrupt prefix
CHECKSUMS = ("xxh3_128", "blake2b_128")


class KVWireError(ValueError):
    """A transfer is malformed: truncated, corrupt, or inconsistent with its own layout."""


def default_checksum() -> str:
    return "xxh3_128" if xxhash is not None else "blake2b_128"


def _checksum(algo: str, data) -> str:
    if algo == "xxh3_128":
        if xxhash is None:
            raise KVWireError("checksum: sender used xxh3_128 but the xxhash package is not "
                              "installed here (pip install xxhash)")
        return xxhash.xxh3_128_hexdigest(data)
    if algo == "blake2b_128":
        return hashlib.blake2b(data, digest_size=16).hexdigest()
    raise KVWireError(f"checksum: unknown algorithm {algo!r}, expected one of {CHECKSUMS}")


# ---------------------------------------------------------------------------- cache access
def _to_canonical(t: torch.Tensor, layout: KVLayout) -> torch.Tensor:
    """A view of `t` (dims in layout.axis_order) with dims in AXES order: (kv, block, token,
    head, dim). A view, so writes through it land in the cache."""
    return t.permute([layout.axis_order.index(a) for a in AXES])


def _from_canonical(t: torch.Tensor, layout: KVLayout) -> torch.Tensor:
    return t.permute([AXES.index(a) for a in layout.axis_order])


def _check_caches(kv_caches: Sequence[torch.Tensor], layout: KVLayout,
                  block_ids: Sequence[int], num_blocks_needed: int, role: str) -> list[int]:
    """Validate tensors AGAINST the layout (never the other way round); returns block ids."""
    if len(kv_caches) != layout.num_layers:
        raise KVLayoutError(f"num_layers: {role} has {len(kv_caches)} cache tensors, its layout "
                            f"says {layout.num_layers} layers")
    block_pos = layout.axis_order.index("block")
    for i, t in enumerate(kv_caches):
        shape = tuple(t.shape)
        expected = layout.cache_shape(shape[block_pos]) if t.dim() == len(AXES) else None
        if shape != expected:
            want = tuple("num_blocks" if a == "block" else n
                         for a, n in zip(layout.axis_order, layout.cache_shape(0)))
            raise KVLayoutError(
                f"shape mismatch: {role} layer {i} cache tensor has shape {shape}, its layout "
                f"(from the configs) implies {want} for axis order {layout.axis_order}")
        if t.dtype != layout.torch_dtype:
            raise KVLayoutError(f"kv_cache_dtype: {role} layer {i} cache tensor is {t.dtype}, "
                                f"its layout says {layout.kv_cache_dtype}")
    ids = [int(b) for b in block_ids]
    if len(ids) != num_blocks_needed:
        raise KVLayoutError(f"block_ids: {role} got {len(ids)} block ids, the transfer needs "
                            f"{num_blocks_needed} blocks of {layout.block_size} tokens")
    capacity = kv_caches[0].shape[block_pos]
    if any(not 0 <= b < capacity for b in ids) or len(set(ids)) != len(ids):
        raise KVLayoutError(f"block_ids: {role} block ids must be distinct and in "
                            f"[0, {capacity}), got {ids}")
    return ids


def _tensor_bytes(t: torch.Tensor) -> bytes:
    # uint8 view: works for every dtype (numpy has no bfloat16 / float8).
    return t.contiguous().reshape(-1).view(torch.uint8).cpu().numpy().tobytes()


def gather_blocks(kv_caches: Sequence[torch.Tensor], block_ids: Sequence[int], num_tokens: int,
                  layout: KVLayout) -> bytes:
    """The payload for the first `num_tokens` tokens of a request whose KV lives in `block_ids`
    (its block table), from one rank's caches in `layout`. Layer i's bytes are
    layout.cache_shape(len(block_ids)) in layout.axis_order; slots past num_tokens are zero."""
    return b"".join(_tensor_bytes(t) for t in _gather(kv_caches, block_ids, num_tokens, layout))


def gather_blocks_tensor(kv_caches: Sequence[torch.Tensor], block_ids: Sequence[int],
                         num_tokens: int, layout: KVLayout) -> torch.Tensor:
    """gather_blocks' payload as one flat uint8 tensor on the caches' device (GPU-to-GPU
    transports send it without a trip through host memory)."""
    return torch.cat([t.contiguous().reshape(-1).view(torch.uint8)
                      for t in _gather(kv_caches, block_ids, num_tokens, layout)])


def _gather(kv_caches, block_ids, num_tokens, layout) -> list[torch.Tensor]:
    if not isinstance(num_tokens, int) or num_tokens < 1:
        raise KVWireError(f"num_tokens: must be an integer >= 1, got {num_tokens!r}")
    nb = layout.num_blocks_for(num_tokens)
    ids = _check_caches(kv_caches, layout, block_ids, nb, "sender")
    tail = num_tokens - (nb - 1) * layout.block_size      # valid tokens in the last block
    parts = []
    for cache in kv_caches:
        idx = torch.tensor(ids, dtype=torch.long, device=cache.device)
        g = _to_canonical(cache, layout).index_select(1, idx)   # (2, nb, bs, H_rank, D), a copy
        if tail < layout.block_size:
            g[:, -1, tail:] = 0
        parts.append(_from_canonical(g, layout))
    return parts


def _head_overlap(sender: KVLayout, receiver: KVLayout) -> tuple[int, int]:
    (s_lo, s_hi), (r_lo, r_hi) = sender.head_range, receiver.head_range
    lo, hi = max(s_lo, r_lo), min(s_hi, r_hi)
    if lo >= hi:
        raise KVLayoutError(
            f"tp_rank: sender rank {sender.tp_rank}/{sender.tp_size} holds KV heads "
            f"[{s_lo}, {s_hi}), receiver rank {receiver.tp_rank}/{receiver.tp_size} needs "
            f"[{r_lo}, {r_hi}): no overlap (see sender_ranks_for)")
    return lo, hi


def scatter_blocks(kv_caches: Sequence[torch.Tensor], block_ids: Sequence[int],
                   payload: Union[bytes, bytearray, memoryview], sender_layout: KVLayout,
                   receiver_layout: KVLayout, *, num_tokens: int) -> None:
    """Write a payload produced by `gather_blocks` in `sender_layout` into this rank's caches
    (in `receiver_layout`) at `block_ids`: ceil(num_tokens / receiver block_size) distinct blocks
    of the receiving request. Converts axis order, block size and TP split (module docstring);
    writes only token slots < num_tokens and only the receiver heads the sender holds."""
    receiver_layout.check_compatible(sender_layout)
    if not isinstance(num_tokens, int) or num_tokens < 1:
        raise KVWireError(f"num_tokens: must be an integer >= 1, got {num_tokens!r}")
    lo, hi = _head_overlap(sender_layout, receiver_layout)
    s_lo, r_lo = sender_layout.head_range[0], receiver_layout.head_range[0]
    per_layer = sender_layout.layer_nbytes(num_tokens)
    expected = per_layer * sender_layout.num_layers
    # A payload is host bytes, or a flat uint8 tensor (possibly on a GPU: gather_blocks_tensor).
    as_tensor = isinstance(payload, torch.Tensor)
    mv = payload.reshape(-1) if as_tensor else memoryview(payload).cast("B")
    if len(mv) != expected:
        raise KVWireError(f"payload: {len(mv)} bytes, the sender layout and num_tokens="
                          f"{num_tokens} imply {expected} ({sender_layout.num_layers} layers x "
                          f"{per_layer})")
    bs_r = receiver_layout.block_size
    ids = _check_caches(kv_caches, receiver_layout, block_ids,
                        receiver_layout.num_blocks_for(num_tokens), "receiver")
    nb_s = sender_layout.num_blocks_for(num_tokens)
    src_shape = sender_layout.cache_shape(nb_s)
    pos = torch.arange(num_tokens)
    dst_block = torch.tensor(ids, dtype=torch.long)[pos // bs_r]      # (T,)
    dst_off = pos % bs_r                                              # (T,)
    with warnings.catch_warnings():
        # frombuffer on read-only bytes warns; the source tensor is only ever read.
        warnings.simplefilter("ignore", UserWarning)
        for i, cache in enumerate(kv_caches):
            raw = (mv[i * per_layer:(i + 1) * per_layer] if as_tensor else
                   torch.frombuffer(mv, dtype=torch.uint8, offset=i * per_layer, count=per_layer))
            src = _to_canonical(raw.view(sender_layout.torch_dtype).view(src_shape), sender_layout)
            # (2, nb_s, bs_s, Hs, D) -> token-major (2, T, heads lo..hi, D): block size gone.
            tok = src.reshape(2, nb_s * sender_layout.block_size, *src.shape[3:])
            tok = tok[:, :num_tokens, lo - s_lo:hi - s_lo]
            dst = _to_canonical(cache, receiver_layout)                  # view into the cache
            dev = cache.device
            dst[:, dst_block.to(dev), dst_off.to(dev), lo - r_lo:hi - r_lo] = tok.to(dev)


# ---------------------------------------------------------------------------- framing
@dataclass(frozen=True)
class KVTransfer:
    """A decoded, verified transfer. `payload` is a view into the received buffer."""
    layout: KVLayout
    request_id: str
    num_tokens: int
    checksum: str
    payload: memoryview

    def layer_payload(self, i: int) -> memoryview:
        n = self.layout.layer_nbytes(self.num_tokens)
        return self.payload[i * n:(i + 1) * n]


def encode_transfer(layout: KVLayout, request_id: str, num_tokens: int, payload: bytes,
                    checksum: Optional[str] = None) -> bytes:
    """Frame a `gather_blocks` payload: prefix + header + header digest + payload."""
    algo = checksum or default_checksum()
    per = layout.layer_nbytes(num_tokens)
    if len(payload) != per * layout.num_layers:
        raise KVWireError(f"payload: {len(payload)} bytes, layout and num_tokens={num_tokens} "
                          f"imply {per * layout.num_layers}")
    mv = memoryview(payload).cast("B")
    header = {"layout": layout.to_dict(), "request_id": str(request_id),
              "num_tokens": num_tokens, "byteorder": sys.byteorder, "checksum": algo,
              "layer_nbytes": [per] * layout.num_layers,
              "layer_checksums": [_checksum(algo, mv[i * per:(i + 1) * per])
                                  for i in range(layout.num_layers)]}
    hbytes = json.dumps(header, separators=(",", ":")).encode()
    head = _PREFIX.pack(MAGIC, VERSION, 0, len(hbytes)) + hbytes
    return head + hashlib.blake2b(head, digest_size=_HDIGEST_SIZE).digest() + bytes(payload)


def _field(h: dict, name: str, typ: type) -> Any:
    v = h.get(name)
    if not isinstance(v, typ) or isinstance(v, bool):
        raise KVWireError(f"header: field {name!r} missing or not {typ.__name__}")
    return v


def decode_transfer(buf: Union[bytes, bytearray, memoryview]) -> KVTransfer:
    """Parse and verify a transfer. Raises KVWireError / KVLayoutError naming the problem."""
    mv = memoryview(buf).cast("B")
    if len(mv) < _PREFIX.size:
        raise KVWireError(f"truncated: {len(mv)} bytes, shorter than the {_PREFIX.size}-byte prefix")
    magic, version, _flags, hlen = _PREFIX.unpack(mv[:_PREFIX.size])
    if magic != MAGIC:
        raise KVWireError(f"magic: {magic!r} is not {MAGIC!r}; not a kvflow KV transfer")
    if version != VERSION:
        raise KVWireError(f"version: wire version {version} is not supported (this is {VERSION})")
    if hlen > _MAX_HEADER:
        raise KVWireError(f"header: length {hlen} exceeds {_MAX_HEADER}; corrupt prefix")
    body = _PREFIX.size + hlen
    if len(mv) < body + _HDIGEST_SIZE:
        raise KVWireError(f"truncated: header needs {body + _HDIGEST_SIZE} bytes, got {len(mv)}")
    digest = hashlib.blake2b(mv[:body], digest_size=_HDIGEST_SIZE).digest()
    if digest != bytes(mv[body:body + _HDIGEST_SIZE]):
        raise KVWireError("corrupt header: checksum mismatch")
    try:
        h = json.loads(bytes(mv[_PREFIX.size:body]))
    except ValueError as e:
        raise KVWireError(f"header: not valid JSON ({e})") from None
    if not isinstance(h, dict):
        raise KVWireError("header: must be a JSON object")
    layout = KVLayout.from_dict(h.get("layout"))
    if h.get("byteorder") != sys.byteorder:
        raise KVWireError(f"byteorder: sender is {h.get('byteorder')!r}, receiver {sys.byteorder!r}")
    num_tokens = _field(h, "num_tokens", int)
    if num_tokens < 1:
        raise KVWireError(f"num_tokens: must be >= 1, got {num_tokens}")
    algo = _field(h, "checksum", str)
    if algo not in CHECKSUMS:
        raise KVWireError(f"checksum: unknown algorithm {algo!r}, expected one of {CHECKSUMS}")
    lens, sums = _field(h, "layer_nbytes", list), _field(h, "layer_checksums", list)
    per = layout.layer_nbytes(num_tokens)
    if len(lens) != layout.num_layers or len(sums) != layout.num_layers:
        raise KVWireError(f"header: {len(lens)} layer lengths and {len(sums)} checksums for "
                          f"{layout.num_layers} layers")
    for i, n in enumerate(lens):
        if n != per:
            raise KVWireError(f"layer {i}: header says {n} bytes, layout and num_tokens imply {per}")
    payload = mv[body + _HDIGEST_SIZE:]
    if len(payload) < per * layout.num_layers:
        i = len(payload) // per
        raise KVWireError(f"truncated: layer {i} has {len(payload) - i * per} of {per} bytes "
                          f"(payload {len(payload)} of {per * layout.num_layers})")
    if len(payload) > per * layout.num_layers:
        raise KVWireError(f"payload: {len(payload) - per * layout.num_layers} trailing bytes")
    for i in range(layout.num_layers):
        if _checksum(algo, payload[i * per:(i + 1) * per]) != sums[i]:
            raise KVWireError(f"corrupt layer {i}: {algo} checksum mismatch")
    return KVTransfer(layout, str(_field(h, "request_id", str)), num_tokens, algo, payload)


# ---------------------------------------------------------------------------- conveniences
def handshake(receiver: KVLayout, sender: Union[KVLayout, dict]) -> KVLayout:
    """Accept a sender's layout (as received: a dict) or raise KVLayoutError naming every
    blocking mismatch. Called before any payload moves."""
    s = sender if isinstance(sender, KVLayout) else KVLayout.from_dict(sender)
    receiver.check_compatible(s)
    _head_overlap(s, receiver)
    return s


def send(kv_caches: Sequence[torch.Tensor], block_ids: Sequence[int], num_tokens: int,
         layout: KVLayout, request_id: str, checksum: Optional[str] = None) -> bytes:
    return encode_transfer(layout, request_id, num_tokens,
                           gather_blocks(kv_caches, block_ids, num_tokens, layout), checksum)


def receive(buf: Union[bytes, bytearray, memoryview], kv_caches: Sequence[torch.Tensor],
            block_ids: Sequence[int], layout: KVLayout) -> KVTransfer:
    """decode + handshake + scatter: the receiver side of one transfer."""
    t = decode_transfer(buf)
    handshake(layout, t.layout)
    scatter_blocks(kv_caches, block_ids, t.payload, t.layout, layout, num_tokens=t.num_tokens)
    return t
