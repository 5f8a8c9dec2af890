"""The control plane: forecaster, autoscaler, router, instance start, KV reservation, planner.

It owns policy state only and reaches the world through a `ClusterHandle`. The simulator calls
it from events on a simulated clock; the serving runtime calls it from a loop on the wall clock.
`Controller` holds all the state, takes the events and autoscales and starts instances; its
mixins hold the rest of its policy, one module each: fair starts (`fair_starts.py`), KV lending
(`kv_lending.py`), proactive prewarm planning (`prewarming.py`) and the record of memory
actions (`memory_counts.py`).
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
    ReleaseInstance,
    RequestInfo,
    ServedModel,
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
from warmserve.control.kv_lending import KvLending
from warmserve.control.load import ConcurrencySeries
from warmserve.control.memory_counts import ControlCounters, MemoryCounts
from warmserve.control.plan_skip import IdlePlan
from warmserve.control.prewarming import Prewarming
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


class Controller(FairStarts, KvLending, Prewarming, MemoryCounts):
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
