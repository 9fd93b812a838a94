"""What the completions and chat endpoints share: model names, tokenisation off the event loop,
prompt-length checks, submission with error mapping, disconnect handling and SSE framing.

Tokenisation runs on one dedicated thread per app: it keeps long prompts from stalling the event
loop, and a single thread never uses the (not fully thread-safe) HF tokenizer concurrently with
itself. The engine thread only decodes.
"""
from __future__ import annotations

import asyncio
import json
import logging
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator, Awaitable, Callable, Optional, TypeVar

from starlette.requests import Request
from starlette.responses import Response

from kvflow.engine.async_engine import (SHUTDOWN_MESSAGE, AsyncLLM, EngineDeadError,
                                        EngineOverloadedError, EngineShutdownError, RequestStream)
from kvflow.engine.chat import render_chat
from kvflow.outputs import RequestOutput
from kvflow.sampling_params import SamplingParams
from kvflow.server.errors import APIError, bad_request, from_value_error

logger = logging.getLogger("kvflow")

T = TypeVar("T")


class ClientDisconnected(Exception):
    pass


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def engine_error(e: BaseException) -> APIError:
    """Map what AsyncLLM raises to an HTTP error."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, EngineOverloadedError):
        return APIError(429, str(e))
    if isinstance(e, EngineShutdownError):
        return APIError(503, str(e))
    if isinstance(e, EngineDeadError):
        return APIError(503, str(e), type="EngineDeadError")
    if isinstance(e, ValueError):
        return from_value_error(e)
    logger.exception("unexpected error", exc_info=e)
    return APIError(500, f"internal error: {type(e).__name__}: {e}")


def output_error(out: RequestOutput) -> Optional[APIError]:
    """The error of a finished request that did not end with stop/length, if any."""
    reasons = {c.finish_reason for c in out.outputs}
    if "error" in reasons or (out.error and "abort" not in reasons):
        return APIError(500, f"the request failed: {out.error or 'unknown error'}")
    if "abort" in reasons:
        if out.error == SHUTDOWN_MESSAGE:
            return APIError(503, f"the request was aborted: {SHUTDOWN_MESSAGE}")
        return APIError(500, f"the request was aborted: {out.error or 'aborted'}")
    return None


class OpenAIServing:
    def __init__(self, engine: AsyncLLM, served_names: list[str], *,
                 tokenizer_pool: ThreadPoolExecutor, max_queued_requests: Optional[int] = None):
        self.engine = engine
        self.served_names = served_names
        self.tokenizer_pool = tokenizer_pool
        self.max_queued_requests = max_queued_requests

    # ------------------------------------------------------------------ model / tokenizer
    def resolve_model(self, name: Optional[str]) -> str:
        if name is None or name == "":
            return self.served_names[0]
        if name in self.served_names:
            return name
        raise APIError(404, f"The model `{name}` does not exist. Served models: "
                            f"{', '.join(self.served_names)}", param="model", code="model_not_found")

    def model_and_params(self, req) -> tuple[str, SamplingParams]:
        """The served model name and the request's SamplingParams; an unknown model is a 404,
        an invalid parameter a 400 naming it."""
        model = self.resolve_model(req.model)
        try:
            return model, req.to_sampling_params()
        except ValueError as e:
            raise from_value_error(e) from e

    async def drain(self, streams: list, on_output: Callable[[int, RequestOutput], None]) -> None:
        """Feed every output of `streams` (with its stream index) to `on_output` until all
        finish. A failed request or a dead engine becomes an APIError."""
        try:
            async for i, out in merge_streams(streams):
                on_output(i, out)
                err = output_error(out) if out.finished else None
                if err is not None:
                    raise err
        except APIError:
            raise
        except Exception as e:  # noqa: BLE001 - engine death and friends
            raise engine_error(e) from e

    @property
    def tokenizer(self):
        return self.engine.get_tokenizer()

    def require_tokenizer(self, param: str):
        tok = self.tokenizer
        if tok is None:
            raise bad_request(f"{param}: the server was started without a tokenizer; "
                              "send token ids", param)
        return tok

    async def in_tokenizer_thread(self, fn, *args) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.tokenizer_pool, fn, *args)

    async def tokenize(self, text: str, add_special_tokens: bool, param: str) -> list[int]:
        tok = self.require_tokenizer(param)
        return await self.in_tokenizer_thread(
            lambda: list(tok(text, add_special_tokens=add_special_tokens).input_ids))

    async def render_chat(self, messages: list[dict], *, add_generation_prompt: bool,
                          continue_final_message: bool = False,
                          chat_template_kwargs: Optional[dict] = None) -> tuple[str, list[int]]:
        tok = self.require_tokenizer("messages")
        kwargs = dict(chat_template_kwargs or {})
        if continue_final_message:
            kwargs["continue_final_message"] = True

        def render():  # the same rendering as LLM.chat, so offline and served prompts agree
            p = render_chat(tok, messages, add_generation_prompt=add_generation_prompt,
                            chat_template_kwargs=kwargs)
            return p["prompt"], list(p["prompt_token_ids"])

        try:
            return await self.in_tokenizer_thread(render)
        except APIError:
            raise
        except Exception as e:  # noqa: BLE001 - template errors are the client's messages
            raise bad_request(f"messages: the chat template could not render them: {e}",
                              "messages") from e

    async def detokenize(self, ids: list[int]) -> str:
        tok = self.require_tokenizer("tokens")
        return await self.in_tokenizer_thread(lambda: tok.decode(ids))

    # ------------------------------------------------------------------ checks
    def check_prompt(self, ids: list[int], params: SamplingParams, prompt_param: str,
                     max_tokens_param: str = "max_tokens") -> None:
        """vLLM's rule: the prompt and the requested completion must both fit max_model_len."""
        limit = self.engine.max_model_len
        vocab = self.engine.engine.config.model.vocab_size
        if not ids:
            raise bad_request(f"{prompt_param}: must not be empty", prompt_param)
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise bad_request(f"{prompt_param}: token id {bad} is outside the vocabulary "
                              f"[0, {vocab})", prompt_param)
        if len(ids) >= limit:
            raise bad_request(
                f"{prompt_param}: This model's maximum context length is {limit} tokens. "
                f"However, your request "
                f"has {len(ids)} input tokens, which leaves no room for the completion. Please "
                f"reduce the length of the input.", prompt_param)
        mt = params.max_tokens
        if mt is not None and len(ids) + mt > limit:
            raise bad_request(
                f"'{max_tokens_param}' is too large: {mt}. This model's maximum context length "
                f"is {limit} tokens and your request has {len(ids)} input tokens "
                f"({mt} > {limit} - {len(ids)}).", max_tokens_param)

    # ------------------------------------------------------------------ submission
    async def submit(self, request_id: str, ids: list[int], text: Optional[str],
                     params: SamplingParams, priority: int,
                     kv_transfer_params: Optional[dict] = None) -> RequestStream:
        try:
            return await self.engine.add_request(
                request_id, {"prompt_token_ids": ids}, params, prompt_token_ids=ids,
                prompt_text=text, priority=priority, max_queued=self.max_queued_requests,
                kv_transfer_params=kv_transfer_params)
        except Exception as e:  # noqa: BLE001
            raise engine_error(e) from e

    async def submit_all(self, base_id: str, prompts: list[tuple[Optional[str], list[int]]],
                         params: SamplingParams, priority: int,
                         kv_transfer_params: Optional[dict] = None) -> list[RequestStream]:
        """One engine request per prompt; all or nothing (a failure aborts the ones added)."""
        if kv_transfer_params is not None and len(prompts) != 1:
            raise bad_request("kv_transfer_params: supported with a single prompt only",
                              "kv_transfer_params")
        streams: list[RequestStream] = []
        try:
            for i, (text, ids) in enumerate(prompts):
                rid = base_id if len(prompts) == 1 else f"{base_id}-{i}"
                streams.append(await self.submit(rid, ids, text, params, priority,
                                                 kv_transfer_params))
        except BaseException:
            for s in streams:
                s.cancel()
            raise
        return streams


# ---------------------------------------------------------------------------------- async helpers
async def merge_streams(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(stream index, output) from several streams as they arrive. Exiting early (or being
    cancelled) cancels the readers and aborts every unfinished stream."""
    if len(streams) == 1:
        try:
            async for out in streams[0]:
                yield 0, out
        finally:
            streams[0].cancel()
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, s: RequestStream) -> None:
        try:
            async for out in s:
                queue.put_nowait((i, out))
        except BaseException as e:  # noqa: BLE001 - forwarded to the consumer
            queue.put_nowait((i, e))
        finally:
            queue.put_nowait((i, done))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        for s in streams:
            s.cancel()


async def wait_for_disconnect(request: Request) -> None:
    """Returns when the client goes away. Only valid once the body has been read."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(request: Request, coro: Awaitable[T]) -> T:
    """Run `coro`; if the client disconnects first, cancel it (its finally blocks abort the
    engine requests) and raise ClientDisconnected."""
    work = asyncio.ensure_future(coro)
    watch = asyncio.ensure_future(wait_for_disconnect(request))
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        # Also reached when this handler itself is cancelled (server shutdown).
        for t in (work, watch):
            if not t.done():
                t.cancel()
    if work.done() and not work.cancelled():
        return work.result()
    await asyncio.gather(work, return_exceptions=True)  # let its cleanup run
    raise ClientDisconnected()


# ---------------------------------------------------------------------------------- SSE
def sse(data: Any) -> str:
    if isinstance(data, str):
        return f"data: {data}\n\n"
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"


class EventStreamResponse(Response):
    """text/event-stream response that always watches for the client going away.

    Sending and disconnect-listening run side by side; whichever ends first cancels the other, and
    the body generator is closed explicitly, so its finally blocks (which abort engine requests)
    run right away rather than whenever the generator is garbage-collected."""

    def __init__(self, body: AsyncIterator[str], on_close: Optional[Callable[[], None]] = None,
                 status_code: int = 200):
        # Deliberately not calling Response.__init__: there is no fixed body to render.
        self.body_iterator = body
        self.on_close = on_close
        self.status_code = status_code
        self.background = None

    async def __call__(self, scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": self.status_code,
                    "headers": [(b"content-type", b"text/event-stream; charset=utf-8"),
                                (b"cache-control", b"no-cache"),
                                (b"x-accel-buffering", b"no")]})

        async def pump() -> None:
            async for chunk in self.body_iterator:
                await send({"type": "http.response.body", "body": chunk.encode("utf-8"),
                            "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        async def listen() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        sender = asyncio.ensure_future(pump())
        listener = asyncio.ensure_future(listen())
        try:
            await asyncio.wait({sender, listener}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (sender, listener):
                if not t.done():
                    t.cancel()
            await asyncio.gather(sender, listener, return_exceptions=True)
            await self.body_iterator.aclose()
            # A body that never started has no finally to run: clean up for it.
            if self.on_close is not None:
                self.on_close()
        if sender.done() and not sender.cancelled() and sender.exception() is not None:
            exc = sender.exception()
            if not isinstance(exc, OSError):  # a send to a vanished client
                logger.error("streaming response failed", exc_info=exc)


# ---------------------------------------------------------------------------------- choices
class ChoiceState:
    """Accumulates one choice (prompt i, sample j) from DELTA outputs. A finished sample keeps
    appearing (empty) in later deltas of its request: `finished` makes those no-ops."""
    __slots__ = ("text", "token_ids", "logprobs", "finish_reason", "stop_reason", "started",
                 "emitted")

    def __init__(self) -> None:
        self.text = ""
        self.token_ids: list[int] = []
        self.logprobs: list = []
        self.finish_reason: Optional[str] = None
        self.stop_reason = None
        self.started = False
        self.emitted = 0  # characters streamed so far (echoed prompt included)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def add(self, c) -> bool:
        """Fold in a CompletionOutput delta; False if this choice had already finished."""
        if self.finished:
            return False
        self.text += c.text
        self.token_ids.extend(c.token_ids)
        if c.logprobs:
            self.logprobs.extend(c.logprobs)
        if c.finish_reason is not None:
            self.finish_reason, self.stop_reason = c.finish_reason, c.stop_reason
        return True
