"""Elementwise ops with one dispatch point: fused Triton kernels on CUDA in eager mode, their
plain-torch references (kvflow/kernels/reference.py) everywhere else — on CPU, and under
torch.compile, where inductor fuses the torch ops itself. One definition of the arithmetic: the
references are what the kernels are tested against (fp32 compute, one rounding; identical to
HF transformers in fp32).
"""
from __future__ import annotations

import torch

from kvflow import kernels as _k
from kvflow.kernels import reference as _ref


def _use_kernels(x: torch.Tensor) -> bool:
    return _k.HAS_TRITON and x.is_cuda and not torch.compiler.is_compiling()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if _use_kernels(x):
        from kvflow.kernels.norm import rms_norm as kernel
        return kernel(x, weight, eps)
    return _ref.ref_rms_norm(x, weight, eps)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual)."""
    if _use_kernels(x):
        from kvflow.kernels.norm import fused_add_rms_norm as kernel
        return kernel(x, residual, weight, eps)
    return _ref.ref_fused_add_rms_norm(x, residual, weight, eps)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """[..., 2I] = gate | up -> silu(gate) * up [..., I]."""
    if _use_kernels(x):
        from kvflow.kernels.activation import silu_and_mul as kernel
        return kernel(x)
    return _ref.ref_silu_and_mul(x)


def rotary(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor,
           head_dim: int, is_neox: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary, in place, on q [T, H*D] and k [T, KV*D] (views into a fused qkv output are
    fine): neox pairs (i, i + D/2), or interleaved pairs (2i, 2i + 1) with is_neox=False (the
    complex-number form Llama 4 uses). Returns (q, k)."""
    t = q.shape[0]
    qv, kv = q.view(t, -1, head_dim), k.view(t, -1, head_dim)
    if _use_kernels(q):
        from kvflow.kernels.rotary import rotary_embedding as kernel
        kernel(positions, qv, kv, cos_sin_cache, is_neox)
    else:
        _ref.ref_rotary_embedding(positions, qv, kv, cos_sin_cache, is_neox)
    return q, k
