"""The attention layer models use. It knows heads and scale only; the backend implementation
and the KV cache tensor are bound by the model runner after the model is built.

Under torch.compile the whole attention call (KV cache write + paged attention) is one opaque
custom op, `kvflow::unified_attention`, so dynamo traces everything else of the forward as a
single graph that serves every batch size: the op's only graph inputs are q/k/v and a constant
layer name; the per-step metadata (varying batch structure) is read from the forward context
inside the op, and the KV cache is state of the layer, looked up through the name. Keeping the
cache out of the graph is deliberate: its size (num_blocks) is decided by the memory plan after
compilation and may be reallocated, and none of that may enter compiled code or its cache key.
It is also sound: no other graph op reads the cache, and each layer's op depends on the previous
layer's output, so the compiler can neither drop nor reorder the hidden writes.

Eager execution calls the backend directly, exactly as before (the op adds nothing there).

Pre-attention transform: a layer built with `rotary=` (and optionally per-head `q_norm` /
`k_norm` RMSNorms) takes q/k before norm and rotary, plus the positions. On a backend that
declares fuses_qk_rope_cache the layer hands those parameters to the impl (forward_qk_rope),
which fuses them with the KV-cache write; otherwise the layer applies norm + rotary itself with
the existing ops (under torch.compile: in the traced graph, outside the op, as model code did)
and calls forward. Only under the fused path does the custom op receive the positions.
"""
from __future__ import annotations

import weakref
from typing import Optional

import torch
from torch import nn

from kvflow.attention.backend import AttentionImpl, BackendCapabilities, QKRope
from kvflow.forward_context import GLOBAL, LOCAL, get_forward_context

# name -> layer, for the custom op. Weak: a dropped model frees its names.
_LAYERS: "weakref.WeakValueDictionary[str, Attention]" = weakref.WeakValueDictionary()


class Attention(nn.Module):
    def __init__(self, num_heads: int, head_dim: int, scale: float, num_kv_heads: int,
                 local_attention_chunk: Optional[int] = None,
                 rotary: Optional[nn.Module] = None, q_norm: Optional[nn.Module] = None,
                 k_norm: Optional[nn.Module] = None):
        """rotary (kvflow.layers.rotary.RotaryEmbedding) / q_norm, k_norm (RMSNorm over
        head_dim, both or neither, rotary required): the layer owns the pre-attention
        transform q, k -> rotary(norm(q), norm(k)); forward then takes q/k before it and the
        positions (see the module doc)."""
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.scale = scale
        self.num_kv_heads = num_kv_heads
        if local_attention_chunk is not None and local_attention_chunk < 1:
            raise ValueError(f"local_attention_chunk must be >= 1, got {local_attention_chunk}")
        # Chunked local attention: a query at position p sees keys [p // C * C, p]. The layer
        # itself is unchanged; it reads the step's "local" metadata (a virtual batch whose
        # requests each lie inside one chunk) instead of the global one.
        self.local_attention_chunk = local_attention_chunk
        self.attn_kind = LOCAL if local_attention_chunk else GLOBAL
        self.impl: Optional[AttentionImpl] = None
        # [2, num_blocks, block_size, num_kv_heads, head_dim]; bound by the runner.
        self.kv_cache: Optional[torch.Tensor] = None
        # Process-unique name under which the custom op finds this layer; set by
        # bind_attention_layers() before the model is compiled (None = eager only).
        self.layer_name: Optional[str] = None
        # Per-tensor scales of a quantized (fp8) KV cache: stored = K / k_scale, read back as
        # stored * k_scale. 1.0 unless the checkpoint provides them (load_kv_scale). Buffers so
        # they follow the model's device; non-persistent (not in state_dict) but still listed
        # by named_buffers(), so sleep level 2 backs them up. float32, shape [1] rather than
        # 0-d: code that handles every buffer as bytes (digests, backups) cannot view a 0-d
        # tensor as uint8; [1] broadcasts like a scalar.
        self.register_buffer("k_scale", torch.ones(1, dtype=torch.float32), persistent=False)
        self.register_buffer("v_scale", torch.ones(1, dtype=torch.float32), persistent=False)
        if (q_norm is None) != (k_norm is None):
            raise ValueError("Attention: q_norm and k_norm go together")
        if q_norm is not None and rotary is None:
            raise ValueError("Attention: q_norm / k_norm need a rotary")
        if q_norm is not None and q_norm.eps != k_norm.eps:
            raise ValueError(f"Attention: q_norm eps {q_norm.eps} != k_norm eps {k_norm.eps}")
        if rotary is not None and rotary.head_dim != head_dim:
            raise ValueError(f"Attention: rotary head dim {rotary.head_dim} != {head_dim}")
        # Held, not registered: the model registers these modules where the checkpoint names
        # them (self_attn.q_norm.weight, one rotary table shared by all layers), so parameter
        # and buffer names, .to(), and sleep-mode backups are unchanged. The modules (not
        # their tensors) are kept, so tensors those replace are always seen.
        self._qk_rope: Optional[tuple] = None if rotary is None else (rotary, q_norm, k_norm)
        # Set by bind_impl from the backend's capabilities: the impl applies the transform.
        self.fuse_qk_rope = False

    def bind_impl(self, impl: AttentionImpl, capabilities: BackendCapabilities) -> None:
        """Bind a backend's impl for this layer (the model runner does, after selection)."""
        self.impl = impl
        self.fuse_qk_rope = self._qk_rope is not None and capabilities.fuses_qk_rope_cache

    def qk_rope(self, positions: torch.Tensor) -> QKRope:
        """The transform's parameters for a backend that fuses it."""
        rotary, q_norm, k_norm = self._qk_rope
        return QKRope(positions=positions, cos_sin_cache=rotary.cos_sin_cache,
                      is_neox=rotary.is_neox,
                      q_norm_weight=None if q_norm is None else q_norm.weight,
                      k_norm_weight=None if k_norm is None else k_norm.weight,
                      eps=1e-6 if q_norm is None else q_norm.eps)

    def apply_qk_rope(self, positions: torch.Tensor, q: torch.Tensor,
                      k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The unfused transform, with the existing ops: q [T, H*D], k [T, KV*D] ->
        (rotary(norm(q)), rotary(norm(k))), same shapes (the rotary works in place)."""
        rotary, q_norm, k_norm = self._qk_rope
        if q_norm is not None:
            t = q.shape[0]
            q = q_norm(q.reshape(t, -1, self.head_dim)).view(t, -1)
            k = k_norm(k.reshape(t, -1, self.head_dim)).view(t, -1)
        return rotary(positions, q, k)

    def load_kv_scale(self, which: str, value: torch.Tensor) -> None:
        """Write a checkpoint's k_scale / v_scale (a scalar, or a 1-element tensor)."""
        if value.numel() != 1:
            raise ValueError(f"{which} must be a single per-tensor scale, got shape "
                             f"{tuple(value.shape)}")
        scale = float(value.reshape(()).float())
        if not (scale > 0 and scale < float("inf")):
            raise ValueError(f"{which} must be a finite positive number, got {scale}")
        getattr(self, which).fill_(scale)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """q [T, H*D], k/v [T, KV*D] -> [T, H*D]. A layer that owns a rotary takes q/k before
        norm and rotary, and positions [T] (the model's)."""
        fused_positions = None
        if self._qk_rope is not None:
            if positions is None:
                raise ValueError("Attention: a layer that owns its rotary needs the positions")
            if self.fuse_qk_rope:
                fused_positions = positions
            else:
                q, k = self.apply_qk_rope(positions, q, k)
        if torch.compiler.is_compiling():
            if self.layer_name is None:
                raise RuntimeError("an Attention layer is being compiled without a name: compile "
                                   "through kvflow.compilation.compile_model (or call "
                                   "kvflow.attention.layer.bind_attention_layers first)")
            return torch.ops.kvflow.unified_attention(q, k, v, self.layer_name, fused_positions)
        if fused_positions is None:      # the ready-q/k call, exactly as before the fusion
            return self.forward_eager(q, k, v)
        return self.forward_eager(q, k, v, fused_positions)

    def forward_eager(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """positions: given only on the fused path (q/k before norm and rotary, which the
        impl applies); None: q/k are ready."""
        if positions is not None and not self.fuse_qk_rope:
            # A graph traced while a fusing backend was bound, run after rebinding one that
            # does not fuse: apply the transform here, on copies (the op mutates no argument).
            q, k = self.apply_qk_rope(positions, q.clone(), k.clone())
            positions = None
        ctx = get_forward_context()
        md = ctx.metadata(self.attn_kind)
        t = q.shape[0]
        # KV connector hooks (kvflow/kv_transfer/base.py): no-ops unless a layer-pipelined
        # connector is configured.
        ctx.kv_connector.wait_for_layer_load(self.layer_name)
        qkv = (q.view(t, self.num_heads, self.head_dim),
               k.view(t, self.num_kv_heads, self.head_dim),
               v.view(t, self.num_kv_heads, self.head_dim))
        if positions is not None:
            out = self.impl.forward_qk_rope(*qkv, self.kv_cache, md, self.qk_rope(positions),
                                            self.k_scale, self.v_scale)
        else:
            out = self.impl.forward(*qkv, self.kv_cache, md, self.k_scale, self.v_scale)
        ctx.kv_connector.save_kv_layer(self.layer_name, self.kv_cache, md)
        return out.view(t, self.num_heads * self.head_dim)


def bind_attention_layers(model: nn.Module) -> list[str]:
    """Give every Attention layer of `model` a process-unique name and register it for the
    custom op; returns the names in module order. Idempotent for an already bound layer.

    The name is a constant of the compiled graph, so it is deterministic: the module path
    ("model.layers.0.self_attn.attn"), identical in every process that serves the model, which
    keeps compiled artifacts shareable. Only when another live model in this process already
    holds that name (tests, several engines) is a suffix added ("...attn#1")."""
    names = []
    for path, module in model.named_modules():
        if not isinstance(module, Attention):
            continue
        if module.layer_name is None or _LAYERS.get(module.layer_name) is not module:
            name, i = path, 0
            while _LAYERS.get(name) not in (None, module):
                i += 1
                name = f"{path}#{i}"
            module.layer_name = name
            _LAYERS[name] = module
        names.append(module.layer_name)
    return names


@torch.library.custom_op("kvflow::unified_attention", mutates_args=())
def unified_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_name: str,
                      positions: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Attention.forward_eager of the layer registered as `layer_name` (writes its KV cache).
    No argument is declared mutated: the KV cache is not an argument (see the module doc), and
    on the fused path (positions given) q/k are read, never rotated in place."""
    layer = _LAYERS.get(layer_name)
    if layer is None:
        raise RuntimeError(f"no live Attention layer is registered as {layer_name!r}")
    return layer.forward_eager(q, k, v, positions)


@unified_attention.register_fake
def _unified_attention_fake(q, k, v, layer_name, positions=None):
    # Same shape and dtype as q, contiguous (every backend returns a fresh contiguous tensor).
    return q.new_empty(q.shape)
