"""Compile kvflow's decode-path Triton kernels for sm_90 without a GPU (Triton's frontend,
its LLVM/PTX pipeline and the bundled ptxas): catches what the CPU interpreter accepts but the
compiler rejects (a plain global read inside a kernel, an invalid layout, a tile that does not
fit) before a device run does. Run as a script (TRITON_INTERPRET must be unset):

    python3 -m tests.compile_sm90          # exit 1 and the errors if any kernel fails
"""
from __future__ import annotations

import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)


def _sig(args: dict, constexprs: dict) -> dict:
    return {**args, **{k: "constexpr" for k in constexprs}}


def cases():
    """(kernel, runtime-arg types, constexprs, options) for the configurations serving uses."""
    from kvflow.kernels import argmax as am
    from kvflow.kernels import decode_inputs as di
    from kvflow.kernels import decode_order as do
    from kvflow.kernels import moe_routing as mr
    from kvflow.kernels import qk_rope_cache as qr
    from kvflow.kernels import sampling as sp
    from kvflow.kernels import skinny_gemm as sg
    import torch
    pdl = dict(launch_pdl=True)
    out = []
    a = {"x_ptr": "*fp32", "val_ptr": "*fp32", "idx_ptr": "*i32", "V": "i32",
         "stride_xb": "i32", "num_chunks": "i32"}
    out.append((am._argmax_chunks_kernel, a, dict(CHUNK=8192, USE_PDL=True), dict(num_warps=8)))
    a = {"val_ptr": "*fp32", "idx_ptr": "*i32", "out_ptr": "*i64", "num_chunks": "i32"}
    out.append((am._argmax_final_kernel, a, dict(NC_PAD=128, USE_PDL=True), dict(num_warps=4)))
    a = {"x_ptr": "*bf16", "max_ptr": "*fp32", "sum_ptr": "*fp32", "nan_ptr": "*i32",
         "temp_ptr": "*fp32", "V": "i32", "stride_xb": "i32", "num_chunks": "i32"}
    for chunk, warps in ((1024, 4), (4096, 4)):
        out.append((sp._sample_chunks_kernel, a, dict(CHUNK=chunk, USE_PDL=True),
                    dict(num_warps=warps)))
        pa = dict(a, out_ptr="*i64", seed="i32")
        out.append((sp._sample_pick_kernel, pa,
                    dict(CHUNK=chunk, NC_PAD=256 if chunk == 1024 else 64, USE_PDL=True),
                    dict(num_warps=warps)))
    out.append((sp._sample_pick_kernel, dict(pa, u_ptr="*fp32"),      # given uniforms (tests)
                dict(CHUNK=4096, NC_PAD=64, USE_PDL=True, HAS_U=True), dict(num_warps=4)))
    a = {"stage_ptr": "*i64", "last_ptr": "*i64", "ids_ptr": "*i64", "pos_ptr": "*i64",
         "slot_ptr": "*i64", "lens_ptr": "*i32", "bs": "i32", "n": "i32"}
    out.append((di._decode_inputs_kernel, a, dict(BLOCK=512, USE_PDL=True), dict(num_warps=4)))
    a = {"lens_ptr": "*i32", "order_ptr": "*i32", "n": "i32"}
    for block, warps in ((256, 4), (4096, 8)):
        out.append((do._longest_first_kernel, a, dict(BLOCK=block, USE_PDL=True),
                    dict(num_warps=warps)))
    a = {"x_ptr": "*bf16", "w_ptr": "*bf16", "logits_ptr": "*fp32", "ticket_ptr": "*i32",
         "weights_ptr": "*fp32", "ids_ptr": "*i64", "num_tokens": "i32", "num_experts": "i32",
         "H": "i32", "stride_xt": "i32", "stride_we": "i32"}
    for t, e, h, k in [(1, 8, 4096, 2), (32, 8, 4096, 2), (1, 128, 2048, 8)]:   # Mixtral, Qwen3-MoE
        cfg = mr.router_topk_config(t, e, h, torch.bfloat16)
        warps = cfg.pop("num_warps")
        c = dict(TOP_K=k, K_PAD=triton.next_power_of_2(k), RENORMALIZE=True, SIGMOID=False,
                 SPLIT=cfg["E_PAD"] > cfg["BLOCK_E"], IEEE=False, USE_PDL=True, **cfg)
        out.append((mr._router_topk_kernel, a, c, dict(num_warps=warps)))
    a = {"x_ptr": "*bf16", "w_ptr": "*bf16", "b_ptr": "*bf16", "out_ptr": "*bf16", "M": "i32",
         "N": "i32", "K": "i32", "K_PER_SPLIT": "i32", "stride_xm": "i32", "stride_wn": "i32"}
    for dot, bm, bn, bk, silu in [(False, 1, 8, 1024, False), (False, 1, 8, 1024, True),
                                  (True, 16, 64, 128, True), (True, 128, 64, 128, False),
                                  (True, 256, 64, 64, True)]:
        c = dict(HAS_BIAS=False, USE_DOT=dot, DEFER=False, EVEN_K=True, IEEE=False, BLOCK_M=bm,
                 BLOCK_N=bn, BLOCK_K=bk, SILU_MUL=silu, USE_PDL=True)
        out.append((sg._skinny_gemm_kernel, a, c, dict(num_warps=4, num_stages=3)))
    # the folded RMSNorm's producer (o / down) and consumer (q/k/v GEMV, gate/up dot) halves
    fa = dict(a, r_ptr="*bf16", h_ptr="*bf16", g_ptr="*bf16", sq_ptr="*fp32", n_sq="i32",
              inv_k="fp32", eps="fp32")
    for dot, bm, bn, bk, silu, mode in [(False, 1, 8, 1024, False, "add"),
                                        (False, 1, 8, 1024, True, "add"),
                                        (False, 1, 8, 512, False, "scale"),
                                        (True, 16, 64, 128, False, "scale")]:
        c = dict(HAS_BIAS=False, USE_DOT=dot, DEFER=False, EVEN_K=True, IEEE=False, BLOCK_M=bm,
                 BLOCK_N=bn, BLOCK_K=bk, SILU_MUL=silu, USE_PDL=True,
                 ADD_NORM=mode == "add", ROW_SCALE=mode == "scale", SQ_PAD=512)
        out.append((sg._skinny_gemm_kernel, fa, c, dict(num_warps=4, num_stages=3)))
    # gate | up with silu(gate) * up in the epilogue: Llama's dot form, Qwen3's folded GEMV
    for dot, bm, bn, bk, mode in [(True, 16, 32, 128, None), (False, 1, 4, 512, "scale")]:
        c = dict(HAS_BIAS=False, USE_DOT=dot, DEFER=False, EVEN_K=True, IEEE=False, BLOCK_M=bm,
                 BLOCK_N=bn, BLOCK_K=bk, SILU_MUL=False, USE_PDL=True, GLU=True,
                 ROW_SCALE=mode == "scale", SQ_PAD=512)
        out.append((sg._skinny_gemm_kernel, fa, c, dict(num_warps=2, num_stages=3)))
    a = {n: "*bf16" for n in ("q_ptr", "k_ptr", "v_ptr")}
    a.update({"pos_ptr": "*i64", "cs_ptr": "*fp32", "qw_ptr": "*bf16", "kw_ptr": "*bf16",
              "out_ptr": "*bf16", "k_cache_ptr": "*bf16", "v_cache_ptr": "*bf16",
              "slot_ptr": "*i64", "k_scale_ptr": "*fp32", "v_scale_ptr": "*fp32",
              "n_slots": "i32", "eps": "fp32"})
    a.update({n: "i32" for n in ("stride_qt", "stride_qh", "stride_kt", "stride_kh", "stride_vt",
                                 "stride_vh", "stride_ot", "stride_oh", "stride_cs", "stride_cb",
                                 "stride_ct", "stride_ch")})
    c = dict(NUM_Q=16, NUM_KV=8, HEAD=128, HEAD_PAD=128, HALF=64, HALF_PAD=64, PASS_PAD=1,
             BLOCK_HQ=16, BLOCK_HK=8, BLOCK_SIZE=16, NQ_CHUNKS=1, HAS_PASS=False, IS_NEOX=True,
             HAS_NORM=True, FP8=False, USE_PDL=True)
    out.append((qr._qk_norm_rope_cache_kernel, a, c, dict(num_warps=4)))
    from kvflow.kernels import attention as at
    a = {n: "*bf16" for n in ("q_ptr", "k_cache_ptr", "v_cache_ptr", "out_ptr")}
    a.update({"part_ptr": "*fp32", "m_ptr": "*fp32", "l_ptr": "*fp32", "cnt_ptr": "*i32",
              "qsl_ptr": "*i32", "seq_lens_ptr": "*i32", "bt_ptr": "*i32", "starts_ptr": "*i32",
              "k_scale_ptr": "*fp32", "v_scale_ptr": "*fp32", "qk_scale": "fp32",
              "num_reqs": "i32", "num_splits": "i32", "min_q_len": "i32"})
    a.update({n: "i32" for n in ("stride_qt", "stride_qh", "stride_ot", "stride_oh", "stride_pt",
                                 "stride_ph", "stride_mt", "stride_mh", "stride_cb", "stride_ct",
                                 "stride_ch", "stride_bt")})
    for split, prefetch in [(True, True), (False, True), (True, False)]:   # Llama-3.1-8B decode
        c = dict(QPK=4, QPK_PAD=4, HEAD=128, HEAD_PAD=128, BLOCK_SIZE=16, BLOCK_M=16, BLOCK_Q=1,
                 BLOCK_N=64, DIRECT=True, SPLIT=split, PREC="tf32", HAS_STARTS=False,
                 KV_FP8=False, FUSED_MERGE=split, SPLITS_PAD=at.MAX_SPLITS,
                 MERGE_UNROLL_=at.MERGE_UNROLL, PREFETCH=prefetch, USE_PDL=True)
        # the decode defaults: 4 warps on small split grids, 2 on full ones
        out.append((at._attention_kernel, a, c, dict(num_warps=4 if split else 2, num_stages=2)))
    # a large decode graph's launch: requests dispatched longest first
    out.append((at._attention_kernel, dict(a, order_ptr="*i32"), dict(c, SPLIT=False,
                FUSED_MERGE=False, HAS_ORDER=True), dict(num_warps=2, num_stages=2)))
    return [(fn, _sig(args, c), c, dict(o, **pdl)) for fn, args, c, o in out]


def main() -> int:
    failed = 0
    for fn, sig, consts, opts in cases():
        try:
            triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=TARGET,
                           options=opts)
            print(f"ok    {fn.__name__}")
        except Exception as e:  # noqa: BLE001 - report every failure, then fail
            failed += 1
            print(f"FAIL  {fn.__name__} {consts}\n      {type(e).__name__}: {str(e)[:2000]}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
