"""Products through a measured cuBLASLt algorithm (kvflow/kernels/cublaslt.py): the table's
format and row ranges, the conditions that keep torch's product, the committed tables, and on
the GPU the product itself (eager and captured in a CUDA graph) against torch's."""
from __future__ import annotations

import glob
import json

import pytest
import torch
import torch.nn.functional as F

from kvflow.kernels import cublaslt
from kvflow.layers import shape_tables
from kvflow.layers.linear import dense_linear
from tests.conftest import make_hf_model, save_hf_model


def _algo(tag: int) -> cublaslt._Algo:
    a = cublaslt._Algo()
    for i in range(8):
        a.data[i] = tag * 1000 + i
    return a


def test_encode_decode_round_trip():
    value = cublaslt.encode(_algo(7), 4)
    algo, ws = cublaslt.decode(value)
    assert bytes(algo) == bytes(_algo(7)) and ws == 4
    assert len(value.partition(":")[0]) == 128


def test_table_ranges():
    """An entry covers the row counts down to the next smaller entry; "" is torch's own; the
    smallest entry covers only itself; nothing past the largest."""
    a, b = cublaslt.encode(_algo(1), 0), cublaslt.encode(_algo(2), 4)
    data = {"cublaslt_version": 5, "by_shape": {"64,32": {"1024": a, "512": "", "2048": b}}}
    table = cublaslt.parse_table(data, 5)
    entry = lambda m: cublaslt.table_entry(table, 64, 32, m)  # noqa: E731
    assert [entry(m) for m in (100, 511, 512, 513, 1024, 1025, 2048, 2049)] == \
        [None, None, None, a, a, b, b, None]
    assert cublaslt.table_entry(table, 64, 16, 1024) is None           # another shape
    table2 = cublaslt.parse_table({"cublaslt_version": 5, "by_shape": {"64,32": {"256": a}}}, 5)
    assert [cublaslt.table_entry(table2, 64, 32, m) for m in (255, 256, 257)] == [None, a, None]
    assert cublaslt.table_workspace(table) == 4


def test_table_of_another_version_is_ignored():
    """Algorithm structs are private to the cuBLASLt build that made them."""
    data = {"cublaslt_version": 5, "by_shape": {"64,32": {"1024": cublaslt.encode(_algo(1), 0)}}}
    assert cublaslt.parse_table(data, 6) == {}
    assert cublaslt.parse_table(data, None) == {}


def test_merge_keeps_shapes_of_the_same_version_only(tmp_path):
    """The tuner's merge (shape_tables.merge_table with a header) keeps the file's other shapes
    when its cuBLASLt version matches, and starts over when it does not."""
    path = str(tmp_path / "t.json")
    a = cublaslt.encode(_algo(1), 0)
    shape_tables.merge_table(path, "GPU", {"64,32": {"1024": a}}, header={"cublaslt_version": 5})
    got = shape_tables.merge_table(path, "GPU", {"8,16": {"512": ""}},
                                   header={"cublaslt_version": 5})
    assert set(got["by_shape"]) == {"64,32", "8,16"} and got["cublaslt_version"] == 5
    got = shape_tables.merge_table(path, "GPU", {"8,16": {"512": a}},
                                   header={"cublaslt_version": 6})
    assert got["by_shape"] == {"8,16": {"512": a}} and got["cublaslt_version"] == 6
    with open(path) as f:
        assert json.load(f) == got
    assert cublaslt.parse_table(got, 6) == {(8, 16): [(512, a)]}


def test_conditions(monkeypatch):
    """CPU tensors, fp32, a biased product and KVFLOW_CUBLASLT=0 keep torch's product."""
    calls = []
    monkeypatch.setattr(cublaslt, "_choice", lambda *a: calls.append(a) or None)
    monkeypatch.setattr(cublaslt, "_tuned_shapes", lambda name: {(8, 16)})
    w = torch.zeros(8, 16, dtype=torch.bfloat16)
    x = torch.ones(4, 16, dtype=torch.bfloat16)
    assert cublaslt.choose(x, w) is None                                  # CPU
    torch.testing.assert_close(dense_linear(x, w), F.linear(x, w), atol=0, rtol=0)
    assert calls == []
    if torch.cuda.is_available():
        xc, wc = x.cuda(), w.cuda()
        cublaslt.choose(xc, wc)
        assert len(calls) == 1
        assert cublaslt.choose(xc.float(), wc.float()) is None
        assert cublaslt.choose(xc[:, 1:9], wc[:, :8]) is None            # not contiguous
        bias = torch.ones(8, dtype=torch.bfloat16, device="cuda")
        torch.testing.assert_close(dense_linear(xc, wc, bias), F.linear(xc, wc, bias))
        assert len(calls) == 1                                            # biased: torch's
        monkeypatch.setenv("KVFLOW_CUBLASLT", "0")
        assert cublaslt.choose(xc, wc) is None
        assert len(calls) == 1


def test_committed_tables_are_valid():
    """Every committed table names its device and version; values are "" or an algorithm."""
    for path in glob.glob(shape_tables.table_path(cublaslt.KIND, "*").replace("_.json", "*.json")):
        with open(path) as f:
            data = json.load(f)
        assert shape_tables.table_path(cublaslt.KIND, data["device"]) == path
        assert isinstance(data["cublaslt_version"], int)
        for nk, per_m in data["by_shape"].items():
            n, k = (int(v) for v in nk.split(","))
            for m, value in per_m.items():
                assert int(m) > 0 and n > 0 and k > 0
                if value:
                    algo, ws = cublaslt.decode(value)
                    assert 0 <= ws <= cublaslt.MAX_WORKSPACE, (path, nk, m)


@pytest.fixture
def gpu_table(monkeypatch):
    """install(n, k, m, rank, more_shapes): a table holding the heuristic's rank-th algorithm for
    (n, k) at m rows (not its first, which is usually torch's own kernel) for the current
    device, its range bounded below by an entry at m // 2; the module's caches are cleared
    before and after, so other tests see the committed table."""
    if not torch.cuda.is_available() or cublaslt.library() is None:
        pytest.skip("needs CUDA and libcublasLt")

    def clear():
        cublaslt._choice.cache_clear()
        cublaslt._tuned_shapes.cache_clear()

    def install(n: int, k: int, m: int, rank: int = 1, more_shapes=()):
        by_shape = {}
        for n_, k_ in [(n, k), *more_shapes]:
            plan = cublaslt.Plan(torch.cuda.current_device(), m, n_, k_, torch.bfloat16)
            algos = plan.heuristics(8)
            h = algos[min(rank, len(algos) - 1)]
            by_shape[f"{n_},{k_}"] = {str(m // 2): "", str(m): cublaslt.encode(h.algo, h.workspace)}
        data = {"cublaslt_version": cublaslt.version(), "by_shape": by_shape}
        table = cublaslt.parse_table(data, cublaslt.version())
        monkeypatch.setattr(cublaslt, "load_table", lambda name: table)
        clear()
    yield install
    monkeypatch.undo()
    clear()


@pytest.mark.gpu
@pytest.mark.parametrize("n,k,m", [(6144, 4096, 1024), (4096, 14336, 700), (1536, 1024, 640)])
def test_gpu_product_matches_torch(gpu_table, n, k, m):
    """The table's algorithm, through dense_linear (the engine's product), equals torch's up
    to the order of fp32 additions; row counts inside the entry's range use it too."""
    gpu_table(n, k, m)
    torch.manual_seed(0)
    w = torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.02
    for rows in (m, m - 3):
        x = torch.randn(rows, k, dtype=torch.bfloat16, device="cuda")
        assert cublaslt.choose(x, w) is not None
        torch.testing.assert_close(dense_linear(x, w), F.linear(x, w), atol=2e-2, rtol=2e-2)
        out = torch.empty(rows, n, dtype=torch.bfloat16, device="cuda")
        assert dense_linear(x, w, out=out) is out
        torch.testing.assert_close(out, F.linear(x, w), atol=2e-2, rtol=2e-2)
    # Outside the ranges: torch's product.
    assert cublaslt.choose(torch.randn(m // 2, k, dtype=torch.bfloat16, device="cuda"), w) is None


@pytest.mark.gpu
def test_gpu_product_in_cuda_graph(gpu_table):
    """Captured in a CUDA graph (as the engine's decode and mixed graphs are), the product
    replays on new inputs like torch's."""
    n, k, m = 4096, 4096, 512
    gpu_table(n, k, m, rank=2)
    w = torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.02
    x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
    dense_linear(x, w)                       # eager first: the workspace exists before capture
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        with torch.cuda.graph(g):
            y = dense_linear(x, w)
    torch.cuda.current_stream().wait_stream(s)
    x.copy_(torch.randn_like(x))
    g.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(y, F.linear(x, w), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
def test_gpu_engine_with_table(gpu_table, tmp_path, monkeypatch):
    """A bf16 engine whose products of 513-1024 rows run a non-default algorithm (the eager
    prompt step here): the products go through it, and the tokens are the ones the engine
    generates with torch's products (greedy, up to bf16 near-ties)."""
    from kvflow import LLM, SamplingParams
    hf = make_hf_model("llama")
    path = save_hf_model(hf, tmp_path / "llama")
    c = hf.config
    hd = c.hidden_size // c.num_attention_heads
    shapes = {((c.num_attention_heads + 2 * c.num_key_value_heads) * hd, c.hidden_size),
              (c.hidden_size, c.num_attention_heads * hd), (2 * c.intermediate_size, c.hidden_size),
              (c.hidden_size, c.intermediate_size), (c.vocab_size, c.hidden_size)}
    first, *rest = sorted(shapes)
    gpu_table(*first, 1024, rank=1, more_shapes=rest)
    calls = []
    real = cublaslt.linear
    monkeypatch.setattr(cublaslt, "linear",
                        lambda *a, **k: calls.append(a[0].shape[0]) or real(*a, **k))
    rng = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 383, (n,), generator=rng).tolist() for n in (5, 17, 40, 700)]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)

    def run():
        llm = LLM(path, skip_tokenizer_init=True, device="cuda", dtype="bfloat16",
                  kv_cache_memory=64 << 20, max_model_len=1024)
        out = [o.outputs[0].token_ids for o in llm.generate(
            [{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)]
        del llm
        return out
    with_table = run()
    assert calls and max(calls) >= 700, calls       # the 700-token prompt step ran eagerly
    monkeypatch.setenv("KVFLOW_CUBLASLT", "0")
    n_calls = len(calls)
    plain = run()
    assert len(calls) == n_calls
    same = sum(a == b for x, y in zip(with_table, plain) for a, b in zip(x, y))
    assert same >= 0.9 * sum(len(x) for x in plain), (with_table, plain)
