"""Weight quantization: parse a checkpoint's `quantization_config` into a QuantConfig.

A QuantConfig hands each quantizable linear layer a *linear method* that creates the layer's
parameters (with weight_loaders that honour tensor-parallel sharding) and computes
`apply(layer, x, bias)`. Layers built without a QuantConfig keep their dense `weight`.
Embeddings and the LM head are never quantized here (GPTQ checkpoints keep them dense).
"""
from __future__ import annotations

from typing import Optional

from kvflow.layers.quantization.gptq import GPTQConfig, GPTQLinearMethod  # noqa: F401

# quant_method (lower-case, as written in config.json) -> config class
_METHODS = {"gptq": GPTQConfig}

SUPPORTED_METHODS = tuple(sorted(_METHODS))

QuantConfig = GPTQConfig   # the only method so far; a base class comes with the second one


def get_quant_config(hf_config: dict) -> Optional[QuantConfig]:
    """config.json dict -> QuantConfig, or None for a dense checkpoint.

    Raises ValueError for an unknown method or unsupported parameters, naming what is
    supported (at startup, before any weight is read)."""
    qc = hf_config.get("quantization_config")
    if not qc:
        return None
    if not isinstance(qc, dict):
        raise ValueError(f"quantization_config must be an object, got {type(qc).__name__}")
    method = str(qc.get("quant_method", "")).lower()
    if method not in _METHODS:
        raise ValueError(f"quantization_config: unsupported quant_method {method!r}; "
                         f"supported: {', '.join(SUPPORTED_METHODS)}")
    return _METHODS[method].from_config(qc)
