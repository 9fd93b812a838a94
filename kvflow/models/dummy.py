"""Dummy weights (`load_format="dummy"`) that do not depend on how the model is split.

Invariant: for a given (seed, parameter name) every configuration — one GPU, TP=2, TP=2 with
expert parallel, any rank — ends up with the values a real checkpoint holding the same full
tensors would give it. So dummy-weight runs of different parallel layouts are comparable token
for token (benchmarks/parallel_check.py relies on this).

How: the model is also built on the `meta` device as if it ran on one rank
(`single_rank_view`), which gives every parameter's full, unsharded shape without memory (on
one rank the model itself is that view, and no second build is made). Each
full tensor is generated from a generator seeded by (seed, parameter name) — never from a
shared stream, whose position would depend on the shapes generated before — on the parameter's
device (fast for large models), then cut into checkpoint pieces (q/k/v, gate/up, one per expert)
and handed to the real parameter's own weight_loader, exactly as a checkpoint would be. Values
agree across configurations on the same device type (CPU and CUDA generators differ).

Value distributions (KVFLOW_DUMMY_WEIGHTS):
- "uniform" (default): every floating parameter U(-1e-3, 1e-3), like vLLM. Cheap and fine for
  speed, but the model is nearly constant: logits differ by ~1e-5, so its greedy tokens are
  decided by rounding noise and are no test of correctness.
- "scaled": matrices U(-a, a) with a = sqrt(3 / fan_in) (unit-variance activations), norm
  weights 1 + U(-0.1, 0.1), biases U(-0.02, 0.02). Logits have a spread of order 1 and routers
  pick experts decisively, so comparing greedy tokens across parallel layouts is meaningful.

Quantized layers (GPTQ) keep per-rank random floating parameters (scales): their values are
not layout-invariant, which is irrelevant for the speed runs they are used in.
"""
from __future__ import annotations

import hashlib
import math
from typing import Iterator

import torch
from torch import nn

from kvflow import envs
from kvflow.distributed import get_tp_size, single_rank_view
from kvflow.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, default_weight_loader
from kvflow.layers.moe import FusedMoE

MODES = ("uniform", "scaled")


def param_seed(seed: int, name: str) -> int:
    digest = hashlib.blake2b(f"{seed}/{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _bounds(name: str, shape: tuple[int, ...], mode: str) -> tuple[float, float]:
    if mode == "uniform":
        return -1e-3, 1e-3
    if len(shape) == 1:
        if "norm" in name:
            return 0.9, 1.1
        return -0.02, 0.02
    a = math.sqrt(3.0 / shape[-1])          # weights are [..., out, in]: fan_in is the last dim
    return -a, a


def full_tensor(name: str, shape, seed: int, device: torch.device, dtype: torch.dtype,
                mode: str) -> torch.Tensor:
    lo, hi = _bounds(name, tuple(shape), mode)
    gen = torch.Generator(device=device).manual_seed(param_seed(seed, name))
    return torch.empty(tuple(shape), dtype=dtype, device=device).uniform_(lo, hi, generator=gen)


def checkpoint_pieces(module: nn.Module, attr: str, full: torch.Tensor
                      ) -> Iterator[tuple[torch.Tensor, object]]:
    """(tensor, shard id) pieces of one full parameter, as a checkpoint would store them;
    `module` is the single-rank (meta) module that owns it."""
    if isinstance(module, QKVParallelLinear):
        q, k, v = full.split([module.q_size, module.kv_size, module.kv_size], dim=0)
        yield from ((q, "q"), (k, "k"), (v, "v"))
    elif isinstance(module, MergedColumnParallelLinear):
        yield from ((t, i) for i, t in enumerate(full.split(module.output_sizes, dim=0)))
    elif isinstance(module, FusedMoE):
        for e in range(full.shape[0]):
            if attr == "w13":
                gate, up = full[e].split(module.intermediate, dim=0)
                yield gate, (e, "w1")
                yield up, (e, "w3")
            else:
                yield full[e], (e, "w2")
    else:
        yield full, None


def init_dummy_weights(model: nn.Module, seed: int) -> None:
    mode = envs.dummy_weights_mode()
    if mode not in MODES:
        raise ValueError(f"KVFLOW_DUMMY_WEIGHTS must be one of {list(MODES)}, got {mode!r}")
    params = dict(model.named_parameters())
    if get_tp_size() == 1:
        reference = model   # already its own single-rank view: no second build
    else:
        with single_rank_view(), torch.device("meta"):
            reference = type(model)(model.config)
    written: set[str] = set()
    for mod_name, module in reference.named_modules():
        quantized = getattr(module, "quant_method", None) is not None
        for attr, meta in module.named_parameters(recurse=False):
            name = f"{mod_name}.{attr}" if mod_name else attr
            p = params.get(name)
            if p is None or name in written or not p.is_floating_point():
                continue   # a tied alias, or quantized codes (created valid)
            written.add(name)
            if quantized:   # per-rank values (module docstring)
                p.data.copy_(full_tensor(name, p.shape, seed, p.device, p.dtype, mode))
                continue
            full = full_tensor(name, meta.shape, seed, p.device, p.dtype, mode)
            loader = getattr(p, "weight_loader", default_weight_loader)
            for piece, shard in checkpoint_pieces(module, attr, full):
                loader(p, piece, shard) if shard is not None else loader(p, piece)
            del full
    unwritten = [n for n, p in params.items() if p.is_floating_point() and n not in written]
    if unwritten:   # a parameter the single-rank build does not have: never leave it garbage
        raise RuntimeError(f"dummy weights: no single-rank counterpart for {unwritten[:5]}")
