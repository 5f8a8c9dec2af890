"""Proactive prewarming: plan which replicas to prewarm (and which to evict) from the forecasts,
the live instances and the cluster's layout, and skip the plan while its inputs are those of a
plan that did nothing.

The planners themselves: `planner.py` and `placement.py`; the idle-plan test: `plan_skip.py`.
A mixin of `Controller`, whose state it reads and whose actions it records; split out only to
keep each module about one thing.
"""

from __future__ import annotations

from collections.abc import Mapping

from warmserve.control.api import ClusterHandle, ClusterSnapshot
from warmserve.control.forecaster import Forecast
from warmserve.control.plan_skip import IdlePlan, still_idle
from warmserve.control.planner import PlanInput, demands, plan_evict_aware, plan_round_robin
from warmserve.types import InstanceState, ModelName


class Prewarming:
    """Methods of `Controller` (its only subclass), which holds the state they read: `models`,
    `cfg`, `policy`, `forecasts()`, `_last_planned`, `_quiet_plan`, `_live_version`,
    `_live_counts()`, `_window_forecasts`, `_nothing_wanted`, `_unchanged_plan`, `_idle_plan`,
    `_replica_scores`, `_new_replica_id`, and `_record` and `_prune_born` (MemoryCounts)."""

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
