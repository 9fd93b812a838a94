"""`KVLayout`: what a KV transfer's bytes mean, described from the engine's configs alone.

A KV transfer between two engines (disaggregated prefill, cache offload) is only correct if both
sides agree on what every byte is. The failure this module exists to prevent is a connector that
infers the layout by unpacking a tensor's shape (`_, nb, bs, h, d = cache.shape`): it silently
misreads a cache with another axis order, block size or TP split, and produces garbage attention
rather than an error. So a `KVLayout` is built ONLY from (ModelConfig, CacheConfig,
ParallelConfig) by `KVLayout.from_config`, travels with every transfer (wire.py), and tensors are
checked AGAINST it, never used to build it.

Invariants of a `KVLayout` (checked by `__post_init__`, so `from_dict` on untrusted input too):
  * axis_order is a permutation of AXES = ("kv", "block", "token", "head", "dim"); the per-layer
    cache tensor's dimension i is axis `axis_order[i]`. The engine's layout (attention/backend.py)
    is [2, num_blocks, block_size, num_kv_heads, head_size] = ENGINE_AXIS_ORDER.
  * Extents: kv = 2 (K at 0, V at 1), token = block_size, head = kv_heads_per_rank,
    dim = head_dim, block = any (the cache's capacity; transfers address blocks by id).
  * TP split (mirrors layers/linear.py QKVParallelLinear): with num_kv_heads >= tp_size, rank r
    holds heads [r*h/tp, (r+1)*h/tp); with fewer heads than ranks each head is replicated on
    tp/h ranks and rank r holds head r // (tp/h). `head_range` gives the [start, stop).
  * kv_cache_dtype is the STORAGE dtype name (never "auto": "auto" resolves to the model dtype);
    kv_scales, when set, are per-layer (k_scale, v_scale) for quantized caches.

Compatibility (`compatibility` / `conversions`): a different model fingerprint, layer count,
total KV heads, head_dim, dtype, KV cache dtype or KV scales cannot be converted (bytes would
mean something else, or conversion would be lossy) and blocks the transfer; axis order, block
size and TP split are re-arrangements of the same values and are converted by wire.py.

The fingerprint identifies the model CONFIG, not its weights: two fine-tunes of one base model
collide unless the caller passes `identity=` (e.g. a weights checksum) to `from_config`.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, fields
from typing import Any, Optional, Sequence

import torch

AXES = ("kv", "block", "token", "head", "dim")
ENGINE_AXIS_ORDER = AXES   # kvflow's paged cache: [2, num_blocks, block_size, heads, head_dim]

# Storage dtypes a KV cache may have, by their wire name. Conversions are byte moves, so any
# dtype whose element size torch knows is fine; casts between dtypes are never done.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2,
}
_KV_CACHE_DTYPE_ALIASES = {"fp8": "float8_e4m3fn", "fp8_e4m3": "float8_e4m3fn",
                           "fp8_e5m2": "float8_e5m2"}

# ModelConfig fields whose values determine what the K/V vectors of a token are. Deliberately
# excluded: max_model_len / max_position_embeddings (capacity, not content), paths, seed,
# tokenizer, eos ids. dtype is included: the same model in another dtype has other bytes.
_FINGERPRINT_FIELDS = ("architecture", "model_type", "hidden_size", "intermediate_size",
                       "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                       "head_dim", "vocab_size", "rms_norm_eps", "rope_theta", "rope_scaling",
                       "attention_bias", "tie_word_embeddings")
# Raw config.json keys that change K/V contents for some architectures, when present.
_FINGERPRINT_HF_KEYS = ("sliding_window", "partial_rotary_factor", "rotary_dim", "layer_types",
                        "no_rope_layers", "attention_chunk_size", "use_qk_norm",
                        "query_pre_attn_scalar", "quantization_config")


class KVLayoutError(ValueError):
    """A layout is invalid, or two layouts cannot exchange KV. The message names the field."""


def dtype_name(dtype: torch.dtype) -> str:
    for name, dt in DTYPES.items():
        if dt == dtype:
            return name
    raise KVLayoutError(f"dtype: {dtype} is not a supported KV dtype ({sorted(DTYPES)})")


def rank_head_range(num_kv_heads: int, tp_size: int, tp_rank: int) -> tuple[int, int]:
    """[start, stop) of the global KV heads a TP rank holds (see the module docstring)."""
    if num_kv_heads >= tp_size:
        if num_kv_heads % tp_size:
            raise KVLayoutError(f"tp_size: {tp_size} must divide num_kv_heads={num_kv_heads}")
        per = num_kv_heads // tp_size
        return tp_rank * per, (tp_rank + 1) * per
    if tp_size % num_kv_heads:
        raise KVLayoutError(f"tp_size: {tp_size} must be a multiple of num_kv_heads={num_kv_heads}")
    head = tp_rank // (tp_size // num_kv_heads)
    return head, head + 1


def model_fingerprint(model_config: Any, identity: str = "") -> str:
    """sha256 (hex) over the canonical JSON of the config values that determine K/V contents."""
    doc: dict[str, Any] = {f: getattr(model_config, f) for f in _FINGERPRINT_FIELDS}
    doc["dtype"] = dtype_name(model_config.dtype)
    hf = getattr(model_config, "hf_config", None) or {}
    doc["hf"] = {k: hf[k] for k in _FINGERPRINT_HF_KEYS if k in hf}
    doc["identity"] = identity
    # sort_keys + repr-exact floats: the same config hashes the same on every host and version.
    blob = json.dumps(doc, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclass(frozen=True)
class KVLayout:
    fingerprint: str
    num_layers: int
    num_kv_heads: int                   # total over all TP ranks
    kv_heads_per_rank: int              # heads in this rank's cache tensors
    head_dim: int
    dtype: str                          # model compute dtype (wire name)
    kv_cache_dtype: str                 # storage dtype of the cache (wire name, never "auto")
    kv_scales: Optional[tuple[tuple[float, float], ...]]   # per layer (k_scale, v_scale)
    block_size: int
    axis_order: tuple[str, ...]
    tp_rank: int
    tp_size: int

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, model_config: Any, cache_config: Any, parallel_config: Any, *,
                    axis_order: Sequence[str] = ENGINE_AXIS_ORDER,
                    kv_scales: Optional[Sequence[Sequence[float]]] = None,
                    identity: str = "") -> "KVLayout":
        """The layout of one rank's paged KV cache. Reads configs only, never tensors.
        `axis_order` is for backends whose physical cache layout differs from the engine's."""
        kv_dtype = cache_config.kv_cache_dtype
        kv_dtype = (dtype_name(model_config.dtype) if kv_dtype == "auto"
                    else _KV_CACHE_DTYPE_ALIASES.get(kv_dtype, kv_dtype))
        tp, rank = parallel_config.tensor_parallel_size, parallel_config.rank
        start, stop = rank_head_range(model_config.num_key_value_heads, tp, rank)
        return cls(
            fingerprint=model_fingerprint(model_config, identity),
            num_layers=model_config.num_hidden_layers,
            num_kv_heads=model_config.num_key_value_heads, kv_heads_per_rank=stop - start,
            head_dim=model_config.head_dim, dtype=dtype_name(model_config.dtype),
            kv_cache_dtype=kv_dtype,
            kv_scales=None if kv_scales is None else tuple((float(k), float(v))
                                                           for k, v in kv_scales),
            block_size=cache_config.block_size, axis_order=tuple(axis_order),
            tp_rank=rank, tp_size=tp)

    def __post_init__(self):
        def bad(field: str, msg: str) -> KVLayoutError:
            return KVLayoutError(f"{field}: {msg}")

        if not (isinstance(self.fingerprint, str) and len(self.fingerprint) == 64):
            raise bad("fingerprint", f"must be a sha256 hex digest, got {self.fingerprint!r}")
        for f in ("num_layers", "num_kv_heads", "kv_heads_per_rank", "head_dim", "block_size",
                  "tp_size"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise bad(f, f"must be an integer >= 1, got {v!r}")
        if self.block_size & (self.block_size - 1):
            raise bad("block_size", f"must be a power of two, got {self.block_size}")
        if not isinstance(self.tp_rank, int) or not 0 <= self.tp_rank < self.tp_size:
            raise bad("tp_rank", f"must be in [0, {self.tp_size}), got {self.tp_rank!r}")
        start, stop = rank_head_range(self.num_kv_heads, self.tp_size, self.tp_rank)
        if self.kv_heads_per_rank != stop - start:
            raise bad("kv_heads_per_rank", f"{self.kv_heads_per_rank} != {stop - start} implied "
                                           f"by num_kv_heads={self.num_kv_heads}, tp_size={self.tp_size}")
        for f in ("dtype", "kv_cache_dtype"):
            if getattr(self, f) not in DTYPES:
                raise bad(f, f"must be one of {sorted(DTYPES)}, got {getattr(self, f)!r}")
        if sorted(self.axis_order) != sorted(AXES) or len(self.axis_order) != len(AXES):
            raise bad("axis_order", f"must be a permutation of {AXES}, got {self.axis_order!r}")
        if self.kv_scales is not None:
            ok = (len(self.kv_scales) == self.num_layers
                  and all(len(s) == 2 and all(isinstance(x, float) and math.isfinite(x) for x in s)
                          for s in self.kv_scales))
            if not ok:
                raise bad("kv_scales", f"must be {self.num_layers} finite (k_scale, v_scale) pairs")

    # ------------------------------------------------------------------ derived geometry
    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.kv_cache_dtype]

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.torch_dtype).element_size()

    @property
    def head_range(self) -> tuple[int, int]:
        return rank_head_range(self.num_kv_heads, self.tp_size, self.tp_rank)

    def extents(self, num_blocks: int) -> dict[str, int]:
        return {"kv": 2, "block": num_blocks, "token": self.block_size,
                "head": self.kv_heads_per_rank, "dim": self.head_dim}

    def cache_shape(self, num_blocks: int) -> tuple[int, ...]:
        """Shape of one layer's cache (or of a payload of `num_blocks` blocks) in axis_order."""
        ext = self.extents(num_blocks)
        return tuple(ext[a] for a in self.axis_order)

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def layer_nbytes(self, num_tokens: int) -> int:
        """Payload bytes of one layer for `num_tokens` tokens (whole blocks are sent)."""
        return math.prod(self.cache_shape(self.num_blocks_for(num_tokens))) * self.itemsize

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["axis_order"] = list(self.axis_order)
        d["kv_scales"] = None if self.kv_scales is None else [list(s) for s in self.kv_scales]
        return d

    @classmethod
    def from_dict(cls, d: Any) -> "KVLayout":
        """Strict: unknown or missing keys are errors (a meaning-changing addition must bump the
        wire version, so a silent ignore could only hide a mismatch)."""
        if not isinstance(d, dict):
            raise KVLayoutError(f"layout: must be an object, got {type(d).__name__}")
        names = {f.name for f in fields(cls)}
        if set(d) != names:
            missing, unknown = sorted(names - set(d)), sorted(set(d) - names)
            raise KVLayoutError(f"layout: missing keys {missing}, unknown keys {unknown}")
        d = dict(d)
        if not isinstance(d["axis_order"], list):
            raise KVLayoutError("axis_order: must be a list")
        d["axis_order"] = tuple(d["axis_order"])
        if d["kv_scales"] is not None:
            try:
                d["kv_scales"] = tuple((float(k), float(v)) for k, v in d["kv_scales"])
            except (TypeError, ValueError):
                raise KVLayoutError("kv_scales: must be a list of [k_scale, v_scale]") from None
        return cls(**d)

    # ------------------------------------------------------------------ compatibility
    def compatibility(self, other: "KVLayout") -> list[str]:
        """Reasons KV in `other`'s layout can NOT be loaded into this one (empty = it can,
        possibly after the conversions listed by `conversions`). Each names its field."""
        reasons = []
        for f, what in (("num_layers", "number of layers"), ("num_kv_heads", "total KV heads"),
                        ("head_dim", "head dim"), ("dtype", "model dtype"),
                        ("kv_cache_dtype", "KV cache dtype")):
            a, b = getattr(other, f), getattr(self, f)
            if a != b:
                reasons.append(f"{f}: {what} differs (sender {a!r}, receiver {b!r})")
        if other.kv_scales != self.kv_scales:
            reasons.append("kv_scales: KV cache quantization scales differ")
        if other.fingerprint != self.fingerprint:
            reasons.append(f"fingerprint: model fingerprint differs (sender {other.fingerprint[:12]}…, "
                           f"receiver {self.fingerprint[:12]}…): not the same model config")
        return reasons

    def conversions(self, other: "KVLayout") -> list[str]:
        """Differences wire.scatter_blocks converts when loading `other`'s KV into this one."""
        out = []
        if other.axis_order != self.axis_order:
            out.append(f"axis_order {other.axis_order} -> {self.axis_order}")
        if other.block_size != self.block_size:
            out.append(f"block_size {other.block_size} -> {self.block_size}")
        if (other.tp_size, other.tp_rank) != (self.tp_size, self.tp_rank):
            out.append(f"tp rank {other.tp_rank}/{other.tp_size} heads {other.head_range} -> "
                       f"rank {self.tp_rank}/{self.tp_size} heads {self.head_range}")
        return out

    def check_compatible(self, other: "KVLayout") -> None:
        reasons = self.compatibility(other)
        if reasons:
            raise KVLayoutError("incompatible KV layout: " + "; ".join(reasons))


def sender_ranks_for(receiver: KVLayout, sender_tp_size: int) -> list[int]:
    """The fewest sender ranks (of a sender with `sender_tp_size` ranks and the receiver's model)
    whose heads together cover the receiver rank's heads, in head order. A receiver needs one
    transfer from each; with replicated sender heads the lowest rank holding a head is chosen."""
    need_lo, need_hi = receiver.head_range
    ranks: list[int] = []
    for head in range(need_lo, need_hi):
        for r in range(sender_tp_size):
            lo, hi = rank_head_range(receiver.num_kv_heads, sender_tp_size, r)
            if lo <= head < hi:
                if r not in ranks:
                    ranks.append(r)
                break
    return ranks
