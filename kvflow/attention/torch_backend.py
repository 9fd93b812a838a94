"""Reference attention on the paged KV cache, in plain torch (CPU and GPU).

Correctness first: it gathers each request's context from the block table into a padded
[B, max_seq_len] view and runs masked attention for the whole batch at once. Memory is
O(B * max_seq_len) per layer, fine for tests and CPU serving, and the oracle for the Triton
kernels.
"""
from __future__ import annotations

import torch

from kvflow.attention.backend import AttentionMetadata, AttentionSpec, BackendCapabilities


FP8_MAX = 448.0  # largest finite float8_e4m3fn value


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x / scale as float8_e4m3fn, saturated to +-448. Clamped explicitly rather than relying
    on the cast's overflow behaviour: e4m3fn has no inf, only NaN, and one NaN in the cache
    would poison every later attention read of that block."""
    return (x.float() / scale).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def _to_cache(x: torch.Tensor, kv_cache: torch.Tensor, scale) -> torch.Tensor:
    if kv_cache.dtype == torch.float8_e4m3fn:
        return quantize_fp8(x, scale if scale is not None else x.new_ones((), dtype=torch.float32))
    return x.to(kv_cache.dtype)


def write_kv_cache(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                   slot_mapping: torch.Tensor, k_scale: torch.Tensor | None = None,
                   v_scale: torch.Tensor | None = None) -> None:
    """key/value [T, KV, D] -> kv_cache [2, NB, BS, KV, D] at slot_mapping [T] (-1 skipped).
    An fp8 cache stores key / k_scale and value / v_scale (scales default to 1)."""
    t = slot_mapping.shape[0]
    key, value = key[:t], value[:t]
    flat = kv_cache.view(2, -1, kv_cache.shape[-2], kv_cache.shape[-1])  # [2, NB*BS, KV, D]
    valid = slot_mapping >= 0
    if bool(valid.all()):
        idx = slot_mapping
    else:
        idx = slot_mapping[valid]
        key, value = key[valid], value[valid]
    k, v = _to_cache(key, kv_cache, k_scale), _to_cache(value, kv_cache, v_scale)
    if kv_cache.dtype == torch.float8_e4m3fn:
        # index_copy_ has no float8 kernel on CPU; the same bytes move as uint8.
        flat, k, v = flat.view(torch.uint8), k.view(torch.uint8), v.view(torch.uint8)
    flat[0].index_copy_(0, idx, k)
    flat[1].index_copy_(0, idx, v)


def paged_attention_ref(query: torch.Tensor, kv_cache: torch.Tensor, md: AttentionMetadata,
                        scale: float, k_scale: torch.Tensor | None = None,
                        v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """query [T, H, D] -> out [T, H, D]; context read from the cache (already written).
    An fp8 cache is dequantized as stored * k_scale / v_scale (in float32)."""
    _, _, block_size, num_kv, d = kv_cache.shape
    num_heads = query.shape[1]
    group = num_heads // num_kv
    b = md.num_reqs
    t = md.num_actual_tokens
    device = query.device
    qsl = md.query_start_loc.long()
    q_lens = qsl[1:] - qsl[:-1]                                   # [B]
    seq_lens = md.seq_lens.long()                                 # [B]
    max_q, max_s = md.max_query_len, md.max_seq_len

    # Gather context: [B, max_s, KV, D]
    pos = torch.arange(max_s, device=device)
    blk = md.block_table[:, :(max_s + block_size - 1) // block_size].long()
    slots = blk.gather(1, (pos // block_size).expand(b, -1)) * block_size + pos % block_size
    flat = kv_cache.view(2, -1, num_kv, d)
    k = flat[0][slots].float()
    v = flat[1][slots].float()
    if kv_cache.dtype == torch.float8_e4m3fn:
        if k_scale is not None:
            k = k * k_scale
        if v_scale is not None:
            v = v * v_scale
    ctx_valid = pos.unsqueeze(0) < seq_lens.unsqueeze(1)          # [B, max_s]
    v = v.masked_fill(~ctx_valid[..., None, None], 0.0)          # unwritten slots may hold NaN

    # Queries padded: [B, max_q, H, D]
    qi = torch.arange(max_q, device=device)
    q_valid = qi.unsqueeze(0) < q_lens.unsqueeze(1)               # [B, max_q]
    tok = (qsl[:-1].unsqueeze(1) + qi).clamp(max=max(t - 1, 0))
    q = query[tok].float()                                        # [B, max_q, H, D]
    q_pos = seq_lens.unsqueeze(1) - q_lens.unsqueeze(1) + qi      # [B, max_q]

    # Scores [B, KV, group, max_q, max_s]
    q = q.view(b, max_q, num_kv, group, d).permute(0, 2, 3, 1, 4)
    kk = k.permute(0, 2, 1, 3).unsqueeze(2)                       # [B, KV, 1, max_s, D]
    vv = v.permute(0, 2, 1, 3).unsqueeze(2)
    scores = torch.matmul(q, kk.transpose(-1, -2)) * scale
    allowed = (pos.view(1, 1, -1) <= q_pos.unsqueeze(-1)) & ctx_valid.unsqueeze(1)  # [B, max_q, max_s]
    if md.seq_starts is not None:  # local-attention virtual batch: window [seq_starts, q_pos]
        allowed &= (pos.unsqueeze(0) >= md.seq_starts.long().unsqueeze(1)).unsqueeze(1)
    scores = scores.masked_fill(~allowed[:, None, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)         # padded query rows are all -inf
    out = torch.matmul(probs, vv)                                 # [B, KV, group, max_q, D]
    out = out.permute(0, 3, 1, 2, 4).reshape(b, max_q, num_heads, d)
    result = query.new_zeros(query.shape)
    result[tok[q_valid]] = out[q_valid].to(query.dtype)
    return result


class TorchAttentionImpl:
    def __init__(self, spec: AttentionSpec):
        self.spec = spec

    def forward(self, query, key, value, kv_cache, metadata: AttentionMetadata,
                k_scale=None, v_scale=None):
        write_kv_cache(key, value, kv_cache, metadata.slot_mapping, k_scale, v_scale)
        return paged_attention_ref(query, kv_cache, metadata, self.spec.scale, k_scale, v_scale)


class TorchAttentionBackend:
    name = "torch"
    capabilities = BackendCapabilities(
        head_sizes=(), dtypes=(torch.float32, torch.float16, torch.bfloat16),
        kv_cache_dtypes=("auto", "fp8"), block_sizes=(), supports_local_attention=True,
        min_compute_capability=None, supports_cuda_graphs=False, devices=("cpu", "cuda"))

    def make_impl(self, spec: AttentionSpec) -> TorchAttentionImpl:
        return TorchAttentionImpl(spec)
