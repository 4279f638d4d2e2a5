"""The Ray actors of one cluster spec: one actor per pool replica, placed by the pool's resources.

`Deployment(config).start()` creates `PrefillWorker` actors for role `prefill` and `DecodeWorker`
actors for roles `decode` and `both`, named `<pool>-<i>` (the simulator's worker ids too), waits for
each engine to load and keeps its `info()` (KV layout, KV address, context length). `shutdown()`
stops receivers and engine loops, then kills the actors. `check_leaks()` asks every worker.

Placement: each replica asks Ray for the pool's `num_cpus`, `num_gpus`, custom `resources` and
`accelerator_type`, so `ray up` clusters whose nodes declare role resources (cluster_configs/ray/)
put prefill on prefill nodes and decode on decode nodes.
"""

from __future__ import annotations

import logging
import os
import secrets
from dataclasses import dataclass
from typing import Any

import ray

from orchestrator.config.models import KVTransportKind, PoolConfig, TandemConfig
from orchestrator.core.types import Role, TandemError

log = logging.getLogger(__name__)

ACTOR_MAX_CONCURRENCY = 64  # threaded actors: concurrent drain long-polls + control calls


class DeploymentError(TandemError):
    """The cluster spec cannot be deployed as asked (missing token, workers failed to start, ...)."""


@dataclass
class WorkerHandle:
    """One live worker: its spec, its actor handle and what it reported at start."""

    spec: Any  # workers.decode.WorkerSpec
    pool: PoolConfig
    actor: Any
    info: dict[str, Any]

    @property
    def worker_id(self) -> str:
        return str(self.spec.worker_id)

    @property
    def role(self) -> Role:
        return self.pool.role


def resolve_auth_token(config: TandemConfig) -> str:
    """The KV channel's shared token: the literal in the config, else its env var, else a fresh one.

    A fresh random token is safe here because the driver hands it to both ends of every transfer."""
    kv = config.kv_transport
    if kv.auth_token:
        return kv.auth_token
    if kv.auth_token_env and os.environ.get(kv.auth_token_env):
        return os.environ[kv.auth_token_env]
    return secrets.token_urlsafe(24)


def engine_kwargs(config: TandemConfig, pool: PoolConfig) -> dict[str, Any]:
    """EngineConfig fields for a pool: the model section with the pool's overrides."""
    m, e = config.model, pool.engine
    return {
        "dtype": m.dtype, "linear_mode": config.pool_linear_mode(pool), "fp8_format": m.fp8_format,
        "kv_dtype": config.pool_kv_dtype(pool), "block_size": config.pool_block_size(pool),
        "num_blocks": e.num_kv_blocks or 256, "max_batch_size": e.max_batch_size or 32,
        "max_model_len": e.max_model_len or m.max_model_len,
    }


def worker_specs(config: TandemConfig, auth_token: str) -> list[Any]:
    """One WorkerSpec per replica, sorted by worker id."""
    from workers.decode import WorkerSpec

    kv = config.kv_transport
    if config.disaggregated and kv.kind is not KVTransportKind.GRPC:
        raise DeploymentError("a disaggregated cluster moves KV between Ray actors: kv_transport.kind must be "
                              f"grpc (got {kv.kind.value}; inprocess only works colocated)")
    tls = None
    if kv.tls is not None:
        tls = {"cert_chain_path": kv.tls.cert_path, "private_key_path": kv.tls.key_path,
               "root_ca_path": kv.tls.ca_path}
    specs = []
    for pool in config.pools:
        for i in range(pool.replicas):
            specs.append(WorkerSpec(
                worker_id=f"{pool.name}-{i}", pool=pool.name, role=pool.role, hardware=pool.hardware,
                accelerator=pool.placement.accelerator_type, model=config.model.path or config.model.name,
                engine=pool.engine.kind.value, engine_kwargs=engine_kwargs(config, pool), kv_kind=kv.kind.value,
                auth_token=auth_token,
                tls=tls, lease_s=kv.lease_s, deadline_s=kv.deadline_s, kv_port_range=kv.port_range,
            ))
    return sorted(specs, key=lambda s: s.worker_id)


def actor_options(pool: PoolConfig, name: str | None) -> dict[str, Any]:
    p = pool.placement
    opts: dict[str, Any] = {"num_cpus": p.num_cpus, "num_gpus": p.num_gpus, "max_concurrency": ACTOR_MAX_CONCURRENCY,
                            "max_restarts": 0}
    if p.resources:
        opts["resources"] = dict(p.resources)
    if p.accelerator_type:
        opts["accelerator_type"] = p.accelerator_type
    if name:
        opts["name"] = name
    return opts


class Deployment:
    """The workers of one cluster spec on the connected Ray cluster."""

    def __init__(self, config: TandemConfig, *, name: str = "tandem", auth_token: str | None = None) -> None:
        self.config = config
        self.name = name
        self.auth_token = auth_token or resolve_auth_token(config)
        self.workers: dict[str, WorkerHandle] = {}

    def start(self, timeout_s: float = 180.0) -> Deployment:
        """Create every actor and wait for its engine. Raises DeploymentError naming the worker."""
        from workers.decode import DecodeWorker
        from workers.prefill import PrefillWorker

        if not ray.is_initialized():
            raise DeploymentError("Ray is not initialized: call orchestrator.runtime.ray_local.init_local_ray() "
                                  "or ray.init(address=...) first")
        pending: dict[str, tuple[Any, PoolConfig, Any]] = {}
        for spec in worker_specs(self.config, self.auth_token):
            pool = self.config.pool(spec.pool)
            cls = PrefillWorker if pool.role is Role.PREFILL else DecodeWorker
            actor = ray.remote(cls).options(**actor_options(pool, f"{self.name}:{spec.worker_id}")).remote(spec)
            pending[spec.worker_id] = (spec, pool, actor)
        refs = {wid: a.info.remote() for wid, (_, _, a) in pending.items()}
        try:
            infos = dict(zip(refs, ray.get(list(refs.values()), timeout=timeout_s), strict=True))
        except Exception as e:
            for _, _, a in pending.values():
                ray.kill(a)
            raise DeploymentError(f"workers of {self.name!r} failed to start: {type(e).__name__}: {e}") from e
        for wid, (spec, pool, actor) in sorted(pending.items()):
            self.workers[wid] = WorkerHandle(spec, pool, actor, infos[wid])
        self._check_layouts()
        return self

    def _check_layouts(self) -> None:
        layouts = {h.worker_id: h.info["kv_layout"] for h in self.workers.values()}
        first_id, first = next(iter(layouts.items()))
        for wid, lay in layouts.items():
            diffs = first.mismatches(lay)
            if diffs:
                raise DeploymentError(f"workers {first_id} and {wid} disagree on the KV layout: {'; '.join(diffs)}")

    @property
    def max_model_len(self) -> int:
        return min(int(h.info["max_model_len"]) for h in self.workers.values())

    @property
    def vocab_size(self) -> int:
        return min(int(h.info["vocab_size"]) for h in self.workers.values())

    def decode_capable(self) -> list[WorkerHandle]:
        return [h for h in self.workers.values() if h.role in (Role.DECODE, Role.BOTH)]

    def check_leaks(self, timeout_s: float = 30.0) -> list[str]:
        """What every worker still holds ([] when nothing leaked)."""
        refs = [h.actor.check_leaks.remote() for h in self.workers.values()]
        return [r for r in ray.get(refs, timeout=timeout_s) if r]

    def shutdown(self, timeout_s: float = 15.0) -> None:
        """Stop receivers and engine loops, then kill the actors. Safe to call twice."""
        handles = list(self.workers.values())
        self.workers = {}
        refs = [h.actor.shutdown.remote() for h in handles]
        try:
            ray.get(refs, timeout=timeout_s)
        except Exception as e:  # a dead or stuck worker must not stop the others from going
            log.warning("shutdown of %s: %s", self.name, e)
        for h in handles:
            ray.kill(h.actor)
