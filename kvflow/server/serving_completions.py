"""POST /v1/completions: prompts (text or token ids, one or many) -> choices, whole or streamed.

Choice k of the response is sample k % n of prompt k // n, as OpenAI and vLLM number them.
"""
from __future__ import annotations

import time
from typing import AsyncIterator, Optional

from starlette.requests import Request

from kvflow.engine.request_stream import RequestStream
from kvflow.outputs import Logprob
from kvflow.server.protocol import (CompletionChoice, CompletionLogprobs, CompletionRequest,
                                    CompletionResponse, make_usage)
from kvflow.server.serving_base import (SSE_DONE, ChoiceState, EventStreamResponse,
                                        OpenAIServing, engine_error, merge_streams, output_error,
                                        random_id, sse, unless_disconnected)


class _Prompt:
    __slots__ = ("text", "ids", "echo_text", "cached_tokens", "prompt_logprobs")

    def __init__(self, text: Optional[str], ids: list[int]):
        self.text = text
        self.ids = ids
        self.echo_text = text or ""
        self.cached_tokens = 0
        self.prompt_logprobs = None


class CompletionServing(OpenAIServing):
    async def create(self, req: CompletionRequest, raw: Request):
        model, params = self.model_and_params(req)
        prompts: list[_Prompt] = []
        many = len(req.prompts) > 1
        for i, p in enumerate(req.prompts):
            param = f"prompt[{i}]" if many else "prompt"
            if isinstance(p, str):
                ids = await self.tokenize(p, req.add_special_tokens is not False, param)
                prompt = _Prompt(p, ids)
            else:
                prompt = _Prompt(None, list(p))
            self.check_prompt(prompt.ids, params, param)
            if req.echo and prompt.text is None and self.tokenizer is not None:
                prompt.echo_text = await self.detokenize(prompt.ids)
            prompts.append(prompt)
        rid = random_id("cmpl")
        streams = await self.submit_all(rid, [(p.text, p.ids) for p in prompts], params,
                                        req.priority or 0, req.kv_transfer_params)
        ctx = _Ctx(rid, model, req, params.n, prompts, streams)
        if req.stream:
            return EventStreamResponse(self._stream(ctx), on_close=ctx.cancel)
        try:
            return await unless_disconnected(raw, self._full(ctx))
        finally:
            ctx.cancel()

    # ------------------------------------------------------------------ whole response
    async def _full(self, ctx: "_Ctx") -> CompletionResponse:
        choices = [ChoiceState() for _ in range(len(ctx.prompts) * ctx.n)]
        await self.drain(ctx.streams, lambda i, out: self._fold(ctx, i, out, choices))
        out_choices = []
        for k, st in enumerate(choices):
            prompt = ctx.prompts[k // ctx.n]
            text, lps = st.text, None
            if ctx.req.echo:
                text = prompt.echo_text + text
            if ctx.req.logprobs is not None:
                lps = self._logprobs(ctx, prompt, st.token_ids, st.logprobs, echo=ctx.req.echo)
            out_choices.append(CompletionChoice(index=k, text=text, logprobs=lps,
                                                finish_reason=st.finish_reason,
                                                stop_reason=st.stop_reason))
        extra = {} if ctx.kv_transfer_params is None else {
            "kv_transfer_params": ctx.kv_transfer_params}  # non-standard, as vLLM
        return CompletionResponse(id=ctx.rid, model=ctx.model, choices=out_choices,
                                  created=ctx.created, usage=ctx.usage(choices), **extra)

    @staticmethod
    def _fold(ctx: "_Ctx", i: int, out, choices: list[ChoiceState]) -> list[tuple[int, object]]:
        """Apply one output of prompt i; returns [(choice index, delta)] that changed."""
        prompt = ctx.prompts[i]
        prompt.cached_tokens = out.num_cached_tokens
        if out.kv_transfer_params is not None:
            ctx.kv_transfer_params = out.kv_transfer_params
        if out.prompt_logprobs is not None:
            prompt.prompt_logprobs = out.prompt_logprobs
        changed = []
        for c in out.outputs:
            k = i * ctx.n + c.index
            if choices[k].add(c):
                changed.append((k, c))
        return changed

    # ------------------------------------------------------------------ streaming
    async def _stream(self, ctx: "_Ctx") -> AsyncIterator[str]:
        choices = [ChoiceState() for _ in range(len(ctx.prompts) * ctx.n)]
        include_usage = ctx.req.include_usage
        try:
            async for i, out in merge_streams(ctx.streams):
                err = output_error(out) if out.finished else None
                if err is not None:
                    yield sse(err.body())
                    break
                for k, c in self._fold(ctx, i, out, choices):
                    st = choices[k]
                    text, lp_ids, lps = c.text, list(c.token_ids), c.logprobs or []
                    echo = ctx.req.echo and not st.started
                    if echo:
                        text = ctx.prompts[i].echo_text + text
                    st.started = True
                    if not text and not lp_ids and c.finish_reason is None:
                        continue
                    logprobs = None
                    if ctx.req.logprobs is not None:
                        logprobs = self._logprobs(ctx, ctx.prompts[i], lp_ids, lps, echo=echo,
                                                  offset=st.emitted)
                    st.emitted += len(text)
                    chunk = CompletionResponse(
                        id=ctx.rid, model=ctx.model, created=ctx.created,
                        choices=[CompletionChoice(index=k, text=text, logprobs=logprobs,
                                                  finish_reason=c.finish_reason,
                                                  stop_reason=c.stop_reason)],
                        usage=ctx.usage(choices) if ctx.req.continuous_usage else None)
                    yield sse(chunk.model_dump_json())
            else:
                if include_usage:
                    chunk = CompletionResponse(id=ctx.rid, model=ctx.model, created=ctx.created,
                                               choices=[], usage=ctx.usage(choices))
                    yield sse(chunk.model_dump_json())
        except Exception as e:  # noqa: BLE001 - headers are out: report in-band
            yield sse(engine_error(e).body())
        yield SSE_DONE

    # ------------------------------------------------------------------ logprobs
    def _logprobs(self, ctx: "_Ctx", prompt: _Prompt, token_ids: list[int],
                  logprobs: list[dict[int, Logprob]], *, echo: bool,
                  offset: int = 0) -> CompletionLogprobs:
        """OpenAI's completions format. With echo, the prompt tokens come first (the first one
        has no logprob); `offset` is the text offset of the first token listed."""
        num_top = ctx.req.logprobs or 0
        res = CompletionLogprobs()
        pos = offset
        entries: list[tuple[int, Optional[dict[int, Logprob]]]] = []
        if echo:
            plps = prompt.prompt_logprobs or [None] * len(prompt.ids)
            entries.extend(zip(prompt.ids, plps))
        entries.extend(zip(token_ids, logprobs))
        for tid, d in entries:
            tok = self._token_str(tid, d)
            res.tokens.append(tok)
            res.text_offset.append(pos)
            pos += len(tok)
            if d is None or tid not in d:
                res.token_logprobs.append(None)
                res.top_logprobs.append(None)
                continue
            res.token_logprobs.append(d[tid].logprob)
            # The sampled token and the top-k alternatives (vLLM's convention).
            top = {tok: d[tid].logprob}
            for t, lp in sorted(d.items(), key=lambda kv: kv[1].rank or 0):
                if t != tid and lp.rank is not None and lp.rank <= num_top:
                    top.setdefault(self._token_str(t, d), lp.logprob)
            res.top_logprobs.append(top)
        return res

    def _token_str(self, tid: int, d: Optional[dict[int, Logprob]]) -> str:
        if d is not None and tid in d and d[tid].decoded_token is not None:
            return d[tid].decoded_token
        tok = self.tokenizer
        return tok.decode([tid]) if tok is not None else f"token_id:{tid}"


class _Ctx:
    """Everything one completions request carries from submission to the last chunk."""

    def __init__(self, rid: str, model: str, req: CompletionRequest, n: int,
                 prompts: list[_Prompt], streams: list[RequestStream]):
        self.rid, self.model, self.req, self.n = rid, model, req, n
        self.prompts, self.streams = prompts, streams
        self.created = int(time.time())
        self.kv_transfer_params: Optional[dict] = None

    def cancel(self) -> None:
        """Abort whatever is still running (no-op for finished streams)."""
        for s in self.streams:
            s.cancel()

    def usage(self, choices: list[ChoiceState]):
        return make_usage(prompt_tokens=sum(len(p.ids) for p in self.prompts),
                          completion_tokens=sum(len(c.token_ids) for c in choices),
                          cached_tokens=sum(p.cached_tokens for p in self.prompts))
