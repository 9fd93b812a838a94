"""Single-process executor: the driver runs the one worker in-process."""
from __future__ import annotations

from kvflow.config import EngineConfig
from kvflow.core.sched_output import RunnerOutput, SchedulerOutput
from kvflow.worker.worker import MemoryPlan, Worker


class UniProcExecutor:
    def __init__(self, config: EngineConfig, attention_backend: str | None = None):
        self.worker = Worker(config, attention_backend)

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

    def check_health(self) -> None:
        pass

    def shutdown(self) -> None:
        pass
