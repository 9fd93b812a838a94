"""Llama 4 text model (Scout / Maverick language part) — structure only.

Per layer i (HF Llama4TextConfig semantics):
  * attention: RoPE layers (no_rope_layers[i] == 1; note the inverted name) rotate q/k with
    interleaved pairs (HF's complex form), then L2-normalise q and k per head when use_qk_norm
    (no weight), and attend locally within chunks of attention_chunk_size tokens
    (layer_types[i] == "chunked_attention"). NoPE layers (no_rope_layers[i] == 0) attend over
    the whole context without rotary; with attn_temperature_tuning their queries are scaled by
    1 + attn_scale * log1p(floor((pos + 1) / floor_scale)).
  * feed-forward: layers in moe_layers (default every interleave_moe_layer_step-th) are MoE
    blocks — sigmoid top-1 routing with the routing weight applied to the expert input, plus a
    shared expert (a dense MLP of intermediate_size) — the others dense MLPs of
    intermediate_size_mlp.

Checkpoints: Llama4ForCausalLM names (`model.layers.{i}.feed_forward.router.weight`,
`...experts.gate_up_proj` [E, H, 2I], `...experts.down_proj` [E, I, H], `...shared_expert.*`),
or Llama4ForConditionalGeneration ones, whose language model sits under `language_model.` and
whose vision tower and projector are skipped (logged once by the loader).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from kvflow.attention.layer import Attention
from kvflow.model_config import ModelConfig
from kvflow.layers.embedding import VocabParallelEmbedding
from kvflow.layers.linear import QKVParallelLinear, ReplicatedLinear, RowParallelLinear
from kvflow.layers.moe import (FusedMoE, GraphSafeWhenFusedMoE,
                               make_stacked_expert_params_mapping, route)
from kvflow.layers.norm import L2Norm, RMSNorm
from kvflow.layers.rotary import RotaryEmbedding
from kvflow.models.llama import LlamaForCausalLM, LlamaMLP
from kvflow.models.mixtral import check_moe_supported


class Llama4Layout:
    """Which layers use rope / chunked attention / MoE, with HF's defaults for absent keys."""

    def __init__(self, hf: dict, num_layers: int):
        interval = int(hf.get("no_rope_layer_interval") or 4)
        self.use_rope = [bool(x) for x in (hf.get("no_rope_layers") or
                                           [int((i + 1) % interval != 0) for i in range(num_layers)])]
        if len(self.use_rope) < num_layers:
            raise ValueError(f"model: no_rope_layers has {len(self.use_rope)} entries for "
                             f"{num_layers} layers")
        types = hf.get("layer_types") or ["chunked_attention" if r else "full_attention"
                                          for r in self.use_rope]
        chunk = hf.get("attention_chunk_size")
        # Without a chunk size every layer attends globally.
        self.chunk = [int(chunk) if chunk and t == "chunked_attention" else None
                      for t in types[:num_layers]]
        step = int(hf.get("interleave_moe_layer_step") or 1)
        moe = hf.get("moe_layers")
        self.moe = set(moe if moe is not None else range(step - 1, num_layers, step))


class Llama4Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: Optional[RotaryEmbedding],
                 local_chunk: Optional[int]):
        super().__init__()
        hf, hd = cfg.hf_config, cfg.head_dim
        bias = bool(hf.get("attention_bias", False))
        self.head_dim = hd
        self.qkv_proj = QKVParallelLinear(cfg.hidden_size, hd, cfg.num_attention_heads,
                                          cfg.num_key_value_heads, bias=bias)
        self.o_proj = RowParallelLinear(cfg.num_attention_heads * hd, cfg.hidden_size, bias=bias)
        self.rotary_emb = rotary                                # None on NoPE layers
        use_qk_norm = bool(hf.get("use_qk_norm", True))
        self.qk_norm = L2Norm(cfg.rms_norm_eps) if use_qk_norm and rotary is not None else None
        self.temperature_tuning = bool(hf.get("attn_temperature_tuning", True)) and rotary is None
        self.floor_scale = float(hf.get("floor_scale", 8192))
        self.attn_scale = float(hf.get("attn_scale", 0.1))
        self.attn = Attention(self.qkv_proj.num_heads, hd, hd ** -0.5, self.qkv_proj.num_kv_heads,
                              local_attention_chunk=local_chunk)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_proj.split(self.qkv_proj(hidden))      # [T, H*D], [T, KV*D] x2
        t = q.shape[0]
        if self.rotary_emb is not None:
            q, k = self.rotary_emb(positions, q, k)
        if self.qk_norm is not None:                              # after rotary, as HF
            q = self.qk_norm(q.reshape(t, -1, self.head_dim)).view(t, -1)
            k = self.qk_norm(k.reshape(t, -1, self.head_dim)).view(t, -1)
        if self.temperature_tuning:
            # Scales grow with the absolute position: float32 math, one rounding (as HF).
            scale = torch.log1p(torch.floor((positions.float() + 1.0) / self.floor_scale))
            scale = scale * self.attn_scale + 1.0                  # [T]
            q = (q.reshape(t, -1, self.head_dim) * scale[:, None, None]).to(q.dtype).view(t, -1)
        return self.o_proj(self.attn(q, k, v))


class Llama4MoE(nn.Module):
    """Router + routed experts (sigmoid top-1, weight applied to the expert's input) + a
    shared expert every token goes through. Parameter names match the checkpoint."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hf = cfg.hf_config
        self.num_experts = int(hf.get("num_local_experts") or 16)
        self.top_k = int(hf.get("num_experts_per_tok") or 1)
        if self.top_k != 1:
            raise ValueError(f"model: Llama 4 MoE with num_experts_per_tok={self.top_k} is not "
                             "supported (the routing weight scales the expert input: top-1 only)")
        self.router = ReplicatedLinear(cfg.hidden_size, self.num_experts, bias=False)
        self.experts = FusedMoE(self.num_experts, cfg.hidden_size, cfg.intermediate_size)
        self.shared_expert = LlamaMLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, H] -> [T, H]."""
        weights, ids = route(self.router, x, self.top_k, renormalize=False, scoring="sigmoid")
        routed = self.experts(x, weights, ids, weights_on_input=True)
        return self.shared_expert(x) + routed


class Llama4DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layout: Llama4Layout, i: int, rotary: RotaryEmbedding):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Llama4Attention(cfg, rotary if layout.use_rope[i] else None,
                                         layout.chunk[i])
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if i in layout.moe:
            self.feed_forward = Llama4MoE(cfg)
        else:
            inter = int(cfg.hf_config.get("intermediate_size_mlp") or cfg.intermediate_size)
            self.feed_forward = LlamaMLP(cfg.hidden_size, inter)

    def forward(self, positions, hidden, residual: Optional[torch.Tensor]):
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.feed_forward(hidden), residual


class Llama4Model(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        layout = Llama4Layout(cfg.hf_config, cfg.num_hidden_layers)
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size)
        # Sized by max_model_len only: Scout's max_position_embeddings (10M) would make a
        # multi-GB table, and no position reaches past max_model_len. Shared by all RoPE layers.
        rotary = RotaryEmbedding(cfg.head_dim, cfg.max_model_len, cfg.rope_theta,
                                 cfg.rope_scaling, is_neox=False)
        self.layers = nn.ModuleList(Llama4DecoderLayer(cfg, layout, i, rotary)
                                    for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        residual = None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class Llama4ForCausalLM(GraphSafeWhenFusedMoE, LlamaForCausalLM):
    """LlamaForCausalLM's head, loader mapping (packed_modules) and logits over the Llama 4
    decoder stack. CUDA graphs when the MoE dispatch is the sync-free Triton kernel (mixin);
    DecodeGraphs rebuilds the local-attention metadata inside the graph."""

    def __init__(self, cfg: ModelConfig):
        check_moe_supported(cfg)
        super().__init__(cfg)
        self.expert_params_mapping = make_stacked_expert_params_mapping()

    def make_model(self, cfg: ModelConfig) -> nn.Module:
        return Llama4Model(cfg)


class Llama4ForConditionalGeneration(Llama4ForCausalLM):
    """The text part of a multimodal Llama 4 checkpoint (config.json's text_config is
    flattened by kvflow.model_config.read_hf_config)."""
    checkpoint_prefix_renames = {"language_model.": ""}
    skipped_checkpoint_prefixes = ("vision_model.", "multi_modal_projector.")
