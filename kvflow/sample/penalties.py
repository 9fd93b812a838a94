"""Repetition, frequency and presence penalties (vLLM / HF meanings), batched.

- repetition (multiplicative, HF rule): for every token seen in the prompt OR the output so far,
  a positive logit is divided by the penalty and a negative one multiplied by it.
- frequency: subtract `frequency_penalty * count(token in output)`.
- presence:  subtract `presence_penalty * (count(token in output) > 0)`.
Applied in that order. Rows that do not use a penalty carry its neutral value (1, 0, 0), so
one batched expression serves every row; a penalty no row uses is skipped entirely.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from kvflow.sampling_params import SamplingParams


def _pad_token_ids(rows: Sequence[Sequence[int]], vocab_size: int,
                   device: torch.device) -> torch.Tensor:
    """[B, L] int64 of token ids, right-padded with `vocab_size`.

    The pad value indexes an extra, discarded column of the [B, V+1] scatter targets, so padding
    needs no mask. Ids outside [0, V) (a tokenizer larger than the model's vocab) are also mapped
    to the pad: the model can never emit them, so they have no logit to penalise.
    Rows may be lists, numpy arrays or CPU tensors; numpy row copies are ~10x faster than
    torch.tensor on a nested list, which matters for long prompts.
    """
    width = max((len(r) for r in rows), default=0)
    padded = np.full((len(rows), width), vocab_size, dtype=np.int64)
    for i, r in enumerate(rows):
        padded[i, :len(r)] = r
    ids = torch.from_numpy(padded)
    ids.masked_fill_((ids < 0) | (ids > vocab_size), vocab_size)
    return ids.to(device, non_blocking=True)


@dataclass
class PenaltyState:
    """Device tensors for one step's penalties. Only exists when some row uses a penalty."""

    output_ids: torch.Tensor  # [B, Lo] int64, generated tokens, padded with V (empty rows if unused)
    prompt_ids: Optional[torch.Tensor]  # [B, Lp] int64 padded with V; None if no repetition penalty
    repetition: Optional[torch.Tensor]  # [B] float32 (1.0 = off); None if no row uses it
    frequency: Optional[torch.Tensor]  # [B] float32 (0.0 = off); None if no row uses it
    presence: Optional[torch.Tensor]  # [B] float32 (0.0 = off); None if no row uses it

    @classmethod
    def build(cls, params: Sequence[SamplingParams], output_token_ids: Sequence[Sequence[int]],
              prompt_token_ids: Sequence[Sequence[int]], vocab_size: int,
              device: torch.device) -> Optional["PenaltyState"]:
        rep = [p.repetition_penalty for p in params]
        freq = [p.frequency_penalty for p in params]
        pres = [p.presence_penalty for p in params]
        use_rep = [r != 1.0 for r in rep]
        uses_output = [ur or f != 0.0 or pr != 0.0 for ur, f, pr in zip(use_rep, freq, pres)]
        if not any(uses_output):
            return None

        def vec(values: list[float], used: bool) -> Optional[torch.Tensor]:
            return torch.tensor(values, dtype=torch.float32).to(device) if used else None

        # Only ship the token lists of rows that need them; other rows become empty (all pad).
        output_ids = _pad_token_ids(
            [o if u else () for o, u in zip(output_token_ids, uses_output)], vocab_size, device)
        prompt_ids = None
        if any(use_rep):
            prompt_ids = _pad_token_ids(
                [t if u else () for t, u in zip(prompt_token_ids, use_rep)], vocab_size, device)
        return cls(
            output_ids=output_ids,
            prompt_ids=prompt_ids,
            repetition=vec(rep, any(use_rep)),
            frequency=vec(freq, any(f != 0.0 for f in freq)),
            presence=vec(pres, any(p != 0.0 for p in pres)),
        )


def _token_counts(ids: torch.Tensor, vocab_size: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, V] occurrences of each token in each row of `ids` ([B, L], padded with V)."""
    counts = torch.zeros(ids.shape[0], vocab_size + 1, dtype=dtype, device=ids.device)
    counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=dtype))
    return counts[:, :vocab_size]  # drop the pad column


def apply_penalties(logits: torch.Tensor, state: PenaltyState) -> torch.Tensor:
    """Apply the penalties to `logits` ([B, V] float32) in place and return it."""
    vocab_size = logits.shape[1]
    counts = _token_counts(state.output_ids, vocab_size, torch.int32)  # [B, V]
    in_output = counts > 0  # [B, V] bool

    if state.repetition is not None:
        seen = in_output  # [B, V] bool
        if state.prompt_ids is not None:
            in_prompt = torch.zeros(logits.shape[0], vocab_size + 1, dtype=torch.bool,
                                    device=logits.device)
            in_prompt.scatter_(1, state.prompt_ids, True)
            seen = seen | in_prompt[:, :vocab_size]
        rep = state.repetition.unsqueeze(1)  # [B, 1]
        penalised = torch.where(logits > 0, logits / rep, logits * rep)  # [B, V]
        # Elementwise with full overlap of `out` and an input is safe (it is how in-place ops work).
        torch.where(seen, penalised, logits, out=logits)

    if state.frequency is not None:
        logits.sub_(state.frequency.unsqueeze(1) * counts)
    if state.presence is not None:
        logits.sub_(state.presence.unsqueeze(1) * in_output)
    return logits
