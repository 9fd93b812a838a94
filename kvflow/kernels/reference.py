"""Plain-torch references for every kernel in kvflow.kernels.

These define the semantics the Triton kernels must reproduce; tests compare against them and
they double as a slow fallback. They favour clarity over speed (a Python loop over requests in
attention is fine), compute in float32 and round once to the output dtype.
"""
from __future__ import annotations

import math
from typing import Optional

import torch


# ---------------------------------------------------------------------------------------------
# KV cache
# ---------------------------------------------------------------------------------------------
def ref_reshape_and_cache(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
                          value_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Write key/value [T, KV, D] into key_cache/value_cache [num_blocks, block_size, KV, D].

    Token t goes to slot slot_mapping[t] = block * block_size + offset; slot -1 means "skip"
    (padding). Only the first slot_mapping.shape[0] tokens are considered.
    """
    n = min(key.shape[0], slot_mapping.shape[0])
    slots = slot_mapping[:n].long()
    keep = slots >= 0
    slots = slots[keep]
    block_size = key_cache.shape[1]
    blocks, offsets = slots // block_size, slots % block_size
    key_cache[blocks, offsets] = key[:n][keep].to(key_cache.dtype)
    value_cache[blocks, offsets] = value[:n][keep].to(value_cache.dtype)


# ---------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------
def ref_paged_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                        query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                        block_table: torch.Tensor, scale: float,
                        out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Causal attention of a flattened varlen batch over a paged KV cache.

    query [T, H, D]; key_cache/value_cache [num_blocks, block_size, KV, D]; request i owns query
    rows query_start_loc[i]:query_start_loc[i+1], has seq_lens[i] context tokens (its query
    tokens are the last ones) and finds context token p at
    block_table[i, p // block_size] * block_size + p % block_size.
    Returns out [T, H, D]; rows not owned by any request are left as they were (zeros if `out`
    is None).
    """
    T, H, D = query.shape
    block_size, KV = key_cache.shape[1], key_cache.shape[2]
    assert H % KV == 0
    out = torch.zeros_like(query) if out is None else out
    qsl = query_start_loc.tolist()
    lens = seq_lens.tolist()
    for i, seq_len in enumerate(lens):
        q0, q1 = qsl[i], qsl[i + 1]
        q_len = q1 - q0
        if q_len == 0:
            continue
        pos = torch.arange(seq_len, device=query.device)
        blocks = block_table[i].long()[pos // block_size]
        offs = pos % block_size
        k = key_cache[blocks, offs].float().repeat_interleave(H // KV, dim=1)    # [S, H, D]
        v = value_cache[blocks, offs].float().repeat_interleave(H // KV, dim=1)  # [S, H, D]
        q = query[q0:q1].float()                                                 # [Q, H, D]
        scores = torch.einsum("qhd,khd->hqk", q, k) * scale                      # [H, Q, S]
        q_pos = seq_len - q_len + torch.arange(q_len, device=query.device)
        causal = pos[None, :] <= q_pos[:, None]                                  # [Q, S]
        scores = scores.masked_fill(~causal[None], float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[q0:q1] = torch.einsum("hqk,khd->qhd", probs, v).to(out.dtype)
    return out


# ---------------------------------------------------------------------------------------------
# Norms and activations (HF Llama/Qwen semantics: reduce in fp32)
# ---------------------------------------------------------------------------------------------
def ref_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """y = x / sqrt(mean(x^2) + eps) * weight over the last dim, in fp32, rounded to x.dtype."""
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    # HF rounds the normalised value to the model dtype before the weight multiply.
    return ((xf * rstd).to(x.dtype).float() * weight.float()).to(x.dtype)


def ref_fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """new_residual = x + residual (rounded to the dtype, as HF does); returns
    (rms_norm(new_residual), new_residual)."""
    new_residual = (x.float() + residual.float()).to(x.dtype)
    return ref_rms_norm(new_residual, weight, eps), new_residual


def ref_silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [..., 2I] -> silu(x[..., :I]) * x[..., I:]  ([..., I])."""
    inter = x.shape[-1] // 2
    g, u = x[..., :inter].float(), x[..., inter:].float()
    return (torch.nn.functional.silu(g) * u).to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Rotary embedding
# ---------------------------------------------------------------------------------------------
def ref_cos_sin_cache(rotary_dim: int, max_position: int, base: float = 10000.0,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[max_position, rotary_dim] = cat(cos(p * inv_freq), sin(p * inv_freq)) per position p."""
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim))
    freqs = torch.outer(torch.arange(max_position, dtype=torch.float32), inv_freq)
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(dtype)


def _ref_rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                is_neox: bool) -> torch.Tensor:
    """x [T, N, D] (rotary_dim = 2 * cos.shape[-1] <= D); cos/sin [T, rotary_dim / 2]."""
    rot = 2 * cos.shape[-1]
    xf = x.float()
    xr, xpass = xf[..., :rot], xf[..., rot:]
    c, s = cos[:, None, :].float(), sin[:, None, :].float()
    if is_neox:   # pairs (i, i + rot/2): rotate halves
        x1, x2 = xr[..., : rot // 2], xr[..., rot // 2:]
        rotated = torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)
    else:         # GPT-J: pairs (2i, 2i + 1)
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        rotated = torch.stack([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).flatten(-2)
    return torch.cat([rotated, xpass], dim=-1).to(x.dtype)


def ref_rotary_embedding(positions: torch.Tensor, query: torch.Tensor,
                         key: Optional[torch.Tensor], cos_sin_cache: torch.Tensor,
                         is_neox: bool = True) -> None:
    """In place: rotate query [T, H, D] and key [T, KV, D] by the angles of positions [T].

    cos_sin_cache [max_position, rotary_dim] holds cat(cos, sin) (rotary_dim / 2 each) per
    position; only the first rotary_dim dims of each head rotate.
    """
    n = positions.shape[0]
    half = cos_sin_cache.shape[-1] // 2
    cs = cos_sin_cache[positions.long()]
    cos, sin = cs[:, :half], cs[:, half:]
    query[:n] = _ref_rotate(query[:n], cos, sin, is_neox)
    if key is not None:
        key[:n] = _ref_rotate(key[:n], cos, sin, is_neox)


# ---------------------------------------------------------------------------------------------
# Fused pre-attention transform (kernels/qk_rope_cache.py)
# ---------------------------------------------------------------------------------------------
def ref_qk_norm_rope_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           positions: torch.Tensor, cos_sin_cache: torch.Tensor, is_neox: bool,
                           q_norm_weight: Optional[torch.Tensor],
                           k_norm_weight: Optional[torch.Tensor], eps: float,
                           key_cache: torch.Tensor, value_cache: torch.Tensor,
                           slot_mapping: torch.Tensor, k_scale: Optional[torch.Tensor] = None,
                           v_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The composition the fused kernel replaces: q [T, H, D], k/v [T, KV, D] ->
    [rms_norm per head] -> rotary -> k/v into key_cache/value_cache [NB, BS, KV, D] at
    slot_mapping (-1 skipped; an fp8 cache stores x / scale saturated to +-448, rounded to
    nearest). Returns the transformed q [T, H, D]; the inputs are not modified."""
    t = q.shape[0]
    if q_norm_weight is not None:
        q, k = ref_rms_norm(q, q_norm_weight, eps), ref_rms_norm(k, k_norm_weight, eps)
    else:
        q, k = q.clone(), k.clone()
    ref_rotary_embedding(positions[:t], q, k, cos_sin_cache, is_neox)
    if key_cache.dtype == torch.float8_e4m3fn:
        def quant(x, scale):
            s = scale if scale is not None else torch.ones((), dtype=torch.float32)
            return (x.float() / s).clamp(-448.0, 448.0).to(torch.float8_e4m3fn).view(torch.uint8)
        # Index assignment has no float8 kernel on CPU: the same bytes move as uint8.
        ref_reshape_and_cache(quant(k, k_scale), quant(v, v_scale),
                              key_cache.view(torch.uint8), value_cache.view(torch.uint8),
                              slot_mapping)
    else:
        ref_reshape_and_cache(k, v, key_cache, value_cache, slot_mapping)
    return q


def default_scale(head_size: int) -> float:
    return 1.0 / math.sqrt(head_size)


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------
def ref_sample_rows(logits: torch.Tensor, temperature: torch.Tensor,
                    uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw per row: the first token j whose cumulative softmax(logits / T) mass
    exceeds uniforms[row] * total (float64 here). logits [B, V], temperature [B] > 0,
    uniforms [B] in [0, 1) -> [B] int64. Rows holding NaN give their first NaN; rows of -inf
    give 0; +inf entries share the mass (the kernel's rules, kernels/sampling.py)."""
    x = logits.double() / temperature.double()[:, None]                          # [B, V]
    out = torch.empty(x.shape[0], dtype=torch.int64)
    for r, row in enumerate(x):
        nan = torch.isnan(row)
        if nan.any():
            out[r] = int(nan.nonzero()[0])
            continue
        inf = row == math.inf
        w = inf.double() if inf.any() else torch.exp(row - row.max())
        if not (w > 0).any():
            out[r] = 0
            continue
        cdf = torch.cumsum(w, 0)
        target = float(uniforms[r]) * float(cdf[-1])
        hit = (cdf > target).nonzero()
        out[r] = int(hit[0]) if len(hit) else int((w > 0).nonzero()[-1])
    return out
