"""The attention backend protocol: what every backend must provide and declare.

A backend is a factory of per-layer `AttentionImpl`s plus a static `BackendCapabilities`
declaration. Model code never talks to a backend directly and passes only generic arguments
(heads, head size, scale, an optional local-attention chunk size); the selector matches the model's
needs against each backend's declaration, so a backend can never receive a keyword it does not
understand.

KV cache layout (one tensor per attention layer), shared by every backend and by KV transfer:
    kv_cache: [2, num_blocks, block_size, num_kv_heads, head_size]   (K at index 0, V at index 1)
A token at position p of a request lives in slot
    slot = block_table[p // block_size] * block_size + p % block_size.
With kv_cache_dtype "fp8" the tensor is torch.float8_e4m3fn and holds K / k_scale and
V / v_scale (per-layer float32 scalars held by the Attention layer), saturated to +-448.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol

import torch


@dataclass
class AttentionMetadata:
    """Per-step metadata for a flattened batch of B requests and T = num_actual_tokens tokens.

    Request i owns query tokens [query_start_loc[i], query_start_loc[i+1]). Its context after
    this step has seq_lens[i] tokens; the query tokens are the last ones of that context, so the
    query token j (0-based within the request) sits at position seq_lens[i] - query_len_i + j and
    attends causally to positions 0..that position.
    """
    num_actual_tokens: int
    max_query_len: int
    max_seq_len: int
    query_start_loc: torch.Tensor      # [B + 1] int32, on device
    seq_lens: torch.Tensor             # [B] int32, on device
    block_table: torch.Tensor          # [B, max_blocks_per_req] int32, on device
    slot_mapping: torch.Tensor         # [T] int64, on device; -1 = do not write (padding)
    query_start_loc_cpu: Optional[torch.Tensor] = None  # [B + 1] int32
    seq_lens_cpu: Optional[torch.Tensor] = None         # [B] int32
    # True when every request has exactly one query token (pure decode step).
    is_decode_only: bool = False
    # The first num_decode_reqs requests have exactly one query token (the runner orders decodes
    # first), so a backend can give them decode-shaped tiles in a mixed batch.
    num_decode_reqs: int = 0
    # Set by a CUDA graph of mixed steps, whose decode count is not a host int: decodes (one
    # query token) may be any of the requests, and a backend that gives decode rows their own
    # tiles must find them on the device (kernels/attention.py runs two launches over all
    # requests, each skipping the other's). Tiles only: the same attention, up to rounding.
    split_decodes: bool = False
    # With split_decodes: at most this many requests have more than one query token (the
    # graph's runner replays it only for such steps), which bounds the prompt launch's grid.
    # None: any number.
    max_prompt_reqs: Optional[int] = None
    # [B] int32 on device, or None (= all 0): request i attends only to context positions
    # >= seq_starts[i] (its causal window is [seq_starts[i], q_pos]). Set only in the virtual
    # batches of chunked local attention (kvflow/attention/local_attention.py), where a chunk
    # may begin inside a KV block; always < block_size there, and <= every query position of
    # the request. Only backends that declare supports_local_attention receive it.
    seq_starts: Optional[torch.Tensor] = None
    # [B] int32 on device, or None: a permutation of the requests, longest context first, in
    # which a decode-only step may dispatch its per-request attention programs (the long
    # ones start first and the short ones fill the tail). Order only: results do not depend
    # on it, and a backend may ignore it.
    decode_order: Optional[torch.Tensor] = None

    @property
    def num_reqs(self) -> int:
        return self.seq_lens.shape[0]


@dataclass(frozen=True)
class BackendCapabilities:
    head_sizes: tuple[int, ...]                     # supported head sizes; () = any
    dtypes: tuple[torch.dtype, ...]                 # query/model dtypes
    kv_cache_dtypes: tuple[str, ...] = ("auto",)    # "auto" = model dtype; "fp8" = e4m3
    block_sizes: tuple[int, ...] = ()               # () = any
    # Honors AttentionMetadata.seq_starts, which is all chunked local attention (Llama 4) needs
    # from a backend: the virtual batches are built once for every backend.
    supports_local_attention: bool = False
    min_compute_capability: Optional[tuple[int, int]] = None  # None: also runs on CPU
    supports_cuda_graphs: bool = False
    devices: tuple[str, ...] = ("cuda",)
    # fp8 KV caches may need a newer GPU than the backend itself (e4m3 casts: sm89+).
    fp8_min_compute_capability: Optional[tuple[int, int]] = None
    # The impl also has forward_qk_rope (QKRopeAttentionImpl): it applies a layer's per-head
    # q/k RMSNorm and rotary itself, fused with the KV-cache write (one launch instead of up to
    # four at the start of every layer). Not a requirement: layers that own a rotary apply it
    # themselves on backends without it, so this never rejects a backend.
    fuses_qk_rope_cache: bool = False


@dataclass(frozen=True)
class AttentionSpec:
    """What a model layer needs; built from generic layer arguments only."""
    num_heads: int
    num_kv_heads: int
    head_size: int
    scale: float
    dtype: torch.dtype
    kv_cache_dtype: str = "auto"
    block_size: int = 16
    local_attention_chunk: Optional[int] = None


class AttentionImpl(Protocol):
    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, metadata: AttentionMetadata,
                k_scale: Optional[torch.Tensor] = None,
                v_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
        """query [T, H, D], key/value [T, KV, D] for the new tokens (T may exceed
        metadata.num_actual_tokens when padded); writes the new K/V into kv_cache at
        metadata.slot_mapping, then returns attention output [T, H, D] (rows past
        num_actual_tokens are unspecified). k_scale/v_scale (float32 scalars, the layer's) are
        the per-tensor scales of an fp8 cache: stored = K / k_scale; a backend that declares
        only "auto" caches may ignore them."""
        ...


@dataclass(frozen=True)
class QKRope:
    """The pre-attention transform of a layer, handed to a backend that declares
    fuses_qk_rope_cache: per token, q/k heads -> [RMSNorm over the head dim with weights
    q_norm_weight / k_norm_weight (both or neither), eps] -> rotary by cos_sin_cache[positions]
    (rotary_dim = cos_sin_cache.shape[-1] <= head size; neox pairs (i, i + rot/2) or
    interleaved pairs (2i, 2i + 1)). Arithmetic: kvflow/kernels/reference.py
    (ref_qk_norm_rope_cache)."""
    positions: torch.Tensor                          # [T] int64, on device
    cos_sin_cache: torch.Tensor                      # [max_position, rotary_dim] float32
    is_neox: bool = True
    q_norm_weight: Optional[torch.Tensor] = None     # [head_size]
    k_norm_weight: Optional[torch.Tensor] = None     # [head_size]
    eps: float = 1e-6


class QKRopeAttentionImpl(AttentionImpl, Protocol):
    """The impl of a backend that declares fuses_qk_rope_cache."""

    def forward_qk_rope(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        kv_cache: torch.Tensor, metadata: AttentionMetadata, rope: QKRope,
                        k_scale: Optional[torch.Tensor] = None,
                        v_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
        """As forward, but query [T, H, D] / key [T, KV, D] are taken before `rope` (norm +
        rotary), which the impl applies: the transformed keys go to the cache only, and the
        inputs are not modified."""
        ...


class AttentionBackend(Protocol):
    name: str
    capabilities: BackendCapabilities

    def make_impl(self, spec: AttentionSpec) -> AttentionImpl:
        ...


def unsupported_reasons(backend: AttentionBackend, spec: AttentionSpec, device: torch.device,
                        compute_capability: Optional[tuple[int, int]] = None) -> list[str]:
    """Every reason `backend` cannot serve `spec` on `device`; empty when it can."""
    caps = backend.capabilities
    reasons = []
    if device.type not in caps.devices:
        reasons.append(f"runs on {caps.devices}, not {device.type}")
    if caps.head_sizes and spec.head_size not in caps.head_sizes:
        reasons.append(f"head size {spec.head_size} not in {caps.head_sizes}")
    if spec.dtype not in caps.dtypes:
        reasons.append(f"dtype {spec.dtype} not in {caps.dtypes}")
    if spec.kv_cache_dtype not in caps.kv_cache_dtypes:
        reasons.append(f"kv cache dtype {spec.kv_cache_dtype!r} not in {caps.kv_cache_dtypes}")
    if caps.block_sizes and spec.block_size not in caps.block_sizes:
        reasons.append(f"block size {spec.block_size} not in {caps.block_sizes}")
    if spec.local_attention_chunk and not caps.supports_local_attention:
        reasons.append("no chunked local attention")
    if (device.type == "cuda" and caps.min_compute_capability and compute_capability
            and compute_capability < caps.min_compute_capability):
        reasons.append(f"needs compute capability >= {caps.min_compute_capability}, "
                       f"device has {compute_capability}")
    if (spec.kv_cache_dtype == "fp8" and device.type == "cuda"
            and caps.fp8_min_compute_capability and compute_capability
            and compute_capability < caps.fp8_min_compute_capability):
        reasons.append(f"fp8 kv cache needs compute capability >= "
                       f"{caps.fp8_min_compute_capability}, device has {compute_capability}")
    return reasons
