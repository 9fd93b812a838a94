"""Arguments that change with the step's shape must not change which Triton variant a kernel
compiles. Triton specializes an integer argument on == 1 and on divisibility by 16, and a
pointer on 16-byte alignment; each combination is a separate compile (about 0.1-3 s on a cold
machine, inside a request when the warm-up did not hit it). Counts that only bound loops and
masks, and strides that follow a per-step count, are marked do_not_specialize; this checks it
with Triton's own argument binder for sm_90, no GPU needed (session 23's census of a cold start:
benchmarks/compile_census.py). Run as a script (TRITON_INTERPRET must be unset):

    python3 -m tests.specializations     # exit 1 and the offending arguments if any
"""
from __future__ import annotations

import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

_COUNT_VALUES = (1, 16, 17, 48, 1000)


def cases():
    """(kernel, integer arguments that vary per step, pointer arguments that may be slices)."""
    from kvflow.kernels import attention, attention_merge, decode_inputs, decode_order, fused_moe
    from kvflow.kernels import moe_routing, qk_rope_cache, sampling
    return [
        (attention._attention_kernel,
         ["num_reqs", "num_splits", "min_q_len", "stride_bt", "stride_mt", "stride_mh"],
         ["q_ptr", "out_ptr", "m_ptr", "l_ptr", "qsl_ptr", "seq_lens_ptr", "bt_ptr"]),
        (attention_merge._merge_splits_kernel,
         ["num_reqs", "num_splits", "stride_mt", "stride_mh"], ["out_ptr", "m_ptr", "qsl_ptr"]),
        (decode_inputs._decode_inputs_kernel, ["bs"], []),
        (decode_order._longest_first_kernel, ["n"], []),
        (qk_rope_cache._qk_norm_rope_cache_kernel, ["n_slots"], []),
        (moe_routing._topk_kernel, ["num_tokens"], []),
        (moe_routing._router_topk_kernel, ["num_tokens"], []),
        (moe_routing._align_kernel, ["num_pairs"], []),
        (fused_moe._gate_up_kernel, ["num_pairs", "num_pid_m"], []),
        (fused_moe._down_kernel, ["num_pairs", "num_pid_m"], []),
        (sampling._sample_pick_kernel, ["seed"], []),
    ]


def _binder(kernel):
    backend = make_backend(GPUTarget("cuda", 90, 32))
    return create_function_from_signature(kernel.signature, kernel.params, backend)


def _args(kernel, buf: torch.Tensor) -> dict:
    """A value for every parameter: constexprs 1 (their values are not under test), pointers
    an aligned buffer, integers 32, the known float scalars 1.0 (names ending in _ptr are
    pointers; kvflow's kernels name them so). A float argument missing from that list gets 32
    and binds as an integer: harmless, since only the arguments a case lists are varied and
    every other one keeps its value in both bindings being compared."""
    out = {}
    for p in kernel.params:
        if p.is_constexpr:
            out[p.name] = None if p.name.endswith("_ptr") else 1
        elif p.name.endswith("_ptr"):
            out[p.name] = buf
        elif p.name in ("qk_scale", "eps", "scale"):
            out[p.name] = 1.0
        else:
            out[p.name] = 32
    return out


def check(kernel, counts: list[str], slices: list[str]) -> list[str]:
    binder = _binder(kernel)
    buf = torch.zeros(4096, dtype=torch.float32)
    base = _args(kernel, buf)
    names = [p.name for p in kernel.params]

    def spec(**override):
        kw = {**base, **override}
        _, specialization, _ = binder(*[kw[n] for n in names])
        return specialization

    ref = spec()
    errors = []
    for name in counts:
        assert name in base, f"{kernel.fn.__name__} has no argument {name}"
        for v in _COUNT_VALUES:
            if spec(**{name: v}) != ref:
                errors.append(f"{kernel.fn.__name__}: {name}={v} compiles another variant")
                break
    for name in slices:
        assert name in base, f"{kernel.fn.__name__} has no argument {name}"
        if spec(**{name: buf[1:]}) != ref:
            errors.append(f"{kernel.fn.__name__}: {name} offset by 4 bytes compiles another variant")
    return errors


def main() -> int:
    errors = []
    n = 0
    for kernel, counts, slices in cases():
        errors += check(kernel, counts, slices)
        n += 1
    print(f"{n} kernels checked")
    for e in errors:
        print(e)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
