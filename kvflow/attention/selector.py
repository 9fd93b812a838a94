"""Choose the attention backend from what each backend declares it supports.

Every field of BackendCapabilities is checked here (see backend.unsupported_reasons), against
every distinct layer spec of the model (a Llama 4 model has global and local layers), before any
impl is constructed: an explicit `attention_backend` that cannot serve the model fails at
startup with all the reasons; automatic selection takes the first backend in preference order
that serves everything and logs why the ones before it were rejected. CUDA graph support is
the one capability that does not reject a backend: the worker captures graphs only when the
chosen backend declares it (Worker.use_cuda_graphs), and runs eagerly otherwise.
"""
from __future__ import annotations

import logging
from typing import Optional, Sequence, Union

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


def device_compute_capability(device: torch.device) -> Optional[tuple[int, int]]:
    """(major, minor) of a CUDA device, None elsewhere. Tests monkeypatch this (or
    torch.cuda.get_device_capability) to simulate older GPUs."""
    if device.type != "cuda":
        return None
    return tuple(torch.cuda.get_device_capability(device))


def all_reasons(backend: AttentionBackend, specs: Sequence[AttentionSpec], device: torch.device,
                cc: Optional[tuple[int, int]]) -> list[str]:
    """Union (in order, deduplicated) of the reasons `backend` cannot serve any of `specs`."""
    out: list[str] = []
    for spec in specs:
        for r in unsupported_reasons(backend, spec, device, cc):
            if r not in out:
                out.append(r)
    return out


def select_backend(spec: Union[AttentionSpec, Sequence[AttentionSpec]], device: torch.device,
                   requested: Optional[str] = None) -> AttentionBackend:
    """spec: one layer spec, or every distinct spec of the model (all must be served)."""
    specs = [spec] if isinstance(spec, AttentionSpec) else list(spec)
    cc = device_compute_capability(device)
    backends = _registry()
    if requested is not None:
        if requested not in backends:
            raise ValueError(f"attention_backend: {requested!r} is not available; "
                             f"available: {sorted(backends)}")
        reasons = all_reasons(backends[requested], specs, device, cc)
        if reasons:
            raise ValueError(f"attention_backend: {requested!r} cannot serve this model: "
                             + "; ".join(reasons))
        return backends[requested]
    rejected = {}
    for name, backend in backends.items():
        reasons = all_reasons(backend, specs, device, cc)
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
