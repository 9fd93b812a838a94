"""Per-step counts and strides do not multiply a kernel's compiled variants: see
tests/specializations.py (run in a subprocess, as Triton's binder needs TRITON_INTERPRET unset,
which this suite sets)."""
import pytest

from tests.conftest import run_compiler_script

triton = pytest.importorskip("triton")


def test_step_counts_do_not_specialize():
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.runtime.jit import create_function_from_signature  # noqa: F401
    except ImportError:
        pytest.skip("this Triton has no GPUTarget / argument binder API")
    r = run_compiler_script("tests.specializations", timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "11 kernels checked" in r.stdout, r.stdout
