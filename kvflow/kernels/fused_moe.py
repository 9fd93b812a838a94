"""Fused MoE for CUDA: tokens sorted and padded per expert, two grouped GEMMs.

Layout (built by one Triton kernel, `moe_routing.align_by_expert_triton`, or for big prefills by
its torch twin `align_by_expert` here; no host sync, so it is CUDA-graph/compile friendly):
  * the T*K (token, expert) pairs are sorted by expert and each expert's group padded to a
    multiple of BLOCK_M; `sorted_pairs[p]` is the pair index at padded row p (T*K = padding);
  * `block_expert[b]` is the expert of padded block b (E for blocks past the end: they exit).
The grid is sized by the worst case T*K + E*(BLOCK_M-1) rows, known from shapes alone.

Kernel 1: rows of x gathered by pair, times the expert's gate and up tiles in one pass (two
accumulators), silu(gate)*up stored per padded row -> h [P, I].
Kernel 2: h times the expert's down tile, scaled by the routing weight, stored per pair ->
[T*K, H]; the K partial outputs of a token are summed by `moe_routing.moe_sum` (deterministic,
no atomics).
The torch reference is kvflow.layers.moe.fused_moe_torch.
"""
from __future__ import annotations

import functools
import json
import os

import torch
import triton
import triton.language as tl

from kvflow.compilation.eager import eager_only
from kvflow.kernels.device import device_properties
from kvflow.kernels.moe_routing import align_by_expert_triton, moe_sum
from kvflow.kernels.pdl import pdl_launch, pdl_launch_dependents, pdl_wait


@triton.jit
def _tile_of_program(num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Program id -> (row block, column tile). GROUP_M = 0: row blocks fastest over the whole
    grid, so the programs resident at once share a few weight tiles (decode: the weights are
    the traffic). GROUP_M = g > 0: row blocks fastest within groups of g, column tiles next,
    so a group's activation rows and the weight tiles it walks both stay in L2 (prefill: in
    the other order every row block's activations are read again for each column tile)."""
    pid = tl.program_id(0)
    if GROUP_M == 0:
        return pid % num_pid_m, pid // num_pid_m
    width = GROUP_M * num_pid_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    return first_m + (pid % width) % size_m, (pid % width) // size_m


@triton.jit(do_not_specialize=["num_pairs", "num_pid_m"])
def _gate_up_kernel(x_ptr, w13_ptr, h_ptr, pairs_ptr, block_expert_ptr,
                    num_pairs, top_k, num_experts, H, I, num_pid_m,
                    stride_xt, stride_we, stride_wn, stride_hp,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    GROUP_M: tl.constexpr, IEEE: tl.constexpr, USE_PDL: tl.constexpr):
    pdl_wait(USE_PDL)                  # the routing (pairs, block experts) comes from before
    pdl_launch_dependents(USE_PDL)
    pid_m, pid_n = _tile_of_program(num_pid_m, tl.cdiv(I, BLOCK_N), GROUP_M)
    e = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if e >= num_experts:
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)                 # padded rows
    pair = tl.load(pairs_ptr + rows)
    valid = pair < num_pairs
    token = (pair // top_k).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)                 # intermediate columns
    col_ok = cols < I
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    w_base = w13_ptr + e * stride_we
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < H
        a = tl.load(x_ptr + token[:, None] * stride_xt + ks[None, :],
                    mask=valid[:, None] & k_ok[None, :], other=0.0)           # [BM, BK]
        wmask = k_ok[:, None] & col_ok[None, :]
        bg = tl.load(w_base + cols[None, :] * stride_wn + ks[:, None], mask=wmask, other=0.0)
        bu = tl.load(w_base + (cols[None, :] + I) * stride_wn + ks[:, None], mask=wmask,
                     other=0.0)                                              # [BK, BN]
        if IEEE:  # fp32 models: keep full precision (HF parity), not TF32
            acc_g = tl.dot(a, bg, acc_g, input_precision="ieee")
            acc_u = tl.dot(a, bu, acc_u, input_precision="ieee")
        else:
            acc_g = tl.dot(a, bg, acc_g)
            acc_u = tl.dot(a, bu, acc_u)
    # Round gate/up to the activation dtype first, as the unfused path (linear -> silu_and_mul).
    g = acc_g.to(h_ptr.dtype.element_ty).to(tl.float32)
    u = acc_u.to(h_ptr.dtype.element_ty).to(tl.float32)
    out = g * tl.sigmoid(g) * u
    tl.store(h_ptr + rows[:, None].to(tl.int64) * stride_hp + cols[None, :],
             out.to(h_ptr.dtype.element_ty), mask=valid[:, None] & col_ok[None, :])


@triton.jit(do_not_specialize=["num_pairs", "num_pid_m"])
def _down_kernel(h_ptr, w2_ptr, out_ptr, pairs_ptr, block_expert_ptr, weights_ptr,
                 num_pairs, num_experts, H, I, num_pid_m,
                 stride_hp, stride_we, stride_wn, stride_op,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 GROUP_M: tl.constexpr, IEEE: tl.constexpr, USE_PDL: tl.constexpr):
    pdl_wait(USE_PDL)
    pdl_launch_dependents(USE_PDL)
    pid_m, pid_n = _tile_of_program(num_pid_m, tl.cdiv(H, BLOCK_N), GROUP_M)
    e = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if e >= num_experts:
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(pairs_ptr + rows)
    valid = pair < num_pairs
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)                 # hidden columns
    col_ok = cols < H
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    w_base = w2_ptr + e * stride_we
    for k0 in range(0, I, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < I
        a = tl.load(h_ptr + rows[:, None].to(tl.int64) * stride_hp + ks[None, :],
                    mask=valid[:, None] & k_ok[None, :], other=0.0)           # [BM, BK]
        b = tl.load(w_base + cols[None, :] * stride_wn + ks[:, None],
                    mask=k_ok[:, None] & col_ok[None, :], other=0.0)         # [BK, BN]
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    # Reference rounds the expert output to the activation dtype before weighting.
    acc = acc.to(out_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(weights_ptr + pair, mask=valid, other=0.0)
    acc = acc * w[:, None]
    tl.store(out_ptr + pair[:, None].to(tl.int64) * stride_op + cols[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=valid[:, None] & col_ok[None, :])


def align_by_expert(topk_ids: torch.Tensor, num_experts: int, block_m: int):
    """Torch version of moe_routing.align_by_expert_triton, with the same output: the tests'
    reference, and fused_moe's path for big prefills (where that one-program kernel is serial).
    topk_ids [T, K] -> (sorted_pairs [P] int32, block_expert [P // block_m] int32) with
    P = T*K + E*(block_m-1) rounded up to block_m: the worst case, so no host sync.

    An id equal to num_experts (expert parallel: the expert lives on another rank) gets no row:
    such pairs are never computed, and their output rows are left for the caller to zero."""
    flat = topk_ids.reshape(-1)
    n = flat.numel()
    dev = flat.device
    p = triton.cdiv(n + num_experts * (block_m - 1), block_m) * block_m
    order = torch.argsort(flat, stable=True)                       # pair indices by expert
    # scatter_add, not bincount: CUDA bincount reads the max id back to the host (a sync that
    # breaks CUDA graph capture).
    counts_all = torch.zeros(num_experts + 1, dtype=torch.int64, device=dev).scatter_add_(
        0, flat.long(), torch.ones_like(flat, dtype=torch.int64))  # [E+1], last = remote
    counts = counts_all[:num_experts]
    starts = torch.cumsum(counts_all, 0) - counts_all              # unpadded group starts
    padded = (counts + block_m - 1) // block_m * block_m
    pad_end = torch.cumsum(padded, 0)                              # [E]
    pad_start = torch.cat([pad_end - padded, pad_end.new_zeros(1)])  # [E+1]
    e_sorted = flat[order]
    dest = pad_start[e_sorted] + torch.arange(n, device=dev) - starts[e_sorted]
    dest = torch.where(e_sorted < num_experts, dest, p)            # remote -> scratch slot p
    sorted_pairs = torch.full((p + 1,), n, dtype=torch.int32, device=dev)
    sorted_pairs[dest] = order.to(torch.int32)
    sorted_pairs = sorted_pairs[:p]
    block_start = torch.arange(0, p, block_m, device=dev)
    # Expert e owns blocks in [pad_start[e], pad_end[e]); past the last one -> E (exit).
    block_expert = torch.searchsorted(pad_end, block_start, right=True).to(torch.int32)
    return sorted_pairs, block_expert


# Tiles per kernel. Both kernels walk the same expert-aligned row blocks, so they share BLOCK_M;
# everything else is per kernel: gate/up (K = hidden, two accumulators) and down (K =
# intermediate) peak at different tiles, e.g. at decode the down GEMM has few output columns
# per expert and needs narrow BLOCK_N to keep every SM streaming.
_TRITON_ALIGN_MAX = 1 << 20     # pairs x experts above which align_by_expert (torch) is used
_KERNEL_KEYS = ("block_n", "block_k", "group_m", "num_warps", "num_stages")
_TUNED_PATH = os.path.join(os.path.dirname(__file__), "configs", "fused_moe.json")


def _split(flat: dict) -> dict:
    """{block_m, block_n, ...} (one tile for both kernels) -> the per-kernel form."""
    if "gate_up" in flat:
        return flat
    tile = {key: flat[key] for key in _KERNEL_KEYS if key in flat}
    return {"block_m": flat["block_m"], "gate_up": dict(tile), "down": dict(tile)}


def default_config(num_pairs: int, dtype: torch.dtype) -> dict:
    """Untuned shapes. Decode (few pairs) is a weight stream: 16-row blocks, long K steps and
    narrow down tiles; prefill wants large tensor-core tiles. fp32 keeps small tiles (ieee
    dots, twice the shared memory per element)."""
    if dtype == torch.float32:
        return _split(dict(block_m=16, block_n=64, block_k=32, num_warps=4, num_stages=2))
    if num_pairs <= 64:
        return {"block_m": 16,
                "gate_up": dict(block_n=64, block_k=128, num_warps=4, num_stages=4),
                "down": dict(block_n=32, block_k=128, num_warps=4, num_stages=4)}
    if num_pairs <= 1024:
        return _split(dict(block_m=32, block_n=64, block_k=64, num_warps=4, num_stages=3))
    return _split(dict(block_m=64, block_n=128, block_k=64, num_warps=8, num_stages=3))


@functools.lru_cache(maxsize=None)
def _tuned_table(device_name: str, shape_key: str) -> tuple:
    """((max_pairs, config), ...) ascending, measured by benchmarks/moe_tune.py for this GPU
    and expert shape; () when there is none."""
    try:
        with open(_TUNED_PATH) as f:
            table = json.load(f).get(device_name, {}).get(shape_key, [])
    except (OSError, ValueError):
        return ()
    return tuple((int(n), _split(c)) for n, c in sorted(table, key=lambda r: int(r[0])))


def shape_key(num_experts: int, hidden: int, inter: int, dtype: torch.dtype) -> str:
    return f"E{num_experts}_H{hidden}_I{inter}_{str(dtype).replace('torch.', '')}"


def choose_config(num_pairs: int, dtype: torch.dtype, num_experts: int = 0, hidden: int = 0,
                  inter: int = 0, device: torch.device | None = None) -> dict:
    """The tuned tiles of the smallest measured bucket >= num_pairs (the largest past the
    end) for this GPU and expert shape, else `default_config`. Result: {"block_m": int,
    "gate_up": {block_n, block_k, num_warps, num_stages}, "down": {...}}."""
    if device is not None and device.type == "cuda" and dtype != torch.float32:
        table = _tuned_table(device_properties(device).name,
                             shape_key(num_experts, hidden, inter, dtype))
        for max_pairs, cfg in table:
            if num_pairs <= max_pairs:
                return cfg
        if table:
            return table[-1][1]
    return default_config(num_pairs, dtype)


def launch_gate_up(x, w13, hbuf, pairs, block_expert, top_k: int, block_m: int, tile: dict):
    """h[p] = silu(x[token(p)] @ W1[e].T) * (x[token(p)] @ W3[e].T) for each padded row p."""
    e, two_i, h = w13.shape
    inter = two_i // 2
    tile = dict(tile)
    block_n, block_k = tile.pop("block_n"), tile.pop("block_k")
    group_m = tile.pop("group_m", 0)
    nblocks = pairs.numel() // block_m
    _gate_up_kernel[(nblocks * triton.cdiv(inter, block_n),)](
        x, w13, hbuf, pairs, block_expert, x.shape[0] * top_k, top_k, e, h, inter, nblocks,
        x.stride(0), w13.stride(0), w13.stride(1), hbuf.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=group_m,
        IEEE=x.dtype == torch.float32, **pdl_launch(x.device), **tile)


def launch_down(hbuf, w2, out, pairs, block_expert, weights, block_m: int, tile: dict):
    """out[pair] = weight(pair) * (h[p] @ W2[e].T) for each real padded row p."""
    e, h, inter = w2.shape
    tile = dict(tile)
    block_n, block_k = tile.pop("block_n"), tile.pop("block_k")
    group_m = tile.pop("group_m", 0)
    nblocks = pairs.numel() // block_m
    _down_kernel[(nblocks * triton.cdiv(h, block_n),)](
        hbuf, w2, out, pairs, block_expert, weights, out.shape[0], e, h, inter, nblocks,
        hbuf.stride(0), w2.stride(0), w2.stride(1), out.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=group_m,
        IEEE=hbuf.dtype == torch.float32, **pdl_launch(hbuf.device), **tile)


@eager_only  # launched eagerly from compiled graphs (a graph break), not traced
def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, config: dict | None = None,
              has_remote: bool = False) -> torch.Tensor:
    """x [T, H], w13 [E, 2I, H], w2 [E, H, I], topk_* [T, K] -> [T, H] (x.dtype).
    has_remote: some ids may be E (expert on another rank; contributes zero).
    config: tiles, either per kernel (see choose_config) or one flat tile for both."""
    t, h = x.shape
    k = topk_ids.shape[1]
    e, two_i, _ = w13.shape
    inter = two_i // 2
    if t == 0:
        return torch.zeros_like(x)
    cfg = _split(config) if config else choose_config(t * k, x.dtype, e, h, inter, x.device)
    block_m = cfg["block_m"]
    x, w13, w2 = x.contiguous(), w13.contiguous(), w2.contiguous()
    # One Triton program aligns small batches (a few launches less per layer at decode); its
    # serial work grows with pairs x experts, so big prefills (e.g. 128 experts x 64k pairs)
    # take the torch path -- identical output, also sync-free.
    align = align_by_expert_triton if t * k * e <= _TRITON_ALIGN_MAX else align_by_expert
    pairs, block_expert = align(topk_ids, e, block_m)
    hbuf = torch.empty((pairs.numel(), inter), dtype=x.dtype, device=x.device)  # [P, I]
    # [T*K, H] per pair; remote pairs are never written, so they must start at zero.
    out = (torch.zeros if has_remote else torch.empty)((t * k, h), dtype=x.dtype, device=x.device)
    weights = topk_weights.reshape(-1).float().contiguous()
    launch_gate_up(x, w13, hbuf, pairs, block_expert, k, block_m, cfg["gate_up"])
    launch_down(hbuf, w2, out, pairs, block_expert, weights, block_m, cfg["down"])
    # Sum each token's K expert outputs in fp32 (the reference accumulates in x.dtype via
    # index_add; identical in fp32).
    return moe_sum(out.view(t, k, h), x.dtype)
