"""Ticket counters: the shared state of "the last program to arrive finishes the job" kernels
(the split-KV attention merge, the fused router's expert slices).

A kernel's programs each bump a counter (an acq_rel atomic after their partial results are
stored); the one that draws the last ticket combines the partials and resets the counter to 0,
so a buffer is always zero between launches and a CUDA graph can replay it. One buffer per
device and user, shared by all launches of that user: kvflow runs the model on one stream (a
graph replays on it too), so no two launches use a buffer at once.

Allocation happens outside CUDA-graph capture only: allocated while capturing, its zero-fill
would not run until replay and the buffer would belong to the graph's pool. A buffer that grows
is retired, never freed: a graph captured earlier keeps its address (and it stays zero).
`DeviceBuffers` is that mechanism for any int32 contents made at allocation (the decode
attention's identity request orders, kernels/decode_order.py, are its other user).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton

from kvflow.kernels.device import cuda_index


class DeviceBuffers:
    """One int32 buffer per device, made by `make(size, dtype=, device=)` (torch.zeros,
    torch.arange), grown outside CUDA-graph capture only, never freed once replaced."""

    def __init__(self, min_size: int, make=torch.zeros):
        self.min_size = min_size
        self.make = make
        self.buffers: dict[tuple[str, Optional[int]], torch.Tensor] = {}
        self.retired: list[torch.Tensor] = []

    def get(self, device: torch.device, n: int) -> Optional[torch.Tensor]:
        """The device's buffer of >= n elements; None when that would need an allocation
        during CUDA-graph capture (the caller falls back or explains)."""
        # "cuda" and "cuda:0" are one buffer
        key = (device.type, cuda_index(device) if device.type == "cuda" else device.index)
        buf = self.buffers.get(key)
        if buf is None or buf.numel() < n:
            if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                return None
            if buf is not None:
                self.retired.append(buf)
            buf = self.make(max(self.min_size, triton.next_power_of_2(n)), dtype=torch.int32,
                            device=device)
            self.buffers[key] = buf
        return buf


class TicketCounters(DeviceBuffers):
    """Zero-filled counters (the module docstring)."""

    def __init__(self, min_size: int):
        super().__init__(min_size, torch.zeros)
