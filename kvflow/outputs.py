"""User-facing results, with vLLM's names: RequestOutput and CompletionOutput.

Logprobs follow vLLM: `logprobs` is a list with one dict per generated token mapping token id to
Logprob(logprob, rank, decoded_token); `prompt_logprobs` has None for the first prompt token.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union


@dataclass
class Logprob:
    logprob: float
    rank: Optional[int] = None  # 1-based rank in the distribution
    decoded_token: Optional[str] = None


SampleLogprobs = list[dict[int, Logprob]]
PromptLogprobs = list[Optional[dict[int, Logprob]]]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: Optional[float] = None
    logprobs: Optional[SampleLogprobs] = None
    # "stop" (EOS, stop token or stop string), "length" (max_tokens / max_model_len),
    # "abort", "error"; None while running.
    finish_reason: Optional[str] = None
    # The stop string or stop token id that ended the request; None for EOS or length.
    stop_reason: Union[int, str, None] = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    prompt_logprobs: Optional[PromptLogprobs] = None
    num_cached_tokens: int = 0
    # Set when the request failed (e.g. prompt too long); finish_reason is then "error".
    error: Optional[str] = None
    metrics: dict = field(default_factory=dict)
    # Disaggregated prefill: where a decode instance pulls this request's KV from (producer).
    kv_transfer_params: Optional[dict] = None
