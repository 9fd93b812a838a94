"""Would overlapping one half-batch's attention with the other half-batch's GEMMs speed up a
large-batch decode step (NanoFlow-style nano-batches on two CUDA streams)?

    python3 benchmarks/overlap_probe.py --out $OUT/overlap.json
        [--config benchmarks/configs/llama3.1-8b] [--batch 512] [--context 640] [--layers 8]
        [--block-size 16] [--iters 20] [--carveouts 0,16,32] [--greens 40,48] [--tma]
    python3 benchmarks/overlap_probe.py --attn-sweep 0,32,48 --batch 1000 --block-size 64
    TRITON_INTERPRET=1 python3 benchmarks/overlap_probe.py --smoke      # CPU, tiny shapes

Why: at ~500 decode requests x ~640 tokens of context a Llama-3.1-8B step is ~24 ms: per layer
the attention (memory bound: the KV read, ~10 ms a step), then the GEMMs (compute bound, ~12
ms). Running half A's attention while half B's GEMMs run could hide much of the shorter one.

What: a stack of --layers decoder layers with random bf16 weights and a random paged KV cache
(distinct per layer, so neither is served from L2), one decode token per request at
seq_len = --context. Per layer: rms_norm -> qkv -> kvflow's paged attention (Triton) -> o ->
add + rms_norm -> gate|up -> silu*mul -> down -> add (rotary and the KV write are left out:
same cost in every schedule). The GEMMs are cuBLAS (F.linear). Each variant is one CUDA graph
of a whole step, replayed --iters times between CUDA events:
  serial              the full batch on one stream (today's schedule)
  serial_halves       two nano-batches of B/2, interleaved per layer, one stream: the same
                      kernels as `overlap` without concurrency (what halving M costs)
  overlap             the two nano-batches, attention on a second stream, everything else on
                      the capture stream; events only for each nano-batch's own chain, so
                      A's attention runs beside B's GEMMs and vice versa
  overlap_prio_gemm   `overlap` with the GEMM side on a high-priority stream (the priority is
  overlap_prio_attn   kept in the graph's kernel nodes), or the attention: equal priorities let
                      the kernel launched first take every SM, so the other waits for its tail
  overlap_carveout_N  `overlap` with the GEMMs told to leave N SMs to the attention
                      (torch._C._set_sm_carveout_experimental). That setting reaches cuBLASLt
                      only, so these variants also prefer cuBLASLt; N = 0 is their control
                      (cuBLASLt, full SM target)
  green_N, green2_N    SM partitions (CUDA green contexts, torch.cuda.green_contexts): the
                      attention on a stream of N SMs, the GEMMs under a carveout of N
                      (green_N) or also on a green stream of the other SMs (green2_N). Timed
                      eagerly (a green stream is another CUDA context than the capture
                      stream), against serial_eager; attn_only_smN / gemm_only_smM time each
                      side alone at B/2 on its share. (--greens N,...)
  attn_only, gemm_only the attention alone / the GEMM-side work alone, at B and B/2
  bounds              serial_sum = attn_only(B) + gemm_only(B); ideal_overlap =
                      max(2 attn_only(B/2), 2 gemm_only(B/2)): each stream still does both
                      nano-batches' work, so that is the best a two-stream pipeline can do
--tma: the schedules' attention is kvflow/kernels/decode_attention_tma.py (1 warp, 2 stages).
--attn-sweep N,...: instead of the schedules, decode attention alone at B/2 requests on N SMs
(0 = all) over tiles of the pointer kernel (first: the engine's own choice) and of the TMA
kernel: ms_per_layer, tb_s, gb_s_per_sm.
Fields: variant, batch (the components: the rows they ran), context, layers, ms_per_step (all
layers), ms_per_layer, speedup_vs_serial (serial ms / this ms); the two-nano-batch variants add
max_rel_diff (max |h - h_serial| / max |h_serial| of the final hidden states: same math, but
cuBLAS may pick other kernels at M = B/2, so small, not 0). One JSON line per variant on
stdout; --out gets them all with the device, versions and arguments.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
# Without a GPU the Triton attention runs in the interpreter, which must be chosen before
# triton is first imported (tests/conftest.py does the same).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kvflow.kernels.attention import unified_attention  # noqa: E402
from kvflow.kernels.decode_attention_tma import decode_attention_tma  # noqa: E402
from kvflow.layers import ops  # noqa: E402

SMOKE_CFG = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 intermediate_size=128, rms_norm_eps=1e-5)
SMOKE = dict(batch=4, context=20, layers=2, block_size=4, iters=1, carveouts=[])


class Model:
    """Random weights and KV cache of `layers` decoder layers, and the per-layer decode work of
    a nano-batch (`Chain`) split in its attention and its GEMM side."""

    def __init__(self, cfg: dict, layers: int, batch: int, context: int, block_size: int,
                 device: str, dtype=torch.bfloat16):
        torch.manual_seed(0)
        self.N, self.I = cfg["hidden_size"], cfg["intermediate_size"]
        self.H, self.KV = cfg["num_attention_heads"], cfg["num_key_value_heads"]
        self.D = cfg.get("head_dim") or self.N // self.H
        self.eps, self.context, self.L = cfg.get("rms_norm_eps", 1e-5), context, layers
        self.scale = self.D ** -0.5
        per_req = -(-context // block_size)
        N, I, H, KV, D = self.N, self.I, self.H, self.KV, self.D

        def rnd(*shape, std=0.02):
            return torch.randn(*shape, device=device, dtype=dtype) * std

        self.layers = [dict(w_qkv=rnd((H + 2 * KV) * D, N), w_o=rnd(N, H * D),
                            w_gu=rnd(2 * I, N), w_down=rnd(N, I),
                            ln1=1 + rnd(N, std=0.1), ln2=1 + rnd(N, std=0.1),
                            kv=rnd(2, batch * per_req, block_size, KV, D, std=1.0))
                       for _ in range(layers)]
        # Each request owns per_req blocks, shuffled so its reads are not one sequential sweep.
        self.block_table = torch.randperm(batch * per_req, device=device).view(
            batch, per_req).to(torch.int32)
        self.x = rnd(batch, N, std=1.0)          # the step's input hidden states
        self.device, self._meta = device, {}
        self.tma = False        # --tma: the TMA decode kernel instead of unified_attention
        self.tma_warps = 1

    def meta(self, rows: tuple[int, int]) -> dict:
        """Attention metadata of requests [r0, r1), built once: outside every captured step."""
        if rows not in self._meta:
            n, dev = rows[1] - rows[0], self.device
            self._meta[rows] = dict(
                qsl=torch.arange(n + 1, dtype=torch.int32, device=dev),
                seq_lens=torch.full((n,), self.context, dtype=torch.int32, device=dev),
                block_table=self.block_table[rows[0]:rows[1]].contiguous())
        return self._meta[rows]

    def pre(self, c: "Chain") -> None:
        """Layer 0's input norm and qkv."""
        c.residual = self.x[c.rows[0]:c.rows[1]]
        w = self.layers[0]
        c.qkv = F.linear(ops.rms_norm(c.residual, w["ln1"], self.eps), w["w_qkv"])

    def attention(self, c: "Chain", l: int) -> None:
        T = c.qkv.shape[0]
        q = c.qkv[:, :self.H * self.D].view(T, self.H, self.D)
        kv, m = self.layers[l]["kv"], c.meta
        if self.tma:
            c.attn = decode_attention_tma(q, kv[0], kv[1], m["seq_lens"], m["block_table"],
                                          self.scale, num_warps=self.tma_warps, num_stages=2)
        else:
            c.attn = unified_attention(q, kv[0], kv[1], m["qsl"], m["seq_lens"],
                                       m["block_table"], 1, self.context, self.scale)
        # Both cross streams: keeping them alive until the capture ends stops the allocator
        # from handing their memory to the other stream while it is still being read.
        c.keep += [c.qkv, c.attn]

    def gemm_side(self, c: "Chain", l: int) -> None:
        """Layer l after its attention, then layer l + 1's input norm and qkv."""
        w = self.layers[l]
        o = F.linear(c.attn.view(c.attn.shape[0], -1), w["w_o"])
        h, c.residual = ops.fused_add_rms_norm(o, c.residual, w["ln2"], self.eps)
        d = F.linear(ops.silu_and_mul(F.linear(h, w["w_gu"])), w["w_down"])
        if l + 1 < self.L:
            nxt = self.layers[l + 1]
            h, c.residual = ops.fused_add_rms_norm(d, c.residual, nxt["ln1"], self.eps)
            c.qkv = F.linear(h, nxt["w_qkv"])
        else:
            c.out = d + c.residual


class Chain:
    """One nano-batch's state through the step (rows [r0, r1) of the batch)."""

    def __init__(self, model: Model, rows: tuple[int, int]):
        self.rows, self.meta = rows, model.meta(rows)
        self.residual = self.qkv = self.attn = self.out = self.ev = None
        self.keep: list = []


class Streams:
    """Where work is issued: attention on `attn`, the rest on `gemm`, each defaulting to the
    current stream (the capture stream while capturing), from which the others fork and into
    which they join. With one stream, or off CUDA, every helper is a no-op and the work runs in
    issue order, which respects every dependency."""

    def __init__(self, attn=None, gemm=None):
        self.base = torch.cuda.current_stream() if torch.cuda.is_available() else None
        self.gemm = gemm if self.base is not None and gemm is not None else self.base
        self.attn = attn if self.base is not None and attn is not None else self.base
        self.side = [x for x in (self.gemm, self.attn) if x is not self.base]
        self.events: list = []
        for x in self.side:
            x.wait_stream(self.base)

    def on(self, s):
        return torch.cuda.stream(s) if s is not None else contextlib.nullcontext()

    def mark(self, s):
        """An event after the work issued to s so far (None when there is one stream)."""
        if self.attn is self.gemm:
            return None
        ev = torch.cuda.Event()
        ev.record(s)
        self.events.append(ev)
        return ev

    def wait(self, s, ev) -> None:
        if ev is not None:
            s.wait_event(ev)

    def join(self) -> None:
        for x in self.side:          # a capture must end on the stream it began on
            self.base.wait_stream(x)


def schedule(model: Model, parts: list[tuple[int, int]], streams=(None, None)):
    """Issue one step for the nano-batches `parts`: (their final hidden states, what must stay
    alive while the step is captured). Per layer all attentions are issued, then all GEMM
    sides, each waiting only on its own chain: with two streams the attention of one
    nano-batch runs beside the other's GEMMs."""
    st = Streams(*streams)
    chains = [Chain(model, p) for p in parts]
    for c in chains:
        with st.on(st.gemm):
            model.pre(c)
            c.ev = st.mark(st.gemm)
    for layer in range(model.L):
        for c in chains:
            with st.on(st.attn):
                st.wait(st.attn, c.ev)
                model.attention(c, layer)
                c.ev = st.mark(st.attn)
        for c in chains:
            with st.on(st.gemm):
                st.wait(st.gemm, c.ev)
                model.gemm_side(c, layer)
                c.ev = st.mark(st.gemm)
    st.join()
    return [c.out for c in chains], (st.events, [c.keep for c in chains])


def component(model: Model, c: Chain, kind: str) -> None:
    """All layers' attention alone (on layer 0's qkv), or all layers' GEMM-side work alone
    (layer 0's norm and qkv included, on a stale attention output)."""
    if kind == "attn":
        for layer in range(model.L):
            model.attention(c, layer)
        c.keep.clear()
    else:
        model.pre(c)
        for layer in range(model.L):
            model.gemm_side(c, layer)


def timed(fn, iters: int):
    """(fn's outputs, graph, ms per call): captured into a CUDA graph and replayed `iters`
    times between events; off CUDA one eager call under a wall clock (smoke only)."""
    if not torch.cuda.is_available():
        t0 = time.perf_counter()
        out = fn()
        return out, None, (time.perf_counter() - t0) * 1e3
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):      # warm-up: Triton compiles, cuBLAS picks its kernels
        fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn()
    for _ in range(3):
        g.replay()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(iters):
        g.replay()
    b.record()
    b.synchronize()
    return out, g, a.elapsed_time(b) / iters


def timed_eager(fn, iters: int):
    """(fn's outputs, None, ms per call) without a graph: green-context streams (below) belong
    to another CUDA context than the capture stream, so those variants and their serial
    control run eagerly. At >= 512 rows a layer's ~10 launches take far less host time than
    its ~1 ms of device work, so the queue stays ahead of the GPU."""
    for _ in range(2):                 # Triton compiles, cuBLAS picks its kernels
        fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(iters):
        out = fn()
    b.record()
    b.synchronize()
    return out, None, a.elapsed_time(b) / iters


def green_stream(num_sms: int):
    """((context, stream), None): a stream whose kernels run on at most num_sms SMs (a CUDA
    green context holding that SM partition; the driver rounds up to its granularity); the
    context must outlive the stream. (None, why) where torch or the driver cannot make one."""
    try:
        from torch.cuda import green_contexts as gcm
        if not getattr(gcm, "SUPPORTED", False):
            return None, "torch built without green contexts"
        dev = torch.cuda.current_device()
        try:
            ctx = gcm.GreenContext.create(num_sms=num_sms, device_id=dev)
        except TypeError:
            ctx = gcm.GreenContext.create(num_sms, dev)
        if hasattr(ctx, "Stream"):
            return (ctx, ctx.Stream()), None
        ctx.set_context()
        try:
            s = torch.cuda.Stream()
        finally:
            ctx.pop_context()
        return (ctx, s), None
    except Exception as e:  # noqa: BLE001 - a probe records why a variant could not run
        return None, f"{type(e).__name__}: {e}"


def rel_diff(outs: list, ref: torch.Tensor) -> float:
    got = torch.cat(outs).float()
    return float((got - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30))


def probe(cfg: dict, batch: int, context: int, layers: int, block_size: int, iters: int,
          carveouts: list[int], device: str, greens: tuple = (), tma: bool = False
          ) -> list[dict]:
    assert batch % 2 == 0, "two nano-batches of batch / 2"
    model = Model(cfg, layers, batch, context, block_size, device)
    model.tma = tma
    full, halves = [(0, batch)], [(0, batch // 2), (batch // 2, batch)]
    cuda = device == "cuda"
    # Priority -1 is above the default 0: its ready CTAs are dispatched first as SMs free up.
    low, high = (torch.cuda.Stream(), torch.cuda.Stream(priority=-1)) if cuda else (None, None)
    recs: list[dict] = []

    def rec(variant, ms, rows=batch, **extra):
        # t_end: wall clock at the end of the variant's timing (to line up with a GPU
        # clock / power log taken beside the run).
        r = dict(variant=variant, batch=rows, context=context, layers=layers,
                 ms_per_step=round(ms, 4), ms_per_layer=round(ms / layers, 4),
                 speedup_vs_serial=None, t_end=round(time.time(), 3), **extra)
        recs.append(r)
        return r

    out, _, serial_ms = timed(lambda: schedule(model, full), iters)
    ref = out[0][0].clone()
    del out
    rec("serial", serial_ms)
    variants = [("serial_halves", (None, None), None), ("overlap", (low, None), None)]
    if cuda:
        variants += [("overlap_prio_gemm", (low, high), None),
                     ("overlap_prio_attn", (high, None), None)]
        variants += [(f"overlap_carveout_{n}", (low, None), n) for n in carveouts]
    for name, streams, carve in variants:
        extra = {}
        if carve is not None:
            if not hasattr(torch._C, "_set_sm_carveout_experimental"):
                recs.append(dict(variant=name, note="carveout unsupported"))
                continue
            # The carveout is read when cuBLASLt is called, i.e. at capture: the graph keeps
            # the kernels chosen for (SMs - N). The plain cuBLAS path ignores it.
            prev = torch.backends.cuda.preferred_blas_library()
            torch.backends.cuda.preferred_blas_library("cublaslt")
            torch._C._set_sm_carveout_experimental(carve)
            extra = dict(carveout=carve, blas="cublaslt")
        try:
            out, _, ms = timed(lambda: schedule(model, halves, streams), iters)
        finally:
            if carve is not None:
                torch._C._set_sm_carveout_experimental(None)
                torch.backends.cuda.preferred_blas_library(prev)
        rec(name, ms, max_rel_diff=rel_diff(out[0], ref), **extra)
        del out
    if cuda and greens:
        recs += green_variants(model, full, halves, ref, iters, greens, rec)
    comp = {}
    for kind in ("attn", "gemm"):
        for n in (batch, batch // 2):
            c = Chain(model, (0, n))
            model.pre(c)                    # the attention's input, outside the timing
            c.attn = torch.zeros(n, model.H, model.D, dtype=model.x.dtype, device=device)
            ms = timed(lambda c=c, kind=kind: component(model, c, kind), iters)[2]
            comp[kind, n] = rec(f"{kind}_only", ms, rows=n)["ms_per_layer"]
    for r in recs:
        if r.get("ms_per_step") and not r["variant"].endswith("_only"):
            r["speedup_vs_serial"] = round(serial_ms / r["ms_per_step"], 3)
    h = batch // 2
    serial_sum = comp["attn", batch] + comp["gemm", batch]
    ideal = max(2 * comp["attn", h], 2 * comp["gemm", h])
    recs.append(dict(variant="bounds", batch=batch, context=context, layers=layers,
                     serial_sum_ms_per_layer=round(serial_sum, 4),
                     ideal_overlap_ms_per_layer=round(ideal, 4),
                     ideal_speedup_vs_serial=round(serial_ms / layers / ideal, 3)))
    return recs


def green_variants(model, full, halves, ref, iters, greens, rec) -> list[dict]:
    """SM-partitioned overlap: the attention on a green-context stream of N SMs, the GEMM side
    told by cuBLASLt's SM target to leave those N alone (green_N), or also confined to a
    green context of the other SMs (green2_N). Timed eagerly, against serial_eager. Records
    are appended through `rec`; variants that could not run are returned as notes."""
    notes: list[dict] = []
    _, _, base_ms = timed_eager(lambda: schedule(model, full), iters)
    rec("serial_eager", base_ms, eager=True)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    prev = torch.backends.cuda.preferred_blas_library()
    for n in greens:
        attn, why = green_stream(n)
        if attn is None:
            notes.append(dict(variant=f"green_{n}", note=why))
            continue
        both = [("green", None)]
        rest, why2 = green_stream(sms - n)
        both.append(("green2", rest) if rest is not None else ("green2", why2))
        # Each side alone on its share of the SMs, half the batch (what one pipeline stage
        # runs): attention on the green stream, the GEMM side under the carveout.
        h = (0, (full[0][1]) // 2)
        for kind in ("attn", "gemm"):
            c = Chain(model, h)
            model.pre(c)
            c.attn = torch.zeros(h[1], model.H, model.D, dtype=model.x.dtype,
                                 device=model.x.device)
            torch.backends.cuda.preferred_blas_library("cublaslt")
            torch._C._set_sm_carveout_experimental(n)
            try:
                s = attn[1] if kind == "attn" else torch.cuda.current_stream()
                s.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(s):
                    ms = timed_eager(lambda c=c, kind=kind: component(model, c, kind), iters)[2]
                torch.cuda.current_stream().wait_stream(s)
                rec(f"{kind}_only_sm{n if kind == 'attn' else sms - n}", ms, rows=h[1],
                    eager=True)
            finally:
                torch._C._set_sm_carveout_experimental(None)
                torch.backends.cuda.preferred_blas_library(prev)
                torch.cuda.synchronize()
        for name, gemm in both:
            if isinstance(gemm, str):
                notes.append(dict(variant=f"{name}_{n}", note=gemm))
                continue
            torch.backends.cuda.preferred_blas_library("cublaslt")
            torch._C._set_sm_carveout_experimental(n)
            try:
                streams = (attn[1], gemm[1] if gemm else None)
                out, _, ms = timed_eager(lambda: schedule(model, halves, streams), iters)
                r = rec(f"{name}_{n}", ms, max_rel_diff=rel_diff(out[0], ref), carveout=n,
                        eager=True)
                r["speedup_vs_serial_eager"] = round(base_ms / ms, 3)
            except Exception as e:  # noqa: BLE001
                notes.append(dict(variant=f"{name}_{n}", note=f"{type(e).__name__}: {e}"))
            finally:
                torch._C._set_sm_carveout_experimental(None)
                torch.backends.cuda.preferred_blas_library(prev)
                torch.cuda.synchronize()
    return notes


def attention_sweep(model: Model, rows: int, num_sms: int, iters: int) -> list[dict]:
    """Decode attention alone at `rows` requests on a green context of num_sms SMs, over
    one-token decode tiles: how much KV an SM reads per second when it has only a share of
    the GPU (all SMs: ~33 GB/s each reach the copy rate). Records: config, ms_per_layer,
    tb_s, gb_s_per_sm."""
    from kvflow.kernels.attention_config import AttentionConfig
    ctx = green_stream(num_sms)[0] if num_sms else None
    s = ctx[1] if ctx else torch.cuda.current_stream()
    c = Chain(model, (0, rows))
    model.pre(c)
    kv_bytes = rows * model.context * model.KV * model.D * 2 * model.x.element_size()

    def all_layers(attend):
        def run():
            for layer in range(model.L):
                kv, m = model.layers[layer]["kv"], c.meta
                q = c.qkv[:, :model.H * model.D].view(rows, model.H, model.D)
                attend(q, kv, m)
        return run

    cases = []     # (variant, tile fields of its record, one pass over the layers)
    for bn, w, st in [(None, None, None), (64, 2, 2), (64, 4, 2), (64, 4, 3), (128, 4, 2), (128, 4, 3),
                      (128, 8, 2), (32, 2, 3), (32, 4, 4), (64, 8, 3), (256, 8, 2)]:
        # (None, ...): the engine's own choice (choose_config: split-KV below ~2 programs an
        # SM, 2 or 4 warps); the others force one tile without splits.
        cfg = None if bn is None else AttentionConfig(
            block_m=16, block_q=1, block_n=bn, num_warps=w, num_stages=st, num_splits=1,
            direct=True)
        cases.append(("attn_sweep", dict(block_n=bn, num_warps=w, num_stages=st), all_layers(
            lambda q, kv, m, cfg=cfg: unified_attention(
                q, kv[0], kv[1], m["qsl"], m["seq_lens"], m["block_table"], 1, model.context,
                model.scale, config=cfg))))
    # The TMA kernel: its tile is one KV block (--block-size), so only warps and stages vary.
    for w, st in [(4, 3), (2, 2), (2, 3), (2, 4), (1, 2), (1, 3), (1, 4)]:
        cases.append(("attn_sweep_tma", dict(num_warps=w, num_stages=st), all_layers(
            lambda q, kv, m, w=w, st=st: decode_attention_tma(
                q, kv[0], kv[1], m["seq_lens"], m["block_table"], model.scale,
                num_stages=st, num_warps=w))))
    recs = []
    for variant, tile, run in cases:
        s.wait_stream(torch.cuda.current_stream())
        try:
            with torch.cuda.stream(s):
                ms = timed_eager(run, iters)[2] / model.L
        except Exception as e:  # noqa: BLE001 - e.g. shared memory of a too-large tile
            recs.append(dict(variant=variant, sms=num_sms, **tile,
                             note=f"{type(e).__name__}: {str(e)[:160]}"))
            continue
        finally:
            torch.cuda.current_stream().wait_stream(s)
        recs.append(_sweep_rec(variant, num_sms, rows, kv_bytes, ms, **tile))
    return recs


def _sweep_rec(variant, num_sms, rows, kv_bytes, ms, **cfg) -> dict:
    tb = kv_bytes / ms / 1e9
    sms = num_sms or torch.cuda.get_device_properties(0).multi_processor_count
    return dict(variant=variant, sms=num_sms or "all", rows=rows, **cfg,
                ms_per_layer=round(ms, 4), tb_s=round(tb, 3),
                gb_s_per_sm=round(tb * 1e3 / sms, 1))


def smoke() -> list[dict]:
    """The same code paths on CPU with tiny shapes (attention in Triton's interpreter)."""
    return probe(SMOKE_CFG, device="cpu", **SMOKE)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=os.path.join(ROOT, "benchmarks/configs/llama3.1-8b"))
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--context", type=int, default=640,
                   help="tokens in the cache per request, the new one included")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--carveouts", default="0,16,32")
    p.add_argument("--greens", default="",
                   help="SM counts N for the green-context variants (attention on N SMs)")
    p.add_argument("--attn-sweep", default="",
                   help="SM counts (0 = all) to sweep decode-attention tiles on, B/2 rows; "
                        "skips the schedules")
    p.add_argument("--tma", action="store_true",
                   help="schedules use the TMA decode kernel (1 warp, 2 stages)")
    p.add_argument("--out")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, checks only")
    args = p.parse_args()
    if args.smoke:
        recs = smoke()
    else:
        if not torch.cuda.is_available():
            p.error("needs a CUDA device (or --smoke)")
        with open(os.path.join(args.config, "config.json")) as f:
            cfg = json.load(f)
        if args.attn_sweep:
            model = Model(cfg, args.layers, args.batch, args.context, args.block_size, "cuda")
            recs = [r for n in args.attn_sweep.split(",") if n
                    for r in attention_sweep(model, args.batch // 2, int(n), args.iters)]
        else:
            recs = probe(cfg, args.batch, args.context, args.layers, args.block_size,
                         args.iters, [int(n) for n in args.carveouts.split(",") if n], "cuda",
                         tuple(int(n) for n in args.greens.split(",") if n), args.tma)
    for r in recs:
        print(json.dumps(r), flush=True)
    if args.out:
        import triton
        meta = dict(device=torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
                    torch=torch.__version__, triton=triton.__version__, args=vars(args),
                    pdl=os.environ.get("KVFLOW_PDL", "1") != "0", records=recs)
        with open(args.out, "w") as f:
            json.dump(meta, f, indent=1)
    diffs = [r["max_rel_diff"] for r in recs if "max_rel_diff" in r]
    if args.smoke and not all(d < 1e-2 for d in diffs):
        print(f"smoke: schedules disagree: {diffs}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
