# ruff: noqa: E402, B023  (one-off H100 experiments; run from the repository root)
"""Experiment: prefill-sized GEMMs on the tile-packed down projection (session 6).

An engine that tile-packs down (configs.PACKED_SHAPES) has no row-major copy for cuBLASLt. Candidates above
THIN_MAX_M, against cuBLASLt on the row-major weight (what an unpacked engine runs): the Triton tiled GEMM reading
the packed tiles through pointers (gemm._gemm_kernel PACK_N/PACK_K, after a divisibility hint that restores
16-byte loads: the first version ran 4x slower than cuBLASLt on byte loads), the TMA thin kernel on the packed
weight with 64/128-token blocks, and unpacking into a scratch row-major copy before cuBLASLt.
Prediction: none within 10% of cuBLASLt at 2K-8K tokens (the Triton GEMM was 19% behind on the row-major weight).
"""
import os
import sys

import torch

sys.path.insert(0, os.getcwd())
from workers.kernels import configs
from workers.kernels.bench_suite import GEMM_SWEEP, _fp8_weight
from workers.kernels.benchmarking import time_graph_ms
from workers.kernels.configs import ThinConfig
from workers.kernels.gemm import scaled_mm, thin_gemm, triton_gemm
from workers.kernels.packed_weight import pack_weight, unpack_weight
from workers.kernels.quant import quantize_per_token

sys.path.insert(0, os.path.join(os.getcwd(), "scripts/kernel_experiments"))
from _harness import save

F8 = torch.float8_e4m3fn


def main() -> None:
    rows = []
    N, K = 4096, 14336
    w_q, w_s = _fp8_weight(N, K)
    packed = pack_weight(w_q, 64, 256)
    for M in (300, 512, 2048, 8192):
        a_q, a_s = quantize_per_token(torch.randn(M, K, device="cuda", dtype=torch.bfloat16), F8)
        ref = scaled_mm(a_q, a_s, w_q, w_s).float()
        res = {}

        def timed(name, fn):
            try:
                err = float((fn().float() - ref).norm() / ref.norm())
                us = min(time_graph_ms(fn, calls=3) for _ in range(2)) * 1e3
            except Exception as e:
                print("fail", M, name, type(e).__name__, str(e)[:150], flush=True)
                return
            res[name] = us
            rows.append(dict(M=M, N=N, K=K, what=name, us=us, err=err, TFLOPS=2 * M * N * K / us / 1e6))

        timed("cublaslt_rowmajor", lambda: scaled_mm(a_q, a_s, w_q, w_s))
        for cfg in GEMM_SWEEP:
            timed(f"triton_rowmajor {tuple(cfg.__dict__.values())}", lambda: triton_gemm(a_q, a_s, w_q, w_s, cfg=cfg))
            timed(f"triton_packed {tuple(cfg.__dict__.values())}", lambda: triton_gemm(a_q, a_s, packed, w_s, cfg=cfg))
        for bm, st, warps in ((64, 4, 4), (64, 6, 4), (128, 3, 4), (128, 4, 4), (128, 4, 8), (256, 3, 8)):
            cfg = ThinConfig(bm, 64, 256, 1, warps, st, tma=True)
            timed(f"thin_tma_packed bm={bm} st={st} w={warps}", lambda: thin_gemm(a_q, a_s, packed, w_s, cfg=cfg))
        timed("unpack+cublaslt", lambda: scaled_mm(a_q, a_s, unpack_weight(packed), w_s))
        base = res["cublaslt_rowmajor"]
        best = {}
        for k, v in res.items():
            fam = k.split(" ")[0]
            if v < best.get(fam, (1e9,))[0]:
                best[fam] = (v, k)
        print(f"M={M}: " + "; ".join(f"{fam} {v:.1f} us ({v / base:.2f}x) [{k}]" for fam, (v, k) in best.items()),
              flush=True)
    save(os.environ.get("EXP_NAME", "packed_prefill.json"), rows)


if __name__ == "__main__":
    assert configs.THIN_MAX_M == 256
    main()
