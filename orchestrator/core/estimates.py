"""Predicted time and energy of one placement of one request, from the cost model.

A placement is (decode worker, prefill worker or None for local prefill). For a request of s
prompt tokens and m new tokens:

    queue_ms    = prefill_time(hw_p, queued_prefill_tokens(p))     (0 when nothing is queued)
    prefill_ms  = prefill_time(hw_p, s)
    transfer_ms = exposed_transfer_time(hw_p, s, kv_dtype, link)   (0 for local prefill)
    ttft_ms     = queue_ms + prefill_ms + transfer_ms
    tpot_ms     = decode_step_time(hw_d, [s + m/2] × (running_batch(d) + 1))
    energy_j    = prefill_s · P_prefill(hw_p) + m · tpot_s · P_decode(hw_d) / (running_batch(d) + 1)

with p = d for local prefill. Results of the cost model are memoised per (hw, tokens, mode): the
simulator routes millions of requests through here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

from orchestrator.config.models import TandemConfig
from orchestrator.core.hardware import Phase
from orchestrator.core.ports import CostModelPort
from orchestrator.core.power import PowerAccountant
from orchestrator.core.snapshot import RouteRequest, WorkerSnapshot
from orchestrator.core.types import LinearMode

_CACHE_MAX = 200_000


def _fmt(x: float) -> str:
    """Milliseconds for humans: 3 significant digits, no exponent for the usual range."""
    if x == 0:
        return "0"
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 1:
        return f"{x:.1f}"
    return f"{x:.3g}"


class Placement(NamedTuple):
    """One way to run a request, with its predicted numbers (ms, J). A NamedTuple: cheap to build."""

    decode_worker_id: str
    prefill_worker_id: str | None  # None: prefill locally on the decode worker
    queue_ms: float
    prefill_ms: float
    transfer_ms: float
    tpot_ms: float | None = None
    energy_j: float | None = None
    max_tokens: int = 1

    @property
    def local(self) -> bool:
        return self.prefill_worker_id is None

    @property
    def ttft_ms(self) -> float:
        return self.queue_ms + self.prefill_ms + self.transfer_ms

    @property
    def energy_per_token_j(self) -> float | None:
        return None if self.energy_j is None else self.energy_j / self.max_tokens

    def key(self) -> tuple[str, str]:
        return (self.decode_worker_id, self.prefill_worker_id or "")

    def describe(self) -> str:
        """e.g. 'remote p0 241ms (queue 0 + prefill 180 + exposed transfer 61)'."""
        if self.local:
            head = f"local {self.decode_worker_id} {_fmt(self.ttft_ms)}ms"
            body = f"(queue {_fmt(self.queue_ms)} + prefill {_fmt(self.prefill_ms)})"
        else:
            head = f"remote {self.prefill_worker_id}→{self.decode_worker_id} {_fmt(self.ttft_ms)}ms"
            body = (
                f"(queue {_fmt(self.queue_ms)} + prefill {_fmt(self.prefill_ms)} + "
                f"exposed transfer {_fmt(self.transfer_ms)})"
            )
        out = f"{head} {body}"
        if self.energy_per_token_j is not None and self.tpot_ms is not None:
            out += f", tpot {_fmt(self.tpot_ms)}ms, {self.energy_per_token_j:.3g} J/token"
        return out


Scan = tuple[WorkerSnapshot | None, float, float, float]
"""`Estimator.remote_scan`'s fastest remote worker and its (queue s, prefill s, transfer s)."""
Local = tuple[WorkerSnapshot, float, float]
"""A decode worker and `Estimator.local_s` of it (queue s, prefill s) for one request."""


class _Tables:
    """Memoised cost-model answers of one (hardware, pool), by token count."""

    __slots__ = ("hardware", "mode", "prefill", "transfer")

    def __init__(self, hardware: str, mode: LinearMode) -> None:
        self.hardware = hardware
        self.mode = mode
        self.prefill: dict[int, float] = {}
        self.transfer: dict[int, float] = {}


class Estimator:
    """Placement predictions for one config over one cost model (memoised)."""

    def __init__(self, config: TandemConfig, cost_model: CostModelPort, power: PowerAccountant) -> None:
        self.config = config
        self.cost_model = cost_model
        self.power = power
        self.kv_dtype = config.model.kv_dtype
        self.link: Any = None
        if config.kv_transport.link is not None:
            catalog = getattr(cost_model, "catalog", None)
            if catalog is not None and hasattr(catalog, "link"):
                self.link = catalog.link(config.kv_transport.link)
        self._modes = {p.name: config.pool_linear_mode(p) for p in config.pools}
        # memo per (hardware, pool) — the pool fixes the linear mode — then per token count: the
        # hot path looks up one tuple of two (hash-cached) strings and one int.
        self._tables: dict[tuple[str, str], _Tables] = {}
        self._step: dict[tuple[str, int, int, LinearMode], float] = {}
        self._own_tokens = -1  # own_s's memo: the prompt length it holds, and (hw, pool) → (prefill, transfer)
        self._own: dict[tuple[str, str], tuple[float, float]] = {}
        # (request, prefill list, remote_scan's scan, local_s of the least-loaded decode worker), set by
        # the router only while it routes that request on the very snapshot state they read (Router.route)
        self.hint: tuple[RouteRequest, Sequence[WorkerSnapshot], Scan, Local] | None = None
        self._groups_of: Sequence[WorkerSnapshot] | None = None
        self._groups_list: list[tuple[tuple[str, str], list[WorkerSnapshot]]] = []

    def mode(self, w: WorkerSnapshot) -> LinearMode:
        return self._modes.get(w.pool, self.config.model.linear_mode)

    def _tables_of(self, w: WorkerSnapshot) -> _Tables:
        key = (w.hardware, w.pool)
        t = self._tables.get(key)
        if t is None:
            t = self._tables[key] = _Tables(w.hardware, self.mode(w))
        return t

    def prefill_s(self, w: WorkerSnapshot, num_tokens: int) -> float:
        if num_tokens <= 0:
            return 0.0
        tab = self._tables.get((w.hardware, w.pool)) or self._tables_of(w)
        t = tab.prefill.get(num_tokens)
        if t is None:
            if len(tab.prefill) > _CACHE_MAX:
                tab.prefill.clear()
            t = tab.prefill[num_tokens] = float(
                self.cost_model.prefill_time_s(w.hardware, num_tokens, linear_mode=tab.mode, kv_dtype=self.kv_dtype)
            )
        return t

    def transfer_s(self, p: WorkerSnapshot, num_tokens: int) -> float:
        tab = self._tables.get((p.hardware, p.pool)) or self._tables_of(p)
        t = tab.transfer.get(num_tokens)
        if t is None:
            if len(tab.transfer) > _CACHE_MAX:
                tab.transfer.clear()
            t = tab.transfer[num_tokens] = float(
                self.cost_model.exposed_transfer_time_s(
                    p.hardware, num_tokens, self.kv_dtype, self.link, linear_mode=tab.mode
                )
            )
        return t

    def step_s(self, d: WorkerSnapshot, batch: int, context_tokens: int) -> float:
        mode = self.mode(d)
        key = (d.hardware, batch, context_tokens, mode)
        t = self._step.get(key)
        if t is None:
            if len(self._step) > _CACHE_MAX:
                self._step.clear()
            t = float(
                self.cost_model.decode_step_time_s(
                    d.hardware, [context_tokens] * batch, linear_mode=mode, kv_dtype=self.kv_dtype
                )
            )
            self._step[key] = t
        return t

    def own_s(self, p: WorkerSnapshot, prompt_tokens: int) -> tuple[float, float]:
        """(prefill_s(p, prompt_tokens), transfer_s(p, prompt_tokens)): the same floats, looked up once
        per (hardware, pool) while the prompt length stays the same (one request's routing)."""
        if prompt_tokens != self._own_tokens:
            self._own_tokens = prompt_tokens
            self._own = {}
        key = (p.hardware, p.pool)
        v = self._own.get(key)
        if v is None:
            v = self._own[key] = (self.prefill_s(p, prompt_tokens), self.transfer_s(p, prompt_tokens))
        return v

    def remote_best_ttft_ms(self, req: RouteRequest, prefills: Sequence[WorkerSnapshot], best: float) -> float:
        """min(best, ttft_ms(req, p, True) for p in prefills), the first of equals kept."""
        s = req.prompt_tokens
        own = self.own_s
        for p in prefills:
            pf, tr = own(p, s)
            n = p.queued_prefill_tokens
            t = ((self.prefill_s(p, n) if n > 0 else 0.0) + pf + tr) * 1e3  # ttft_ms's sum, same order
            if t < best:
                best = t
        return best

    def _groups(self, prefills: Sequence[WorkerSnapshot]) -> list[tuple[tuple[str, str], list[WorkerSnapshot]]]:
        """The workers of `prefills` grouped by (hardware, pool), cached for the last list seen (a
        snapshot's `prefill_view()`: the same list object while the snapshot lives)."""
        if self._groups_of is not prefills:
            groups: dict[tuple[str, str], list[WorkerSnapshot]] = {}
            for p in prefills:
                groups.setdefault((p.hardware, p.pool), []).append(p)
            self._groups_list = list(groups.items())
            self._groups_of = prefills
        return self._groups_list

    def remote_scan(self, req: RouteRequest, prefills: Sequence[WorkerSnapshot], best: float) -> tuple[float, Scan]:
        """`(remote_best_ttft_ms(req, prefills, best), scan)` in one pass over the prefill workers, where
        `scan` = (worker fastest_remote would pick or None, its queue s, prefill s, transfer s): the
        same floats as those methods (each keeps its own order of additions). The minimum and the
        argmin (ties: lower worker id) do not depend on the order of the pass."""
        s = req.prompt_tokens
        if s != self._own_tokens:
            self._own_tokens = s
            self._own = {}
        own = self._own
        tables = self._tables
        fast_t = 0.0
        fast: WorkerSnapshot | None = None
        f_q = f_pf = f_tr = 0.0
        for key, members in self._groups(prefills):
            v = own.get(key)
            if v is None:
                v = own[key] = (self.prefill_s(members[0], s), self.transfer_s(members[0], s))
            pf, tr = v
            ptr = pf + tr
            memo = tables[key].prefill  # made by prefill_s(…, s) above or before
            for p in members:
                n = p.__dict__["queued_prefill_tokens"]  # (a dict read: cheaper than the attribute)
                if n > 0:
                    q = memo.get(n)
                    if q is None:
                        q = self.prefill_s(p, n)
                else:
                    q = 0.0
                t = (q + pf + tr) * 1e3  # remote_best_ttft_ms's sum
                if t < best:
                    best = t
                k = (q + ptr) * 1e3  # fastest_remote's key
                if fast is None or k < fast_t or (k == fast_t and p.worker_id < fast.worker_id):
                    fast_t, fast, f_q, f_pf, f_tr = k, p, q, pf, tr
        return best, (fast, f_q, f_pf, f_tr)

    def local_s(self, d: WorkerSnapshot, prompt_tokens: int) -> tuple[float, float]:
        """(prefill_s(d, d.queued_prefill_tokens), prefill_s(d, prompt_tokens)): local prefill's parts."""
        return self.prefill_s(d, d.queued_prefill_tokens), self.prefill_s(d, prompt_tokens)

    def local_placement(self, req: RouteRequest, d: WorkerSnapshot) -> Placement:
        """`estimate(req, d, None)` (from the router's hint when it holds d's numbers: the same floats)."""
        hint = self.hint
        if hint is not None and hint[0] is req and hint[3][0] is d:
            _, q, pf = hint[3]
            return Placement(d.worker_id, None, q * 1e3, pf * 1e3, 0.0, max_tokens=req.max_tokens)
        return self.estimate(req, d, None)

    def ttft_ms(self, req: RouteRequest, p: WorkerSnapshot, remote: bool) -> float:
        """T of prefilling req on p (remote: plus the exposed transfer); the hot path of every policy."""
        t = self.prefill_s(p, p.queued_prefill_tokens) + self.prefill_s(p, req.prompt_tokens)
        if remote:
            t += self.transfer_s(p, req.prompt_tokens)
        return t * 1e3

    def fastest_remote(
        self, req: RouteRequest, decode: WorkerSnapshot, prefills: Sequence[WorkerSnapshot]
    ) -> Placement | None:
        """The remote placement with the lowest predicted TTFT (ties: lower worker id), or None."""
        hint = self.hint
        if hint is not None and hint[0] is req and hint[1] is prefills:
            p, q, pf, tr = hint[2]
            if p is None:
                return None
            # estimate(req, decode, p) from the scan's numbers (the same floats)
            return Placement(decode.worker_id, p.worker_id, q * 1e3, pf * 1e3, tr * 1e3, max_tokens=req.max_tokens)
        best: tuple[float, str] | None = None
        best_w: WorkerSnapshot | None = None
        s = req.prompt_tokens
        own = self.own_s
        for p in prefills:
            pf, tr = own(p, s)
            n = p.queued_prefill_tokens
            key = (((self.prefill_s(p, n) if n > 0 else 0.0) + (pf + tr)) * 1e3, p.worker_id)
            if best is None or key < best:
                best, best_w = key, p
        return None if best_w is None else self.estimate(req, decode, best_w)

    def remotes_by_ttft(
        self, req: RouteRequest, decode: WorkerSnapshot, prefills: Sequence[WorkerSnapshot]
    ) -> list[Placement]:
        """Every remote placement, fastest predicted TTFT first (ties: worker id)."""
        est = [self.estimate(req, decode, p) for p in prefills]
        est.sort(key=lambda e: (e.ttft_ms, e.prefill_worker_id or ""))
        return est

    def estimate(
        self, req: RouteRequest, decode: WorkerSnapshot, prefill: WorkerSnapshot | None, *, full: bool = False
    ) -> Placement:
        """TTFT parts always; tpot and energy too when full=True (they cost more cost-model calls)."""
        p = prefill or decode
        queue_ms = self.prefill_s(p, p.queued_prefill_tokens) * 1e3
        prefill_s = self.prefill_s(p, req.prompt_tokens)
        transfer_ms = 0.0 if prefill is None else self.transfer_s(prefill, req.prompt_tokens) * 1e3
        if not full:
            return Placement(
                decode.worker_id, None if prefill is None else prefill.worker_id,
                queue_ms, prefill_s * 1e3, transfer_ms, max_tokens=req.max_tokens,
            )
        batch = decode.running_batch + 1
        step_s = self.step_s(decode, batch, req.prompt_tokens + req.max_tokens // 2)
        energy_j = prefill_s * self.power.phase_w(p.hardware, Phase.PREFILL) + (
            req.max_tokens * step_s * self.power.phase_w(decode.hardware, Phase.DECODE) / batch
        )
        return Placement(
            decode.worker_id, None if prefill is None else prefill.worker_id,
            queue_ms, prefill_s * 1e3, transfer_ms, step_s * 1e3, energy_j, req.max_tokens,
        )
