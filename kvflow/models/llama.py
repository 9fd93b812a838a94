"""Llama-family decoder (Llama 2/3/3.1/3.2, SmolLM2) — structure only.

Qwen2 and Qwen3 are the same skeleton with different switches (see qwen2.py / qwen3.py):
q/k/v biases, per-head q/k RMSNorm. Parameters carry their own weight_loader; checkpoint names
that map onto fused parameters are declared in `packed_modules`.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from kvflow.attention.layer import Attention
from kvflow.model_config import ModelConfig
from kvflow.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from kvflow.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from kvflow.layers.norm import RMSNorm
from kvflow.layers.norm_fold import NormedHidden
from kvflow.layers.quantization import get_quant_config
from kvflow.layers.rotary import RotaryEmbedding


class LlamaMLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int, bias: bool = False, quant_config=None):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(hidden, [intermediate, intermediate],
                                                       bias=bias, quant_config=quant_config)
        self.down_proj = RowParallelLinear(intermediate, hidden, bias=bias,
                                           quant_config=quant_config)

    def forward(self, x, add_norm=None):
        """add_norm: see RowParallelLinear (the next layer's input norm; returns a pair)."""
        # silu(gate) * up runs in the gate | up product's epilogue where it can (decode-sized
        # skinny GEMMs), else inside the down projection (applied as it loads x), else as its
        # own kernel just before.
        act = self.gate_up_proj.forward_glu(x)
        if act is not None:
            return self.down_proj(act, add_norm=add_norm)
        return self.down_proj(self.gate_up_proj(x), silu_mul_input=True, add_norm=add_norm)


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding, qkv_bias: bool, o_bias: bool,
                 qk_norm: bool, quant_config=None):
        super().__init__()
        hd = cfg.head_dim
        self.qkv_proj = QKVParallelLinear(cfg.hidden_size, hd, cfg.num_attention_heads,
                                          cfg.num_key_value_heads, bias=qkv_bias,
                                          quant_config=quant_config)
        self.o_proj = RowParallelLinear(cfg.num_attention_heads * hd, cfg.hidden_size, bias=o_bias,
                                        quant_config=quant_config)
        self.rotary_emb = rotary
        self.head_dim = hd
        if qk_norm:
            self.q_norm = RMSNorm(hd, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(hd, cfg.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None
        # The attention layer owns the per-head q/k norm and the rotary (it fuses them with
        # the KV-cache write where the backend can); they stay registered here, under their
        # checkpoint names.
        self.attn = Attention(self.qkv_proj.num_heads, hd, hd ** -0.5, self.qkv_proj.num_kv_heads,
                              rotary=rotary, q_norm=self.q_norm, k_norm=self.k_norm)

    def forward(self, positions: torch.Tensor, hidden, add_norm=None):
        """add_norm: see RowParallelLinear (the post-attention norm; returns a pair)."""
        q, k, v = self.qkv_proj.split(self.qkv_proj(hidden))    # [T, H*D], [T, KV*D] x2
        return self.o_proj(self.attn(q, k, v, positions), add_norm=add_norm)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding, qkv_bias: bool, o_bias: bool,
                 qk_norm: bool, mlp_bias: bool, mlp: Optional[nn.Module] = None,
                 mlp_name: str = "mlp"):
        """mlp / mlp_name: a replacement feed-forward block (MoE models) and the attribute it is
        registered under, which is its checkpoint name (Mixtral: `block_sparse_moe`)."""
        super().__init__()
        # Quantized checkpoints (GPTQ) quantize the four projections only; None -> dense.
        qc = get_quant_config(cfg.hf_config)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = LlamaAttention(cfg, rotary, qkv_bias, o_bias, qk_norm, quant_config=qc)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if mlp is None:
            mlp = LlamaMLP(cfg.hidden_size, cfg.intermediate_size, mlp_bias, quant_config=qc)
        self.mlp_name = mlp_name
        setattr(self, mlp_name, mlp)

    def forward(self, positions, hidden, residual: Optional[torch.Tensor],
                next_layer: Optional["LlamaDecoderLayer"] = None):
        """-> (hidden, residual). Each residual add + RMSNorm between two dense projections may
        be folded into them (layers/norm_fold.py): then `hidden` arrives already normalised
        by the previous layer's down projection (a NormedHidden), and this layer's down
        projection applies `next_layer`'s input norm."""
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        elif not isinstance(hidden, NormedHidden):
            hidden, residual = self.input_layernorm(hidden, residual)
        mlp = getattr(self, self.mlp_name)
        if not isinstance(mlp, LlamaMLP):      # MoE: the router and experts read the norm
            hidden = self.self_attn(positions, hidden)
            hidden, residual = self.post_attention_layernorm(hidden, residual)
            return mlp(hidden), residual
        hidden, residual = self.self_attn(
            positions, hidden, add_norm=(residual, self.post_attention_layernorm, mlp.gate_up_proj))
        if next_layer is None:
            return mlp(hidden), residual
        return mlp(hidden, add_norm=(residual, next_layer.input_layernorm,
                                     next_layer.self_attn.qkv_proj))


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig, qkv_bias: bool, o_bias: bool, qk_norm: bool, mlp_bias: bool,
                 make_mlp: Optional[Callable[[int], Optional[nn.Module]]] = None,
                 mlp_name: str = "mlp"):
        """make_mlp(layer_index) -> the layer's feed-forward block, or None for the dense
        LlamaMLP (MoE models mix both)."""
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size)
        hf = cfg.hf_config
        # One table shared by all layers (named_buffers() lists it once).
        rotary = RotaryEmbedding(cfg.head_dim, max(cfg.max_model_len, cfg.max_position_embeddings),
                                 cfg.rope_theta, cfg.rope_scaling,
                                 float(hf.get("partial_rotary_factor", 1.0)))
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(cfg, rotary, qkv_bias, o_bias, qk_norm, mlp_bias,
                              mlp=make_mlp(i) if make_mlp is not None else None, mlp_name=mlp_name)
            for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        residual = None
        layers = list(self.layers)
        for layer, nxt in zip(layers, layers[1:] + [None]):
            hidden, residual = layer(positions, hidden, residual, next_layer=nxt)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(nn.Module):
    # (parameter name, checkpoint name, shard id)
    packed_modules = [
        ("qkv_proj", "q_proj", "q"), ("qkv_proj", "k_proj", "k"), ("qkv_proj", "v_proj", "v"),
        ("gate_up_proj", "gate_proj", 0), ("gate_up_proj", "up_proj", 1),
    ]

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = self.make_model(cfg)
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def make_model(self, cfg: ModelConfig) -> nn.Module:
        """The decoder stack (`self.model`); variants change its layers through layer_options,
        or replace it (Llama 4)."""
        return LlamaModel(cfg, **self.layer_options(cfg))

    @staticmethod
    def layer_options(cfg: ModelConfig) -> dict:
        bias = bool(cfg.hf_config.get("attention_bias", False))
        return dict(qkv_bias=bias, o_bias=bias, qk_norm=False,
                    mlp_bias=bool(cfg.hf_config.get("mlp_bias", False)))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """input_ids, positions: [T] -> hidden states [T, hidden]."""
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor,
                       out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """hidden [N, hidden] -> logits [N, vocab] in the model's dtype: the LM head's own
        output, written into `out` (the decode graphs' [N, vocab] buffer) by the product
        itself when given. The sampler and logprobs upcast what they read (exactly: the
        product rounds to this dtype anyway), so an fp32 copy here would change no value; it
        would cost a write and a read of the logits (at 1000 rows x 152K, 0.6 GB each way a
        step) and a second set of sampling kernels to compile (one per logits dtype)."""
        return self.lm_head.compute_logits(hidden, out=out)
