"""Every kernel compiles for sm_90 (H100) and sm_89 (L4) on this CPU-only box (Triton ships ptxas).

Runs in a subprocess without TRITON_INTERPRET: the interpreter accepts programs that the GPU compiler
rejects (e.g. an fp8 tl.dot with K < 32), which this test exists to catch.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_kernels_compile_for_sm90_and_sm89():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run([sys.executable, str(ROOT / "tests/kernels/compile_targets.py"), "90", "89"],
                          capture_output=True, text=True, env=env, timeout=280, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("ok ")]
    assert len(lines) == 2 * 16 + 4, proc.stdout  # 16 kernels on both targets, 4 PDL/TMA variants on sm_90 only
    # The matrix kernels use tensor cores on both targets (wgmma on sm_90 where Triton picks it).
    assert any("fp8_gemm sm_90" in ln and "mma=wgmma" in ln for ln in lines), proc.stdout
    assert all("mma=-" not in ln for ln in lines if "paged_attn" in ln or "prefill_attn" in ln or "gemm" in ln), \
        proc.stdout
    assert any("prefill_attn_fp8 sm_90" in ln and "mma=wgmma" in ln for ln in lines), proc.stdout
    # Programmatic dependent launch: the thin GEMM waits for its producer, the producers let it launch early;
    # without the flag neither instruction is emitted.
    assert any("thin_gemm_pdl sm_90" in ln and "gdc=wait+launch" in ln for ln in lines), proc.stdout
    assert any("rms_norm_quant_trigger sm_90" in ln and "gdc=+launch" in ln for ln in lines), proc.stdout
    assert any(ln.startswith("ok thin_gemm sm_90") and "gdc=-" in ln for ln in lines), proc.stdout
    assert any("thin_gemm_tma sm_90" in ln and "mma=wgmma" in ln and "gdc=wait+launch" in ln for ln in lines), \
        proc.stdout
