"""Vocabulary-parallel embedding and LM head: each tensor-parallel rank holds a contiguous slice of
the vocabulary (padded so slices are equal)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from kvflow import envs
from kvflow.distributed import get_tp_rank, get_tp_size, tp_all_gather, tp_all_reduce
from kvflow.layers.linear import dense_linear
from kvflow.layers.loader_ref import weight_loader_of

_PAD_TO = 64


def _shard_range(vocab_size: int) -> tuple[int, int, int]:
    tp = get_tp_size()
    padded = -(-vocab_size // (_PAD_TO * tp)) * _PAD_TO * tp if tp > 1 else vocab_size
    per_rank = padded // tp
    start = get_tp_rank() * per_rank
    return start, start + per_rank, per_rank


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__()
        self.vocab_size = vocab_size
        self.start, self.end, per_rank = _shard_range(vocab_size)
        self.weight = nn.Parameter(torch.empty(per_rank, hidden_size), requires_grad=False)
        self.weight.weight_loader = weight_loader_of(self)

    def weight_loader(self, param, loaded, shard_id=None):
        # A rank whose slice lies entirely in the padding (tiny vocab, many ranks) holds no
        # real rows: clamp at 0, or the slice below would count from the end.
        rows = max(min(self.end, self.vocab_size) - self.start, 0)
        if loaded.shape[0] != self.vocab_size or loaded.shape[1] != param.shape[1]:
            raise ValueError(f"embedding shape mismatch: expected ({self.vocab_size}, {param.shape[1]}), "
                             f"checkpoint {tuple(loaded.shape)}")
        param.data[:rows].copy_(loaded[self.start:self.start + rows])
        param.data[rows:].zero_()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if get_tp_size() == 1:
            return F.embedding(input_ids, self.weight)
        mask = (input_ids < self.start) | (input_ids >= self.end)
        local = (input_ids - self.start).masked_fill(mask, 0)
        out = F.embedding(local, self.weight).masked_fill(mask.unsqueeze(-1), 0)
        return tp_all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """Projects hidden states to logits over the full vocabulary (gathered across ranks)."""

    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__(vocab_size, hidden_size)
        self.skinny_gemm = envs.skinny_gemm()

    def compute_logits(self, hidden: torch.Tensor,
                       out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """hidden [N, hidden] -> logits [N, vocab] in hidden's dtype. out: a contiguous
        [N, vocab] buffer of that dtype to write into (the decode graphs'). On one rank over
        an unpadded vocabulary the product writes there itself (dense_linear's out: cuBLAS
        writes it directly): at 1024 rows x 152K, 311 MB not written and read again by a copy,
        each decode step."""
        if out is not None and get_tp_size() == 1 and self.weight.shape[0] == self.vocab_size:
            return dense_linear(hidden, self.weight, None, self.skinny_gemm, out=out)
        logits = dense_linear(hidden, self.weight, None, self.skinny_gemm)  # [N, vocab/tp]
        logits = tp_all_gather(logits, dim=-1)[..., :self.vocab_size]
        return logits if out is None else out.copy_(logits)
