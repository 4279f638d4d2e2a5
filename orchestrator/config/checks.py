"""Cross-section rules of a Tandem cluster spec, each reported with the path it concerns.

`cross_check(cfg)` returns every violation (never stops at the first). The hardware catalog and
model-shape presets are consulted when they can be imported; a missing catalog is tolerated (the
keys are then checked only for being non-empty).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter, ValidationError

from orchestrator.config.models import (
    AdmissionConfig,
    KVTransportConfig,
    ModelConfig,
    PoolConfig,
    PowerConfig,
    PowerRouting,
    RoutingConfig,
    SLAConfig,
    TandemConfig,
    ThresholdRouting,
    TiersRouting,
)
from orchestrator.core.model_shape import PRESETS
from orchestrator.core.types import EngineKind, Role

_ROUTING: TypeAdapter[Any] = TypeAdapter(RoutingConfig)


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a config: where (`pools[1].role`), what, and the YAML line if known."""

    path: str
    message: str
    line: int | None = None

    def __str__(self) -> str:
        where = f"{self.path}" + (f" (line {self.line})" if self.line is not None else "")
        return f"{where}: {self.message}"


_CATALOG_MEMO: dict[tuple[Any, ...], Any] = {}


def _load_catalog() -> Any | None:
    """The hardware catalog if it loads, else None (tolerant). Memoised until a catalog file changes."""
    try:
        from orchestrator.core.hardware import CATALOG_ENV, DEFAULT_CATALOG_DIR, HardwareCatalog
    except ImportError:
        return None
    where = Path(os.environ.get(CATALOG_ENV) or DEFAULT_CATALOG_DIR)
    try:
        files = sorted(where.glob("*.yaml")) if where.is_dir() else [where]
        key = (str(where), *((str(f), f.stat().st_mtime_ns) for f in files))
    except OSError:
        return None
    if key not in _CATALOG_MEMO:
        try:
            _CATALOG_MEMO.clear()
            _CATALOG_MEMO[key] = HardwareCatalog.load_default()
        except Exception:
            return None
    return _CATALOG_MEMO[key]


def _catalog_keys(catalog: Any) -> list[str] | None:
    for attr in ("keys", "names"):
        fn = getattr(catalog, attr, None)
        if callable(fn):
            try:
                return sorted(str(k) for k in fn())
            except Exception:
                return None
    return None


def _has_hw(catalog: Any, key: str) -> bool:
    try:
        catalog[key]
    except Exception:
        return False
    return True


@dataclass
class Parts:
    """The sections of a config that validated on their own (None / missing when they did not).

    Cross-section rules run on whatever is valid, so that a file with field errors still gets every
    cross-section problem that can be judged. `pools` keeps each valid pool with its index in the file.
    """

    model: ModelConfig | None = None
    pools: list[tuple[int, PoolConfig]] = field(default_factory=list)
    pools_complete: bool = False  # every pool of the file validated
    routing: Any = None  # one of the RoutingConfig models
    sla: SLAConfig | None = None
    power: PowerConfig | None = None
    power_ok: bool = False  # the power section is absent/null, or validated
    admission: AdmissionConfig | None = None
    kv: KVTransportConfig | None = None


def parts_of(cfg: TandemConfig) -> Parts:
    return Parts(
        cfg.model, list(enumerate(cfg.pools)), True, cfg.routing, cfg.sla, cfg.power, True, cfg.admission,
        cfg.kv_transport,
    )


def _try(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except ValidationError:
        return None


def parts_from_data(data: Mapping[str, Any]) -> Parts:
    """Validate each section of raw YAML data on its own (defaults for absent sections)."""
    parts = Parts()
    if "model" in data:
        parts.model = _try(lambda: ModelConfig.model_validate(data["model"]))
    raw_pools = data.get("pools")
    if isinstance(raw_pools, list):
        for i, raw in enumerate(raw_pools):
            pool = _try(functools.partial(PoolConfig.model_validate, raw))
            if pool is not None:
                parts.pools.append((i, pool))
        parts.pools_complete = bool(raw_pools) and len(parts.pools) == len(raw_pools)
    parts.routing = _try(lambda: _ROUTING.validate_python(data.get("routing") or {"kind": "context-ttft"}))
    parts.sla = _try(lambda: SLAConfig.model_validate(data.get("sla") or {}))
    if data.get("power") is None:
        parts.power_ok = True
    else:
        parts.power = _try(lambda: PowerConfig.model_validate(data["power"]))
        parts.power_ok = parts.power is not None
    parts.admission = _try(lambda: AdmissionConfig.model_validate(data.get("admission") or {}))
    parts.kv = _try(lambda: KVTransportConfig.model_validate(data.get("kv_transport") or {}))
    return parts


def cross_check(cfg: TandemConfig, catalog_loader: Callable[[], Any | None] = _load_catalog) -> list[Problem]:
    """Every cross-field problem of a well-typed config."""
    return check_parts(parts_of(cfg), catalog_loader)


def check_parts(parts: Parts, catalog_loader: Callable[[], Any | None] = _load_catalog) -> list[Problem]:
    """Every cross-section problem that the valid sections allow judging."""
    out: list[Problem] = []
    add = lambda path, msg: out.append(Problem(path, msg))  # noqa: E731
    model, pools, complete = parts.model, parts.pools, parts.pools_complete

    # pools: unique names, roles that can serve
    seen: dict[str, int] = {}
    for i, p in pools:
        if p.name in seen:
            add(f"pools[{i}].name", f"duplicate pool name {p.name!r} (also pools[{seen[p.name]}])")
        else:
            seen[p.name] = i
    roles = {p.role for _, p in pools}
    if complete and not roles & {Role.DECODE, Role.BOTH}:
        if Role.PREFILL in roles:
            add("pools", "a disaggregated cluster needs a decode (or both) pool to receive the prefill pool's KV")
        else:
            add("pools", "no pool can decode: add a pool with role decode or both")

    # pools agree on the model's KV layout and context length
    if model is not None:
        for i, p in pools:
            if p.engine.kv_dtype is not None and p.engine.kv_dtype is not model.kv_dtype:
                add(
                    f"pools[{i}].engine.kv_dtype",
                    f"pools disagree on KV dtype ({p.engine.kv_dtype.value} here, model.kv_dtype "
                    f"{model.kv_dtype.value}); KV moves between pools, so every pool must store the same",
                )
            if p.engine.kind is EngineKind.VLLM:
                bs = p.engine.block_size or model.block_size
                if bs % 32:
                    add(f"pools[{i}].engine.block_size",
                        f"{bs}: a vllm pool needs a block size that is a multiple of 32 (vLLM's CPU kernels)")
                if model.path is None:
                    add(f"pools[{i}].engine.kind",
                        "a vllm pool needs model.path (a local checkpoint directory); built-in presets are native-only")
            mml = p.engine.max_model_len
            if mml is not None and mml != model.max_model_len:
                add(
                    f"pools[{i}].engine.max_model_len",
                    f"{mml} differs from model.max_model_len {model.max_model_len}; pools must agree on the "
                    "context length (a request may land on any of them)",
                )
        # model shape preset
        if model.path is None and model.shape_name not in PRESETS:
            path = "model.shape" if model.shape else "model.name"
            add(path, f"unknown model shape {model.shape_name!r}; known: {', '.join(sorted(PRESETS))}")
        shape = PRESETS.get(model.shape_name)
        if shape is not None and model.max_model_len > shape.max_position_embeddings:
            add(
                "model.max_model_len",
                f"{model.max_model_len} exceeds the model's {shape.max_position_embeddings} positions",
            )

    # hardware keys and the KV link against the catalog (when it exists)
    catalog = catalog_loader()
    if catalog is not None:
        known = _catalog_keys(catalog)
        for i, p in pools:
            if not _has_hw(catalog, p.hardware):
                hint = f"; known: {', '.join(known)}" if known else ""
                add(f"pools[{i}].hardware", f"unknown hardware {p.hardware!r}{hint}")
        link = parts.kv.link if parts.kv is not None else None
        links = getattr(catalog, "links", None)
        if link is not None and isinstance(links, Mapping) and link not in links:
            add("kv_transport.link", f"unknown link {link!r}; known: {', '.join(sorted(links))}")

    # routing parameters resolve
    r = parts.routing
    prefill_pools = {p.name for _, p in pools if p.role is Role.PREFILL}
    if complete and isinstance(r, ThresholdRouting | TiersRouting) and not prefill_pools:
        add("routing.kind", f"policy {r.kind!r} sends prefill to a prefill pool, but no pool has role prefill")
    if complete and isinstance(r, TiersRouting):
        for j, t in enumerate(r.tiers):
            if t.pool is not None and t.pool not in prefill_pools:
                add(
                    f"routing.tiers[{j}].pool",
                    f"{t.pool!r} is not a prefill pool; prefill pools: {', '.join(sorted(prefill_pools)) or 'none'}",
                )
    if isinstance(r, PowerRouting) and parts.power_ok and parts.power is None:
        add("routing.kind", "policy 'power' needs a power section with cluster_w")

    # SLA classes
    names: dict[str, int] = {}
    if parts.sla is not None:
        for i, c in enumerate(parts.sla.classes):
            if c.name in names:
                add(f"sla.classes[{i}].name", f"duplicate SLA class {c.name!r} (also sla.classes[{names[c.name]}])")
            else:
                names[c.name] = i
        if parts.sla.default not in names:
            add("sla.default", f"default class {parts.sla.default!r} is not among {', '.join(names)}")
        if parts.admission is not None:
            for k in parts.admission.queue_caps:
                if k not in names:
                    add(f"admission.queue_caps.{k}", f"unknown SLA class {k!r}; classes: {', '.join(names)}")

    # power budget
    pw = parts.power
    if pw is not None:
        for k, w in pw.pools.items():
            if complete and k not in seen:
                add(f"power.pools.{k}", f"unknown pool {k!r}; pools: {', '.join(seen)}")
            elif w > pw.cluster_w:
                add(f"power.pools.{k}", f"{w} W exceeds the cluster budget {pw.cluster_w} W")
        if catalog is not None and complete:
            idle_w = 0.0
            ok = True
            for _, p in pools:
                try:
                    idle_w += float(catalog[p.hardware].idle_w) * p.replicas
                except Exception:
                    ok = False
            if ok and idle_w > pw.cluster_w:
                add(
                    "power.cluster_w",
                    f"{pw.cluster_w} W is below the fleet's idle draw {idle_w:.0f} W: nothing could run",
                )

    # transport
    kvt = parts.kv
    if kvt is not None and kvt.auth_token_env is not None and kvt.auth_token is not None:
        add("kv_transport.auth_token", "give either auth_token_env or auth_token, not both")
    return out
