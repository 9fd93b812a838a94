"""OpenAI-compatible request and response models (pydantic v2), with vLLM's extra parameters.

Requests validate in strict mode: a string where a number belongs is a 400, not a silent
coercion. Shape errors come from pydantic; range errors come from SamplingParams (one source of
truth for what the engine accepts). Either way the client gets a 400 whose `param` names the
offending field (see `errors.py`).
"""
from __future__ import annotations

import time
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from kvflow.sampling_params import SamplingParamError, SamplingParams

# vLLM's default max_logprobs: how many top alternatives a client may ask for per token.
MAX_LOGPROBS = 20


class _Request(BaseModel):
    # Unknown fields are ignored (clients send provider-specific extras), types are strict.
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(_Request):
    include_usage: Optional[bool] = False
    continuous_usage_stats: Optional[bool] = False


class _SamplingRequest(_Request):
    """Fields shared by /v1/completions and /v1/chat/completions."""
    model: Optional[str] = None
    n: Optional[int] = 1
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    presence_penalty: Optional[float] = 0.0
    frequency_penalty: Optional[float] = 0.0
    logit_bias: Optional[dict[str, float]] = None
    seed: Optional[int] = None
    stop: Optional[Union[str, list[str]]] = None
    user: Optional[str] = None
    # vLLM extras.
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    repetition_penalty: Optional[float] = None
    min_tokens: Optional[int] = 0
    ignore_eos: Optional[bool] = False
    priority: Optional[int] = 0
    stop_token_ids: Optional[list[int]] = None
    include_stop_str_in_output: Optional[bool] = False
    skip_special_tokens: Optional[bool] = True
    spaces_between_special_tokens: Optional[bool] = True
    # Disaggregated prefill/decode (docs/disaggregation.md), as vLLM: {"do_remote_decode":
    # true} to a prefill instance; what it answered, to a decode instance.
    kv_transfer_params: Optional[dict[str, Any]] = None

    def check_stream_options(self) -> None:
        if self.stream_options is not None and not self.stream:
            raise SamplingParamError("stream_options",
                                     "stream_options: only allowed when stream is true")

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        """vLLM extra: usage so far on every chunk (only together with include_usage)."""
        return self.include_usage and bool(self.stream_options.continuous_usage_stats)

    def _sampling_params(self, max_tokens: Optional[int], logprobs: Optional[int],
                         prompt_logprobs: Optional[int] = None) -> SamplingParams:
        """Raises SamplingParamError naming the field."""
        kw: dict[str, Any] = dict(
            n=1 if self.n is None else self.n,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=0 if self.top_k is None else self.top_k,
            min_p=0.0 if self.min_p is None else self.min_p,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            logit_bias=self.logit_bias, seed=self.seed, stop=self.stop,
            stop_token_ids=self.stop_token_ids,
            include_stop_str_in_output=bool(self.include_stop_str_in_output),
            ignore_eos=bool(self.ignore_eos), max_tokens=max_tokens,
            min_tokens=self.min_tokens or 0, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
            skip_special_tokens=self.skip_special_tokens is not False,
            spaces_between_special_tokens=self.spaces_between_special_tokens is not False)
        return SamplingParams(**kw)


def _check_logprobs(name: str, value: Optional[int]) -> None:
    if value is not None and not 0 <= value <= MAX_LOGPROBS:
        raise SamplingParamError(name, f"{name}: must be in [0, {MAX_LOGPROBS}], got {value}")


# ---------------------------------------------------------------------------------- completions
class CompletionRequest(_SamplingRequest):
    # str | list[str] | list[int] | list[list[int]]: checked by hand for a clear message.
    prompt: Any
    max_tokens: Optional[int] = 16
    logprobs: Optional[int] = None
    echo: Optional[bool] = False
    best_of: Optional[int] = None
    suffix: Optional[str] = None
    add_special_tokens: Optional[bool] = True

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, v):
        if isinstance(v, str):
            return [v]
        if isinstance(v, list) and v:
            if all(_is_token(t) for t in v):
                return [v]
            if all(isinstance(p, str) for p in v):
                return v
            if all(isinstance(p, list) and p and all(_is_token(t) for t in p) for p in v):
                return v
        raise ValueError("must be a non-empty string, list of strings, list of token ids "
                         "or list of lists of token ids")

    @property
    def prompts(self) -> list[Union[str, list[int]]]:
        return self.prompt  # normalised by the validator

    def to_sampling_params(self) -> SamplingParams:
        self.check_stream_options()
        _check_logprobs("logprobs", self.logprobs)
        if self.suffix is not None:
            raise SamplingParamError("suffix", "suffix: is not supported")
        if self.best_of is not None and self.best_of != (self.n or 1):
            raise SamplingParamError("best_of", "best_of: only best_of == n is supported")
        # echo + logprobs also scores the prompt, as OpenAI does.
        prompt_lps = self.logprobs if (self.echo and self.logprobs is not None) else None
        return self._sampling_params(self.max_tokens, self.logprobs, prompt_lps)


def _is_token(t) -> bool:
    return isinstance(t, int) and not isinstance(t, bool)


# ---------------------------------------------------------------------------------- chat
class ChatMessage(_Request):
    role: Literal["system", "user", "assistant", "developer"]
    # str, or a list of {"type": "text", "text": ...} parts; None only for assistant turns.
    content: Any = None
    name: Optional[str] = None

    @field_validator("content", mode="before")
    @classmethod
    def _content_text(cls, v):
        if v is None or isinstance(v, str):
            return v
        if isinstance(v, list):
            texts = []
            for i, part in enumerate(v):
                if not isinstance(part, dict) or part.get("type") != "text":
                    raise ValueError(f"part {i}: only text content parts "
                                     "({'type': 'text', 'text': ...}) are supported")
                if not isinstance(part.get("text"), str):
                    raise ValueError(f"part {i}: 'text' must be a string")
                texts.append(part["text"])
            return "\n".join(texts)
        raise ValueError("must be a string or a list of text parts")

    def to_template(self) -> dict:
        # Chat templates know system/user/assistant; OpenAI's "developer" is a system message.
        role = "system" if self.role == "developer" else self.role
        msg = {"role": role, "content": self.content or ""}
        if self.name:
            msg["name"] = self.name
        return msg


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Optional[int] = None               # deprecated by OpenAI, still accepted
    max_completion_tokens: Optional[int] = None
    logprobs: Optional[bool] = False
    top_logprobs: Optional[int] = None
    response_format: Optional[dict] = None
    tools: Optional[list] = None
    tool_choice: Optional[Any] = None
    # vLLM extras.
    add_generation_prompt: Optional[bool] = True
    continue_final_message: Optional[bool] = False
    chat_template_kwargs: Optional[dict] = None
    echo: Optional[bool] = False

    def to_sampling_params(self) -> SamplingParams:
        self.check_stream_options()
        for i, m in enumerate(self.messages):
            if m.content is None and m.role != "assistant":
                raise SamplingParamError(f"messages[{i}].content",
                                         f"messages[{i}].content: required for role {m.role!r}")
        if self.tools:
            raise SamplingParamError("tools", "tools: tool calling is not supported")
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            raise SamplingParamError("response_format",
                                     "response_format: only {'type': 'text'} is supported")
        if self.continue_final_message and self.add_generation_prompt:
            raise SamplingParamError("continue_final_message", "continue_final_message: "
                                     "cannot be combined with add_generation_prompt")
        if self.top_logprobs is not None and not self.logprobs:
            raise SamplingParamError("top_logprobs", "top_logprobs: requires logprobs=true")
        _check_logprobs("top_logprobs", self.top_logprobs)
        lps = (self.top_logprobs or 0) if self.logprobs else None
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None \
            else self.max_tokens
        try:
            return self._sampling_params(max_tokens, lps)
        except SamplingParamError as e:
            if e.param == "max_tokens" and self.max_completion_tokens is not None:
                raise SamplingParamError("max_completion_tokens",
                                         str(e).replace("max_tokens", "max_completion_tokens", 1))
            raise


# ---------------------------------------------------------------------------------- tokenizer
class TokenizeRequest(_Request):
    model: Optional[str] = None
    prompt: Optional[str] = None
    messages: Optional[list[ChatMessage]] = None
    add_special_tokens: Optional[bool] = None
    add_generation_prompt: Optional[bool] = True
    continue_final_message: Optional[bool] = False
    chat_template_kwargs: Optional[dict] = None
    return_token_strs: Optional[bool] = False


class DetokenizeRequest(_Request):
    model: Optional[str] = None
    tokens: list[int]


# ---------------------------------------------------------------------------------- responses
class _Response(BaseModel):
    model_config = ConfigDict(extra="allow")


class PromptTokensDetails(_Response):
    cached_tokens: int = 0


class Usage(_Response):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: Optional[PromptTokensDetails] = None


def make_usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> Usage:
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                 total_tokens=prompt_tokens + completion_tokens,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens))


class CompletionLogprobs(_Response):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[Optional[float]] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[Optional[dict[str, float]]] = Field(default_factory=list)


class CompletionChoice(_Response):
    index: int
    text: str
    logprobs: Optional[CompletionLogprobs] = None
    finish_reason: Optional[str] = None
    stop_reason: Union[int, str, None] = None


def _now() -> int:
    return int(time.time())


class CompletionResponse(_Response):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: Optional[Usage] = None


class TopLogprob(_Response):
    token: str
    logprob: float
    bytes: Optional[list[int]] = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(_Response):
    content: Optional[list[ChatTokenLogprob]] = None


class ChatMessageOut(_Response):
    role: str = "assistant"
    content: Optional[str] = None


class ChatChoice(_Response):
    index: int
    message: ChatMessageOut
    logprobs: Optional[ChatLogprobs] = None
    finish_reason: Optional[str] = None
    stop_reason: Union[int, str, None] = None


class ChatCompletionResponse(_Response):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatChoice]
    usage: Optional[Usage] = None


class DeltaMessage(_Response):
    role: Optional[str] = None
    content: Optional[str] = None


class ChatChunkChoice(_Response):
    index: int
    delta: DeltaMessage
    logprobs: Optional[ChatLogprobs] = None
    finish_reason: Optional[str] = None
    stop_reason: Union[int, str, None] = None


class ChatCompletionChunk(_Response):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatChunkChoice]
    usage: Optional[Usage] = None


class ModelCard(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "kvflow"
    root: Optional[str] = None
    max_model_len: Optional[int] = None


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]
