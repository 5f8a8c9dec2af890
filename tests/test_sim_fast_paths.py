"""The simulator's shortcuts compute what the long way computes.

A tick skips the autoscaling of models with no queue whose windowed load needs no change
(scale_delta 0), and the books re-check only the device and replica views an action may
have changed; a plan that wanted replicas and placed none is not run again while only free pages
moved below the wanted sizes. Each is compared here
against the long way on the same run, and shown to be taken.
"""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sim_golden import cases, fingerprint

from warmserve.control import prewarming, registry
from warmserve.control.api import ClusterSnapshot, GpuView, InstanceView, ReplicaView
from warmserve.control.controller import Controller
from warmserve.control.load import ConcurrencySeries
from warmserve.control.plan_skip import IdlePlan, still_idle
from warmserve.sim.runner import make_workload, run_policy
from warmserve.types import InstanceState


class _NoSkip(Controller):
    """Autoscales every model on every tick: an override turns the tick's shortcut off."""

    def _autoscale(self, name, now, cluster):
        super()._autoscale(name, now, cluster)


@pytest.fixture(scope="module")
def servegen():
    # Eight deployments on one node: most models idle most of the time, starts that wait.
    exp, _ = cases()["servegen-m-mid-1node-5min"]
    exp = dataclasses.replace(exp, workload=dataclasses.replace(exp.workload, rps=4.0))
    return exp, make_workload(exp)


@pytest.mark.parametrize("policy", ["warmserve", "warmserve-plus", "vanilla-autoscale"])
def test_autoscale_skip_changes_nothing(servegen, policy, monkeypatch):
    exp, wl = servegen
    calls = {"fast": 0, "full": 0}
    plain = Controller._autoscale

    def counted(label):
        def autoscale(self, name, now, cluster):
            calls[label] += 1
            plain(self, name, now, cluster)

        return autoscale

    monkeypatch.setattr(Controller, "_autoscale", counted("fast"))
    fast = run_policy(exp, policy, wl)
    spec = registry.POLICIES[policy]

    def build(cfg, models, fc):
        return _NoSkip(cfg, spec.spec, models, fc)

    monkeypatch.setattr(_NoSkip, "_autoscale", counted("full"))
    monkeypatch.setitem(registry.POLICIES, policy, dataclasses.replace(spec, build=build))
    full = run_policy(exp, policy, wl)
    assert fingerprint(fast) == fingerprint(full)
    assert calls["fast"] < calls["full"]  # the shortcut is taken


@given(
    st.lists(st.tuples(st.floats(0.0, 50.0), st.booleans()), max_size=30),
    st.floats(0.0, 60.0),
    st.floats(0.5, 10.0),
)
def test_idle_since_means_zero_mean(events, later, span):
    """`idle_since(now - span)` only when `mean(now, span)` is exactly 0.0, as autoscaling
    assumes when it skips a model."""
    s = ConcurrencySeries(span)
    t, n = 0.0, 0
    for dt, up in events:
        t += dt
        if up or n == 0:
            s.add(t, +1)
            n += 1
        else:
            s.add(t, -1)
            n -= 1
    now = t + later
    if s.idle_since(now - span):
        assert s.mean(now, span) == 0.0
    assert s.idle_since(now - span) == (n == 0 and t <= now - span)  # t: the last change


def test_views_are_rechecked_only_where_changed():
    """check_invariants compares every cached device and replica view not marked changed
    with the books; it runs after every event here, on a run with KV lending and prewarms."""
    exp, _ = cases()["servegen-m-mid-16rps-5min"]
    exp = dataclasses.replace(exp, workload=dataclasses.replace(exp.workload, duration_s=60.0))
    wl = make_workload(exp)
    r = run_policy(exp, "warmserve", wl, check_invariants=True)
    assert r.summary["control"]["kv_lends"] > 0 and r.summary["control"]["prewarms"] > 0


@pytest.mark.parametrize("policy", ["warmserve", "warmserve-no-kv-prewarm", "warmserve-plus"])
def test_idle_plan_skip_changes_nothing(servegen, policy, monkeypatch):
    """A plan that wanted replicas and placed none is not run again while only free pages
    moved and none crossed a wanted model's size upward (plan_skip.py): the same run as one
    that plans every time, and the shortcut is taken where KV is lent."""
    exp, wl = servegen
    taken = [0]
    plain = prewarming.still_idle

    def counted(*args):
        same = plain(*args)
        taken[0] += same
        return same

    monkeypatch.setattr(prewarming, "still_idle", counted)
    fast = run_policy(exp, policy, wl)
    monkeypatch.setattr(prewarming, "still_idle", lambda *args: False)
    full = run_policy(exp, policy, wl)
    assert fingerprint(fast) == fingerprint(full)
    if policy == "warmserve":
        assert taken[0] > 0
    if policy == "warmserve-plus":
        assert taken[0] == 0  # prior prewarming reads free pages as numbers: never skipped


def test_still_idle_refuses_a_crossing():
    """Free pages that rise past a wanted size, anywhere, or any other change: plan again."""
    rec = IdlePlan(("d",), (("r",), ("i",)), (10, 50), (20, 40))
    assert still_idle(rec, ("d",), ((10, 50), ("r",), ("i",)))
    assert still_idle(rec, ("d",), ((19, 10), ("r",), ("i",)))  # rose short of 20; fell
    assert still_idle(rec, ("d",), ((15, 90), ("r",), ("i",)))  # 50 was past every size
    assert not still_idle(rec, ("d",), ((20, 50), ("r",), ("i",)))
    assert not still_idle(rec, ("e",), ((10, 50), ("r",), ("i",)))
    assert not still_idle(rec, ("d",), ((10, 50), ("r2",), ("i",)))


def test_snapshot_of_is_the_dataclass_snapshot():
    """`ClusterSnapshot.of` (the books' constructor) makes what `__init__` makes: equal,
    frozen, with its cached indexes."""
    gpus = (GpuView(0, 0, 100, 40, 7), GpuView(1, 0, 100, 60, None))
    reps = (ReplicaView(3, "m", (1,), 20, True),)
    insts = (InstanceView(7, "n", (0,), InstanceState.RUNNING, 50, 10, 10),)
    args = (gpus, reps, insts, 2, (frozenset({"m"}),), (4.5,), 1 << 21)
    fast, plain = ClusterSnapshot.of(*args), ClusterSnapshot(*args)
    assert fast == plain and type(fast) is ClusterSnapshot
    assert fast.replicas_by_gpu == plain.replicas_by_gpu == {0: [], 1: [reps[0]]}
    assert fast.instance_by_id == {7: insts[0]}
    with pytest.raises(dataclasses.FrozenInstanceError):
        fast.gpus = ()  # type: ignore[misc]


@pytest.mark.parametrize(
    "policy", ["warmserve", "warmserve-plus", "serverlessllm-tuned", "muxserve", "static"]
)
def test_live_counts_kept_are_a_recount(servegen, policy, monkeypatch):
    """The live counts the controller keeps as instances start, stop, drain and are released
    equal a count of its instance records after every event it handles."""
    exp, wl = servegen
    spec = registry.POLICIES[policy]
    checked = [0]

    def recount(c):
        counts = dict.fromkeys(c.models, 0)
        for inst in c._instances.values():
            if not inst.stopping:
                counts[inst.model] += 1
        return counts

    def checking(c, method):
        def call(*args):
            out = method(*args)
            assert c._live_counts() == recount(c)
            checked[0] += 1
            return out

        return call

    def build(cfg, models, fc):
        c = spec.build(cfg, models, fc)
        for name in ("tick", "on_request", "on_request_done", "on_kv_pressure"):
            setattr(c, name, checking(c, getattr(c, name)))
        return c

    monkeypatch.setitem(registry.POLICIES, policy, dataclasses.replace(spec, build=build))
    r = run_policy(exp, policy, wl)
    assert checked[0] > 0 and len(r.requests) > 0
