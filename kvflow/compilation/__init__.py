"""torch.compile of the model forward with a compile cache that can never be stale.

    compile_model(model, engine_config, device) -> CompiledModel   (contract: compile.py)

cache_key.py computes the key over everything that can change compiled code, store.py keeps
validated, atomically published entries under $KVFLOW_CACHE_DIR/compile, and `kvflow cache
info|clear` (kvflow/cli_cache.py) inspects and empties it. Imports are lazy: `import
kvflow.compilation` does not import the compiler stack.
"""
from __future__ import annotations

__all__ = ["compile_model", "CompiledModel", "CompileInfo", "CompileStore", "compute_factors",
           "key_of"]


def __getattr__(name):
    if name in ("compile_model", "CompiledModel", "CompileInfo"):
        from kvflow.compilation import compile as _compile
        return getattr(_compile, name)
    if name == "CompileStore":
        from kvflow.compilation.store import CompileStore
        return CompileStore
    if name in ("compute_factors", "key_of"):
        from kvflow.compilation import cache_key
        return getattr(cache_key, name)
    raise AttributeError(name)
