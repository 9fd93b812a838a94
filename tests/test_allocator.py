"""The CUDA allocator setting the worker applies before its first allocation
(kvflow/worker/worker.py's use_expandable_segments): expandable segments unless the user
configured the allocator. The effect on the reserve is measured on the device
(tests/test_gpu.py::test_peak_memory_within_utilization, benchmarks/results)."""
import torch

from kvflow.worker import worker as worker_mod


def _spy(monkeypatch):
    calls = []
    monkeypatch.setattr(torch._C, "_accelerator_setAllocatorSettings", calls.append,
                        raising=False)
    return calls


def test_expandable_segments_by_default(monkeypatch):
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    calls = _spy(monkeypatch)
    assert worker_mod.use_expandable_segments() is True
    assert calls == ["expandable_segments:True"]


def test_user_allocator_config_wins(monkeypatch):
    calls = _spy(monkeypatch)
    for conf, on in (("expandable_segments:False", False),
                     ("max_split_size_mb:128", False),
                     ("max_split_size_mb:128, expandable_segments:True", True)):
        monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", conf)
        assert worker_mod.use_expandable_segments() is on
    assert calls == []        # never overridden
