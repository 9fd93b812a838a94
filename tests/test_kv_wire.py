"""KV wire format and layout conversion (kvflow/kv_transfer): byte-identical round trips for every
supported layout, block-size and TP conversion, handshake rejection, corruption detection, and
layouts that come from configs only (tensors are checked against them, never read for them)."""
from __future__ import annotations

import dataclasses
import itertools
import json

import pytest
import torch

from kvflow.config import CacheConfig, ModelConfig, ParallelConfig
from kvflow.kv_transfer import (AXES, ENGINE_AXIS_ORDER, KVLayout, KVLayoutError, KVWireError,
                                decode_transfer, encode_transfer, gather_blocks, handshake,
                                receive, scatter_blocks, send, sender_ranks_for)
from kvflow.kv_transfer import wire

ALL_ORDERS = list(itertools.permutations(AXES))   # the supported set: every permutation
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def _one_thread():
    # The tensors here are tiny; intra-op threads only add wake-up latency, which on shared
    # cores made some indexing ops 100x slower (15 ms instead of 0.1 ms). Restored after.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def mcfg(**over) -> ModelConfig:
    base = dict(model="/m", architecture="LlamaForCausalLM", model_type="llama", hidden_size=64,
                intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, vocab_size=100, rms_norm_eps=1e-5,
                rope_theta=10000.0, rope_scaling=None, max_position_embeddings=128,
                tie_word_embeddings=False, attention_bias=False, dtype=torch.float32,
                max_model_len=128, eos_token_ids=(0,), bos_token_id=1, hf_config={})
    base.update(over)
    return ModelConfig(**base)


def layout(block_size=16, tp=1, rank=0, order=ENGINE_AXIS_ORDER, **model) -> KVLayout:
    return KVLayout.from_config(mcfg(**model), CacheConfig(block_size=block_size),
                                ParallelConfig(tensor_parallel_size=tp, rank=rank),
                                axis_order=order)


def _perm(lay):                       # layout dims -> canonical (kv, block, token, head, dim)
    return [lay.axis_order.index(a) for a in AXES]


def make_caches(lay: KVLayout, num_blocks: int, gen, canon=None):
    """Per-layer caches in `lay`'s axis order. Random BITS (NaN patterns included): equality is
    checked on raw bytes. `canon`: per-layer canonical tensors to lay out instead."""
    out = []
    for i in range(lay.num_layers):
        if canon is None:
            shape = (2, num_blocks, lay.block_size, lay.kv_heads_per_rank, lay.head_dim)
            c = torch.randint(0, 256, shape + (lay.itemsize,), generator=gen, dtype=torch.uint8)
            c = c.view(lay.torch_dtype).squeeze(-1)
        else:
            c = canon[i]
        out.append(c.permute([AXES.index(a) for a in lay.axis_order]).contiguous())
    return out


def tokens(caches, lay, block_ids, n):
    """Reference reader: per layer (2, n, heads, dim) as raw bytes, via the block table."""
    res = []
    for c in caches:
        c = c.permute(_perm(lay))[:, list(block_ids)]
        c = c.reshape(2, -1, *c.shape[3:])[:, :n]
        res.append(c.contiguous().view(torch.uint8))
    return res


def assert_same_tokens(a, b):
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert torch.equal(x, y), f"layer {i} differs"


# ------------------------------------------------------------------------ layout
def test_layout_from_config_and_dict_round_trip():
    lay = layout(block_size=32, tp=2, rank=1, dtype=torch.bfloat16)
    assert (lay.num_layers, lay.num_kv_heads, lay.kv_heads_per_rank, lay.head_dim) == (2, 2, 1, 8)
    assert (lay.dtype, lay.kv_cache_dtype, lay.block_size) == ("bfloat16", "bfloat16", 32)
    assert lay.axis_order == ("kv", "block", "token", "head", "dim") and lay.head_range == (1, 2)
    back = KVLayout.from_dict(json.loads(json.dumps(lay.to_dict())))
    assert back == lay
    assert lay.cache_shape(5) == (2, 5, 32, 1, 8)


def test_fingerprint_covers_kv_determining_fields_only():
    fp = layout().fingerprint
    assert layout(max_model_len=64, model="/elsewhere").fingerprint == fp   # capacity, path
    for change in (dict(rope_theta=5e5), dict(vocab_size=101), dict(hidden_size=128),
                   dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}),
                   dict(hf_config={"sliding_window": 64}), dict(dtype=torch.float16)):
        assert layout(**change).fingerprint != fp, change
    ident = KVLayout.from_config(mcfg(), CacheConfig(), ParallelConfig(), identity="weights-v2")
    assert ident.fingerprint != fp


def test_from_dict_is_strict():
    d = layout().to_dict()
    with pytest.raises(KVLayoutError, match="unknown keys"):
        KVLayout.from_dict({**d, "extra": 1})
    with pytest.raises(KVLayoutError, match="axis_order"):
        KVLayout.from_dict({**d, "axis_order": ["kv", "block", "token", "head", "head"]})
    with pytest.raises(KVLayoutError, match="kv_heads_per_rank"):
        KVLayout.from_dict({**d, "kv_heads_per_rank": 1})
    with pytest.raises(KVLayoutError, match="tp_rank"):
        KVLayout.from_dict({**d, "tp_rank": 3})


# ------------------------------------------------------------------------ round trips
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("block_size", [8, 16, 32])
def test_round_trip_byte_identical_every_axis_order(dtype, block_size):
    gen = torch.Generator().manual_seed(block_size)
    for order, partial in itertools.product(ALL_ORDERS, (False, True)):
        lay = layout(block_size=block_size, order=order, dtype=dtype)
        n = 3 * block_size - (block_size // 2 + 1 if partial else 0)
        src = make_caches(lay, 6, gen)
        dst = make_caches(lay, 6, gen)
        before = [c.clone() for c in dst]
        s_ids, r_ids = [4, 0, 2], [1, 5, 3]
        buf = send(src, s_ids, n, lay, "req-1")
        t = receive(buf, dst, r_ids, lay)
        assert (t.request_id, t.num_tokens, t.layout) == ("req-1", n, lay)
        assert_same_tokens(tokens(dst, lay, r_ids, n), tokens(src, lay, s_ids, n))
        # Payload re-gathered from the receiver is the same bytes (tail slots zeroed both times).
        assert gather_blocks(dst, r_ids, n, lay) == bytes(t.payload), order
        # Nothing outside the request's token slots was written.
        untouched = [0, 2, 4]
        assert_same_tokens(tokens(dst, lay, untouched, 3 * block_size),
                           tokens(before, lay, untouched, 3 * block_size))
        if partial:
            tail = tokens(dst, lay, r_ids, 3 * block_size)
            tail0 = tokens(before, lay, r_ids, 3 * block_size)
            assert_same_tokens([x[:, n:] for x in tail], [x[:, n:] for x in tail0])


@pytest.mark.parametrize("bs_s,bs_r", [(16, 32), (32, 8), (8, 16), (16, 16)])
@pytest.mark.parametrize("n", [1, 31, 64, 77])
def test_block_size_conversion_exact_per_token(bs_s, bs_r, n):
    gen = torch.Generator().manual_seed(n)
    s_lay = layout(block_size=bs_s, dtype=torch.bfloat16)
    # The receiver also uses another axis order: conversions compose.
    r_lay = layout(block_size=bs_r, dtype=torch.bfloat16, order=("block", "kv", "head", "token", "dim"))
    nb_s, nb_r = s_lay.num_blocks_for(n), r_lay.num_blocks_for(n)
    src = make_caches(s_lay, nb_s + 2, gen)
    dst = make_caches(r_lay, nb_r + 3, gen)
    s_ids = list(range(nb_s + 2))[::-1][:nb_s]
    r_ids = list(range(1, nb_r + 1))[::-1]
    assert "block_size" in " ".join(r_lay.conversions(s_lay)) or bs_s == bs_r
    receive(send(src, s_ids, n, s_lay, "r"), dst, r_ids, r_lay)
    assert_same_tokens(tokens(dst, r_lay, r_ids, n), tokens(src, s_lay, s_ids, n))


def _tp_reference(num_kv_heads, nb, gen, dtype=torch.float16):
    """The tp=1 layout and its full-head caches (engine axis order == canonical order)."""
    full_lay = layout(num_key_value_heads=num_kv_heads, num_attention_heads=4, dtype=dtype)
    return full_lay, make_caches(full_lay, nb, gen)


@pytest.mark.parametrize("kv_heads,tp", [(4, 2), (2, 2), (2, 4), (1, 2)])
def test_tp_many_to_one_and_one_to_many_exact(kv_heads, tp):
    gen = torch.Generator().manual_seed(tp)
    n, ids = 37, [2, 0, 1]
    one, full = _tp_reference(kv_heads, 4, gen)
    ranks = [layout(tp=tp, rank=r, num_key_value_heads=kv_heads, num_attention_heads=4,
                    dtype=torch.float16) for r in range(tp)]
    rank_caches = [[c[:, :, :, slice(*lay.head_range)].contiguous() for c in full] for lay in ranks]

    # tp -> 1: the receiver pulls from the ranks sender_ranks_for names, one scatter each.
    need = sender_ranks_for(one, tp)
    assert sorted({h for r in need for h in range(*ranks[r].head_range)}) == list(range(kv_heads))
    dst = make_caches(one, 4, gen)
    for r in need:
        receive(send(rank_caches[r], ids, n, ranks[r], "x"), dst, [3, 1, 0], one)
    assert_same_tokens(tokens(dst, one, [3, 1, 0], n), tokens(full, one, ids, n))

    # 1 -> tp: every receiver rank takes its slice from the one sender.
    buf = send(full, ids, n, one, "y")
    for lay, ref in zip(ranks, rank_caches):
        assert sender_ranks_for(lay, 1) == [0]
        d = make_caches(lay, 4, gen)
        receive(buf, d, [1, 2, 3], lay)
        assert_same_tokens(tokens(d, lay, [1, 2, 3], n), tokens(ref, lay, ids, n))


def test_tp_rank_without_overlap_is_refused():
    s = layout(tp=2, rank=0)
    r = layout(tp=2, rank=1)
    with pytest.raises(KVLayoutError, match=r"tp_rank: .*no overlap"):
        handshake(r, s.to_dict())


# ------------------------------------------------------------------------ handshake rejection
@pytest.mark.parametrize("change,field", [
    (dict(vocab_size=200), "fingerprint"), (dict(dtype=torch.bfloat16), "dtype"),
    (dict(head_dim=16), "head_dim"), (dict(num_hidden_layers=3), "num_layers"),
    (dict(num_key_value_heads=4), "num_kv_heads")])
def test_handshake_rejects_mismatch_naming_field(change, field):
    recv = layout()
    sender = layout(**change)
    with pytest.raises(KVLayoutError, match=rf"\b{field}: "):
        handshake(recv, sender.to_dict())
    assert any(r.startswith(field + ":") for r in recv.compatibility(sender))


def test_convertible_differences_are_not_blocking():
    a = layout(block_size=16)
    b = layout(block_size=32, tp=2, rank=1, order=("block", "kv", "token", "head", "dim"))
    assert a.compatibility(b) == [] and len(a.conversions(b)) == 3


def test_kv_scales_mismatch_blocks():
    a = KVLayout.from_config(mcfg(), CacheConfig(), ParallelConfig(), kv_scales=[(1.0, 1.0)] * 2)
    b = dataclasses.replace(a, kv_scales=((1.0, 1.0), (0.5, 1.0)))
    assert any(r.startswith("kv_scales:") for r in a.compatibility(b))


# ------------------------------------------------------------------------ corruption
def _transfer(num_layers=3, checksum=None):
    lay = layout(num_hidden_layers=num_layers)
    gen = torch.Generator().manual_seed(0)
    caches = make_caches(lay, 4, gen)
    return lay, caches, send(caches, [0, 1, 2], 40, lay, "req", checksum=checksum)


def test_truncated_payload_names_the_layer():
    lay, _, buf = _transfer()
    per = lay.layer_nbytes(40)
    payload_start = len(buf) - 3 * per
    with pytest.raises(KVWireError, match=r"truncated: layer 1 has 100 of"):
        decode_transfer(buf[:payload_start + per + 100])
    with pytest.raises(KVWireError, match=r"truncated: layer 2 has 0 of"):
        decode_transfer(buf[:payload_start + 2 * per])
    with pytest.raises(KVWireError, match=r"truncated: header"):
        decode_transfer(buf[:40])
    with pytest.raises(KVWireError, match=r"truncated: .*prefix"):
        decode_transfer(buf[:5])
    with pytest.raises(KVWireError, match="trailing"):
        decode_transfer(buf + b"\0")


@pytest.mark.parametrize("algo", ["blake2b_128", "xxh3_128"])
def test_bit_flip_names_the_layer(algo):
    if algo == "xxh3_128" and wire.xxhash is None:
        with pytest.raises(KVWireError, match="xxhash"):
            _transfer(checksum=algo)
        return
    lay, _, buf = _transfer(checksum=algo)
    per = lay.layer_nbytes(40)
    for layer in range(3):
        bad = bytearray(buf)
        bad[len(buf) - (3 - layer) * per + 7] ^= 0x10
        with pytest.raises(KVWireError, match=rf"corrupt layer {layer}: {algo}"):
            decode_transfer(bytes(bad))
    assert decode_transfer(buf).checksum == algo


def test_header_corruption_and_bad_magic():
    _, _, buf = _transfer()
    bad = bytearray(buf)
    bad[20] ^= 0x01                                  # inside the JSON header
    with pytest.raises(KVWireError, match="corrupt header"):
        decode_transfer(bytes(bad))
    with pytest.raises(KVWireError, match="magic"):
        decode_transfer(b"XXXX" + buf[4:])


def test_header_lengths_are_checked_against_the_layout():
    """A consistent-looking header whose lengths disagree with its layout is refused."""
    lay, caches, _ = _transfer()
    payload = gather_blocks(caches, [0, 1, 2], 40, lay)
    buf = encode_transfer(lay, "r", 40, payload)
    hlen = wire._PREFIX.unpack(buf[:wire._PREFIX.size])[3]
    h = json.loads(buf[wire._PREFIX.size:wire._PREFIX.size + hlen])
    h["layer_nbytes"][1] += 2
    hb = json.dumps(h).encode()
    head = wire._PREFIX.pack(wire.MAGIC, wire.VERSION, 0, len(hb)) + hb
    forged = head + wire.hashlib.blake2b(head, digest_size=16).digest() + payload
    with pytest.raises(KVWireError, match=r"layer 1: header says"):
        decode_transfer(forged)


# ------------------------------------------------------------------------ config, not shapes
def test_layout_never_read_from_tensors_shape_mismatch_is_an_error():
    lay = layout(block_size=16)                     # configs say 16-token blocks
    gen = torch.Generator().manual_seed(1)
    wrong_bs = make_caches(layout(block_size=32), 4, gen)          # tensors hold 32
    with pytest.raises(KVLayoutError, match=r"shape mismatch: sender layer 0 .*\(2, 'num_blocks', 16, 2, 8\)"):
        gather_blocks(wrong_bs, [0, 1], 20, lay)
    good = make_caches(lay, 4, gen)
    payload = gather_blocks(good, [0, 1], 20, lay)
    with pytest.raises(KVLayoutError, match="shape mismatch: receiver layer 0"):
        scatter_blocks(wrong_bs, [0, 1], payload, lay, lay, num_tokens=20)
    # Same number of elements, heads and head_dim swapped: must not be silently reshaped.
    swapped = [c.reshape(2, 4, 16, 8, 2).contiguous() for c in good]
    with pytest.raises(KVLayoutError, match="shape mismatch"):
        scatter_blocks(swapped, [0, 1], payload, lay, lay, num_tokens=20)
    # The axis order is the layout's too: an HND tensor under an NHD layout is refused.
    hnd = [c.permute(0, 1, 3, 2, 4).contiguous() for c in good]
    with pytest.raises(KVLayoutError, match="shape mismatch"):
        gather_blocks(hnd, [0, 1], 20, lay)
    with pytest.raises(KVLayoutError, match="kv_cache_dtype"):
        gather_blocks([c.half() for c in good], [0, 1], 20, lay)
    with pytest.raises(KVLayoutError, match="num_layers"):
        gather_blocks(good[:1], [0, 1], 20, lay)


def test_block_ids_and_payload_length_validated():
    lay = layout(block_size=16)
    gen = torch.Generator().manual_seed(2)
    caches = make_caches(lay, 4, gen)
    with pytest.raises(KVLayoutError, match="block_ids: sender got 1 block ids"):
        gather_blocks(caches, [0], 20, lay)
    with pytest.raises(KVLayoutError, match=r"block_ids: .*\[0, 4\)"):
        gather_blocks(caches, [0, 9], 20, lay)
    payload = gather_blocks(caches, [0, 1], 20, lay)
    with pytest.raises(KVLayoutError, match="distinct"):
        scatter_blocks(caches, [2, 2], payload, lay, lay, num_tokens=20)
    with pytest.raises(KVWireError, match="payload: .* imply"):
        scatter_blocks(caches, [2, 3], payload[:-2], lay, lay, num_tokens=20)


# ------------------------------------------------------------------------ the engine's own caches
@pytest.mark.parametrize("block_size", [8, 32])
def test_layout_from_engine_configs_describes_its_caches(tiny_llama, make_llm, block_size):
    """The layout built from a real engine's configs fits the caches that engine allocated, and
    its KV survives a round trip into a cache with another block size and axis order."""
    llm = make_llm(tiny_llama[1], block_size=block_size)
    runner = llm.llm_engine.executor.worker.runner
    cfg = runner.config
    lay = KVLayout.from_config(cfg.model, cfg.cache, cfg.parallel)
    caches = runner.kv_caches
    n = 2 * block_size + 3
    gen = torch.Generator().manual_seed(3)
    for c in caches:       # fill like a forward pass would: any bytes will do
        c.copy_(torch.randn(c.shape, generator=gen, dtype=c.dtype))
    ids = [5, 1, 3]
    other = KVLayout.from_config(cfg.model, CacheConfig(block_size=16), cfg.parallel,
                                 axis_order=("block", "kv", "head", "token", "dim"))
    dst = make_caches(other, other.num_blocks_for(n) + 1, gen)
    r_ids = list(range(other.num_blocks_for(n)))[::-1]
    receive(send(caches, ids, n, lay, "e"), dst, r_ids, other)
    assert_same_tokens(tokens(dst, other, r_ids, n), tokens(caches, lay, ids, n))
