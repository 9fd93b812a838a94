"""Tensor-parallel group state. World size 1 in a single process; the multi-process executor
(kvflow/executor/multiproc.py) calls `init_tp_group` in each worker BEFORE the model is built,
because layers read the rank and size at construction time to size their shards.

Invariant: every rank of the group calls the collectives below in the same order with tensors
of the same shape (the model is identical on all ranks and every rank runs every step).

Expert parallelism (`enable_expert_parallel`) reuses the same group: kvflow has no data
parallelism, so the EP ranks are exactly the TP ranks (vLLM's ep_size = tp_size * dp_size with
dp_size = 1). With EP on, MoE layers read `get_ep_rank/get_ep_size` to pick whole experts and keep
each expert unsharded (`get_moe_tp_size` = 1); without it EP size is 1 and experts are TP-sharded.
Attention and dense layers always use the TP rank/size.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import socket
from dataclasses import dataclass

import torch


@dataclass
class _TPState:
    rank: int = 0
    size: int = 1
    group: object = None
    expert_parallel: bool = False


_TP = _TPState()


def get_tp_rank() -> int:
    return _TP.rank


def get_tp_size() -> int:
    return _TP.size


def get_ep_rank() -> int:
    """Rank among the expert-parallel ranks (0 when EP is off)."""
    return _TP.rank if _TP.expert_parallel else 0


def get_ep_size() -> int:
    """How many ranks share out the experts (1 when EP is off: every rank holds every expert)."""
    return _TP.size if _TP.expert_parallel else 1


def get_moe_tp_rank() -> int:
    """Rank along which each expert's intermediate dim is sharded (0 under EP: experts whole)."""
    return 0 if _TP.expert_parallel else _TP.rank


def get_moe_tp_size() -> int:
    return 1 if _TP.expert_parallel else _TP.size


def set_tp(rank: int, size: int, group=None, expert_parallel: bool = False) -> None:
    _TP.rank, _TP.size, _TP.group = rank, size, group
    _TP.expert_parallel = bool(expert_parallel)


@contextlib.contextmanager
def single_rank_view():
    """Layers built inside see one rank and no EP (their full, unsharded shapes), e.g. to
    describe a model's checkpoint-shaped tensors. No collective may run inside."""
    saved = dataclasses.replace(_TP)
    set_tp(0, 1)
    try:
        yield
    finally:
        set_tp(saved.rank, saved.size, saved.group, saved.expert_parallel)


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


# ---------------------------------------------------------------------------------- setup
def free_tcp_port() -> int:
    """A port free right now on the loopback interface (the rendezvous of one engine's ranks)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_tp_group(rank: int, size: int, init_method: str, device: torch.device,
                  timeout_s: float = 600.0, expert_parallel: bool = False) -> None:
    """Join the process group (NCCL on CUDA, gloo on CPU) and make it the TP (and EP) group."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "gloo":
        # All ranks live on one host: keep gloo on loopback whatever the hostname resolves to.
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.distributed.init_process_group(
        backend, init_method=init_method, rank=rank, world_size=size,
        timeout=datetime.timedelta(seconds=timeout_s),
        **({"device_id": device} if device.type == "cuda" else {}))
    set_tp(rank, size, torch.distributed.group.WORLD, expert_parallel)


def destroy_tp_group() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    set_tp(0, 1, None)
