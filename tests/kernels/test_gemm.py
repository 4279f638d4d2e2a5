"""FP8 GEMMs (prefill tiles, decode thin swap-AB with split-K, the dispatcher) against the torch reference."""

import pytest
import torch

from tests.kernels.conftest import DEVICES, rel_err
from workers.kernels import reference as R
from workers.kernels._common import KernelInputError
from workers.kernels.configs import GemmConfig, ThinConfig
from workers.kernels.gemm import fp8_linear, thin_gemm, triton_gemm


def _operands(M, N, K, dev, gen, fp8=torch.float8_e4m3fn):
    a = torch.randn(M, K, generator=gen).to(dev)
    w = (torch.randn(N, K, generator=gen) * 0.05).to(dev)
    a_q, a_s = R.quantize_per_token_ref(a, fp8)
    w_q, w_s = R.quantize_per_token_ref(w, fp8)
    return a_q, a_s, w_q, w_s


@pytest.mark.parametrize("dev", DEVICES)
def test_thin_gemm_configs(dev, gen):
    if dev == "cpu":
        cases = [((5, 200, 320), ThinConfig(16, 64, 64, 1)), ((33, 130, 256), ThinConfig(32, 64, 64, 3)),
                 ((1, 64, 192), ThinConfig(16, 64, 64, 2)),
                 # TMA tiles: M, N and K (320 = 2.5 x 128) not multiples of the tile; zeros arrive past the edges
                 ((5, 200, 320), ThinConfig(16, 64, 128, 1, tma=True)), ((40, 70, 192), ThinConfig(64, 64, 64, 1, tma=True))]
    else:
        cases = [((M, N, K), ThinConfig(bm, bn, bk, sk))
                 for M, N, K in [(1, 6144, 4096), (7, 1000, 4096), (33, 4096, 14336), (100, 28672, 4096), (256, 4000, 4160)]
                 for bm, bn, bk, sk in [(16, 64, 256, 1), (64, 128, 128, 4), (32, 32, 256, 3)]]
        cases += [((M, N, K), ThinConfig(64, 64, bk, 1, 4, st, tma=True))
                  for M, N, K in [(64, 4096, 4096), (37, 28672, 4096), (64, 4096, 14336), (50, 1000, 4160)]
                  for bk, st in [(256, 3), (256, 6), (128, 4)]]
    for (M, N, K), cfg in cases:
        a_q, a_s, w_q, w_s = _operands(M, N, K, dev, gen)
        out = thin_gemm(a_q, a_s, w_q, w_s, cfg=cfg)
        ref = R.scaled_mm_ref(a_q, a_s, w_q, w_s)
        assert out.shape == (M, N) and out.dtype == torch.bfloat16
        assert rel_err(out, ref) < 5e-3, (M, N, K, cfg)


@pytest.mark.parametrize("dev", DEVICES)
def test_packed_weight_gemms(dev, gen):
    """A tile-packed weight (N and K not whole tiles) through the thin TMA kernel (decode M) and the prefill Triton
    GEMM (through fp8_linear above THIN_MAX_M) gives the row-major weight's product; unpacking restores w_q."""
    from workers.kernels.configs import THIN_MAX_M
    from workers.kernels.packed_weight import pack_weight, unpack_weight

    if dev == "cpu":
        (N, K), tile, ms = (200, 320), (64, 128), (1, 17, 64, 70, THIN_MAX_M + 3)
    else:
        (N, K), tile, ms = (4096, 14336), (64, 256), (1, 16, 48, 64, 100, 256, 300, 4096)
    for M in ms:
        a_q, a_s, w_q, w_s = _operands(M, N, K, dev, gen)
        packed = pack_weight(w_q, *tile)
        assert torch.equal(unpack_weight(packed).view(torch.uint8), w_q.view(torch.uint8))
        ref = R.scaled_mm_ref(a_q, a_s, w_q, w_s)
        out = fp8_linear(a_q, a_s, packed, w_s) if M > THIN_MAX_M else thin_gemm(a_q, a_s, packed, w_s)
        assert out.shape == (M, N) and rel_err(out, ref) < 5e-3, M
    with pytest.raises(KernelInputError, match="packed"):
        thin_gemm(a_q[:4], a_s[:4], packed, w_s, cfg=ThinConfig(16, 64, 64, 1, tma=True))


@pytest.mark.parametrize("dev", DEVICES)
def test_triton_gemm(dev, gen):
    if dev == "cpu":
        cases = [((130, 200, 192), GemmConfig(64, 64, 64, 2, 4, 2)), ((64, 64, 100), GemmConfig(64, 64, 64, 1, 4, 2))]
    else:
        cases = [((M, N, K), cfg) for M, N, K in [(333, 1000, 4096), (4096, 14336, 4096), (300, 520, 4100)]
                 for cfg in [GemmConfig(), GemmConfig(128, 128, 128, 8, 8, 4)]]
    for (M, N, K), cfg in cases:
        a_q, a_s, w_q, w_s = _operands(M, N, K, dev, gen)
        out = triton_gemm(a_q, a_s, w_q, w_s, cfg=cfg)
        assert rel_err(out, R.scaled_mm_ref(a_q, a_s, w_q, w_s)) < 5e-3, (M, N, K, cfg)


@pytest.mark.parametrize("dev", DEVICES)
def test_fp8_linear_dispatch(dev, gen):
    shapes = [(3, 96, 128)] if dev == "cpu" else [(1, 4096, 4096), (64, 28672, 4096), (512, 4096, 14336), (301, 1000, 4096)]
    for M, N, K in shapes:
        a_q, a_s, w_q, w_s = _operands(M, N, K, dev, gen)
        out = fp8_linear(a_q, a_s, w_q, w_s)
        assert rel_err(out, R.scaled_mm_ref(a_q, a_s, w_q, w_s)) < 5e-3


def test_gemm_rejects_bad_inputs(gen):
    a_q, a_s, w_q, w_s = _operands(4, 64, 64, "cpu", gen)
    with pytest.raises(KernelInputError, match="inner dimensions"):
        fp8_linear(a_q, a_s, w_q[:, :32], w_s)
    with pytest.raises(KernelInputError, match="a_scale"):
        fp8_linear(a_q, a_s[:2], w_q, w_s)
    with pytest.raises(KernelInputError, match="one FP8 dtype"):
        fp8_linear(a_q.float(), a_s, w_q, w_s)
    with pytest.raises(KernelInputError, match="at least 32"):
        fp8_linear(a_q[:, :16], a_s, w_q[:, :16], w_s)


def test_configs_shrink_to_smaller_shared_memory(monkeypatch):
    """Configs measured on the H100 (227 KB shared memory) are shrunk to fit an L4-class GPU (~99 KB)."""
    from workers.kernels import configs

    monkeypatch.setattr(configs, "_smem_bytes", lambda: 99 * 1024)
    for (N, K), buckets in configs.THIN_TABLE.items():
        for m_max, cfg in buckets:
            small = configs.thin_config(m_max, N, K)
            assert configs._fits(small) and small.block_m == cfg.block_m and small.block_n == cfg.block_n
    assert configs._fits(configs.gemm_config(1000, 4096, 4096))
    monkeypatch.setattr(configs, "_smem_bytes", lambda: 227 * 1024)
    assert configs.thin_config(64, 4096, 4096) == configs.THIN_TABLE[(4096, 4096)][2][1]  # unchanged on H100


def test_fast_accum_and_pdl_switches(monkeypatch):
    """FP8 GEMMs accumulate fast by default (TANDEM_FP8_FAST_ACCUM=0 turns it off); PDL never on CPU or when off."""
    from workers.kernels import configs
    from workers.kernels._common import pdl_enabled

    monkeypatch.delenv("TANDEM_FP8_FAST_ACCUM", raising=False)
    assert configs.fast_accum() is configs.FAST_ACCUM is True
    for off in ("0", "false", "OFF", " no "):
        monkeypatch.setenv("TANDEM_FP8_FAST_ACCUM", off)
        assert configs.fast_accum() is False
    monkeypatch.setenv("TANDEM_FP8_FAST_ACCUM", "1")
    assert configs.fast_accum() is True
    assert pdl_enabled(torch.device("cpu")) is False
    monkeypatch.delenv("TANDEM_THIN_TMA", raising=False)
    assert configs.thin_config(64, 4096, 4096).tma is True
    monkeypatch.setenv("TANDEM_THIN_TMA", "0")
    assert configs.thin_config(64, 4096, 4096) == configs.replace(configs.THIN_TABLE[(4096, 4096)][2][1], tma=False)
    if torch.cuda.is_available():
        monkeypatch.setenv("TANDEM_PDL", "0")
        assert pdl_enabled(torch.device("cuda")) is False


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_scaled_mm_fast_and_precise_accumulation_agree_with_reference(gen):
    """cuBLASLt with and without fast accumulation, and the Triton tiles (always fast on sm_90), all stay
    within 0.5% of the exact product of the FP8 operands on a long K (where accumulation error grows)."""
    from workers.kernels.gemm import scaled_mm

    for M, N, K in [(512, 4096, 14336), (4096, 1024, 4096)]:
        a_q, a_s, w_q, w_s = _operands(M, N, K, "cuda", gen)
        ref = R.scaled_mm_ref(a_q, a_s, w_q, w_s)
        for fast in (True, False):
            assert rel_err(scaled_mm(a_q, a_s, w_q, w_s, fast_accum=fast), ref) < 5e-3, (M, N, K, fast)
        assert rel_err(triton_gemm(a_q, a_s, w_q, w_s), ref) < 5e-3, (M, N, K)
