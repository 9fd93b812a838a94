"""benchmarks/trace_gaps.py on a synthetic trace: device gaps and the host call covering them."""
from __future__ import annotations

import importlib.util
import os

_PATH = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "trace_gaps.py")
_spec = importlib.util.spec_from_file_location("trace_gaps", _PATH)
trace_gaps = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(trace_gaps)


def _x(cat, name, ts, dur):
    return dict(ph="X", cat=cat, name=name, ts=ts, dur=dur)


def test_gaps_and_their_host_call():
    events = [
        _x("kernel", "gemm", 0, 100),
        _x("kernel", "norm", 90, 20),               # overlaps: no gap, end moves to 110
        _x("cuda_runtime", "cudaStreamSynchronize", 105, 290),
        _x("cpu_op", "aten::item", 100, 300),
        _x("kernel", "attention", 400, 50),         # 290 us after 110
        _x("kernel", "act", 460, 10),               # 10 us: under the threshold
        _x("cpu_op", "aten::empty", 465, 300),
        _x("gpu_memcpy", "Memcpy HtoD", 900, 5),    # 430 us after 470, only an op covers it
        _x("kernel", "down", 1000, 10),             # 95 us: under the threshold
    ]
    gaps = trace_gaps.find_gaps(events, min_us=100)
    assert [(g["us"], g["before"], g["host"]) for g in gaps] == [
        (290, "attention", "cudaStreamSynchronize"), (430, "Memcpy HtoD", "aten::empty")]
    assert gaps[0]["ops"] == ["aten::item"]
