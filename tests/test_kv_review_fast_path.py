"""The KV review and the plan check read the handle's versions, instance views and free pages
instead of whole snapshots (api.ClusterHandle); here they are compared with the long way,
snapshot identities as before, on the same runs, and the shortcuts are shown to be taken.
"""

from __future__ import annotations

import dataclasses

import pytest
from sim_golden import cases, count_snapshot_builds, fingerprint

from warmserve.cluster.books import Books
from warmserve.control.api import ClusterHandle, InstanceView, SetKvPages, StartInstance
from warmserve.control.controller import Controller
from warmserve.sim.cluster import SimCluster
from warmserve.sim.runner import make_workload, run_policy
from warmserve.types import InstanceState, StartPath

_fast_plan = Controller._plan


def _long_reserve_kv(self: Controller, cluster: ClusterHandle, now: float) -> None:
    """The review as it was: a snapshot at the start and after every change, skipped while
    the snapshot's instance tuple is the same object."""
    snap = cluster.snapshot()
    last = self._kv_reviewed
    if last is not None and last[0] is snap.instances and last[1] == self._requests_seen:
        return
    settled, self._kv_settled = self._kv_settled, {}
    for view in snap.instances:
        if view.state != InstanceState.RUNNING:
            continue
        inst = self._instances.get(view.instance_id)
        key = settled.get(view.instance_id)
        if key is not None and key[0] is view and key[1] == (inst.in_flight if inst else 0):
            self._kv_settled[view.instance_id] = key
        elif self._review_kv(view, cluster, now):
            snap = cluster.snapshot()
    self._kv_reviewed = (snap.instances, self._requests_seen)  # type: ignore[assignment]


def _long_plan(self: Controller, cluster: ClusterHandle, now: float, live=None) -> None:
    """The plan check as it was: skipped only while the snapshot's gpus and replicas are the
    same objects; otherwise forecasts, live counts and the demand from a fresh snapshot."""
    snap = cluster.snapshot()
    last = self.__dict__.get("_long_last") if self._last_planned is not None else None
    if last is not None and last[0] is snap.gpus and last[1] is snap.replicas:
        return
    self._last_planned = self._quiet_plan = self._window_forecasts = None
    _fast_plan(self, cluster, now, live)
    snap = cluster.snapshot()
    self._long_last = (snap.gpus, snap.replicas)


@pytest.fixture(scope="module")
def servegen():
    # Eight deployments at 16 req/s on two nodes: KV lends and reclaims under pressure,
    # evictions, prewarms; two minutes keep it quick.
    exp, _ = cases()["servegen-m-mid-16rps-5min"]
    exp = dataclasses.replace(exp, workload=dataclasses.replace(exp.workload, duration_s=120.0))
    return exp, make_workload(exp)


@pytest.mark.parametrize("policy", ["warmserve", "warmserve-plus", "vanilla-autoscale"])
def test_narrow_reads_change_nothing(servegen, policy, monkeypatch):
    exp, wl = servegen
    grants = {"n": 0}
    plain_free = SimCluster.free_pages

    def counted_free(self, gpus):
        grants["n"] += 1
        return plain_free(self, gpus)

    reviews = {"n": 0}
    plain_review = Controller._review_kv

    def counted_review(self, *args, **kwargs):
        reviews["n"] += 1
        return plain_review(self, *args, **kwargs)

    builds = count_snapshot_builds(monkeypatch)
    monkeypatch.setattr(SimCluster, "free_pages", counted_free)
    monkeypatch.setattr(Controller, "_review_kv", counted_review)
    fast = run_policy(exp, policy, wl)
    fast_builds, fast_grants, fast_reviews = builds["n"], grants["n"], reviews["n"]

    builds["n"] = reviews["n"] = 0
    monkeypatch.setattr(Controller, "_reserve_kv", _long_reserve_kv)
    monkeypatch.setattr(Controller, "_plan", _long_plan)
    # No GPU has a page free for a reclaim: every reclaim goes through kv_actions' snapshot.
    monkeypatch.setattr(SimCluster, "free_pages", lambda self, gpus: [-1] * len(gpus))
    full = run_policy(exp, policy, wl)
    assert fingerprint(fast) == fingerprint(full)
    if policy == "vanilla-autoscale":
        return  # no unified memory: neither KV review nor plan runs
    assert fast_builds < builds["n"]  # fewer snapshots built
    assert full.summary["control"]["kv_reclaims"] > 0
    assert fast_grants > 0  # reclaims granted from free pages
    # The view a resize to the target leaves is known settled: not reviewed again (the long
    # way knows a settled view by its identity only).
    assert fast_reviews < reviews["n"]


def test_narrow_reads_match_the_snapshot():
    """versions, instance_views and free_pages say what the snapshot says: a new snapshot
    exactly when (layout, usage) moved, the very view objects, the same free pages; placement
    stays across a KV resize alone."""
    books = Books(2, 2, {"m": 10}, pages_per_device=100)

    v0 = books.versions()
    snap = books.snapshot()
    assert books.snapshot() is snap and books.versions() == v0
    books.apply([StartInstance(1, "m", (0,), StartPath.COLD, None)])
    v_start = books.versions()
    assert v_start[0] > v0[0] and v_start[2] > v0[2]
    books.mark_running(1)  # an engine coming up: layout moves, placement does not
    v1 = books.versions()
    assert v1[0] > v_start[0] and v1[2] == v_start[2]
    assert books.snapshot().instances[0].state == InstanceState.RUNNING
    snap = books.snapshot()
    assert books.instance_views() == snap.instances
    assert all(a is b for a, b in zip(books.instance_views(), snap.instances, strict=True))
    assert books.free_pages((0, 1)) == [g.free_pages for g in snap.gpus]
    books.apply([SetKvPages(1, 50)])  # a lend: layout moves, placement does not
    v2 = books.versions()
    assert v2[0] > v1[0] and v2[2] == v1[2]
    assert books.free_pages((0,)) == [books.snapshot().gpus[0].free_pages] == [40]
    books.set_kv_used(1, 5)
    v3 = books.versions()
    assert v3[1] > v2[1] and v3[0] == v2[0]
    (view,) = books.instance_views()
    assert isinstance(view, InstanceView) and view.kv_used_pages == 5
    snap = books.snapshot()
    assert snap.instances[0] is view and books.snapshot() is snap
