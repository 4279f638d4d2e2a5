"""Cross-section rules of a Tandem cluster spec, each reported with the path it concerns.

`cross_check(cfg)` returns every violation (never stops at the first). The hardware catalog and
model-shape presets are consulted when they can be imported; a missing catalog is tolerated (the
keys are then checked only for being non-empty).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from orchestrator.config.models import (
    ContextTTFTRouting,
    PowerRouting,
    TandemConfig,
    ThresholdRouting,
    TiersRouting,
)
from orchestrator.core.types import Role


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a config: where (`pools[1].role`), what, and the YAML line if known."""

    path: str
    message: str
    line: int | None = None

    def __str__(self) -> str:
        where = f"{self.path}" + (f" (line {self.line})" if self.line is not None else "")
        return f"{where}: {self.message}"


def _load_catalog() -> Any | None:
    """The hardware catalog if the cost helper's loader is importable, else None (tolerant)."""
    try:
        from orchestrator.core.hardware import HardwareCatalog  # type: ignore[import-not-found]
    except ImportError:
        return None
    try:
        return HardwareCatalog.load_default()
    except Exception:
        return None


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


def cross_check(cfg: TandemConfig, catalog_loader: Callable[[], Any | None] = _load_catalog) -> list[Problem]:
    """Every cross-field problem of an otherwise well-typed config."""
    out: list[Problem] = []
    add = lambda path, msg: out.append(Problem(path, msg))  # noqa: E731

    # pools: unique names, roles that can serve
    seen: dict[str, int] = {}
    for i, p in enumerate(cfg.pools):
        if p.name in seen:
            add(f"pools[{i}].name", f"duplicate pool name {p.name!r} (also pools[{seen[p.name]}])")
        else:
            seen[p.name] = i
    roles = {p.role for p in cfg.pools}
    decode_capable = roles & {Role.DECODE, Role.BOTH}
    if not decode_capable:
        if Role.PREFILL in roles:
            add("pools", "a disaggregated cluster needs a decode (or both) pool to receive the prefill pool's KV")
        else:
            add("pools", "no pool can decode: add a pool with role decode or both")

    # pools agree on the model's KV layout and context length
    if len({cfg.pool_kv_dtype(p) for p in cfg.pools}) > 1:
        for i, p in enumerate(cfg.pools):
            if p.engine.kv_dtype is not None and p.engine.kv_dtype is not cfg.model.kv_dtype:
                add(
                    f"pools[{i}].engine.kv_dtype",
                    f"pools disagree on KV dtype ({p.engine.kv_dtype.value} here, model.kv_dtype "
                    f"{cfg.model.kv_dtype.value}); KV moves between pools, so every pool must store the same",
                )
    for i, p in enumerate(cfg.pools):
        mml = p.engine.max_model_len
        if mml is not None and mml != cfg.model.max_model_len:
            add(
                f"pools[{i}].engine.max_model_len",
                f"{mml} differs from model.max_model_len {cfg.model.max_model_len}; pools must agree on the "
                "context length (a request may land on any of them)",
            )

    # model shape preset
    try:
        from orchestrator.core.model_shape import PRESETS
    except ImportError:  # pragma: no cover - always present in this tree
        PRESETS = {}
    if PRESETS and cfg.model.path is None and cfg.model.shape_name not in PRESETS:
        path = "model.shape" if cfg.model.shape else "model.name"
        add(path, f"unknown model shape {cfg.model.shape_name!r}; known: {', '.join(sorted(PRESETS))}")
    shape = PRESETS.get(cfg.model.shape_name) if PRESETS else None
    if shape is not None and cfg.model.max_model_len > shape.max_position_embeddings:
        add(
            "model.max_model_len",
            f"{cfg.model.max_model_len} exceeds the model's {shape.max_position_embeddings} positions",
        )

    # hardware keys against the catalog (when it exists)
    catalog = catalog_loader()
    if catalog is not None:
        known = _catalog_keys(catalog)
        for i, p in enumerate(cfg.pools):
            if not _has_hw(catalog, p.hardware):
                hint = f"; known: {', '.join(known)}" if known else ""
                add(f"pools[{i}].hardware", f"unknown hardware {p.hardware!r}{hint}")

        link = cfg.kv_transport.link
        links = getattr(catalog, "links", None)
        if link is not None and isinstance(links, Mapping) and link not in links:
            add("kv_transport.link", f"unknown link {link!r}; known: {', '.join(sorted(links))}")

    # routing parameters resolve
    r = cfg.routing
    prefill_pools = {p.name for p in cfg.pools if p.role is Role.PREFILL}
    if isinstance(r, ThresholdRouting | TiersRouting) and not prefill_pools:
        add("routing.kind", f"policy {r.kind!r} sends prefill to a prefill pool, but no pool has role prefill")
    if isinstance(r, TiersRouting):
        for j, t in enumerate(r.tiers):
            if t.pool is not None and t.pool not in prefill_pools:
                add(
                    f"routing.tiers[{j}].pool",
                    f"{t.pool!r} is not a prefill pool; prefill pools: {', '.join(sorted(prefill_pools)) or 'none'}",
                )
    if isinstance(r, PowerRouting) and cfg.power is None:
        add("routing.kind", "policy 'power' needs a power section with cluster_w")
    _ = ContextTTFTRouting  # every policy's own fields are checked by its model

    # SLA classes
    names: dict[str, int] = {}
    for i, c in enumerate(cfg.sla.classes):
        if c.name in names:
            add(f"sla.classes[{i}].name", f"duplicate SLA class {c.name!r} (also sla.classes[{names[c.name]}])")
        else:
            names[c.name] = i
    if cfg.sla.default not in names:
        add("sla.default", f"default class {cfg.sla.default!r} is not among {', '.join(names)}")
    for k in cfg.admission.queue_caps:
        if k not in names:
            add(f"admission.queue_caps.{k}", f"unknown SLA class {k!r}; classes: {', '.join(names)}")

    # power budget
    if cfg.power is not None:
        for k, w in cfg.power.pools.items():
            if k not in seen:
                add(f"power.pools.{k}", f"unknown pool {k!r}; pools: {', '.join(seen)}")
            elif w > cfg.power.cluster_w:
                add(f"power.pools.{k}", f"{w} W exceeds the cluster budget {cfg.power.cluster_w} W")
        if catalog is not None:
            idle_w = 0.0
            ok = True
            for p in cfg.pools:
                try:
                    idle_w += float(catalog[p.hardware].idle_w) * p.replicas
                except Exception:
                    ok = False
            if ok and idle_w > cfg.power.cluster_w:
                add(
                    "power.cluster_w",
                    f"{cfg.power.cluster_w} W is below the fleet's idle draw {idle_w:.0f} W: nothing could run",
                )

    # transport
    kvt = cfg.kv_transport
    if kvt.auth_token_env is not None and kvt.auth_token is not None:
        add("kv_transport.auth_token", "give either auth_token_env or auth_token, not both")
    return out
