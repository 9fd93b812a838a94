"""The decode-path kernels compile for sm_90 (Hopper) on a machine without a GPU: see
tests/compile_sm90.py. The interpreter runs the kernels' logic; this checks the compiler takes
them (an H200 run once failed on a plain global read inside a kernel the interpreter accepted)."""
import os

import pytest

from tests.conftest import run_compiler_script

triton = pytest.importorskip("triton")


def test_decode_kernels_compile_for_sm90():
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError:
        pytest.skip("this Triton has no ASTSource/GPUTarget compile API")
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        pytest.skip("Triton's bundled ptxas is missing")
    r = run_compiler_script("tests.compile_sm90", timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
