"""ModelConfig: a checkpoint's config.json normalised once, and where the model comes from.

Transformers v4 and v5 spell several fields differently (`rope_theta` / `rope_parameters`,
`torch_dtype` / `dtype`), multimodal checkpoints nest the language model under `text_config`,
and a .gguf file is converted to an HF-style directory first. Everything downstream (models,
loader, memory plan, compile-cache key) reads the normalised `ModelConfig`, never config.json.
Errors are ValueErrors naming the field, like every engine option's (kvflow/config.py).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from kvflow import envs

_STR_TO_DTYPE = {
    "float32": torch.float32, "float": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "half": torch.float16, "fp16": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


def config_error(field_name: str, message: str) -> ValueError:
    """The one error shape for a bad option: the field first, then what is allowed."""
    return ValueError(f"{field_name}: {message}")


@dataclass(frozen=True)
class ModelConfig:
    """config.json normalised across transformers v4 and v5 spellings."""
    model: str                       # directory with config.json (+ weights, tokenizer)
    architecture: str
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: Optional[dict]     # always has "rope_type" when set
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool             # q/k/v projection biases (Qwen2)
    dtype: torch.dtype               # compute and weight dtype
    max_model_len: int
    eos_token_ids: tuple[int, ...]
    bos_token_id: Optional[int]
    hf_config: dict = field(repr=False, compare=False, hash=False)
    tokenizer: Optional[str] = None  # directory; None = no tokenizer (token-id prompts only)
    load_format: str = "auto"
    seed: int = 0
    # Where the model came from (a .gguf file) when it was converted; for messages only.
    source: Optional[str] = None

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def layer_product_params(self) -> int:
        """Weights of the layers' dense products (q/k/v/o and a gated MLP), all layers."""
        h = self.hidden_size
        per_layer = (h * (self.q_size + 2 * self.kv_size) + self.q_size * h
                     + 3 * h * self.intermediate_size)
        return per_layer * self.num_hidden_layers


def read_hf_config(model_dir: str) -> dict:
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise config_error("model", f"no config.json in {model_dir!r}")
    with open(path) as f:
        cfg = json.load(f)
    # Multimodal checkpoints nest the language model's config (Llama 4, Qwen-VL): flatten it.
    if "text_config" in cfg and "hidden_size" not in cfg:
        text = dict(cfg["text_config"])
        # transformers writes these keys as null inside text_config: fill those too.
        for key, value in (("architectures", cfg.get("architectures")),
                           ("torch_dtype", cfg.get("torch_dtype", cfg.get("dtype")))):
            if text.get(key) is None:
                text[key] = value
        cfg = text
    return cfg


def normalize_rope(cfg: dict) -> tuple[float, Optional[dict]]:
    """(rope_theta, rope_scaling) from v4 (`rope_theta`, `rope_scaling`) or v5
    (`rope_parameters`) spellings. rope_scaling keeps every key and always names `rope_type`."""
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and "full_attention" in params:  # per-layer-type form
        params = params["full_attention"]
    if isinstance(params, dict):
        theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta = float(cfg.get("rope_theta", 10000.0))
        scaling = dict(cfg.get("rope_scaling") or {})
    if scaling:
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        scaling.pop("type", None)
        scaling["rope_type"] = rope_type
        if rope_type == "default":
            scaling = None
    return theta, (scaling or None)


def _resolve_dtype(dtype: Any, cfg_dtype: Optional[str], device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type == "cpu":
            # CPU matmuls in bf16/fp16 are slow and lossy; fp32 is both faster and exact-er.
            return torch.float32
        d = _STR_TO_DTYPE.get(str(cfg_dtype or "bfloat16").replace("torch.", ""), torch.bfloat16)
        return torch.bfloat16 if d == torch.float32 else d
    if dtype not in _STR_TO_DTYPE:
        raise config_error("dtype",
                           f"must be 'auto' or one of {sorted(_STR_TO_DTYPE)}, got {dtype!r}")
    return _STR_TO_DTYPE[dtype]


def _checkpoint_dtype(cfg: dict) -> Optional[str]:
    """The dtype "auto" follows on GPU. Quantized checkpoints are validated here (a bad
    quantization_config fails at startup) and run in float16: GPTQ scales are fp16."""
    if cfg.get("quantization_config"):
        from kvflow.layers.quantization import get_quant_config
        try:
            get_quant_config(cfg)
        except ValueError as e:
            raise config_error("quantization_config",
                               str(e).removeprefix("quantization_config: ")) from None
        return "float16"
    return cfg.get("torch_dtype", cfg.get("dtype"))


def _eos_ids(cfg: dict, model_dir: str) -> tuple[int, ...]:
    ids: list[int] = []
    for src in (cfg, _read_json(os.path.join(model_dir, "generation_config.json"))):
        eos = src.get("eos_token_id")
        if isinstance(eos, int):
            ids.append(eos)
        elif isinstance(eos, list):
            ids.extend(int(e) for e in eos)
    return tuple(dict.fromkeys(ids))


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def build_model_config(model: str, *, dtype: Any, device: torch.device,
                       max_model_len: Optional[int], tokenizer: Optional[str],
                       skip_tokenizer_init: bool, load_format: str, seed: int,
                       source: Optional[str] = None) -> ModelConfig:
    cfg = read_hf_config(model)
    archs = cfg.get("architectures") or []
    if not archs:
        raise config_error("model", f"config.json of {model!r} has no 'architectures'")
    hidden = int(cfg["hidden_size"])
    heads = int(cfg["num_attention_heads"])
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    if heads % kv_heads:
        raise config_error("num_key_value_heads",
                           f"{kv_heads} must divide num_attention_heads={heads}")
    theta, scaling = normalize_rope(cfg)
    max_pos = int(cfg.get("max_position_embeddings") or 2048)
    if max_model_len is None:
        max_len = max_pos
    else:
        if not isinstance(max_model_len, int) or max_model_len < 1:
            raise config_error("max_model_len",
                               f"must be a positive integer, got {max_model_len!r}")
        if max_model_len > max_pos and not envs.allow_long_max_model_len():
            raise config_error("max_model_len",
                               f"{max_model_len} exceeds the model's max_position_embeddings="
                               f"{max_pos} (set KVFLOW_ALLOW_LONG_MAX_MODEL_LEN=1 to override)")
        max_len = max_model_len
    tok_dir = None if skip_tokenizer_init else (tokenizer or model)
    return ModelConfig(
        model=model, architecture=archs[0], model_type=str(cfg.get("model_type", "")),
        hidden_size=hidden, intermediate_size=int(cfg.get("intermediate_size") or 4 * hidden),
        num_hidden_layers=int(cfg["num_hidden_layers"]), num_attention_heads=heads,
        num_key_value_heads=kv_heads, head_dim=head_dim, vocab_size=int(cfg["vocab_size"]),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), rope_theta=theta, rope_scaling=scaling,
        max_position_embeddings=max_pos,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=bool(cfg.get("attention_bias", cfg.get("model_type") == "qwen2")),
        dtype=_resolve_dtype(dtype, _checkpoint_dtype(cfg), device),
        max_model_len=max_len, eos_token_ids=_eos_ids(cfg, model),
        bos_token_id=cfg.get("bos_token_id"), hf_config=cfg, tokenizer=tok_dir,
        load_format=load_format, seed=seed, source=source)


def resolve_model_path(model: Optional[str]) -> tuple[str, Optional[str]]:
    """(HF-style directory, original source when converted). None = the embedded default model."""
    from kvflow.models import gguf  # local import: keeps `import kvflow` light

    source = None
    if model is None:
        model = gguf.default_model_path()
    model = os.path.expanduser(model)
    if gguf.is_gguf(model):
        source = model
        model = gguf.convert_gguf(model)
    elif not os.path.isdir(model):
        raise config_error("model", f"{model!r} is not a model directory or .gguf file "
                                    "(no model can be downloaded here; pass a local path)")
    return model, source


def model_num_experts(hf: dict) -> int:
    """Routed experts per MoE layer (0 for a dense model). Mixtral spells it num_local_experts,
    Qwen3-MoE num_experts."""
    return int(hf.get("num_local_experts") or hf.get("num_experts") or 0)
