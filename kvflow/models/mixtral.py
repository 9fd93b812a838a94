"""Mixtral: Llama attention, every feed-forward block a sparse MoE (softmax top-k, renormalised).

Checkpoint names: `block_sparse_moe.gate` (router) and `block_sparse_moe.experts.{e}.w1/w3/w2`
(gate / up / down), loaded into the stacked `experts.w13` / `experts.w2` of SparseMoeBlock.
Sliding-window attention (Mixtral configs carry `sliding_window`, null in released checkpoints)
is not implemented: a non-null window is rejected rather than silently ignored.
"""
from __future__ import annotations

from kvflow.model_config import ModelConfig
from kvflow.layers.moe import (GraphSafeWhenFusedMoE, MIXTRAL_EXPERT_NAMES, SparseMoeBlock,
                               make_expert_params_mapping)
from kvflow.layers.quantization import get_quant_config
from kvflow.models.llama import LlamaForCausalLM


def check_moe_supported(cfg: ModelConfig) -> None:
    """Quantized experts have no loader yet; fail at startup instead of at the first tensor."""
    if get_quant_config(cfg.hf_config) is not None:
        raise ValueError(f"model: quantized MoE checkpoints are not supported ({cfg.architecture})")


def num_experts(hf: dict) -> int:
    # Mixtral spells it num_local_experts; Qwen3-MoE checkpoints num_experts (transformers v5
    # writes num_local_experts for both).
    n = hf.get("num_local_experts") or hf.get("num_experts")
    if not n:
        raise ValueError("model: MoE config has no num_local_experts / num_experts")
    return int(n)


class MixtralForCausalLM(GraphSafeWhenFusedMoE, LlamaForCausalLM):
    # CUDA graphs: supported when the MoE dispatch is the sync-free Triton kernel (mixin).
    def __init__(self, cfg: ModelConfig):
        check_moe_supported(cfg)
        if cfg.hf_config.get("sliding_window") is not None:
            raise ValueError("model: Mixtral sliding_window attention is not supported")
        super().__init__(cfg)
        self.expert_params_mapping = make_expert_params_mapping(
            num_experts(cfg.hf_config), MIXTRAL_EXPERT_NAMES)

    @staticmethod
    def layer_options(cfg: ModelConfig) -> dict:
        hf = cfg.hf_config
        e, k = num_experts(hf), int(hf.get("num_experts_per_tok", 2))

        def make_mlp(_layer: int) -> SparseMoeBlock:
            # Mixtral's intermediate_size is each expert's; routing weights always renormalised.
            return SparseMoeBlock(cfg.hidden_size, cfg.intermediate_size, e, k, renormalize=True)

        return dict(qkv_bias=False, o_bias=False, qk_norm=False, mlp_bias=False,
                    make_mlp=make_mlp, mlp_name="block_sparse_moe")
