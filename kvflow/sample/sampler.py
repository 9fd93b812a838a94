"""The batched sampler: logits [B, V] -> one token per row (+ optional logprobs).

Order of processing (vLLM v1 semantics):
  float32 -> min_tokens -> logit_bias -> penalties (repetition, frequency, presence)
  -> greedy rows: argmax (row_argmax: a Triton two-stage argmax for few CUDA rows)
  -> random rows: temperature -> top-k -> top-p -> min-p -> exponential-race sample.
Logprobs are of the raw float32 logits (see logprobs.py).

On CUDA, when no row uses top-k, top-p, min-p or its own seeded generator (the common serving
case), temperature + sampling are one Triton pass over the logits (kernels/sampling.py's
sample_rows: inverse-CDF sampling, one Philox uniform per row keyed from the default
generator) instead of five [B, V] passes and a copy.

Everything is batched over rows; the only per-row Python loop is the noise draw of rows that
own a seeded generator (it touches one [V] row each). Stages no row needs are skipped, decided
from host-side metadata so that no stage costs a device sync.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from kvflow import envs
from kvflow.sample.logprobs import LogprobsTensors, compute_topk_logprobs
from kvflow.sample.metadata import SamplingMetadata
from kvflow.sample.penalties import apply_penalties

try:
    from kvflow.kernels import HAS_TRITON as _HAS_TRITON
except ImportError:  # pragma: no cover
    _HAS_TRITON = False
_ARGMAX_MAX_ROWS = 64          # = kvflow.kernels.argmax.ARGMAX_MAX_ROWS (not imported: triton)


@dataclass
class SamplerOutput:
    sampled_token_ids: torch.Tensor  # [B] int64
    logprobs: Optional[LogprobsTensors]  # None unless some row asked for logprobs


def apply_top_k_top_p(logits: torch.Tensor, k: Optional[torch.Tensor],
                      p: Optional[torch.Tensor], max_top_k: int = 0,
                      full_sort: bool = True) -> torch.Tensor:
    """Mask (to -inf), in place, the tokens outside each row's top-k and then top-p set.

    logits: [B, V] float32 (temperature already applied).
    k:      [B] int64, 0 = off (values >= V also mean off); or None.
    p:      [B] float32 in (0, 1], 1.0 = off; or None.
    max_top_k: host-side max of k, so that topk(max_k) can replace a full sort without a
            device sync; 0 means unknown (then computed from k, one sync).
    full_sort: False promises that every row with p < 1 also has top-k on; top-p then only
            needs the max_top_k largest logits instead of a sort of the whole vocabulary.
            Ignored (treated as True) when k is None.

    Both cuts are tie-inclusive: each produces a per-row logit threshold and keeps every token
    whose logit is >= it, so tokens tied with the last kept one are kept too and the result
    does not depend on how the sort orders ties.
      top-k: threshold = k-th largest logit.
      top-p: on the distribution renormalised over the top-k survivors, walk tokens in
             descending order and keep a token while the mass of the tokens before it is < p
             (so the smallest prefix with mass >= p; the first token is always kept).
    """
    if k is None and p is None:
        return logits
    vocab_size = logits.shape[1]
    neg_inf = torch.tensor(float("-inf"), device=logits.device)

    if k is not None and (p is None or not full_sort):
        # Every token that can survive is among the max_k largest of its row.
        max_k = min(max_top_k if max_top_k > 0 else int(k.max()), vocab_size)
        sorted_logits = logits.topk(max(max_k, 1), dim=-1).values  # [B, n=max_k] descending
    else:
        sorted_logits = logits.sort(dim=-1, descending=True).values  # [B, n=V]
    n = sorted_logits.shape[1]

    if k is not None:
        k_on = ((k > 0) & (k < vocab_size)).unsqueeze(1)  # [B, 1] bool
        k_idx = (k.clamp(1, n) - 1).unsqueeze(1)  # [B, 1], 0-based index of the k-th largest
        kth = torch.where(k_on, sorted_logits.gather(1, k_idx), neg_inf)  # [B, 1]; off: keep all
        logits.masked_fill_(logits < kth, float("-inf"))
        if p is None:
            return logits
        sorted_logits.masked_fill_(sorted_logits < kth, float("-inf"))

    # Normalise over ALL top-k survivors, not just the n sorted ones: top-k is tie-inclusive,
    # so ties of the k-th value beyond the partial sort's n columns are survivors too.
    log_norm = torch.logsumexp(logits, dim=-1, keepdim=True)  # [B, 1]
    sorted_probs = (sorted_logits - log_norm).exp_()  # [B, n]
    cum = sorted_probs.cumsum(dim=-1)  # [B, n], nondecreasing
    # Token j (0-based, sorted) is kept iff the mass before it, cum[j-1], is < p. cum is
    # monotone, so the kept tokens are a prefix whose last index is the count of cum[:-1] < p.
    # If the walk runs off a partial sort's end, only ties of the k-th value remain (all
    # survivors) and the index lands on a -inf or k-th-valued column: nothing more is cut.
    last_kept = (cum[:, :-1] < p.unsqueeze(1)).sum(dim=-1, keepdim=True)  # [B, 1]
    ptile = sorted_logits.gather(1, last_kept)  # [B, 1]
    # p == 1 rows keep everything explicitly: rounding can make cum reach 1 before the tail
    # (and with a partial sort, rows without top-k only hold their n largest here).
    ptile = torch.where((p < 1.0).unsqueeze(1), ptile, neg_inf)
    return logits.masked_fill_(logits < ptile, float("-inf"))


def row_argmax(x: torch.Tensor) -> torch.Tensor:
    """x [B, V] -> [B] int64, exactly x.argmax(dim=-1) (first maximum; NaN counts as the
    largest). Few CUDA rows: the two-stage Triton argmax (kvflow/kernels/argmax.py) -- torch's
    reduction runs one block per row, 28 us for a 128K vocabulary; else torch."""
    if x.is_cuda and x.dim() == 2 and 0 < x.shape[0] <= _ARGMAX_MAX_ROWS and x.shape[1] > 0 \
            and x.dtype.is_floating_point and _HAS_TRITON:
        from kvflow.kernels.argmax import argmax_rows
        return argmax_rows(x)
    return x.argmax(dim=-1)


def _triton_device(x: torch.Tensor) -> bool:
    """Whether the sampling kernels run on x's device (CUDA; tests put the interpreter here)."""
    return x.is_cuda


def apply_min_p(probs: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Zero, in place, tokens whose probability is < min_p * (the row's max probability).

    probs: [B, V] float32, a distribution (unnormalised is fine: the rule is scale-invariant,
    which is also why min-p gives the same set whether applied before or after renormalising).
    min_p: [B] float32 in [0, 1]; 0 keeps everything.
    """
    threshold = probs.amax(dim=-1, keepdim=True) * min_p.unsqueeze(1)  # [B, 1]
    return probs.masked_fill_(probs < threshold, 0.0)


def sample_exponential_race(probs: torch.Tensor,
                            generators: dict[int, torch.Generator]) -> torch.Tensor:
    """Draw one token per row from `probs` ([B, V], nonnegative, rows need not sum to 1).

    argmax_j probs[j] / E_j with E_j ~ iid Exponential(1) picks j with probability
    probs[j] / sum(probs): E_j / probs[j] ~ Exponential(probs[j]) and the first of independent
    exponential clocks to ring is j with that probability. This avoids torch.multinomial (a
    device sync on CUDA) and makes a row's draw depend only on its own noise: rows in
    `generators` draw their [V] noise from their generator, so a seeded request samples the
    same tokens whatever else is in the batch and wherever its row is.
    Consumes `probs` (divided in place). Returns [B] int64.
    """
    noise = torch.empty_like(probs)  # [B, V]
    if len(generators) < probs.shape[0]:
        noise.exponential_()  # unseeded rows: one batched draw from the default generator
    for row, gen in generators.items():
        noise[row].exponential_(generator=gen)
    # E == 0 is possible in float32; a zero-probability token would then give 0/0 = nan, which
    # argmax treats as the maximum. Clamping keeps masked tokens at exactly 0.
    noise.clamp_min_(torch.finfo(noise.dtype).tiny)
    return row_argmax(probs.div_(noise))


class Sampler:
    """`Sampler()(logits, meta)`. Never modifies the caller's `logits`."""

    def __init__(self):
        self.fused_random = envs.fused_sampling() and _HAS_TRITON

    @torch.no_grad()
    def __call__(self, logits: torch.Tensor, meta: SamplingMetadata) -> SamplerOutput:
        if logits.dim() != 2 or logits.shape[0] != meta.num_rows:
            raise ValueError(f"logits must be [B={meta.num_rows}, V], got {tuple(logits.shape)}")
        raw_logits = logits  # kept intact for the raw logprobs

        fused = self._fused_random_ok(logits, meta)
        # The torch path of random rows divides the logits in place; the fused one only reads.
        modifies = (meta.min_tokens_mask is not None or meta.logit_bias is not None
                    or meta.penalties is not None or (not meta.all_greedy and not fused))
        if modifies:
            # Work on a float32 copy: .float() copies only when the dtype changes.
            logits = logits.float() if logits.dtype != torch.float32 else logits.clone()
            self._apply_logits_processors(logits, meta)
        sampled = self._sample(logits, meta, fused)  # [B] int64

        logprobs = None
        if meta.max_num_logprobs is not None:
            logprobs = compute_topk_logprobs(raw_logits, sampled, meta.max_num_logprobs)
        return SamplerOutput(sampled_token_ids=sampled, logprobs=logprobs)

    def _fused_random_ok(self, logits: torch.Tensor, meta: SamplingMetadata) -> bool:
        """Random rows in one Triton pass (see the module docstring): CUDA, and no stage the
        kernel does not do (truncation, min-p) nor a row whose noise must come from its own
        generator (a seeded request samples the same tokens whatever the batch)."""
        return (self.fused_random and _triton_device(logits) and not meta.all_greedy
                and meta.top_k is None and meta.top_p is None and meta.min_p is None
                and not meta.generators and logits.shape[1] > 0)

    @staticmethod
    def _apply_logits_processors(logits: torch.Tensor, meta: SamplingMetadata) -> None:
        """The stages that can change the argmax, so they apply to greedy rows too."""
        if meta.min_tokens_mask is not None:
            rows, toks = meta.min_tokens_mask
            logits[rows, toks] = float("-inf")
        if meta.logit_bias is not None:
            rows, toks, bias = meta.logit_bias
            # (row, token) pairs are unique (dict keys per row), so accumulate is a plain add.
            logits.index_put_((rows, toks), bias, accumulate=True)
        if meta.penalties is not None:
            apply_penalties(logits, meta.penalties)

    @staticmethod
    def _sample(logits: torch.Tensor, meta: SamplingMetadata, fused: bool) -> torch.Tensor:
        # Greedy: first maximum, as torch.argmax. Taken before temperature touches the logits.
        greedy_ids = None if meta.all_random else row_argmax(logits)  # [B]
        if meta.all_greedy:
            return greedy_ids

        if fused:
            from kvflow.kernels.sampling import sample_rows
            # The kernel's Philox key, from the default generator (seeded by the engine's
            # seed): a host draw, no device sync.
            seed = int(torch.randint(0, 2 ** 31 - 1, ()).item())
            random_ids = sample_rows(logits, meta.temperature, seed)  # [B]
        else:
            logits.div_(meta.temperature.unsqueeze(1))  # greedy rows divide by 1.0
            apply_top_k_top_p(logits, meta.top_k, meta.top_p, meta.max_top_k,
                              meta.top_p_full_sort)
            probs = logits.softmax(dim=-1)  # [B, V]
            if meta.min_p is not None:
                apply_min_p(probs, meta.min_p)
            random_ids = sample_exponential_race(probs, meta.generators)  # [B]
        if greedy_ids is None:
            return random_ids
        return torch.where(meta.greedy_mask, greedy_ids, random_ids)
