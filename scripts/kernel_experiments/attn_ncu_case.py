"""The decode-attention case profiled with Nsight Compute: B=64, 2K context (ATTN_B / ATTN_CTX override), 32/8 heads,
D 128, page 16, FP8 or bf16 KV.

    ncu --kernel-name _attn_split_kernel --launch-skip 3 --launch-count 1 --section SpeedOfLight \\
        --section ComputeWorkloadAnalysis --section WarpStateStats python3 scripts/kernel_experiments/attn_ncu_case.py fp8
"""
import os
import sys

import torch

sys.path.insert(0, os.getcwd())
from workers.kernels.attention import paged_decode_attention  # noqa: E402
from workers.kernels.bench_suite import _attn_case  # noqa: E402


def main() -> None:
    dtype = torch.float8_e4m3fn if sys.argv[1:] == ["fp8"] else torch.bfloat16
    B, ctx, D = int(os.environ.get("ATTN_B", 64)), int(os.environ.get("ATTN_CTX", 2048)), 128
    q = torch.randn(B, 32, D, device="cuda", dtype=torch.bfloat16)
    kc, vc, ks, vs, table = _attn_case(B, ctx, dtype)
    lens = torch.full((B,), ctx, device="cuda", dtype=torch.int32)
    for _ in range(5):
        paged_decode_attention(q, kc, vc, table, lens, D**-0.5, ks, vs, max_seq_len=ctx)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
