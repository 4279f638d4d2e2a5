"""vLLM's paged KV layout on CPU, translated to and from Tandem's token-major KV payloads.

vLLM (0.32, CPU attention backend) gives each attention layer one tensor

    kv_cache[num_blocks, num_kv_heads, block_size, 2 * head_dim]

whose kernels read it as `[num_blocks, num_kv_heads, 2 * block_size, head_dim]` and split it into a
K half and a V half per (block, head). Inside each half the order depends on the kernel's ISA: the
plain row order for V on `vec`, packed orders for K (and for V with `amx`). Rather than hard-code
each, `VLLMPagedLayout.probe` learns the element order of one block by running vLLM's own
reshape-and-cache kernel on position-coded values; gather/scatter then index with it.

Tandem's wire (`workers/kv_payload.py`) carries token-major `[num_tokens, num_kv_heads, head_dim]`
K and V per layer, bf16 or FP8 with float32 scales per token per head. vLLM keeps FP8 KV with one
scale per layer and tensor (`k_scale`, `v_scale`). Translation:

- vLLM → wire: a float cache (float32 / bf16 / fp16) leaves as bf16; an FP8 cache leaves as its
  FP8 bits with the layer's scale repeated for every (token, head).
- wire → vLLM: the payload is dequantized (`q * scale`) and stored in the cache dtype; for an FP8
  cache it is divided by the layer's scale and saturated to the format's range.

Pure torch: no vLLM import, so the translation is tested in the main test environment too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from orchestrator.core.types import KVDtype
from workers.kv_payload import KVImportError, KVLayerPayload

_FP8 = {KVDtype.FP8_E4M3: torch.float8_e4m3fn, KVDtype.FP8_E5M2: torch.float8_e5m2}


def kv_dtype_of_vllm_cache(cache_dtype: str) -> KVDtype:
    """Tandem's KV dtype for vLLM's `cache_config.cache_dtype` string."""
    if cache_dtype in ("auto", "bfloat16", "float16", "float32", "float", "half"):
        return KVDtype.BF16
    if cache_dtype in ("fp8", "fp8_e4m3"):
        return KVDtype.FP8_E4M3
    if cache_dtype == "fp8_e5m2":
        return KVDtype.FP8_E5M2
    raise KVImportError(f"vLLM KV cache dtype {cache_dtype!r} has no Tandem wire equivalent "
                        "(supported: auto, fp8, fp8_e4m3, fp8_e5m2)")


WriteFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]
"""(key [T, H, D], value [T, H, D], key_cache view, value_cache view, slot_mapping [T]) -> None."""

# Integers a probe value can carry exactly, per storage dtype (digit base of the position code).
_DIGIT_BASE = {torch.float32: 1 << 20, torch.float16: 1 << 10, torch.bfloat16: 1 << 7,
               torch.float8_e4m3fn: 8, torch.float8_e5m2: 4, torch.uint8: 8}


@dataclass(frozen=True, eq=False)
class VLLMPagedLayout:
    """Where each (token offset, head, dim) of K and of V lives inside one block of a layer's cache.

    `k_index[n, h, d]` / `v_index[n, h, d]` are element offsets inside the block's page (the
    `num_kv_heads * block_size * 2 * head_dim` elements of `kv_cache[b]`). vLLM's CPU kernels store K
    (and, with AMX, V) in ISA-specific packed orders, so the index is learned once per engine by
    `probe`, which drives vLLM's own cache-write kernel with position-coded values.
    """

    block_size: int
    num_kv_heads: int
    head_dim: int
    kv_dtype: KVDtype  # what this cache holds, in Tandem's terms
    k_index: torch.Tensor
    v_index: torch.Tensor

    @property
    def page_elems(self) -> int:
        return self.num_kv_heads * self.block_size * 2 * self.head_dim

    @classmethod
    def plain(cls, block_size: int, num_kv_heads: int, head_dim: int, kv_dtype: KVDtype) -> VLLMPagedLayout:
        """The unpacked order of the view `[H, 2 * block_size, head_dim]` (K rows, then V rows)."""
        n = torch.arange(block_size).view(-1, 1, 1)
        h = torch.arange(num_kv_heads).view(1, -1, 1)
        d = torch.arange(head_dim).view(1, 1, -1)
        k = (h * 2 * block_size + n) * head_dim + d
        return cls(block_size, num_kv_heads, head_dim, kv_dtype, k, k + block_size * head_dim)

    @classmethod
    def probe(cls, write: WriteFn, block_size: int, num_kv_heads: int, head_dim: int, kv_dtype: KVDtype,
              storage_dtype: torch.dtype) -> VLLMPagedLayout:
        """Learn the layout from `write` (vLLM's reshape-and-cache kernel): K, then V, are written
        with each element carrying the digits of its (n, h, d) position, two blocks at once; raises
        KVImportError unless every element lands exactly once, in the same place in both blocks."""
        bs, hh, dd = block_size, num_kv_heads, head_dim
        base = _DIGIT_BASE.get(storage_dtype)
        if base is None:
            raise KVImportError(f"cannot probe a vLLM KV cache stored as {storage_dtype}")
        value_dtype = torch.float32 if storage_dtype.itemsize == 1 else storage_dtype
        count = bs * hh * dd
        ids = torch.arange(count, dtype=torch.int64)
        digits = 1
        while base ** digits < count:
            digits += 1
        found = {}
        for which in ("k", "v"):
            code = torch.zeros((2, hh * bs * 2 * dd), dtype=torch.int64)
            for j in range(digits):
                cache = torch.zeros((2, hh, bs, 2 * dd), dtype=storage_dtype)
                view = cache.view(2, hh, 2 * bs, dd)
                kc, vc = view.chunk(2, dim=2)
                digit = ((ids // base**j) % base + 1).view(bs, hh, dd).repeat(2, 1, 1).to(value_dtype)
                zero = torch.zeros_like(digit)
                key, val = (digit, zero) if which == "k" else (zero, digit)
                write(key, val, kc, vc, torch.arange(2 * bs))
                raw = cache.view(2, -1)
                got = raw.to(torch.float32) if storage_dtype.itemsize > 1 else _fp8_values(raw, kv_dtype)
                nz = got != 0
                if j == 0:
                    mask = nz
                elif not torch.equal(mask, nz):
                    raise KVImportError("vLLM's cache write is not a fixed permutation (probe masks differ)")
                code += torch.where(nz, (got.round().to(torch.int64) - 1) * base**j, 0)
            m0, m1 = mask[0], mask[1]
            if not torch.equal(m0, m1) or int(m0.sum()) != count or not torch.equal(code[0][m0], code[1][m1]):
                raise KVImportError("vLLM's cache layout differs between blocks or drops elements; "
                                    "the connector cannot translate it")
            index = torch.full((count,), -1, dtype=torch.int64)
            pos = torch.nonzero(m0).flatten()
            index[code[0][m0]] = pos
            if bool((index < 0).any()):
                raise KVImportError("vLLM's cache layout is not a permutation of (token, head, dim)")
            found[which] = index.view(bs, hh, dd)
        return cls(bs, hh, dd, kv_dtype, found["k"], found["v"])

    def check(self, kv_cache: torch.Tensor) -> None:
        want = (self.num_kv_heads, self.block_size, 2 * self.head_dim)
        if kv_cache.dim() != 4 or tuple(kv_cache.shape[1:]) != want:
            raise KVImportError(f"vLLM KV cache of shape {tuple(kv_cache.shape)} is not the CPU layout "
                                f"[num_blocks, {want[0]}, {want[1]}, {want[2]}] this connector translates")

    def _pages(self, kv_cache: torch.Tensor) -> torch.Tensor:
        self.check(kv_cache)
        return kv_cache.view(kv_cache.shape[0], self.page_elems)

    def slots(self, block_ids: list[int], start: int, num_tokens: int) -> torch.Tensor:
        """Slot ids of tokens start..start+num_tokens-1 of a request with these blocks."""
        pos = torch.arange(start, start + num_tokens)
        blocks = torch.tensor(block_ids, dtype=torch.long)
        if num_tokens and int(pos[-1]) // self.block_size >= len(block_ids):
            raise KVImportError(f"tokens up to {start + num_tokens} need more than the {len(block_ids)} "
                                f"blocks of {self.block_size} the request holds")
        return blocks[pos // self.block_size] * self.block_size + pos % self.block_size

    def gather(self, kv_cache: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V `[T, H, D]` (copies, in the cache's storage dtype) of the given slots."""
        pages = self._pages(kv_cache)
        b, off = (slots // self.block_size).view(-1, 1, 1), slots % self.block_size
        return pages[b, self.k_index[off]], pages[b, self.v_index[off]]

    def scatter(self, kv_cache: torch.Tensor, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write K and V `[T, H, D]` (already in the storage dtype) into the given slots."""
        pages = self._pages(kv_cache)
        b, off = (slots // self.block_size).view(-1, 1, 1), slots % self.block_size
        pages[b, self.k_index[off]] = k.view(pages.dtype) if k.dtype != pages.dtype else k
        pages[b, self.v_index[off]] = v.view(pages.dtype) if v.dtype != pages.dtype else v

    # ---- dtype and scale translation ---------------------------------------------------------------
    def to_payload(self, layer: int, token_start: int, k: torch.Tensor, v: torch.Tensor,
                   k_scale: float, v_scale: float) -> KVLayerPayload:
        """A wire payload from gathered cache rows (see the module docstring)."""
        if self.kv_dtype is KVDtype.BF16:
            return KVLayerPayload(layer, token_start, k.to(torch.bfloat16).contiguous(),
                                  v.to(torch.bfloat16).contiguous())
        t, h = int(k.shape[0]), int(k.shape[1])
        fp8 = _FP8[self.kv_dtype]
        k, v = (k.view(fp8) if k.dtype == torch.uint8 else k), (v.view(fp8) if v.dtype == torch.uint8 else v)
        return KVLayerPayload(layer, token_start, k.contiguous(), v.contiguous(),
                              torch.full((t, h), float(k_scale)), torch.full((t, h), float(v_scale)))

    def from_payload(self, payload: KVLayerPayload, storage_dtype: torch.dtype,
                     k_scale: float, v_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V `[T, H, D]` in the cache's storage dtype from a payload in this layout's kv_dtype."""
        k, v = _dequantize(payload.k, payload.k_scale), _dequantize(payload.v, payload.v_scale)
        fp8 = _FP8.get(self.kv_dtype)
        if fp8 is None:
            return k.to(storage_dtype), v.to(storage_dtype)
        lim = torch.finfo(fp8).max
        kq = (k / k_scale).clamp_(-lim, lim).to(fp8)
        vq = (v / v_scale).clamp_(-lim, lim).to(fp8)
        if storage_dtype == torch.uint8:
            return kq.view(torch.uint8), vq.view(torch.uint8)
        return kq, vq


def _dequantize(q: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    x = q.to(torch.float32)
    return x if scale is None else x * scale.to(torch.float32).unsqueeze(-1)


def _fp8_values(raw: torch.Tensor, kv_dtype: KVDtype) -> torch.Tensor:
    fp8 = _FP8.get(kv_dtype, torch.float8_e4m3fn)
    return (raw.view(fp8) if raw.dtype == torch.uint8 else raw).to(torch.float32)
