"""The attention layer models use. It knows heads and scale only; the backend implementation
and the KV cache tensor are bound by the model runner after the model is built."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from kvflow.attention.backend import AttentionImpl
from kvflow.forward_context import get_forward_context


class Attention(nn.Module):
    def __init__(self, num_heads: int, head_dim: int, scale: float, num_kv_heads: int,
                 local_attention_chunk: Optional[int] = None):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.scale = scale
        self.num_kv_heads = num_kv_heads
        self.local_attention_chunk = local_attention_chunk
        self.impl: Optional[AttentionImpl] = None
        # [2, num_blocks, block_size, num_kv_heads, head_dim]; bound by the runner.
        self.kv_cache: Optional[torch.Tensor] = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [T, H*D], k/v [T, KV*D] -> [T, H*D]."""
        md = get_forward_context().attn_metadata
        t = q.shape[0]
        out = self.impl.forward(q.view(t, self.num_heads, self.head_dim),
                                k.view(t, self.num_kv_heads, self.head_dim),
                                v.view(t, self.num_kv_heads, self.head_dim),
                                self.kv_cache, md)
        return out.view(t, self.num_heads * self.head_dim)
