"""Engine configuration (frozen) and the per-token output record."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from orchestrator.core.types import (
    ComputeDtype,
    FinishReason,
    FP8Format,
    KVDtype,
    LinearMode,
    Rounding,
)


@dataclass(frozen=True)
class EngineConfig:
    """Everything that shapes one engine. Frozen: build a new config to change anything.

    model: a preset name (`tiny`, `llama-3.2-1b-shape`, ...) or a local Hugging Face-format directory.
    num_layers: override the layer count of a random-weight shape preset (performance work on CPU);
        None keeps the preset's count. Not allowed for checkpoints.
    max_model_len: context length cap (prompt + generated); None = the model's own limit.
    calibration_prompts: token-id lists for the fp8-static calibration pass; None = a built-in text set.
    ops_backend: force an ops backend by name (`reference` = plain torch); None = best registered for the device.
    cuda_graphs: on CUDA with a graph-safe ops backend, replay decode steps as CUDA graphs (see cuda_graphs.py);
        ignored elsewhere.
    lookahead: one decode step of lookahead (lookahead.py: the host work of a step overlaps the GPU work of the
        step before; greedy batches only; same tokens). None = on where decode steps are CUDA graphs; True also
        on other devices (tests); False = off.
    init_on_device: random-weight presets only: draw the weights on the device, in the compute dtype (fast,
        no host copy; a different draw from the default host one, so engines must agree on this flag to
        exchange KV). For benchmarks of large shapes.
    """

    model: str = "tiny"
    dtype: ComputeDtype = ComputeDtype.FLOAT32
    linear_mode: LinearMode = LinearMode.BF16
    fp8_format: FP8Format = FP8Format.E4M3
    rounding: Rounding = Rounding.NEAREST
    kv_dtype: KVDtype = KVDtype.BF16
    block_size: int = 16
    num_blocks: int = 256
    max_batch_size: int = 32
    max_model_len: int | None = None
    device: str = "cpu"
    seed: int = 0
    calibration_prompts: tuple[tuple[int, ...], ...] | list[list[int]] | None = None
    num_layers: int | None = None
    ops_backend: str | None = None
    cuda_graphs: bool = True
    init_on_device: bool = False
    lookahead: bool | None = None

    def validate(self) -> None:
        """Raise ValueError naming the bad field (called by Engine before it allocates anything)."""
        for name, enum_type in (
            ("dtype", ComputeDtype),
            ("linear_mode", LinearMode),
            ("fp8_format", FP8Format),
            ("rounding", Rounding),
            ("kv_dtype", KVDtype),
        ):
            value = getattr(self, name)
            if not isinstance(value, enum_type):
                try:
                    enum_type(value)
                except ValueError:
                    allowed = ", ".join(m.value for m in enum_type)
                    raise ValueError(f"EngineConfig.{name}={value!r}; allowed: {allowed}") from None
        for name in ("block_size", "num_blocks", "max_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"EngineConfig.{name} must be an integer >= 1, got {value!r}")
        if self.max_model_len is not None and (not isinstance(self.max_model_len, int) or self.max_model_len < 2):
            raise ValueError(f"EngineConfig.max_model_len must be an integer >= 2 or None, got {self.max_model_len!r}")
        if self.lookahead is not None and not isinstance(self.lookahead, bool):
            raise ValueError(f"EngineConfig.lookahead must be true, false or None, got {self.lookahead!r}")
        if self.num_layers is not None and (not isinstance(self.num_layers, int) or self.num_layers < 1):
            raise ValueError(f"EngineConfig.num_layers must be an integer >= 1 or None, got {self.num_layers!r}")

    def normalized(self) -> EngineConfig:
        """The same config with string enum values turned into enums."""
        from dataclasses import replace

        return replace(
            self,
            dtype=ComputeDtype(self.dtype),
            linear_mode=LinearMode(self.linear_mode),
            fp8_format=FP8Format(self.fp8_format),
            rounding=Rounding(self.rounding),
            kv_dtype=KVDtype(self.kv_dtype),
        )


class TokenOutput(NamedTuple):
    """One generated token of one request, as emitted by `Engine.step()`.

    finish_reason is None while the request continues; otherwise this is its last token.
    """

    request_id: str
    token_id: int
    finish_reason: FinishReason | None = None
