"""Triton kernels and their plain-torch references.

The references (kvflow.kernels.reference) always import. The Triton kernels need the `triton`
package (on CPU they run only under TRITON_INTERPRET=1, which must be set before triton is
first imported); when it is missing HAS_TRITON is False and only the references are exported.
"""
import os
from kvflow.kernels.reference import (  # noqa: F401
    ref_cos_sin_cache,
    ref_fused_add_rms_norm,
    ref_paged_attention,
    ref_qk_norm_rope_cache,
    ref_reshape_and_cache,
    ref_rms_norm,
    ref_rotary_embedding,
    ref_silu_and_mul,
)

try:
    import triton  # noqa: F401
    HAS_TRITON = True
except ImportError:  # CPU-only install without triton
    HAS_TRITON = False



def _fix_triton_interpreter() -> None:
    """Work around three bugs of Triton 3.6's CPU interpreter (TRITON_INTERPRET=1 only; the
    compiled GPU path is untouched):
      * scalars are 1-element arrays of shape (1,), and NumPy >= 2.4 refuses int() on those, so
        `range(lo, hi)` with loaded bounds fails: make tensor.__index__ use .item();
      * tl.dot on bf16 multiplies the raw uint16 bit patterns: upcast bf16 operands to fp32
        first (exact, and what the tensor cores compute with fp32 accumulation);
      * fp32 -> bf16 casts truncate the mantissa: round to nearest even instead, as the GPU
        (and torch) do, so bf16 outputs can be compared bit for bit.
    Best effort: if the interpreter's internals differ, nothing is patched."""
    try:
        import numpy as np
        import triton.language as tl
        from triton.runtime import interpreter as interp
    except ImportError:
        return
    if getattr(interp, "_kvflow_patched", False):
        return
    try:
        orig_patch_tensor = interp._patch_lang_tensor
        orig_create_dot = interp.InterpreterBuilder.create_dot
        orig_cast = interp.InterpreterBuilder.cast_impl
        convert, handle_cls = interp._convert_float, interp.TensorHandle
    except AttributeError:
        return

    def patch_tensor(tensor, scope):
        orig_patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).item()))

    def to_f32(h):
        if h.dtype == tl.bfloat16:
            return handle_cls(convert(h.data, tl.bfloat16, tl.float32, None).view(np.float32),
                              tl.float32)
        return h

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return orig_create_dot(self, to_f32(a), to_f32(b), d, input_precision,
                               max_num_imprecise_acc)

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            bits = np.ascontiguousarray(src.data, dtype=np.float32).view(np.uint32)
            rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
            nan = ((bits >> 16) & 0x8000 | 0x7FC0).astype(np.uint16)     # quiet NaN, sign kept
            out = np.where(np.isnan(src.data), nan, rounded)
            return handle_cls(out.view(np.uint16), tl.bfloat16)
        return orig_cast(self, src, dst_type)

    interp._patch_lang_tensor = patch_tensor
    interp.InterpreterBuilder.cast_impl = cast_impl
    interp.InterpreterBuilder.create_dot = create_dot
    interp._kvflow_patched = True


if HAS_TRITON and os.environ.get("TRITON_INTERPRET", "0") == "1":
    _fix_triton_interpreter()

if HAS_TRITON:
    from kvflow.kernels.activation import silu_and_mul  # noqa: F401
    from kvflow.kernels.attention import (  # noqa: F401
        AttentionConfig,
        choose_config,
        unified_attention,
    )
    from kvflow.kernels.kv_cache import reshape_and_cache  # noqa: F401
    from kvflow.kernels.norm import fused_add_rms_norm, rms_norm  # noqa: F401
    from kvflow.kernels.qk_rope_cache import qk_norm_rope_cache  # noqa: F401
    from kvflow.kernels.rotary import compute_cos_sin_cache, rotary_embedding  # noqa: F401
