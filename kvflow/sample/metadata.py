"""SamplingMetadata: one step's per-row sampling parameters, as batched device tensors.

Built on the host once per step from the rows' SamplingParams. Everything that decides whether a
stage runs at all (all_greedy, "no row uses top-k", ...) is a host-side Python value, so the
sampler never syncs with the device to decide what to skip. An optional tensor is None exactly
when no row needs that stage; when it exists, rows that do not use the knob hold its neutral
value (top_k 0, top_p 1.0, min_p 0.0, temperature 1.0).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from kvflow.sample.penalties import PenaltyState
from kvflow.sampling_params import SamplingParams


@dataclass
class SamplingMetadata:
    num_rows: int
    vocab_size: int
    all_greedy: bool
    all_random: bool
    # [B] bool, True for greedy rows; None when all rows are greedy or all random.
    greedy_mask: Optional[torch.Tensor]
    # [B] float32, 1.0 on greedy rows (so dividing is harmless); None when all greedy.
    temperature: Optional[torch.Tensor]
    # [B] int64 in [0, V): 0 = off. None when no random row truncates below V.
    top_k: Optional[torch.Tensor]
    max_top_k: int  # host copy of top_k.max() (0 when top_k is None): sizes topk without a sync
    top_p: Optional[torch.Tensor]  # [B] float32 in (0, 1], 1.0 = off; None when unused
    # False when every row with top_p < 1 also has top-k on: top-p then needs only the
    # max_top_k largest logits (topk) instead of a sort of the whole vocabulary.
    top_p_full_sort: bool
    min_p: Optional[torch.Tensor]  # [B] float32 in [0, 1], 0.0 = off; None when unused
    # row -> generator, random rows with a seed only; their noise comes from it alone.
    generators: dict[int, torch.Generator]
    penalties: Optional[PenaltyState]
    # (rows [n] int64, token ids [n] int64): set to -inf because min_tokens is not reached yet.
    min_tokens_mask: Optional[tuple[torch.Tensor, torch.Tensor]]
    # (rows [n] int64, token ids [n] int64, bias [n] float32): added to the logits.
    logit_bias: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    # K = max over rows of params.logprobs; None when no row asked for logprobs.
    max_num_logprobs: Optional[int]

    @classmethod
    def build(
        cls,
        params: Sequence[SamplingParams],
        output_token_ids: Sequence[Sequence[int]],
        prompt_token_ids: Sequence[Sequence[int]],
        generators: dict[int, torch.Generator],
        vocab_size: int,
        device: torch.device,
    ) -> "SamplingMetadata":
        """Batch the rows' parameters. Python work is O(B) plus the sizes of the token lists
        that penalties, min_tokens and logit_bias actually need; no vocab-sized host work."""
        num_rows = len(params)
        if len(output_token_ids) != num_rows or len(prompt_token_ids) != num_rows:
            raise ValueError("params, output_token_ids and prompt_token_ids must have one entry "
                             f"per row: {num_rows}, {len(output_token_ids)}, {len(prompt_token_ids)}")
        device = torch.device(device)
        V = vocab_size

        greedy = [p.greedy for p in params]
        all_greedy = all(greedy)
        all_random = not any(greedy)

        def vec(values: list, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)

        greedy_mask = temperature = top_k = top_p = min_p = None
        max_top_k = 0
        top_p_full_sort = True
        if not all_greedy:
            if not all_random:
                greedy_mask = vec(greedy, torch.bool)
            temperature = vec([1.0 if g else p.temperature for p, g in zip(params, greedy)],
                              torch.float32)
            # Greedy rows never reach truncation; force their knobs neutral regardless.
            # top_k >= V keeps everything, so it is "off" too.
            ks = [0 if g or p.top_k >= V else p.top_k for p, g in zip(params, greedy)]
            if any(ks):
                top_k, max_top_k = vec(ks, torch.int64), max(ks)
            ps = [1.0 if g else p.top_p for p, g in zip(params, greedy)]
            if any(x < 1.0 for x in ps):
                top_p = vec(ps, torch.float32)
                top_p_full_sort = any(x < 1.0 and k == 0 for x, k in zip(ps, ks))
            mps = [0.0 if g else p.min_p for p, g in zip(params, greedy)]
            if any(x > 0.0 for x in mps):
                min_p = vec(mps, torch.float32)

        for row in generators:
            if not 0 <= row < num_rows:
                raise ValueError(f"generator for row {row} outside the batch of {num_rows}")
        # A greedy row consumes no randomness, so its generator (if any) is left untouched.
        gens = {row: g for row, g in generators.items() if not greedy[row]}

        mt_rows: list[int] = []
        mt_toks: list[int] = []
        bias_rows: list[int] = []
        bias_toks: list[int] = []
        bias_vals: list[float] = []
        for i, p in enumerate(params):
            if p.min_tokens and len(output_token_ids[i]) < p.min_tokens:
                # Ids outside the vocab cannot be sampled anyway (verify_for_model rejects
                # user-given ones; an EOS id from config could in principle be out of range).
                stops = [t for t in p.all_stop_token_ids if 0 <= t < V]
                mt_rows += [i] * len(stops)
                mt_toks += stops
            if p.logit_bias:
                for tok, bias in p.logit_bias.items():
                    if 0 <= tok < V:
                        bias_rows.append(i)
                        bias_toks.append(tok)
                        bias_vals.append(bias)
        min_tokens_mask = None
        if mt_rows:
            min_tokens_mask = (vec(mt_rows, torch.int64), vec(mt_toks, torch.int64))
        logit_bias = None
        if bias_rows:
            logit_bias = (vec(bias_rows, torch.int64), vec(bias_toks, torch.int64),
                          vec(bias_vals, torch.float32))

        wanted = [p.logprobs for p in params if p.logprobs is not None]
        return cls(
            num_rows=num_rows,
            vocab_size=V,
            all_greedy=all_greedy,
            all_random=all_random,
            greedy_mask=greedy_mask,
            temperature=temperature,
            top_k=top_k,
            max_top_k=max_top_k,
            top_p=top_p,
            top_p_full_sort=top_p_full_sort,
            min_p=min_p,
            generators=gens,
            penalties=PenaltyState.build(params, output_token_ids, prompt_token_ids, V, device),
            min_tokens_mask=min_tokens_mask,
            logit_bias=logit_bias,
            max_num_logprobs=max(wanted) if wanted else None,
        )
