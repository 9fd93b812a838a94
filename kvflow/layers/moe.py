"""Mixture-of-experts block: a replicated router, softmax top-k routing, stacked expert weights.

Expert weights live in two stacked parameters so one kernel call can serve every expert:
    w13 [E, 2*I, H]   gate (w1) rows then up (w3) rows, like MergedColumnParallelLinear
    w2  [E, H, I]     down projection
Checkpoints store one tensor per expert and projection (Mixtral `experts.{e}.w1/w2/w3`,
Qwen3-MoE `experts.{e}.gate_proj/up_proj/down_proj`), or all experts in two fused tensors
(Llama 4 `experts.gate_up_proj` [E, H, 2I] / `experts.down_proj` [E, I, H]). A model lists them in
`expert_params_mapping` (see `make_expert_params_mapping`); the generic loader turns a checkpoint
name into the stacked parameter's name plus shard id `(expert_id, "w1"|"w3"|"w2")`, and the
parameter's `weight_loader` copies the tensor into that expert's slice.

Tensor parallelism (default) shards every expert's intermediate dim I across ranks: w13
column-wise (each rank holds rows [r*I/tp, (r+1)*I/tp) of both gate and up), w2 row-wise, and the
combined output is all-reduced — the same split as the dense MLP, so the router and the combine are
replicated.

Expert parallelism (`enable_expert_parallel=True`, see kvflow/distributed.py) instead gives each
rank whole experts (a contiguous range, `expert_placement.py`) and keeps I unsharded. Dispatch and
combine: every rank routes all tokens (the router is replicated, so all ranks agree on the top-k),
maps the global expert ids to local slots (remote ones become a sentinel the kernels skip),
computes only its own experts' weighted contributions, and one all-reduce sums them — the same
collective, same shape, as the TP path. Its cost is an all-reduce of [T, H] per layer whatever
the routing. The alternative, all-to-all dispatch (send each token only to the ranks owning its
experts, then all-to-all back), moves T*K/ranks rows instead and pays off across nodes or at large
EP sizes; it needs per-step variable-size exchanges and is not implemented.

Routing: `route` = router GEMM + `select_experts`, one Triton kernel on the fused path (see
`route`), else the linear layer and the top-k separately.

Compute: `fused_moe` — the Triton grouped GEMM on CUDA (kvflow/kernels/fused_moe.py; default,
KVFLOW_FUSED_MOE=0 turns it off, and the Triton top-k of `select_experts` with it), else the
torch reference `fused_moe_torch` (tokens sorted by expert, one matmul per expert on its
contiguous rows, weighted scatter-add combine). The Triton path sizes everything from shapes
(no host sync), so MoE models capture CUDA graphs exactly when it is in use
(`moe_dispatch_graph_safe`); the reference reads expert counts back to the host.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from kvflow import envs
from kvflow.compilation.eager import eager_only
from kvflow.distributed import (get_ep_rank, get_ep_size, get_moe_tp_rank, get_moe_tp_size,
                                tp_all_reduce)
from kvflow.layers import ops
from kvflow.layers.expert_placement import ExpertPlacement
from kvflow.layers.loader_ref import weight_loader_of
from kvflow.layers.linear import LinearBase, ReplicatedLinear, _checked, _param

try:
    from kvflow.kernels import HAS_TRITON as _HAS_TRITON
except ImportError:  # pragma: no cover - kernels always import; triton may not
    _HAS_TRITON = False

# Checkpoint projection name -> our shard name, per checkpoint spelling.
MIXTRAL_EXPERT_NAMES = {"w1": "w1", "w3": "w3", "w2": "w2"}
QWEN_EXPERT_NAMES = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}


def make_expert_params_mapping(num_experts: int, ckpt_names: dict[str, str]
                               ) -> list[tuple[str, str, int, str]]:
    """-> [(parameter fragment, checkpoint fragment, expert id, shard name)], e.g.
    (".experts.w13", ".experts.3.w1.weight", 3, "w1"). Fragments carry their dots and the
    `.weight` suffix so expert 1 never matches expert 10 and the result is the parameter name."""
    out = []
    for e in range(num_experts):
        for ckpt, which in ckpt_names.items():
            param = "w2" if which == "w2" else "w13"
            out.append((f".experts.{param}", f".experts.{e}.{ckpt}.weight", e, which))
    return out


def make_stacked_expert_params_mapping() -> list[tuple[str, Optional[int], str, str]]:
    """Checkpoints that store all experts of a layer in two fused tensors (HF Llama 4):
        experts.gate_up_proj [E, H, 2I]  (x @ w: gate columns then up columns)
        experts.down_proj    [E, I, H]
    -> the same mapping shape as make_expert_params_mapping with expert id None ("all")."""
    return [(".experts.w13", ".experts.gate_up_proj", None, "gate_up_stacked"),
            (".experts.w2", ".experts.down_proj", None, "down_stacked")]


def select_experts(router_logits: torch.Tensor, top_k: int, renormalize: bool,
                   scoring: str = "softmax") -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits [T, E] -> (weights [T, K] float32, expert ids [T, K] int64).

    scoring "softmax" (Mixtral, Qwen-MoE): softmax in float32 before top-k, as HF does;
    renormalised top-k weights sum to 1.
    scoring "sigmoid" (Llama 4): top-k of the raw logits, each weight sigmoid(logit) in
    float32, independent of the other experts (never renormalised).

    On CUDA with the fused MoE kernel, one Triton kernel (kvflow/kernels/moe_routing.py) does
    the scoring and selection in eager and CUDA-graph runs; elsewhere these torch ops."""
    # Under torch.compile the torch ops are traced instead (inductor fuses them; the Triton
    # kernel is not a traceable op).
    if router_logits.is_cuda and moe_dispatch_graph_safe() and not torch.compiler.is_compiling():
        from kvflow.kernels.moe_routing import topk_softmax
        return topk_softmax(router_logits, top_k, renormalize, scoring)
    if scoring == "sigmoid":
        logits, ids = torch.topk(router_logits, top_k, dim=-1)
        return torch.sigmoid(logits.float()), ids
    if scoring != "softmax":
        raise ValueError(f"MoE scoring must be 'softmax' or 'sigmoid', got {scoring!r}")
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


_ROUTER_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def route(gate: LinearBase, x: torch.Tensor, top_k: int, renormalize: bool,
          scoring: str = "softmax") -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, H] -> (weights [T, K] float32, expert ids [T, K] int64):
    select_experts(gate(x), ...), the router GEMM included.

    Where select_experts would run its Triton top-k (CUDA, fused MoE on, not being compiled)
    and the router is a plain replicated matrix (no bias, not quantized, x's dtype) of at most
    ROUTER_TOPK_MAX_T tokens, one kernel (moe_routing.router_topk) computes the logits and
    selects: a decode layer saves cuBLAS's split-K GEMM + reduction and a launch. Nothing here
    needs the logits themselves (no aux loss, no returned router logits). Elsewhere: unfused."""
    if (x.is_cuda and moe_dispatch_graph_safe() and not torch.compiler.is_compiling()
            and gate.quant_method is None and gate.bias is None and x.dim() == 2
            and x.dtype in _ROUTER_DTYPES and gate.weight.dtype == x.dtype):
        from kvflow.kernels.moe_routing import ROUTER_TOPK_MAX_T, router_topk
        if x.shape[0] <= ROUTER_TOPK_MAX_T:
            return router_topk(x, gate.weight, top_k, renormalize, scoring)
    return select_experts(gate(x), top_k, renormalize, scoring)


@eager_only  # data-dependent per-expert row counts: keep it out of the graph
def fused_moe_torch(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                    topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """Reference MoE: x [T, H], w13 [E, 2I, H], w2 [E, H, I], topk_* [T, K] -> [T, H].

    topk_ids are local slots in [0, E]; E means "an expert on another rank" (expert parallel):
    such pairs contribute nothing here. The T*K (token, expert) pairs are sorted by expert so
    each expert's rows are one contiguous slice of the gathered activations (remote pairs sort
    last); the loop is over experts that received tokens, never over tokens. Outputs are weighted
    and scatter-added back to their tokens."""
    t, k = topk_ids.shape
    num_experts = w13.shape[0]
    flat_ids = topk_ids.reshape(-1)                                   # [T*K]
    order = torch.argsort(flat_ids, stable=True)                      # pairs grouped by expert
    token_of = order // k                                             # [T*K] source token
    xs = x.index_select(0, token_of)                                  # [T*K, H] sorted rows
    counts = torch.bincount(flat_ids, minlength=num_experts + 1)[:num_experts].tolist()  # 1 sync
    out = torch.empty_like(xs)
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        rows = xs[start:start + n]                                    # [n, H]
        h = ops.silu_and_mul(F.linear(rows, w13[e]))                  # [n, I]
        out[start:start + n] = F.linear(h, w2[e])                     # [n, H]
        start += n
    # Rows [start:] are remote pairs (never written): only the local prefix is combined.
    w = topk_weights.reshape(-1).index_select(0, order[:start])       # [local pairs] float32
    out = (out[:start].float() * w.unsqueeze(1)).to(x.dtype)
    return torch.zeros_like(x).index_add_(0, token_of[:start], out)


def moe_dispatch_graph_safe() -> bool:
    """True when MoE layers on CUDA take the sync-free Triton path (CUDA graphs possible)."""
    return _HAS_TRITON and envs.fused_moe_kernel()


class GraphSafeWhenFusedMoE:
    """Mixin for MoE models: CUDA graphs are supported exactly when the dispatch is sync-free
    (read by the worker; evaluated at startup, after the environment is final)."""

    @property
    def supports_cuda_graphs(self) -> bool:
        return moe_dispatch_graph_safe()


def fused_moe(x, w13, w2, topk_weights, topk_ids, has_remote: bool = False) -> torch.Tensor:
    """Dispatch point: the Triton kernel on CUDA when enabled, else the torch reference; one
    opaque custom op (kvflow::fused_moe) under torch.compile. has_remote: topk_ids may hold
    the remote sentinel E (expert parallel)."""
    if torch.compiler.is_compiling():
        return fused_moe_op(x, w13, w2, topk_weights, topk_ids, has_remote)
    # Eager (and CUDA graph captures): the implementation itself. Through the custom op an
    # eager call pays a dispatcher hop, and its first call imports torch._dynamo (~2 s of an
    # engine start that never compiles).
    return _fused_moe_impl(x, w13, w2, topk_weights, topk_ids, has_remote)


def _fused_moe_impl(x, w13, w2, topk_weights, topk_ids, has_remote: bool) -> torch.Tensor:
    if x.is_cuda and _HAS_TRITON and envs.fused_moe_kernel():
        from kvflow.kernels.fused_moe import fused_moe as kernel
        return kernel(x, w13, w2, topk_weights, topk_ids, has_remote=has_remote)
    return fused_moe_torch(x, w13, w2, topk_weights, topk_ids)


# The experts are one opaque op to torch.compile, like attention: both implementations size
# their work from data (per-expert row counts; the reference even reads them back to the host),
# which dynamo cannot trace, and a torch.compiler.disable'd call inside the forward is a graph
# break, which compile_model's fullgraph=True rejects. As a custom op the compiled graph stays
# whole around it (routing before and the all-reduce after are traced).
@torch.library.custom_op("kvflow::fused_moe", mutates_args=())
def fused_moe_op(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                 topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                 has_remote: bool) -> torch.Tensor:
    # A custom op must not return (a view of) an input; both paths return fresh tensors.
    return _fused_moe_impl(x, w13, w2, topk_weights, topk_ids, has_remote)


@fused_moe_op.register_fake
def _fused_moe_fake(x, w13, w2, topk_weights, topk_ids, has_remote):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


class FusedMoE(nn.Module):
    """The experts of one layer, stacked: this rank's experts (all of them unless expert
    parallel), each with this rank's slice of the intermediate dim (all of it under EP)."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.placement = ExpertPlacement(num_experts, get_ep_rank(), get_ep_size())
        # Invariant: at most one of (placement.size, shard_size) exceeds 1.
        self.shard_rank, self.shard_size = get_moe_tp_rank(), get_moe_tp_size()
        if intermediate_size % self.shard_size:
            raise ValueError(f"tensor_parallel_size={self.shard_size} must divide the experts' "
                             f"intermediate size ({intermediate_size})")
        self.num_experts = num_experts                                # global
        local = self.placement.num_local
        self.intermediate = intermediate_size // self.shard_size      # per rank
        self.w13 = _param((local, 2 * self.intermediate, hidden_size))  # [E_local, 2I/tp, H]
        self.w2 = _param((local, hidden_size, self.intermediate))       # [E_local, H, I/tp]
        self.w13.weight_loader = weight_loader_of(self)
        self.w2.weight_loader = weight_loader_of(self)
        # Global router id -> local slot or the remote sentinel (identity without EP).
        self.register_buffer("expert_map", self.placement.global_to_local(), persistent=False)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        """shard_id = (global expert id, "w1" | "w3" | "w2"); loaded is that expert's full
        checkpoint tensor ([I, H] for w1/w3, [H, I] for w2). Experts of other EP ranks are
        skipped (nothing copied). Or (None, "gate_up_stacked" | "down_stacked"): every expert
        at once in HF Llama 4's fused layout (see make_stacked_expert_params_mapping),
        transposed and split here."""
        if not (isinstance(shard_id, tuple) and len(shard_id) == 2):
            raise ValueError(f"expert weights need an (expert id, w1/w2/w3) shard id, got {shard_id!r}")
        expert, which = shard_id
        if expert is None:
            self._load_stacked(param, loaded, which)
            return
        slot = self.placement.local_slot(expert)          # raises on an out-of-range id
        n, start = self.intermediate, self.shard_rank * self.intermediate
        full_i, hidden = n * self.shard_size, self.w2.shape[1]
        if which in ("w1", "w3"):
            want = (full_i, hidden)
        elif which == "w2":
            want = (hidden, full_i)
        else:
            raise ValueError(f"expert shard must be w1, w2 or w3, got {which!r}")
        # Check the whole tensor before narrowing: a transposed [I, H] would otherwise slice.
        if tuple(loaded.shape) != want:
            raise ValueError(f"shape mismatch: expert {which} expects {want}, checkpoint "
                             f"{tuple(loaded.shape)}")
        if slot is None:
            return   # another expert-parallel rank owns this expert
        if which == "w2":
            dst = param.data[slot]                                               # [H, I/tp]
        else:
            dst = param.data[slot].narrow(0, 0 if which == "w1" else n, n)       # [I/tp, H]
        src = loaded.narrow(0 if which != "w2" else 1, start, n)
        dst.copy_(_checked(src, dst))

    def _load_stacked(self, param: nn.Parameter, loaded: torch.Tensor, which: str) -> None:
        e, n = self.num_experts, self.intermediate
        start, full_i, hidden = self.shard_rank * n, n * self.shard_size, self.w2.shape[1]
        mine = self.placement.local                         # this rank's experts (all without EP)
        if which == "gate_up_stacked":
            want = (e, hidden, 2 * full_i)                  # [E, H, 2I]: gate | up columns
            if tuple(loaded.shape) != want:
                raise ValueError(f"shape mismatch: experts.gate_up_proj expects {want}, "
                                 f"checkpoint {tuple(loaded.shape)}")
            loaded = loaded[mine.start:mine.stop]           # [E_local, H, 2I]
            gate = loaded.narrow(2, start, n)               # [E_local, H, I/tp]
            up = loaded.narrow(2, full_i + start, n)
            param.data[:, :n].copy_(gate.transpose(1, 2))   # -> [E, I/tp, H]
            param.data[:, n:].copy_(up.transpose(1, 2))
        elif which == "down_stacked":
            want = (e, full_i, hidden)                      # [E, I, H]
            if tuple(loaded.shape) != want:
                raise ValueError(f"shape mismatch: experts.down_proj expects {want}, "
                                 f"checkpoint {tuple(loaded.shape)}")
            loaded = loaded[mine.start:mine.stop]           # [E_local, I, H]
            param.data.copy_(loaded.narrow(1, start, n).transpose(1, 2))   # -> [E_local, H, I/tp]
        else:
            raise ValueError(f"stacked expert shard must be gate_up_stacked or down_stacked, "
                             f"got {which!r}")

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                weights_on_input: bool = False) -> torch.Tensor:
        """weights_on_input (Llama 4): each expert sees its input already scaled by the routing
        weight, expert(w * x), and outputs are summed unweighted -- not w * expert(x), which
        differs because the expert is nonlinear. Top-1 only: then the scaling is one per token
        and the kernels (which gather unscaled rows of x) stay as they are."""
        if weights_on_input:
            if topk_ids.shape[1] != 1:
                raise ValueError("weights_on_input MoE routing needs top_k == 1")
            x = x * topk_weights.to(x.dtype)                 # [T, H] * [T, 1], in the model dtype
            topk_weights = torch.ones_like(topk_weights)
        # [T, K] local slots / remote sentinel; without EP the map is the identity (skip the
        # gather: one kernel per layer per step).
        local_ids = self.expert_map[topk_ids] if self.placement.is_partitioned else topk_ids
        # Each rank computes a partial sum (its slice of I, or its experts); sum them.
        return tp_all_reduce(fused_moe(x, self.w13, self.w2, topk_weights, local_ids,
                                       has_remote=self.placement.is_partitioned))


class SparseMoeBlock(nn.Module):
    """Router + experts. Parameter names match the checkpoints: `gate.weight` [E, H] and the
    stacked `experts.w13` / `experts.w2`."""

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int,
                 renormalize: bool):
        super().__init__()
        if not 0 < top_k <= num_experts:
            raise ValueError(f"num_experts_per_tok={top_k} must be in [1, num_experts={num_experts}]")
        self.top_k, self.renormalize = top_k, renormalize
        self.gate = ReplicatedLinear(hidden_size, num_experts, bias=False)
        self.experts = FusedMoE(num_experts, hidden_size, intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, H] -> [T, H]."""
        weights, ids = route(self.gate, x, self.top_k, self.renormalize)
        return self.experts(x, weights, ids)
