"""POST /v1/chat/completions: messages -> chat template -> one prompt -> n choices.

The conversation is rendered with the tokenizer's chat template (add_generation_prompt by
default) and tokenised without special tokens, exactly as LLM.chat does, so offline and served
outputs agree token for token.
"""
from __future__ import annotations

import time
from typing import AsyncIterator, Optional

from starlette.requests import Request

from kvflow.engine.request_stream import RequestStream
from kvflow.outputs import Logprob
from kvflow.server.protocol import (ChatChoice, ChatChunkChoice, ChatCompletionChunk,
                                    ChatCompletionRequest, ChatCompletionResponse, ChatLogprobs,
                                    ChatMessageOut, ChatTokenLogprob, DeltaMessage, TopLogprob,
                                    make_usage)
from kvflow.server.serving_base import (SSE_DONE, ChoiceState, EventStreamResponse,
                                        OpenAIServing, engine_error, merge_streams, output_error,
                                        random_id, sse, unless_disconnected)

_ROLE = "assistant"


class ChatServing(OpenAIServing):
    async def create(self, req: ChatCompletionRequest, raw: Request):
        model, params = self.model_and_params(req)
        conversation = [m.to_template() for m in req.messages]
        text, ids = await self.render_chat(
            conversation, add_generation_prompt=req.add_generation_prompt is not False,
            continue_final_message=bool(req.continue_final_message),
            chat_template_kwargs=req.chat_template_kwargs)
        max_param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        self.check_prompt(ids, params, "messages", max_param)
        # vLLM's chat echo: repeat the final assistant message the model continues.
        echo = ""
        if req.echo and conversation and conversation[-1]["role"] == _ROLE:
            echo = conversation[-1]["content"]
        rid = random_id("chatcmpl")
        streams = await self.submit_all(rid, [(text, ids)], params, req.priority or 0,
                                        req.kv_transfer_params)
        ctx = _Ctx(rid, model, req, params.n, len(ids), echo, streams[0])
        if req.stream:
            return EventStreamResponse(self._stream(ctx), on_close=ctx.stream.cancel)
        try:
            return await unless_disconnected(raw, self._full(ctx))
        finally:
            ctx.stream.cancel()

    # ------------------------------------------------------------------ whole response
    async def _full(self, ctx: "_Ctx") -> ChatCompletionResponse:
        choices = [ChoiceState() for _ in range(ctx.n)]

        kv_params = {}

        def fold(_: int, out) -> None:
            ctx.cached_tokens = out.num_cached_tokens
            if out.kv_transfer_params is not None:  # non-standard, as vLLM
                kv_params["kv_transfer_params"] = out.kv_transfer_params
            for c in out.outputs:
                choices[c.index].add(c)

        await self.drain([ctx.stream], fold)
        out_choices = [
            ChatChoice(index=k, message=ChatMessageOut(role=_ROLE, content=ctx.echo + st.text),
                       logprobs=self._logprobs(ctx, st.token_ids, st.logprobs),
                       finish_reason=st.finish_reason, stop_reason=st.stop_reason)
            for k, st in enumerate(choices)]
        return ChatCompletionResponse(id=ctx.rid, model=ctx.model, created=ctx.created,
                                      choices=out_choices, usage=ctx.usage(choices), **kv_params)

    # ------------------------------------------------------------------ streaming
    async def _stream(self, ctx: "_Ctx") -> AsyncIterator[str]:
        choices = [ChoiceState() for _ in range(ctx.n)]
        include_usage = ctx.req.include_usage

        def chunk(choice: ChatChunkChoice) -> str:
            usage = ctx.usage(choices) if ctx.req.continuous_usage else None
            return sse(ChatCompletionChunk(id=ctx.rid, model=ctx.model, created=ctx.created,
                                           choices=[choice], usage=usage).model_dump_json())

        try:
            # OpenAI opens every choice with a role-only delta; it also flushes the headers.
            for k in range(ctx.n):
                yield chunk(ChatChunkChoice(index=k, delta=DeltaMessage(role=_ROLE, content="")))
            async for _, out in merge_streams([ctx.stream]):
                ctx.cached_tokens = out.num_cached_tokens
                err = output_error(out) if out.finished else None
                if err is not None:
                    yield sse(err.body())
                    break
                for c in out.outputs:
                    st = choices[c.index]
                    if not st.add(c):
                        continue
                    text = c.text
                    if not st.started:
                        text = ctx.echo + text
                        st.started = True
                    if not text and not c.token_ids and c.finish_reason is None:
                        continue
                    yield chunk(ChatChunkChoice(
                        index=c.index, delta=DeltaMessage(content=text),
                        logprobs=self._logprobs(ctx, list(c.token_ids), c.logprobs or []),
                        finish_reason=c.finish_reason, stop_reason=c.stop_reason))
            else:
                if include_usage:
                    yield sse(ChatCompletionChunk(id=ctx.rid, model=ctx.model, created=ctx.created,
                                                  choices=[], usage=ctx.usage(choices))
                              .model_dump_json())
        except Exception as e:  # noqa: BLE001 - headers are out: report in-band
            yield sse(engine_error(e).body())
        yield SSE_DONE

    # ------------------------------------------------------------------ logprobs
    def _logprobs(self, ctx: "_Ctx", token_ids: list[int],
                  logprobs: list[dict[int, Logprob]]) -> Optional[ChatLogprobs]:
        if not ctx.req.logprobs:
            return None
        num_top = ctx.req.top_logprobs or 0
        content = []
        for tid, d in zip(token_ids, logprobs):
            chosen = d.get(tid)
            tok = self._token_str(tid, chosen)
            top = [TopLogprob(token=self._token_str(t, lp), logprob=lp.logprob,
                              bytes=list(self._token_str(t, lp).encode("utf-8")))
                   for t, lp in sorted(d.items(), key=lambda kv: kv[1].rank or 0)
                   if lp.rank is not None and lp.rank <= num_top][:num_top]
            content.append(ChatTokenLogprob(
                token=tok, logprob=chosen.logprob if chosen is not None else float("-inf"),
                bytes=list(tok.encode("utf-8")), top_logprobs=top))
        return ChatLogprobs(content=content)

    def _token_str(self, tid: int, lp: Optional[Logprob]) -> str:
        if lp is not None and lp.decoded_token is not None:
            return lp.decoded_token
        tok = self.tokenizer
        return tok.decode([tid]) if tok is not None else f"token_id:{tid}"


class _Ctx:
    """Everything one chat request carries from submission to the last chunk."""

    def __init__(self, rid: str, model: str, req: ChatCompletionRequest, n: int,
                 num_prompt_tokens: int, echo: str, stream: RequestStream):
        self.rid, self.model, self.req, self.n = rid, model, req, n
        self.num_prompt_tokens, self.echo, self.stream = num_prompt_tokens, echo, stream
        self.cached_tokens = 0
        self.created = int(time.time())

    def usage(self, choices: list[ChoiceState]):
        return make_usage(prompt_tokens=self.num_prompt_tokens,
                          completion_tokens=sum(len(c.token_ids) for c in choices),
                          cached_tokens=self.cached_tokens)
