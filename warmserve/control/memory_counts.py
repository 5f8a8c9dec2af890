"""What the control plane did to memory: counts of KV resizes, prewarms and evictions, and when
each prewarmed replica was born (what a quick eviction and a prewarm's minimum life are measured
from).

A mixin of `Controller`, whose state it reads and whose actions it records; split out only to
keep each module about one thing. Every part of the controller that issues memory actions
(starts, fair starts, KV lending, prewarm planning) records them here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from warmserve.control.api import Action, Evict, Prewarm, SetKvPages, StartInstance

# A replica evicted this soon after its prewarm was issued counts as churn.
QUICK_EVICT_S = 10.0


@dataclass(frozen=True, slots=True)
class ControlCounters:
    """What the control plane did to memory, for summaries and /metrics."""

    kv_set: int = 0  # SetKvPages issued
    kv_lends: int = 0  # ... that shrank an instance's KV (lent pages)
    kv_reclaims: int = 0  # ... that grew it back
    prewarms: int = 0
    evictions: int = 0
    quick_evictions: int = 0  # of replicas prewarmed less than QUICK_EVICT_S before


class MemoryCounts:
    """Methods of `Controller` (its only subclass), which holds the state they read and keep:
    `cfg`, `_counts` (per `ControlCounters` field) and `_replica_born`."""

    def _record(self, actions: Sequence[Action], now: float, kv_before: int = 0) -> None:
        """Count memory actions (ControlCounters) and remember when replicas were prewarmed;
        `kv_before`: the KV pages of the instance a SetKvPages here resizes."""
        c = self._counts
        for a in actions:
            if isinstance(a, SetKvPages):
                c["kv_set"] += 1
                c["kv_lends" if a.kv_pages < kv_before else "kv_reclaims"] += 1
            elif isinstance(a, Prewarm):
                c["prewarms"] += 1
                self._replica_born[a.replica_id] = now
            elif isinstance(a, Evict):
                c["evictions"] += 1
                born = self._replica_born.pop(a.replica_id, None)
                if born is not None and now - born < QUICK_EVICT_S:
                    c["quick_evictions"] += 1
            elif isinstance(a, StartInstance) and a.replica_id is not None:
                self._replica_born.pop(a.replica_id, None)  # activated: no longer a prewarm

    @property
    def counters(self) -> ControlCounters:
        return ControlCounters(**self._counts)

    def _prune_born(self, now: float) -> None:
        # Birth times matter for QUICK_EVICT_S and prewarm_min_life_s only (older ones count
        # for neither); replicas that went another way (a lost worker) must not pile up here.
        horizon = now - max(QUICK_EVICT_S, self.cfg.prewarm_min_life_s)
        self._replica_born = {r: t for r, t in self._replica_born.items() if t >= horizon}
