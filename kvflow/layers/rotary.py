"""Rotary position embeddings (neox / rotate-half layout, as HF Llama and Qwen checkpoints use;
interleaved pairs for Llama 4).

The cos/sin table is a non-persistent buffer: it is not in the checkpoint and is rebuilt from the
config. Anything that drops and restores model memory (sleep level 2) must back it up — it is
registered as a buffer precisely so that `named_buffers()` finds it.

Supported rope_scaling types: default, linear, llama3, yarn (the same arithmetic as HF
transformers, so logits match).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from kvflow.layers import ops

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def _default_inv_freq(base: float, dim: int) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def _llama3_inv_freq(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    factor = s["factor"]
    low, high = s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    old_len = s.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn_inv_freq(base: float, dim: int, s: dict, max_pos: int) -> tuple[torch.Tensor, float]:
    factor = s["factor"]
    orig = s.get("original_max_position_embeddings") or max_pos

    def get_mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attn_factor = s.get("attention_factor")
    if attn_factor is None:
        m, m_all = s.get("mscale"), s.get("mscale_all_dim")
        attn_factor = get_mscale(factor, m) / get_mscale(factor, m_all) if m and m_all else get_mscale(factor)
    beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

    def correction_dim(rot):
        return (dim * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(base))

    lo, hi = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, dim - 1)
    if lo == hi:
        hi += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - lo) / (hi - lo)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrap, interp = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    extrap_factor = 1 - ramp
    return interp * (1 - extrap_factor) + extrap * extrap_factor, float(attn_factor)


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_position: int, base: float,
                 rope_scaling: Optional[dict] = None, partial_rotary_factor: float = 1.0,
                 is_neox: bool = True):
        """is_neox=False rotates interleaved pairs (2i, 2i + 1): HF Llama 4's complex form
        (view_as_complex(x.reshape(..., -1, 2)) * e^(i*theta)), same frequencies and table."""
        super().__init__()
        self.head_dim = head_dim
        self.is_neox = is_neox
        self.rotary_dim = int(head_dim * partial_rotary_factor)
        s = rope_scaling or {}
        rope_type = s.get("rope_type", "default")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(f"rope_scaling.rope_type: {rope_type!r} is not supported; "
                             f"supported: {SUPPORTED_ROPE_TYPES}")
        self.max_position = max_position
        if torch.empty(0).is_meta:
            # A shape-only build (dummy weights' single-rank reference): no values to compute,
            # and computing them would run meta kernels whose reference decompositions import
            # torch._dynamo (~2 s of an engine start that never compiles).
            cache = torch.empty(max_position, self.rotary_dim, dtype=torch.float32)
            self.register_buffer("cos_sin_cache", cache, persistent=False)
            return
        mscale = 1.0
        if rope_type == "yarn":
            inv_freq, mscale = _yarn_inv_freq(base, self.rotary_dim, s, max_position)
        else:
            inv_freq = _default_inv_freq(base, self.rotary_dim)
            if rope_type == "linear":
                inv_freq = inv_freq / s["factor"]
            elif rope_type == "llama3":
                inv_freq = _llama3_inv_freq(inv_freq, s)
        # [max_position, rotary_dim]: cos of each frequency | sin of each frequency, float32.
        freqs = torch.outer(torch.arange(max_position, dtype=torch.float32), inv_freq)
        cache = torch.cat([freqs.cos() * mscale, freqs.sin() * mscale], dim=-1)
        self.register_buffer("cos_sin_cache", cache, persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        """positions [T]; q [T, H*D]; k [T, KV*D]. Returns rotated (q, k)."""
        return ops.rotary(positions, q, k, self.cos_sin_cache, self.head_dim, self.is_neox)
