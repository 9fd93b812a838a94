"""Linear layers that know how to load (and shard) their own checkpoint weights.

Each parameter carries a `weight_loader(param, loaded_weight, shard_id=None)`; the generic model
loader only maps checkpoint names to parameters and calls it. Column-parallel layers split the
output dimension across tensor-parallel ranks, row-parallel ones the input dimension (followed by
an all-reduce). With one rank the narrowing is the identity.

With a `quant_config` (e.g. GPTQ) the layer holds no dense `weight`: its quant method creates
the quantized parameters and computes the product. Those loaders shard through the geometry
every layer states once: `_out_shard(shard_id)` and `_in_shard()` (see LinearBase).

Without one, every product goes through `dense_linear` (the LM head's too): F.linear, or with
KVFLOW_SKINNY_GEMM=1 the Triton skinny GEMM for few-row CUDA inputs (decode).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kvflow import envs
from kvflow.distributed import get_tp_rank, get_tp_size, tp_all_reduce
from kvflow.layers.norm_fold import NormedHidden, fold_ok
from kvflow.layers.loader_ref import weight_loader_of
from kvflow.kernels import cublaslt
from kvflow.layers import ops, row_pad, split_k_norm

_SKINNY_DTYPES = (torch.float16, torch.bfloat16)


def dense_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                 skinny: bool = False, silu_mul_input: bool = False,
                 out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x [..., K] @ weight[N, K]^T (+ bias): the one place unquantized layers multiply.

    skinny (the layer's KVFLOW_SKINNY_GEMM, read when it was built): CUDA fp16/bf16 inputs of at
    most skinny_gemm.MAX_M rows use the Triton skinny GEMM unless the device's tuned table says
    cuBLAS wins on that shape. The row count is only known at run time under torch.compile (the
    token dimension is symbolic), so compiled graphs call the opaque op kvflow::skinny_linear,
    which decides when it runs; eager calls decide here. Everything else (CPU, fp32, off) is
    exactly F.linear.

    silu_mul_input: x is [..., 2K] = gate | up and the product is silu_and_mul(x) @ W^T (a
    gated MLP's down projection). Where the skinny GEMM runs, it applies the activation as it
    loads x (one launch fewer per layer at decode, same rounding); elsewhere the activation
    kernel runs first.

    out: a contiguous [..., N] tensor of x's dtype to hold the result (returned). cuBLAS
    writes it directly; the skinny GEMM's own output is copied into it."""
    if skinny and x.is_cuda and _skinny_dtypes_ok(x, weight, bias):
        if torch.compiler.is_compiling():
            # Compiled graphs trace the activation (inductor fuses it) and keep the product.
            if silu_mul_input:
                x = ops.silu_and_mul(x)
            return _into(torch.ops.kvflow.skinny_linear(x, weight, bias), out)
        return _skinny_linear(x, weight, bias, silu_mul_input, out)
    if silu_mul_input:
        x = ops.silu_and_mul(x)
    return _linear(x, weight, bias, out)


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
            out: Optional[torch.Tensor]) -> torch.Tensor:
    """F.linear, or the same product written by cuBLAS into `out`; at more rows where the
    device's table says cuBLAS is faster there (layers/row_pad.py); with another cuBLASLt
    algorithm where the device's table says it is faster (kernels/cublaslt.py)."""
    x2 = x.reshape(-1, x.shape[-1])
    o2 = out.view(-1, weight.shape[0]) if out is not None else None
    if bias is None and x.is_cuda:
        choice = cublaslt.choose(x2, weight)
        y = cublaslt.linear(x2, weight, choice, o2) if choice is not None else None
        if y is not None:
            return out if out is not None else y.view(*x.shape[:-1], weight.shape[0])
    if out is None:
        rows = row_pad.padded_rows(x2, weight)
        if rows is not None:
            y = row_pad.linear_padded(x2, weight, bias, rows)
            return y.view(*x.shape[:-1], weight.shape[0])
        return F.linear(x, weight, bias)
    if bias is None:
        torch.mm(x2, weight.t(), out=o2)
    else:
        torch.addmm(bias, x2, weight.t(), out=o2)
    return out


def _into(result: torch.Tensor, out: Optional[torch.Tensor]) -> torch.Tensor:
    return result if out is None else out.copy_(result)


def _skinny_dtypes_ok(x: torch.Tensor, weight: torch.Tensor,
                      bias: Optional[torch.Tensor]) -> bool:
    """The skinny GEMM's operands: fp16 / bf16, weight and bias of the input's dtype."""
    return (x.dtype in _SKINNY_DTYPES and weight.dtype == x.dtype
            and (bias is None or bias.dtype == x.dtype))


def _skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                   silu_mul_input: bool = False,
                   out: Optional[torch.Tensor] = None) -> torch.Tensor:
    from kvflow import kernels
    k, n = weight.shape[1], weight.shape[0]
    kx = x.shape[-1]                                       # k, or 2k with silu_mul_input
    m = x.numel() // kx if kx else 0
    if kernels.HAS_TRITON and weight.stride(-1) == 1:
        import kvflow.kernels.skinny_gemm as sg
        cfg = sg.choose_config(m, n, k, x.device) if 1 <= m <= sg.MAX_M else None
        if cfg is not None:
            return _into(sg.skinny_gemm(x.reshape(m, kx), weight, bias, cfg,
                                        silu_mul_input=silu_mul_input).view(*x.shape[:-1], n),
                         out)
    if silu_mul_input:
        x = ops.silu_and_mul(x)
    return _linear(x, weight, bias, out)


def _skinny_row_scaled(x: NormedHidden, weight: torch.Tensor,
                       bias: Optional[torch.Tensor]) -> torch.Tensor:
    """The consumer half of a folded norm (the producer's `fold_ok` approved this layer)."""
    import kvflow.kernels.skinny_gemm as sg
    hg = x.hg
    k = hg.shape[-1]
    m = hg.numel() // k
    out = sg.skinny_gemm(hg.reshape(m, k), weight, bias, row_scale=x.fold)
    return out.view(*hg.shape[:-1], weight.shape[0])


@torch.library.custom_op("kvflow::skinny_linear", mutates_args=())
def _skinny_linear_op(x: torch.Tensor, weight: torch.Tensor,
                      bias: Optional[torch.Tensor]) -> torch.Tensor:
    return _skinny_linear(x, weight, bias)


@_skinny_linear_op.register_fake
def _(x, weight, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _glu_device_ok(x: torch.Tensor) -> bool:
    """forward_glu's device: CUDA (tests put the interpreter's CPU tensors here)."""
    return x.is_cuda


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
    if param.shape != loaded.shape:
        raise ValueError(f"shape mismatch: parameter {tuple(param.shape)} vs checkpoint {tuple(loaded.shape)}")
    param.data.copy_(loaded)


def _param(shape, dtype=None) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=dtype or torch.get_default_dtype()), requires_grad=False)


class LinearBase(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, quant_config=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.quant_method = quant_config.get_linear_method() if quant_config is not None else None
        self.skinny_gemm = envs.skinny_gemm()
        self.skinny_silu_mul = envs.skinny_silu_mul()
        self.skinny_glu = envs.skinny_glu()
        if self.quant_method is None:
            self.weight = _param((out_features, in_features))   # [out, in] as in HF checkpoints
            self.weight.weight_loader = weight_loader_of(self)
        else:
            self.quant_method.create_weights(self)
        if bias:
            self.bias = _param((out_features,))
            self.bias.weight_loader = weight_loader_of(self)
        else:
            self.register_parameter("bias", None)

    def forward(self, x) -> torch.Tensor:
        """x: [..., in_features], or a NormedHidden from a producer that folded the norm in
        front of this layer (layers/norm_fold.py): its consumer half runs here."""
        if isinstance(x, NormedHidden):
            if x.consumer is self:
                return _skinny_row_scaled(x, self.weight, self.bias)
            x = x.materialize()
        if self.quant_method is not None:
            return self.quant_method.apply(self, x, self.bias)
        return dense_linear(x, self.weight, self.bias, self.skinny_gemm)

    def weight_loader(self, param, loaded, shard_id=None):
        default_weight_loader(param, loaded)

    # Shard geometry (used by quantized loaders; the dense loaders below predate it).
    def _out_shard(self, shard_id=None) -> tuple[int, int, int]:
        """-> (offset in this rank's output, size, offset in the checkpoint's output dim)."""
        return 0, self.out_features, 0

    def _in_shard(self) -> tuple[int, int, int]:
        """-> (offset in the checkpoint's input dim, size on this rank, checkpoint size)."""
        return 0, self.in_features, self.in_features


class ReplicatedLinear(LinearBase):
    pass


class ColumnParallelLinear(LinearBase):
    """Output dim split across ranks; output stays sharded (no gather) for the next row layer."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 quant_config=None):
        tp = get_tp_size()
        assert out_features % tp == 0, f"{out_features} not divisible by tp={tp}"
        super().__init__(in_features, out_features // tp, bias, quant_config)

    def weight_loader(self, param, loaded, shard_id=None):
        n = param.shape[0]
        default_weight_loader(param, loaded.narrow(0, get_tp_rank() * n, n))

    def _out_shard(self, shard_id=None):
        return 0, self.out_features, get_tp_rank() * self.out_features


class MergedColumnParallelLinear(LinearBase):
    """Several column-parallel outputs stored as one matrix (gate_proj | up_proj); each
    checkpoint tensor is loaded into its slice, shard_id = its index."""

    def __init__(self, in_features: int, output_sizes: Sequence[int], bias: bool = False,
                 quant_config=None):
        tp = get_tp_size()
        self.output_sizes = [s // tp for s in output_sizes]
        super().__init__(in_features, sum(self.output_sizes), bias, quant_config)

    def _out_shard(self, shard_id=None):
        assert shard_id is not None, "merged linear needs a shard id"
        size = self.output_sizes[shard_id]
        return sum(self.output_sizes[:shard_id]), size, get_tp_rank() * size

    def forward_glu(self, x) -> Optional[torch.Tensor]:
        """silu(gate) * up [..., out / 2] of a gate | up pair from one skinny GEMM whose
        epilogue applies the activation (decode-sized CUDA products; the down projection then
        reads it as is), or None where that launch does not apply: the caller runs the plain
        product and fuses the activation into the down projection instead. x as forward's
        (a NormedHidden whose consumer is this layer folds the norm in too)."""
        if not (self.skinny_gemm and self.skinny_glu) or self.quant_method is not None \
                or len(self.output_sizes) != 2 or self.output_sizes[0] != self.output_sizes[1]:
            return None
        normed = isinstance(x, NormedHidden)
        t = x.hg if normed else x          # the input's shape, dtype and device either way
        w, b = self.weight, self.bias
        if not (_glu_device_ok(t) and _skinny_dtypes_ok(t, w, b) and w.stride(-1) == 1
                and not torch.compiler.is_compiling()):
            return None
        from kvflow import kernels
        if not kernels.HAS_TRITON:
            return None
        import kvflow.kernels.skinny_gemm as sg
        k = t.shape[-1]
        m = t.numel() // k
        cfg = sg.glu_config(m, w.shape[0], k, t.device)
        if cfg is None:
            return None
        fold = None
        if normed and x.consumer is self:
            fold = x.fold                  # the consumer half of a folded norm: t is h * g
        elif normed:
            t = x.materialize()
        out = sg.skinny_gemm(t.reshape(m, k), w, b, cfg, row_scale=fold, glu=True)
        return out.view(*t.shape[:-1], w.shape[0] // 2)

    def weight_loader(self, param, loaded, shard_id=None):
        assert shard_id is not None, "merged linear needs a shard id"
        size = self.output_sizes[shard_id]
        offset = sum(self.output_sizes[:shard_id])
        src = loaded.narrow(0, get_tp_rank() * size, size)
        dst = param.data.narrow(0, offset, size)
        dst.copy_(_checked(src, dst))


class QKVParallelLinear(LinearBase):
    """q, k and v projections fused. Heads are split across ranks; when there are fewer KV heads
    than ranks, each KV head is replicated on tp/num_kv_heads ranks."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int,
                 bias: bool = False, quant_config=None):
        tp = get_tp_size()
        assert num_heads % tp == 0, f"num_heads={num_heads} not divisible by tp={tp}"
        self.head_dim = head_dim
        self.num_heads = num_heads // tp
        if num_kv_heads >= tp:
            assert num_kv_heads % tp == 0, f"num_kv_heads={num_kv_heads} not divisible by tp={tp}"
            self.num_kv_heads, self.kv_replicas = num_kv_heads // tp, 1
        else:
            assert tp % num_kv_heads == 0
            self.num_kv_heads, self.kv_replicas = 1, tp // num_kv_heads
        self.q_size = self.num_heads * head_dim
        self.kv_size = self.num_kv_heads * head_dim
        super().__init__(hidden_size, self.q_size + 2 * self.kv_size, bias, quant_config)

    def _out_shard(self, shard_id=None):
        rank = get_tp_rank()
        if shard_id == "q":
            return 0, self.q_size, rank * self.q_size
        if shard_id in ("k", "v"):
            offset = self.q_size + (0 if shard_id == "k" else self.kv_size)
            return offset, self.kv_size, (rank // self.kv_replicas) * self.kv_size
        raise ValueError(f"qkv shard id must be q, k or v, got {shard_id!r}")

    def weight_loader(self, param, loaded, shard_id=None):
        rank = get_tp_rank()
        if shard_id == "q":
            offset, size, src_index = 0, self.q_size, rank
        elif shard_id in ("k", "v"):
            offset = self.q_size + (0 if shard_id == "k" else self.kv_size)
            size, src_index = self.kv_size, rank // self.kv_replicas
        else:
            raise ValueError(f"qkv shard id must be q, k or v, got {shard_id!r}")
        dst = param.data.narrow(0, offset, size)
        dst.copy_(_checked(loaded.narrow(0, src_index * size, size), dst))

    def split(self, qkv: torch.Tensor):
        return qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)


class RowParallelLinear(LinearBase):
    """Input dim split across ranks; partial outputs are summed with an all-reduce."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 quant_config=None):
        tp = get_tp_size()
        assert in_features % tp == 0
        self._in_full = in_features
        super().__init__(in_features // tp, out_features, bias, quant_config)

    def _in_shard(self):
        return get_tp_rank() * self.in_features, self.in_features, self._in_full

    def weight_loader(self, param, loaded, shard_id=None):
        if param.dim() == 2:
            n = param.shape[1]
            loaded = loaded.narrow(1, get_tp_rank() * n, n)
        default_weight_loader(param, loaded)

    def forward(self, x: torch.Tensor, silu_mul_input: bool = False, add_norm=None):
        """silu_mul_input: x is gate | up ([..., 2 * in_features]) and the layer multiplies
        silu(gate) * up (see dense_linear; fused into the product where possible).

        add_norm = (residual, norm, consumer): the residual add + RMSNorm `norm` that follows,
        whose output `consumer` (a linear layer) reads. Returns (normalised, new residual):
        folded into this product and the consumer's (a NormedHidden) where `fold_ok`, else
        the norm layer's own output."""
        if add_norm is not None:
            residual, norm, consumer = add_norm
            if fold_ok(x, self, consumer, silu_mul_input):
                from kvflow.kernels import skinny_gemm as sg
                kx = x.shape[-1]
                m = x.numel() // kx
                n = self.weight.shape[0]
                hg, h, fold = sg.skinny_gemm(x.reshape(m, kx), self.weight, None,
                                             silu_mul_input=silu_mul_input,
                                             add_norm=(residual.reshape(m, n), norm.weight,
                                                       norm.eps))
                shape = (*x.shape[:-1], n)
                h = h.view(shape)
                return NormedHidden(hg.view(shape), h, norm, fold, consumer), h
            s = split_k_norm.slices(self, x, x.numel() // max(1, x.shape[-1]))
            if s > 1:
                if silu_mul_input:
                    x = ops.silu_and_mul(x)
                normed, residual = split_k_norm.linear_add_norm(x, self.weight, s, residual,
                                                                norm)
            else:
                normed, residual = norm(self.forward(x, silu_mul_input), residual)
            return NormedHidden(normed, residual, norm), residual
        # Bias added once, after the reduction.
        if self.quant_method is not None:
            if silu_mul_input:
                x = ops.silu_and_mul(x)
            out = tp_all_reduce(self.quant_method.apply(self, x))
        else:
            if silu_mul_input and not self.skinny_silu_mul:
                x, silu_mul_input = ops.silu_and_mul(x), False
            out = tp_all_reduce(dense_linear(x, self.weight, None, self.skinny_gemm,
                                             silu_mul_input))
        return out if self.bias is None else out + self.bias


def _checked(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    if src.shape != dst.shape:
        raise ValueError(f"shape mismatch: parameter slice {tuple(dst.shape)} vs checkpoint {tuple(src.shape)}")
    return src
