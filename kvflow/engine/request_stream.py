"""RequestStream: one request's outputs as an async iterator, fed by AsyncLLM's engine thread.

The stream's asyncio queue lives on the event loop that submitted the request; only that loop
touches it (AsyncLLM hands items over with loop.call_soon_threadsafe). DELTA outputs that pile
up while the consumer is busy are merged, so a slow client gets fewer, larger chunks.
"""
from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Optional

from kvflow.outputs import RequestOutput

if TYPE_CHECKING:
    from kvflow.engine.async_engine import AsyncLLM


class RequestStream:
    """Async iterator over one request's DELTA outputs. Outputs that piled up while the consumer
    was busy are merged into one, so a slow client gets fewer, larger chunks, never stale ones."""

    def __init__(self, request_id: str, engine: "AsyncLLM", loop: asyncio.AbstractEventLoop):
        self.request_id = request_id
        self.loop = loop
        self._engine = engine
        self._queue: asyncio.Queue = asyncio.Queue()
        self._pending_error: Optional[BaseException] = None
        self.finished = False

    def _put(self, item: Any) -> None:  # on the event loop
        self._queue.put_nowait(item)

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestOutput:
        if self._pending_error is not None:
            err, self._pending_error = self._pending_error, None
            self.finished = True
            raise err
        if self.finished:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        while not item.finished and not self._queue.empty():
            nxt = self._queue.get_nowait()
            if isinstance(nxt, BaseException):
                self._pending_error = nxt  # hand out what we have first
                break
            item = merge_deltas(item, nxt)
        self.finished = item.finished
        return item

    def cancel(self) -> None:
        """Abort the request unless it already finished (idempotent, callable from finally)."""
        if not self.finished:
            self.finished = True
            self._engine.abort(self.request_id)


def merge_deltas(a: RequestOutput, b: RequestOutput) -> RequestOutput:
    """Fold DELTA output `b` into the earlier `a` (a is owned by the consumer and mutated)."""
    by_index = {c.index: c for c in a.outputs}
    for c in b.outputs:
        prev = by_index.get(c.index)
        if prev is None:
            by_index[c.index] = c
            continue
        prev.text += c.text
        prev.token_ids = list(prev.token_ids) + list(c.token_ids)
        if c.logprobs is not None:
            prev.logprobs = (prev.logprobs or []) + list(c.logprobs)
        prev.cumulative_logprob = c.cumulative_logprob
        if c.finish_reason is not None:
            prev.finish_reason, prev.stop_reason = c.finish_reason, c.stop_reason
    a.outputs = [by_index[i] for i in sorted(by_index)]
    a.prompt_logprobs = a.prompt_logprobs if a.prompt_logprobs is not None else b.prompt_logprobs
    a.kv_transfer_params = b.kv_transfer_params or a.kv_transfer_params
    a.finished = b.finished
    a.error = b.error or a.error
    a.num_cached_tokens = b.num_cached_tokens
    return a
