"""The plan check reads the demand through the handle's `demand_reads` and settles a demand
that wants nothing without a snapshot (Controller._plan), and a scale-down reads which
instances are starting from the instance views; here runs with the shortcut are compared with
runs that always take the long way, the narrow reads with the snapshot's at every call, and
the shortcut is shown to be taken."""

from __future__ import annotations

import dataclasses

import pytest
from sim_golden import cases, count_snapshot_builds, fingerprint

from warmserve.cluster.books import Books
from warmserve.control import prewarming
from warmserve.control.api import ClusterHandle
from warmserve.control.controller import Controller
from warmserve.control.planner import PlanInput, _demands
from warmserve.control.prewarming import _demand_key
from warmserve.sim.runner import make_workload, run_policy
from warmserve.types import InstanceState


def _always_wanted(plain):
    """`demands` as the controller reads it, but never "nothing wanted": every check after the
    narrow read takes the long way (a snapshot, the layout key, the planner), as before the
    shortcut."""

    def wanted(*args):
        existing, want = plain(*args)
        return existing, want or [(0.0, 0, "")]

    return wanted


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
    shortcuts = {"n": 0}
    plain_demands = prewarming.demands

    def counted_demands(*args):
        existing, wanted = plain_demands(*args)
        shortcuts["n"] += not wanted
        return existing, wanted

    builds = count_snapshot_builds(monkeypatch)
    monkeypatch.setattr(prewarming, "demands", counted_demands)
    fast = run_policy(exp, policy, wl)
    fast_builds = builds["n"]

    builds["n"] = 0
    monkeypatch.setattr(prewarming, "demands", _always_wanted(plain_demands))
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
    plain_demands = prewarming.demands

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

    monkeypatch.setattr(prewarming, "demands", checked_demands)
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
