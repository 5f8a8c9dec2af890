"""Fair starts: the part of the improved policy (warmserve-plus) that keeps a start from starving.

A model that cannot start for want of GPUs first takes a prewarm hit on a device that only idle
instances hold (demoting them), then an aligned block freed of idle instances; a model that has
waited past `starve_wait_s` gets a block held for it and drained, with its weights prewarmed
into it meanwhile, and past `starve_preempt_s` may drain busy instances too. Why each rule is as
it is: docs/fair-starts.md. A mixin of `Controller`, whose state it reads and whose actions it
records; split out only to keep each module about one thing.
"""

from __future__ import annotations

import math

from warmserve.control.allocation import StartChoice
from warmserve.control.api import (
    Action,
    ClusterHandle,
    ClusterSnapshot,
    Evict,
    Prewarm,
    StopInstance,
)
from warmserve.types import InstanceId, InstanceState, ModelName, ReplicaId, StartPath


class FairStarts:
    """Methods of `Controller` (its only subclass), which holds the state they read:
    `models`, `cfg`, `policy`, `_queues`, `_reserved`, `_instances`, `_replica_scores`,
    `_last_preempt_s`, and the start and release helpers."""

    def _larger_waiting(self, name: ModelName) -> bool:
        tp = self.models[name].tp
        return any(q and self.models[m].tp > tp for m, q in self._queues.items())

    def _blocked(self, name: ModelName) -> frozenset[int]:
        """GPUs held for other models' starts."""
        return frozenset(g for m, group in self._reserved.items() if m != name for g in group)

    def _demote_for_hit(
        self, name: ModelName, now: float, cluster: ClusterHandle
    ) -> StartChoice | None:
        """A ready replica of `name` whose GPUs hold only idle instances of other models: stop
        them (their weights stay prewarmed) and activate it, rather than load cold or wait."""
        snap = cluster.snapshot()
        by_gpu = {g.gpu_id: g.instance_id for g in snap.gpus}
        idle = self._idle_others(name, snap)
        blocked = self._blocked(name)
        for r in sorted(snap.replicas, key=lambda r: r.replica_id):
            if r.model != name or not r.is_ready or blocked.intersection(r.gpus):
                continue
            holders = {by_gpu[g] for g in r.gpus} - {None}
            if not holders or not holders <= idle:
                continue
            for inst_id in sorted(holders):
                self._release(inst_id, cluster)
            choice = self._choose_start(self.models[name], cluster.snapshot(), now)
            if choice is not None and choice.path == StartPath.PREWARM_HIT:
                return choice
            return None
        return None

    def _idle_others(self, name: ModelName, snap: ClusterSnapshot) -> set[InstanceId]:
        """Instances of other models that hold no request and could be released now: not
        draining, and not starting (their load is in flight; the books refuse to release
        one, and its weights are not there to keep)."""
        views = snap.instance_by_id
        return {
            i
            for i, inst in self._instances.items()
            if inst.in_flight == 0
            and not inst.stopping
            and inst.model != name
            and (v := views.get(i)) is not None
            and v.state == InstanceState.RUNNING
        }

    def _reclaim_idle(
        self, name: ModelName, now: float, cluster: ClusterHandle
    ) -> StartChoice | None:
        """Stop idle instances kept alive for other models, longest idle first, until `name`
        can start. Stopping an idle instance is instant and keeps its weights prewarmed."""
        # With prior prewarming, first those on GPUs holding a replica of `name`: stopping them
        # makes the start a prewarm hit rather than a cold load.
        snap = cluster.snapshot()
        views = snap.instance_by_id
        mine: set[int] = set()
        if self.policy.prior_prewarm:
            mine = {g for r in snap.replicas if r.model == name for g in r.gpus}
        idle = sorted(
            (
                not (v := views.get(i)) or not mine.intersection(v.gpus),
                self._instances[i].last_active_s,
                i,
            )
            for i in self._idle_others(name, snap)
        )
        for _, _, inst_id in idle:
            self._release(inst_id, cluster)
            choice = self._choose_start(self.models[name], cluster.snapshot(), now)
            if choice is not None:
                return choice
        return None

    def _block_to_free(
        self,
        name: ModelName,
        snap: ClusterSnapshot,
        now: float,
        busy: bool,
        shortable: bool = True,
        budget: float = math.inf,
    ) -> tuple[tuple[int, ...], list[InstanceId]] | None:
        """The aligned block of `name`'s TP degree cheapest to free, and the instances of other
        models on it. Idle instances cost nothing (stopping one is instant and keeps its weights
        prewarmed). With `busy`, running instances past their protect period may be drained:
        first those whose model has other instances to take its requests, then the fewest
        requests in flight. Starting instances and other models' held blocks are never taken;
        without `shortable`, neither is a block whose drain leaves a model short of instances
        for its load (its others would carry it above the scale-down threshold), and with it,
        only one whose models left short (above starve_short_threshold) carry a load of at most
        `budget`."""
        tp = self.models[name].tp
        gpn = snap.gpus_per_node
        if gpn % tp:
            return None
        blocked = self._blocked(name)
        views = snap.instance_by_id
        live = self._live_counts()
        # A drain leaves a model short unless its other instances would carry its load below the
        # scale-down threshold, i.e. unless the autoscaler could have stopped this one itself
        # (at the scale-up threshold, the popular model's peaks restart it cold, and those
        # restarts cost more attainment than the starving model gains). Once the waiting model
        # may preempt (`shortable`), below starve_short_threshold is enough (between the two:
        # the others then serve the load without queueing, a little busier), so the extra
        # instance of a busy model, which keep-alive never stops while requests reach it, is
        # drained before the last instance of a rarely used model (whose next request would
        # starve in turn: two such models otherwise took each other's block in turn).
        cfg = self.cfg
        down = cfg.starve_short_threshold if shortable else cfg.scale_down_threshold
        cap = cfg.capacity_per_instance * down
        hits = {r.gpus for r in snap.replicas if r.model == name and r.is_ready}
        best: tuple[tuple, tuple[int, ...], list[InstanceId]] | None = None
        for base in range(0, len(snap.gpus), tp):
            group = tuple(range(base, base + tp))
            if blocked.intersection(group):
                continue
            holders = sorted({snap.gpus[g].instance_id for g in group} - {None})
            drained: dict[ModelName, int] = {}
            load = extra = 0
            for i in holders:
                v, inst = views.get(i), self._instances.get(i)
                if v is None or inst is None or inst.model == name:
                    break
                if v.state == InstanceState.STARTING or blocked.intersection(v.gpus):
                    break
                if inst.stopping or inst.in_flight == 0:
                    load += inst.in_flight  # draining already, or idle
                    continue
                if not busy or now - inst.created_s < self.cfg.protect_period_s:
                    break
                load += inst.in_flight
                drained[inst.model] = drained.get(inst.model, 0) + 1
                extra += len(v.gpus) - len(set(v.gpus) & set(group))
            else:
                # Models left short: their requests would queue in turn (a model's last
                # instance always counts).
                short = [
                    self.load(m, now)
                    for m, k in drained.items()
                    if (live[m] - k) * cap < self.load(m, now) or live[m] == k
                ]
                if short and (not shortable or sum(short) > budget):
                    continue
                # Fewest models left short, the least load left short, a prewarm hit, then the
                # fewest requests to drain and the fewest GPUs freed beyond the block.
                key = (len(short), sum(short), group not in hits, load, extra, len(holders), base)
                if best is None or key < best[0]:
                    best = (key, group, holders)
        return None if best is None else (best[1], best[2])

    def _prewarm_held(
        self, name: ModelName, group: tuple[int, ...], now: float, cluster: ClusterHandle
    ) -> None:
        """Load `name`'s weights into the block held for it while its instances drain, so that
        the start is a prewarm (or in-progress) hit rather than a cold load after the drain:
        into free pages, evicting other models' replicas there (lowest score first) if those
        pages are short. Nothing if a replica of `name` is already there or room is short."""
        snap = cluster.snapshot()
        if any(r.model == name and r.gpus == group for r in snap.replicas):
            return
        need = self.models[name].pages_per_gpu
        evict: dict[ReplicaId, None] = {}
        for g in group:
            free = snap.gpus[g].free_pages
            # Replicas evicted for an earlier GPU of the group free their pages here too.
            free += sum(r.pages_per_gpu for r in snap.replicas_by_gpu[g] if r.replica_id in evict)
            others = sorted(
                (
                    r
                    for r in snap.replicas_by_gpu[g]
                    if r.model != name and r.replica_id not in evict
                ),
                key=lambda r: (self._replica_scores.get(r.replica_id, 0.0), r.replica_id),
            )
            for r in others:
                if free >= need:
                    break
                evict[r.replica_id] = None
                free += r.pages_per_gpu
            if free < need:
                return
        actions: list[Action] = [Evict(r) for r in evict]
        actions.append(Prewarm(self._new_replica_id(), name, group))
        self._record(actions, now)
        cluster.apply(actions)

    def _stop_now(self, inst_ids: list[InstanceId], cluster: ClusterHandle) -> None:
        """Stop instances at once: empty ones are released (weights stay prewarmed), busy ones
        leave routing and drain."""
        for inst_id in inst_ids:
            inst = self._instances[inst_id]
            if inst.stopping:
                continue
            self._set_stopping(inst)
            if inst.in_flight == 0:
                self._release(inst_id, cluster)
            else:
                cluster.apply([StopInstance(inst_id)])

    def _demote_block(
        self, name: ModelName, now: float, cluster: ClusterHandle
    ) -> StartChoice | None:
        """No room for `name`: stop the idle instances of the one aligned block that frees
        room with the fewest stops (a block holding a ready replica of `name` first), rather
        than idle instances anywhere (which frees GPUs scattered over nodes)."""
        found = self._block_to_free(name, cluster.snapshot(), now, busy=False)
        if found is None:
            return None
        self._stop_now(found[1], cluster)
        return self._choose_start(self.models[name], cluster.snapshot(), now)

    def _rescue_starving(self, now: float, cluster: ClusterHandle) -> None:
        """Hold an aligned block for each model whose oldest request has waited
        `starve_wait_s` with no room: free it (idle instances stop, busy ones drain), and keep
        every other model's starts off it until this model starts. This bounds a wait by the
        drain of one block rather than by the luck of races for freed GPUs. Until
        `starve_preempt_s`, only instances whose models keep enough others are drained."""
        for name in [m for m in self._reserved if not self._queues[m]]:
            del self._reserved[name]
        for name in self._autoscale_order():
            queue = self._queues[name]
            if not queue:
                continue
            waited = now - queue[0].arrival_s
            if waited < self.cfg.starve_wait_s or name in self._reserved:
                continue
            if self._route(name) is not None or self._start(name, now, cluster):
                continue
            # A model's last instance (or one its load needs) is drained only after a longer
            # wait: its own requests then queue, and each such switch costs a drain and a
            # start. So such a preemption must pay: the load it leaves short may not exceed the
            # waiting model's own load (its queued requests count), scaled up by how many
            # starve_preempt_s it has waited so that any wait stays bounded; and preemptions
            # are spaced by starve_preempt_gap_s across the cluster, so that when many models
            # starve at once (more models than fit), the popular ones are not drained in turn
            # for each of them.
            found = self._block_to_free(name, cluster.snapshot(), now, True, False)
            gap = now - self._last_preempt_s >= self.cfg.starve_preempt_gap_s
            if found is None and waited >= self.cfg.starve_preempt_s and gap:
                budget = math.inf
                if self.cfg.starve_preempt_s > 0:
                    budget = self.load(name, now) * waited / self.cfg.starve_preempt_s
                found = self._block_to_free(name, cluster.snapshot(), now, True, True, budget)
                if found is not None:
                    self._last_preempt_s = now
            if found is None:
                continue
            self._reserved[name] = found[0]
            self._stop_now(found[1], cluster)
            if not self._start(name, now, cluster) and self.policy.unified_memory:
                self._prewarm_held(name, found[0], now, cluster)
