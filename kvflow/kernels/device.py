"""The CUDA device facts kernels choose configurations by, read once per device.

`torch.device("cuda")` has no index (it means the current device); tensors always carry one.
`cuda_index` resolves both to the same number, so caches keyed by it never split one GPU in two.
"""
from __future__ import annotations

import functools
import os

import torch


def cuda_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.lru_cache(maxsize=None)
def _properties(index: int):
    return torch.cuda.get_device_properties(index)


def device_properties(device: torch.device):
    """torch.cuda.get_device_properties of a CUDA device (name, multi_processor_count, major,
    minor, shared_memory_per_block_optin, ...), cached."""
    return _properties(cuda_index(device))


def triton_runs_on(device: torch.device) -> bool:
    """Whether a Triton kernel can launch on tensors of `device`: CUDA, or any device under
    the CPU interpreter (TRITON_INTERPRET=1, the kernel tests). Wrappers with a torch fallback
    for other devices take it when this is False."""
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
