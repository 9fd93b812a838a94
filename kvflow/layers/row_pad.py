"""A product run at more rows than it has, where cuBLAS is faster there.

cuBLAS picks its kernel by the problem's shape, and at some row counts the pick is poor:
Llama-3.1-8B's gate|up product (N = 28672, K = 4096) takes 266-272 us at 448 rows and 154-162
at 456-512 (two H200 hosts, alone; benchmarks/results/split-k-norm-s33/), a quarter of a
448-token mixed step. Here x is copied into the first M rows of an M'-row buffer (the pad rows
are left as they are: a product's rows are independent, and theirs are dropped) and the
product's first M rows are returned, a view of contiguous rows.

Where it runs is measured: the table `kvflow/kernels/configs/row_pad_<device>.json`
(layers/shape_tables.py), written by benchmarks/row_pad_tune.py, holds M' per (N, K, M) where
the copy plus the padded product beat the plain one by more than 10% (smaller differences
move with the host and with what ran before: q|k|v at 320 rows reads 27-33 us with one
kernel, and padding it was level in the engine). Off: CPU, fp32, torch.compile
tracing (the row count is symbolic there), products written into a caller's `out`, and
KVFLOW_ROW_PAD=0.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from kvflow import envs
from kvflow.layers import shape_tables

KIND = "row_pad"      # its table (layers/shape_tables.py): rows to run at, by (N, K, M)


def padded_rows(x2: torch.Tensor, weight: torch.Tensor) -> Optional[int]:
    """M' > M for the product of x2 [M, K] and weight [N, K] where the table has one."""
    if (not x2.is_cuda or x2.dtype not in shape_tables.DTYPES
            or torch.compiler.is_compiling() or not envs.row_pad()):
        return None
    n, k = weight.shape
    return shape_tables.lookup(KIND, x2.device, n, k, x2.shape[0])


def linear_padded(x2: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                  rows: int) -> torch.Tensor:
    """F.linear(x2, weight, bias) ([M, K] -> [M, N]), computed at `rows` >= M rows."""
    m = x2.shape[0]
    xp = x2.new_empty((rows, x2.shape[1]))
    xp[:m].copy_(x2)
    return F.linear(xp, weight, bias)[:m]
