"""Elementwise ops with one dispatch point: fused Triton kernels on CUDA in eager mode, plain
torch everywhere else (CPU, and under torch.compile, where inductor fuses the torch ops itself).

Each torch path is the reference the kernels are tested against (kvflow/kernels/reference.py
holds the same arithmetic); both follow HF's rounding.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    from kvflow import kernels as _k
    _HAS_TRITON = _k.HAS_TRITON
except ImportError:  # pragma: no cover - kernels always import; triton may not
    _HAS_TRITON = False


def _use_kernels(x: torch.Tensor) -> bool:
    return _HAS_TRITON and x.is_cuda and not torch.compiler.is_compiling()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if _use_kernels(x):
        from kvflow.kernels.norm import rms_norm as kernel
        return kernel(x, weight, eps)
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual)."""
    if _use_kernels(x):
        from kvflow.kernels.norm import fused_add_rms_norm as kernel
        return kernel(x, residual, weight, eps)
    x = x + residual
    return rms_norm(x, weight, eps), x


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """[..., 2I] = gate | up -> silu(gate) * up [..., I]."""
    if _use_kernels(x):
        from kvflow.kernels.activation import silu_and_mul as kernel
        return kernel(x)
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def rotary(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor,
           head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Neox-style rotary on q [T, H*D] and k [T, KV*D] (views into a fused qkv output are fine).
    The kernel path rotates in place; the torch path returns new tensors."""
    t = q.shape[0]
    if _use_kernels(q):
        from kvflow.kernels.rotary import rotary_embedding as kernel
        kernel(positions, q.view(t, -1, head_dim), k.view(t, -1, head_dim), cos_sin_cache)
        return q, k
    cos, sin = cos_sin_cache.index_select(0, positions).chunk(2, dim=-1)  # [T, rot/2] each
    return _rotate(q, cos, sin, head_dim), _rotate(k, cos, sin, head_dim)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_dim: int) -> torch.Tensor:
    shape = x.shape
    x = x.reshape(shape[0], -1, head_dim)                          # [T, H, D]
    rot_dim = cos.shape[-1] * 2
    rot, rest = x[..., :rot_dim], x[..., rot_dim:]
    x1, x2 = rot.chunk(2, dim=-1)
    # HF casts cos/sin to the activation dtype before multiplying; do the same.
    c = torch.cat([cos, cos], -1).unsqueeze(1).to(x.dtype)
    s = torch.cat([sin, sin], -1).unsqueeze(1).to(x.dtype)
    rotated = rot * c + torch.cat([-x2, x1], dim=-1) * s
    out = rotated if rest.shape[-1] == 0 else torch.cat([rotated, rest], dim=-1)
    return out.reshape(shape)
