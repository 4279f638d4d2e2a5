# ruff: noqa: B007, B023, E401, E701, E702, E402, SIM115, UP031  (one-off H100 experiments, kept as they were run)
"""Experiment: cuBLASLt FP8 row-wise GEMM with use_fast_accum vs precise accumulation, prefill shapes."""
import json
import os
import sys

import torch

sys.path.insert(0, os.getcwd())
from workers.kernels.benchmarking import env_info, time_ms
from workers.kernels.gemm import triton_gemm
from workers.kernels.quant import quantize_per_token

F8 = torch.float8_e4m3fn
rows = []
for (M, N, K) in [(8192, 14336, 4096), (8192, 4096, 14336), (8192, 28672, 4096), (8192, 6144, 4096), (8192, 4096, 4096),
                  (4096, 14336, 4096), (4096, 4096, 14336), (8192, 8192, 8192), (4096, 4096, 4096)]:
    a = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
    aq, asc = quantize_per_token(a, F8)
    wq, wsc = quantize_per_token(w, F8)
    ref = ((aq.double() * asc.double()[:, None]) @ (wq.double() * wsc.double()[:, None]).t())
    def smm(fast):
        return torch._scaled_mm(aq, wq.t(), scale_a=asc[:, None], scale_b=wsc[None, :], out_dtype=torch.bfloat16, use_fast_accum=fast)
    r = dict(M=M, N=N, K=K)
    fl = 2 * M * N * K
    t = time_ms(lambda: a @ w.t()); r["bf16_tflops"] = fl / t / 1e9
    for name, fn in (("smm_precise", lambda: smm(False)), ("smm_fast", lambda: smm(True)),
                     ("triton", lambda: triton_gemm(aq, asc, wq, wsc))):
        try:
            out = fn()
            r[name + "_err"] = float((out.double() - ref).norm() / ref.norm())
            t = time_ms(fn)
            r[name + "_tflops"] = fl / t / 1e9
        except Exception as e:
            r[name + "_error"] = f"{type(e).__name__}: {str(e)[:120]}"
    bf_out = (a @ w.t()).double(); r["bf16_err_vs_fp8ref"] = float((bf_out - ref).norm() / ref.norm())
    rows.append(r)
    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()), flush=True)
# which kernels run
from torch.profiler import ProfilerActivity, profile

M, N, K = 8192, 14336, 4096
aq = torch.randn(M, K, device="cuda").to(F8); wq = torch.randn(N, K, device="cuda").to(F8)
asc = torch.ones(M, device="cuda"); wsc = torch.ones(N, device="cuda")
with profile(activities=[ProfilerActivity.CUDA]) as p:
    for fast in (False, True):
        torch._scaled_mm(aq, wq.t(), scale_a=asc[:, None], scale_b=wsc[None, :], out_dtype=torch.bfloat16, use_fast_accum=fast)
    torch.cuda.synchronize()
names = [e.name for e in p.events() if e.device_type.name == "CUDA"]
print("kernels:", names)
json.dump(dict(env=env_info(), rows=rows, kernels=names), open(os.path.join(os.environ.get("OUT", "/tmp"), "fastacc.json"), "w"), indent=1)
