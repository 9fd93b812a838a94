"""Launch a pipelined Triton kernel with as many stages as fit the GPU's shared memory.

How much shared memory a pipeline stage takes depends on more than the tile a config names (the
dtype, gathers the kernel does per stage, a tile held across the loop, the GPU's opt-in limit),
so a tuned `num_stages` can be too many on another GPU, dtype or variant. Instead of predicting
it, the first launch of each variant drops stages until the kernel compiles, and the count that
fit is remembered for that variant (compilation, not the launch, raises OutOfResources, so
nothing has run when it is retried).
"""
from __future__ import annotations

from typing import Any, Hashable

import triton

_STAGES_THAT_FIT: dict = {}   # (kernel name, variant key) -> num_stages that compiled


def launch_fitting_stages(kernel, grid, key: Hashable, num_stages: int, *args: Any,
                          **kwargs: Any) -> int:
    """kernel[grid](*args, num_stages=n, **kwargs) with the largest n <= num_stages that fits;
    `key` names the variant (everything besides the grid that changes the compiled kernel).
    Returns the stage count used."""
    fit_key = (getattr(kernel, "__name__", repr(kernel)), key, num_stages)
    n = _STAGES_THAT_FIT.get(fit_key, num_stages)
    while True:
        try:
            kernel[grid](*args, num_stages=n, **kwargs)
            return n
        except triton.runtime.errors.OutOfResources:
            if n <= 1:
                raise
            n -= 1
            _STAGES_THAT_FIT[fit_key] = n
