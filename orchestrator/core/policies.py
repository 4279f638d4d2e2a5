"""The built-in routing policies. Each ranks placements; the router then applies the power budget.

Notation: d = least-loaded decode worker (see router.least_loaded_key), P = healthy workers of prefill
pools, T(x) = predicted TTFT of placement x (estimates.py), s = prompt tokens.

- context-ttft: remote on p* = argmin_{p∈P} T(p→d)  if  T(p*→d) + margin < T(local d), else local.
- threshold:    remote on p* = argmin_{p∈P} T(p→d)  if  s ≥ threshold_tokens, else local.
- tiers:        tier = the last with min_prompt_tokens ≤ s; remote on argmin_{p∈P(tier.pool)} T(p→d),
                or local when tier.pool is null.
- power:        argmin over x ∈ {local d_k} ∪ {p→d_k : p ∈ P} (d_k: least-loaded worker of decode
                pool k) of J/token(x), among x with T(x) ≤ ttft_ms and tpot(x) ≤ tpot_ms of the
                request's SLA class; if none meets it, argmin T(x). Ties: T(x), then worker ids.

After the first choice every other placement follows, in the policy's fallback order, so that the
router can fall back when the first is over the power budget. A remote choice with no healthy
prefill worker falls back to local prefill (NO_PREFILL_WORKER).
"""

from __future__ import annotations

from collections.abc import Sequence

from orchestrator.config.models import (
    ContextTTFTRouting,
    PowerRouting,
    RoutingKind,
    ThresholdRouting,
    TiersRouting,
)
from orchestrator.core.estimates import Placement, _fmt
from orchestrator.core.router import Candidate, RouteContext, RouteReason, register_policy
from orchestrator.core.snapshot import ClusterSnapshot, RouteRequest, WorkerSnapshot


def _fallbacks(first: Placement, others: Sequence[Placement], reason: RouteReason, why: str) -> list[Candidate]:
    """The policy's choice first, then the rest fastest-first (each described by its own numbers)."""
    rest = sorted((o for o in others if o.key() != first.key()), key=lambda o: (o.ttft_ms, o.key()))
    return [Candidate(first, reason, why)] + [
        Candidate(o, reason, f"fallback {o.describe()}") for o in rest
    ]


def _no_prefill(req: RouteRequest, ctx: RouteContext, d: WorkerSnapshot, why: str) -> list[Candidate]:
    local = ctx.estimator.estimate(req, d, None)
    return [Candidate(local, RouteReason.NO_PREFILL_WORKER, f"{why}; {local.describe()}")]


@register_policy(RoutingKind.CONTEXT_TTFT)
class ContextTTFTPolicy:
    kind = RoutingKind.CONTEXT_TTFT

    def __init__(self, cfg: ContextTTFTRouting) -> None:
        self.cfg = cfg

    def candidates(
        self, req: RouteRequest, snap: ClusterSnapshot, decodes: Sequence[WorkerSnapshot], ctx: RouteContext
    ) -> list[Candidate]:
        d = decodes[0]
        local = ctx.estimator.estimate(req, d, None)
        remotes = ctx.best_remote(req, d, snap.prefill_workers())
        if not remotes:
            return [Candidate(local, RouteReason.COLOCATED, f"no prefill pool; {local.describe()}")]
        best = remotes[0]
        margin = self.cfg.remote_margin_ms
        vs = f"{local.describe()} vs {best.describe()}"
        if margin:
            vs += f" (+ margin {_fmt(margin)})"
        if best.ttft_ms + margin < local.ttft_ms:
            return _fallbacks(best, [local, *remotes], RouteReason.REMOTE_FASTER, f"{vs}; remote")
        return _fallbacks(local, remotes, RouteReason.LOCAL_FASTER, f"{vs}; local")


@register_policy(RoutingKind.THRESHOLD)
class ThresholdPolicy:
    kind = RoutingKind.THRESHOLD

    def __init__(self, cfg: ThresholdRouting) -> None:
        self.cfg = cfg

    def candidates(
        self, req: RouteRequest, snap: ClusterSnapshot, decodes: Sequence[WorkerSnapshot], ctx: RouteContext
    ) -> list[Candidate]:
        d = decodes[0]
        t = self.cfg.threshold_tokens
        if req.prompt_tokens < t:
            local = ctx.estimator.estimate(req, d, None)
            remotes = ctx.best_remote(req, d, snap.prefill_workers())
            why = f"prompt {req.prompt_tokens} < threshold {t}; {local.describe()}"
            return _fallbacks(local, remotes, RouteReason.BELOW_THRESHOLD, why)
        remotes = ctx.best_remote(req, d, snap.prefill_workers())
        if not remotes:
            return _no_prefill(req, ctx, d, f"prompt {req.prompt_tokens} >= threshold {t} but no healthy prefill worker")
        local = ctx.estimator.estimate(req, d, None)
        why = f"prompt {req.prompt_tokens} >= threshold {t}; {remotes[0].describe()}"
        return _fallbacks(remotes[0], [*remotes, local], RouteReason.AT_OR_ABOVE_THRESHOLD, why)


@register_policy(RoutingKind.TIERS)
class TiersPolicy:
    kind = RoutingKind.TIERS

    def __init__(self, cfg: TiersRouting) -> None:
        self.cfg = cfg

    def candidates(
        self, req: RouteRequest, snap: ClusterSnapshot, decodes: Sequence[WorkerSnapshot], ctx: RouteContext
    ) -> list[Candidate]:
        d = decodes[0]
        tier = [t for t in self.cfg.tiers if t.min_prompt_tokens <= req.prompt_tokens][-1]
        label = f"prompt {req.prompt_tokens} in tier >= {tier.min_prompt_tokens}"
        local = ctx.estimator.estimate(req, d, None)
        everyone = ctx.best_remote(req, d, snap.prefill_workers())
        if tier.pool is None:
            return _fallbacks(local, everyone, RouteReason.TIER_LOCAL, f"{label} → local; {local.describe()}")
        mine = ctx.best_remote(req, d, snap.prefill_workers(tier.pool))
        if not mine:
            return _no_prefill(req, ctx, d, f"{label} → pool {tier.pool}, which has no healthy worker")
        why = f"{label} → pool {tier.pool}; {mine[0].describe()}"
        return _fallbacks(mine[0], [*mine, *everyone, local], RouteReason.TIER_REMOTE, why)


@register_policy(RoutingKind.POWER)
class PowerPolicy:
    kind = RoutingKind.POWER

    def __init__(self, cfg: PowerRouting) -> None:
        self.cfg = cfg

    def candidates(
        self, req: RouteRequest, snap: ClusterSnapshot, decodes: Sequence[WorkerSnapshot], ctx: RouteContext
    ) -> list[Candidate]:
        sla = ctx.sla(req)
        per_pool_d: dict[str, WorkerSnapshot] = {}
        for d in decodes:  # least loaded first: keep the first of each decode pool
            per_pool_d.setdefault(d.pool, d)
        prefills = snap.prefill_workers()
        options: list[Placement] = []
        for d in sorted(per_pool_d.values(), key=lambda w: w.worker_id):
            options.append(ctx.estimator.estimate(req, d, None, full=True))
            # every prefill worker: a busy one adds no watts and may be the only fit under the cap
            options.extend(ctx.estimator.estimate(req, d, p, full=True) for p in prefills)

        def meets(x: Placement) -> bool:
            return x.ttft_ms <= sla.ttft_ms and (x.tpot_ms or 0.0) <= sla.tpot_ms

        ok = sorted((x for x in options if meets(x)), key=lambda x: (x.energy_per_token_j or 0.0, x.ttft_ms, x.key()))
        miss = sorted((x for x in options if not meets(x)), key=lambda x: (x.ttft_ms, x.key()))
        target = f"SLA {sla.name}: ttft <= {_fmt(sla.ttft_ms)}ms, tpot <= {_fmt(sla.tpot_ms)}ms"
        out: list[Candidate] = []
        for i, x in enumerate(ok):
            if i == 0:
                why = f"{x.describe()}: fewest J/token of {len(ok)}/{len(options)} meeting {target}"
            else:
                why = f"fallback {x.describe()}"
            out.append(Candidate(x, RouteReason.LEAST_ENERGY, why))
        for i, x in enumerate(miss):
            if i == 0 and not ok:
                why = f"none of {len(options)} placements meets {target}; fastest {x.describe()}"
            else:
                why = f"fallback {x.describe()} (misses SLA)"
            out.append(Candidate(x, RouteReason.SLA_MISS_FASTEST, why))
        return out
