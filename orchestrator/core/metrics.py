"""Pure counters of routing and admission decisions, by reason.

The runtime mirrors them into Prometheus (`tandem_route_decisions_total{policy, reason}`,
`tandem_admission_decisions_total{action, reason}`); the simulator prints them in its report.
Nothing here knows about either: it only counts.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from orchestrator.core.admission import AdmissionDecision
from orchestrator.core.router import RouteDecision


@dataclass
class DecisionCounters:
    """Counts of decisions. Keys are enum values (strings), ready to become metric labels."""

    routes: Counter[tuple[str, str]] = field(default_factory=Counter)  # (policy, reason) → n
    admissions: Counter[tuple[str, str]] = field(default_factory=Counter)  # (action, reason) → n
    remote_prefills: int = 0
    local_prefills: int = 0

    def record_route(self, d: RouteDecision) -> None:
        self.routes[(d.policy.value, d.reason.value)] += 1
        if d.placed:
            if d.local_prefill:
                self.local_prefills += 1
            else:
                self.remote_prefills += 1

    def record_admission(self, d: AdmissionDecision) -> None:
        self.admissions[(d.action.value, d.reason.value)] += 1

    def routes_by_reason(self) -> dict[str, int]:
        out: Counter[str] = Counter()
        for (_, reason), n in self.routes.items():
            out[reason] += n
        return dict(sorted(out.items()))

    def admissions_by_reason(self) -> dict[str, int]:
        out: Counter[str] = Counter()
        for (_, reason), n in self.admissions.items():
            out[reason] += n
        return dict(sorted(out.items()))

    def merge(self, other: DecisionCounters) -> None:
        self.routes.update(other.routes)
        self.admissions.update(other.admissions)
        self.remote_prefills += other.remote_prefills
        self.local_prefills += other.local_prefills

    def as_dict(self) -> dict[str, object]:
        """JSON-ready: {'routes': {reason: n}, 'admissions': {reason: n}, 'remote_prefills', ...}."""
        return {
            "routes": self.routes_by_reason(),
            "admissions": self.admissions_by_reason(),
            "remote_prefills": self.remote_prefills,
            "local_prefills": self.local_prefills,
        }
