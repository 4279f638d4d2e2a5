"""`VLLMEngineConfig`: what shapes one vLLM-backed engine. Frozen; validated at construction."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from orchestrator.core.types import ComputeDtype, KVDtype, TandemError

VLLM_CPU_BLOCK_MULTIPLE = 32  # vLLM's CPU attention kernels need block sizes that are multiples of 32


class VLLMConfigError(TandemError, ValueError):
    """A pool asked vLLM for something it cannot do here; the message names the field."""


_CACHE_DTYPE = {KVDtype.BF16: "auto", KVDtype.FP8_E4M3: "fp8_e4m3", KVDtype.FP8_E5M2: "fp8_e5m2"}
_DTYPE = {ComputeDtype.FLOAT32: "float32", ComputeDtype.BF16: "bfloat16"}


@dataclass(frozen=True)
class VLLMEngineConfig:
    """model: a local Hugging Face-format directory (config.json, *.safetensors, tokenizer.json).
    dtype: vLLM's model dtype. kv_dtype: BF16 keeps vLLM's cache in the model dtype ("auto") and sends
    bf16 on the wire; FP8_* use vLLM's FP8 cache with per-layer scales. block_size: vLLM's block
    size (a multiple of 32 on CPU). num_blocks: KV blocks vLLM may use. max_batch_size: vLLM's
    max_num_seqs. max_model_len: None = the checkpoint's limit.
    The other EngineConfig fields the runtime passes (linear_mode, fp8_format, ...) are accepted and
    ignored where vLLM has no equivalent: see `from_engine_kwargs`."""

    model: str
    dtype: ComputeDtype = ComputeDtype.FLOAT32
    kv_dtype: KVDtype = KVDtype.BF16
    block_size: int = 32
    num_blocks: int = 256
    max_batch_size: int = 32
    max_model_len: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.block_size % VLLM_CPU_BLOCK_MULTIPLE:
            raise VLLMConfigError(f"block_size {self.block_size}: vLLM on CPU needs a multiple of "
                                  f"{VLLM_CPU_BLOCK_MULTIPLE} (set the pool's engine.block_size)")
        if self.num_blocks < 2:
            raise VLLMConfigError(f"num_blocks {self.num_blocks}: vLLM needs at least 2 KV blocks")
        if self.max_batch_size < 1:
            raise VLLMConfigError(f"max_batch_size {self.max_batch_size} must be >= 1")
        if ComputeDtype(self.dtype) not in _DTYPE:
            raise VLLMConfigError(f"dtype {self.dtype!r} is not supported by vLLM on CPU")

    @property
    def vllm_dtype(self) -> str:
        return _DTYPE[ComputeDtype(self.dtype)]

    @property
    def vllm_cache_dtype(self) -> str:
        return _CACHE_DTYPE[KVDtype(self.kv_dtype)]

    @classmethod
    def from_engine_kwargs(cls, model: str, kwargs: dict[str, object]) -> VLLMEngineConfig:
        """Build from the runtime's EngineConfig-style fields; fields vLLM has no use for are dropped
        (linear_mode, fp8_format, rounding: vLLM runs the checkpoint's own linear layers)."""
        keep = {k: v for k, v in kwargs.items()
                if k in ("dtype", "kv_dtype", "block_size", "num_blocks", "max_batch_size", "max_model_len", "seed")}
        mode = kwargs.get("linear_mode")
        if mode is not None and str(getattr(mode, "value", mode)) != "bf16":
            logging.getLogger(__name__).warning(
                "linear_mode %s is ignored by a vllm pool: vLLM runs the checkpoint's own linear layers",
                getattr(mode, "value", mode))
        return cls(model=model, **keep)  # type: ignore[arg-type]
