"""The Triton attention backend: paged KV cache write + unified paged attention.

Every step is two launches: reshape_and_cache writes the new tokens' K/V at
metadata.slot_mapping, then unified_attention serves prefill, chunked prefill with cached
prefix, and decode rows of one varlen batch (see kvflow/kernels/attention.py for the design;
with split-KV on decode-sized tiles the last split merges the partials, larger tiles add a
merge launch; mixed batches run decodes and the rest as two attention launches).
Layers that own their rotary (and per-head q/k norm) call forward_qk_rope instead: the cache
write becomes kvflow/kernels/qk_rope_cache.py, which also normalises and rotates q and k, so
the layer's pre-attention work is one launch (fuses_qk_rope_cache).

CUDA graphs: the kernels read every per-request length from query_start_loc / seq_lens (device
tensors), and derive their grids from tensor shapes (T, B, KV heads). The host ints
metadata.max_query_len / max_seq_len only pick the tile configuration and split count, so a
graph runner may pass fixed upper bounds for a captured batch shape; padded requests (q_len 0)
and padded token rows (slot -1, rows past query_start_loc[-1]) are ignored.
"""
from __future__ import annotations

from typing import Optional

import torch

from kvflow.attention.backend import (AttentionMetadata, AttentionSpec, BackendCapabilities,
                                     QKRope)

# Head sizes: any multiple of 16 in [32, 256] (non powers of two are padded to the next power
# of two inside the kernel, with masked loads).
_HEAD_SIZES = tuple(range(32, 257, 16))


class TritonAttentionImpl:
    def __init__(self, spec: AttentionSpec):
        if spec.num_heads % spec.num_kv_heads:
            raise ValueError(f"num_heads {spec.num_heads} is not a multiple of num_kv_heads "
                             f"{spec.num_kv_heads}")
        if spec.kv_cache_dtype not in TritonAttentionBackend.capabilities.kv_cache_dtypes:
            raise ValueError(f"kv cache dtype {spec.kv_cache_dtype!r} is not supported")
        self.spec = spec
        self.num_heads = spec.num_heads
        self.num_kv_heads = spec.num_kv_heads
        self.head_size = spec.head_size
        self.scale = spec.scale

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, metadata: AttentionMetadata,
                k_scale: Optional[torch.Tensor] = None,
                v_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
        """query [T, H, D], key/value [T, KV, D] (may be None when the K/V are already
        cached), kv_cache [2, num_blocks, block_size, KV, D] -> out [T, H, D]. With an fp8
        cache, k_scale / v_scale (float32 scalars) quantize on write and dequantize on read,
        both inside the kernels."""
        # Imported here so that importing the backend (e.g. for selection on a machine
        # without triton) does not require triton.
        from kvflow.kernels.attention import unified_attention
        from kvflow.kernels.kv_cache import reshape_and_cache

        key_cache, value_cache = kv_cache[0], kv_cache[1]
        if key is not None and value is not None:
            reshape_and_cache(key, value, key_cache, value_cache, metadata.slot_mapping,
                              k_scale, v_scale)
        out = torch.empty_like(query)
        unified_attention(query, key_cache, value_cache, metadata.query_start_loc,
                          metadata.seq_lens, metadata.block_table,
                          max_query_len=1 if metadata.is_decode_only else metadata.max_query_len,
                          max_seq_len=metadata.max_seq_len, scale=self.scale, out=out,
                          num_decode_reqs=metadata.num_decode_reqs,
                          seq_starts=metadata.seq_starts,
                          k_scale=k_scale, v_scale=v_scale,
                          request_order=metadata.decode_order,
                          split_decodes=metadata.split_decodes,
                          max_prompt_reqs=metadata.max_prompt_reqs)
        return out

    def forward_qk_rope(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        kv_cache: torch.Tensor, metadata: AttentionMetadata, rope: QKRope,
                        k_scale: Optional[torch.Tensor] = None,
                        v_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
        """query [T, H, D], key/value [T, KV, D] before norm/rotary (strided views of the qkv
        output are fine) -> out [T, H, D]: one fused launch normalises and rotates q and k
        and writes K/V into the cache, then attention reads q from its output."""
        from kvflow.kernels.qk_rope_cache import qk_norm_rope_cache

        q = qk_norm_rope_cache(query, key, value, rope.positions, rope.cos_sin_cache,
                               rope.is_neox, rope.q_norm_weight, rope.k_norm_weight, rope.eps,
                               kv_cache[0], kv_cache[1], metadata.slot_mapping, k_scale,
                               v_scale)                                    # [T, H, D]
        return self.forward(q, None, None, kv_cache, metadata, k_scale, v_scale)


class TritonAttentionBackend:
    name = "triton"
    capabilities = BackendCapabilities(
        head_sizes=_HEAD_SIZES,
        dtypes=(torch.float16, torch.bfloat16, torch.float32),
        # fp8 = e4m3 with per-tensor scales; Triton lowers e4m3 casts from Ada/Hopper on.
        kv_cache_dtypes=("auto", "fp8"),
        fp8_min_compute_capability=(8, 9),
        block_sizes=(),                 # any: tokens are gathered one block-table entry each
        supports_local_attention=True,   # honors metadata.seq_starts
        # bf16 tl.dot needs Ampere tensor cores; the configurations are tuned for Hopper.
        min_compute_capability=(8, 0),
        supports_cuda_graphs=True,
        devices=("cuda",),
        fuses_qk_rope_cache=True,       # forward_qk_rope
    )

    def make_impl(self, spec: AttentionSpec) -> TritonAttentionImpl:
        return TritonAttentionImpl(spec)
