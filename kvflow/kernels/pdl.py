"""Programmatic dependent launch (PDL): overlap each kernel's launch with its predecessor's tail.

A decode step of a small model is ~400 short kernels in one CUDA graph. Without PDL every kernel
starts only after the previous one has fully drained: ~0.45 us of idle GPU between kernels
(measured on the H200 in the graph, benchmarks/profile_decode.py) plus each kernel's own ramp-up
(CTA launch, first DRAM round trip). With PDL (sm90+) a kernel launched with the
programmatic-serialization attribute may start while its predecessor is still running; it must
execute `griddepcontrol.wait` before it touches memory the predecessor writes or reads, and that
wait returns once the predecessor has completed and its writes are visible. Work that depends on
nothing earlier (loading static weights) may be done before the wait, hiding DRAM latency.

The convention every kvflow Triton kernel on the decode path follows:

    @triton.jit
    def _k(..., USE_PDL: tl.constexpr):
        ... only loads of data the previous kernel cannot be writing (see below) ...
        pdl_wait(USE_PDL)                 # every program, unconditionally, before any other
                                          # global load or store, and before any early return
        pdl_launch_dependents(USE_PDL)    # lets the next kernel start launching
        ...

    _k[grid](..., **pdl_launch(device))   # USE_PDL=... plus launch_pdl=...

What may be read before the wait: read-only inputs (weights, tables built at startup), and
data written two or more kernels back. A kernel starts early only once its predecessor has
passed its own wait, which returned after *its* predecessor completed with its writes visible;
so everything but the immediately previous kernel's writes is settled. Decode attention uses
this: the step's lengths and block table and the KV of earlier steps are read before the wait,
the query and the new tokens' K/V (written by the kernel just before) after it. Kernels other
than the previous one must not write what a kernel reads early: true of a forward's data flow,
where each tensor is written once per step.

Why "every program, before any early return": a program that exits without waiting lets its
kernel complete before the predecessor has, and the successor's wait (on this kernel) would then
pass too early. Correctness is transitive only if every kernel waits.

Kernels that are not launched with PDL (cuBLAS, torch) are serialized as usual; a PDL kernel
after them starts when their blocks exit. Off under the interpreter, on CPU, below sm90, and when
KVFLOW_PDL=0.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kvflow import envs
from kvflow.kernels.device import device_properties

try:  # Triton >= 3.3; the interpreter never executes these (USE_PDL is False there).
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
    _HAS_GDC = True
except ImportError:  # pragma: no cover - older Triton
    _HAS_GDC = False


@triton.jit
def pdl_wait(USE_PDL: tl.constexpr):
    """Block until the preceding kernel has completed and its memory is visible."""
    if USE_PDL:
        gdc_wait()


@triton.jit
def pdl_launch_dependents(USE_PDL: tl.constexpr):
    """Allow the next kernel in the stream to start launching (a hint; no memory effect)."""
    if USE_PDL:
        gdc_launch_dependents()


def pdl_enabled(device: torch.device) -> bool:
    """Whether kernels launched on `device` use PDL (env KVFLOW_PDL=0 turns it off)."""
    if not _HAS_GDC or device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    if not envs.pdl():
        return False
    props = device_properties(device)
    return (props.major, props.minor) >= (9, 0)


def pdl_launch(device: torch.device) -> dict:
    """Launch keyword arguments of a PDL-convention kernel: USE_PDL (the constexpr) and
    launch_pdl (the launch attribute), both on or both off."""
    on = pdl_enabled(device)
    return {"USE_PDL": on, "launch_pdl": on}
