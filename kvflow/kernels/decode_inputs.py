"""Unpack a decode step's staged inputs into the CUDA graph's persistent input buffers.

A decode step's host inputs travel in ONE host-to-device copy (kvflow/worker/cuda_graphs.py packs
them into a flat int64 staging buffer); this kernel, the first node of every decode graph, writes
them where the model reads them, and takes the input token of each request whose previous token is
still in flight (overlapped scheduling) from `last_sampled` on the device:

    input_ids[i]    = last_sampled[fill_rows[i]] if fill_rows[i] >= 0 else ids[i]
    positions[i]    = pos[i];  slot_mapping[i] = slots[i];  seq_lens[i] = int32(lens[i])

Before, these were five copies, an index and an index_put per step (~50 us of a ~1 ms step for a
small model on an H200). One program of BLOCK rows per BLOCK; PDL convention (kernels/pdl.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvflow.kernels.device import triton_runs_on
from kvflow.kernels.pdl import pdl_launch, pdl_launch_dependents, pdl_wait

_BLOCK = 512


# bs only masks; specialized (== 1, divisible by 16, neither) it compiled three variants.
@triton.jit(do_not_specialize=["bs"])
def _decode_inputs_kernel(stage_ptr, last_ptr, ids_ptr, pos_ptr, slot_ptr, lens_ptr, bs, n,
                          BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    pdl_wait(USE_PDL)
    pdl_launch_dependents(USE_PDL)
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < bs
    ids = tl.load(stage_ptr + i, mask=ok, other=0)
    fill = tl.load(stage_ptr + 4 * n + i, mask=ok, other=-1)
    from_dev = tl.load(last_ptr + tl.maximum(fill, 0), mask=ok & (fill >= 0), other=0)
    tl.store(ids_ptr + i, tl.where(fill >= 0, from_dev, ids), mask=ok)
    tl.store(pos_ptr + i, tl.load(stage_ptr + n + i, mask=ok, other=0), mask=ok)
    tl.store(slot_ptr + i, tl.load(stage_ptr + 2 * n + i, mask=ok, other=-1), mask=ok)
    tl.store(lens_ptr + i, tl.load(stage_ptr + 3 * n + i, mask=ok, other=1).to(tl.int32),
             mask=ok)


def decode_inputs_ref(stage: torch.Tensor, n: int, bs: int, last_sampled: torch.Tensor,
                      input_ids: torch.Tensor, positions: torch.Tensor,
                      slot_mapping: torch.Tensor, seq_lens: torch.Tensor) -> None:
    fill = stage[4 * n:4 * n + bs]
    ids = torch.where(fill >= 0, last_sampled[fill.clamp(min=0)], stage[:bs])
    input_ids[:bs].copy_(ids)
    positions[:bs].copy_(stage[n:n + bs])
    slot_mapping[:bs].copy_(stage[2 * n:2 * n + bs])
    seq_lens[:bs].copy_(stage[3 * n:3 * n + bs])


def unpack_decode_inputs(stage: torch.Tensor, n: int, bs: int, last_sampled: torch.Tensor,
                         input_ids: torch.Tensor, positions: torch.Tensor,
                         slot_mapping: torch.Tensor, seq_lens: torch.Tensor) -> None:
    """stage: flat int64 on the device, rows of n: [ids | positions | slots | seq_lens |
    fill_rows (-1: use ids) | ...]; writes the first bs entries of the int64 input_ids /
    positions / slot_mapping and the int32 seq_lens. Torch ops where Triton cannot run."""
    if not triton_runs_on(stage.device):
        return decode_inputs_ref(stage, n, bs, last_sampled, input_ids, positions,
                                 slot_mapping, seq_lens)
    _decode_inputs_kernel[(triton.cdiv(bs, _BLOCK),)](
        stage, last_sampled, input_ids, positions, slot_mapping, seq_lens, bs, n,
        BLOCK=_BLOCK, num_warps=4, **pdl_launch(stage.device))
