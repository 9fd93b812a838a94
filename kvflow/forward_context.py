"""The one scoped channel through which per-step attention metadata reaches attention layers.

The runner wraps each model forward in `set_forward_context(metadata)`; attention layers read it
with `get_forward_context()`. Nothing else is global: models never see metadata in their
signatures, so model code stays independent of the backend.
"""
from __future__ import annotations

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


_current: Optional[ForwardContext] = None


@contextmanager
def set_forward_context(attn_metadata: Optional[AttentionMetadata],
                        kv_connector: Any = NULL_WORKER_CONNECTOR) -> Iterator[ForwardContext]:
    global _current
    prev, _current = _current, ForwardContext(attn_metadata, kv_connector)
    try:
        yield _current
    finally:
        _current = prev


def get_forward_context() -> ForwardContext:
    if _current is None:
        raise RuntimeError("attention ran outside set_forward_context(): the model runner must "
                           "provide per-step attention metadata")
    return _current
