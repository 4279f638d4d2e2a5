"""What the router derives from a snapshot's load fields, kept up to date for the changed workers only.

Every decision needs three things that, computed from scratch, cost a pass over the fleet:
- the least-loaded decode worker with KV room for the request (`DecodeOrder.first`);
- the prefill scan (`Estimator.remote_scan`): the lowest remote TTFT and the fastest prefill worker;
- the cluster's modelled power draw (`PowerAccountant.cluster_total_w`).

When the snapshot carries a change log (`ClusterSnapshot.changes`, kept by an owner that updates its
workers in place — the simulator), `FleetIndex` keeps ordered views of the fleet and updates them
for the logged workers only, so those cost O(changed workers) per decision. The answers are the
same as the scans' — the same worker, the same floats:

- decode workers sorted by `least_loaded_key` (running + waiting, −free blocks, id): the first one
  with room is the scan's argmin (the key is a total order; the scan keeps the lowest key).
- prefill workers grouped by (hardware, pool) — whose prefill and transfer times for the request are
  the same — each group sorted by (queue time q, id). A remote TTFT is ((q + pf) + tr)·1e3 and the
  scan's key (q + (pf + tr))·1e3: both non-decreasing in q (IEEE addition and multiplication by a
  positive number are monotone), so a group's lowest TTFT is its first worker's, and its argmin is
  the lowest id among the leading workers whose key equals the first's. min and argmin over the
  groups do not depend on the order of the pass.
- the power sum is kept as a running total while every worker's current draw is an integer number
  of watts below 2**40 (as the catalog's are): such sums are exact in any order, so the total is
  the very float the in-order sum gives. Otherwise it is summed again, in worker order.

Without a change log (`changes=None`: the runtime builds a fresh snapshot each time) `sync` answers
False and the router scans, as before. Tests compare both paths on random fleets and change
sequences (tests/unit/core/test_fleet_index.py).
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right, insort
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Final

from orchestrator.core.hardware import Phase
from orchestrator.core.snapshot import ClusterSnapshot, SnapshotChanges, WorkerSnapshot

if TYPE_CHECKING:
    from orchestrator.core.estimates import Estimator, Scan, _Tables
    from orchestrator.core.power import PowerAccountant

# A decode worker's place in the order is one int: (running + waiting, −free blocks, index) packed as
# load << (F + I) | (free_max − free) << I | index, with F and I the bits of the fleet's largest KV
# cache (in blocks) and of its worker count — workers are sorted by id, so index order is id order.
# (Small ints: for a fleet of 32 workers with 2**20 blocks each, single-digit ints while load < 16.)
_BEYOND: Final = 1 << 62  # above any worker index: (q, _BEYOND) sorts after every prefill entry of that q
_OWN_MAX: Final = 100_000  # prompt lengths remembered by remote_scan before its memo is cleared
_EXACT_W = float(1 << 40)  # integer draws below this many watts sum exactly in fleets of < _EXACT_FLEET
_EXACT_FLEET = 1 << 12


def _exact(w: Any) -> bool:
    """An integer number of watts below 2**40 in magnitude (sums of such are exact in any order)."""
    if type(w) is float:
        return w.is_integer() and -_EXACT_W < w < _EXACT_W
    return type(w) is int and -_EXACT_W < w < _EXACT_W


class FleetIndex:
    """Ordered views of one snapshot's workers, updated from its change log (see the module)."""

    def __init__(self, estimator: Estimator, power: PowerAccountant) -> None:
        self.estimator = estimator
        self.power = power
        self._changes: SnapshotChanges | None = None
        self._workers: tuple[WorkerSnapshot, ...] | None = None
        self._pos = 0
        self._usable = False
        self._ibits = self._lshift = self._free_max = self._imask = 0
        self._index_of: dict[str, int] = {}
        self._kind: list[int] = []  # per worker index: 1 decode-capable and healthy, 2 prefill pool
        self._dkey: list[int] = []  # decode workers: the packed key; `_dec` holds them sorted
        self._cap: list[int] = []  # decode workers: free blocks × block size (KV tokens that fit now)
        self._dec: list[int] = []
        self._pq: list[float] = []  # prefill workers: queue time (s); their group's list of (q, index)
        self._pgroup: list[list[tuple[float, int]]] = []
        self._groups: list[tuple[tuple[str, str], list[tuple[float, int]], WorkerSnapshot, Any]] = []
        self._ptab: list[Any] = []  # prefill workers: the estimator's memo of their (hardware, pool)
        self._group_lists: list[list[tuple[float, int]]] = []
        # prompt tokens → ((prefill s, transfer s) on each prefill group, prefill s on each decode group)
        self._own: dict[int, tuple[list[tuple[float, float]], list[Any]]] = {}
        self._local_reps: list[WorkerSnapshot] = []
        self._dpos: list[int] = []
        self._rows: list[tuple[float, float, float]] = []  # (idle, prefill, decode) W
        self._row_exact: list[bool] = []
        self._now_w: list[Any] = []  # each worker's draw as cluster_total_w reads it
        self._now_exact: list[bool] = []
        self._total_w = 0.0
        self._inexact = 0  # workers whose draw is not _exact: the total is then summed in order
        self._resum = False

    # ------------------------------------------------------------------ upkeep

    def sync(self, snap: ClusterSnapshot) -> bool:
        """Bring the views up to `snap` (True), or False when `snap` has no change log (scan it)."""
        ch = snap.changes
        if ch is None:
            return False
        if ch is self._changes and snap.workers is self._workers:
            pos = self._pos
            end = ch.start + len(ch.log)
            if pos == end:
                return self._usable
            if pos >= ch.start and self._usable:
                self._apply(snap.workers, ch.log[pos - ch.start:])
                self._pos = end
                return self._usable
        self._build(snap, ch)
        return self._usable

    def _build(self, snap: ClusterSnapshot, ch: SnapshotChanges) -> None:
        self._changes = ch
        self._workers = ws = snap.workers
        self._pos = ch.position
        n = len(ws)
        decodes = {id(w) for w in snap.decode_view()}
        prefills = {id(w) for w in snap.prefill_view()}
        self._kind = [(1 if id(w) in decodes else 0) | (2 if id(w) in prefills else 0) for w in ws]
        self._index_of = {w.worker_id: i for i, w in enumerate(ws)}
        self._dkey = [0] * n
        self._cap = [0] * n
        self._pq = [0.0] * n
        self._pgroup = [[] for _ in ws]
        groups: dict[tuple[str, str], list[tuple[float, int]]] = {}
        reps: dict[tuple[str, str], WorkerSnapshot] = {}
        power = self.power
        self._rows = [(power.phase_w(w.hardware, Phase.IDLE), power.phase_w(w.hardware, Phase.PREFILL),
                       power.phase_w(w.hardware, Phase.DECODE)) for w in ws]
        self._row_exact = [all(_exact(x) for x in r) for r in self._rows]
        self._now_w = [0.0] * n
        self._now_exact = [True] * n
        self._total_w = 0.0
        self._inexact = 0 if n < _EXACT_FLEET else 1  # (larger fleets: always the in-order sum)
        self._resum = True
        self._ibits = ib = max(1, (n - 1).bit_length())
        self._imask = (1 << ib) - 1
        self._free_max = fm = max((w.total_kv_blocks for w in snap.decode_view()), default=0)
        self._lshift = ib + max(1, fm.bit_length())
        self._usable = True
        for i, w in enumerate(ws):
            if self._kind[i] & 2:
                key = (w.hardware, w.pool)
                self._pgroup[i] = groups.setdefault(key, [])
                reps.setdefault(key, w)
        est = self.estimator
        # (key, sorted (q, index) list, a worker of the group, the estimator's memo of the group)
        self._groups = [(key, g, reps[key], est._tables_of(reps[key])) for key, g in groups.items()]
        self._ptab = [est._tables_of(w) if self._kind[i] else None for i, w in enumerate(ws)]
        self._group_lists = [g for _, g, _, _ in self._groups]
        self._own = {}
        # decode workers: the position of their (hardware, pool) in remote_scan's memo's local part
        local: dict[tuple[str, str], int] = {}
        self._local_reps = []
        self._dpos = [-1] * n
        for i, w in enumerate(ws):
            if self._kind[i] & 1:
                key = (w.hardware, w.pool)
                if key not in local:
                    local[key] = len(self._local_reps)
                    self._local_reps.append(w)
                self._dpos[i] = local[key]
        self._dec = []
        for i, k in enumerate(self._kind):
            if k & 1:
                self._dkey[i] = -1  # not in _dec yet
            if k & 2:
                self._pq[i] = -1.0  # not in its group yet
        self._apply(ws, range(n))

    def _apply(self, ws: tuple[WorkerSnapshot, ...], changed: Iterable[int]) -> None:
        """Update the views for the workers at the indices `changed` (repeats allowed)."""
        kind = self._kind
        dkey = self._dkey
        dec = self._dec
        cap = self._cap
        pq = self._pq
        rows = self._rows
        now_w = self._now_w
        prefill_s = self.estimator.prefill_s
        free_max = self._free_max
        ib = self._ibits
        ls = self._lshift
        row_exact = self._row_exact
        now_exact = self._now_exact
        total = self._total_w
        for i in changed:
            w = ws[i]
            f = w.__dict__  # the dataclass's fields (a dict read: cheaper than the attribute)
            k = kind[i]
            if k & 1:
                # (typed locals: native int arithmetic when compiled; nothing at run time in CPython)
                free: int = f["free_kv_blocks"]
                running: int = f["running_batch"]
                waiting: int = f["waiting"]
                load = running + waiting
                if not 0 <= free <= free_max or load < 0:
                    self._usable = False  # outside what the packed key can order: scan instead
                    return
                key = (load << ls) | ((free_max - free) << ib) | i
                old = dkey[i]
                if key != old:
                    if old >= 0:
                        del dec[bisect_left(dec, old)]
                    insort(dec, key)
                    dkey[i] = key
                block_size: int = f["block_size"]
                cap[i] = free * block_size
            if k & 2:
                n: int = f["queued_prefill_tokens"]
                q: float = 0.0  # (typed: native float compares when compiled)
                if n > 0:
                    tab: _Tables = self._ptab[i]  # (typed: native access when compiled)
                    memo: float | None = tab.prefill.get(n)  # the estimator's memo, else prefill_s
                    q = prefill_s(w, n) if memo is None else memo
                old_q = pq[i]
                if q != old_q:
                    g = self._pgroup[i]
                    if old_q >= 0.0:
                        del g[bisect_left(g, (old_q, i))]
                    insort(g, (q, i))
                    pq[i] = q
            now = f["power_w"]
            if now is None:
                r = rows[i]
                now = r[1] if f["queued_prefill_tokens"] > 0 else r[2] if f["running_batch"] > 0 else r[0]
                ex = row_exact[i]
            else:
                ex = _exact(now)
            old_w = now_w[i]
            if now != old_w or type(now) is not type(old_w):
                now_w[i] = now
                if ex and now_exact[i]:
                    total += now - old_w  # integers: exact
                else:
                    self._inexact += (not ex) - (not now_exact[i])
                    now_exact[i] = ex
                    self._resum = True
        self._total_w = total

    # ------------------------------------------------------------------ answers (after sync)

    def first_decode(self, kv_tokens: int) -> WorkerSnapshot | None:
        """`DecodeOrder(req, snap.decode_view()).first` for a request of `kv_tokens` KV tokens."""
        cap = self._cap
        mask = self._imask
        for key in self._dec:
            i = key & mask
            if cap[i] >= kv_tokens:
                return self._workers[i]  # type: ignore[index]
        return None

    def _own_of(self, s: int) -> tuple[list[tuple[float, float]], list[Any]]:
        """The prompt's est.prefill_s and transfer_s on each prefill group, and its est.prefill_s on each
        decode group (memoised per prompt length: one lookup instead of one per group and kind)."""
        if len(self._own) > _OWN_MAX:
            self._own.clear()
        est = self.estimator
        own = self._own[s] = ([(est.prefill_s(rep, s), est.transfer_s(rep, s)) for _, _, rep, _ in self._groups],
                              [None] * len(self._local_reps))  # (local_s fills these when asked)
        return own

    def local_s(self, d: WorkerSnapshot, prompt_tokens: int) -> tuple[float, float]:
        """`Estimator.local_s(d, prompt_tokens)` for a decode worker `d` of the snapshot: the same floats."""
        i = self._index_of[d.worker_id]
        own = self._own.get(prompt_tokens) or self._own_of(prompt_tokens)
        n: int = d.__dict__["queued_prefill_tokens"]
        if n > 0:
            tab: _Tables = self._ptab[i]
            q = tab.prefill.get(n)  # est.prefill_s(d, n), from its memo when there
            if q is None:
                q = self.estimator.prefill_s(d, n)
        else:
            q = 0.0
        local = own[1]
        pf = local[pos := self._dpos[i]]
        if pf is None:
            pf = local[pos] = self.estimator.prefill_s(self._local_reps[pos], prompt_tokens)
        return q, pf

    def remote_scan(self, prompt_tokens: int, best: float) -> tuple[float, Scan]:
        """`Estimator.remote_scan(req, snap.prefill_view(), best)`: the same floats and worker."""
        own = self._own.get(prompt_tokens) or self._own_of(prompt_tokens)
        fast_t = 0.0
        fast_i = -1
        f_q = f_pf = f_tr = 0.0
        groups = self._group_lists
        times = own[0]
        if len(times) != len(groups):
            raise AssertionError("FleetIndex: a prompt memo made for other prefill groups")
        for x in range(len(groups)):  # (indexed, not zip: native loops when compiled)
            g = groups[x]
            pf, tr = times[x]
            ptr = pf + tr
            q, gi = g[0]
            t = (q + pf + tr) * 1e3  # remote_best_ttft_ms's sum: the group's lowest (monotone in q)
            if t < best:
                best = t
            k = (q + ptr) * 1e3  # fastest_remote's key
            gq = q
            # a later worker whose key rounds to the same value may have a lower id: look at the first
            # (lowest id) worker of each next distinct q while the key stays the same
            n = len(g)
            # the first entry of a larger q: the next one, unless it has the same q (then bisect)
            j = 1 if n == 1 or g[1][0] > q else bisect_right(g, (q, _BEYOND))
            while j < n:
                q2, i2 = g[j]
                if (q2 + ptr) * 1e3 != k:
                    break
                if i2 < gi:
                    gq, gi = q2, i2
                j = bisect_right(g, (q2, _BEYOND), j)
            if fast_i < 0 or k < fast_t or (k == fast_t and gi < fast_i):
                fast_t, fast_i, f_q, f_pf, f_tr = k, gi, gq, pf, tr
        fast = None if fast_i < 0 else self._workers[fast_i]  # type: ignore[index]
        return best, (fast, f_q, f_pf, f_tr)

    def total_w(self) -> float:
        """`PowerAccountant.cluster_total_w(snap)`: the same float (see the module)."""
        if self._inexact or self._resum:
            total = 0.0
            for w in self._now_w:  # in worker order, as cluster_total_w sums
                total += w
            if self._inexact:
                return total
            self._total_w = total
            self._resum = False
        return self._total_w

    def after_w(self, before_w: float, prefill_id: str | None, decode_id: str) -> float:
        """`PowerAccountant.after_w(before_w, snap.worker(prefill_id) or None, snap.worker(decode_id))`:
        the same float (a worker's draw and phase watts are the very values it reads)."""
        rows = self._rows
        now_w = self._now_w
        d = self._index_of[decode_id]
        if prefill_id is None:
            now = now_w[d]
            p_w = rows[d][1]
            return before_w + ((p_w if p_w > now else now) - now)  # max(now, P_prefill): now on ties
        p = self._index_of[prefill_id]
        now = now_w[p]
        p_w = rows[p][1]
        after = before_w + ((p_w if p_w > now else now) - now)
        now = now_w[d]
        d_w = rows[d][2]
        return after + ((d_w if d_w > now else now) - now)
