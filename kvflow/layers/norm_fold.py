"""Residual add + RMSNorm folded into the two skinny GEMMs around it (decode).

At decode batch sizes a decoder layer's two RMSNorms are their own launches of ~2.7 us each on
the critical path (Llama-3.1-8B, H200, PDL on: 0.17 ms of a 4.3 ms step), for 8 KB of work. When
the product before the norm (o_proj, down_proj) and the one after it (qkv_proj, gate_up_proj)
both run as single-split skinny GEMMs, the norm's work moves into their epilogues
(kernels/skinny_gemm.py, FoldedNorm):

  producer   y = x @ W^T;  h = round(y + residual) (the new residual stream, exactly the norm
             kernel's); out = round(h * g); sq[row, program] = sum of h^2 over its columns
  consumer   round(rsqrt(sum(sq[row]) / H + eps) * (out @ W'^T) (+ bias))

No launch and no extra pass over anything: the producer already holds its outputs, the
consumer loads one [M, programs] fp32 row right after its PDL wait. One rounding moves (the unfused norm
rounds h * rstd, then * g, before the product), well inside bf16's tolerance
(tests/test_norm_fold.py). The residual stream is bit-identical.

The handoff between the two is a `NormedHidden` in place of the normalised tensor. The
producer decides (`fold_ok`) for both halves, knowing its consumer; any other reader can still
`materialize()` the ordinary norm output (from h, bit-identical to the unfused path). Off: CPU,
fp32, torch.compile tracing, tensor parallelism (the producer's partial sums need their
all-reduce first), quantized or biased producers, products without a single-split tuned
config, consumers in the tensor-core form (`skinny_gemm.foldable`: Llama-3.1-8B's gate/up
product, so only its input norms fold), and KVFLOW_NORM_FOLD=0.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch

from kvflow import envs
from kvflow.layers import ops

if TYPE_CHECKING:  # pragma: no cover
    from kvflow.kernels.skinny_gemm import FoldedNorm
    from kvflow.layers.linear import LinearBase
    from kvflow.layers.norm import RMSNorm

_DTYPES = (torch.float16, torch.bfloat16)


@dataclass
class NormedHidden:
    """A hidden state that the next layer's input norm has already been applied to, by the
    projection before it. Folded (`fold` set): `hg` = round(h * g) [T, H], not yet scaled, and
    `fold` carries the row sums of h^2 for the epilogue of `consumer`, the one layer `fold_ok`
    approved. Unfolded (`fold` None): `hg` is the norm's ordinary output. `h` is the residual
    stream either way."""
    hg: torch.Tensor
    h: torch.Tensor
    norm: "RMSNorm"
    fold: "Optional[FoldedNorm]" = None
    consumer: "Optional[LinearBase]" = None

    def materialize(self) -> torch.Tensor:
        """The ordinary norm output (folded: recomputed from the same h, as the unfused path
        computes it)."""
        if self.fold is None:
            return self.hg
        return ops.rms_norm(self.h, self.norm.weight, self.norm.eps)


def _device_ok(x: torch.Tensor) -> bool:
    """The skinny GEMM's device (CUDA; tests put the interpreter's CPU tensors here)."""
    return x.is_cuda


def _foldable(layer: "LinearBase", x: torch.Tensor, m: int, consumer: bool) -> bool:
    """Whether `layer` (unquantized, skinny GEMM on, weight of x's dtype) can be the producer
    or the consumer half on an m-row input on x's device. Triton is known to be there."""
    if layer.quant_method is not None or not layer.skinny_gemm:
        return False        # first: a quantized layer has no `weight` (GPTQ: qweight, scales)
    w = layer.weight
    if w.dtype != x.dtype or w.stride(-1) != 1:
        return False
    from kvflow.kernels import skinny_gemm as sg
    return sg.foldable(m, w.shape[0], w.shape[1], x.device, consumer=consumer)


def fold_ok(x: torch.Tensor, producer: "LinearBase", consumer: "LinearBase",
            silu_mul_input: bool) -> bool:
    """Whether producer(x) -> add + norm -> consumer can run folded (see the module doc)."""
    from kvflow import kernels
    from kvflow.distributed import get_tp_size
    if not kernels.HAS_TRITON:
        return False
    # The consumer half must run the GEMV form (skinny_gemm.foldable), which takes at most
    # GEMV_MAX_M rows.
    from kvflow.kernels.skinny_gemm import GEMV_MAX_M
    # Never under torch.compile (checked before anything reads the token count, which is an
    # unbacked symbol there: comparing it would force the compile off its one-graph-for-every-T
    # trace). Then prefill-sized batches, the cheapest rejection.
    if torch.compiler.is_compiling():
        return False
    m = x.numel() // x.shape[-1]
    if m > GEMV_MAX_M:
        return False
    if not (envs.norm_fold() and _device_ok(x) and x.dtype in _DTYPES and get_tp_size() == 1
            and producer.bias is None and (not silu_mul_input or producer.skinny_silu_mul)):
        return False
    return _foldable(producer, x, m, consumer=False) and _foldable(consumer, x, m, consumer=True)
