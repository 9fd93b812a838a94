"""Longest-first order of a decode batch: order[i] = the request with the i-th longest context.

Decode attention dispatches its programs in this order where that pays
(kernels/attention_config.dispatch_longest_first). The decode graphs compute it at every replay
from that replay's lengths; `torch.argsort` did that in four kernels, a radix sort among them
(~23 us of a 5.4 ms Qwen3-0.6B step at 144 requests, H200). Here it is one program: each length
is packed with its index into one int64 key, len * 2^20 + (2^20 - 1 - i), and the keys are sorted
descending (`tl.sort`, a bitonic network in registers); the low bits give the index back. Ties go
to the lower index, so the order is stable (the torch reference below says the same). PDL
convention (kernels/pdl.py): the lengths are written by the step's input kernel just before.
Launches that dispatch in plain request order use `identity_order` instead (below).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from kvflow.kernels.device import triton_runs_on
from kvflow.kernels.pdl import pdl_launch, pdl_launch_dependents, pdl_wait
from kvflow.kernels.tickets import DeviceBuffers

MAX_REQS = 1 << 20           # index range of the packed key's low bits
_IDX = tl.constexpr(MAX_REQS)
_MAX_BLOCK = 4096            # one program holds the batch in registers


@triton.jit(do_not_specialize=["n"])   # n only masks: one variant per BLOCK
def _longest_first_kernel(lens_ptr, order_ptr, n, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    pdl_wait(USE_PDL)
    pdl_launch_dependents(USE_PDL)
    i = tl.arange(0, BLOCK)
    ok = i < n
    # Padding sorts last: length -1 is below every real length (>= 0).
    lens = tl.load(lens_ptr + i, mask=ok, other=-1).to(tl.int64)
    key = lens * _IDX - i + (_IDX - 1)           # tensor first: constexpr - tensor stays a
    key = tl.sort(key, descending=True)          # constexpr under the interpreter
    idx = -(key % _IDX) + (_IDX - 1)
    tl.store(order_ptr + i, idx.to(tl.int32), mask=ok)


def _block(n: int) -> int:
    """The sort's width for n lengths: 256 up to 256 requests, then 1024, then powers of two.
    Each width is a separate compile (0.3-1.3 s on a cold machine), and the decode graphs'
    buckets span them all; in a CUDA graph on the H200
    (benchmarks/results/decode-order-sort-nvidia-h200.txt) the 256-wide sort takes 1.7 us and
    the 1024-wide 6.8 us, against 1.3 us at 128 wide and 2.8 us at 512: a few us a step where a
    step takes milliseconds, for three fewer compiles (torch.argsort + the int32 cast: 9-22 us)."""
    if n <= 256:
        return 256
    return max(1024, triton.next_power_of_2(n))


# Identity orders: a one-program-per-request attention launch with no order of its own (eager
# steps, graph buckets where longest-first does not pay) dispatches through arange(B), so it
# runs the kernel variant the ordered launches compile (HAS_ORDER) instead of a second one: two
# fewer attention compiles on a cold start (1.5-2 s each on the H200 host). The kernel loads
# its order entry before its PDL wait, under the previous kernel. Kept like the ticket
# counters (kernels/tickets.py): grown outside CUDA-graph capture only, never freed.
_IDENTITY = DeviceBuffers(min_size=4096, make=torch.arange)


def identity_order(device: torch.device, n: int) -> Optional[torch.Tensor]:
    """arange(n) int32 on `device`; None when that would need an allocation during capture."""
    buf = _IDENTITY.get(device, n)
    return None if buf is None else buf[:n]


def longest_first_order_ref(seq_lens: torch.Tensor) -> torch.Tensor:
    """seq_lens [B] -> int32 [B]: indices by descending length, ties by ascending index."""
    return torch.argsort(seq_lens, descending=True, stable=True).to(torch.int32)


def longest_first_order(seq_lens: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """seq_lens [B] int32 on the device -> out [B] int32, `longest_first_order_ref`'s result.
    Torch ops where Triton cannot run (CPU without the interpreter) or B is too large for one
    program."""
    n = seq_lens.shape[0]
    if out is None:
        out = torch.empty(n, dtype=torch.int32, device=seq_lens.device)
    if n == 0:
        return out
    if not triton_runs_on(seq_lens.device) or n > _MAX_BLOCK:
        out.copy_(longest_first_order_ref(seq_lens))
        return out
    assert seq_lens.is_contiguous() and out.is_contiguous()
    block = _block(n)
    _longest_first_kernel[(1,)](seq_lens, out, n, BLOCK=block, num_warps=4 if block <= 512 else 8,
                                **pdl_launch(seq_lens.device))
    return out
