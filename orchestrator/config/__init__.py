"""Tandem cluster specs: pydantic v2 models of one serving YAML, validated once at the edge, then frozen.

Reading path: `models.py` (the schema) → `checks.py` (cross-section rules) → `loader.py`
(`load_config`, `ConfigError` with every problem and its path) → `cli.py` (`tandem validate-config`).
"""

from orchestrator.config.checks import Problem
from orchestrator.config.loader import ConfigError, load_config, load_config_text, parse_config
from orchestrator.config.models import (
    AdmissionConfig,
    ContextTTFTRouting,
    DecodeSelection,
    EngineOverrides,
    FrontendConfig,
    KVTransportConfig,
    KVTransportKind,
    ModelConfig,
    NoFitAction,
    PlacementConfig,
    PoolConfig,
    PowerConfig,
    PowerRouting,
    RoutingKind,
    SLAClass,
    SLAConfig,
    TandemConfig,
    ThresholdRouting,
    Tier,
    TiersRouting,
    TLSConfig,
)

__all__ = [
    "AdmissionConfig",
    "ConfigError",
    "ContextTTFTRouting",
    "DecodeSelection",
    "EngineOverrides",
    "FrontendConfig",
    "KVTransportConfig",
    "KVTransportKind",
    "ModelConfig",
    "NoFitAction",
    "PlacementConfig",
    "PoolConfig",
    "PowerConfig",
    "PowerRouting",
    "Problem",
    "RoutingKind",
    "SLAClass",
    "SLAConfig",
    "TLSConfig",
    "TandemConfig",
    "ThresholdRouting",
    "Tier",
    "TiersRouting",
    "load_config",
    "load_config_text",
    "parse_config",
]
