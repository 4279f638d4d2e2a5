"""The project's shared vocabulary: enums and small value types used by every package.

Pure Python (stdlib only). Workers, config, runtime and sim import these names; nobody
redefines them with strings.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mypy_extensions import mypyc_attr
else:
    def mypyc_attr(*_args, **_kwargs):
        """`mypy_extensions.mypyc_attr`, a no-op at run time: `@mypyc_attr(native_class=False)` tells
        mypyc (`make sim-compiled`, orchestrator/sim/compiled.py) to keep a class an ordinary Python
        class. mypy_extensions is only needed to compile, so it is imported for type checking only."""
        return lambda cls: cls


class Role(str, enum.Enum):
    """What a worker pool does with a request."""

    PREFILL = "prefill"
    DECODE = "decode"
    BOTH = "both"  # colocated: prefill and decode on the same worker


class KVDtype(str, enum.Enum):
    """How the engine stores KV in its paged cache."""

    BF16 = "bf16"
    FP8_E4M3 = "fp8_e4m3"
    FP8_E5M2 = "fp8_e5m2"

    @property
    def is_fp8(self) -> bool:
        return self is not KVDtype.BF16

    @property
    def bytes_per_element(self) -> int:
        return 2 if self is KVDtype.BF16 else 1


class LinearMode(str, enum.Enum):
    """How the engine's linear layers (all but the LM head) compute (the seed paper's axes)."""

    BF16 = "bf16"
    FP8_DYNAMIC = "fp8-dynamic"  # per-token activation scales, per-output-channel weight scales
    FP8_STATIC = "fp8-static"  # per-tensor activation scales from a calibration pass

    @property
    def is_fp8(self) -> bool:
        return self is not LinearMode.BF16


class FP8Format(str, enum.Enum):
    """FP8 element format for linear layers."""

    E4M3 = "e4m3"
    E5M2 = "e5m2"


class Rounding(str, enum.Enum):
    NEAREST = "nearest"
    STOCHASTIC = "stochastic"


class ComputeDtype(str, enum.Enum):
    FLOAT32 = "float32"
    BF16 = "bf16"


class EngineKind(str, enum.Enum):
    """Which model runner a pool's workers use (`workers/engine` or vLLM through `workers/vllm_engine`)."""

    NATIVE = "native"
    VLLM = "vllm"


class FinishReason(str, enum.Enum):
    """Why a sequence stopped (the OpenAI API's `finish_reason` values plus ours)."""

    STOP = "stop"  # a stop token id or stop string
    LENGTH = "length"  # max_tokens or the context length reached
    CANCELLED = "cancelled"
    ERROR = "error"


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings of one request. Validate with `validate()` at the edge."""

    max_tokens: int = 16
    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 means off
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False

    def validate(self) -> None:
        """Raise InvalidSamplingParams naming the bad field."""
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise InvalidSamplingParams(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not (self.temperature >= 0.0) or self.temperature != self.temperature:
            raise InvalidSamplingParams(f"temperature must be >= 0, got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise InvalidSamplingParams(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not (0.0 < self.top_p <= 1.0):
            raise InvalidSamplingParams(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or self.seed < 0):
            raise InvalidSamplingParams(f"seed must be a non-negative integer, got {self.seed!r}")
        for tid in self.stop_token_ids:
            if not isinstance(tid, int) or tid < 0:
                raise InvalidSamplingParams(f"stop_token_ids must be non-negative integers, got {tid!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class TandemError(Exception):
    """Base of every typed error Tandem raises on purpose."""


class InvalidSamplingParams(TandemError, ValueError):
    pass
