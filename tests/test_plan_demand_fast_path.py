"""The plan check reads the demand through the handle's `demand_reads` and settles a demand
that wants nothing without a snapshot (Controller._plan), and a scale-down reads which
instances are starting from the instance views; here the runs are compared with both as they
were (a snapshot each), the narrow read with the snapshot's, and the shortcut is shown to be
taken."""

from __future__ import annotations

import dataclasses

import pytest
from sim_golden import cases, fingerprint

from warmserve.cluster.books import Books
from warmserve.control import controller as controller_mod
from warmserve.control.api import Action, ClusterHandle, ReleaseInstance, StopInstance
from warmserve.control.autoscaler import ActiveInstance, pick_to_stop, scale_delta
from warmserve.control.controller import (
    QUICK_EVICT_S,
    Controller,
    IdlePlan,
    _demand_key,
    _layout_key,
    still_idle,
)
from warmserve.control.planner import PlanInput, _demands, plan_evict_aware, plan_round_robin
from warmserve.sim.runner import make_workload, run_policy
from warmserve.types import InstanceState, ModelName


def _long_plan(
    self: Controller, cluster: ClusterHandle, now: float, live: dict[ModelName, int] | None = None
) -> None:
    """The plan check before the narrow demand read (a verbatim copy)."""
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
    snap = cluster.snapshot()
    demand = _demand_key(snap, forecasts, live)
    if demand == self._nothing_wanted:
        self._last_planned = layout
        self._quiet_plan = (placement, self._live_version)
        return
    key = (demand, _layout_key(snap))
    idle = self._idle_plan
    if key == self._unchanged_plan or (idle is not None and still_idle(idle, *key)):
        # As a plan that places nothing would leave it (its scores are the last ones);
        # birth times are pruned at the next plan that runs (none it drops can count).
        self._unchanged_plan = key
        self._last_planned = layout
        return
    # Birth times matter for QUICK_EVICT_S and prewarm_min_life_s only (older ones count
    # for neither); replicas that went another way (a lost worker) must not pile up here.
    horizon = now - max(QUICK_EVICT_S, self.cfg.prewarm_min_life_s)
    self._replica_born = {r: t for r, t in self._replica_born.items() if t >= horizon}
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


def _long_autoscale(self: Controller, name: ModelName, now: float, cluster: ClusterHandle) -> None:
    """Autoscaling before the stop path read the instance views (a verbatim copy)."""
    queue = self._queues[name]
    live = [
        (i, inst) for i, inst in self._instances.items() if inst.model == name and not inst.stopping
    ]
    window_s = self.cfg.scale_window_s
    delta = scale_delta(self._load[name].mean(now, window_s), len(live), self.cfg)
    if delta < 0:
        views = cluster.snapshot().instance_by_id
        active = [
            ActiveInstance(i, inst.created_s, inst.in_flight,
                           (v := views.get(i)) is not None
                           and v.state == InstanceState.STARTING)
            for i, inst in live
        ]  # fmt: skip
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


def _checked_reads(self: Books):
    """`demand_reads`, checked against the snapshot it stands for."""
    reads = _plain_reads(self)
    snap = _plain_snapshot(self)
    assert reads == (
        tuple((r.replica_id, r.model) for r in snap.replicas),
        tuple(i.model for i in snap.instances if i.state == InstanceState.STOPPING),
    )
    return reads


_plain_reads = Books.demand_reads
_plain_snapshot = Books.snapshot


@pytest.fixture(scope="module")
def runs():
    out = {}
    for name, minutes in (("servegen-m-mid-16rps-5min", 2.0), ("paper-azure-conv-1h", 20.0)):
        exp, _ = cases()[name]
        w = dataclasses.replace(exp.workload, duration_s=60.0 * minutes)
        exp = dataclasses.replace(exp, workload=w)
        out[name] = (exp, make_workload(exp))
    return out


@pytest.mark.parametrize("case", ["servegen-m-mid-16rps-5min", "paper-azure-conv-1h"])
@pytest.mark.parametrize(
    "policy", ["warmserve", "warmserve-plus", "warmserve-no-placement", "warmserve-no-kv-prewarm"]
)
def test_demand_shortcut_changes_nothing(runs, case, policy, monkeypatch):
    exp, wl = runs[case]
    builds = {"n": 0}
    shortcuts = {"n": 0}
    plain_build = Books._build_snapshot
    plain_demands = controller_mod.demands

    def counted_build(self, layout_changed):
        builds["n"] += 1
        return plain_build(self, layout_changed)

    def counted_demands(*args):
        existing, wanted = plain_demands(*args)
        shortcuts["n"] += not wanted
        return existing, wanted

    monkeypatch.setattr(Books, "_build_snapshot", counted_build)
    monkeypatch.setattr(controller_mod, "demands", counted_demands)
    fast = run_policy(exp, policy, wl)
    fast_builds = builds["n"]

    builds["n"] = 0
    monkeypatch.setattr(Controller, "_plan", _long_plan)
    monkeypatch.setattr(Controller, "_autoscale", _long_autoscale)
    full = run_policy(exp, policy, wl)
    assert fingerprint(fast) == fingerprint(full)
    assert full.summary["control"] == fast.summary["control"]
    if policy != "warmserve" or case != "paper-azure-conv-1h":
        return
    # The week's replay in small: most plan checks follow a start or a stop and want nothing.
    assert shortcuts["n"] > 50
    assert fast_builds < builds["n"]


@pytest.mark.parametrize("policy", ["warmserve", "warmserve-plus"])
def test_demand_reads_match_the_snapshot(runs, policy, monkeypatch):
    """At every plan check, the narrow read is what the demand key reads of a snapshot, and
    the demand computed from it is the planners' own."""
    exp, wl = runs["servegen-m-mid-16rps-5min"]
    checks = {"n": 0}
    plain_demands = controller_mod.demands

    def checked_demands(models, replicas, stopping, forecasts, live, bw, cap, prior):
        got = plain_demands(models, replicas, stopping, forecasts, live, bw, cap, prior)
        snap = checked_demands.cluster.snapshot()
        assert (replicas, stopping, tuple(forecasts.items()), tuple(live.items())) == _demand_key(
            snap, forecasts, live
        )
        inp = PlanInput(snap, models, forecasts, live, bw, cap, prior=prior)
        assert got == _demands(inp)
        checks["n"] += 1
        return got

    plain_plan = Controller._plan

    def plan(self, cluster, now, live=None):
        checked_demands.cluster = cluster
        return plain_plan(self, cluster, now, live)

    monkeypatch.setattr(controller_mod, "demands", checked_demands)
    monkeypatch.setattr(Controller, "_plan", plan)
    monkeypatch.setattr(Books, "demand_reads", _checked_reads)
    run_policy(exp, policy, wl)
    assert checks["n"] > 10


@pytest.mark.parametrize("policy", ["warmserve", "warmserve-plus", "vanilla-autoscale"])
def test_scale_down_reads_starting_as_the_snapshot(policy, monkeypatch):
    """Each instance a scale-down weighs is marked starting exactly when the snapshot's view
    of it says so."""
    exp, _ = cases()["servegen-m-mid-16rps-5min"]  # the whole five minutes
    wl = make_workload(exp)
    seen = {"n": 0, "starting": 0}
    current: dict[str, ClusterHandle] = {}
    plain_autoscale = Controller._autoscale
    plain_stoppable = Controller._stoppable

    def autoscale(self, name, now, cluster):
        current["cluster"] = cluster
        return plain_autoscale(self, name, now, cluster)

    def stoppable(self, active, now):
        views = current["cluster"].snapshot().instance_by_id
        for a in active:
            v = views.get(a.instance_id)
            assert a.starting == (v is not None and v.state == InstanceState.STARTING)
            seen["n"] += 1
            seen["starting"] += a.starting
        return plain_stoppable(self, active, now)

    monkeypatch.setattr(Controller, "_autoscale", autoscale)
    monkeypatch.setattr(Controller, "_stoppable", stoppable)
    run_policy(exp, policy, wl)
    assert seen["n"] > 10
    assert seen["starting"] > 0  # both answers are checked
