"""Per-GPU tables of measured choices for a product of shape (N, K) at M rows.

Some products run faster in another form than cuBLAS's own at certain row counts (its
heuristic picks a poor kernel there); the tuners under benchmarks/ time each form on the
device and record only the measured wins, so anything not in a table keeps the plain product.
One file per kind and GPU model, `kvflow/kernels/configs/<kind>_<device>.json`:

    {"device": "NVIDIA H200", "by_shape": {"N,K": {"M": value}}}

Users: layers/split_k_norm.py (kind "split_k_norm": K-slices), layers/row_pad.py ("row_pad":
the row count to run the product at). kernels/cublaslt.py keeps its table beside these
(`table_path("cublaslt", ...)`) with string values (algorithm structs) and row ranges.
"""
from __future__ import annotations

import functools
import json
import os
from typing import Optional

import torch

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "kernels", "configs")
# The input dtypes a table's choices apply to (tuned in bf16; fp16 runs the same kernels).
DTYPES = (torch.float16, torch.bfloat16)


def table_path(kind: str, device_name: str) -> str:
    safe = "".join(c if c.isalnum() or c in "-." else "_" for c in device_name)
    return os.path.join(CONFIG_DIR, f"{kind}_{safe}.json")


@functools.lru_cache(maxsize=None)
def load_table(kind: str, device_name: str) -> dict[tuple[int, int, int], int]:
    """{(n, k, m): value} of a kind for a GPU model; missing file: empty."""
    path = table_path(kind, device_name)
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        data = json.load(f)
    return {(*(int(v) for v in nk.split(",")), int(m)): int(v)
            for nk, per_m in data["by_shape"].items() for m, v in per_m.items()}


def lookup(kind: str, device: torch.device, n: int, k: int, m: int) -> Optional[int]:
    """The table's value for an (M, N, K) product on a CUDA device, else None."""
    if device.type != "cuda":
        return None
    from kvflow.kernels.device import device_properties
    return load_table(kind, device_properties(device).name).get((n, k, m))


def merge_table(path: str, device_name: str, by_shape: dict, header: Optional[dict] = None) -> dict:
    """Write `by_shape` into the table at path (its other shapes kept, unless its `header`
    fields differ: e.g. a cuBLASLt table's version); returns the table."""
    table = {"device": device_name, **(header or {}), "by_shape": {}}
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        if all(old.get(k) == v for k, v in (header or {}).items()):
            table = old
    table["by_shape"].update(by_shape)
    with open(path, "w") as f:
        json.dump(table, f, indent=1, sort_keys=True)
        f.write("\n")
    return table
