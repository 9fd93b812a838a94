"""Triton kernels vs their torch references.

Without a GPU the kernels run under Triton's CPU interpreter (TRITON_INTERPRET=1, set by
conftest before triton is first imported) on tiny shapes. With a CUDA device (and TRITON_INTERPRET unset
or 0) the same tests run compiled on the GPU, plus the `gpu`-marked class with realistic shapes:
    pytest tests/test_kernels.py            # on the GPU machine
"""
import pytest
import torch

pytest.importorskip("triton")
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

import kvflow.kernels.attention as attn_mod  # noqa: E402
import kvflow.kernels.attention_kernel as kernel_mod  # noqa: E402

from kvflow.attention.backend import AttentionMetadata, AttentionSpec  # noqa: E402
from kvflow.attention.triton_backend import TritonAttentionBackend  # noqa: E402
from kvflow.kernels import (  # noqa: E402
    AttentionConfig, choose_config, fused_add_rms_norm, ref_cos_sin_cache,
    ref_fused_add_rms_norm, ref_paged_attention, ref_reshape_and_cache, ref_rms_norm,
    ref_rotary_embedding, ref_silu_and_mul, reshape_and_cache, rms_norm, rotary_embedding,
    silu_and_mul, unified_attention)
from kvflow.kernels import norm as norm_mod  # noqa: E402
from kvflow.kernels.attention import _attention_kernel  # noqa: E402
from tests.conftest import kernel_device  # noqa: E402

# The mode the kernels were actually built in (kvflow.kernels may have been imported earlier).
DEVICE = kernel_device(_attention_kernel)
INTERPRET = DEVICE == "cpu"

TOL = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 2.5e-2}


def _close(out, ref, dtype, scale=1.0):
    assert not torch.isnan(out).any(), "NaN in output"
    torch.testing.assert_close(out.float(), ref.float(), atol=TOL[dtype] * scale,
                               rtol=TOL[dtype] * scale)


def make_paged_batch(q_lens, seq_lens, num_heads, num_kv_heads, head_size, block_size, dtype,
                     device=DEVICE, pad_tokens=0, seed=0):
    """Random queries and a NaN-poisoned paged cache holding each request's whole context.

    Blocks are assigned in random order; unused block-table entries point at a NaN block, so
    any unmasked read outside a request's context shows up as NaN in the output."""
    g = torch.Generator().manual_seed(seed)
    n_blocks = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(n_blocks) + 2
    max_blocks = max(n_blocks + [1]) + 1
    poison = num_blocks - 1
    perm = torch.randperm(num_blocks - 1, generator=g)
    block_table = torch.full((len(seq_lens), max_blocks), poison, dtype=torch.int32)
    i = 0
    for r, nb in enumerate(n_blocks):
        block_table[r, :nb] = perm[i:i + nb].to(torch.int32)
        i += nb
    kv_cache = torch.full((2, num_blocks, block_size, num_kv_heads, head_size), float("nan"),
                          dtype=dtype)
    for r, s in enumerate(seq_lens):
        pos = torch.arange(s)
        slots = block_table[r].long()[pos // block_size] * block_size + pos % block_size
        flat = kv_cache.view(2, -1, num_kv_heads, head_size)
        flat[:, slots] = torch.randn(2, s, num_kv_heads, head_size, generator=g).to(dtype)
    qsl = torch.zeros(len(q_lens) + 1, dtype=torch.int32)
    qsl[1:] = torch.tensor(q_lens, dtype=torch.int32).cumsum(0)
    T = int(qsl[-1]) + pad_tokens
    query = torch.randn(T, num_heads, head_size, generator=g).to(dtype)
    to = dict(device=device)
    return (query.to(**to), kv_cache.to(**to), qsl.to(**to),
            torch.tensor(seq_lens, dtype=torch.int32, device=device), block_table.to(**to))


def _check_attention(q_lens, seq_lens, H, KV, D, block_size, dtype, **kw):
    query, kv_cache, qsl, sl, bt = make_paged_batch(q_lens, seq_lens, H, KV, D, block_size,
                                                    dtype, pad_tokens=kw.pop("pad_tokens", 0))
    max_q = kw.pop("max_query_len", max(q_lens))
    max_s = kw.pop("max_seq_len", max(seq_lens))
    out = torch.full_like(query, float("nan"))
    unified_attention(query, kv_cache[0], kv_cache[1], qsl, sl, bt, max_q, max_s, D ** -0.5,
                      out=out, **kw)
    ref = ref_paged_attention(query, kv_cache[0], kv_cache[1], qsl, sl, bt, D ** -0.5)
    n = int(qsl[-1])
    _close(out[:n], ref[:n], dtype)


def _record_launches(monkeypatch, wait_one: bool = False) -> list:
    """(config, min_q_len) of every attention launch unified_attention makes from now on;
    (config, min_q_len, wait_one) with wait_one=True."""
    import kvflow.kernels.attention as attn_mod
    launches = []
    real = attn_mod._launch

    def spy(*args):
        launches.append((args[10], args[15]) + ((args[16],) if wait_one else ()))
        return real(*args)
    monkeypatch.setattr(attn_mod, "_launch", spy)
    return launches


# Mixed batch: prefill (q == seq), chunked prefill over a cached prefix, decodes (one short).
MIXED_Q = [13, 6, 1, 1]
MIXED_S = [13, 45, 37, 2]


class TestAttention:
    @pytest.mark.parametrize("qpk,block_size,dtype", [
        (1, 16, torch.float32), (2, 32, torch.float16), (4, 16, torch.bfloat16),
        (2, 16, torch.float32), (4, 32, torch.float32)])
    def test_mixed_batch_default_config(self, qpk, block_size, dtype):
        _check_attention(MIXED_Q, MIXED_S, 2 * qpk, 2, 32, block_size, dtype)

    @pytest.mark.parametrize("qpk,block_size", [(1, 16), (2, 32), (4, 16)])
    def test_multi_qblock_search(self, qpk, block_size):
        # block_q 4 < max_query_len: programs take q-blocks by the dense numbering; 16-token KV tiles
        # inside 32-token blocks take the scalar block-table path.
        cfg = AttentionConfig(block_m=16, block_q=4, block_n=16, num_warps=4, num_stages=2,
                              num_splits=1, direct=False)
        _check_attention(MIXED_Q, MIXED_S, 2 * qpk, 2, 32, block_size, torch.float32,
                         config=cfg)

    def test_prefill_config_large_tiles(self):
        # 40-token query x QPK 4 exceeds the decode config: 128-row tiles, search mapping.
        cfg = choose_config(60, 3, 8, 2, 32, 40, 70, torch.float32)
        assert not cfg.direct and cfg.block_m == 128
        _check_attention([40, 19, 1], [70, 19, 64], 8, 2, 32, 16, torch.float32)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    def test_split_kv_forced_decode(self, dtype):
        _check_attention([1, 1, 1], [150, 3, 64], 4, 2, 32, 16, dtype, num_splits=4)

    def test_split_kv_forced_mixed(self):
        # Segments also partition chunked-prefill rows; some segments are empty for some rows.
        _check_attention(MIXED_Q, MIXED_S, 4, 2, 32, 16, torch.float32, num_splits=3)

    def test_split_kv_search_path(self):
        cfg = AttentionConfig(block_m=16, block_q=8, block_n=16, num_warps=4, num_stages=2,
                              num_splits=2, direct=False)
        _check_attention(MIXED_Q, MIXED_S, 4, 2, 32, 32, torch.float16, config=cfg)

    @pytest.mark.parametrize("q_lens,num_splits", [([1, 1, 1, 40, 19], None),
                                                   ([1, 1, 1, 40, 19], 2),
                                                   ([1, 0, 1, 40, 19], 2)])
    def test_decodes_first_two_launches(self, q_lens, num_splits):
        # Decode slice on decode tiles, prefill slice (query_start_loc[0] > 0) on 128-row
        # tiles with the search mapping; split partials are numbered per slice.
        _check_attention(q_lens, [30, 64, 5, 70, 19], 8, 2, 32, 16, torch.float32,
                         num_decode_reqs=3, num_splits=num_splits)

    @pytest.mark.parametrize("q_lens,seq_lens,num_splits,ordered", [
        ([40, 1, 19, 1, 0, 1], [70, 30, 19, 64, 1, 5], None, False),
        ([1, 40, 1, 19, 0, 1], [30, 70, 64, 19, 1, 5], 2, True),
        ([1, 1, 3, 0], [9, 64, 3, 1], None, True)])
    @pytest.mark.parametrize("overlap", ["1", "0"])
    def test_split_decodes_at_any_row(self, q_lens, seq_lens, num_splits, ordered, overlap,
                                      monkeypatch):
        # A mixed-step CUDA graph cannot give the decode count as a host int: with
        # split_decodes both launches span every request (decodes anywhere, a padding request
        # with q_len 0, padding tokens), bounds instead of maxima, split partials indexed by
        # absolute token, and the decode launch dispatched longest context first. Unsplit,
        # the prompt launch goes first and only an extra last grid row of the decode launch
        # waits for it (KVFLOW_ATTN_OVERLAP_PROMPTS=1, the default); split launches keep the
        # serial order, decodes first.
        monkeypatch.setenv("KVFLOW_ATTN_OVERLAP_PROMPTS", overlap)
        launches = _record_launches(monkeypatch, wait_one=True)
        order = None
        if ordered:
            order = torch.argsort(torch.tensor(seq_lens), descending=True, stable=True)
            order = order.to(torch.int32).to(DEVICE)
        _check_attention(q_lens, seq_lens, 8, 2, 32, 16, torch.float32, split_decodes=True,
                         num_splits=num_splits, max_query_len=64, max_seq_len=256,
                         pad_tokens=5, request_order=order)
        first, second = launches
        overlapped = overlap == "1" and all(c.num_splits == 1 for c, *_ in launches)
        assert overlapped == (overlap == "1" and num_splits is None)
        (decode, min_d, wait_d), (prefill, min_p, wait_p) = (
            (second, first) if overlapped else (first, second))
        assert decode.direct and decode.block_q == 1 and min_d == 0   # skips q_len > 1
        assert prefill.block_q > 1 and min_p == 2                      # skips q_len <= 1
        assert wait_d == overlapped and not wait_p

    def test_split_decodes_prompt_bound(self):
        # max_prompt_reqs bounds the prompt launch's grid (T // BLOCK_Q + that many rows a KV
        # head): three 2-token prompts among decodes are exact with a bound of 3 and lose
        # q-blocks with 1 (their rows stay NaN), so the bound is what sizes the grid.
        q_lens, seq_lens = [1, 2, 1, 2, 2, 0], [9, 20, 33, 2, 40, 1]
        _check_attention(q_lens, seq_lens, 8, 2, 32, 16, torch.float32, split_decodes=True,
                         max_query_len=64, max_seq_len=256, max_prompt_reqs=3)
        with pytest.raises(AssertionError, match="NaN"):
            _check_attention(q_lens, seq_lens, 8, 2, 32, 16, torch.float32,
                             split_decodes=True, max_query_len=64, max_seq_len=256,
                             max_prompt_reqs=1)

    def test_split_decodes_prefill_grid_tight_bound(self, monkeypatch):
        # The prefill launch's grid is T // BLOCK_Q + T // 2 rows when most request rows are
        # decodes: here 2-token prefills (the most q-blocks T tokens can make), decodes and
        # padding over more than one 256-request scan chunk.
        launches = _record_launches(monkeypatch)
        q_lens = [1] * 250 + [2] * 20 + [1] * 20 + [37] + [0] * 10
        seq_lens = [5 + i % 23 for i in range(290)] + [40] + [1] * 10
        _check_attention(q_lens, seq_lens, 8, 2, 32, 16, torch.float32, split_decodes=True,
                         max_query_len=64, max_seq_len=256)
        assert [m for _, m in launches] == [2, 0]        # prompt launch first (overlapped)

    def test_split_decodes_keeps_short_chunk_tiles(self, monkeypatch):
        # Short chunks (8 tokens x QPK 4 fit a 64-row DIRECT tile): one launch serves all.
        launches = _record_launches(monkeypatch)
        _check_attention([1, 8, 1], [30, 20, 9], 8, 2, 32, 16, torch.float32,
                         split_decodes=True, max_query_len=8, max_seq_len=256)
        [(cfg, min_q)] = launches
        assert cfg.direct and cfg.block_q == 16 and min_q == 0

    def test_head_size_64_and_non_power_of_two(self):
        _check_attention([5, 1], [20, 33], 4, 2, 64, 16, torch.float16)
        _check_attention([5, 1], [20, 33], 2, 1, 80, 16, torch.float32)

    def test_odd_block_size(self):
        # block size 24 with 16-token tiles: tiles straddle blocks (vector block-table path).
        _check_attention(MIXED_Q, MIXED_S, 4, 2, 32, 24, torch.float32)

    def test_upper_bounds_and_padding(self):
        # As under CUDA graphs: max lens are upper bounds, padded requests have q_len 0 and
        # seq_len 0, and token rows past query_start_loc[-1] exist.
        _check_attention([3, 1, 0, 0], [30, 9, 0, 0], 4, 2, 32, 16, torch.float32,
                         max_query_len=64, max_seq_len=4096, pad_tokens=3)
        _check_attention([1, 1, 0], [30, 9, 0], 4, 2, 32, 16, torch.float32,
                         max_query_len=1, max_seq_len=8192, pad_tokens=2)

    def test_choose_config_small_steps_take_64_row_prefill_tiles(self):
        # Mixtral's 384-token mixed-step graph (QPK 4, 8 KV heads): 12 q-blocks of 32 x 8
        # heads cannot fill 132 SMs twice, so 64-row tiles; a 16K-token prefill keeps 128.
        small = choose_config(384, 384, 32, 8, 128, 384, 4096, torch.bfloat16, num_sms=132)
        assert (small.block_m, small.block_q, small.direct) == (64, 16, False)
        big = choose_config(16384, 16, 32, 8, 128, 1024, 4096, torch.bfloat16, num_sms=132)
        assert (big.block_m, big.block_q) == (128, 32)
        # Outside the measured case (fp32 here) the tiles are unchanged.
        fp32 = choose_config(384, 384, 32, 8, 128, 384, 4096, torch.float32, num_sms=132)
        assert fp32.block_m == 128
        # A small step whose 128-row tiles split the KV (one chunk over a 32K prefix) keeps
        # them; without the long prefix it takes 64 rows.
        long_prefix = choose_config(256, 1, 32, 8, 128, 256, 32768, torch.bfloat16, num_sms=132)
        assert long_prefix.block_m == 128 and long_prefix.num_splits > 1
        short = choose_config(256, 1, 32, 8, 128, 256, 256, torch.bfloat16, num_sms=132)
        assert short.block_m == 64 and short.num_splits == 1

    def test_choose_config_split_heuristic(self):
        small = choose_config(2, 2, 32, 8, 128, 1, 32768, torch.bfloat16, num_sms=132)
        assert small.direct and small.num_splits > 1 and small.block_m == 16
        big = choose_config(256, 256, 32, 8, 128, 1, 32768, torch.bfloat16, num_sms=132)
        assert big.num_splits == 1
        short = choose_config(2, 2, 32, 8, 128, 1, 300, torch.bfloat16, num_sms=132)
        assert short.num_splits == 1
        # QPK 2 (Qwen3-0.6B's 16 / 8 heads): 128 x 128 / 8 warps / 3 stages for long prompts
        prefill = choose_config(8192, 2, 16, 8, 128, 4096, 4096, torch.bfloat16)
        assert not prefill.direct and (prefill.block_m, prefill.block_q, prefill.block_n) == \
            (128, 64, 128) and prefill.num_warps == 8
        # ... and 64 x 64 tiles, 4 warps, 2 stages up to 1536 tokens (1024 for MHA)
        step = choose_config(16384, 29, 16, 8, 128, 1536, 1536, torch.bfloat16)
        assert (step.block_m, step.block_q, step.block_n, step.num_warps, step.num_stages) == \
            (64, 32, 64, 4, 2) and not step.direct
        assert choose_config(16384, 29, 16, 8, 128, 1537, 1537, torch.bfloat16).block_m == 128
        assert choose_config(16384, 29, 32, 32, 128, 1024, 1024, torch.bfloat16).block_q == 64
        assert choose_config(16384, 29, 32, 32, 128, 1025, 1025, torch.bfloat16).block_m == 128
        # QPK >= 4 (Llama-3.1-8B, -70B): 128 x 64 / 4 warps at any length, 3 stages past 2048
        for heads, block_q in ((32, 32), (64, 16)):
            for max_q, stages in ((512, 2), (2048, 2), (2049, 3), (8192, 3)):
                c = choose_config(16384, 8, heads, 8, 128, max_q, max_q, torch.bfloat16)
                assert (c.block_m, c.block_q, c.block_n, c.num_warps, c.num_stages) == \
                    (128, block_q, 64, 4, stages)
        # Other head sizes and fp32 keep the 128-row, 8-warp tiles
        assert choose_config(16384, 29, 16, 8, 128, 1024, 1024, torch.float32).block_m == 128
        assert choose_config(16384, 29, 16, 8, 64, 1024, 1024, torch.bfloat16).block_m == 128
        assert choose_config(16384, 29, 32, 8, 64, 1024, 1024, torch.bfloat16).num_warps == 8
        # decode grids of one to two programs per SM split in two; two or more do not
        mid = choose_config(32, 32, 32, 8, 128, 1, 4096, torch.bfloat16, num_sms=132)
        assert mid.num_splits == 2 and mid.num_warps == 2
        assert choose_config(33, 33, 32, 8, 128, 1, 4096, torch.bfloat16,
                             num_sms=132).num_splits == 1
        # 2 warps for 16-bit decode tiles of D <= 128 on grids of >= one program per SM;
        # 4 for small split grids, fp32 and D > 128
        assert small.num_warps == 4
        assert choose_config(512, 512, 32, 8, 256, 1, 4096, torch.bfloat16).num_warps == 4
        assert choose_config(512, 512, 32, 8, 128, 1, 4096, torch.float32).num_warps == 4
        assert big.num_warps == 2
        # unsplit grids of 2-3 programs per SM keep 4 warps (all resident either way); past 3
        # a SM, 2
        for reqs, warps in ((33, 4), (49, 4), (50, 2), (64, 2)):
            cfg = choose_config(reqs, reqs, 32, 8, 128, 1, 4096, torch.bfloat16, num_sms=132)
            assert cfg.num_splits == 1 and cfg.num_warps == warps, (reqs, cfg)


class TestRequestOrder:
    """unified_attention(request_order=): a decode launch dispatches its per-request programs in
    that order; the output is the same bit for bit (split-KV or not)."""

    @pytest.mark.parametrize("num_splits", [1, 3])
    def test_order_does_not_change_the_result(self, num_splits):
        g = torch.Generator().manual_seed(3)
        B, H, KV, D, bs = 6, 4, 2, 32, 16
        lens = torch.tensor([5, 70, 33, 1, 129, 64], dtype=torch.int32)
        blocks = (lens + bs - 1) // bs
        table = torch.zeros(B, int(blocks.max()), dtype=torch.int32)
        perm = torch.randperm(int(blocks.sum()), generator=g).to(torch.int32)
        o = 0
        for i, b in enumerate(blocks.tolist()):
            table[i, :b] = perm[o:o + b]
            o += b
        cache = torch.randn(2, int(blocks.sum()), bs, KV, D, generator=g).to(DEVICE)
        q = torch.randn(B, H, D, generator=g).to(DEVICE)
        qsl = torch.arange(B + 1, dtype=torch.int32).to(DEVICE)
        args = (q, cache[0], cache[1], qsl, lens.to(DEVICE), table.to(DEVICE))
        kw = dict(max_query_len=1, max_seq_len=256, scale=D ** -0.5, num_splits=num_splits)
        plain = unified_attention(*args, **kw)
        order = torch.argsort(lens, descending=True).to(torch.int32).to(DEVICE)
        ordered = unified_attention(*args, request_order=order, **kw)
        assert torch.equal(plain, ordered)
        if num_splits == 1:
            # The kernel does read the order: every program sent to request 2 writes its rows
            # only (not a permutation: the other rows keep what out held).
            out = torch.full_like(q, 7.0)
            twos = torch.full((B,), 2, dtype=torch.int32, device=DEVICE)
            unified_attention(*args, request_order=twos, out=out, **kw)
            assert torch.equal(out[2], plain[2]) and bool((out[torch.arange(B) != 2] == 7).all())


class TestReshapeAndCache:
    @pytest.mark.parametrize("dtype,block_size,KV,D", [
        (torch.float32, 16, 2, 32), (torch.bfloat16, 32, 3, 64), (torch.float16, 16, 1, 80)])
    def test_matches_reference_and_skips_padding(self, dtype, block_size, KV, D):
        T, num_blocks = 11, 4
        fused = torch.randn(T, 3 * KV, D).to(dtype).to(DEVICE)      # strided K/V views
        key, value = fused[:, :KV], fused[:, KV:2 * KV]
        slots = torch.randperm(num_blocks * block_size)[:T]
        slots[[2, 7]] = -1
        cache = torch.full((2, num_blocks, block_size, KV, D), float("nan"), dtype=dtype,
                           device=DEVICE)
        ref = cache.clone()
        reshape_and_cache(key, value, cache[0], cache[1], slots.to(DEVICE))
        ref_reshape_and_cache(key, value, ref[0], ref[1], slots.to(DEVICE))
        assert torch.equal(cache.isnan(), ref.isnan())
        assert torch.equal(cache.nan_to_num(), ref.nan_to_num())


class TestFP8Cache:
    """fp8 (e4m3) caches: the write quantizes exactly like the torch backend's reference, and
    attention over an fp8 cache equals the reference over the dequantized cache."""

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    def test_write_matches_torch_backend(self, dtype):
        from kvflow.attention.torch_backend import write_kv_cache
        T, KV, D, bs, nb = 9, 2, 32, 16, 3
        g = torch.Generator().manual_seed(7)
        key = torch.randn(T, KV, D, generator=g) * 300              # some values saturate
        # Edge values (scaled by 1 / k_scale = 2): ties, subnormals, negatives that round to
        # -0.0, signed zeros, just below / above the e4m3 maximum.
        key[0, 0, :8] = torch.tensor([-0.0004, -0.0, 0.0, 0.00049, 0.0009765625, -1.0625 / 2,
                                      224.0, -230.0])
        key = key.to(dtype).to(DEVICE)
        value = torch.randn(T, KV, D, generator=g).to(dtype).to(DEVICE)
        slots = torch.randperm(nb * bs, generator=g)[:T]
        slots[4] = -1
        slots = slots.to(DEVICE)
        ks = torch.tensor(0.5, device=DEVICE)
        vs = torch.tensor(0.03, device=DEVICE)
        cache = torch.zeros((2, nb, bs, KV, D), dtype=torch.float8_e4m3fn, device=DEVICE)
        ref = cache.clone()
        reshape_and_cache(key, value, cache[0], cache[1], slots, ks, vs)
        write_kv_cache(key, value, ref, slots, ks, vs)
        assert torch.equal(cache.view(torch.uint8), ref.view(torch.uint8))
        assert cache.float().abs().max() == 448.0              # saturated, not NaN
        assert not cache.float().isnan().any()

    @pytest.mark.parametrize("num_splits", [1, 3])
    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    def test_attention_matches_dequantized_reference(self, dtype, num_splits):
        query, kv, qsl, sl, bt = make_paged_batch(MIXED_Q, MIXED_S, 4, 2, 32, 16, dtype)
        ks = torch.tensor(0.25, device=DEVICE)
        vs = torch.tensor(2.0, device=DEVICE)
        kv8 = torch.stack([(kv[0].float() / ks), (kv[1].float() / vs)]).to(torch.float8_e4m3fn)
        deq = torch.stack([kv8[0].float() * ks, kv8[1].float() * vs]).to(dtype)
        out = torch.full_like(query, float("nan"))
        unified_attention(query, kv8[0], kv8[1], qsl, sl, bt, max(MIXED_Q), max(MIXED_S),
                          32 ** -0.5, out=out, num_splits=num_splits, k_scale=ks, v_scale=vs)
        ref = ref_paged_attention(query, deq[0], deq[1], qsl, sl, bt, 32 ** -0.5)
        n = int(qsl[-1])
        _close(out[:n], ref[:n], dtype)


class TestNormActivationRotary:
    @pytest.mark.parametrize("dtype,N", [(torch.float32, 96), (torch.bfloat16, 64),
                                         (torch.float16, 100)])
    def test_rms_norm(self, dtype, N):
        x = torch.randn(5, N).to(dtype).to(DEVICE)
        w = (1 + 0.1 * torch.randn(N)).to(dtype).to(DEVICE)
        _close(rms_norm(x, w, 1e-6), ref_rms_norm(x, w, 1e-6), dtype)
        r = torch.randn(5, N).to(dtype).to(DEVICE)
        out, res = fused_add_rms_norm(x, r, w, 1e-6)
        ref_out, ref_res = ref_fused_add_rms_norm(x, r, w, 1e-6)
        _close(res, ref_res, dtype)
        _close(out, ref_out, dtype)

    @pytest.mark.parametrize("dtype,N,S", [(torch.bfloat16, 64, 2), (torch.float16, 100, 3),
                                           (torch.bfloat16, 96, 1)])
    def test_fused_add_rms_norm_parts(self, dtype, N, S):
        # fp32 K-slice partials summed in slice order and rounded once, then the plain fused
        # add + norm: bit for bit what the norm gives the rounded sum.
        parts = torch.randn(S, 6, N).to(DEVICE)
        r = torch.randn(6, N).to(dtype).to(DEVICE)
        w = (1 + 0.1 * torch.randn(N)).to(dtype).to(DEVICE)
        x = parts[0].clone()
        for s in range(1, S):
            x += parts[s]
        out, res = norm_mod.fused_add_rms_norm_parts(parts, r, w, 1e-6)
        ref_out, ref_res = fused_add_rms_norm(x.to(dtype), r, w, 1e-6)
        torch.testing.assert_close(res, ref_res, atol=0, rtol=0)
        torch.testing.assert_close(out, ref_out, atol=0, rtol=0)
        _close(out, ref_fused_add_rms_norm(x.to(dtype), r, w, 1e-6)[0], dtype)

    def test_rms_norm_two_pass(self, monkeypatch):
        monkeypatch.setattr(norm_mod, "_MAX_SINGLE", 64)
        monkeypatch.setattr(norm_mod, "_CHUNK", 32)
        x = torch.randn(3, 2, 100).to(DEVICE)                      # 3-D input, ragged chunks
        r = torch.randn(3, 2, 100).to(DEVICE)
        w = torch.randn(100).to(DEVICE)
        _close(rms_norm(x, w, 1e-5), ref_rms_norm(x, w, 1e-5), torch.float32)
        out, res = fused_add_rms_norm(x, r, w, 1e-5)
        ref_out, ref_res = ref_fused_add_rms_norm(x, r, w, 1e-5)
        _close(out, ref_out, torch.float32)
        _close(res, ref_res, torch.float32)

    @pytest.mark.parametrize("dtype,inter", [(torch.float32, 80), (torch.bfloat16, 64)])
    def test_silu_and_mul(self, dtype, inter):
        x = torch.randn(7, 2 * inter).to(dtype).to(DEVICE)
        _close(silu_and_mul(x), ref_silu_and_mul(x), dtype)

    @pytest.mark.parametrize("is_neox,rot,dtype", [(True, 32, torch.float32),
                                                   (True, 16, torch.bfloat16),
                                                   (False, 32, torch.float16)])
    def test_rotary(self, is_neox, rot, dtype):
        T, H, KV, D = 6, 4, 2, 32
        qkv = torch.randn(T, (H + 2 * KV) * D).to(dtype).to(DEVICE)
        q = qkv[:, :H * D].view(T, H, D)                            # strided views, in place
        k = qkv[:, H * D:(H + KV) * D].view(T, KV, D)
        cache = ref_cos_sin_cache(rot, 64).to(DEVICE)
        positions = torch.randint(0, 64, (T,)).to(DEVICE)
        ref_q, ref_k = q.clone(), k.clone()
        ref_rotary_embedding(positions, ref_q, ref_k, cache, is_neox)
        rotary_embedding(positions, q, k, cache, is_neox)
        _close(q, ref_q, dtype)
        _close(k, ref_k, dtype)


def _backend_step(q_lens, seq_lens, H, KV, D, block_size, dtype, device):
    """One backend forward: the last q_len tokens of each request are new (K/V given, not yet
    cached); returns (out, ref, n_tokens)."""
    query, kv_cache, qsl, sl, bt = make_paged_batch(q_lens, seq_lens, H, KV, D, block_size,
                                                    dtype, device=device, pad_tokens=2)
    T = query.shape[0]
    slots, new_k, new_v = [], [], []
    for r, (ql, s) in enumerate(zip(q_lens, seq_lens)):
        pos = torch.arange(s - ql, s, device=device)
        sl_r = bt[r].long()[pos // block_size] * block_size + pos % block_size
        slots.append(sl_r)
        new_k.append(kv_cache[0].view(-1, KV, D)[sl_r].clone())
        new_v.append(kv_cache[1].view(-1, KV, D)[sl_r].clone())
        kv_cache[:, sl_r // block_size, sl_r % block_size] = float("nan")   # not yet cached
    pad = torch.full((2,), -1, dtype=torch.long, device=device)
    slot_mapping = torch.cat(slots + [pad])
    key = torch.cat(new_k + [torch.randn(2, KV, D, device=device).to(dtype)])
    value = torch.cat(new_v + [torch.randn(2, KV, D, device=device).to(dtype)])
    md = AttentionMetadata(num_actual_tokens=int(qsl[-1]), max_query_len=max(q_lens),
                           max_seq_len=max(seq_lens), query_start_loc=qsl, seq_lens=sl,
                           block_table=bt, slot_mapping=slot_mapping,
                           is_decode_only=all(q == 1 for q in q_lens))
    backend = TritonAttentionBackend()
    impl = backend.make_impl(AttentionSpec(H, KV, D, D ** -0.5, dtype, block_size=block_size))
    ref_cache = kv_cache.clone()
    out = impl.forward(query, key, value, kv_cache, md)
    ref_reshape_and_cache(key, value, ref_cache[0], ref_cache[1], slot_mapping)
    ref = ref_paged_attention(query, ref_cache[0], ref_cache[1], qsl, sl, bt, D ** -0.5)
    assert T == key.shape[0]
    return out, ref, int(qsl[-1])


def test_backend_forward_writes_cache_then_attends():
    out, ref, n = _backend_step(MIXED_Q, MIXED_S, 4, 2, 32, 16, torch.float32, DEVICE)
    _close(out[:n], ref[:n], torch.float32)


def test_backend_capabilities():
    caps = TritonAttentionBackend.capabilities
    assert TritonAttentionBackend.name == "triton"
    assert caps.devices == ("cuda",) and caps.supports_cuda_graphs
    assert 64 in caps.head_sizes and 128 in caps.head_sizes and 256 in caps.head_sizes
    assert set(caps.dtypes) == {torch.float16, torch.bfloat16, torch.float32}


# ---------------------------------------------------------------------------------------------
# GPU: realistic shapes, compiled kernels
# ---------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(), reason="needs CUDA, compiled")
class TestGPU:
    def test_decode_64x2k_bf16(self):
        g = torch.Generator().manual_seed(1)
        seq = torch.randint(1500, 2600, (64,), generator=g).tolist()
        _check_attention([1] * 64, seq, 32, 8, 128, 16, torch.bfloat16)

    def test_mixed_prefill_chunk_decode(self):
        q = [512, 256, 1, 1, 1, 1, 300]
        s = [512, 3000, 2048, 17, 4000, 1, 300]
        _check_attention(q, s, 32, 8, 128, 16, torch.bfloat16)
        _check_attention(q, s, 28, 4, 128, 32, torch.float16)
        # decodes first, two launches
        _check_attention([1, 1, 1, 1, 512, 256, 300], [2048, 17, 4000, 1, 512, 3000, 300],
                         32, 8, 128, 16, torch.bfloat16, num_decode_reqs=4)

    @pytest.mark.parametrize("heads", [16, 32, 64])
    def test_prefill_tiles_by_head_group_and_length(self, heads):
        # Each prefill tile rule (QPK 2: 64 rows up to 1536 tokens, then 128 x 128; QPK 4 and 8:
        # 128 x 64 with 2 stages up to 2048 tokens, then 3) on both sides of its limit, with a
        # prefix for one request.
        for q in ([1536, 700, 100], [1537, 300], [2048, 1000], [2049, 1300]):
            s = [q[0]] + [n + 500 for n in q[1:]]
            _check_attention(q, s, heads, 8, 128, 64, torch.bfloat16)

    @pytest.mark.parametrize("D,dtype", [(64, torch.bfloat16), (256, torch.bfloat16),
                                         (128, torch.float32), (96, torch.float16)])
    def test_head_sizes_dtypes(self, D, dtype):
        _check_attention([200, 1, 1, 64], [700, 1000, 5, 64], 16, 4, D, 16, dtype)

    def test_split_kv_long_context(self):
        cfg = choose_config(2, 2, 32, 8, 128, 1, 16384, torch.bfloat16,
                            num_sms=torch.cuda.get_device_properties(0).multi_processor_count)
        assert cfg.num_splits > 1
        _check_attention([1, 1], [16384, 9000], 32, 8, 128, 16, torch.bfloat16)
        _check_attention([64], [16384], 32, 8, 128, 16, torch.bfloat16)   # chunk, long prefix

    def test_backend_forward(self):
        out, ref, n = _backend_step([300, 1, 1, 64], [300, 2000, 9, 1064], 32, 8, 128, 16,
                                    torch.bfloat16, "cuda")
        _close(out[:n], ref[:n], torch.bfloat16)

    def test_cuda_graph_replay_with_new_lengths(self):
        B, H, KV, D, bs = 8, 32, 8, 128, 16
        seq = [100, 2000, 3000, 5, 1, 700, 4095, 64]
        query, kv_cache, qsl, sl, bt = make_paged_batch([1] * B, seq, H, KV, D, bs,
                                                        torch.bfloat16, device="cuda")
        out = torch.empty_like(query)

        def step():
            unified_attention(query, kv_cache[0], kv_cache[1], qsl, sl, bt, 1, 4096,
                              D ** -0.5, out=out)
        step()                                   # compile outside capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        for shrink in (0, 50, 999):
            sl.copy_((torch.tensor(seq) - shrink).clamp(min=1).to(torch.int32))
            query.normal_()
            graph.replay()
            torch.cuda.synchronize()
            ref = ref_paged_attention(query, kv_cache[0], kv_cache[1], qsl, sl, bt, D ** -0.5)
            _close(out, ref, torch.bfloat16)


@triton.jit
def _qblock_probe(qsl_ptr, out_ptr, num_reqs, min_q_len, BLOCK_Q: tl.constexpr,
                  SCAN: tl.constexpr):
    row = tl.program_id(0)
    req, q_block = kernel_mod._find_qblock(qsl_ptr, num_reqs, row, min_q_len, BLOCK_Q, SCAN)
    tl.store(out_ptr + 2 * row, req)
    tl.store(out_ptr + 2 * row + 1, q_block)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("min_q_len,block_q", [(0, 16), (2, 16), (2, 64), (0, 1)])
def test_dense_qblock_numbering(seed, min_q_len, block_q):
    # Every q-block of every served request (q_len >= max(1, min_q_len)) gets exactly one grid
    # row of the host's bound T // BLOCK_Q + P, each request's last q-block first; the rows
    # after them get none. Scan chunks of 8 requests, so most batches take several.
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 40, (1,), generator=g))
    q_lens = torch.randint(0, 4, (n,), generator=g)
    q_lens = torch.where(torch.rand(n, generator=g) < 0.3, q_lens * 17, q_lens)
    qsl = torch.zeros(n + 1, dtype=torch.int32)
    qsl[1:] = q_lens.cumsum(0)
    T = int(qsl[-1])
    served = [i for i in range(n) if q_lens[i] >= max(1, min_q_len)]
    rows = max(1, T // block_q + min(n, T // max(1, min_q_len)))
    out = torch.empty(2 * rows, dtype=torch.int32, device=DEVICE)
    _qblock_probe[(rows,)](qsl.to(DEVICE), out, n, min_q_len, BLOCK_Q=block_q, SCAN=8)
    got = out.view(rows, 2).cpu().tolist()
    want = [[i, b] for i in served for b in reversed(range(-(-int(q_lens[i]) // block_q)))]
    assert len(want) <= rows
    assert got[:len(want)] == want
    assert all(b == -1 for _, b in got[len(want):])
