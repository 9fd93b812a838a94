"""Choose the attention backend from what each backend declares it supports."""
from __future__ import annotations

import logging
from typing import Optional

import torch

from kvflow.attention.backend import AttentionBackend, AttentionSpec, unsupported_reasons

logger = logging.getLogger("kvflow")


def _registry() -> dict[str, AttentionBackend]:
    backends: dict[str, AttentionBackend] = {}
    try:  # Triton is optional on CPU machines.
        from kvflow.attention.triton_backend import TritonAttentionBackend
        backends["triton"] = TritonAttentionBackend()
    except Exception as e:  # noqa: BLE001 - any import failure means "not available"
        logger.debug("triton attention backend unavailable: %s", e)
    from kvflow.attention.torch_backend import TorchAttentionBackend
    backends["torch"] = TorchAttentionBackend()
    return backends  # order = preference


def available_backends() -> list[str]:
    return list(_registry())


def select_backend(spec: AttentionSpec, device: torch.device,
                   requested: Optional[str] = None) -> AttentionBackend:
    cc = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    backends = _registry()
    if requested is not None:
        if requested not in backends:
            raise ValueError(f"attention_backend: {requested!r} is not available; "
                             f"available: {sorted(backends)}")
        reasons = unsupported_reasons(backends[requested], spec, device, cc)
        if reasons:
            raise ValueError(f"attention_backend: {requested!r} cannot serve this model: "
                             + "; ".join(reasons))
        return backends[requested]
    rejected = {}
    for name, backend in backends.items():
        reasons = unsupported_reasons(backend, spec, device, cc)
        if not reasons:
            if rejected:
                logger.info("attention backend %s (rejected: %s)", name,
                            "; ".join(f"{n}: {', '.join(r)}" for n, r in rejected.items()))
            else:
                logger.info("attention backend %s", name)
            return backend
        rejected[name] = reasons
    raise ValueError("no attention backend can serve this model: "
                     + "; ".join(f"{n}: {', '.join(r)}" for n, r in rejected.items()))
