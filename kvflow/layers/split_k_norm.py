"""A row-parallel projection and the residual add + RMSNorm after it, with the split-K sum in
the norm.

At 64-384 rows cuBLAS runs Llama-3.1-8B's down projection (K = 14336) as a split-K GEMM whose
fp32 partials a reduce kernel of its own sums into the bf16 output; the norm kernel then reads
that output back. Here the K-slices are one batched product with fp32 outputs (torch.bmm
out_dtype, no copy of x or the weight: both are viewed as S slices of K), and the norm kernel
sums the S partials as it loads them, in slice order, rounding once as the product would
(kernels/norm.py fused_add_rms_norm_parts). One launch and one bf16 round trip fewer.
The arithmetic is the cuBLAS path's: fp32 accumulation, the sum rounded to the model's dtype,
then the residual add and the norm; only the order of the fp32 additions differs, as it does
between any two GEMM tilings.

Where it runs is measured, not guessed (the slices lose from ~448 rows and on shapes cuBLAS
does not split): the table `kvflow/kernels/configs/split_k_norm_<device>.json`
(layers/shape_tables.py), written by benchmarks/split_k_norm_tune.py, holds the slice count per
(N, K, M) where it beat the cuBLAS path by more than 3%; any other product keeps cuBLAS.
Both CUDA graph buckets and eager steps look their exact row count up. Measured: up to 11 us
a layer for Llama-3.1-8B's down projection at 224 rows, 0.4-2.5 us for every Qwen3-0.6B o /
down product (launch-bound), Qwen3-0.6B nanovllm +1.9% (docs/performance.md, session 33).
Off: CPU, fp32, torch.compile tracing, tensor parallelism (the partials would need their
all-reduce first), quantized or biased projections, and KVFLOW_SPLIT_K_NORM=0.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch

from kvflow import envs
from kvflow.distributed import get_tp_size
from kvflow.layers import shape_tables

if TYPE_CHECKING:  # pragma: no cover
    from kvflow.layers.linear import LinearBase
    from kvflow.layers.norm import RMSNorm

KIND = "split_k_norm"      # its table (layers/shape_tables.py): K-slices by (N, K, M)


def _device_ok(x: torch.Tensor) -> bool:
    """CUDA (tests point this at the interpreter's CPU tensors)."""
    return x.is_cuda


def _lookup(device: torch.device, n: int, k: int, m: int) -> Optional[int]:
    return shape_tables.lookup(KIND, device, n, k, m)


def slices(layer: "LinearBase", x: torch.Tensor, m: int) -> int:
    """K-slices for `layer`'s product on the m rows of x (its input, or gate | up that the
    activation turns into it) followed by an add + norm; 1: the product as it runs alone."""
    # Quantized layers (GPTQ) hold no `weight`: checked first.
    if (layer.quant_method is not None or not _device_ok(x)
            or x.dtype not in shape_tables.DTYPES or layer.weight.dtype != x.dtype
            or layer.bias is not None
            or torch.compiler.is_compiling() or get_tp_size() > 1 or not envs.split_k_norm()):
        return 1
    n, k = layer.weight.shape
    return _lookup(x.device, n, k, m) or 1


def linear_add_norm(x: torch.Tensor, weight: torch.Tensor, s: int, residual: torch.Tensor,
                    norm: "RMSNorm") -> tuple[torch.Tensor, torch.Tensor]:
    """norm(x @ weight^T + residual) and the new residual (x [..., K], weight [N, K] with S | K,
    residual [..., N]), the product as S fp32 K-slice partials summed by the norm kernel."""
    from kvflow.kernels.norm import fused_add_rms_norm_parts
    n, k = weight.shape
    assert k % s == 0 and weight.stride(1) == 1, (weight.shape, s)
    x2 = x.reshape(-1, k)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    m, ks = x2.shape[0], k // s
    xs = x2.view(m, s, ks).transpose(0, 1)                 # [S, M, K/S]
    ws = weight.view(n, s, ks).permute(1, 2, 0)            # [S, K/S, N]
    if x.is_cuda:
        parts = torch.bmm(xs, ws, out_dtype=torch.float32)     # [S, M, N]
    else:   # out_dtype is CUDA-only; the same fp32 sums (interpreter tests)
        parts = torch.bmm(xs.float(), ws.float())
    normed, new_res = fused_add_rms_norm_parts(parts, residual.reshape(m, n), norm.weight,
                                               norm.eps)
    shape = (*x.shape[:-1], n)
    return normed.view(shape), new_res.view(shape)
