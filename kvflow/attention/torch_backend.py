"""Reference attention on the paged KV cache, in plain torch (CPU and GPU).

Correctness first: it gathers each request's context from the block table into a padded
[B, max_seq_len] view and runs masked attention for the whole batch at once. Memory is
O(B * max_seq_len) per layer, fine for tests and CPU serving, and the oracle for the Triton
kernels.
"""
from __future__ import annotations

import torch

from kvflow.attention.backend import AttentionMetadata, AttentionSpec, BackendCapabilities


def write_kv_cache(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """key/value [T, KV, D] -> kv_cache [2, NB, BS, KV, D] at slot_mapping [T] (-1 skipped)."""
    t = slot_mapping.shape[0]
    flat = kv_cache.view(2, -1, kv_cache.shape[-2], kv_cache.shape[-1])  # [2, NB*BS, KV, D]
    valid = slot_mapping >= 0
    if bool(valid.all()):
        flat[0].index_copy_(0, slot_mapping, key[:t].to(kv_cache.dtype))
        flat[1].index_copy_(0, slot_mapping, value[:t].to(kv_cache.dtype))
    else:
        idx = slot_mapping[valid]
        flat[0].index_copy_(0, idx, key[:t][valid].to(kv_cache.dtype))
        flat[1].index_copy_(0, idx, value[:t][valid].to(kv_cache.dtype))


def paged_attention_ref(query: torch.Tensor, kv_cache: torch.Tensor, md: AttentionMetadata,
                        scale: float) -> torch.Tensor:
    """query [T, H, D] -> out [T, H, D]; context read from the cache (already written)."""
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

    def forward(self, query, key, value, kv_cache, metadata: AttentionMetadata):
        write_kv_cache(key, value, kv_cache, metadata.slot_mapping)
        return paged_attention_ref(query, kv_cache, metadata, self.spec.scale)


class TorchAttentionBackend:
    name = "torch"
    capabilities = BackendCapabilities(
        head_sizes=(), dtypes=(torch.float32, torch.float16, torch.bfloat16),
        kv_cache_dtypes=("auto",), block_sizes=(), supports_local_attention=False,
        min_compute_capability=None, supports_cuda_graphs=False, devices=("cpu", "cuda"))

    def make_impl(self, spec: AttentionSpec) -> TorchAttentionImpl:
        return TorchAttentionImpl(spec)
