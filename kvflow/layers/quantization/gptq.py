"""GPTQ weight-only quantization (4 and 8 bits): config, torch reference, linear method.

Checkpoint layout (AutoGPTQ / GPTQModel, per linear with K inputs, N outputs, G groups):
    qweight [K / pack, N]  int32   pack = 32 / bits values of consecutive *input* rows per word,
                                   row k at bits (k % pack) * bits
    qzeros  [G, N / pack]  int32   zero points packed along the *output* dim, col n at
                                   bits (n % pack) * bits
    scales  [G, N]         fp16
    g_idx   [K]            int32   group of input row k (k // group_size unless act-order)
    W[k, n] = (q[k, n] - zero[g_idx[k], n]) * scales[g_idx[k], n]      (x @ W, W is [K, N])
Zero conventions: "gptq" (v1, AutoGPTQ) stores zero - 1, "gptq_v2" (GPTQModel,
checkpoint_format="gptq_v2") stores the zero itself. v1 is decoded as stored + 1 with no
masking, as the reference CUDA kernels do, so a zero of 0 is not representable in v1 (a known
limitation of that format, not of this loader). Symmetric checkpoints store the midpoint
2^(bits-1) like any other zero, so sym and asym share one code path.

Tensor-parallel rules (applied by the weight loaders below; the layer supplies its shard
geometry through `_out_shard(shard_id)` and `_in_shard()`):
  * column-parallel (incl. merged / QKV): the output dim of qweight, scales and qzeros is split;
    qzeros is packed along it, so each output shard must be a multiple of `pack`. Each shard
    of a merged layer lands at its own output offset. g_idx is replicated.
  * row-parallel: qweight rows (K / pack) and g_idx are split along the input dim. The groups
    of scales / qzeros are split too (rank r keeps groups of its own rows, so its input shard
    must be a multiple of group_size) EXCEPT when desc_act (act-order) with TP > 1 — then a
    rank's rows may belong to any group, so all groups are kept on every rank — or when
    group_size == -1 (one group: replicated).
    With split groups, g_idx is rebased to local group numbers at load time.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from kvflow.layers.loader_ref import ModuleLoader

SUPPORTED_BITS = (4, 8)


@dataclass(frozen=True)
class GPTQConfig:
    bits: int
    group_size: int          # -1: one group spanning all inputs
    desc_act: bool           # act-order: g_idx is a permutation-derived, arbitrary group map
    sym: bool
    zero_offset: int         # added to stored zeros: 1 for "gptq" (v1), 0 for "gptq_v2"

    @property
    def pack_factor(self) -> int:
        return 32 // self.bits

    @classmethod
    def from_config(cls, qc: dict) -> "GPTQConfig":
        bits = int(qc.get("bits", 4))
        if bits not in SUPPORTED_BITS:
            raise ValueError(f"quantization_config: GPTQ bits={bits} is not supported; "
                             f"supported: {SUPPORTED_BITS}")
        gs = int(qc.get("group_size", 128))
        if gs != -1 and gs <= 0:
            raise ValueError(f"quantization_config: group_size must be -1 or positive, got {gs}")
        fmt = str(qc.get("checkpoint_format", "gptq")).lower()
        if qc.get("is_marlin_format") or fmt not in ("gptq", "gptq_v2"):
            raise ValueError(f"quantization_config: GPTQ checkpoint_format {fmt!r} is not "
                             "supported; supported: gptq, gptq_v2")
        return cls(bits=bits, group_size=gs, desc_act=bool(qc.get("desc_act", False)),
                   sym=bool(qc.get("sym", True)), zero_offset=1 if fmt == "gptq" else 0)

    def get_linear_method(self) -> "GPTQLinearMethod":
        return GPTQLinearMethod(self)


# ------------------------------------------------------------------------- torch reference
def unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """[R, N] int32 packed along rows -> [R * pack, N] int32 values in [0, 2^bits)."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)
    vals = (packed.unsqueeze(1) >> shifts.view(1, -1, 1)) & ((1 << bits) - 1)  # [R, pack, N]
    return vals.reshape(-1, packed.shape[1])


def unpack_cols(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """[G, C] int32 packed along columns -> [G, C * pack] int32 values in [0, 2^bits)."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)
    vals = (packed.unsqueeze(2) >> shifts.view(1, 1, -1)) & ((1 << bits) - 1)  # [G, C, pack]
    return vals.reshape(packed.shape[0], -1)


def gptq_dequantize(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                    g_idx: torch.Tensor, bits: int, zero_offset: int) -> torch.Tensor:
    """-> W [K, N] float32 (x @ W computes the layer). K = g_idx.numel()."""
    k = g_idx.numel()
    q = unpack_rows(qweight, bits)[:k]                                   # [K, N]
    z = unpack_cols(qzeros, bits)[:, :scales.shape[1]] + zero_offset     # [G, N]
    g = g_idx.long()
    return (q - z[g]).float() * scales[g].float()


def gptq_gemm_ref(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor,
                  scales: torch.Tensor, g_idx: torch.Tensor, bits: int,
                  zero_offset: int) -> torch.Tensor:
    """x [M, K] -> [M, N] in x.dtype; the weight is rounded to x.dtype once, like the kernel."""
    w = gptq_dequantize(qweight, qzeros, scales, g_idx, bits, zero_offset).to(x.dtype)
    return x @ w


def _gptq_gemm_impl(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor,
                    scales: torch.Tensor, g_idx: torch.Tensor, bits: int, group_size: int,
                    zero_offset: int, use_g_idx: bool) -> torch.Tensor:
    if x.is_cuda:
        from kvflow import kernels
        if kernels.HAS_TRITON:
            from kvflow.kernels.w4a16 import gptq_gemm as kernel
            return kernel(x, qweight, qzeros, scales, g_idx if use_g_idx else None, bits,
                          group_size, zero_offset)
    return gptq_gemm_ref(x, qweight, qzeros, scales, g_idx, bits, zero_offset)


# The GEMM is one opaque op so that torch.compile keeps the Triton kernel (instead of tracing
# the reference's unpacking into the graph). Eager calls skip it (GPTQLinearMethod.apply): a
# dispatcher hop, and a first call that imports torch._dynamo.
@torch.library.custom_op("kvflow::gptq_gemm", mutates_args=())
def gptq_gemm(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
              g_idx: torch.Tensor, bits: int, group_size: int, zero_offset: int,
              use_g_idx: bool) -> torch.Tensor:
    return _gptq_gemm_impl(x, qweight, qzeros, scales, g_idx, bits, group_size, zero_offset,
                           use_g_idx)


@gptq_gemm.register_fake
def _(x, qweight, qzeros, scales, g_idx, bits, group_size, zero_offset, use_g_idx):
    return x.new_empty((x.shape[0], scales.shape[1]))


# ---------------------------------------------------------------------------- linear method
class GPTQLinearMethod:
    """Creates qweight / qzeros / scales / g_idx on a linear layer and computes it.

    The layer must provide in_features / out_features (this rank's sizes) and the shard
    geometry `_out_shard(shard_id) -> (dst_offset, size, src_offset)` (output units) and
    `_in_shard() -> (src_offset, size, full_size)` (input units)."""

    def __init__(self, cfg: GPTQConfig):
        self.cfg = cfg

    def _groups_split(self, layer) -> bool:
        """Whether this rank holds only the groups of its own input rows."""
        _, size, full = layer._in_shard()
        return size != full and self.cfg.group_size != -1 and not self.cfg.desc_act

    def create_weights(self, layer: nn.Module) -> None:
        cfg, pack = self.cfg, self.cfg.pack_factor
        k, n = layer.in_features, layer.out_features
        _, _, k_full = layer._in_shard()
        if k % pack:
            raise ValueError(f"GPTQ: input size {k} (this rank) must be a multiple of {pack}")
        if n % pack:
            raise ValueError(f"GPTQ: output size {n} (this rank) must be a multiple of {pack}")
        gs = cfg.group_size
        if gs == -1:
            groups = 1
        elif self._groups_split(layer):
            if k % gs:
                raise ValueError(f"GPTQ: row-parallel input shard {k} must be a multiple of "
                                 f"group_size={gs}")
            groups = k // gs
        else:
            groups = -(-k_full // gs)
        dt = torch.get_default_dtype()
        # Integer params are initialised to valid values (a dummy-weight model needs a g_idx
        # that indexes real groups; the dummy initialiser leaves integer tensors alone).
        params = {
            "qweight": torch.zeros((k // pack, n), dtype=torch.int32),
            "qzeros": torch.zeros((groups, n // pack), dtype=torch.int32),
            "scales": torch.empty((groups, n), dtype=dt),
            "g_idx": self._default_g_idx(layer),
        }
        for name, t in params.items():
            p = nn.Parameter(t, requires_grad=False)
            p.gptq_kind = name
            p.weight_loader = self._make_loader(layer)
            if name == "g_idx":
                # Checkpoints without act-order may omit g_idx; the default above is exact then.
                p.optional_in_checkpoint = True
            layer.register_parameter(name, p)

    def _default_g_idx(self, layer) -> torch.Tensor:
        """The g_idx of a checkpoint without act-order, in this rank's group numbering."""
        start, k, _ = layer._in_shard()
        gs = self.cfg.group_size
        if gs == -1:
            return torch.zeros(k, dtype=torch.int32)
        first = 0 if self._groups_split(layer) else start               # all groups kept
        # Computed on the CPU, then moved: under torch.device("meta") (the dummy-weight
        # reference build of a TP > 1 model, models/dummy.py) the division would run a
        # reference decomposition, whose import of torch._dynamo costs ~3 s of every start.
        idx = torch.arange(first, first + k, dtype=torch.int32, device="cpu") // gs
        return idx.to(torch.get_default_device())

    def _make_loader(self, layer):
        # The layer weakly (layers/loader_ref.py): no cycle through the parameter it loads.
        def load(module, param, loaded, shard_id=None):
            self._load(module, param, loaded, shard_id)
        return ModuleLoader(layer, load)

    def _load(self, layer, param: nn.Parameter, loaded: torch.Tensor, shard_id) -> None:
        cfg, pack, kind = self.cfg, self.cfg.pack_factor, param.gptq_kind
        in_start, in_size, in_full = layer._in_shard()
        # Input (row) dimension: dim 0 of every GPTQ tensor, in its own units.
        if kind == "qweight":
            loaded = loaded.narrow(0, in_start // pack, in_size // pack)
        elif kind == "g_idx":
            loaded = loaded.narrow(0, in_start, in_size)
            if self._groups_split(layer):
                loaded = loaded - in_start // cfg.group_size
        elif self._groups_split(layer):     # scales / qzeros: this rank's groups
            gs = cfg.group_size
            loaded = loaded.narrow(0, in_start // gs, in_size // gs)
        if kind == "g_idx":
            # Fused shards (q/k/v, gate/up) share one g_idx: GPTQ derives act-order from the
            # shared input, so their checkpoint copies must agree; a mismatch would be silent.
            if getattr(param, "_loaded", False) and not torch.equal(
                    param.data, loaded.to(param.device, param.dtype)):
                raise ValueError("GPTQ: g_idx differs between the fused shards of one layer")
            _copy(param.data, loaded)
            param._loaded = True
            return
        # Output (column) dimension: dim 1, packed for qzeros.
        dst_off, size, src_off = layer._out_shard(shard_id)
        div = pack if kind == "qzeros" else 1
        if dst_off % div or size % div or src_off % div:
            raise ValueError(f"GPTQ: output shard (offset {dst_off}, size {size}) is not a "
                             f"multiple of the qzeros pack factor {pack}")
        src = loaded.narrow(1, src_off // div, size // div)
        _copy(param.data.narrow(1, dst_off // div, size // div), src)

    def apply(self, layer: nn.Module, x: torch.Tensor,
              bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [..., K] -> [..., N] (+ bias)."""
        cfg = self.cfg
        shape = x.shape
        gemm = gptq_gemm if torch.compiler.is_compiling() else _gptq_gemm_impl
        out = gemm(x.reshape(-1, shape[-1]), layer.qweight, layer.qzeros, layer.scales,
                   layer.g_idx, cfg.bits, cfg.group_size, cfg.zero_offset, cfg.desc_act)
        out = out.reshape(*shape[:-1], out.shape[-1])
        return out if bias is None else out + bias


def _copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    if dst.shape != src.shape:
        raise ValueError(f"shape mismatch: parameter slice {tuple(dst.shape)} vs checkpoint "
                         f"{tuple(src.shape)}")
    dst.copy_(src)
