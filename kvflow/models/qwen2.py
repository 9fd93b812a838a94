"""Qwen2 / Qwen2.5: the Llama skeleton with q/k/v biases (always on) and no o_proj bias."""
from kvflow.model_config import ModelConfig
from kvflow.models.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    @staticmethod
    def layer_options(cfg: ModelConfig) -> dict:
        return dict(qkv_bias=True, o_bias=False, qk_norm=False, mlp_bias=False)
