"""Turns per-step EngineCoreOutputs into user-facing RequestOutputs.

Owns everything about a request that the scheduler does not need: the prompt text, incremental
detokenisation and stop strings, logprob formatting, and the fan-in of n > 1 samples (child
requests "i_<id>") into one RequestOutput with n CompletionOutputs.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Optional

from kvflow.core.sched_output import EngineCoreOutput, LogprobsLists
from kvflow.engine.detokenizer import IncrementalDetokenizer
from kvflow.outputs import CompletionOutput, Logprob, RequestOutput
from kvflow.sampling_params import SamplingParams


class OutputKind(enum.Enum):
    CUMULATIVE = 0   # every step: everything so far
    DELTA = 1        # every step: only what is new (streaming)
    FINAL_ONLY = 2   # once, when finished


@dataclass
class _Child:
    index: int
    params: SamplingParams
    detok: Optional[IncrementalDetokenizer]
    token_ids: list[int] = field(default_factory=list)
    logprobs: Optional[list] = None
    cumulative_logprob: Optional[float] = None
    finish_reason: Optional[str] = None
    stop_reason: object = None
    # Cursors of what a DELTA consumer has already been given.
    sent_tokens: int = 0
    sent_logprobs: int = 0


@dataclass
class _Parent:
    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list[int]
    kind: OutputKind
    children: dict[str, _Child]
    num_cached_tokens: int = 0
    prompt_logprobs: Optional[list] = None
    prompt_logprobs_sent: bool = False
    error: Optional[str] = None
    kv_transfer_params: Optional[dict] = None
    metrics: dict = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return all(c.finish_reason is not None for c in self.children.values())


class OutputProcessor:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.parents: dict[str, _Parent] = {}
        self.child_to_parent: dict[str, str] = {}

    def add_request(self, request_id: str, prompt: Optional[str], prompt_token_ids: list[int],
                    children: list[tuple[str, SamplingParams]], kind: OutputKind) -> None:
        kids = {}
        for i, (cid, params) in enumerate(children):
            detok = None
            if self.tokenizer is not None and params.detokenize:
                detok = IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params)
            kids[cid] = _Child(i, params, detok, logprobs=[] if params.logprobs is not None else None,
                               cumulative_logprob=0.0 if params.logprobs is not None else None)
            self.child_to_parent[cid] = request_id
        self.parents[request_id] = _Parent(request_id, prompt, prompt_token_ids, kind, kids,
                                           prompt_logprobs=[None] if children[0][1].prompt_logprobs is not None else None)

    def has_request(self, request_id: str) -> bool:
        return request_id in self.parents

    def child_ids(self, request_id: str) -> list[str]:
        parent = self.parents.get(request_id)
        return list(parent.children) if parent else []

    # ------------------------------------------------------------------ per step
    def process(self, outputs: list[EngineCoreOutput]) -> tuple[list[RequestOutput], list[str]]:
        """Returns (request outputs to hand out, child ids that hit a stop string and must be
        finished in the scheduler)."""
        touched: dict[str, _Parent] = {}
        stopped: list[str] = []
        for eo in outputs:
            pid = self.child_to_parent.get(eo.req_id)
            if pid is None:
                continue
            parent = self.parents[pid]
            child = parent.children[eo.req_id]
            touched[pid] = parent
            parent.num_cached_tokens = max(parent.num_cached_tokens, eo.num_cached_tokens)
            if eo.prompt_logprobs is not None and parent.prompt_logprobs is not None and child.index == 0:
                parent.prompt_logprobs.extend(self._format_logprobs(eo.prompt_logprobs))
            if eo.error:
                parent.error = eo.error
            if eo.kv_transfer_params is not None:
                parent.kv_transfer_params = eo.kv_transfer_params
            if eo.new_token_ids:
                child.token_ids.extend(eo.new_token_ids)
                if eo.logprobs is not None and child.logprobs is not None:
                    fmt = self._format_logprobs(eo.logprobs)
                    child.logprobs.extend(fmt)
                    child.cumulative_logprob += sum(eo.logprobs.logprobs[i][0] for i in range(len(fmt)))
                if child.detok is not None:
                    stop = child.detok.update(eo.new_token_ids)
                    if stop is not None and eo.finish_reason is None:
                        child.finish_reason, child.stop_reason = "stop", stop
                        stopped.append(eo.req_id)
            if eo.finish_reason is not None and child.finish_reason is None:
                child.finish_reason, child.stop_reason = eo.finish_reason, eo.stop_reason
        results = []
        for parent in touched.values():
            ro = self._make_output(parent)
            if ro is not None:
                results.append(ro)
            if parent.finished:
                self._drop(parent)
        return results, stopped

    def abort(self, request_id: str, reason: str = "abort", error: Optional[str] = None) -> Optional[RequestOutput]:
        """Finish every unfinished child of a request from outside (abort, error); returns the
        final output, or None if the request is unknown."""
        parent = self.parents.get(request_id)
        if parent is None:
            return None
        for child in parent.children.values():
            if child.finish_reason is None:
                child.finish_reason = reason
        if error:
            parent.error = error
        ro = self._make_output(parent, force=True)
        self._drop(parent)
        return ro

    def _drop(self, parent: _Parent) -> None:
        for cid in parent.children:
            self.child_to_parent.pop(cid, None)
        self.parents.pop(parent.request_id, None)

    # ------------------------------------------------------------------ formatting
    def _format_logprobs(self, lp: LogprobsLists) -> list[dict[int, Logprob]]:
        out = []
        for ids, vals, rank in zip(lp.token_ids, lp.logprobs, lp.ranks):
            d: dict[int, Logprob] = {}
            # Column 0 is the chosen token; the rest are the top-k (rank 1..k).
            for j, (tid, val) in enumerate(zip(ids, vals)):
                if tid in d:
                    continue
                d[tid] = Logprob(val, rank if j == 0 else j, self._decode_one(tid))
            out.append(d)
        return out

    def _decode_one(self, token_id: int) -> Optional[str]:
        if self.tokenizer is None:
            return None
        return self.tokenizer.decode([token_id])

    def _make_output(self, parent: _Parent, force: bool = False) -> Optional[RequestOutput]:
        finished = parent.finished
        if parent.kind == OutputKind.FINAL_ONLY and not finished and not force:
            return None
        delta = parent.kind == OutputKind.DELTA
        completions = []
        for child in sorted(parent.children.values(), key=lambda c: c.index):
            if child.detok is not None and child.finish_reason is not None:
                child.detok.finish()
            if delta:
                tokens = child.token_ids[child.sent_tokens:]
                text = child.detok.get_delta_text() if child.detok else ""
                lps = child.logprobs[child.sent_logprobs:] if child.logprobs is not None else None
                if not tokens and not text and child.finish_reason is None:
                    continue
                child.sent_tokens = len(child.token_ids)
                child.sent_logprobs = len(child.logprobs) if child.logprobs is not None else 0
            else:
                tokens = list(child.token_ids)
                text = child.detok.output_text if child.detok else ""
                lps = list(child.logprobs) if child.logprobs is not None else None
            completions.append(CompletionOutput(
                index=child.index, text=text, token_ids=tokens,
                cumulative_logprob=child.cumulative_logprob, logprobs=lps,
                finish_reason=child.finish_reason, stop_reason=child.stop_reason))
        if delta and not completions and not (finished or force):
            return None  # e.g. a prompt chunk computed prompt logprobs but sampled nothing yet
        prompt_lps = parent.prompt_logprobs
        if delta and prompt_lps is not None:
            prompt_lps = None if parent.prompt_logprobs_sent else prompt_lps
            parent.prompt_logprobs_sent = prompt_lps is not None
        return RequestOutput(request_id=parent.request_id, prompt=parent.prompt,
                             prompt_token_ids=parent.prompt_token_ids, outputs=completions,
                             finished=finished or force, prompt_logprobs=prompt_lps,
                             num_cached_tokens=parent.num_cached_tokens, error=parent.error,
                             metrics=parent.metrics, kv_transfer_params=parent.kv_transfer_params)
