"""HF `architectures` name -> model class (imported lazily)."""
from __future__ import annotations

import importlib

_MODELS = {
    "LlamaForCausalLM": ("kvflow.models.llama", "LlamaForCausalLM"),
    "Qwen2ForCausalLM": ("kvflow.models.qwen2", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": ("kvflow.models.qwen3", "Qwen3ForCausalLM"),
    "MixtralForCausalLM": ("kvflow.models.mixtral", "MixtralForCausalLM"),
    "Qwen3MoeForCausalLM": ("kvflow.models.qwen3_moe", "Qwen3MoeForCausalLM"),
    "Llama4ForCausalLM": ("kvflow.models.llama4", "Llama4ForCausalLM"),
    # Multimodal checkpoints: the text model only (vision weights skipped at load).
    "Llama4ForConditionalGeneration": ("kvflow.models.llama4", "Llama4ForConditionalGeneration"),
}


def supported_architectures() -> list[str]:
    return sorted(_MODELS)


def get_model_class(architecture: str):
    if architecture not in _MODELS:
        raise ValueError(f"architecture {architecture!r} is not supported; supported: "
                         f"{', '.join(supported_architectures())}")
    module, name = _MODELS[architecture]
    return getattr(importlib.import_module(module), name)
