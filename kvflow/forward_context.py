"""The one scoped channel through which per-step attention metadata reaches attention layers.

The runner wraps each model forward in `set_forward_context(metadata)`; attention layers read it
with `get_forward_context()`. Nothing else is global: models never see metadata in their
signatures, so model code stays independent of the backend.

The context is per thread: several engines in one process (a prefill and a decode server in
tests, or any two AsyncLLMs) run forwards concurrently on their own engine threads, and one
engine's attention must never read another's metadata.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Optional

from kvflow.attention.backend import AttentionMetadata
from kvflow.kv_transfer.base import NULL_WORKER_CONNECTOR


@dataclass
class ForwardContext:
    attn_metadata: Optional[AttentionMetadata]
    # The worker's KV connector: attention layers call its per-layer hooks (null by default).
    kv_connector: Any = NULL_WORKER_CONNECTOR


_local = threading.local()


@contextmanager
def set_forward_context(attn_metadata: Optional[AttentionMetadata],
                        kv_connector: Any = NULL_WORKER_CONNECTOR) -> Iterator[ForwardContext]:
    prev = getattr(_local, "current", None)
    _local.current = ctx = ForwardContext(attn_metadata, kv_connector)
    try:
        yield ctx
    finally:
        _local.current = prev


def get_forward_context() -> ForwardContext:
    ctx = getattr(_local, "current", None)
    if ctx is None:
        raise RuntimeError("attention ran outside set_forward_context(): the model runner must "
                           "provide per-step attention metadata")
    return ctx
