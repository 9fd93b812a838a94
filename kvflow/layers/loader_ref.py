"""The weight_loader a parameter carries, without a reference cycle through its module.

A parameter that stores its module's bound `weight_loader` closes a cycle (parameter -> bound
method -> module -> parameter), so a dropped model is freed only by the cyclic garbage
collector. After startup kvflow freezes the collector's heap (kvflow/gc_heap.py): frozen
objects are never collected, and a dropped engine would keep its weights (gigabytes of device
memory) forever. The loader therefore refers to its module weakly; the model is then freed by
reference counting as soon as the last reference to it goes.
"""
from __future__ import annotations

import weakref
from typing import Callable

from torch import nn


class ModuleLoader:
    """Calls func(module, param, loaded, *shard) while `module` is alive."""

    __slots__ = ("_module", "_func")

    def __init__(self, module: nn.Module, func: Callable):
        self._module = weakref.ref(module)
        self._func = func

    def __call__(self, param, loaded, *shard):
        module = self._module()
        if module is None:
            raise RuntimeError("weight_loader: the module owning this parameter no longer exists")
        return self._func(module, param, loaded, *shard)


def weight_loader_of(module: nn.Module) -> ModuleLoader:
    """The module's own (most derived) `weight_loader` method, as a parameter's loader."""
    return ModuleLoader(module, type(module).weight_loader)
