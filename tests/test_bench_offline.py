"""`kvflow bench throughput` (kvflow/bench/offline.py) end to end on CPU with a tiny random
model: the records it writes (init + workload, the switches that were set) and the clear error
for a model whose vocabulary cannot hold the reference's prompt token ids."""
import json

from kvflow.cli import main
from tests.conftest import make_hf_model, save_hf_model

TINY = dict(num_hidden_layers=1, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128)


def _bench(model, out, workload="decode1"):
    return main(["bench", "throughput", "--model", model, "--workload", workload,
                 "--max-model-len", "1024", "--out", str(out), "--load-format", "dummy"])


def test_decode1_records(tmp_path, monkeypatch):
    model = save_hf_model(make_hf_model("llama", vocab_size=10240, **TINY), tmp_path / "m")
    monkeypatch.setenv("KVFLOW_ATTN_PREFETCH", "1")
    monkeypatch.setenv("KVFLOW_COMMIT", "abc1234")
    assert _bench(model, tmp_path / "b.jsonl") == 0
    init, rec = [json.loads(line) for line in (tmp_path / "b.jsonl").read_text().splitlines()]
    assert init["record"] == "init" and init["commit"] == "abc1234"
    assert init["env"]["KVFLOW_ATTN_PREFETCH"] == "1" and "KVFLOW_COMMIT" not in init["env"]
    assert rec["workload"] == "decode1" and rec["output_tokens"] == 512
    assert rec["ms_per_output_token"] > 0 and rec["env"] == init["env"]
    # The scheduler limits in force (defaults here) and the run's preemptions are recorded.
    assert init["max_num_seqs"] == 256 and init["admission_control"] is True
    assert rec["num_preemptions"] == 0


def test_small_vocabulary_is_a_clear_error(tmp_path, capsys):
    model = save_hf_model(make_hf_model("llama", vocab_size=384, **TINY), tmp_path / "m")
    assert _bench(model, tmp_path / "b.jsonl") != 0
    assert "vocabulary has 384 tokens" in capsys.readouterr().err


def test_unknown_workload(tmp_path, capsys):
    model = save_hf_model(make_hf_model("llama", vocab_size=10240, **TINY), tmp_path / "m")
    assert _bench(model, tmp_path / "b.jsonl", workload="nope") != 0
    assert "unknown 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "b.jsonl").exists()


def test_peaks_take_the_largest_rank():
    from kvflow.bench.offline import _peaks
    gib = 2 ** 30
    assert _peaks([{}]) == {} and _peaks([]) == {}
    assert _peaks([dict(peak_reserved=3 * gib, peak_allocated=2 * gib)]) == dict(
        peak_gpu_memory_gib=3.0, peak_gpu_allocated_gib=2.0)
    two = _peaks([dict(peak_reserved=3 * gib, peak_allocated=2 * gib),
                  dict(peak_reserved=5 * gib, peak_allocated=gib)])
    assert two == dict(peak_gpu_memory_gib=5.0, peak_gpu_allocated_gib=2.0,
                       peak_gpu_memory_gib_per_rank=[3.0, 5.0])
