"""Logprobs of chosen tokens plus the top-k alternatives, for sampled and prompt tokens.

Logprobs are always taken from the RAW model distribution (log_softmax of the float32 logits
before min_tokens / logit_bias / penalties / temperature / truncation), which is vLLM's default
("raw_logprobs"). The runner uses `compute_topk_logprobs` directly for prompt logprobs.
"""
from __future__ import annotations

from typing import NamedTuple

import torch


class LogprobsTensors(NamedTuple):
    """Per-row logprobs. Column 0 is the chosen token, columns 1..K the top-K (descending).

    A row that asked for k < K alternatives keeps columns [0, k] and ignores the rest.
    The chosen token may also appear among the top-K columns (output processing merges it).
    """

    token_ids: torch.Tensor  # [N, K+1] int64
    logprobs: torch.Tensor  # [N, K+1] float32
    ranks: torch.Tensor  # [N] int64, 1-based rank of the chosen token

    def tolists(self) -> tuple[list[list[int]], list[list[float]], list[int]]:
        """Host copies as Python lists: one device->host transfer per tensor."""
        return (self.token_ids.tolist(), self.logprobs.tolist(), self.ranks.tolist())


def compute_topk_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, k: int) -> LogprobsTensors:
    """Logprob and rank of `token_ids[i]` in row i of `logits`, plus the row's top-k logprobs.

    logits:    [N, V] any float dtype (upcast to float32; never modified).
    token_ids: [N] integer, each in [0, V).
    k:         number of alternatives (>= 0); clipped to V.

    Rank follows vLLM: the number of tokens whose logprob is >= the chosen token's, so it is
    1 for a unique maximum and a tied token gets the worst rank among its ties.
    """
    if logits.dim() != 2 or token_ids.shape != logits.shape[:1]:
        raise ValueError(f"expected logits [N, V] and token_ids [N], got "
                         f"{tuple(logits.shape)} and {tuple(token_ids.shape)}")
    vocab_size = logits.shape[1]
    k = max(0, min(int(k), vocab_size))
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # [N, V] float32, a new tensor
    token_ids = token_ids.to(torch.int64).unsqueeze(1)  # [N, 1]
    token_logprobs = logprobs.gather(1, token_ids)  # [N, 1]
    ranks = (logprobs >= token_logprobs).sum(dim=-1)  # [N] int64, >= 1
    if k == 0:
        return LogprobsTensors(token_ids, token_logprobs, ranks)
    top_logprobs, top_ids = logprobs.topk(k, dim=-1)  # [N, k] each, sorted descending
    return LogprobsTensors(
        torch.cat([token_ids, top_ids], dim=1),  # [N, k+1]
        torch.cat([token_logprobs, top_logprobs], dim=1),  # [N, k+1]
        ranks,
    )
