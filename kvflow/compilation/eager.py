"""`eager_only`: torch.compiler.disable without importing torch.compile's stack at startup.

torch.compiler.disable imports torch._dynamo when it decorates (0.8 s on the CI host, ~1.9 s
of the 8B model's warm ready time on the H200's host), and kernels decorate at import, so
every engine start paid for the compiler even with compilation off (the default). eager_only
returns the function itself until dynamo is loaded; `compile.py` calls `disable_registered()`
when it is imported, before anything is traced, and a function decorated after that is
disabled at once. Invariant: whenever dynamo can trace, every eager_only function is a
torch.compiler.disable'd one, so what dynamo sees is the same as with the plain decorator.
"""
from __future__ import annotations

import functools
import sys
from typing import Callable

_registered: list[list[Callable]] = []  # [original, current]: current is what a call runs


def _dynamo_loaded() -> bool:
    return "torch._dynamo" in sys.modules


def eager_only(fn: Callable) -> Callable:
    """Decorator: `fn` is never traced by torch.compile (a graph break that runs it eagerly)."""
    if _dynamo_loaded():
        import torch
        return torch.compiler.disable(fn)
    slot = [fn, fn]
    _registered.append(slot)

    @functools.wraps(fn)
    def call(*args, **kwargs):
        return slot[1](*args, **kwargs)
    return call


def disable_registered() -> None:
    """Make every eager_only function a torch.compiler.disable'd one (idempotent)."""
    import torch
    for slot in _registered:
        if slot[1] is slot[0]:
            slot[1] = torch.compiler.disable(slot[0])
