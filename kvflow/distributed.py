"""Tensor-parallel group state. Single-process today (world size 1); the multi-process executor
sets the rank and size before building the model, and layers read them here."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class _TPState:
    rank: int = 0
    size: int = 1
    group: object = None


_TP = _TPState()


def get_tp_rank() -> int:
    return _TP.rank


def get_tp_size() -> int:
    return _TP.size


def set_tp(rank: int, size: int, group=None) -> None:
    _TP.rank, _TP.size, _TP.group = rank, size, group


def tp_all_reduce(x: torch.Tensor) -> torch.Tensor:
    if _TP.size == 1:
        return x
    torch.distributed.all_reduce(x, group=_TP.group)
    return x


def tp_all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    if _TP.size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_TP.size)]
    torch.distributed.all_gather(parts, x.contiguous(), group=_TP.group)
    return torch.cat(parts, dim=dim)
