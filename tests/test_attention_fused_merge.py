"""Split-KV merge fused into the attention launch (ticket counters) vs the two-kernel path.

Both paths share one merge routine (_merge_partials), so their outputs must be equal bit for
bit, and both must match the torch reference. After every launch the ticket counters must be
back at zero (the last arriving segment resets them; a CUDA graph replays the same launch).
Under TRITON_INTERPRET=1 programs run one after another, so these tests check the protocol's
bookkeeping (who is last, what it reads, the reset), not its memory ordering on a GPU.
"""
import dataclasses

import pytest
import torch

pytest.importorskip("triton")

from kvflow.kernels import attention as attn_mod  # noqa: E402
from kvflow.kernels import choose_config, ref_paged_attention, unified_attention  # noqa: E402
from kvflow.kernels.attention import AttentionConfig, _attention_kernel  # noqa: E402
from tests.conftest import kernel_device  # noqa: E402
from tests.test_kernels import _close, make_paged_batch  # noqa: E402

DEVICE = kernel_device(_attention_kernel)


def _counters_zero():
    for buf in list(attn_mod._SPLIT_COUNTERS.buffers.values()) + attn_mod._SPLIT_COUNTERS.retired:
        assert int(buf.count_nonzero()) == 0, "ticket counters not reset"


def _both_paths(query, kv, qsl, sl, bt, max_q, max_s, scale, **kw):
    """(fused output, two-kernel output), each into a NaN-filled buffer."""
    outs = []
    for fused in (True, False):
        out = torch.full_like(query, float("nan"))
        unified_attention(query, kv[0], kv[1], qsl, sl, bt, max_q, max_s, scale, out=out,
                          fused_merge=fused, **kw)
        _counters_zero()
        outs.append(out)
    return outs


def _check(q_lens, seq_lens, H, KV, D, block_size, dtype, config=None, num_splits=None,
           **kw):
    query, kv, qsl, sl, bt = make_paged_batch(q_lens, seq_lens, H, KV, D, block_size, dtype,
                                              pad_tokens=kw.pop("pad_tokens", 0))
    max_q = kw.pop("max_query_len", max(q_lens))
    max_s = kw.pop("max_seq_len", max(seq_lens))
    if config is not None:
        kw["config"] = config
    else:
        kw["num_splits"] = num_splits
    fused, two = _both_paths(query, kv, qsl, sl, bt, max_q, max_s, D ** -0.5, **kw)
    n = int(qsl[-1])
    assert torch.equal(fused[:n].view(torch.uint8), two[:n].view(torch.uint8)), \
        (fused[:n] - two[:n]).abs().max()
    ref = ref_paged_attention(query, kv[0], kv[1], qsl, sl, bt, D ** -0.5)
    _close(fused[:n], ref[:n], dtype)
    return fused


class TestFusedMerge:
    @pytest.mark.parametrize("num_splits", list(range(1, 9)) + [11, 16, 31, 32])
    def test_decode_split_grid(self, num_splits):
        # 16-token tiles (fp32): contexts of 1 tile (one live segment: merged in registers),
        # a few tiles (most segments empty), and more tiles than segments.
        _check([1, 1, 1, 1], [9, 40, 150, 600], 8, 2, 32, 16, torch.float32,
               num_splits=num_splits)

    @pytest.mark.parametrize("qpk", [1, 2, 4, 8])
    def test_gqa_bf16(self, qpk):
        _check([1, 1, 1], [300, 17, 129], 2 * qpk, 2, 64, 16, torch.bfloat16, num_splits=16)

    @pytest.mark.parametrize("num_splits", [2, 3, 7, 32])
    def test_decode_and_chunked_prefill_rows_one_launch(self, num_splits):
        # Prefill, chunked prefill over a prefix and decodes in one direct launch: within a
        # q-block, rows see different KV ranges; segments past a short row's range are empty
        # for that row but not for the block.
        cfg = choose_config(21, 4, 4, 2, 32, 13, 45, torch.float32, num_splits=num_splits)
        assert cfg.direct and cfg.num_splits == num_splits
        _check([13, 6, 1, 1], [13, 45, 37, 2], 4, 2, 32, 16, torch.float32, config=cfg)

    @pytest.mark.parametrize("num_splits", [2, 5])
    def test_search_mode_with_gaps(self, num_splits):
        # block_q 4 < max_query_len: several q-blocks per request, gap programs exit at once.
        cfg = AttentionConfig(block_m=16, block_q=4, block_n=16, num_warps=4, num_stages=2,
                              num_splits=num_splits, direct=False)
        _check([13, 6, 1, 0, 9], [13, 45, 37, 0, 70], 8, 2, 32, 16, torch.float32,
               config=cfg, pad_tokens=3)

    def test_two_launch_mixed_batch(self):
        # Decode slice and prefill slice (query_start_loc[0] > 0) back to back, both split.
        _check([1, 1, 1, 40, 19], [30, 64, 5, 70, 19], 8, 2, 32, 16, torch.float32,
               num_splits=3, num_decode_reqs=3)

    def test_upper_bounds_and_padding_requests(self):
        # As the decode graphs call it: max_seq_len = max_model_len bound, padded requests.
        _check([1, 1, 0, 0], [30, 200, 1, 1], 4, 2, 32, 16, torch.float32,
               max_seq_len=8192, pad_tokens=2)

    def test_fp8_cache(self):
        query, kv, qsl, sl, bt = make_paged_batch([13, 6, 1, 1], [13, 45, 37, 150], 4, 2, 32,
                                                  16, torch.bfloat16)
        ks = torch.tensor(0.25, device=DEVICE)
        vs = torch.tensor(2.0, device=DEVICE)
        kv8 = torch.stack([kv[0].float() / ks, kv[1].float() / vs]).to(torch.float8_e4m3fn)
        deq = torch.stack([kv8[0].float() * ks, kv8[1].float() * vs]).to(torch.bfloat16)
        fused, two = _both_paths(query, kv8, qsl, sl, bt, 13, 150, 32 ** -0.5, num_splits=4,
                                 k_scale=ks, v_scale=vs)
        n = int(qsl[-1])
        assert torch.equal(fused[:n].view(torch.uint8), two[:n].view(torch.uint8))
        ref = ref_paged_attention(query, deq[0], deq[1], qsl, sl, bt, 32 ** -0.5)
        _close(fused[:n], ref[:n], torch.bfloat16)

    @pytest.mark.parametrize("num_splits", [2, 4, 16])
    def test_seq_starts(self, num_splits):
        # Local-attention virtual batches: KV starts at seq_starts[i] (< block_size); with
        # 16-token tiles in 32-token blocks, segment 0 may hold only skipped tiles.
        query, kv, qsl, sl, bt = make_paged_batch([1, 1, 5], [40, 90, 70], 4, 2, 32, 32,
                                                  torch.float32)
        starts = torch.tensor([3, 20, 31], dtype=torch.int32, device=DEVICE)
        cfg = AttentionConfig(block_m=16, block_q=8, block_n=16, num_warps=4, num_stages=2,
                              num_splits=num_splits, direct=True)
        fused, two = _both_paths(query, kv, qsl, sl, bt, 5, 90, 0.2, config=cfg,
                                 seq_starts=starts)
        n = int(qsl[-1])
        assert torch.equal(fused[:n], two[:n])
        one = unified_attention(query, kv[0], kv[1], qsl, sl, bt, 5, 90, 0.2,
                                config=dataclasses.replace(cfg, num_splits=1),
                                seq_starts=starts)
        torch.testing.assert_close(fused[:n], one[:n], atol=1e-5, rtol=1e-5)

    def test_consecutive_calls_reuse_counters(self):
        # Different grids one after the other on the same counters, then the first again: a
        # counter left non-zero would make the next launch's merge run early or never.
        _check([1, 1, 1, 1], [9, 40, 150, 600], 8, 2, 32, 16, torch.float32, num_splits=8)
        _check([7, 1], [200, 33], 4, 1, 64, 16, torch.float32, num_splits=5)
        out = _check([1, 1, 1, 1], [9, 40, 150, 600], 8, 2, 32, 16, torch.float32,
                     num_splits=8)
        again = _check([1, 1, 1, 1], [9, 40, 150, 600], 8, 2, 32, 16, torch.float32,
                       num_splits=8)
        assert torch.equal(out, again)

    def test_counters_grow_and_keep_old_buffer(self, monkeypatch):
        from kvflow.kernels.tickets import TicketCounters
        monkeypatch.setattr(attn_mod, "_SPLIT_COUNTERS", TicketCounters(min_size=4))
        small = attn_mod._split_counters(torch.device(DEVICE), 3)
        assert small.numel() == 4 and attn_mod._split_counters(torch.device(DEVICE), 4) is small
        # 6 requests x 2 KV heads = 12 counters: the buffer grows; the old one is kept
        # (a captured graph may still point at it).
        _check([1] * 6, [9, 40, 150, 600, 33, 1], 4, 2, 32, 16, torch.float32, num_splits=4)
        (big,) = attn_mod._SPLIT_COUNTERS.buffers.values()
        assert big.numel() >= 12 and attn_mod._SPLIT_COUNTERS.retired == [small]

    def test_choose_config_fuses_decode_tiles_only(self):
        decode = choose_config(1, 1, 32, 8, 128, 1, 32768, torch.bfloat16, num_sms=132)
        assert decode.num_splits > 1 and decode.fused_merge
        # 128-row prefill tiles (Llama-3.1-8B's QPK 4) merge in a second kernel; a chunk
        # over a long prefix keeps them, though its step is small (see SMALL_GRID_BLOCK_M).
        prefill = choose_config(256, 1, 32, 8, 128, 2048, 32768, torch.bfloat16, num_sms=132)
        assert prefill.num_splits > 1 and prefill.block_m == 128 and not prefill.fused_merge
        # 64-row prefill tiles (QPK 2, queries of <= 1536 tokens) fuse like decode tiles.
        chunk = choose_config(128, 1, 16, 8, 128, 128, 32768, torch.bfloat16, num_sms=132)
        assert chunk.num_splits > 1 and chunk.block_m == 64 and chunk.fused_merge


@pytest.mark.parametrize("num_splits", [None, 1, 3])
def test_heads_first_grid_is_bit_identical(monkeypatch, num_splits):
    """KVFLOW_ATTN_HEADS_FIRST only reorders a decode launch's grid (KV heads fastest): every
    program computes what it did, so outputs are equal bit for bit, with and without split-KV
    (fused merge: the ticket counter index is per (row, head) in both orders) and with a
    request order."""
    q_lens, seq_lens = [1] * 5, [37, 3, 70, 16, 129]
    query, kv, qsl, sl, bt = make_paged_batch(q_lens, seq_lens, 8, 2, 32, 16, torch.float32)
    order = torch.argsort(sl, descending=True).to(torch.int32)
    outs = []
    for flag in ("0", "1"):
        monkeypatch.setenv("KVFLOW_ATTN_HEADS_FIRST", flag)
        out = torch.full_like(query, float("nan"))
        unified_attention(query, kv[0], kv[1], qsl, sl, bt, 1, max(seq_lens), 32 ** -0.5,
                          out=out, num_splits=num_splits, request_order=order)
        _counters_zero()
        outs.append(out)
    assert torch.equal(outs[0].view(torch.uint8), outs[1].view(torch.uint8))
    ref = ref_paged_attention(query, kv[0], kv[1], qsl, sl, bt, 32 ** -0.5)
    _close(outs[1], ref, torch.float32)
