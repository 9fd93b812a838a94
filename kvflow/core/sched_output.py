"""The typed contracts between scheduler, runner and engine.

SchedulerOutput goes scheduler -> runner (what to compute this step); RunnerOutput comes back
(what was sampled). Both carry plain Python data only, so they can cross process boundaries
(tensor-parallel workers) cheaply.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from kvflow.kv_transfer.base import (EMPTY_METADATA, NO_RESULT, KVConnectorMetadata,
                                     KVTransferResult)
from kvflow.sampling_params import SamplingParams


@dataclass
class NewRequestData:
    """A request the runner holds no state for: first scheduled, or resumed after preemption
    (then token_ids include the outputs generated before it was preempted)."""
    req_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    sampling_params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int


@dataclass
class CachedRequestData:
    """A request scheduled last step too: only what changed."""
    req_id: str
    new_block_ids: list[int]
    num_computed_tokens: int


@dataclass
class SchedulerOutput:
    new_reqs: list[NewRequestData]
    cached_reqs: list[CachedRequestData]
    # req_id -> tokens to compute this step, in batch order (new requests after running ones).
    num_scheduled_tokens: dict[str, int]
    total_num_scheduled_tokens: int
    # Requests whose runner state must be dropped (finished, aborted or preempted).
    finished_req_ids: set[str] = field(default_factory=set)
    # KV transfers the worker must start (disaggregated prefill/decode; empty otherwise).
    kv_connector_metadata: KVConnectorMetadata = EMPTY_METADATA

    @property
    def is_empty(self) -> bool:
        return self.total_num_scheduled_tokens == 0


@dataclass
class LogprobsLists:
    """Per sampled (or prompt) position: token ids, logprobs (column 0 = the chosen token,
    then the top-k) and the chosen token's 1-based rank."""
    token_ids: list[list[int]]
    logprobs: list[list[float]]
    ranks: list[int]


@dataclass
class RunnerOutput:
    # req_id -> tokens sampled this step (empty list for a partial prefill).
    sampled_token_ids: dict[str, list[int]]
    logprobs: dict[str, LogprobsLists] = field(default_factory=dict)
    # req_id -> prompt logprobs of the positions computed this step.
    prompt_logprobs: dict[str, LogprobsLists] = field(default_factory=dict)
    # req_id -> error message when this request failed inside the runner.
    errors: dict[str, str] = field(default_factory=dict)
    # KV transfers that ended since the previous step (the worker connector's report).
    kv_transfers: KVTransferResult = NO_RESULT


@dataclass
class EngineCoreOutput:
    """Scheduler -> engine: what happened to one request this step."""
    req_id: str
    new_token_ids: list[int]
    finish_reason: Optional[str] = None
    stop_reason: Any = None
    logprobs: Optional[LogprobsLists] = None
    prompt_logprobs: Optional[LogprobsLists] = None
    num_cached_tokens: int = 0
    error: Optional[str] = None
    # A producer's answer for disaggregated decode (where the consumer pulls the KV from).
    kv_transfer_params: Optional[dict] = None
