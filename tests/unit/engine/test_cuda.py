"""CUDA checks (skipped without a GPU): the `torch._scaled_mm` path equals the CPU emulation, and an
engine on CUDA produces the CPU engine's greedy tokens in bf16 linear mode."""

from __future__ import annotations

import os

import pytest
import torch

from orchestrator.core.types import ComputeDtype, KVDtype, LinearMode
from workers.engine import fp8 as fp8q
from workers.engine import ops

from .factories import greedy, make_engine, prompts

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("per_tensor", [False, True], ids=["rowwise", "tensorwise"])
def test_scaled_mm_equals_cpu_emulation(per_tensor):
    torch.manual_seed(0)
    x, w = torch.randn(37, 256), torch.randn(384, 256)
    dt = torch.float8_e4m3fn
    wq, ws = fp8q.quantize_weight(w, dt, per_channel=not per_tensor)
    if per_tensor:
        xs = (x.abs().max() / fp8q.fp8_max(dt)).reshape(1)
        xq = fp8q.quantize_with_scale(x, xs, dt)
    else:
        xq, xs = fp8q.quantize_per_row(x, dt)
    cpu = ops.fp8_linear(xq, xs, wq, ws, None, None, torch.bfloat16)
    direct = ops._scaled_mm_cuda(xq.cuda(), xs.cuda(), wq.cuda(), ws.cuda(), torch.bfloat16)
    assert direct is not None, "torch._scaled_mm path not taken"
    rel = float((direct.float().cpu() - cpu.float()).norm() / cpu.float().norm())
    assert rel < 1e-2


@pytest.mark.parametrize("linear", [LinearMode.BF16, LinearMode.FP8_DYNAMIC])
def test_cuda_engine_matches_cpu_engine(linear):
    kw = dict(dtype=ComputeDtype.BF16, linear_mode=linear, kv_dtype=KVDtype.FP8_E4M3, ops_backend="reference")
    cpu = make_engine(device="cpu", **kw)
    gpu = make_engine(device="cuda", **kw)
    p = prompts(3)
    cpu_logits, gpu_logits = cpu.prompt_logits(p[2]), gpu.prompt_logits(p[2]).cpu()
    rel = float((gpu_logits - cpu_logits).norm() / cpu_logits.norm())
    assert rel < 0.05
    top1 = float((gpu_logits.argmax(-1) == cpu_logits.argmax(-1)).float().mean())
    assert top1 >= 0.9
    a = gpu.prefill_export("x", p[0], greedy(8))
    gpu.import_kv(a, greedy(8))
    while gpu.has_unfinished():
        gpu.step()
    assert len(gpu.generate(p, greedy(8))) == 3


@pytest.mark.parametrize("kv_dtype", [KVDtype.BF16, KVDtype.FP8_E4M3], ids=lambda k: k.value)
def test_cuda_disaggregation_is_exact_with_the_default_backend(kv_dtype):
    """With whatever ops backend is registered for CUDA (the kernels' one when present). Real Triton kernels
    cannot run on CUDA tensors under TRITON_INTERPRET=1 (set by tests/conftest.py): run with
    TRITON_INTERPRET=0 on a GPU machine to cover them; otherwise this uses the torch reference."""
    backend = "reference" if os.environ.get("TRITON_INTERPRET") == "1" else None
    kw = dict(device="cuda", dtype=ComputeDtype.BF16, linear_mode=LinearMode.FP8_DYNAMIC, kv_dtype=kv_dtype,
              ops_backend=backend)
    a, b, colo = make_engine(block_size=16, **kw), make_engine(block_size=8, **kw), make_engine(**kw)
    p = prompts(1, base_len=29)[0]
    expected = colo.generate([p], greedy(12))[0]
    b.import_kv(a.prefill_export("d", p, greedy(12)), greedy(12))
    got = []
    while b.has_unfinished():
        got += [o.token_id for o in b.step()]
    assert got == expected, a.ops.backend
