"""benchmarks/exposed_time.py: exposed time per kernel from an overlapping (PDL) GPU timeline."""
import gzip
import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location(
    "exposed_time", os.path.join(ROOT, "benchmarks", "exposed_time.py"))
et = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(et)


def _ev(name, ts, dur, cat="kernel"):
    return dict(ph="X", cat=cat, name=name, ts=ts, dur=dur)


def _step(t):
    """One synthetic step from t: marker, a GEMM launched early (waits on the marker), a norm
    that overlaps the GEMM's tail, a copy after a host gap."""
    return [_ev("_decode_inputs_kernel", t, 2),
            _ev("gemm", t + 1, 11),          # starts inside the marker: exposed 12 - 2 = 10
            _ev("norm", t + 10, 4),          # ends at 14, the GEMM at 12: exposed 2
            _ev("Memcpy DtoH", t + 20, 1, cat="gpu_memcpy")]   # 6 us idle before it


def test_exposed_time_splits_overlap_and_idle(tmp_path):
    events = [_ev("cpu_op", 0, 5, cat="cpu_op")] + _step(0) + _step(30) + _step(60) + _step(90)
    path = tmp_path / "t.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    res = et.exposed_per_step(et.load_events(str(path)))
    assert res["steps"] == 2            # 30-60 and 60-90: the first and the last are dropped
    k = res["kernels"]
    assert k["gemm <- _decode_inputs_kernel"] == dict(launches=1, exposed_us=10.0,
                                                       idle_before_us=0.0)
    assert k["norm <- gemm"]["exposed_us"] == 2.0
    assert k["Memcpy DtoH <- norm"] == dict(launches=1, exposed_us=1.0, idle_before_us=6.0)
    # the marker of steps 2 and 3 starts 9 us after the previous copy ended
    assert k["_decode_inputs_kernel <- Memcpy DtoH"]["idle_before_us"] == 9.0
    assert res["idle_us"] == 15.0       # 9 before the marker, 6 before the copy
    assert res["step_us"] == 30.0 and sum(v["exposed_us"] for v in k.values()) + 15 == 30


def test_needs_three_markers():
    with pytest.raises(ValueError, match="no whole step"):
        et.exposed_per_step(_step(0) + _step(30))
