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

from collections.abc import Iterator, Sequence

from orchestrator.config.models import (
    ContextTTFTRouting,
    PowerRouting,
    RoutingKind,
    ThresholdRouting,
    TiersRouting,
)
from orchestrator.core.estimates import Local, Placement, Scan, _fmt
from orchestrator.core.router import Candidate, RouteContext, RouteReason, register_policy
from orchestrator.core.snapshot import ClusterSnapshot, RouteRequest, WorkerSnapshot

_new = tuple.__new__


def _fallbacks(
    ctx: RouteContext,
    req: RouteRequest,
    d: WorkerSnapshot,
    first: Placement,
    prefills: Sequence[WorkerSnapshot],
    reason: RouteReason,
    *,
    local: bool = True,
) -> Iterator[Candidate]:
    """Every other placement on d (remote on `prefills`, and local), fastest first. Lazy: the router
    asks for these only when the policy's first choice is over the power budget."""
    others = ctx.estimator.remotes_by_ttft(req, d, prefills)
    if local:
        others.append(ctx.estimator.estimate(req, d, None))
    others.sort(key=lambda o: (o.ttft_ms, o.key()))
    for o in others:
        if o.key() != first.key():
            yield Candidate(o, reason, "")


def _no_prefill(req: RouteRequest, ctx: RouteContext, d: WorkerSnapshot, why: str) -> Iterator[Candidate]:
    local = ctx.estimator.estimate(req, d, None)
    yield Candidate(local, RouteReason.NO_PREFILL_WORKER, f"{why}; {local.describe()}")


class ContextTTFTPolicy:
    kind = RoutingKind.CONTEXT_TTFT

    def __init__(self, cfg: ContextTTFTRouting) -> None:
        self.cfg = cfg

    def first_candidate(
        self, req: RouteRequest, snap: ClusterSnapshot, decodes: Sequence[WorkerSnapshot], ctx: RouteContext
    ) -> Candidate:
        """`next(iter(self.candidates(...)))` without the generator (the router's path without a
        power budget takes only the first)."""
        return self._first(req, snap, decodes[0], ctx)[0]

    def _first(
        self, req: RouteRequest, snap: ClusterSnapshot, d: WorkerSnapshot, ctx: RouteContext
    ) -> tuple[Candidate, Placement, Placement | None, bool]:
        est = ctx.estimator
        return self._choose(est.local_placement(req, d), est.fastest_remote(req, d, snap.prefill_view()))

    def first_from_scan(
        self, req: RouteRequest, fastest: tuple[Sequence[WorkerSnapshot], Scan, Local]
    ) -> Candidate:
        """`first_candidate(...)` from the router's evaluation of this request on this snapshot state
        (`RouteEval.fastest`: the prefill scan and the least-loaded decode worker's local numbers, which
        `Estimator.local_placement` and `fastest_remote` would take from their hint): the same candidate."""
        _, (p, fq, fpf, ftr), (d, q, pf) = fastest
        mt = req.max_tokens
        if p is None:
            return self._choose(Placement(d.worker_id, None, q * 1e3, pf * 1e3, 0.0, max_tokens=mt), None)[0]
        # _choose's comparison on the Placements' ttft_ms (the same sums), building only the chosen one
        # now and the other only if the arithmetic is read
        local_ms = (q * 1e3, pf * 1e3, 0.0)
        remote_ms = (fq * 1e3, fpf * 1e3, ftr * 1e3)
        margin = self.cfg.remote_margin_ms
        remote = remote_ms[0] + remote_ms[1] + remote_ms[2] + margin < local_ms[0] + local_ms[1] + local_ms[2]

        def why() -> str:
            return self._choose(Placement(d.worker_id, None, *local_ms, max_tokens=mt),
                                Placement(d.worker_id, p.worker_id, *remote_ms, max_tokens=mt))[0].arithmetic

        # (the tuples built directly: Placement(...) with these fields and defaults, without the
        # namedtuple's Python-level __new__)
        if remote:
            return Candidate(_new(Placement, (d.worker_id, p.worker_id, *remote_ms, None, None, mt)),
                             RouteReason.REMOTE_FASTER, why)
        return Candidate(_new(Placement, (d.worker_id, None, *local_ms, None, None, mt)), RouteReason.LOCAL_FASTER, why)

    def _choose(
        self, local: Placement, best: Placement | None
    ) -> tuple[Candidate, Placement, Placement | None, bool]:
        if best is None:
            return Candidate(local, RouteReason.COLOCATED, f"no prefill pool; {local.describe()}"), local, None, False
        margin = self.cfg.remote_margin_ms
        remote = best.ttft_ms + margin < local.ttft_ms

        def why() -> str:  # formatted only if someone reads the decision's arithmetic
            vs = f"{local.describe()} vs {best.describe()}"
            if margin:
                vs += f" (+ margin {_fmt(margin)})"
            return f"{vs}; remote" if remote else f"{vs}; local"

        if remote:
            return Candidate(best, RouteReason.REMOTE_FASTER, why), local, best, True
        return Candidate(local, RouteReason.LOCAL_FASTER, why), local, best, False

    def candidates(
        self, req: RouteRequest, snap: ClusterSnapshot, decodes: Sequence[WorkerSnapshot], ctx: RouteContext
    ) -> Iterator[Candidate]:
        d = decodes[0]
        first, local, best, remote = self._first(req, snap, d, ctx)
        yield first
        if best is None:
            return
        prefills = snap.prefill_view()
        if remote:
            yield from _fallbacks(ctx, req, d, best, prefills, RouteReason.REMOTE_FASTER)
        else:
            yield from _fallbacks(ctx, req, d, local, prefills, RouteReason.LOCAL_FASTER, local=False)


class ThresholdPolicy:
    kind = RoutingKind.THRESHOLD

    def __init__(self, cfg: ThresholdRouting) -> None:
        self.cfg = cfg

    def candidates(
        self, req: RouteRequest, snap: ClusterSnapshot, decodes: Sequence[WorkerSnapshot], ctx: RouteContext
    ) -> Iterator[Candidate]:
        d = decodes[0]
        t = self.cfg.threshold_tokens
        prefills = snap.prefill_workers()
        if req.prompt_tokens < t:
            local = ctx.estimator.estimate(req, d, None)
            why = f"prompt {req.prompt_tokens} < threshold {t}; {local.describe()}"
            yield Candidate(local, RouteReason.BELOW_THRESHOLD, why)
            yield from _fallbacks(ctx, req, d, local, prefills, RouteReason.BELOW_THRESHOLD, local=False)
            return
        best = ctx.estimator.fastest_remote(req, d, prefills)
        if best is None:
            yield from _no_prefill(
                req, ctx, d, f"prompt {req.prompt_tokens} >= threshold {t} but no healthy prefill worker"
            )
            return
        why = f"prompt {req.prompt_tokens} >= threshold {t}; {best.describe()}"
        yield Candidate(best, RouteReason.AT_OR_ABOVE_THRESHOLD, why)
        yield from _fallbacks(ctx, req, d, best, prefills, RouteReason.AT_OR_ABOVE_THRESHOLD)


class TiersPolicy:
    kind = RoutingKind.TIERS

    def __init__(self, cfg: TiersRouting) -> None:
        self.cfg = cfg

    def candidates(
        self, req: RouteRequest, snap: ClusterSnapshot, decodes: Sequence[WorkerSnapshot], ctx: RouteContext
    ) -> Iterator[Candidate]:
        d = decodes[0]
        tier = [t for t in self.cfg.tiers if t.min_prompt_tokens <= req.prompt_tokens][-1]
        label = f"prompt {req.prompt_tokens} in tier >= {tier.min_prompt_tokens}"
        everyone = snap.prefill_workers()
        if tier.pool is None:
            local = ctx.estimator.estimate(req, d, None)
            yield Candidate(local, RouteReason.TIER_LOCAL, f"{label} → local; {local.describe()}")
            yield from _fallbacks(ctx, req, d, local, everyone, RouteReason.TIER_LOCAL, local=False)
            return
        best = ctx.estimator.fastest_remote(req, d, snap.prefill_workers(tier.pool))
        if best is None:
            yield from _no_prefill(req, ctx, d, f"{label} → pool {tier.pool}, which has no healthy worker")
            return
        yield Candidate(best, RouteReason.TIER_REMOTE, f"{label} → pool {tier.pool}; {best.describe()}")
        yield from _fallbacks(ctx, req, d, best, everyone, RouteReason.TIER_REMOTE)


class PowerPolicy:
    kind = RoutingKind.POWER

    def __init__(self, cfg: PowerRouting) -> None:
        self.cfg = cfg

    def candidates(
        self, req: RouteRequest, snap: ClusterSnapshot, decodes: Sequence[WorkerSnapshot], ctx: RouteContext
    ) -> Iterator[Candidate]:
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

        ok = [x for x in options if meets(x)]
        miss = [x for x in options if not meets(x)]
        ok.sort(key=lambda x: (x.energy_per_token_j or 0.0, x.ttft_ms, x.key()))
        miss.sort(key=lambda x: (x.ttft_ms, x.key()))
        target = f"SLA {sla.name}: ttft <= {_fmt(sla.ttft_ms)}ms, tpot <= {_fmt(sla.tpot_ms)}ms"
        if ok:
            why = f"{ok[0].describe()}: fewest J/token of {len(ok)}/{len(options)} meeting {target}"
            yield Candidate(ok[0], RouteReason.LEAST_ENERGY, why)
            for x in ok[1:]:
                yield Candidate(x, RouteReason.LEAST_ENERGY, "")
        for i, x in enumerate(miss):
            why = f"none of {len(options)} placements meets {target}; fastest {x.describe()}" if i == 0 and not ok else ""
            yield Candidate(x, RouteReason.SLA_MISS_FASTEST, why)


# (registered here rather than as class decorators: mypyc compiles a decorated class as an ordinary
# Python class, see orchestrator/sim/compiled.py)
register_policy(RoutingKind.CONTEXT_TTFT)(ContextTTFTPolicy)
register_policy(RoutingKind.THRESHOLD)(ThresholdPolicy)
register_policy(RoutingKind.TIERS)(TiersPolicy)
register_policy(RoutingKind.POWER)(PowerPolicy)
