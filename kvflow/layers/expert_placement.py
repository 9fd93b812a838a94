"""Which experts of an MoE layer live on which expert-parallel rank.

Experts are split into contiguous ranges, one per rank. When the rank count does not divide the
number of experts the split is uneven: the first `E % ranks` ranks hold one expert more (e.g. 3
experts over 2 ranks -> [0, 1] and [2]). Every rank must hold at least one expert (checked in
config.py, where the error can name the option); a rank with none would only add a zero.

The router always produces *global* expert ids. `ExpertPlacement.global_to_local` turns them
into local slots of the stacked weights, with the sentinel `num_local` ("computed on another
rank") for the rest; the MoE kernels skip sentinel pairs. With one rank the map is the identity
and no id is ever the sentinel, so the same code path serves TP-only and single-GPU runs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


def expert_ranges(num_experts: int, num_ranks: int) -> list[range]:
    """Contiguous ranges of global expert ids, one per rank, sizes differing by at most one."""
    if num_ranks < 1 or num_experts < num_ranks:
        raise ValueError(f"cannot place {num_experts} experts on {num_ranks} expert-parallel "
                         "ranks: every rank needs at least one expert")
    base, extra = divmod(num_experts, num_ranks)
    out, start = [], 0
    for r in range(num_ranks):
        n = base + (1 if r < extra else 0)
        out.append(range(start, start + n))
        start += n
    return out


@dataclass(frozen=True)
class ExpertPlacement:
    num_experts: int     # global, as the router sees them
    rank: int            # expert-parallel rank
    size: int            # expert-parallel ranks (1 = every expert local)

    @property
    def local(self) -> range:
        return expert_ranges(self.num_experts, self.size)[self.rank]

    @property
    def num_local(self) -> int:
        return len(self.local)

    @property
    def is_partitioned(self) -> bool:
        return self.size > 1

    def local_slot(self, expert: int) -> Optional[int]:
        """Slot of global expert `expert` in this rank's stacked weights, None if remote."""
        if not 0 <= expert < self.num_experts:
            raise ValueError(f"expert id {expert} out of range (model has {self.num_experts})")
        r = self.local
        return expert - r.start if expert in r else None

    def global_to_local(self) -> torch.Tensor:
        """[num_experts] int64: local slot, or `num_local` (the "remote" sentinel)."""
        # Built from a list, not by tensor ops: on the meta device (dummy weights' reference
        # model) those run reference decompositions that import torch._dynamo.
        slots = (self.local_slot(e) for e in range(self.num_experts))
        return torch.tensor([self.num_local if s is None else s for s in slots],
                            dtype=torch.int64)
