"""benchmarks/overlap_probe.py in its CPU smoke mode: the overlapped two-nano-batch schedule
computes the same hidden states as the serial one (streams, events and graphs are no-ops on
CPU, so this checks the per-nano-batch bookkeeping, not the concurrency)."""
from __future__ import annotations

import importlib.util
import os

_PATH = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "overlap_probe.py")
_spec = importlib.util.spec_from_file_location("overlap_probe", _PATH)
overlap_probe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(overlap_probe)


def test_overlap_matches_serial_on_cpu():
    recs = {r["variant"]: r for r in overlap_probe.smoke()}
    assert {"serial", "serial_halves", "overlap", "attn_only", "gemm_only", "bounds"} <= set(recs)
    for name in ("serial_halves", "overlap"):
        assert recs[name]["max_rel_diff"] < 1e-2, recs[name]
    assert recs["serial"]["batch"] == overlap_probe.SMOKE["batch"]
