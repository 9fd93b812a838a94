"""Qwen3: the Llama skeleton with per-head RMSNorm on q and k before rotary."""
from kvflow.model_config import ModelConfig
from kvflow.models.llama import LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    @staticmethod
    def layer_options(cfg: ModelConfig) -> dict:
        bias = bool(cfg.hf_config.get("attention_bias", False))
        return dict(qkv_bias=bias, o_bias=bias, qk_norm=True, mlp_bias=False)
