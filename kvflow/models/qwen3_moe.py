"""Qwen3-MoE: Qwen3 attention (per-head q/k RMSNorm) with sparse MoE feed-forward blocks.

A layer is sparse unless it is listed in `mlp_only_layers` or `(i + 1) % decoder_sparse_step`
is non-zero (HF's rule); those layers keep a dense LlamaMLP of `intermediate_size`. Experts use
`moe_intermediate_size`; `norm_topk_prob` says whether the top-k weights are renormalised.
Checkpoint names: `mlp.gate` and `mlp.experts.{e}.gate_proj/up_proj/down_proj`.
"""
from __future__ import annotations

from typing import Optional

from kvflow.model_config import ModelConfig
from kvflow.layers.moe import (GraphSafeWhenFusedMoE, QWEN_EXPERT_NAMES, SparseMoeBlock,
                               make_expert_params_mapping)
from kvflow.models.llama import LlamaForCausalLM
from kvflow.models.mixtral import check_moe_supported, num_experts


def is_sparse_layer(hf: dict, layer: int) -> bool:
    step = int(hf.get("decoder_sparse_step") or 1)
    return (layer not in (hf.get("mlp_only_layers") or [])
            and num_experts(hf) > 0 and (layer + 1) % step == 0)


class Qwen3MoeForCausalLM(GraphSafeWhenFusedMoE, LlamaForCausalLM):
    # CUDA graphs: supported when the MoE dispatch is the sync-free Triton kernel (mixin).
    def __init__(self, cfg: ModelConfig):
        check_moe_supported(cfg)
        super().__init__(cfg)
        self.expert_params_mapping = make_expert_params_mapping(
            num_experts(cfg.hf_config), QWEN_EXPERT_NAMES)

    @staticmethod
    def layer_options(cfg: ModelConfig) -> dict:
        hf = cfg.hf_config
        e, k = num_experts(hf), int(hf.get("num_experts_per_tok", 8))
        inter = int(hf.get("moe_intermediate_size") or cfg.intermediate_size)
        renorm = bool(hf.get("norm_topk_prob", False))

        def make_mlp(layer: int) -> Optional[SparseMoeBlock]:
            if not is_sparse_layer(hf, layer):
                return None   # dense LlamaMLP (its gate_proj/up_proj go through packed_modules)
            return SparseMoeBlock(cfg.hidden_size, inter, e, k, renormalize=renorm)

        bias = bool(hf.get("attention_bias", False))
        return dict(qkv_bias=bias, o_bias=bias, qk_norm=True, mlp_bias=False, make_mlp=make_mlp)
