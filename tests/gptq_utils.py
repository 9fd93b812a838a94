"""Test-only round-to-nearest GPTQ packer (no calibration): quantizes a weight into the exact
tensors a GPTQ checkpoint stores, and rewrites a saved tiny HF model as a GPTQ checkpoint.

Written from the format description (kvflow/layers/quantization/gptq.py docstring), independent
of the loader's unpacking code, so the round trip checks one against the other.
"""
from __future__ import annotations

import json
import os

import torch

# HF module names quantized in GPTQ checkpoints (embeddings / lm_head stay dense).
QUANT_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def pack_along(vals: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Integer values in [0, 2^bits) -> int32 words holding 32/bits consecutive values along dim
    (value j of a word at bits j*bits)."""
    pack = 32 // bits
    v = vals.to(torch.int64).movedim(dim, -1)
    assert v.shape[-1] % pack == 0
    v = v.reshape(*v.shape[:-1], -1, pack)
    shifts = torch.arange(0, 32, bits, dtype=torch.int64)
    words = (v << shifts).sum(-1)                         # < 2^32, exact in int64
    words = torch.where(words >= 2 ** 31, words - 2 ** 32, words)   # two's complement wrap
    return words.to(torch.int32).movedim(-1, dim).contiguous()


def rtn_quantize(w: torch.Tensor, bits: int, group_size: int, sym: bool, act_order: bool,
                 v2: bool, seed: int = 0) -> tuple[dict, torch.Tensor]:
    """w [K, N] (x @ w) -> (GPTQ tensors {qweight, qzeros, scales, g_idx}, dequantized w [K, N]
    float32, exactly what a correct loader must reconstruct)."""
    k, n = w.shape
    maxq = (1 << bits) - 1
    gs = k if group_size == -1 else group_size
    if act_order:   # GPTQ quantizes rows in a permuted order; groups follow that order
        perm = torch.randperm(k, generator=torch.Generator().manual_seed(seed))
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(k)
        g_idx = (inv // gs).to(torch.int32)
    else:
        g_idx = (torch.arange(k) // gs).to(torch.int32)
    groups = -(-k // gs)
    scales = torch.empty(groups, n)
    zeros = torch.empty(groups, n, dtype=torch.int64)
    for g in range(groups):
        rows = w[g_idx == g].float()                      # [rows, N]
        lo = rows.min(0).values.clamp(max=0)
        hi = rows.max(0).values.clamp(min=0)
        if sym:
            hi = torch.maximum(lo.abs(), hi)
            s = 2 * hi / maxq
            z = torch.full((n,), (maxq + 1) // 2, dtype=torch.int64)
        else:
            s = (hi - lo) / maxq
            s = torch.where(s == 0, torch.ones_like(s), s)
            z = torch.round(-lo / s.half().float()).to(torch.int64).clamp(0, maxq)
        scales[g] = s.clamp(min=1e-5)
        zeros[g] = z
    scales = scales.half()                                # checkpoints store fp16 scales
    sf = scales.float()
    q = torch.clamp(torch.round(w.float() / sf[g_idx.long()]) + zeros[g_idx.long()], 0, maxq)
    deq = (q - zeros[g_idx.long()]) * sf[g_idx.long()]
    stored = zeros if v2 else zeros - 1
    assert v2 or (stored >= 0).all(), "gptq v1 cannot store a zero point of 0"
    tensors = dict(qweight=pack_along(q.to(torch.int64), bits, 0),
                   qzeros=pack_along(stored, bits, 1), scales=scales, g_idx=g_idx)
    return tensors, deq


def quantize_hf_model(model, path: str, *, bits: int, group_size: int, sym: bool,
                      act_order: bool, v2: bool) -> None:
    """Rewrite the model saved at `path` as a GPTQ checkpoint and replace the in-memory HF
    model's projection weights by their dequantized values (it becomes the fp reference)."""
    from safetensors.torch import load_file, save_file
    st_path = os.path.join(path, "model.safetensors")
    state = load_file(st_path)
    modules = dict(model.named_modules())
    for name in sorted(k for k in state if k.endswith(".weight")):
        mod = name[:-len(".weight")]
        if mod.split(".")[-1] not in QUANT_MODULES:
            continue
        w = state.pop(name)                                # [N, K] as in HF
        # GPTQ's act-order permutation comes from the input's Hessian, so projections that
        # share an input (q/k/v, gate/up) share g_idx; the fused layers rely on it.
        prefix, proj = mod.rsplit(".", 1)
        shared = {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj"}
        seed = sum(map(ord, prefix)) * 8 + QUANT_MODULES.index(shared.get(proj, proj))
        tensors, deq = rtn_quantize(w.t(), bits, group_size, sym, act_order, v2, seed=seed)
        for suffix, t in tensors.items():
            state[f"{mod}.{suffix}"] = t
        with torch.no_grad():
            modules[mod].weight.copy_(deq.t())
    save_file(state, st_path, metadata={"format": "pt"})
    cfg_path = os.path.join(path, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["quantization_config"] = {
        "quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": act_order,
        "sym": sym, "checkpoint_format": "gptq_v2" if v2 else "gptq", "damp_percent": 0.01}
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
