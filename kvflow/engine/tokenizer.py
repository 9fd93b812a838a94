"""Tokenizer loading: from the model directory, never from a hub."""
from __future__ import annotations

import os


def load_tokenizer(path: str):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"tokenizer: cannot load a tokenizer from {path!r} ({e}); pass "
                         "skip_tokenizer_init=True to serve token-id prompts only") from e
