"""MoE routing glue as Triton kernels: top-k selection, the expert-sorted layout, the combine.

Around the two grouped GEMMs of kvflow/kernels/fused_moe.py, routing in torch ops costs about a
dozen small launches per layer (topk's gather/radix/bitonic sorts, softmax, the argsort /
scatter_add / cumsum / searchsorted / indexing of the alignment, three kernels for the final
fp32 sum) -- ~1.5 ms of a 10 ms Mixtral-8x7B decode step on an H200. Here they are three
launches, one per function:

  * `topk_softmax`: router logits -> top-k weights and expert ids (softmax or sigmoid scoring),
    one program per block of tokens; the same results as kvflow.layers.moe.select_experts.
  * `align_by_expert_triton`: top-k ids -> pairs sorted by expert, padded per expert to
    BLOCK_M rows, and each block's expert; one program, exactly the torch reference
    `kvflow.kernels.fused_moe.align_by_expert`.
  * `moe_sum`: the K weighted expert outputs of a token summed in fp32 in order k = 0..K-1,
    rounded once (torch's `out.float().sum(1).to(dtype)` on out [T, K, H], except that torch's
    CUDA sum may reorder, which can show in fp32's last bit).

All sizes come from shapes (no host sync), so they are CUDA-graph safe. The alignment is one
program looping over chunks of pairs (a stable order needs the running per-expert offsets):
one chunk at decode sizes, but T*K*E/4096 sequential steps for large prefill chunks.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvflow.compilation.eager import eager_only
from kvflow.kernels.pdl import pdl_launch, pdl_launch_dependents, pdl_wait
from kvflow.kernels.tickets import TicketCounters


# ------------------------------------------------------------------------------------ top-k
@triton.jit
def _select_topk(x, e_ok, TOP_K: tl.constexpr, K_PAD: tl.constexpr, RENORMALIZE: tl.constexpr,
                 SIGMOID: tl.constexpr, BLOCK_T: tl.constexpr, E_PAD: tl.constexpr):
    """x [BT, E_PAD] fp32 router logits (-inf where not e_ok [E_PAD]) -> (weights [BT, K_PAD]
    fp32, ids [BT, K_PAD] int64). One body for the top-k kernel and the fused router kernel, so
    the two select the same experts from the same logits, with the same weights (bit for bit
    under the interpreter; compiled, the two kernels may contract the softmax arithmetic
    differently: last-bit differences, measured on the H200)."""
    experts = tl.arange(0, E_PAD)
    slots = tl.arange(0, K_PAD)
    if SIGMOID:   # rank the raw logits; weight = sigmoid(logit)
        scores = x
    else:         # rank the softmax probabilities (fp32)
        p = tl.exp(x - tl.max(x, axis=1)[:, None])
        scores = p / tl.sum(p, axis=1)[:, None]                               # [BT, E_PAD]
    avail = tl.broadcast_to(e_ok[None, :], (BLOCK_T, E_PAD))    # experts not yet taken
    weights = tl.zeros((BLOCK_T, K_PAD), dtype=tl.float32)
    ids = tl.zeros((BLOCK_T, K_PAD), dtype=tl.int64)
    for j in tl.static_range(TOP_K):   # K rounds of argmax, ties -> lowest expert id
        best = tl.max(tl.where(avail, scores, float("-inf")), axis=1)             # [BT]
        idx = tl.min(tl.where(avail & (scores == best[:, None]), experts[None, :], E_PAD),
                     axis=1)
        if SIGMOID:
            best = tl.sigmoid(best)
        weights = tl.where(slots[None, :] == j, best[:, None], weights)       # [BT, K_PAD]
        ids = tl.where(slots[None, :] == j, idx[:, None].to(tl.int64), ids)
        avail = avail & (experts[None, :] != idx[:, None])
    if RENORMALIZE:
        weights = weights / tl.sum(weights, axis=1)[:, None]
    return weights, ids


@triton.jit
def _store_topk(weights_ptr, ids_ptr, weights, ids, tokens, num_tokens, TOP_K: tl.constexpr,
                K_PAD: tl.constexpr):
    slots = tl.arange(0, K_PAD)
    out = tokens[:, None].to(tl.int64) * TOP_K + slots[None, :]
    mask = (tokens < num_tokens)[:, None] & (slots[None, :] < TOP_K)
    tl.store(weights_ptr + out, weights, mask=mask)
    tl.store(ids_ptr + out, ids, mask=mask)


# Token and pair counts only bound loops and masks: not specialized (divisible by 16 or not
# would compile every routing kernel twice over the warm-up's step shapes).
@triton.jit(do_not_specialize=["num_tokens"])
def _topk_kernel(logits_ptr, weights_ptr, ids_ptr, num_tokens, num_experts, stride_lt,
                 TOP_K: tl.constexpr, K_PAD: tl.constexpr, RENORMALIZE: tl.constexpr,
                 SIGMOID: tl.constexpr, BLOCK_T: tl.constexpr, E_PAD: tl.constexpr,
                 USE_PDL: tl.constexpr):
    pdl_wait(USE_PDL)                  # the logits are the predecessor's output
    pdl_launch_dependents(USE_PDL)
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    experts = tl.arange(0, E_PAD)
    e_ok = experts < num_experts
    rows = tl.minimum(tokens, num_tokens - 1).to(tl.int64)   # tail tokens redo the last one
    x = tl.load(logits_ptr + rows[:, None] * stride_lt + experts[None, :],
                mask=e_ok[None, :], other=float("-inf")).to(tl.float32)       # [BT, E_PAD]
    weights, ids = _select_topk(x, e_ok, TOP_K, K_PAD, RENORMALIZE, SIGMOID, BLOCK_T, E_PAD)
    _store_topk(weights_ptr, ids_ptr, weights, ids, tokens, num_tokens, TOP_K, K_PAD)


def _check_scoring(scoring: str) -> None:
    if scoring not in ("softmax", "sigmoid"):
        raise ValueError(f"MoE scoring must be 'softmax' or 'sigmoid', got {scoring!r}")


@eager_only  # launched eagerly from compiled graphs (a graph break), not traced
def topk_softmax(router_logits: torch.Tensor, top_k: int, renormalize: bool,
                 scoring: str = "softmax") -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits [T, E] -> (weights [T, K] float32, ids [T, K] int64), as select_experts.

    scoring "softmax": fp32 softmax over E, then the K largest (ties -> lowest expert id),
    optionally renormalised to sum to 1. "sigmoid" (Llama 4): the K largest raw logits, weight
    sigmoid(logit); renormalize is ignored, as in select_experts."""
    _check_scoring(scoring)
    t, e = router_logits.shape
    dev = router_logits.device
    weights = torch.empty((t, top_k), dtype=torch.float32, device=dev)     # [T, K]
    ids = torch.empty((t, top_k), dtype=torch.int64, device=dev)           # [T, K]
    if t == 0:
        return weights, ids
    logits = router_logits if router_logits.stride(1) == 1 else router_logits.contiguous()
    e_pad = triton.next_power_of_2(e)
    block_t = max(1, min(16, 4096 // e_pad))
    sigmoid = scoring == "sigmoid"
    _topk_kernel[(triton.cdiv(t, block_t),)](
        logits, weights, ids, t, e, logits.stride(0),
        TOP_K=top_k, K_PAD=triton.next_power_of_2(top_k),
        RENORMALIZE=renormalize and not sigmoid, SIGMOID=sigmoid, BLOCK_T=block_t, E_PAD=e_pad,
        num_warps=4, **pdl_launch(dev))
    return weights, ids


# ---------------------------------------------------------------------- router GEMM + top-k
# At decode the router is a [T<=4, H] x [H, E] product: cuBLAS runs it as a split-K GEMM plus a
# reduction kernel (~6 us of a Mixtral layer on the H200, more than the GEMM's bytes need) and
# the top-k kernel follows. One kernel does both here. Each program computes the logits of a
# block of tokens for a slice of the experts (whole dot products over H, so the fp32 sums do not
# depend on the split), rounds them to the model dtype exactly as the unfused bf16 linear's
# output is rounded, and selects with _select_topk. With several expert slices (many experts:
# one program streaming all of Qwen3-MoE's 128 x 2048 router would be bound by one SM's
# bandwidth), each slice stores its logits and takes a ticket; the last slice of a token block
# to arrive does the top-k and resets the ticket for the next launch (CUDA-graph safe: the
# counters are always left at zero).
ROUTER_TOPK_MAX_T = 64         # above: cuBLAS (the kernel re-reads the router per token block)
_GEMV_MAX_T = 4                # up to here broadcast-multiply-sum; above, tl.dot on 16-row blocks
_SLICE_BYTES = 64 * 1024       # router bytes one program streams before the experts are split
_GEMV_TILE = 32768             # elements of the GEMV form's register tile (Mixtral: all 8 x 4096)
_MAX_TICKETS = triton.cdiv(ROUTER_TOPK_MAX_T, 16)
_TICKETS = TicketCounters(min_size=_MAX_TICKETS)   # kernels/tickets.py: one per token block


@triton.jit(do_not_specialize=["num_tokens"])
def _router_topk_kernel(x_ptr, w_ptr, logits_ptr, ticket_ptr, weights_ptr, ids_ptr,
                        num_tokens, num_experts, H, stride_xt, stride_we,
                        TOP_K: tl.constexpr, K_PAD: tl.constexpr, RENORMALIZE: tl.constexpr,
                        SIGMOID: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
                        E_PAD: tl.constexpr, BLOCK_H: tl.constexpr, SPLIT: tl.constexpr,
                        DOT: tl.constexpr, IEEE: tl.constexpr, USE_PDL: tl.constexpr):
    pid_t, pid_e = tl.program_id(0), tl.program_id(1)
    tokens = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    rows = tl.minimum(tokens, num_tokens - 1).to(tl.int64)   # tail tokens redo the last one
    experts = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    e_ok = experts < num_experts
    w_rows = w_ptr + experts.to(tl.int64) * stride_we
    # GEMV form (decode): the router weight is static, so its first chunk is fetched before
    # the wait (PDL), the rest one chunk ahead of use; a chunk is usually the whole slice, so
    # all of the weight is in flight before the wait and only x is read after it. The tl.dot
    # form loads as it goes and leaves the pipelining to Triton.
    if not DOT:
        hs = tl.arange(0, BLOCK_H)
        w = tl.load(w_rows[:, None] + hs[None, :], mask=e_ok[:, None] & (hs[None, :] < H),
                    other=0.0)                                                # [BE, BH]
    pdl_wait(USE_PDL)                  # x is the predecessor's output
    pdl_launch_dependents(USE_PDL)
    acc = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        hs = h0 + tl.arange(0, BLOCK_H)
        nxt = hs + BLOCK_H
        if DOT:
            x = tl.load(x_ptr + rows[:, None] * stride_xt + hs[None, :], mask=hs[None, :] < H,
                        other=0.0)                                            # [BT, BH]
            wd = tl.load(w_rows[None, :] + hs[:, None], mask=e_ok[None, :] & (hs[:, None] < H),
                         other=0.0)                                           # [BH, BE]
            if IEEE:   # fp32 models: full precision, not TF32, like F.linear
                acc = tl.dot(x, wd, acc, input_precision="ieee")
            else:
                acc = tl.dot(x, wd, acc)
        else:
            w_next = tl.load(w_rows[:, None] + nxt[None, :],
                             mask=e_ok[:, None] & (nxt[None, :] < H), other=0.0)
            wf = w.to(tl.float32)
            for i in tl.static_range(BLOCK_T):   # the [BE, BH] tile serves every token
                row = tl.minimum(pid_t * BLOCK_T + i, num_tokens - 1).to(tl.int64)
                xi = tl.load(x_ptr + row * stride_xt + hs, mask=hs < H,
                             other=0.0).to(tl.float32)                             # [BH]
                part = tl.sum(wf * xi[None, :], axis=1)                             # [BE]
                acc = tl.where(tl.arange(0, BLOCK_T)[:, None] == i, acc + part[None, :], acc)
            w = w_next
    # The unfused router returns logits in the model dtype: round the same way.
    logits = acc.to(x_ptr.dtype.element_ty).to(tl.float32)                   # [BT, BE]
    logits = tl.where(e_ok[None, :], logits, float("-inf"))
    if SPLIT:
        tok_ok = tokens < num_tokens
        tl.store(logits_ptr + tokens[:, None].to(tl.int64) * num_experts + experts[None, :],
                 logits, mask=tok_ok[:, None] & e_ok[None, :])
        tl.debug_barrier()             # every thread's logits stored before the release
        ticket = tl.atomic_add(ticket_ptr + pid_t, 1, sem="acq_rel")
        if ticket == tl.num_programs(1) - 1:     # the last slice of this token block
            tl.debug_barrier()
            all_e = tl.arange(0, E_PAD)
            all_ok = all_e < num_experts
            full = tl.load(logits_ptr + rows[:, None] * num_experts + all_e[None, :],
                           mask=all_ok[None, :], other=float("-inf"),
                           cache_modifier=".cg")                               # [BT, E_PAD]
            weights, ids = _select_topk(full, all_ok, TOP_K, K_PAD, RENORMALIZE, SIGMOID,
                                        BLOCK_T, E_PAD)
            _store_topk(weights_ptr, ids_ptr, weights, ids, tokens, num_tokens, TOP_K, K_PAD)
            tl.atomic_xchg(ticket_ptr + pid_t, 0)
    else:
        weights, ids = _select_topk(logits, e_ok, TOP_K, K_PAD, RENORMALIZE, SIGMOID, BLOCK_T,
                                    BLOCK_E)
        _store_topk(weights_ptr, ids_ptr, weights, ids, tokens, num_tokens, TOP_K, K_PAD)


def router_topk_config(t: int, e: int, h: int, dtype: torch.dtype) -> dict:
    """Tiles for T tokens, E experts, H hidden: the GEMV form for T <= _GEMV_MAX_T (one token
    block), else tl.dot on 16-token blocks with E padded to >= 16; experts split into slices of
    at most _SLICE_BYTES of router weight (at least 16 experts for tl.dot). The GEMV form keeps
    a slice's whole [BE, H] tile in registers (up to _GEMV_TILE elements, 16 warps): one DRAM
    round trip rather than a chain of dependent chunk loads."""
    dot = t > _GEMV_MAX_T
    block_t = 16 if dot else triton.next_power_of_2(t)
    e_pad = max(16 if dot else 1, triton.next_power_of_2(e))
    block_e = e_pad
    min_e = 16 if dot else 1
    while block_e > min_e and block_e * h * dtype.itemsize > _SLICE_BYTES:
        block_e //= 2
    if dot:
        block_h, warps = 128, 4
    else:
        block_h = max(16, min(triton.next_power_of_2(h), _GEMV_TILE // block_e))
        tile = block_e * block_h
        warps = 16 if tile >= 16384 else 8 if tile >= 4096 else 4
    return dict(BLOCK_T=block_t, BLOCK_E=block_e, E_PAD=e_pad, BLOCK_H=block_h, DOT=dot,
                num_warps=warps)


@eager_only  # launched eagerly from compiled graphs (a graph break), not traced
def router_topk(x: torch.Tensor, weight: torch.Tensor, top_k: int, renormalize: bool,
                scoring: str = "softmax", config: dict | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, H] (T <= ROUTER_TOPK_MAX_T), router weight [E, H] of x's dtype ->
    (weights [T, K] float32, ids [T, K] int64): topk_softmax(F.linear(x, weight), ...) in one
    launch. Logits are accumulated in fp32 and rounded to x.dtype as F.linear's output is, so
    the results equal the unfused path's whenever both GEMMs round to the same logits (always
    for exact sums; otherwise up to where fp32 summation order moves a rounding boundary, as a
    different cuBLAS algorithm would). config: tile overrides (tests)."""
    _check_scoring(scoring)
    t, h = x.shape
    e = weight.shape[0]
    dev = x.device
    weights = torch.empty((t, top_k), dtype=torch.float32, device=dev)     # [T, K]
    ids = torch.empty((t, top_k), dtype=torch.int64, device=dev)           # [T, K]
    if t == 0:
        return weights, ids
    if x.stride(1) != 1:
        x = x.contiguous()
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    cfg = router_topk_config(t, e, h, x.dtype)
    cfg.update(config or {})
    splits = cfg["E_PAD"] // cfg["BLOCK_E"]
    t_blocks = triton.cdiv(t, cfg["BLOCK_T"])
    # None while a CUDA graph is captured before any counters exist: handled below.
    tickets = (_TICKETS.get(dev, _MAX_TICKETS) if splits > 1 and t_blocks <= _MAX_TICKETS
               else None)
    if splits > 1 and tickets is None:   # no counters: one program per token block
        cfg["BLOCK_E"], splits = cfg["E_PAD"], 1
    logits = torch.empty((t, e) if splits > 1 else (1,), dtype=torch.float32, device=dev)
    sigmoid = scoring == "sigmoid"
    _router_topk_kernel[(t_blocks, splits)](
        x, weight, logits, tickets if tickets is not None else ids, weights, ids,
        t, e, h, x.stride(0), weight.stride(0),
        TOP_K=top_k, K_PAD=triton.next_power_of_2(top_k),
        RENORMALIZE=renormalize and not sigmoid, SIGMOID=sigmoid, SPLIT=splits > 1,
        IEEE=x.dtype == torch.float32, **cfg, **pdl_launch(dev))
    return weights, ids


# -------------------------------------------------------------------------------- alignment
@triton.jit(do_not_specialize=["num_pairs"])
def _align_kernel(ids_ptr, pairs_ptr, block_expert_ptr, num_pairs, num_experts, num_rows,
                  BLOCK_M: tl.constexpr, E_PAD: tl.constexpr, CHUNK: tl.constexpr,
                  BLOCK_B: tl.constexpr, USE_PDL: tl.constexpr):
    """One program, in phases: fill every padded row with the padding value; count pairs per
    expert (one-hot sums over chunks of pairs); padded group offsets; place each pair at its
    expert's next free row + its rank among the chunk's pairs of that expert (a one-hot
    cumsum, so the order within an expert is the pair order); the expert of each block."""
    pdl_wait(USE_PDL)                  # ids come from the top-k kernel; the outputs may still
    pdl_launch_dependents(USE_PDL)     # be read by the previous layer's expert kernels
    experts = tl.arange(0, E_PAD)
    e_ok = experts < num_experts     # padding columns and the remote id E match no expert
    for r0 in range(0, num_rows, CHUNK):
        rows = r0 + tl.arange(0, CHUNK)
        tl.store(pairs_ptr + rows, tl.full((CHUNK,), 0, tl.int32) + num_pairs,
                 mask=rows < num_rows)
    counts = tl.zeros((E_PAD,), dtype=tl.int32)
    for p0 in range(0, num_pairs, CHUNK):
        pairs = p0 + tl.arange(0, CHUNK)
        ids = tl.load(ids_ptr + pairs, mask=pairs < num_pairs, other=-1).to(tl.int32)
        onehot = ((ids[:, None] == experts[None, :]) & e_ok[None, :]).to(tl.int32)  # [C, E_PAD]
        counts += tl.sum(onehot, axis=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    pad_end = tl.cumsum(padded, axis=0)                                      # [E_PAD]
    next_row = pad_end - padded              # where each expert's next pair goes
    tl.debug_barrier()                       # the fill lands before any pair
    for p0 in range(0, num_pairs, CHUNK):
        pairs = p0 + tl.arange(0, CHUNK)
        ids = tl.load(ids_ptr + pairs, mask=pairs < num_pairs, other=-1).to(tl.int32)
        onehot = ((ids[:, None] == experts[None, :]) & e_ok[None, :]).to(tl.int32)  # [C, E_PAD]
        rank = tl.cumsum(onehot, axis=0) - 1                 # rank among the chunk's pairs of e
        dest = tl.sum(onehot * (rank + next_row[None, :]), axis=1)                   # [C]
        local = tl.sum(onehot, axis=1) > 0                   # real pair of a local expert
        tl.store(pairs_ptr + dest, pairs, mask=local)
        next_row += tl.sum(onehot, axis=0)
    # Block b belongs to the first expert whose padded end exceeds b*BLOCK_M (E past the end):
    # the number of experts ending at or before it, i.e. searchsorted(pad_end, ., right=True).
    ends = tl.where(e_ok, pad_end, 2147483647)
    for b0 in range(0, num_rows // BLOCK_M, BLOCK_B):
        blocks = b0 + tl.arange(0, BLOCK_B)
        done = (ends[None, :] <= blocks[:, None] * BLOCK_M).to(tl.int32)         # [BB, E_PAD]
        tl.store(block_expert_ptr + blocks, tl.sum(done, axis=1),
                 mask=blocks < num_rows // BLOCK_M)


@eager_only  # launched eagerly from compiled graphs (a graph break), not traced
def align_by_expert_triton(topk_ids: torch.Tensor, num_experts: int, block_m: int
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """topk_ids [T, K] -> (sorted_pairs [P] int32, block_expert [P // block_m] int32), exactly
    kvflow.kernels.fused_moe.align_by_expert: P = T*K + E*(block_m-1) rounded up to block_m,
    pairs of an expert in their original order, padding rows = T*K, ids == E (remote) get no
    row, blocks past the last used one -> E."""
    flat = topk_ids.reshape(-1).contiguous()                     # [T*K]
    n = flat.numel()
    p = triton.cdiv(n + num_experts * (block_m - 1), block_m) * block_m
    sorted_pairs = torch.empty((p,), dtype=torch.int32, device=flat.device)          # [P]
    block_expert = torch.empty((p // block_m,), dtype=torch.int32, device=flat.device)
    e_pad = triton.next_power_of_2(num_experts)
    chunk = max(16, 4096 // e_pad)           # one-hot tile [CHUNK, E_PAD] of ~4K elements
    _align_kernel[(1,)](flat, sorted_pairs, block_expert, n, num_experts, p,
                        BLOCK_M=block_m, E_PAD=e_pad, CHUNK=chunk,
                        BLOCK_B=max(16, 4096 // e_pad), num_warps=8,
                        **pdl_launch(flat.device))
    return sorted_pairs, block_expert


# ------------------------------------------------------------------------------------- combine
@triton.jit
def _sum_kernel(in_ptr, out_ptr, H, stride_it, stride_ik, stride_ot,
                TOP_K: tl.constexpr, BLOCK_H: tl.constexpr, USE_PDL: tl.constexpr):
    pdl_wait(USE_PDL)                  # the expert outputs are the predecessor's
    pdl_launch_dependents(USE_PDL)
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    ok = cols < H
    acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for k in tl.static_range(TOP_K):            # k = 0..K-1 in order (deterministic)
        acc += tl.load(in_ptr + t * stride_it + k * stride_ik + cols, mask=ok,
                       other=0.0).to(tl.float32)
    tl.store(out_ptr + t * stride_ot + cols, acc.to(out_ptr.dtype.element_ty), mask=ok)


@eager_only  # launched eagerly from compiled graphs (a graph break), not traced
def moe_sum(out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """out [T, K, H] (per-pair expert outputs) -> [T, H] dtype: the K rows of a token summed in
    fp32 in order (k = 0..K-1), rounded once, as out.float().sum(1).to(dtype) where torch adds
    in order."""
    t, k, h = out.shape
    if out.stride(2) != 1:
        out = out.contiguous()
    res = torch.empty((t, h), dtype=dtype, device=out.device)                # [T, H]
    if t == 0:
        return res
    block_h = min(1024, triton.next_power_of_2(h))
    _sum_kernel[(t, triton.cdiv(h, block_h))](
        out, res, h, out.stride(0), out.stride(1), res.stride(0),
        TOP_K=k, BLOCK_H=block_h, num_warps=4, **pdl_launch(out.device))
    return res
