"""KV lending: each tick, lend the KV pages a running instance does not need (they hold
prewarmed replicas) and reclaim them as its load comes back; at once on KV pressure.

How much an instance keeps and which replicas a reclaim evicts: `kv_reservation.py`. This is
the review that applies it, instance by instance, skipping those whose inputs are those of a
review that could not act. A mixin of `Controller`, whose state it reads and whose actions it
records; split out only to keep each module about one thing.
"""

from __future__ import annotations

import math

from warmserve.control.api import ClusterHandle, Evict, InstanceView, SetKvPages
from warmserve.control.kv_reservation import kv_actions, kv_floor_pages, kv_target
from warmserve.types import InstanceId, InstanceState, ReplicaId


class KvLending:
    """Methods of `Controller` (its only subclass), which holds the state they read: `models`,
    `cfg`, `policy`, `_instances`, `_requests_seen`, `_kv_reviewed`, `_kv_settled`,
    `_kv_floors`, `_replica_born`, `_replica_scores`, and `_record` (MemoryCounts)."""

    def on_kv_pressure(self, now: float, instance_id: InstanceId, cluster: ClusterHandle) -> None:
        """An instance has requests waiting for KV while some of its pages are lent: reclaim
        now rather than at the next tick."""
        if not (self.policy.unified_memory and self.policy.kv_prewarm):
            return
        view = cluster.snapshot().instance_by_id.get(instance_id)
        if view is not None and view.state == InstanceState.RUNNING:
            self._review_kv(view, cluster, now, pressure=True)

    def _reserve_kv(self, cluster: ClusterHandle, now: float) -> None:
        # The instance views alone, not a snapshot: most reviews lend or settle, which reads
        # no GPU or replica (a reclaim takes the snapshot, rebuilt only if anything moved).
        versions = cluster.versions()
        last = self._kv_reviewed
        if last is not None and last[0] == versions and last[1] == self._requests_seen:
            return  # no instance, KV use or in-flight count changed since the last review
        settled, self._kv_settled = self._kv_settled, {}
        instances = self._instances
        running = InstanceState.RUNNING
        for view in cluster.instance_views():
            if view.state != running:
                continue
            inst_id = view.instance_id
            inst = instances.get(inst_id)
            key = settled.get(inst_id)
            # The same inputs: no action again. A handle keeps a view object while its fields
            # are unchanged; an equal view in a new object is reviewed, which settles it again
            # (but for the view a resize to the target left, known by its fields).
            if (
                key is not None
                and key[1] == (inst.in_flight if inst else 0)
                and (
                    key[0] is view
                    or (
                        key[0] is None
                        and view.kv_pages == key[2]
                        and view.kv_used_pages == key[3]
                        and view.kv_lent_pages == key[4]
                    )
                )
            ):
                self._kv_settled[inst_id] = (view, key[1])
            else:
                self._review_kv(view, cluster, now)
        self._kv_reviewed = (cluster.versions(), self._requests_seen)

    def _review_kv(
        self,
        view: InstanceView,
        cluster: ClusterHandle,
        now: float,
        pressure: bool = False,
    ) -> bool:
        """Lend or reclaim one instance's KV pages; True if anything changed."""
        inst = self._instances.get(view.instance_id)
        in_flight = inst.in_flight if inst else 0
        page_bytes = cluster.page_bytes
        floor = self._kv_floors.get(view.model)
        if floor is None or floor[0] != page_bytes:  # a model's floor, worked out once
            m = self.models[view.model]
            floor = (page_bytes, kv_floor_pages(m, self.cfg.kv_floor_requests, page_bytes))
            self._kv_floors[view.model] = floor
        target = kv_target(view, floor[1], in_flight, self.cfg.capacity_per_instance)
        full = view.kv_pages + view.kv_lent_pages
        min_lend = full // 20 or 1  # max(1, full // 20): full is never negative
        protected: frozenset[ReplicaId] = frozenset()
        if self.policy.calm_kv and not pressure:
            # Move only on a large change, and leave a lend (or a reclaim) in place a while:
            # the target follows every admitted request, and chasing it churns prewarms.
            band = max(1, math.ceil(self.cfg.kv_hysteresis * full))
            recent = inst is not None and now - inst.kv_changed_s < self.cfg.kv_lend_min_s
            if abs(target - view.kv_pages) < band:
                self._kv_settled[view.instance_id] = (view, in_flight)
                return False
            if recent:
                return False
            min_lend = band
            young = now - self.cfg.prewarm_min_life_s
            protected = frozenset(r for r, t in self._replica_born.items() if t > young)
        elif not pressure and view.kv_pages - min_lend < target <= view.kv_pages:
            # Within a lend's minimum of the target, or at it: no action whatever the cluster
            # holds, as long as this view and in-flight count stay as they are.
            self._kv_settled[view.instance_id] = (view, in_flight)
            return False
        if target > view.kv_pages and all(
            f >= target - view.kv_pages for f in cluster.free_pages(view.gpus)
        ):
            # A reclaim with the pages free on every GPU: as kv_actions would answer (no
            # victim to evict, the whole need granted), read without a snapshot.
            actions: list[Evict | SetKvPages] = [SetKvPages(view.instance_id, target)]
        else:  # a lend reads nothing of the cluster; a reclaim in want, GPUs and replicas
            snap = cluster.snapshot() if target > view.kv_pages else None
            actions = kv_actions(view, target, snap, self._replica_scores, min_lend, protected)
        if actions:
            self._record(actions, now, view.kv_pages)
            if inst is not None:
                inst.kv_changed_s = now
            cluster.apply(actions)
            last = actions[-1]
            if isinstance(last, SetKvPages) and last.kv_pages == target:
                # At the target, with the same use and in-flight count, the next review finds
                # the same target, within the band (calm) or a lend's minimum of the pages it
                # has: it settles. Known now, by the fields of the view this leaves.
                self._kv_settled[view.instance_id] = (
                    None, in_flight, target, view.kv_used_pages, full - target
                )  # fmt: skip
        return bool(actions)
