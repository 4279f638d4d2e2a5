"""One decode-attention launch per KV dtype (B=64, 2K context), for `ncu` profiling on the GPU machine."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from workers.kernels.attention import paged_decode_attention  # noqa: E402
from workers.kernels.bench_suite import F8, _attn_case  # noqa: E402

B, ctx = 64, 2048
q = torch.randn(B, 32, 128, device="cuda", dtype=torch.bfloat16)
lens = torch.full((B,), ctx, device="cuda", dtype=torch.int32)
for dtype in (F8, torch.bfloat16):
    kc, vc, ks, vs, table = _attn_case(B, ctx, dtype)
    for _ in range(2):
        paged_decode_attention(q, kc, vc, table, lens, 128**-0.5, ks, vs, max_seq_len=ctx)
torch.cuda.synchronize()
