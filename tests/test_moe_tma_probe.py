"""benchmarks/moe_tma_probe.py's TMA gate/up variant against the fused-MoE kernel on tiny
shapes (Triton's interpreter on CPU, compiled on a GPU): the probe's timings compare like with
like only if its valid rows equal the engine kernel's."""
from __future__ import annotations

import importlib.util
import os

from tests.conftest import kernel_device

_PATH = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "moe_tma_probe.py")
_spec = importlib.util.spec_from_file_location("moe_tma_probe", _PATH)
moe_tma_probe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(moe_tma_probe)

kernel_device(moe_tma_probe._gate_up_tma_kernel)     # skips where no Triton mode can run


def test_tma_variant_matches_fused_moe_kernel():
    assert moe_tma_probe.check() == 0
