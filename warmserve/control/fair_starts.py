"""Fair starts: the part of the improved policy (warmserve-plus) that keeps a start from starving.

A model that cannot start for want of GPUs first takes a prewarm hit on a device that only idle
instances hold (demoting them), then an aligned block freed of idle instances; a model that has
waited past `starve_wait_s` gets a block held for it and drained (the block expected to drain
first), with its weights prewarmed into it meanwhile (into the KV the draining instances can no
longer use), and past `starve_preempt_s` may drain busy instances too. Why each rule is as
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
    SetKvPages,
    StopInstance,
)
from warmserve.control.kv_reservation import kv_floor_pages
from warmserve.control.start_price import StartPrice
from warmserve.types import InstanceId, InstanceState, ModelName, ReplicaId, StartPath


class FairStarts(StartPrice):
    """Methods of `Controller` (its only subclass), which holds the state they read:
    `models`, `cfg`, `policy`, `_queues`, `_reserved`, `_instances`, `_replica_scores`,
    `_last_preempt_s`, `_request_instance`, `_dispatched_s`, `_service_times`, and the start
    and release helpers."""

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
        # Stopping a model's idle last instance while others wait in line makes it wait behind
        # them at its next request: worth it only if the start saves more (see _block_to_free).
        budget = self._start_value(name, now)
        live = self._live_counts()
        line = self._in_line(now) - {name}
        for r in sorted(snap.replicas, key=lambda r: r.replica_id):
            if r.model != name or not r.is_ready or blocked.intersection(r.gpus):
                continue
            holders = {by_gpu[g] for g in r.gpus} - {None}
            if not holders or not holders <= idle:
                continue
            stopped: dict[ModelName, int] = {}
            for i in holders:
                m = self._instances[i].model
                stopped[m] = stopped.get(m, 0) + 1
            cost = sum(
                self._idle_stop_cost(m, now, line) for m, k in stopped.items() if live[m] == k
            )
            if cost > budget:
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
        only one whose models left short (above starve_short_threshold) miss at most `budget`
        requests: their loads and what they would miss waiting behind the other models in line
        (`_missed_in_line`), which an idle last instance stopped here costs too (with
        starve_return_s, also the requests its model gets before it can come back:
        `_idle_stop_cost`)."""
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
        line = self._in_line(now) - {name}  # the models a stopped one would wait behind
        best: tuple[tuple, tuple[int, ...], list[InstanceId]] | None = None
        sent: dict[InstanceId, list[float]] | None = None  # dispatch times, read on first use
        for base in range(0, len(snap.gpus), tp):
            group = tuple(range(base, base + tp))
            if blocked.intersection(group):
                continue
            holders = sorted({snap.gpus[g].instance_id for g in group} - {None})
            drained: dict[ModelName, int] = {}
            idled: dict[ModelName, int] = {}
            load = extra = 0
            for i in holders:
                v, inst = views.get(i), self._instances.get(i)
                if v is None or inst is None or inst.model == name:
                    break
                if v.state == InstanceState.STARTING or blocked.intersection(v.gpus):
                    break
                if inst.stopping or inst.in_flight == 0:
                    load += inst.in_flight  # draining already, or idle
                    if not inst.stopping:
                        idled[inst.model] = idled.get(inst.model, 0) + 1
                    continue
                if not busy or now - inst.created_s < self.cfg.protect_period_s:
                    break
                load += inst.in_flight
                drained[inst.model] = drained.get(inst.model, 0) + 1
                extra += len(v.gpus) - len(set(v.gpus) & set(group))
            else:
                # Models left short: their requests would queue in turn (a model's last
                # instance always counts). Each costs the requests it drains or has queued
                # (its load) and those it would miss waiting behind the models in line.
                short = [
                    self.load(m, now) + self._missed_in_line(m, now, line)
                    for m, k in drained.items()
                    if (live[m] - k) * cap < self.load(m, now) or live[m] == k
                ]
                if short and not shortable:
                    continue
                # An idle last instance drains nothing, but its model's next request waits
                # behind the line too.
                idle = sum(
                    self._idle_stop_cost(m, now, line)
                    for m, k in idled.items()
                    if live[m] == k + drained.get(m, 0)
                )
                cost = sum(short) + idle
                if cost > budget:
                    continue
                # Fewest models left short, the shortest expected drain (the waiting model's
                # outage is its wait, then this drain: a 70B's last requests held a block for
                # 10-15 s while another block would have drained in 5), the fewest requests
                # the models left short miss, a prewarm hit, then the fewest requests to drain
                # and the fewest GPUs freed beyond the block.
                if sent is None:
                    sent = self._dispatch_times()
                drain = self._drain_s(holders, sent, now)
                key = (len(short), drain, cost, group not in hits, load, extra, len(holders),
                       base)  # fmt: skip
                if best is None or key < best[0]:
                    best = (key, group, holders)
        return None if best is None else (best[1], best[2])

    def _dispatch_times(self) -> dict[InstanceId, list[float]]:
        """Per instance, when each of its in-flight requests was dispatched."""
        out: dict[InstanceId, list[float]] = {}
        for rid, inst_id in self._request_instance.items():
            t = self._dispatched_s.get(rid)
            if t is not None:
                out.setdefault(inst_id, []).append(t)
        return out

    def _drain_s(
        self, holders: list[InstanceId], sent: dict[InstanceId, list[float]], now: float
    ) -> float:
        """Expected seconds until the instances `holders` finish their in-flight requests: the
        longest expected time left of any of them, from its model's recent service times and
        how long it has run (what a server knows; not the requests' output lengths)."""
        times = self._service_times
        return max(
            (
                times.left(self._instances[i].model, now - t)
                for i in holders
                for t in sent.get(i, ())
            ),
            default=0.0,
        )

    def _prewarm_held(
        self, name: ModelName, group: tuple[int, ...], now: float, cluster: ClusterHandle
    ) -> None:
        """Load `name`'s weights into the block held for it while its instances drain, so that
        the start is a prewarm (or in-progress) hit rather than a cold load after the drain:
        into free pages (with the KV the draining instances there can no longer use), evicting
        other models' replicas there (lowest score first) if those pages are short. Nothing if
        a replica of `name` is already there or room is short."""
        snap = cluster.snapshot()
        if any(r.model == name and r.gpus == group for r in snap.replicas):
            return
        if self._lend_draining(group, snap, now, cluster):
            snap = cluster.snapshot()
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

    def _lend_draining(
        self, group: tuple[int, ...], snap: ClusterSnapshot, now: float, cluster: ClusterHandle
    ) -> bool:
        """Shrink the KV of the instances draining on `group` to what their requests can still
        use, so that the held model's weights load during the drain instead of after it (a
        cold 70B load after a drain was most of the worst outage's last seconds). A draining
        instance admits nothing new, and no request outgrows the model's context length, so
        its in-flight requests times a full context is enough (no hidden output length read).
        True if any KV moved."""
        views = snap.instance_by_id
        actions: list[Action] = []
        for inst_id in sorted({snap.gpus[g].instance_id for g in group} - {None}):
            inst, view = self._instances.get(inst_id), views.get(inst_id)
            if inst is None or view is None or not inst.stopping:
                continue
            full_contexts = kv_floor_pages(self.models[inst.model], inst.in_flight, snap.page_bytes)
            target = max(1, view.kv_used_pages, full_contexts)
            if target < view.kv_pages:
                action = SetKvPages(inst_id, target)
                self._record([action], now, view.kv_pages)
                inst.kv_changed_s = now
                actions.append(action)
        if actions:
            cluster.apply(actions)
        return bool(actions)

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
        budget = self._start_value(name, now)
        found = self._block_to_free(name, cluster.snapshot(), now, busy=False, budget=budget)
        if found is None:
            return None
        self._stop_now(found[1], cluster)
        return self._choose_start(self.models[name], cluster.snapshot(), now)

    def _rescue_starving(self, now: float, cluster: ClusterHandle) -> None:
        """Hold an aligned block for each model whose oldest request has waited
        `starve_wait_s` with no room: free it (idle instances stop, busy ones drain), and keep
        every other model's starts off it until this model starts. This bounds a wait by the
        drain of one block rather than by the luck of races for freed GPUs. Until
        `starve_preempt_s`, only instances whose models keep enough others are drained. While
        a block is held, each tick retries its prewarm (its draining instances' spare KV grows
        as their requests end)."""
        for name in [m for m in self._reserved if not self._queues[m]]:
            del self._reserved[name]
        for name in self._autoscale_order():
            queue = self._queues[name]
            if not queue:
                continue
            waited = now - queue[0].arrival_s
            if name in self._reserved:
                if self.policy.unified_memory:
                    self._prewarm_held(name, self._reserved[name], now, cluster)
                continue
            if waited < self.cfg.starve_wait_s:
                continue
            if self._route(name) is not None or self._start(name, now, cluster):
                continue
            # A model's last instance (or one its load needs) is drained only after a longer
            # wait: its own requests then queue, and each such switch costs a drain and a
            # start. So such a preemption must pay: what the models it leaves short miss (their
            # load, and the requests they would miss waiting behind the others in line) may
            # not exceed what this model's start saves (counted the same way), scaled up by how
            # many starve_preempt_s it has waited so that any wait stays bounded; and
            # preemptions are spaced by starve_preempt_gap_s across the cluster, so that when
            # many models starve at once (more models than fit), the popular ones are not
            # drained in turn for each of them. Before, the same price (unscaled) guards the
            # idle last instances a hold stops.
            value = self._start_value(name, now)
            found = self._block_to_free(name, cluster.snapshot(), now, True, False, value)
            gap = now - self._last_preempt_s >= self.cfg.starve_preempt_gap_s
            if found is None and waited >= self.cfg.starve_preempt_s and gap:
                budget = math.inf
                if self.cfg.starve_preempt_s > 0:
                    budget = value * waited / self.cfg.starve_preempt_s
                found = self._block_to_free(name, cluster.snapshot(), now, True, True, budget)
                if found is not None:
                    self._last_preempt_s = now
            if found is None:
                continue
            self._reserved[name] = found[0]
            self._stop_now(found[1], cluster)
            if not self._start(name, now, cluster) and self.policy.unified_memory:
                self._prewarm_held(name, found[0], now, cluster)
