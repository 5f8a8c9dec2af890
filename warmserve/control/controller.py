"""The control plane: forecaster, autoscaler, router, instance start, KV reservation, planner.

It owns policy state only and reaches the world through a `ClusterHandle`. The simulator calls
it from events on a simulated clock; the serving runtime calls it from a loop on the wall clock.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from warmserve.control.allocation import StartChoice, StartContext, choose_start
from warmserve.control.api import (
    Action,
    ClusterHandle,
    ClusterSnapshot,
    Dispatch,
    Evict,
    InstanceView,
    Prewarm,
    ReleaseInstance,
    RequestInfo,
    ServedModel,
    SetKvPages,
    StartInstance,
    StopInstance,
)
from warmserve.control.autoscaler import (
    ActiveInstance,
    QuietModels,
    pick_to_stop,
    scale_delta,
)
from warmserve.control.config import ControlConfig, PolicySpec
from warmserve.control.drain_estimate import ServiceTimes
from warmserve.control.fair_starts import FairStarts
from warmserve.control.forecaster import Forecast, Forecaster
from warmserve.control.kv_reservation import kv_actions, kv_floor_pages, kv_target
from warmserve.control.load import ConcurrencySeries
from warmserve.control.plan_skip import IdlePlan, still_idle
from warmserve.control.planner import PlanInput, demands, plan_evict_aware, plan_round_robin
from warmserve.control.router import least_loaded
from warmserve.types import InstanceId, InstanceState, ModelName, ReplicaId, RequestId, StartPath


@dataclass(slots=True)
class _Instance:
    model: ModelName
    created_s: float
    in_flight: int = 0
    stopping: bool = False
    last_active_s: float = 0.0  # last dispatch or completion
    kv_changed_s: float = float("-inf")  # last lend or reclaim of its KV pages


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


class Controller(FairStarts):
    def __init__(
        self,
        cfg: ControlConfig,
        policy: PolicySpec,
        models: Sequence[ServedModel],
        forecaster: Forecaster,
    ) -> None:
        self.cfg = cfg
        self.policy = policy
        self.models: dict[ModelName, ServedModel] = {m.name: m for m in models}
        self.forecaster = forecaster
        self._load = {m.name: ConcurrencySeries(cfg.scale_window_s) for m in models}
        self._queues: dict[ModelName, deque[RequestInfo]] = {m.name: deque() for m in models}
        self._instances: dict[InstanceId, _Instance] = {}
        # Per model, its instances not stopping (running or starting): kept as `_instances`
        # changes (`_add_instance`, `_set_stopping`, `_release`, a failure), read every tick.
        self._live = dict.fromkeys(self.models, 0)
        self._live_version = 0  # moves with every change of `_live`
        self._request_instance: dict[RequestId, InstanceId] = {}
        self._replica_scores: dict[int, float] = {}
        self._requests_seen = 0  # dispatches + completions, to skip unchanged KV reviews
        # The handle's versions() and the in-flight count after the last tick's KV review.
        self._kv_reviewed: tuple[tuple[int, int], int] | None = None
        # Per running instance, the (view, in-flight) of a tick review that could not act on
        # any cluster: the next tick skips it while they are unchanged. After a resize to the
        # target, (None, in-flight, KV pages, used pages, lent pages) of the view it leaves,
        # which the next review would settle (see `_review_kv`).
        self._kv_settled: dict[InstanceId, tuple] = {}
        self._kv_floors: dict[ModelName, tuple[int, int]] = {}  # (page bytes, floor pages)
        self._next_instance = 0
        self._next_replica = 0
        self._window = 0
        # The handle's layout version the last plan saw (versions()[0]): while it is unchanged,
        # the snapshot's gpus and replicas are, and the plan would be the same.
        self._last_planned: int | None = None
        # forecasts() as the planner reads it: forecasts change only when a window closes.
        self._window_forecasts: dict[ModelName, Forecast] | None = None
        # (placement version, live-count version) of the last plan check whose demand was
        # `_nothing_wanted`; None after any other outcome (see `_plan`).
        self._quiet_plan: tuple[int, tuple] | None = None
        self._replica_born: dict[ReplicaId, float] = {}  # when its Prewarm was issued
        # The inputs of the last plan if it did nothing, and its demand's if it wanted nothing.
        self._unchanged_plan: tuple | None = None
        self._nothing_wanted: tuple | None = None
        self._idle_plan: IdlePlan | None = None  # the last plan, if it wanted and placed nothing
        self._counts = dict.fromkeys(ControlCounters.__slots__, 0)
        # Fair starts: aligned GPU blocks held for starving models (no other model starts there).
        self._reserved: dict[ModelName, tuple[int, ...]] = {}
        # Fair starts: when each in-flight request was dispatched, and recent service times,
        # to rank held blocks by how long their drain will take.
        self._dispatched_s: dict[RequestId, float] = {}
        self._service_times = ServiceTimes()
        self._tp_sizes = frozenset(m.tp for m in models)
        self._last_preempt_s = -math.inf  # the last held block that left a model short
        # Fair starts: per model, arrival times within starve_rate_window_s (its arrival rate,
        # what a preemption's price counts), and when the first request came (the window's
        # start before a full window has passed).
        self._arrivals: dict[ModelName, deque[float]] = {m.name: deque() for m in models}
        self._first_arrival_s: float | None = None
        # This class's autoscaling does nothing for a model with no instance, no load and no
        # queue (scale_delta is 0); a subclass's own may (static deployments start at once).
        self._idle_autoscale_noop = type(self)._autoscale is Controller._autoscale
        self._quiet = QuietModels(self._load, cfg)
        self._model_order = tuple(self.models)

    # ----- events -----------------------------------------------------------------------
    def on_request(self, now: float, req: RequestInfo, cluster: ClusterHandle) -> None:
        self._load[req.model].add(now, +1)
        if self.policy.fair_starts:
            self._note_arrival(req.model, now)
        target = self._route(req.model)
        if target is not None:
            self._dispatch(req, target, cluster, now)
            return
        self._queues[req.model].append(req)
        self._start(req.model, now, cluster)

    def on_request_done(self, now: float, request_id: RequestId, cluster: ClusterHandle) -> None:
        inst_id = self._request_instance.pop(request_id)
        self._requests_seen += 1
        inst = self._instances[inst_id]
        sent = self._dispatched_s.pop(request_id, None)
        if sent is not None:
            self._service_times.add(inst.model, now - sent)
        self._load[inst.model].add(now, -1)
        inst.in_flight -= 1
        inst.last_active_s = now
        if inst.stopping:
            if inst.in_flight == 0:  # drained
                self._release(inst_id, cluster)
            return
        queue = self._queues[inst.model]
        if queue:
            self._dispatch(queue.popleft(), inst_id, cluster, now)

    def cancel_queued(self, now: float, request_id: RequestId) -> bool:
        """Drop a request still waiting for an instance (its client went away). False if it
        was dispatched (then it ends through `on_request_done`) or is unknown."""
        for name, queue in self._queues.items():
            for req in queue:
                if req.request_id == request_id:
                    queue.remove(req)
                    self._load[name].add(now, -1)
                    return True
        return False

    def on_instance_failed(
        self, now: float, instance_id: InstanceId, cluster: ClusterHandle
    ) -> list[RequestId]:
        """An instance died with its worker: forget it; the requests it held, for the driver
        to retry (through `on_request`) or fail."""
        inst = self._instances.pop(instance_id, None)
        if inst is not None and not inst.stopping:
            self._live_add(inst.model, -1)
        lost = [r for r, i in self._request_instance.items() if i == instance_id]
        for rid in lost:
            del self._request_instance[rid]
            self._dispatched_s.pop(rid, None)
            if inst is not None:
                self._load[inst.model].add(now, -1)
        self._last_planned = None
        self._quiet_plan = None
        return lost

    def tick(self, now: float, cluster: ClusterHandle) -> None:
        if now >= (self._window + 1) * self.cfg.forecast_window_s:  # as `_close_windows` tests
            self._close_windows(now)
        if self._idle_autoscale_noop:
            # Most models, most ticks, autoscale to nothing (QuietModels): skipped without a
            # call. The live counts are kept current (a start may stop other models' idle
            # instances).
            queues, quiet, loads, live = self._queues, self._quiet, self._load, self._live
            # QuietModels' own first test, read here without a call (most models, most ticks).
            known = quiet.known if -quiet.limit_s < now < quiet.limit_s else {}
            start = now - self.cfg.scale_window_s
            for name in self._autoscale_order():
                if not queues[name]:
                    k = known.get(name)
                    n = live[name]
                    if (
                        k is not None
                        and k[0] is loads[name].last_step
                        and k[1] == n
                        and start < k[2]
                    ):
                        continue
                    if quiet.scale_is_zero(name, n, now):
                        continue
                self._autoscale(name, now, cluster)
        else:
            for name in self._autoscale_order():
                self._autoscale(name, now, cluster)
        policy = self.policy
        if policy.fair_starts:
            self._rescue_starving(now, cluster)
        if policy.unified_memory and policy.kv_prewarm:
            self._reserve_kv(cluster, now)  # moves KV pages and replicas, never an instance
        if (
            policy.unified_memory
            and policy.proactive_prewarm
            and cluster.versions()[0] != self._last_planned  # `_plan`'s own first test
        ):
            self._plan(cluster, now)

    def _autoscale_order(self) -> Sequence[ModelName]:
        """Popularity order (the reference's); with aging, models with queued requests first,
        the one waiting longest first, so a model's priority grows with its wait."""
        if not self.policy.queue_aging:
            return self._model_order
        waiting = sorted(
            (q[0].arrival_s, rank, name) for rank, (name, q) in enumerate(self._queues.items()) if q
        )
        first = [name for _, _, name in waiting]
        return first + [name for name in self.models if not self._queues[name]]

    # ----- queries ----------------------------------------------------------------------
    def num_queued(self, model: ModelName) -> int:
        """Requests of `model` waiting for an instance."""
        return len(self._queues[model])

    def queued_request_ids(self) -> set[RequestId]:
        return {r.request_id for q in self._queues.values() for r in q}

    def load(self, model: ModelName, now: float) -> float:
        return self._load[model].mean(now, self.cfg.scale_window_s)

    def forecasts(self) -> dict[ModelName, Forecast]:
        return {m: self.forecaster.forecast(m) for m in self.models}

    # ----- routing and starts -----------------------------------------------------------
    def _route(self, model: ModelName) -> InstanceId | None:
        return least_loaded(self._instances, model, self.cfg.capacity_per_instance)

    def _dispatch(
        self, req: RequestInfo, inst_id: InstanceId, cluster: ClusterHandle, now: float
    ) -> None:
        self._requests_seen += 1
        inst = self._instances[inst_id]
        inst.in_flight += 1
        inst.last_active_s = now
        self._request_instance[req.request_id] = inst_id
        if self.policy.fair_starts:
            self._dispatched_s[req.request_id] = now
        cluster.apply([Dispatch(req.request_id, inst_id)])

    def _start(self, name: ModelName, now: float, cluster: ClusterHandle) -> bool:
        choice = self._choose_start(self.models[name], cluster.snapshot(), now)
        # Other models' idle instances are stopped only for a request that waits now. A start
        # for load alone (the autoscaler's) must not: two models that cannot be live together
        # (a TP 2 model and another on two workers) would demote each other's idle instance on
        # every tick, each switch a cold start, with no request waiting for either.
        waiting = bool(self._queues[name])
        if not waiting and self.policy.fair_starts and self._larger_waiting(name):
            # An extra instance for load waits while a larger model has requests queued: the
            # free GPUs it would take are what that model's block needs (a model of the same
            # size or smaller would have taken them), and a waiting request comes first.
            return False
        if (
            waiting
            and self.policy.prior_prewarm
            and (choice is None or choice.path == StartPath.COLD)
        ):
            choice = self._demote_for_hit(name, now, cluster) or choice
        if choice is None and waiting and self.policy.keep_alive:
            if self.policy.fair_starts:
                choice = self._demote_block(name, now, cluster)
            else:
                choice = self._reclaim_idle(name, now, cluster)
        if choice is None:
            return False
        self._reserved.pop(name, None)  # started: a held block (if any) is free for all again
        inst_id = self._new_instance_id()
        # A miss under unified memory loads into a slot, like a prewarm: name that replica.
        slot = self.policy.unified_memory and choice.replica_id is None
        actions: list[Action] = [Evict(r) for r in choice.evict]
        actions.append(
            StartInstance(
                inst_id,
                name,
                choice.gpus,
                choice.path,
                choice.replica_id,
                new_replica_id=self._kept_replica_id(inst_id) if slot else None,
            )
        )
        self._record(actions, now)
        cluster.apply(actions)
        self._add_instance(inst_id, name, now)
        queue = self._queues[name]
        while queue and self._instances[inst_id].in_flight < self.cfg.capacity_per_instance:
            self._dispatch(queue.popleft(), inst_id, cluster, now)
        return True

    def _choose_start(
        self, model: ServedModel, snap: ClusterSnapshot, now: float
    ) -> StartChoice | None:
        ctx = None
        if self.policy.fair_starts:
            ctx = StartContext(
                blocked=self._blocked(model.name),
                waiting_tps=frozenset(
                    self.models[m].tp for m, q in self._queues.items() if q and m != model.name
                ),
                tp_sizes=self._tp_sizes,
            )
        return choose_start(
            model,
            snap,
            smart=self.policy.smart_placement,
            use_replicas=self.policy.unified_memory,
            ctx=ctx,
        )

    def _stoppable(self, active: list[ActiveInstance], now: float) -> list[ActiveInstance]:
        """Instances scale-down may pick from; the protect period applies later. With keep-alive,
        only those idle for `keep_alive_s`."""
        if not self.policy.keep_alive:
            return active
        keep = self.cfg.keep_alive_s
        return [
            a
            for a in active
            if a.in_flight == 0 and now - self._instances[a.instance_id].last_active_s >= keep
        ]

    # ----- periodic policy --------------------------------------------------------------
    def _close_windows(self, now: float) -> None:
        window_s = self.cfg.forecast_window_s
        while now >= (self._window + 1) * window_s:
            for name, series in self._load.items():
                avg, peak = series.close_window(now, window_s)
                self.forecaster.close_window(name, self._window, avg, peak)
            self._window += 1
            self._last_planned = None  # forecasts changed: plan again
            self._window_forecasts = None
            self._quiet_plan = None

    def _autoscale(self, name: ModelName, now: float, cluster: ClusterHandle) -> None:
        queue = self._queues[name]
        live = [
            (i, inst)
            for i, inst in self._instances.items()
            if inst.model == name and not inst.stopping
        ]
        window_s = self.cfg.scale_window_s
        delta = scale_delta(self._load[name].mean(now, window_s), len(live), self.cfg)
        if delta < 0:
            # Which instances are still starting: the instance views alone (the snapshot's
            # own objects), not a snapshot, which a stop would make stale at once.
            starting = InstanceState.STARTING
            starting_ids = {v.instance_id for v in cluster.instance_views() if v.state == starting}
            active = [
                ActiveInstance(i, inst.created_s, inst.in_flight, i in starting_ids)
                for i, inst in live
            ]
            stops = pick_to_stop(self._stoppable(active, now), -delta, now, self.cfg)
            actions: list[Action] = []
            for inst_id in stops:
                inst = self._instances[inst_id]
                self._set_stopping(inst)
                if inst.in_flight == 0:
                    del self._instances[inst_id]
                    actions.append(ReleaseInstance(inst_id, self._keep_as(inst_id)))
                else:
                    actions.append(StopInstance(inst_id))
            if actions:
                cluster.apply(actions)
        elif delta > 0:
            for _ in range(delta):
                if not self._start(name, now, cluster):
                    break
        # Requests still queued with no room anywhere (e.g. GPUs were busy when they came).
        if queue and self._route(name) is None:
            self._start(name, now, cluster)

    def _live_counts(self) -> dict[ModelName, int]:
        """Per model, its instances not stopping (a copy: the caller's, as of now)."""
        return self._live.copy()

    def _live_add(self, model: ModelName, delta: int) -> None:
        self._live[model] += delta
        self._live_version += 1  # the quiet plan check compares it, not the counts

    def _set_stopping(self, inst: _Instance) -> None:
        """The instance leaves routing (it drains, or is released at once)."""
        if not inst.stopping:
            inst.stopping = True
            self._live_add(inst.model, -1)

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

    def on_kv_pressure(self, now: float, instance_id: InstanceId, cluster: ClusterHandle) -> None:
        """An instance has requests waiting for KV while some of its pages are lent: reclaim
        now rather than at the next tick."""
        if not (self.policy.unified_memory and self.policy.kv_prewarm):
            return
        view = cluster.snapshot().instance_by_id.get(instance_id)
        if view is not None and view.state == InstanceState.RUNNING:
            self._review_kv(view, cluster, now, pressure=True)

    def _plan(
        self, cluster: ClusterHandle, now: float, live: dict[ModelName, int] | None = None
    ) -> None:
        """`live`: `_live_counts()` if the caller has them, taken since the last change."""
        layout, _, placement = cluster.versions()
        if layout == self._last_planned:
            return
        # A plan is a function of its inputs alone (ids are drawn only for actions). When the
        # last one wanted no new replica, only the demand's inputs matter (usually only free
        # pages moved since, with a KV lend); else all it reads. Equal inputs, the same plan.
        quiet = self._quiet_plan
        if quiet is not None and quiet[0] == placement and quiet[1] == self._live_version:
            # Only KV resizes and engines coming up (the placement unchanged) since a check
            # whose demand was `_nothing_wanted` (or a plan that wanted nothing), with the same
            # forecasts (a window's close clears this) and live counts: the demand's replicas
            # and stopping instances are unchanged too, so it is `_nothing_wanted` again,
            # known without a snapshot (the commonest check: just after a KV lend).
            self._last_planned = layout
            return
        self._quiet_plan = None
        forecasts = self._window_forecasts
        if forecasts is None:
            forecasts = self._window_forecasts = self.forecasts()
        if live is None:
            live = self._live_counts()
        # The demand from the handle's narrow read: the same tuple `_demand_key` makes of a
        # snapshot, without building one (most checks here follow a start or a stop).
        replicas, stopping = cluster.demand_reads()
        demand = (replicas, stopping, tuple(forecasts.items()), tuple(live.items()))
        if demand == self._nothing_wanted:
            self._last_planned = layout
            self._quiet_plan = (placement, self._live_version)
            return
        cfg = self.cfg
        existing, wanted = demands(
            self.models,
            replicas,
            stopping,
            forecasts,
            live,
            cfg.planning_bandwidth,
            cfg.capacity_per_instance,
            self.policy.prior_prewarm,
        )
        if not wanted:
            # Either planner returns `Plan([], existing)` on this demand (the usual check after
            # a start or stop): its outcome, as the long way below records it, without the
            # snapshot, the layout key or a second pass over the demand.
            self._prune_born(now)
            self._replica_scores = existing
            self._nothing_wanted = demand
            self._quiet_plan = (placement, self._live_version)
            self._unchanged_plan = None  # only a shortcut for later checks; none taken here
            self._idle_plan = None
            self._last_planned = layout
            return
        snap = cluster.snapshot()
        key = (demand, _layout_key(snap))
        idle = self._idle_plan
        if key == self._unchanged_plan or (idle is not None and still_idle(idle, *key)):
            # As a plan that places nothing would leave it (its scores are the last ones);
            # birth times are pruned at the next plan that runs (none it drops can count).
            self._unchanged_plan = key
            self._last_planned = layout
            return
        self._prune_born(now)
        inp = PlanInput(
            snapshot=snap,
            models=self.models,
            forecasts=forecasts,
            live_instances=live,
            planning_bandwidth=self.cfg.planning_bandwidth,
            capacity=self.cfg.capacity_per_instance,
            group_search=self.cfg.group_search,
            prior=self.policy.prior_prewarm,
        )
        if self.policy.smart_placement:
            plan = plan_evict_aware(inp, self._new_replica_id)
        else:
            plan = plan_round_robin(
                inp, self._new_replica_id, reference_quirk=self.policy.reference_round_robin
            )
        self._replica_scores = plan.scores
        self._nothing_wanted = demand if plan.num_wanted == 0 else None
        if plan.num_wanted == 0:  # placed nothing: the placement read above still holds
            self._quiet_plan = (placement, self._live_version)
        self._unchanged_plan = None if plan.actions else key
        # Only free pages moved since a plan that wanted replicas and placed none: often the
        # same again (plan_skip.py), with the evict-aware planner and no priors.
        self._idle_plan = None
        if plan.wanted_sizes and not plan.actions and not inp.prior:
            self._idle_plan = IdlePlan(demand, key[1][1:], key[1][0], plan.wanted_sizes)
        if plan.actions:
            self._record(plan.actions, now)
            cluster.apply(plan.actions)
            layout = cluster.versions()[0]
        self._last_planned = layout

    def _prune_born(self, now: float) -> None:
        # Birth times matter for QUICK_EVICT_S and prewarm_min_life_s only (older ones count
        # for neither); replicas that went another way (a lost worker) must not pile up here.
        horizon = now - max(QUICK_EVICT_S, self.cfg.prewarm_min_life_s)
        self._replica_born = {r: t for r, t in self._replica_born.items() if t >= horizon}

    # ----- instance records and ids ----------------------------------------------------
    def _add_instance(self, inst_id: InstanceId, name: ModelName, now: float) -> None:
        """Record an instance just started (the hook subclasses use after their own starts)."""
        self._instances[inst_id] = _Instance(name, now, last_active_s=now)
        self._live_add(name, +1)

    def _live_instances(self, name: ModelName) -> int:
        return self._live[name]  # kept as instances start, stop and go

    def _release(self, inst_id: InstanceId, cluster: ClusterHandle) -> None:
        """The instance holds no request: forget it and free its pages."""
        inst = self._instances.pop(inst_id)
        if not inst.stopping:  # an idle one released at once
            self._live_add(inst.model, -1)
        cluster.apply([ReleaseInstance(inst_id, self._keep_as(inst_id))])

    def _keep_as(self, inst_id: InstanceId) -> ReplicaId | None:
        """Under unified memory an instance's weights sit in a slot and stay there, prewarmed,
        when it stops; otherwise they go with its engine."""
        return self._kept_replica_id(inst_id) if self.policy.unified_memory else None

    @staticmethod
    def _kept_replica_id(inst_id: InstanceId) -> ReplicaId:
        """The id of the replica an instance's weights become: negative, so it never meets
        the planner's counter, and derived from the instance, so it is known at start."""
        return -(inst_id + 1)

    def _new_instance_id(self) -> InstanceId:
        inst_id = self._next_instance
        self._next_instance += 1
        return inst_id

    def _new_replica_id(self) -> int:
        rid = self._next_replica
        self._next_replica += 1
        return rid

    @property
    def replica_scores(self) -> Mapping[int, float]:
        return self._replica_scores


def _demand_key(
    snap: ClusterSnapshot, forecasts: Mapping[ModelName, Forecast], live: Mapping[ModelName, int]
) -> tuple:
    """What the planners' demand reads (models and constants are fixed for a controller)."""
    return (
        tuple((r.replica_id, r.model) for r in snap.replicas),
        tuple(i.model for i in snap.instances if i.state == InstanceState.STOPPING),
        tuple(forecasts.items()),
        tuple(live.items()),
    )


def _layout_key(snap: ClusterSnapshot) -> tuple:
    """The rest of what the planners read, in order (the order sets ties and float sums)."""
    return (
        tuple(g.free_pages for g in snap.gpus),
        tuple((r.gpus, r.pages_per_gpu) for r in snap.replicas),
        tuple((i.instance_id, i.model, i.gpus) for i in snap.instances),
    )
