"""A kernel for tests/test_parallel_triton.py, in its own module so that compile workers can
import it by name (kernels inside a test module would drag pytest into the workers)."""
import triton
import triton.language as tl


@triton.jit
def scale_kernel(x_ptr, y_ptr, n, factor, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + i, tl.load(x_ptr + i, mask=i < n) * factor, mask=i < n)


def spec(block: int, name: str = "tests.parallel_triton_kernels.scale_kernel") -> str:
    """The specialization JSON Triton records for scale_kernel on fp32 pointers aligned to 16
    bytes, a runtime n and factor, BLOCK=block (what JITFunction.preload reads)."""
    import json
    return json.dumps({
        "name": name,
        "signature": {"x_ptr": "*fp32", "y_ptr": "*fp32", "n": "i32", "factor": "fp32",
                      "BLOCK": "constexpr"},
        "constant_keys": [[4]], "constant_vals": [block],
        "attrs_keys": [[0], [1]], "attrs_vals": [[["tt.divisibility", 16]],
                                                 [["tt.divisibility", 16]]],
        "options": {}, "key": f"test-{block}"})
