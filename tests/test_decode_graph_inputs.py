"""The decode graph's one-copy input staging (kvflow/worker/cuda_graphs.py) and the kernel that
unpacks it inside the graph (kvflow/kernels/decode_inputs.py).

CPU: the kernel runs under Triton's interpreter; DecodeGraphs' staging is driven without a
capture (stage_inputs + _unpack are exactly what a replay does before the forward)."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

import kvflow.kernels  # noqa: E402,F401  (applies the interpreter fixes)
from kvflow.kernels import decode_inputs as di  # noqa: E402
from kvflow.kernels import decode_order as do  # noqa: E402
from kvflow.worker.cuda_graphs import DecodeGraphs  # noqa: E402
from tests.conftest import kernel_device  # noqa: E402

DEVICE = kernel_device(di._decode_inputs_kernel)


@pytest.mark.parametrize("n, hi", [(1, 5), (7, 3), (144, 4096), (300, 40), (1024, 50),
                                   (1000, 2 ** 31 - 1), (2000, 3000)])
def test_longest_first_order_matches_stable_reference(n, hi):
    """One-program sort of packed (length, index) keys: the stable descending argsort, ties
    (many when hi is small) by ascending index, at the largest lengths int32 holds."""
    g = torch.Generator().manual_seed(n)
    lens = torch.randint(0, hi, (n,), generator=g, dtype=torch.int64)
    lens[0] = hi - 1
    lens = lens.to(torch.int32).to(DEVICE)
    got = do.longest_first_order(lens)
    assert got.dtype == torch.int32
    assert torch.equal(got, do.longest_first_order_ref(lens))
    assert lens[got.long()].tolist() == sorted(lens.tolist(), reverse=True)
    if hi < n:   # ties present: stability is what the check above cannot see
        same = lens[got.long()][1:] == lens[got.long()][:-1]
        assert bool(same.any()) and bool((got[1:][same] > got[:-1][same]).all())


def test_longest_first_sort_widths():
    """Each sort width is a compile on a cold start: batches of 1-1024 requests (every decode
    graph bucket of the default limits) use two."""
    assert {do._block(n) for n in range(1, 1025)} == {256, 1024}
    assert do._block(1025) == 2048 and do._block(4096) == 4096


def test_identity_order_grows_and_keeps_old_buffers():
    dev = torch.device(DEVICE)
    a = do.identity_order(dev, 5)
    assert a.dtype == torch.int32 and a.cpu().tolist() == list(range(5))
    b = do.identity_order(dev, 10_000)                      # past the 4096 it starts with
    assert b.cpu().tolist() == list(range(10_000))
    assert a.cpu().tolist() == list(range(5))                # retired, not freed
    assert do.identity_order(dev, 7).data_ptr() == b.data_ptr()


def test_unordered_decode_launch_dispatches_through_the_identity_order(monkeypatch):
    """A one-program-per-request attention launch without request_order binds the same kernel
    variant as an ordered one (HAS_ORDER, an identity order): one compile for both."""
    from kvflow.kernels import attention as att
    calls = []

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **kw: calls.append(kw)
    monkeypatch.setattr(att, "_attention_kernel", Recorder())
    b, h, kv, d, block = 3, 4, 2, 64, 16
    q = torch.zeros(b, h, d, dtype=torch.float16, device=DEVICE)
    cache = torch.zeros(4, block, kv, d, dtype=torch.float16, device=DEVICE)
    qsl = torch.arange(b + 1, dtype=torch.int32, device=DEVICE)
    lens = torch.tensor([5, 9, 3], dtype=torch.int32, device=DEVICE)
    bt = torch.zeros(b, 1, dtype=torch.int32, device=DEVICE)
    order = torch.tensor([1, 0, 2], dtype=torch.int32, device=DEVICE)
    for ro in (None, order):
        att.unified_attention(q, cache, cache, qsl, lens, bt, 1, 16, 0.125, num_splits=1,
                              request_order=ro)
    assert [kw["HAS_ORDER"] for kw in calls] == [True, True]
    assert calls[0]["order_ptr"].cpu().tolist() == [0, 1, 2]
    assert calls[1]["order_ptr"] is order


@pytest.mark.parametrize("n, bs", [(8, 8), (16, 5), (700, 600)])
def test_kernel_matches_reference(n, bs):
    g = torch.Generator().manual_seed(n + bs)
    stage = torch.randint(0, 1000, (6 * n,), generator=g)
    fill = torch.randint(-1, 4, (n,), generator=g)          # -1 or a row of last_sampled
    stage[4 * n:5 * n] = fill
    stage[2 * n:2 * n + 3] = -1                              # padding slots pass through
    stage, last = stage.to(DEVICE), torch.arange(100, 104, device=DEVICE)
    outs = []
    for fn in (di.unpack_decode_inputs, di.decode_inputs_ref):
        bufs = [torch.full((n,), 7, dtype=torch.int64, device=DEVICE) for _ in range(3)]
        bufs.append(torch.full((n,), 7, dtype=torch.int32, device=DEVICE))
        fn(stage, n, bs, last, *bufs)
        outs.append(bufs)
    for got, ref in zip(*outs):
        assert torch.equal(got, ref)
    ids = outs[0][0]
    for i in range(bs):
        f = int(fill[i])
        assert int(ids[i]) == (100 + f if f >= 0 else int(stage[i]))
    assert (ids[bs:] == 7).all() and outs[0][3].dtype == torch.int32   # rows >= bs untouched


def test_stage_inputs_one_copy_round_trip():
    """stage_inputs packs B requests (padded to the bucket) into one staging buffer; the device
    copy holds the block table the graph reads, and _unpack fills the graph inputs, taking
    in-flight tokens from last_sampled."""
    model = SimpleNamespace(config=SimpleNamespace(vocab_size=8, dtype=torch.float32))
    last = torch.tensor([50, 51, 52, 53, 54], device=DEVICE)
    graphs = DecodeGraphs(model, torch.device(DEVICE), max_model_len=64, block_size=16,
                          max_blocks_per_req=3, buckets=[1, 4, 8], last_sampled=last)
    ids = np.array([11, 12, 13]); pos = np.array([5, 17, 40]); slots = np.array([5, 33, 72])
    lens = pos + 1
    bt = np.array([[0, 9, 9], [1, 2, 9], [3, 4, 5]], dtype=np.int32)
    rows = np.array([4, 0, 2])
    fill = np.array([-1, 0, 2])             # requests 1 and 2 wait on tokens still on the device
    for parity in (0, 1):
        bs = graphs.stage_inputs(ids, pos, slots, lens, bt, parity, fill_rows=fill, rows=rows)
        assert bs == 4
        graphs._unpack(bs)
        assert graphs.input_ids[:4].tolist() == [11, 50, 52, 0]
        assert graphs.positions[:4].tolist() == [5, 17, 40, 0]
        assert graphs.slot_mapping[:4].tolist() == [5, 33, 72, -1]      # pad row: no KV write
        assert graphs.seq_lens[:4].tolist() == [6, 18, 41, 1]
        assert graphs.seq_lens.dtype == torch.int32
        assert graphs.block_table[:3].tolist() == bt.tolist()
        assert graphs.staged_rows(3).tolist() == rows.tolist()
    # A smaller batch next: only its rows are refreshed, the copy stops after its block rows.
    bs = graphs.stage_inputs(ids[:1], pos[:1] + 1, slots[:1] + 1, lens[:1] + 1, bt[:1] + 1)
    graphs._unpack(bs)
    assert bs == 1 and graphs.input_ids[0].item() == 11 and graphs.seq_lens[0].item() == 7
    assert graphs.block_table[0].tolist() == (bt[0] + 1).tolist()


def test_metadata_orders_large_batches_longest_first(monkeypatch):
    """Decode graphs whose attention programs (requests x KV heads) outnumber what the GPU holds
    at once hand attention a longest-first order of the requests (computed from the replay's
    own lengths); the batch just below, one request, graphs without KV heads and
    KVFLOW_ATTN_LONGEST_FIRST=0, none (small split grids: the rule's own test below)."""
    from kvflow.kernels.attention_config import DECODE_PROGRAMS_PER_SM, device_limits
    model = SimpleNamespace(config=SimpleNamespace(vocab_size=8, dtype=torch.float32))
    kv = 8
    resident = DECODE_PROGRAMS_PER_SM * device_limits(torch.device(DEVICE))[0]
    n = resident // kv + 1                       # the smallest batch past one wave
    graphs = DecodeGraphs(model, torch.device(DEVICE), max_model_len=4096, block_size=16,
                          max_blocks_per_req=2, buckets=[n - 1, n], num_kv_heads=kv)
    assert graphs._metadata(1).decode_order is None
    lens = torch.randperm(n, generator=torch.Generator().manual_seed(0)).to(torch.int32) + 1
    graphs.seq_lens[:n] = lens.to(DEVICE)
    order = graphs._metadata(n).decode_order
    assert order.dtype == torch.int32 and sorted(order.tolist()) == list(range(n))
    assert graphs.seq_lens[order.long()].tolist() == sorted(lens.tolist(), reverse=True)
    assert graphs._metadata(n - 1).decode_order is None
    graphs.num_kv_heads = 0
    assert graphs._metadata(n).decode_order is None
    graphs.num_kv_heads = kv
    monkeypatch.setenv("KVFLOW_ATTN_LONGEST_FIRST", "0")
    assert graphs._metadata(n).decode_order is None


def test_dispatch_longest_first_counts_programs_not_requests():
    """The rule is about programs (requests x KV heads x split-KV segments) against the GPU's
    resident slots: unsplit grids past one wave, and grids split >= 4 ways; fewer KV heads (e.g.
    under tensor parallelism) need more requests, more SMs more programs."""
    from kvflow.kernels.attention_config import DECODE_PROGRAMS_PER_SM, dispatch_longest_first
    slots = DECODE_PROGRAMS_PER_SM * 132
    L = 4096
    assert not dispatch_longest_first(slots // 8, 8, 132, L)
    assert dispatch_longest_first(slots // 8 + 1, 8, 132, L)
    assert not dispatch_longest_first(slots // 8 + 1, 4, 132, L)
    assert dispatch_longest_first(slots // 4 + 1, 4, 132, L)
    assert not dispatch_longest_first(slots // 8 + 1, 8, 2 * 132, L)
    # small batches: split 4+ ways (<= 16 requests x 8 heads) yes, 2 ways (17-32) no, and no
    # split at all when the contexts are too short to split
    assert dispatch_longest_first(2, 8, 132, L) and dispatch_longest_first(16, 8, 132, L)
    assert not dispatch_longest_first(17, 8, 132, L) and not dispatch_longest_first(32, 8, 132, L)
    assert not dispatch_longest_first(8, 8, 132, 512)
    assert not dispatch_longest_first(1, 8, 132, L)
