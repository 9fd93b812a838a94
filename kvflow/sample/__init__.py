"""Batched token sampling: SamplingMetadata.build(...) once per step, then Sampler()(logits, meta)."""
from kvflow.sample.logprobs import LogprobsTensors, compute_topk_logprobs
from kvflow.sample.metadata import SamplingMetadata
from kvflow.sample.sampler import Sampler, SamplerOutput

__all__ = [
    "LogprobsTensors",
    "Sampler",
    "SamplerOutput",
    "SamplingMetadata",
    "compute_topk_logprobs",
]
