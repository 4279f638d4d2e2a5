# ruff: noqa: E402  (one-off H100 experiments; run from the repository root)
"""Experiment: where B=1 decode attention's time goes, and the floor of its memory access pattern (session 6).

1. Floors. A "gather-read" kernel with the split kernel's grid and page addressing reads every K/V byte of its
   split in one loop iteration (as int32 words, xor-folded: one cheap instruction per word) and the FP8 scales,
   and writes a partial and an LSE per head like the split kernel; then the adopted merge kernel runs on those
   partials. Timed in CUDA graphs of back-to-back calls with and without the merge, for FP8 and bf16 KV, B=1 at
   8K and 2K, at half / the adopted / twice the adopted split count × 1 / 2 / 4 warps; the best is the floor that
   a split + merge kernel of this shape pays for memory and launches. (A first version, looping over 32-token
   tiles as the split kernel does but without its software pipelining, ran slower than the adopted kernel.)
2. A per-program timeline of the adopted FP8 kernels at B=1 8K: the split kernel copied with `%globaltimer`
   stamps (entry, first logits ready, loop done, stored) and the merge kernel with (entry, stored), 48 calls
   back to back in one graph; medians over calls of: the split kernel's launch spread, time to first logits,
   loop, the split→merge gap, the merge's span, and the period.
Prediction: the FP8 floor with merge is 9-11 µs at 8K (the adopted kernel 14.4), bf16 14-16 µs (adopted 19).
"""
import os
import statistics
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.getcwd())
from workers.kernels import attention
from workers.kernels.bench_suite import _attn_case
from workers.kernels.benchmarking import STEADY_CALLS, rotating, time_graph_ms, time_ms

sys.path.insert(0, os.path.join(os.getcwd(), "scripts/kernel_experiments"))
from _harness import save

F8 = torch.float8_e4m3fn
Hq, Hkv, D, PAGE = 32, 8, 128, 16
B = 1


@triton.jit
def gather_read_kernel(kc_ptr, vc_ptr, ks_ptr, vs_ptr, bt_ptr, len_ptr, out_ptr, lse_ptr, num_splits,
                       stride_cb, stride_ct, stride_ch, stride_sb, stride_st, stride_btb,
                       stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
                       GROUP: tl.constexpr, WORDS: tl.constexpr, BLOCK_T: tl.constexpr, PAGE: tl.constexpr,
                       SCALES: tl.constexpr):
    """Strides of the caches in int32 words."""
    b = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(len_ptr + b)
    per_split = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_T) * BLOCK_T
    start = split * per_split
    end = tl.minimum(start + per_split, seq_len)
    offs_w = tl.arange(0, WORDS)
    acc = tl.zeros([BLOCK_T, WORDS], tl.int32)
    sacc = tl.zeros([BLOCK_T], tl.float32)
    for t0 in range(start, end, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        tmask = t < end
        page = tl.load(bt_ptr + b * stride_btb + t // PAGE, mask=tmask, other=0)
        slot = t % PAGE
        off = page * stride_cb + slot * stride_ct + kvh * stride_ch
        k = tl.load(kc_ptr + off[:, None] + offs_w[None, :], mask=tmask[:, None], other=0)
        v = tl.load(vc_ptr + off[:, None] + offs_w[None, :], mask=tmask[:, None], other=0)
        acc = acc ^ k ^ v
        if SCALES:
            so = page * stride_sb + slot * stride_st + kvh
            sacc += tl.load(ks_ptr + so, mask=tmask, other=0.0) + tl.load(vs_ptr + so, mask=tmask, other=0.0)
    word = tl.xor_sum(acc, axis=0)  # [WORDS]
    val = word.to(tl.float32) * 1e-30 + tl.sum(sacc, axis=0)
    offs_g = tl.arange(0, GROUP)
    heads = kvh * GROUP + offs_g
    # a partial of D fp32 per head, like the split kernel (only the first WORDS columns carry data)
    tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + split * stride_os + offs_w[None, :],
             tl.broadcast_to(val[None, :], [GROUP, WORDS]))
    tl.store(lse_ptr + b * stride_lb + heads * stride_lh + split, tl.zeros([GROUP], tl.float32) + tl.sum(val, axis=0))


def floors(rows):
    for kv, ctx in (("fp8", 8192), ("bf16", 8192), ("fp8", 2048), ("bf16", 2048)):
        dtype = F8 if kv == "fp8" else torch.bfloat16
        per_tok = Hkv * D * 2 * dtype.itemsize + (Hkv * 8 if kv == "fp8" else 0)
        get = rotating(lambda dtype=dtype, ctx=ctx: _attn_case(B, ctx, dtype), B * ctx * per_tok)
        q = torch.randn(B, Hq, D, device="cuda", dtype=torch.bfloat16)
        lens = torch.full((B,), ctx, device="cuda", dtype=torch.int32)
        bt_, warps, stages, _ = attention.ATTN_FP8_CONFIG if kv == "fp8" else attention.ATTN_BF16_CONFIG
        adopted_splits = attention.choose_num_splits(B, Hkv, ctx, bt_, 132, warps)
        out = torch.empty(B, Hq, D, dtype=torch.bfloat16, device="cuda")
        wpe = 4 // dtype.itemsize  # elements per int32 word

        bufs = {}

        def read(merge, splits, warps, get=get, lens=lens, out=out, wpe=wpe, kv=kv, ctx=ctx, bufs=bufs):
            part, lse = bufs[splits]
            kc, vc, ks, vs, table = get()
            k32, v32 = kc.view(torch.int32), vc.view(torch.int32)
            ks = ks if ks is not None else part
            vs = vs if vs is not None else part
            gather_read_kernel[(B, Hkv, splits)](  # one loop iteration: every load of the split issued at once
                k32, v32, ks, vs, table, lens, part, lse, splits,
                kc.stride(0) // wpe, kc.stride(1) // wpe, kc.stride(2) // wpe, ks.stride(0), ks.stride(1),
                table.stride(0), part.stride(0), part.stride(1), part.stride(2), lse.stride(0), lse.stride(1),
                GROUP=Hq // Hkv, WORDS=D // wpe, BLOCK_T=ctx // splits, PAGE=PAGE, SCALES=kv == "fp8",
                num_warps=warps, num_stages=1)
            if merge:
                attention._attn_merge_kernel[(B, Hq)](
                    part, lse, out, splits, part.stride(0), part.stride(1), part.stride(2), lse.stride(0),
                    lse.stride(1), out.stride(0), out.stride(1), D=D, BLOCK_D=D,
                    BLOCK_S=max(2, triton.next_power_of_2(splits)), num_warps=4)

        def adopted(get=get, q=q, lens=lens, ctx=ctx):
            kc, vc, ks, vs, table = get()
            return attention.paged_decode_attention(q, kc, vc, table, lens, D**-0.5, ks, vs, max_seq_len=ctx)

        calls = max(get.n, STEADY_CALLS)
        mb = ctx * per_tok / 1e6
        adopted_us = min(time_graph_ms(adopted, calls=calls, rep_ms=20) for _ in range(3)) * 1e3
        best = {}
        for splits in (adopted_splits // 2, adopted_splits, adopted_splits * 2):
            if ctx // splits < 16:
                continue
            bufs[splits] = (torch.empty(B, Hq, splits, D, dtype=torch.float32, device="cuda"),
                            torch.empty(B, Hq, splits, dtype=torch.float32, device="cuda"))
            for w in (1, 2, 4):
                for merge in (True, False):
                    us = min(time_graph_ms(lambda m=merge, sp=splits, w=w: read(m, sp, w), calls=calls, rep_ms=20)
                             for _ in range(3)) * 1e3
                    rows.append(dict(part="floor", kv=kv, B=B, ctx=ctx, splits=splits, warps=w, merge=merge, us=us,
                                     MB=mb, adopted_us=adopted_us, adopted_splits=adopted_splits))
                    if us < best.get(merge, (1e9,))[0]:
                        best[merge] = (us, splits, w)
        print(f"floor {kv} B=1 ctx={ctx} ({mb:.1f} MB): adopted {adopted_us:.2f} us ({adopted_splits} splits); "
              f"best gather-read + merge {best[True][0]:.2f} (splits, warps {best[True][1:]}); alone "
              f"{best[False][0]:.2f} {best[False][1:]} ({mb / best[False][0]:.2f} TB/s)", flush=True)
        del get


@triton.jit
def _now(dep):
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,r", [dep], dtype=tl.int64, is_pure=False,
                                     pack=1)


@triton.jit
def stamped_split_kernel(q_ptr, kc_ptr, vc_ptr, ks_ptr, vs_ptr, bt_ptr, len_ptr, out_ptr, lse_ptr, t_ptr,
                         qk_scale, num_splits, stride_qb, stride_qh, stride_cb, stride_ct, stride_ch, stride_sb,
                         stride_st, stride_btb, stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
                         GROUP: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, BLOCK_T: tl.constexpr,
                         PAGE: tl.constexpr):
    """The adopted FP8 split kernel's loop (DIRECT off, OFF32 on) with four timer stamps per program."""
    b = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    pid = (b * tl.num_programs(1) + kvh) * num_splits + split
    t_entry = _now(kvh)
    seq_len = tl.load(len_ptr + b)
    per_split = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_T) * BLOCK_T
    start = split * per_split
    end = tl.minimum(start + per_split, seq_len)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, D)
    heads = kvh * GROUP + offs_g
    gmask = offs_g < GROUP
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :], mask=gmask[:, None], other=0.0)
    q = tl.clamp(q.to(tl.float32), -65504.0, 65504.0).to(tl.float16)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, D], tl.float32)
    t_first = t_entry
    for t0 in range(start, end, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        tmask = t < end
        page = tl.load(bt_ptr + b * stride_btb + t // PAGE, mask=tmask, other=0).to(tl.int32)
        slot_off = t % PAGE
        kv_off = page * stride_cb + slot_off * stride_ct + kvh * stride_ch
        k = tl.load(kc_ptr + kv_off[:, None] + offs_d[None, :], mask=tmask[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k.to(tl.float16)))
        if t0 == start:
            t_first = _now(tl.max(tl.max(s, axis=1), axis=0).to(tl.int32, bitcast=True))
        sc_off = page * stride_sb + slot_off * stride_st + kvh
        k_sc = tl.load(ks_ptr + sc_off, mask=tmask, other=0.0)
        s = s * (k_sc * qk_scale)[None, :]
        s = tl.where(tmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(vc_ptr + kv_off[:, None] + offs_d[None, :], mask=tmask[:, None], other=0.0)
        v_sc = tl.load(vs_ptr + sc_off, mask=tmask, other=0.0)
        v_max = tl.maximum(tl.max(v_sc, axis=0), 1e-30)
        pv = (p * (v_sc / v_max)[None, :]).to(tl.float16)
        acc = acc * alpha[:, None] + tl.dot(pv, v.to(tl.float16)) * v_max
        m_i = m_new
    t_loop = _now(tl.sum(l_i, axis=0).to(tl.int32, bitcast=True))
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    o = acc / l_safe[:, None]
    tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + split * stride_os + offs_d[None, :], o,
             mask=gmask[:, None])
    lse = tl.where(l_i > 0.0, m_i + tl.log2(l_safe), float("-inf"))
    tl.store(lse_ptr + b * stride_lb + heads * stride_lh + split, lse, mask=gmask)
    tl.debug_barrier()
    t_end = _now(kvh)
    tl.store(t_ptr + pid * 4 + 0, t_entry)
    tl.store(t_ptr + pid * 4 + 1, t_first)
    tl.store(t_ptr + pid * 4 + 2, t_loop)
    tl.store(t_ptr + pid * 4 + 3, t_end)


@triton.jit
def stamped_merge_kernel(out_ptr, lse_ptr, final_ptr, t_ptr, num_splits, stride_ob, stride_oh, stride_os, stride_lb,
                         stride_lh, stride_fb, stride_fh, D: tl.constexpr, BLOCK_S: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    t_entry = _now(h)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, D)
    smask = offs_s < num_splits
    lse = tl.load(lse_ptr + b * stride_lb + h * stride_lh + offs_s, mask=smask, other=float("-inf"))
    m = tl.max(lse, axis=0)
    w = tl.where(smask & (lse > float("-inf")), tl.exp2(lse - m), 0.0)
    w = w / tl.sum(w, axis=0)
    o = tl.load(out_ptr + b * stride_ob + h * stride_oh + offs_s[:, None] * stride_os + offs_d[None, :],
                mask=smask[:, None], other=0.0)
    res = tl.sum(o * w[:, None], axis=0)
    tl.store(final_ptr + b * stride_fb + h * stride_fh + offs_d, res.to(final_ptr.dtype.element_ty))
    tl.debug_barrier()
    t_end = _now(h)
    pid = b * tl.num_programs(1) + h
    tl.store(t_ptr + pid * 2 + 0, t_entry)
    tl.store(t_ptr + pid * 2 + 1, t_end)


def timeline(rows, ctx=8192, calls=48):
    per_tok = Hkv * D * 2 + Hkv * 8
    get = rotating(lambda: _attn_case(B, ctx, F8), B * ctx * per_tok)
    q = torch.randn(B, Hq, D, device="cuda", dtype=torch.bfloat16)
    lens = torch.full((B,), ctx, device="cuda", dtype=torch.int32)
    bt_, warps, stages, _ = attention.ATTN_FP8_CONFIG
    splits = attention.choose_num_splits(B, Hkv, ctx, bt_, 132, warps)
    part = torch.empty(B, Hq, splits, D, dtype=torch.float32, device="cuda")
    lse = torch.empty(B, Hq, splits, dtype=torch.float32, device="cuda")
    out = torch.empty(B, Hq, D, dtype=torch.bfloat16, device="cuda")
    ts = torch.zeros(calls, B * Hkv * splits, 4, dtype=torch.int64, device="cuda")
    tm = torch.zeros(calls, B * Hq, 2, dtype=torch.int64, device="cuda")

    def one(i):
        kc, vc, ks, vs, table = get()
        stamped_split_kernel[(B, Hkv, splits)](
            q, kc, vc, ks, vs, table, lens, part, lse, ts[i], D**-0.5 * 1.4426950408889634, splits,
            q.stride(0), q.stride(1), kc.stride(0), kc.stride(1), kc.stride(2), ks.stride(0), ks.stride(1),
            table.stride(0), part.stride(0), part.stride(1), part.stride(2), lse.stride(0), lse.stride(1),
            GROUP=Hq // Hkv, BLOCK_G=16, D=D, BLOCK_T=bt_, PAGE=PAGE, num_warps=warps, num_stages=stages)
        stamped_merge_kernel[(B, Hq)](part, lse, out, tm[i], splits, part.stride(0), part.stride(1), part.stride(2),
                                      lse.stride(0), lse.stride(1), out.stride(0), out.stride(1), D=D,
                                      BLOCK_S=triton.next_power_of_2(splits), num_warps=4)

    one(0)  # the first argument set
    torch.cuda.synchronize()
    kc0, vc0, ks0, vs0, t0 = get._sets[0]
    ref = attention.paged_decode_attention(q, kc0, vc0, t0, lens, D**-0.5, ks0, vs0, max_seq_len=ctx)
    same = float((out.float() - ref.float()).abs().max())
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in range(calls):
            one(i)
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(calls):
            one(i)
    for _ in range(5):
        g.replay()
    torch.cuda.synchronize()
    def adopted():
        kc, vc, ks, vs, table = get()
        return attention.paged_decode_attention(q, kc, vc, table, lens, D**-0.5, ks, vs, max_seq_len=ctx)

    unstamped = min(time_graph_ms(adopted, calls=max(get.n, STEADY_CALLS), rep_ms=20) for _ in range(3)) * 1e3
    stamped = time_ms(g.replay, rep_ms=40) * 1e3 / calls
    t = ts.cpu().double() / 1e3
    m = tm.cpu().double() / 1e3
    keys = ("split_launch_spread", "to_first_logits", "loop_after_first", "store", "split_span", "split_to_merge_gap",
            "merge_span", "merge_to_next_split", "period")
    med = {k: [] for k in keys}
    for n in range(8, calls - 1):
        e, f, lp, end = t[n, :, 0], t[n, :, 1], t[n, :, 2], t[n, :, 3]
        med["split_launch_spread"].append(float(e.max() - e.min()))
        med["to_first_logits"].append(float((f - e).median()))
        med["loop_after_first"].append(float((lp - f).median()))
        med["store"].append(float((end - lp).median()))
        med["split_span"].append(float(end.max() - e.min()))
        med["split_to_merge_gap"].append(float(m[n, :, 0].min() - end.max()))
        med["merge_span"].append(float(m[n, :, 1].max() - m[n, :, 0].min()))
        med["merge_to_next_split"].append(float(t[n + 1, :, 0].min() - m[n, :, 1].max()))
        med["period"].append(float(t[n + 1, :, 0].min() - e.min()))
    r = {k: statistics.median(v) for k, v in med.items()}
    # where in the split span programs finish: quartiles of the end stamps relative to the first entry
    ends = torch.stack([t[n, :, 3] - t[n, :, 0].min() for n in range(8, calls - 1)])
    r["end_quartiles"] = [float(x) for x in ends.quantile(torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9], dtype=torch.float64), dim=1).median(dim=1).values]
    ents = torch.stack([t[n, :, 0] - t[n, :, 0].min() for n in range(8, calls - 1)])
    r["entry_quartiles"] = [float(x) for x in ents.quantile(torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9], dtype=torch.float64), dim=1).median(dim=1).values]
    r.update(part="timeline", ctx=ctx, splits=splits, stamped_us_per_call=stamped, adopted_us=unstamped,
             max_abs_diff_vs_adopted=same)
    rows.append(r)
    print("timeline B=1 ctx", ctx, {k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items()}, flush=True)


def main():
    rows = []
    floors(rows)
    timeline(rows, 8192)
    timeline(rows, 2048)
    save(os.environ.get("EXP_NAME", "attn_floor_timeline.json"), rows)


if __name__ == "__main__":
    main()
