from __future__ import annotations

import torch
from torch import nn

from kvflow.layers import ops


class SiluAndMul(nn.Module):
    """x: [..., 2 * I] = gate | up  ->  silu(gate) * up: [..., I]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.silu_and_mul(x)
