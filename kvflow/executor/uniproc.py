"""Single-process executor: the driver runs the one worker in-process."""
from __future__ import annotations

from kvflow.config import EngineConfig
from kvflow.core.sched_output import RunnerOutput, SchedulerOutput
from kvflow.worker.worker import MemoryPlan, Worker


class UniProcExecutor:
    def __init__(self, config: EngineConfig, attention_backend: str | None = None):
        self.worker = Worker(config, attention_backend)

    @property
    def timings(self) -> dict[str, float]:
        return self.worker.timings

    def plan_memory(self) -> MemoryPlan:
        return self.worker.plan_memory()

    def initialize_cache(self, num_blocks: int) -> None:
        self.worker.initialize_cache(num_blocks)

    def execute_model(self, so: SchedulerOutput) -> RunnerOutput:
        return self.worker.execute_model(so)

    def launch(self, so: SchedulerOutput):
        return self.worker.runner.launch(so)

    def resolve(self, handle) -> RunnerOutput:
        return self.worker.runner.resolve(handle)

    def memory_stats(self, reset: bool = False) -> list[dict[str, int]]:
        """The worker's device memory peaks, as a one-rank list (see RankedExecutor)."""
        return [self.worker.memory_stats(reset)]

    # Sleep mode (kvflow/worker/sleep.py); a multi-process executor broadcasts these.
    def sleep(self, level: int) -> int:
        return self.worker.sleeper.sleep(level)

    def wake_up(self, tags=None) -> None:
        self.worker.sleeper.wake_up(tags)

    def reload_weights(self, weights=None) -> int:
        return self.worker.sleeper.reload_weights(weights)

    def serving_error(self):
        return self.worker.sleeper.serving_error()

    def is_sleeping(self) -> bool:
        return self.worker.sleeper.is_sleeping

    def check_health(self) -> None:
        pass

    def shutdown(self) -> None:
        self.worker.runner.kv_connector.shutdown()
