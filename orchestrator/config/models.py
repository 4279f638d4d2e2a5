"""The schema of a Tandem cluster spec: one YAML file, validated once at the edge, then frozen.

Every model forbids unknown keys and is immutable after load. Field-level rules live on the fields;
rules that span sections (both roles present, pools agree on the KV layout, names resolve) live in
`orchestrator.config.checks` so that every violation is reported at once with its path.
"""

from __future__ import annotations

import enum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from orchestrator.core.types import ComputeDtype, EngineKind, FP8Format, KVDtype, LinearMode, Role

_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_enum_values=False)


class NoFitAction(enum.StrEnum):
    """What happens to a request when no placement fits the power budget."""

    QUEUE = "queue"
    REJECT = "reject"


class KVTransportKind(enum.StrEnum):
    GRPC = "grpc"
    INPROCESS = "inprocess"


class RoutingKind(enum.StrEnum):
    CONTEXT_TTFT = "context-ttft"
    THRESHOLD = "threshold"
    TIERS = "tiers"
    POWER = "power"


class DecodeSelection(enum.StrEnum):
    LEAST_LOADED = "least-loaded"


# ----------------------------------------------------------------------------------------- model


class ModelConfig(_Frozen):
    """The one model every pool serves, and its FP8 modes."""

    name: str = Field(min_length=1, description="model id as the API names it unless frontend overrides")
    path: str | None = Field(default=None, description="local weights directory; None = built-in preset")
    shape: str | None = Field(
        default=None, description="ModelShape preset the cost model uses; defaults to `name`"
    )
    dtype: ComputeDtype = ComputeDtype.BF16
    linear_mode: LinearMode = LinearMode.FP8_DYNAMIC
    fp8_format: FP8Format = FP8Format.E4M3
    kv_dtype: KVDtype = KVDtype.FP8_E4M3
    block_size: int = Field(default=16, ge=1, le=4096)
    max_model_len: int = Field(default=2048, ge=2)

    @property
    def shape_name(self) -> str:
        return self.shape or self.name


# ----------------------------------------------------------------------------------------- pools


class PlacementConfig(_Frozen):
    """Ray placement of each replica of a pool."""

    num_gpus: float = Field(default=0.0, ge=0.0)
    num_cpus: float = Field(default=1.0, ge=0.0)
    resources: dict[str, float] = Field(default_factory=dict, description="Ray custom resources")
    accelerator_type: str | None = None

    @field_validator("resources")
    @classmethod
    def _non_negative(cls, v: dict[str, float]) -> dict[str, float]:
        bad = [k for k, x in v.items() if x < 0]
        if bad:
            raise ValueError(f"resource amounts must be >= 0 (negative: {', '.join(sorted(bad))})")
        return v


class EngineOverrides(_Frozen):
    """Per-pool engine settings; None keeps the model section's value.

    `kind` picks the model runner: `native` (Tandem's engine) or `vllm` (vLLM's engine in the worker,
    KV through Tandem's connector; needs model.path and a block size that is a multiple of 32).
    `engine: vllm` is short for `engine: {kind: vllm}`."""

    kind: EngineKind = EngineKind.NATIVE
    num_kv_blocks: int | None = Field(default=None, ge=1)
    block_size: int | None = Field(default=None, ge=1, le=4096)
    max_batch_size: int | None = Field(default=None, ge=1)
    kv_dtype: KVDtype | None = None
    linear_mode: LinearMode | None = None
    max_model_len: int | None = Field(default=None, ge=2)

    @model_validator(mode="before")
    @classmethod
    def _kind_shorthand(cls, v: object) -> object:
        return {"kind": v} if isinstance(v, str) else v


class PoolConfig(_Frozen):
    name: str = Field(pattern=_NAME)
    role: Role
    replicas: int = Field(default=1, ge=1)
    hardware: str = Field(min_length=1, description="key into cluster_configs/hardware/")
    placement: PlacementConfig = Field(default_factory=PlacementConfig)
    engine: EngineOverrides = Field(default_factory=EngineOverrides)


# --------------------------------------------------------------------------------------- routing


class ContextTTFTRouting(_Frozen):
    """Remote prefill when its predicted TTFT beats prefilling on the decode worker."""

    kind: Literal["context-ttft"] = "context-ttft"
    decode_selection: DecodeSelection = DecodeSelection.LEAST_LOADED
    remote_margin_ms: float = Field(
        default=0.0, ge=0.0, description="remote must win by at least this much (hysteresis)"
    )


class ThresholdRouting(_Frozen):
    """Prompts of at least `threshold_tokens` prefill remotely; shorter ones locally."""

    kind: Literal["threshold"] = "threshold"
    decode_selection: DecodeSelection = DecodeSelection.LEAST_LOADED
    threshold_tokens: int = Field(ge=0)


class Tier(_Frozen):
    min_prompt_tokens: int = Field(ge=0)
    pool: str | None = Field(description="prefill pool for prompts in this tier; null = local prefill")


class TiersRouting(_Frozen):
    """Prompt-length tiers, each sending prefill to a named pool (or local)."""

    kind: Literal["tiers"] = "tiers"
    decode_selection: DecodeSelection = DecodeSelection.LEAST_LOADED
    tiers: tuple[Tier, ...] = Field(min_length=1)

    @field_validator("tiers")
    @classmethod
    def _sorted(cls, v: tuple[Tier, ...]) -> tuple[Tier, ...]:
        mins = [t.min_prompt_tokens for t in v]
        if mins != sorted(set(mins)):
            raise ValueError(f"tiers must have strictly increasing min_prompt_tokens, got {mins}")
        if mins[0] != 0:
            raise ValueError("the first tier must start at min_prompt_tokens: 0")
        return v


class PowerRouting(_Frozen):
    """Fewest joules per token among placements that meet the SLA and fit the power budget."""

    kind: Literal["power"] = "power"
    decode_selection: DecodeSelection = DecodeSelection.LEAST_LOADED


RoutingConfig = Annotated[
    ContextTTFTRouting | ThresholdRouting | TiersRouting | PowerRouting, Field(discriminator="kind")
]


# ------------------------------------------------------------------------------- SLA, power, admission


class SLAClass(_Frozen):
    name: str = Field(pattern=_NAME)
    ttft_ms: float = Field(gt=0)
    tpot_ms: float = Field(gt=0)
    percentile: float = Field(default=99.0, gt=0, le=100)


def _default_classes() -> tuple[SLAClass, ...]:
    return (SLAClass(name="standard", ttft_ms=2000.0, tpot_ms=200.0, percentile=99.0),)


class SLAConfig(_Frozen):
    default: str = "standard"
    classes: tuple[SLAClass, ...] = Field(default_factory=_default_classes, min_length=1)


class PowerConfig(_Frozen):
    cluster_w: float = Field(gt=0, description="budget for the projected power of every worker")
    pools: dict[str, float] = Field(default_factory=dict, description="optional per-pool budgets, W")
    on_no_fit: NoFitAction = NoFitAction.QUEUE
    queue_cap: int = Field(default=64, ge=0, description="requests held waiting for watts")

    @field_validator("pools")
    @classmethod
    def _positive(cls, v: dict[str, float]) -> dict[str, float]:
        bad = [k for k, x in v.items() if not x > 0]
        if bad:
            raise ValueError(f"per-pool budgets must be > 0 W (not: {', '.join(sorted(bad))})")
        return v


class AdmissionConfig(_Frozen):
    max_waiting: int = Field(default=256, ge=0, description="requests queued over all classes")
    default_queue_cap: int = Field(default=64, ge=0)
    queue_caps: dict[str, int] = Field(default_factory=dict, description="per SLA class")
    reject_unreachable_sla: bool = Field(
        default=True, description="429 when even the best placement's predicted TTFT misses the class"
    )
    min_retry_after_s: float = Field(default=1.0, gt=0)

    @field_validator("queue_caps")
    @classmethod
    def _non_negative(cls, v: dict[str, int]) -> dict[str, int]:
        bad = [k for k, x in v.items() if x < 0]
        if bad:
            raise ValueError(f"queue caps must be >= 0 (negative: {', '.join(sorted(bad))})")
        return v

    def queue_cap(self, sla_class: str) -> int:
        return self.queue_caps.get(sla_class, self.default_queue_cap)


# ------------------------------------------------------------------------------ transport, frontend


class TLSConfig(_Frozen):
    cert_path: str = Field(min_length=1)
    key_path: str = Field(min_length=1)
    ca_path: str | None = None


class KVTransportConfig(_Frozen):
    kind: KVTransportKind = KVTransportKind.GRPC
    auth_token_env: str | None = Field(default=None, description="env var holding the shared token")
    auth_token: str | None = Field(default=None, description="literal shared token (tests, demos)")
    tls: TLSConfig | None = None
    lease_s: float = Field(default=30.0, gt=0, description="a KV reservation not renewed by then is freed")
    deadline_s: float = Field(default=60.0, gt=0, description="a transfer not finished by then fails")
    link: str | None = Field(
        default=None, description="key into the hardware catalog's links (prefill→decode); None = its default"
    )
    port_range: tuple[int, int] | None = Field(
        default=None,
        description="[first, last] TCP ports a decode worker's KV receiver may listen on (its gRPC port and, "
        "without TLS, its data-plane port: the first two free ones in the range, for firewalls); "
        "None = ephemeral ports",
    )

    @field_validator("port_range")
    @classmethod
    def _ports(cls, v: tuple[int, int] | None) -> tuple[int, int] | None:
        if v is not None and not 1024 <= v[0] < v[1] <= 65535:
            raise ValueError(f"port_range must be [first, last] with 1024 <= first < last <= 65535, got {list(v)}")
        return v


class FrontendConfig(_Frozen):
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    served_model_name: str | None = None


# ------------------------------------------------------------------------------------------- root


class TandemConfig(_Frozen):
    """A whole Tandem cluster spec (the root of a serving YAML)."""

    model: ModelConfig
    pools: tuple[PoolConfig, ...] = Field(min_length=1)
    routing: RoutingConfig = Field(default_factory=ContextTTFTRouting)
    sla: SLAConfig = Field(default_factory=SLAConfig)
    power: PowerConfig | None = None
    admission: AdmissionConfig = Field(default_factory=AdmissionConfig)
    kv_transport: KVTransportConfig = Field(default_factory=KVTransportConfig)
    frontend: FrontendConfig = Field(default_factory=FrontendConfig)

    # -- convenience views (pure; the config never changes) --

    @property
    def served_model_name(self) -> str:
        return self.frontend.served_model_name or self.model.name

    def pool(self, name: str) -> PoolConfig:
        for p in self.pools:
            if p.name == name:
                return p
        raise KeyError(f"no pool named {name!r}; pools: {', '.join(p.name for p in self.pools)}")

    def sla_class(self, name: str | None) -> SLAClass:
        """The named class, or the default class for None. KeyError for an unknown name."""
        want = self.sla.default if name is None else name
        for c in self.sla.classes:
            if c.name == want:
                return c
        raise KeyError(f"unknown SLA class {want!r}; classes: {', '.join(c.name for c in self.sla.classes)}")

    @property
    def disaggregated(self) -> bool:
        return any(p.role is Role.PREFILL for p in self.pools)

    def pool_kv_dtype(self, pool: PoolConfig) -> KVDtype:
        return pool.engine.kv_dtype or self.model.kv_dtype

    def pool_block_size(self, pool: PoolConfig) -> int:
        return pool.engine.block_size or self.model.block_size

    def pool_linear_mode(self, pool: PoolConfig) -> LinearMode:
        return pool.engine.linear_mode or self.model.linear_mode
