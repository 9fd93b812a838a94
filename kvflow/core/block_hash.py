"""Chained content hashes of full KV blocks, the keys of the prefix cache.

hash(block i) = sha256(hash(block i-1) || token ids of block i). Chaining makes a block's key
depend on the whole prefix before it, so equal keys mean equal KV (same model, same positions).
sha256 rather than Python's hash(): a collision would silently serve another prompt's KV, and the
keys must be stable across processes (disaggregated prefill matches blocks between instances).
"""
from __future__ import annotations

import hashlib
from array import array
from typing import Optional

# Seed of every chain: changes when the hashing scheme does, so stale keys never match.
_ROOT = hashlib.sha256(b"kvflow-block-hash-v1").digest()


def hash_block(parent: Optional[bytes], token_ids) -> bytes:
    h = hashlib.sha256(parent if parent is not None else _ROOT)
    h.update(array("q", token_ids).tobytes())
    return h.digest()


def extend_block_hashes(block_hashes: list[bytes], token_ids: list[int], block_size: int) -> None:
    """Append the hashes of every full block of `token_ids` not yet in `block_hashes`."""
    num_full = len(token_ids) // block_size
    parent = block_hashes[-1] if block_hashes else None
    for i in range(len(block_hashes), num_full):
        parent = hash_block(parent, token_ids[i * block_size:(i + 1) * block_size])
        block_hashes.append(parent)
