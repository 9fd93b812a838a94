"""SamplingParams: what the user asks for, with vLLM's names and meanings.

Validation happens once, at construction; every error is a ValueError that names the field and
the allowed range so that the server can turn it into an HTTP 400 with `param` set.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Optional, Union

# Below this temperature sampling is greedy (vLLM's _SAMPLING_EPS).
SAMPLING_EPS = 1e-5
# OpenAI clamps logit_bias values to this range.
LOGIT_BIAS_LIMIT = 100.0


class SamplingParamError(ValueError):
    """A ValueError that carries the offending field name (used for OpenAI `param`)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


def _err(param: str, message: str) -> SamplingParamError:
    return SamplingParamError(param, f"{param}: {message}")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x) -> bool:
    # NaN and inf fail every range check silently (all comparisons are False): reject them here.
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: Optional[dict[int, float]] = None
    seed: Optional[int] = None
    stop: Optional[Union[str, list[str]]] = None
    stop_token_ids: Optional[list[int]] = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: Optional[int] = 16
    min_tokens: int = 0
    logprobs: Optional[int] = None
    prompt_logprobs: Optional[int] = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    detokenize: bool = True
    # Filled by the engine from the model's generation config / tokenizer: EOS ids that end the
    # request unless ignore_eos. Not user-facing.
    _eos_token_ids: frozenset = field(default=frozenset(), repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        elif self.stop is None:
            self.stop = []
        else:
            self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.logit_bias:
            try:
                self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
            except (TypeError, ValueError, AttributeError):
                raise _err("logit_bias", "must map integer token ids to numbers") from None
        else:
            self.logit_bias = None
        if self.top_k == -1:
            self.top_k = 0
        self._verify()
        if self.temperature < SAMPLING_EPS:
            # Greedy: the truncation knobs are meaningless, normalise them so the batch
            # sampler can skip work.
            self.top_p, self.top_k, self.min_p = 1.0, 0, 0.0

    # ------------------------------------------------------------------ validation
    def _verify(self) -> None:
        if not _is_int(self.n) or self.n < 1:
            raise _err("n", f"must be an integer >= 1, got {self.n!r}")
        if not _is_num(self.temperature) or self.temperature < 0:
            raise _err("temperature", f"must be a number >= 0, got {self.temperature!r}")
        if not _is_num(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise _err("top_p", f"must be in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise _err("top_k", f"must be -1 or 0 (disabled) or an integer >= 1, got {self.top_k!r}")
        if not _is_num(self.min_p) or not 0.0 <= self.min_p <= 1.0:
            raise _err("min_p", f"must be in [0, 1], got {self.min_p!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not _is_num(v) or not -2.0 <= v <= 2.0:
                raise _err(name, f"must be in [-2, 2], got {v!r}")
        if not _is_num(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise _err("repetition_penalty", f"must be > 0, got {self.repetition_penalty!r}")
        if self.logit_bias:
            for tok, bias in self.logit_bias.items():
                if tok < 0:
                    raise _err("logit_bias", f"token id {tok} must be >= 0")
                if not -LOGIT_BIAS_LIMIT <= bias <= LOGIT_BIAS_LIMIT:
                    raise _err("logit_bias", f"bias for token {tok} must be in [-100, 100], got {bias}")
        if self.seed is not None and not _is_int(self.seed):
            raise _err("seed", f"must be an integer, got {self.seed!r}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise _err("stop", f"stop strings must be non-empty strings, got {s!r}")
        for t in self.stop_token_ids:
            if not _is_int(t) or t < 0:
                raise _err("stop_token_ids", f"must be non-negative integers, got {t!r}")
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            raise _err("max_tokens", f"must be an integer >= 1, got {self.max_tokens!r}")
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            raise _err("min_tokens", f"must be an integer >= 0, got {self.min_tokens!r}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise _err("min_tokens",
                       f"must be <= max_tokens={self.max_tokens}, got {self.min_tokens}")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (not _is_int(v) or v < 0):
                raise _err(name, f"must be an integer >= 0, got {v!r}")
        if not self.detokenize and self.stop:
            raise _err("stop", "stop strings need detokenize=True")
        for name in ("include_stop_str_in_output", "ignore_eos", "skip_special_tokens",
                     "spaces_between_special_tokens", "detokenize"):
            if not isinstance(getattr(self, name), bool):
                raise _err(name, f"must be a boolean, got {getattr(self, name)!r}")

    def verify_for_model(self, vocab_size: int) -> None:
        """Checks that need the model: token ids inside the vocabulary."""
        if self.logit_bias:
            for tok in self.logit_bias:
                if tok >= vocab_size:
                    raise _err("logit_bias", f"token id {tok} is outside the vocabulary [0, {vocab_size})")
        for t in self.stop_token_ids:
            if t >= vocab_size:
                raise _err("stop_token_ids", f"token id {t} is outside the vocabulary [0, {vocab_size})")

    # ------------------------------------------------------------------ derived
    @property
    def greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS

    @property
    def needs_history(self) -> bool:
        """Sampling reads this request's previous tokens (penalties, min_tokens) or needs
        per-position prompt logits: its steps cannot overlap with the previous one."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
                    or self.min_tokens or self.prompt_logprobs is not None)

    @property
    def all_stop_token_ids(self) -> frozenset:
        ids = set(self.stop_token_ids)
        if not self.ignore_eos:
            ids |= set(self._eos_token_ids)
        return frozenset(ids)

    def clone(self) -> "SamplingParams":
        """A copy the engine may change (n, seed, EOS ids) without touching the caller's. Every
        field holds an immutable value except the containers stop, stop_token_ids and
        logit_bias, whose elements are immutable: one level of copying is a deep copy.
        (copy.deepcopy took ~150 us a request, most of add_request's host time.)"""
        c = copy.copy(self)
        c.stop, c.stop_token_ids = copy.copy(self.stop), copy.copy(self.stop_token_ids)
        c.logit_bias = copy.copy(self.logit_bias)
        return c
