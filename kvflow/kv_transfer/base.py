"""The KV connector protocol, split by side, and the null connector (the default).

A connector moves KV blocks between engine instances (disaggregated prefill/decode). It has two
halves that talk only through the typed step contracts, so they can live in different processes:

  scheduler side (CPU, kvflow/core/scheduler.py calls it)
    get_num_new_matched_tokens(req, num_local)  prompt tokens beyond the local prefix hits whose
                                   KV can be loaded from elsewhere (0 = compute them here)
    update_state_after_alloc(req, block_ids, num_local, num_external)  blocks were allocated
                                   for them: remember what to load
    build_connector_meta(so)       what the worker must send or receive, attached to the step's
                                   SchedulerOutput as `kv_connector_metadata`
    request_finished(req, block_ids)  -> (hold, kv_transfer_params): whether the scheduler must
                                   keep the blocks until the worker reports them sent, and what
                                   the client gets back (the producer's address and block ids)
  worker side (owns the KV cache tensors; kvflow/worker/model_runner.py calls it)
    start_load_kv(meta)            begin this step's loads (and register this step's sends)
    wait_for_layer_load(layer)     block until one layer's KV has arrived (layer-pipelined
                                   connectors; called by attention layers before attending)
    save_kv_layer(layer, cache, md)  after a layer wrote its KV (layer-pipelined push)
    get_finished(wait)             -> KVTransferResult: requests whose sends / loads completed
                                   (or failed) since the last call; carried back in RunnerOutput

The scheduler and runner always hold a connector object; without disaggregation it is the null
connector, whose methods do nothing and return "nothing remote". Hot paths therefore call the
connector unconditionally instead of branching on whether one exists.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Protocol


@dataclass
class LoadSpec:
    """Load the first `num_tokens` tokens of remote request `remote_request_id` (at the
    producer `remote_addr`) into `block_ids` (this instance's blocks of request `req_id`)."""
    req_id: str
    block_ids: list[int]
    num_tokens: int
    params: dict[str, Any]


@dataclass
class SaveSpec:
    """Serve the first `num_tokens` tokens of finished request `req_id` (held in `block_ids`)
    to one consumer, until `deadline` (time.monotonic() of the producer process)."""
    req_id: str
    block_ids: list[int]
    num_tokens: int
    deadline: float


@dataclass(eq=False)  # identity equality: the shared empty instance may be a field default
class KVConnectorMetadata:
    """Scheduler -> worker, per step. Plain data: it crosses process boundaries."""
    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)
    # kv_transfer_params of producers' requests this instance will not pull (everything was
    # a local prefix hit): tell those producers to free the blocks now, not at hold timeout.
    releases: list[dict] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.loads and not self.saves and not self.releases


EMPTY_METADATA = KVConnectorMetadata()  # shared, never mutated


@dataclass(eq=False)  # identity equality: the shared empty instance may be a field default
class KVTransferResult:
    """Worker -> scheduler, per step: transfers that ended since the last step."""
    finished_sending: set[str] = field(default_factory=set)   # blocks may be freed now
    finished_recving: set[str] = field(default_factory=set)   # KV is in the blocks
    failed_recving: dict[str, str] = field(default_factory=dict)  # req id -> why

    @property
    def empty(self) -> bool:
        return not (self.finished_sending or self.finished_recving or self.failed_recving)


class SchedulerConnector(Protocol):
    failure_policy: str

    def check_request(self, request) -> None: ...

    def get_num_new_matched_tokens(self, request, num_local_tokens: int) -> int: ...

    def load_finished(self, request_id: str) -> int: ...

    def update_state_after_alloc(self, request, block_ids: list[int], num_local_tokens: int,
                                 num_external_tokens: int) -> None: ...

    def build_connector_meta(self) -> KVConnectorMetadata: ...

    def request_finished(self, request, block_ids: list[int]) -> tuple[bool, Optional[dict]]: ...

    def has_pending_work(self) -> bool: ...

    def shutdown(self) -> None: ...


class WorkerConnector(Protocol):
    def register_kv_caches(self, kv_caches: list, layout) -> None: ...

    def start_load_kv(self, meta: KVConnectorMetadata) -> None: ...

    def wait_for_layer_load(self, layer_name: str) -> None: ...

    def save_kv_layer(self, layer_name: str, kv_cache, attn_metadata) -> None: ...

    def get_finished(self, wait: bool = False) -> KVTransferResult: ...

    def shutdown(self) -> None: ...


class NullSchedulerConnector:
    """No transfer: nothing is ever remote, nothing is ever held."""
    failure_policy = "recompute"

    def check_request(self, request) -> None:
        if request.kv_transfer_params:
            from kvflow.sampling_params import SamplingParamError
            raise SamplingParamError("kv_transfer_params", "kv_transfer_params: this instance "
                                     "was started without --kv-transfer-config")

    def get_num_new_matched_tokens(self, request, num_local_tokens: int) -> int:
        return 0

    def load_finished(self, request_id: str) -> int:
        return 0

    def update_state_after_alloc(self, request, block_ids, num_local_tokens,
                                 num_external_tokens) -> None:
        pass

    def build_connector_meta(self) -> KVConnectorMetadata:
        return EMPTY_METADATA

    def request_finished(self, request, block_ids) -> tuple[bool, Optional[dict]]:
        return False, None

    def has_pending_work(self) -> bool:
        return False

    def shutdown(self) -> None:
        pass


NO_RESULT = KVTransferResult()  # shared, never mutated


class NullWorkerConnector:
    def register_kv_caches(self, kv_caches, layout) -> None:
        pass

    def start_load_kv(self, meta: KVConnectorMetadata) -> None:
        pass

    def wait_for_layer_load(self, layer_name: str) -> None:
        pass

    def save_kv_layer(self, layer_name: str, kv_cache, attn_metadata) -> None:
        pass

    def get_finished(self, wait: bool = False) -> KVTransferResult:
        return NO_RESULT

    def shutdown(self) -> None:
        pass


NULL_WORKER_CONNECTOR = NullWorkerConnector()


def make_scheduler_connector(config) -> SchedulerConnector:
    """The scheduler half for an EngineConfig."""
    kt = config.kv_transfer
    if not kt.is_enabled:
        return NullSchedulerConnector()
    from kvflow.kv_transfer.p2p_connector import P2PSchedulerConnector
    return P2PSchedulerConnector(kt, config.cache.block_size)


def make_worker_connector(config) -> WorkerConnector:
    """The worker half for an EngineConfig (started once the KV cache exists)."""
    kt = config.kv_transfer
    if not kt.is_enabled:
        return NULL_WORKER_CONNECTOR
    from kvflow.kv_transfer.p2p_connector import P2PWorkerConnector
    return P2PWorkerConnector(kt, config.device)
