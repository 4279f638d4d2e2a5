"""FP8 GEMMs with row-wise scales: out[m, n] = (Σ_k a_q[m,k] · w_q[n,k]) · a_scale[m] · w_scale[n].

Two Triton kernels, one contract (see reference.scaled_mm_ref):
- `_gemm_kernel` (prefill): classic tiles over (M, N) with grouped ordering, fp32 accumulation, the scales
  applied in the epilogue, bf16 out.
- `_thin_kernel` (decode, M ≤ 256): "swap AB" — each program computes a [BLOCK_N, BLOCK_M] tile of outᵀ as
  W_tile · xᵀ, so the weight rows fill the tensor core's wide side and the few tokens its narrow side; with
  SPLIT_K > 1 each program streams one K slice of the weight tile, writes a float32 partial, and a small
  reduction kernel sums the slices and applies the scales. The weights are read exactly once either way.

`fp8_linear` picks Triton or `torch._scaled_mm` (cuBLASLt) per shape from `configs.py`, which holds what was
measured on the H100 (`scripts/bench_kernels.py`). Weights are [N, K] row-major (nn.Linear layout), FP8 with
float32 per-output-channel scales [N]; activations [M, K] FP8 with float32 per-token scales [M].
"""

from __future__ import annotations

from dataclasses import replace

import torch
import triton
import triton.language as tl

try:  # host-side TMA descriptors (triton >= 3.4); without them the pointer kernel serves every config
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older triton
    TensorDescriptor = None

from workers.kernels import configs
from workers.kernels._common import FP8_MAX, _capability, check, check_same_device, pdl_enabled
from workers.kernels.packed_weight import PackedWeight


@triton.jit
def _gemm_kernel(
    a_ptr, as_ptr, w_ptr, ws_ptr, c_ptr, M, N, K, stride_am, stride_wn, stride_cm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr, PACK_N: tl.constexpr = 0, PACK_K: tl.constexpr = 0,
):
    """PACK_N > 0: w is a PackedWeight's data (tiles [PACK_N, PACK_K]; BLOCK_K divides PACK_K, stride_wn unused)."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * num_pid_n
    group = pid // width
    first_m = group * GROUP_M
    size_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    am = offs_m % M  # wrapped rows: loads stay in bounds without masks, stores are masked
    wn = offs_n % N
    a_ptrs = a_ptr + am[:, None].to(tl.int64) * stride_am + offs_k[None, :]
    if PACK_N > 0:  # row n of tile column j starts at ((n // PACK_N) · k_tiles + j) · PACK_N · PACK_K + (n % PACK_N) · PACK_K
        k_tiles = tl.cdiv(K, PACK_K)
        w_rows = w_ptr + ((wn // PACK_N).to(tl.int64) * k_tiles * PACK_N + wn % PACK_N) * PACK_K
    else:
        w_ptrs = w_ptr + wn[:, None].to(tl.int64) * stride_wn + offs_k[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if PACK_N > 0:
            k0 = k * BLOCK_K
            k_off = tl.multiple_of((k0 // PACK_K) * PACK_N * PACK_K + k0 % PACK_K, BLOCK_K)  # 16-byte vector loads
            w_ptrs = w_rows[:, None] + k_off + offs_k[None, :]
        if EVEN_K:
            a = tl.load(a_ptrs)
            w = tl.load(w_ptrs)
        else:
            kmask = offs_k[None, :] < K - k * BLOCK_K
            a = tl.load(a_ptrs, mask=kmask, other=0.0)
            w = tl.load(w_ptrs, mask=kmask, other=0.0)
        acc = tl.dot(a, tl.trans(w), acc)
        a_ptrs += BLOCK_K
        if PACK_N == 0:
            w_ptrs += BLOCK_K
    a_sc = tl.load(as_ptr + am)
    w_sc = tl.load(ws_ptr + wn)
    out = acc * a_sc[:, None] * w_sc[None, :]
    cmask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :],
             out.to(c_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def _thin_kernel(
    x_ptr, xs_ptr, w_ptr, ws_ptr, c_ptr, part_ptr, M, N, K, stride_xm, stride_wn, stride_cm,
    k_per_split,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PARTIAL: tl.constexpr,
    EVEN_K: tl.constexpr, PDL: tl.constexpr,
):
    if PDL:  # launched early (PDL): let the next kernel launch, then wait for the producer of x
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    wn = offs_n % N
    mmask = offs_m < M
    k_start = pid_k * k_per_split
    if not PARTIAL:  # the scales go out with the first tiles: their latency hides behind the K loop, not after it
        x_sc = tl.load(xs_ptr + offs_m, mask=mmask, other=0.0)
        w_sc = tl.load(ws_ptr + wn)
    w_ptrs = w_ptr + wn[:, None].to(tl.int64) * stride_wn + (k_start + offs_k)[None, :]  # [BLOCK_N, BLOCK_K]
    x_ptrs = x_ptr + offs_m[None, :].to(tl.int64) * stride_xm + (k_start + offs_k)[:, None]  # [BLOCK_K, BLOCK_M]
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for k in range(0, k_per_split, BLOCK_K):
        if EVEN_K:
            w = tl.load(w_ptrs)
            x = tl.load(x_ptrs, mask=mmask[None, :], other=0.0)
        else:
            kk = k_start + k + offs_k
            kmask = (kk < K) & (k + offs_k < k_per_split)
            w = tl.load(w_ptrs, mask=kmask[None, :], other=0.0)
            x = tl.load(x_ptrs, mask=kmask[:, None] & mmask[None, :], other=0.0)
        acc = tl.dot(w, x, acc)
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    cmask = (offs_n[:, None] < N) & mmask[None, :]
    if not PARTIAL:
        out = acc * w_sc[:, None] * x_sc[None, :]
        tl.store(c_ptr + offs_m[None, :].to(tl.int64) * stride_cm + offs_n[:, None],
                 out.to(c_ptr.dtype.element_ty), mask=cmask)
    else:
        # partials: [SPLIT_K, M, N] float32
        base = part_ptr + pid_k.to(tl.int64) * M * N
        tl.store(base + offs_m[None, :].to(tl.int64) * N + offs_n[:, None], acc, mask=cmask)


@triton.jit
def _thin_tma_kernel(
    x_desc, xs_ptr, w_desc, ws_ptr, c_ptr, M, N, K, stride_cm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
    PACKED: tl.constexpr = False,
):
    """The thin GEMM with its tiles fetched by TMA (one thread issues each bulk copy; rows past M and columns
    past K arrive as zeros). No split-K. Measured faster than pointer loads at M = 33..64 (configs.py).
    PACKED: w_desc views a PackedWeight's data with tiles [BLOCK_N, BLOCK_K]; each weight tile is one contiguous
    16 KB run instead of 64 pieces of 256 B."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    n0 = tl.program_id(0) * BLOCK_N
    m0 = tl.program_id(1) * BLOCK_M
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    nmask = offs_n < N
    mmask = offs_m < M
    # The scales go out with the first tiles: fetched after the loop they cost ~0.5 us of exposed latency per
    # call (a per-program timeline, scripts/kernel_experiments/thin_timeline.py).
    x_sc = tl.load(xs_ptr + offs_m, mask=mmask, other=0.0)
    w_sc = tl.load(ws_ptr + offs_n, mask=nmask, other=0.0)
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    k_tiles = tl.cdiv(K, BLOCK_K)
    for k in tl.range(0, K, BLOCK_K):
        if PACKED:
            w = w_desc.load([(tl.program_id(0) * k_tiles + k // BLOCK_K) * BLOCK_N, 0])
        else:
            w = w_desc.load([n0, k])  # [BLOCK_N, BLOCK_K]
        x = x_desc.load([m0, k])  # [BLOCK_M, BLOCK_K]
        acc = tl.dot(w, tl.trans(x), acc)
    out = acc * w_sc[:, None] * x_sc[None, :]
    tl.store(c_ptr + offs_m[None, :].to(tl.int64) * stride_cm + offs_n[:, None], out.to(c_ptr.dtype.element_ty),
             mask=nmask[:, None] & mmask[None, :])


@triton.jit
def _splitk_reduce_kernel(part_ptr, xs_ptr, ws_ptr, c_ptr, M, N, stride_cm,
                          SPLIT_K: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M * N
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(part_ptr + s * M * N + offs, mask=mask, other=0.0)
    m = offs // N
    n = offs % N
    out = acc * tl.load(xs_ptr + m, mask=mask, other=0.0) * tl.load(ws_ptr + n, mask=mask, other=0.0)
    tl.store(c_ptr + m.to(tl.int64) * stride_cm + n, out.to(c_ptr.dtype.element_ty), mask=mask)


def _check(a_q, a_scale, w_q, w_scale):
    """w_q: a row-major [N, K] FP8 tensor or a PackedWeight of one."""
    check(a_q.dim() == 2 and w_q.dim() == 2, f"a_q must be [M, K] and w_q [N, K], got {tuple(a_q.shape)}, {tuple(w_q.shape)}")
    M, K = a_q.shape
    N = w_q.shape[0]
    check(w_q.shape[1] == K, f"inner dimensions differ: a_q has K={K}, w_q has K={w_q.shape[1]}")
    check(a_q.dtype in FP8_MAX and w_q.dtype == a_q.dtype, f"a_q and w_q must share one FP8 dtype, got {a_q.dtype}, {w_q.dtype}")
    check(a_scale.shape == (M,) and a_scale.dtype == torch.float32, f"a_scale must be float32 [{M}]")
    check(w_scale.shape == (N,) and w_scale.dtype == torch.float32, f"w_scale must be float32 [{N}]")
    w_rows = w_q.data if isinstance(w_q, PackedWeight) else w_q
    check(a_q.stride(1) == 1 and w_rows.stride(1) == 1, "a_q and w_q must be row-major (K contiguous)")
    check(K >= 32, f"K must be at least 32 for FP8 tensor-core dots, got {K}")
    check_same_device(a_q, a_scale, w_rows, w_scale)
    return M, N, K


def triton_gemm(a_q, a_scale, w_q, w_scale, out_dtype=torch.bfloat16, cfg: configs.GemmConfig | None = None):
    """Prefill-shaped FP8 GEMM (Triton) → [M, N] out_dtype. Raises KernelInputError."""
    M, N, K = _check(a_q, a_scale, w_q, w_scale)
    cfg = cfg or configs.gemm_config(M, N, K)
    out = torch.empty(M, N, dtype=out_dtype, device=a_q.device)
    if M == 0 or N == 0:
        return out
    grid = (triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n),)
    if isinstance(w_q, PackedWeight):  # a K step never crosses a packed tile; the padded columns are zeros
        if cfg.block_k > w_q.block_k:
            cfg = replace(cfg, block_k=w_q.block_k)
        check(w_q.block_k % cfg.block_k == 0, f"BLOCK_K {cfg.block_k} must divide the packed tile's {w_q.block_k}")
        w_arg, stride_wn, pack, even = w_q.data, 0, {"PACK_N": w_q.block_n, "PACK_K": w_q.block_k}, True
        a_q = _pad_k(a_q, w_q.k_tiles * w_q.block_k)
    else:
        w_arg, stride_wn, pack, even = w_q, w_q.stride(0), {}, K % cfg.block_k == 0
    _gemm_kernel[grid](
        a_q, a_scale, w_arg, w_scale, out, M, N, K, a_q.stride(0), stride_wn, out.stride(0),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        EVEN_K=even, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **pack,
    )
    return out


def _pad_k(a_q: torch.Tensor, k_padded: int) -> torch.Tensor:
    """a_q with zero columns up to k_padded (a copy only when K is not a whole number of packed tiles)."""
    if a_q.shape[1] == k_padded:
        return a_q
    return torch.nn.functional.pad(a_q.view(torch.uint8), (0, k_padded - a_q.shape[1])).view(a_q.dtype)


def thin_gemm(a_q, a_scale, w_q, w_scale, out_dtype=torch.bfloat16, cfg: configs.ThinConfig | None = None):
    """Decode-shaped FP8 GEMM (Triton, swap-AB, optional split-K) → [M, N] out_dtype. w_q may be a PackedWeight
    (TMA kernel, configs.packed_thin_config)."""
    M, N, K = _check(a_q, a_scale, w_q, w_scale)
    out = torch.empty(M, N, dtype=out_dtype, device=a_q.device)
    if M == 0 or N == 0:
        return out
    pdl = pdl_enabled(a_q.device)
    if isinstance(w_q, PackedWeight):
        cfg = cfg or configs.packed_thin_config(M, N, K, w_q.block_n, w_q.block_k)
        check(cfg.tma and (cfg.block_n, cfg.block_k) == (w_q.block_n, w_q.block_k) and _tma_ok(a_q, w_q.data),
              "a packed weight needs the TMA thin kernel with tiles of its own shape")
        x_desc = TensorDescriptor.from_tensor(a_q, [cfg.block_m, cfg.block_k])
        w_desc = TensorDescriptor.from_tensor(w_q.data, [cfg.block_n, cfg.block_k])
        _thin_tma_kernel[(triton.cdiv(N, cfg.block_n), triton.cdiv(M, cfg.block_m))](
            x_desc, a_scale, w_desc, w_scale, out, M, N, K, out.stride(0),
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, PDL=pdl, PACKED=True,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, **({"launch_pdl": True} if pdl else {}),
        )
        return out
    cfg = cfg or configs.thin_config(M, N, K)
    if cfg.tma and cfg.split_k == 1 and _tma_ok(a_q, w_q):
        x_desc = TensorDescriptor.from_tensor(a_q, [cfg.block_m, cfg.block_k])
        w_desc = TensorDescriptor.from_tensor(w_q, [cfg.block_n, cfg.block_k])
        _thin_tma_kernel[(triton.cdiv(N, cfg.block_n), triton.cdiv(M, cfg.block_m))](
            x_desc, a_scale, w_desc, w_scale, out, M, N, K, out.stride(0),
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, PDL=pdl,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, **({"launch_pdl": True} if pdl else {}),
        )
        return out
    bk = cfg.block_k
    k_per_split = triton.cdiv(triton.cdiv(K, cfg.split_k), bk) * bk
    split = triton.cdiv(K, k_per_split)
    even = K % bk == 0 and K % k_per_split == 0
    part = torch.empty(split, M, N, dtype=torch.float32, device=a_q.device) if split > 1 else out
    grid = (triton.cdiv(N, cfg.block_n), split, triton.cdiv(M, cfg.block_m))
    _thin_kernel[grid](
        a_q, a_scale, w_q, w_scale, out, part, M, N, K, a_q.stride(0), w_q.stride(0), out.stride(0),
        k_per_split, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=bk, PARTIAL=split > 1, EVEN_K=even,
        PDL=pdl, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **({"launch_pdl": True} if pdl else {}),
    )
    if split > 1:
        block = 1024
        _splitk_reduce_kernel[(triton.cdiv(M * N, block),)](
            part, a_scale, w_scale, out, M, N, out.stride(0), SPLIT_K=split, BLOCK=block, num_warps=4,
        )
    return out


def _tma_ok(a_q: torch.Tensor, w_q: torch.Tensor) -> bool:
    """TMA needs host descriptors, a Hopper-class GPU (or the interpreter), 16-byte aligned bases and row
    strides (fp8: K a multiple of 16); otherwise the pointer kernel runs the same config."""
    if TensorDescriptor is None or (a_q.is_cuda and _capability(a_q.device.index or 0) < 9):
        return False
    return all(t.data_ptr() % 16 == 0 and (t.stride(0) * t.element_size()) % 16 == 0 for t in (a_q, w_q))


def scaled_mm(a_q, a_scale, w_q, w_scale, out_dtype=torch.bfloat16, fast_accum: bool | None = None):
    """torch._scaled_mm with row-wise scales (CUDA: cuBLASLt; needs M, N, K multiples of 16).

    fast_accum (default `configs.fast_accum()`) lets the FP8 tensor cores accumulate without cuBLASLt's
    periodic promotion to float32 — what the Triton kernels do on sm_90 by default — see configs.FAST_ACCUM.
    """
    fast = configs.fast_accum() if fast_accum is None else fast_accum
    return torch._scaled_mm(a_q, w_q.t(), scale_a=a_scale[:, None], scale_b=w_scale[None, :], out_dtype=out_dtype,
                            use_fast_accum=fast)


def fp8_linear(
    a_q: torch.Tensor,
    a_scale: torch.Tensor,
    w_q: torch.Tensor | PackedWeight,
    w_scale: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """The FP8 linear layer: a_q [M, K] fp8 (per-token scales [M]) × w_q [N, K] fp8 (per-channel [N]) → [M, N].

    Chooses thin_gemm / triton_gemm / torch._scaled_mm per shape from configs.choose_backend (measured on
    the H100). On CPU without the Triton interpreter it falls back to the reference math. w_q may be a
    PackedWeight (packed_weight.py): the TMA thin kernel up to THIN_MAX_M tokens, the Triton GEMM above.
    """
    M, N, K = _check(a_q, a_scale, w_q, w_scale)
    backend = configs.choose_backend(M, N, K, a_q.device)
    if backend is configs.Backend.SCALED_MM and a_q.dtype != torch.float8_e4m3fn:
        backend = configs.Backend.TRITON  # cuBLASLt has no e5m2 x e5m2 GEMM
    if isinstance(w_q, PackedWeight):  # cuBLASLt and the reference want row-major weights
        backend = configs.Backend.THIN if M <= configs.THIN_MAX_M else configs.Backend.TRITON
    if backend is configs.Backend.THIN:
        return thin_gemm(a_q, a_scale, w_q, w_scale, out_dtype)
    if backend is configs.Backend.TRITON:
        cfg = configs.packed_gemm_config(M) if isinstance(w_q, PackedWeight) else configs.gemm_config(M, N, K)
        return triton_gemm(a_q, a_scale, w_q, w_scale, out_dtype, cfg)
    if backend is configs.Backend.SCALED_MM:
        return scaled_mm(a_q, a_scale, w_q, w_scale, out_dtype)
    from workers.kernels.reference import scaled_mm_ref

    return scaled_mm_ref(a_q, a_scale, w_q, w_scale, out_dtype)
