"""Compile every kernel of workers/kernels for real GPU targets on a machine without a GPU.

Block sizes here are smaller than the production ones (same code paths, faster compiles); the GPU run of
the `gpu` tests compiles the production sizes.

Run as a script in a process WITHOUT TRITON_INTERPRET (the interpreter accepts programs that the GPU
compiler rejects, e.g. an fp8 tl.dot with K < 32). Prints one line per (kernel, target) and exits non-zero
on the first failure. Used by test_compile.py; usable by hand: `python tests/kernels/compile_targets.py 90 89`.
"""

from __future__ import annotations

import os
import sys


def specs():
    from workers.kernels import attention, gemm, kv_cache, prefill_attention, quant

    f8, bf, f32, i32 = "*fp8e4nv", "*bf16", "*fp32", "*i32"
    yield "rms_norm_quant", quant._rms_norm_kernel, {
        "x_ptr": bf, "res_ptr": bf, "res_out_ptr": bf, "w_ptr": bf, "out_ptr": f8, "scale_ptr": f32,
        "D": "i32", "stride_x": "i32", "stride_r": "i32", "stride_ro": "i32", "stride_o": "i32", "eps": "fp32",
    }, {"HAS_RES": True, "QUANT": True, "FP8_MAX": 448.0, "AMAX_MIN": 1e-12, "BLOCK_D": 1024,
          "TRIGGER": False}
    yield "rms_norm_quant_trigger", quant._rms_norm_kernel, {
        "x_ptr": bf, "res_ptr": bf, "res_out_ptr": bf, "w_ptr": bf, "out_ptr": f8, "scale_ptr": f32,
        "D": "i32", "stride_x": "i32", "stride_r": "i32", "stride_ro": "i32", "stride_o": "i32", "eps": "fp32",
    }, {"HAS_RES": True, "QUANT": True, "FP8_MAX": 448.0, "AMAX_MIN": 1e-12, "BLOCK_D": 1024, "TRIGGER": True}
    yield "rms_norm_bf16", quant._rms_norm_kernel, {
        "x_ptr": bf, "res_ptr": bf, "res_out_ptr": bf, "w_ptr": bf, "out_ptr": bf, "scale_ptr": bf,
        "D": "i32", "stride_x": "i32", "stride_r": "i32", "stride_ro": "i32", "stride_o": "i32", "eps": "fp32",
    }, {"HAS_RES": False, "QUANT": False, "FP8_MAX": 1.0, "AMAX_MIN": 1e-12, "BLOCK_D": 1024,
          "TRIGGER": False}
    yield "silu_mul_quant", quant._silu_mul_kernel, {
        "gu_ptr": bf, "out_ptr": f8, "scale_ptr": f32, "N_INTER": "i32", "stride_gu": "i32", "stride_o": "i32",
    }, {"QUANT": True, "FP8_MAX": 448.0, "AMAX_MIN": 1e-12, "BLOCK_I": 2048, "TRIGGER": False}
    yield "quantize_per_token", quant._quant_kernel, {
        "x_ptr": bf, "out_ptr": f8, "scale_ptr": f32, "D": "i32", "stride_x": "i32", "stride_o": "i32",
    }, {"FP8_MAX": 448.0, "AMAX_MIN": 1e-12, "BLOCK_D": 1024, "TRIGGER": False}
    kv_args = {
        "k_ptr": bf, "v_ptr": bf, "slot_ptr": "*i64", "kc_ptr": f8, "vc_ptr": f8, "ks_ptr": f32, "vs_ptr": f32,
        **{n: "i32" for n in ("H", "D", "block_size", "stride_kt", "stride_kh", "stride_vt", "stride_vh",
                              "stride_cb", "stride_ct", "stride_ch", "stride_sb", "stride_st", "stride_sh")},
    }
    yield "kv_write_fp8", kv_cache._kv_write_kernel, kv_args, {
        "QUANT": True, "FP8_MAX": 448.0, "AMAX_MIN": 1e-12, "BLOCK_H": 8, "BLOCK_D": 128}
    yield "rope_kv_write_fp8", kv_cache._rope_kv_write_kernel, {
        "qkv_ptr": bf, "pos_ptr": "*i64", "inv_ptr": f32, "slot_ptr": "*i64", "q_out_ptr": bf, "k_out_ptr": bf,
        "kc_ptr": f8, "vc_ptr": f8, "ks_ptr": f32, "vs_ptr": f32,
        **{n: "i32" for n in ("HQ", "HKV", "block_size", "stride_t", "stride_qt", "stride_qh", "stride_kt",
                              "stride_kh", "stride_cb", "stride_ct", "stride_ch", "stride_sb", "stride_st", "stride_sh")},
    }, {"D": 128, "BLOCK_HQ": 32, "BLOCK_HKV": 8, "QUANT": True, "FP8_MAX": 448.0, "AMAX_MIN": 1e-12, "STORE_K": True}
    ints = ("stride_qb", "stride_qh", "stride_cb", "stride_ct", "stride_ch", "stride_sb", "stride_st", "stride_sh",
            "stride_btb", "stride_ob", "stride_oh", "stride_os", "stride_lb", "stride_lh", "stride_fb", "stride_fh")
    for kv_fp8, direct in ((True, False), (False, True)):
        kv = f8 if kv_fp8 else bf
        yield f"paged_attn_{'fp8' if kv_fp8 else 'bf16'}", attention._attn_split_kernel, {
            "q_ptr": bf, "kc_ptr": kv, "vc_ptr": kv, "ks_ptr": f32, "vs_ptr": f32, "bt_ptr": i32, "len_ptr": i32,
            "out_ptr": f32, "lse_ptr": f32, "final_ptr": bf, "qk_scale": "fp32", "num_splits": "i32",
            **{n: "i32" for n in ints},
        }, {"GROUP": 4, "BLOCK_G": 16, "D": 128, "BLOCK_D": 128, "BLOCK_T": 64, "PAGE": 16,
            "KV_FP8": kv_fp8, "DIRECT": direct, "OFF32": kv_fp8}
    yield "attn_merge", attention._attn_merge_kernel, {
        "out_ptr": f32, "lse_ptr": f32, "final_ptr": bf, "num_splits": "i32",
        **{n: "i32" for n in ("stride_ob", "stride_oh", "stride_os", "stride_lb", "stride_lh", "stride_fb", "stride_fh")},
    }, {"D": 128, "BLOCK_D": 128, "BLOCK_S": 16}
    yield "prefill_quant_kv", prefill_attention._quant_kv_kernel, {
        "k_ptr": bf, "v_ptr": bf, "cu_ptr": i32, "pcu_ptr": i32, "k8_ptr": f8, "vt8_ptr": f8, "ks_ptr": f32,
        "vs_ptr": f32,
        **{n: "i32" for n in ("T", "HKV", "stride_kt", "stride_kh", "stride_vt", "stride_vh", "stride_k8t",
                              "stride_k8h", "stride_vt8h", "stride_vt8d", "stride_ksh")},
    }, {"D": 128, "SB": 64, "VARLEN": True, "FP8_MAX": 448.0, "AMAX_MIN": 1e-12}
    for tma in (False, True):  # pointer loads and TMA descriptors (packed sequences, QKᵀ issued ahead)
        kd, vd = ("tensordesc<fp8e4nv[64, 128]>", "tensordesc<fp8e4nv[128, 64]>") if tma else (f32, f32)
        yield f"prefill_attn_fp8{'_tma' if tma else ''}", prefill_attention._attn_fwd_kernel, {
            "q_ptr": bf, "k_ptr": f8, "vt_ptr": f8, "ks_ptr": f32, "vs_ptr": f32, "out_ptr": bf,
            "cu_ptr": i32, "pcu_ptr": i32, "k_desc": kd, "vt_desc": vd, "T": "i32", "qk_scale": "fp32",
            **{n: "i32" for n in ("stride_qt", "stride_qh", "stride_kt", "stride_kh", "stride_vh", "stride_vd",
                                  "stride_ksh", "stride_ot", "stride_oh")},
        }, {"GROUP": 4, "D": 128, "BLOCK_M": 64, "BLOCK_N": 64, "SB": 64, "VARLEN": tma,
            # TMA: the production path (lazy rescaling); pointers: eager rescaling with QKᵀ issued ahead
            "SHIFT": 5.0 if tma else 8.0, "USE_TMA": tma, "PIPE": not tma, "FP8_MAX": 448.0, "AMAX_MIN": 1e-12,
            "LAZY": tma, "TAU": 3.0}
    yield "fp8_gemm", gemm._gemm_kernel, {
        "a_ptr": f8, "as_ptr": f32, "w_ptr": f8, "ws_ptr": f32, "c_ptr": bf,
        **{n: "i32" for n in ("M", "N", "K", "stride_am", "stride_wn", "stride_cm")},
    }, {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8, "EVEN_K": True, "PACK_N": 0, "PACK_K": 0}
    yield "fp8_gemm_packed_weight", gemm._gemm_kernel, {
        "a_ptr": f8, "as_ptr": f32, "w_ptr": f8, "ws_ptr": f32, "c_ptr": bf,
        **{n: "i32" for n in ("M", "N", "K", "stride_am", "stride_wn", "stride_cm")},
    }, {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "EVEN_K": True, "PACK_N": 64, "PACK_K": 128}
    thin_args = {
        "x_ptr": f8, "xs_ptr": f32, "w_ptr": f8, "ws_ptr": f32, "c_ptr": bf, "part_ptr": f32,
        **{n: "i32" for n in ("M", "N", "K", "stride_xm", "stride_wn", "stride_cm", "k_per_split")},
    }
    yield "thin_gemm", gemm._thin_kernel, thin_args, {
        "BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64, "PARTIAL": True, "EVEN_K": False, "PDL": False}
    yield "thin_gemm_pdl", gemm._thin_kernel, thin_args, {
        "BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64, "PARTIAL": False, "EVEN_K": True, "PDL": True}
    yield "thin_gemm_tma", gemm._thin_tma_kernel, {
        "x_desc": "tensordesc<fp8e4nv[16, 64]>", "xs_ptr": f32, "w_desc": "tensordesc<fp8e4nv[64, 64]>",
        "ws_ptr": f32, "c_ptr": bf, **{n: "i32" for n in ("M", "N", "K", "stride_cm")},
    }, {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64, "PDL": True, "PACKED": False}
    yield "thin_gemm_tma_packed_weight", gemm._thin_tma_kernel, {
        "x_desc": "tensordesc<fp8e4nv[16, 64]>", "xs_ptr": f32, "w_desc": "tensordesc<fp8e4nv[64, 64]>",
        "ws_ptr": f32, "c_ptr": bf, **{n: "i32" for n in ("M", "N", "K", "stride_cm")},
    }, {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64, "PDL": True, "PACKED": True}
    yield "splitk_reduce", gemm._splitk_reduce_kernel, {
        "part_ptr": f32, "xs_ptr": f32, "ws_ptr": f32, "c_ptr": bf, "M": "i32", "N": "i32", "stride_cm": "i32",
    }, {"SPLIT_K": 4, "BLOCK": 1024}


def main(archs: list[int]) -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("refusing to run with TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    for name, fn, sig, consts in specs():
        signature = dict(sig)
        for k in consts:
            signature[k] = "constexpr"
        ordered = {a: signature[a] for a in fn.arg_names}
        for arch in archs:
            if (consts.get("PDL") or consts.get("TRIGGER")) and arch < 90:
                continue  # PDL (and the TMA thin GEMM) are sm_90+; the wrappers never ask for them below
            src = ASTSource(fn=fn, signature=ordered, constexprs=consts)
            try:
                k = triton.compile(src, target=GPUTarget("cuda", arch, 32))
            except Exception as exc:  # report which kernel and target failed
                print(f"FAIL {name} sm_{arch}: {type(exc).__name__}: {str(exc)[:2000]}")
                return 1
            ptx = k.asm.get("ptx", "")
            mma = "wgmma" if "wgmma" in ptx else "mma.sync" if "mma.sync" in ptx else "-"
            local = ptx.count("ld.local") + ptx.count("st.local")
            gdc = "wait" if "griddepcontrol.wait" in ptx else ""
            gdc += "+launch" if "griddepcontrol.launch_dependents" in ptx else ""
            print(f"ok {name} sm_{arch} shared={k.metadata.shared} mma={mma} local_ops={local} gdc={gdc or '-'}")
    return 0


if __name__ == "__main__":
    sys.exit(main([int(a) for a in sys.argv[1:]] or [90, 89]))
