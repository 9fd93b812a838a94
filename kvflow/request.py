"""The engine's view of one sequence being generated.

Invariant the whole scheduler rests on: `num_computed_tokens <= num_tokens`. Each step the
scheduler grants some of the missing `num_tokens - num_computed_tokens` under a token budget;
when a step brings them level, the model samples one more token, which raises num_tokens again.
Prefill, chunked prefill, decode and recompute after preemption are all this one rule.
"""
from __future__ import annotations

import enum
import time
from typing import Optional

from kvflow.sampling_params import SamplingParams


class RequestStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    # Admitted, blocks allocated, its prompt's KV is being loaded from another instance
    # (disaggregated prefill, kvflow/kv_transfer); scheduled once the load has finished.
    WAITING_FOR_REMOTE_KV = 3
    # Finished states are > WAITING_FOR_REMOTE_KV.
    FINISHED_STOPPED = 4
    FINISHED_LENGTH = 5
    FINISHED_ABORTED = 6
    FINISHED_ERROR = 7

    @property
    def finished(self) -> bool:
        return self > RequestStatus.WAITING_FOR_REMOTE_KV

    @property
    def finish_reason(self) -> Optional[str]:
        return _FINISH_REASON.get(self)


_FINISH_REASON = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_ERROR: "error",
}


class Request:
    def __init__(self, request_id: str, prompt_token_ids: list[int], sampling_params: SamplingParams,
                 max_model_len: int, arrival_time: Optional[float] = None, priority: int = 0,
                 kv_transfer_params: Optional[dict] = None):
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self.arrival_time = time.time() if arrival_time is None else arrival_time
        self.priority = priority
        # Disaggregated prefill/decode (kvflow/kv_transfer/p2p_connector.py): what the client
        # asked for, and what the producer returns once the request finished.
        self.kv_transfer_params = kv_transfer_params
        self.kv_transfer_params_out: Optional[dict] = None
        self.status = RequestStatus.WAITING
        self.stop_reason: int | str | None = None

        self.num_prompt_tokens = len(self.prompt_token_ids)
        # Generation may not run past the model's context window.
        limit = max_model_len - self.num_prompt_tokens
        mt = sampling_params.max_tokens
        self.max_tokens = limit if mt is None else min(mt, limit)
        self.stop_token_ids = sampling_params.all_stop_token_ids

        self.output_token_ids: list[int] = []
        self.all_token_ids: list[int] = list(self.prompt_token_ids)
        self.num_computed_tokens = 0
        # Tokens sampled by a step that has been launched but whose result is not back yet
        # (overlapped scheduling). They count toward what the next step may compute.
        self.num_output_placeholders = 0
        # Prompt tokens served from the prefix cache at first scheduling (-1 = not yet scheduled).
        self.num_cached_tokens = -1
        self.num_preemptions = 0
        # Chained hashes of this request's full blocks, extended as tokens arrive (core.block_hash).
        self.block_hashes: list[bytes] = []
        # Timestamps for metrics.
        self.first_scheduled_time: Optional[float] = None
        self.first_token_time: Optional[float] = None

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def __repr__(self) -> str:
        return (f"Request({self.request_id!r}, status={self.status.name}, "
                f"computed={self.num_computed_tokens}/{self.num_tokens})")
