"""The one scoped channel through which per-step attention metadata reaches attention layers.

The runner wraps each model forward in `set_forward_context(metadata, ...)`; attention layers
read it with `get_forward_context()`. Nothing else is global: models never see metadata in their
signatures, so model code stays independent of the backend.

Metadata is per attention kind. Every model has "global" (full causal) layers, described by the
step's metadata itself; a model with chunked local attention (Llama 4) also has "local" layers,
which read the virtual batch the runner built once for the step
(kvflow/attention/local_attention.py). A layer asking for a kind the runner did not provide is
an error, never a silent fall-back to full attention.

The context is per thread: several engines in one process (a prefill and a decode server in
tests, or any two AsyncLLMs) run forwards concurrently on their own engine threads, and one
engine's attention must never read another's metadata.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

from kvflow.attention.backend import AttentionMetadata
from kvflow.kv_transfer.base import NULL_WORKER_CONNECTOR

GLOBAL = "global"
LOCAL = "local"


@dataclass
class ForwardContext:
    attn_metadata: Optional[AttentionMetadata]              # the "global" kind
    extra_metadata: dict[str, AttentionMetadata] = field(default_factory=dict)
    # The worker's KV connector: attention layers call its per-layer hooks (null by default).
    kv_connector: Any = NULL_WORKER_CONNECTOR

    def metadata(self, kind: str = GLOBAL) -> Optional[AttentionMetadata]:
        if kind == GLOBAL:
            return self.attn_metadata
        md = self.extra_metadata.get(kind)
        if md is None and self.attn_metadata is not None:
            raise RuntimeError(f"an attention layer of kind {kind!r} ran, but the step provides "
                               f"metadata only for {[GLOBAL, *self.extra_metadata]}: the model "
                               "runner must build it (ModelRunner.local_attention)")
        return md


_local = threading.local()


@contextmanager
def set_forward_context(attn_metadata: Optional[AttentionMetadata],
                        extra_metadata: Optional[dict[str, AttentionMetadata]] = None,
                        kv_connector: Any = NULL_WORKER_CONNECTOR) -> Iterator[ForwardContext]:
    """extra_metadata: metadata of the non-global attention kinds, e.g. {"local": ...}."""
    prev = getattr(_local, "current", None)
    _local.current = ctx = ForwardContext(attn_metadata, dict(extra_metadata or {}), kv_connector)
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
