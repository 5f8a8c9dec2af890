"""Starts that cannot starve (warmserve-plus's fair_starts): fragmentation-aware start choice,
demotion of the idle instances of one aligned block, and aligned blocks held and drained for
a model that waits too long. Policy level, on the shared cluster books (no simulator)."""

import dataclasses
import itertools

import pytest
from helpers import instance, model, replica, snapshot
from hypothesis import given, settings
from hypothesis import strategies as st

from warmserve.cluster.books import Books
from warmserve.cluster.reads import BookReads
from warmserve.control.allocation import StartContext, choose_start
from warmserve.control.api import (
    Prewarm,
    ReleaseInstance,
    RequestInfo,
    StartInstance,
)
from warmserve.control.config import ControlConfig
from warmserve.control.controller import Controller
from warmserve.control.forecaster import Forecast, Forecaster
from warmserve.control.registry import get_policy
from warmserve.types import ModelName, RequestId, StartPath

PLUS = get_policy("warmserve-plus").spec
NO_FAIR = dataclasses.replace(PLUS, fair_starts=False)


class _Zero(Forecaster):
    def __init__(self) -> None:
        super().__init__(300.0, 10)

    def forecast(self, model):  # no history: the planner asks for no replica
        return Forecast(0.0, 0.0)


# ----- start choice on crafted cluster states ------------------------------------------------


def test_a_miss_keeps_the_free_aligned_block_a_larger_model_needs():
    # GPUs 0 and 2 serve; 1 and 3 each hold a replica of another model; 4-7 are a free
    # aligned block of four. The paper's rule (fewest replicas) breaks that block.
    snap = snapshot(
        instances=[instance(0, "x", (0,)), instance(1, "y", (2,))],
        replicas=[replica(0, "z", (1,)), replica(1, "z", (3,))],
    )
    a = model("a", tp=1)
    old = choose_start(a, snap, smart=True, use_replicas=True)
    assert old.gpus == (4,)
    fair = choose_start(
        a, snap, smart=True, use_replicas=True, ctx=StartContext(tp_sizes=frozenset({1, 4}))
    )
    assert fair.path == StartPath.COLD and fair.gpus in ((1,), (3,))


def test_a_prewarm_hit_that_breaks_a_waiting_models_block_loses():
    busy = [instance(0, "x", (0,)), instance(1, "y", (2,)), instance(2, "y2", (3,))]
    a = model("a", tp=1)
    # a's only replica sits in the free block 4-7; GPU 1 is free too.
    snap = snapshot(instances=busy, replicas=[replica(5, "a", (4,))])
    waiting = StartContext(waiting_tps=frozenset({4}), tp_sizes=frozenset({1, 4}))
    c = choose_start(a, snap, smart=True, use_replicas=True, ctx=waiting)
    assert (c.gpus, c.path) == ((1,), StartPath.COLD)  # a miss beats the fragmenting hit
    # With no TP-4 model waiting, the hit wins: a load saved now beats a block kept.
    calm = StartContext(tp_sizes=frozenset({1, 4}))
    c = choose_start(a, snap, smart=True, use_replicas=True, ctx=calm)
    assert (c.gpus, c.path, c.replica_id) == ((4,), StartPath.PREWARM_HIT, 5)
    # A better-placed replica wins over a lower id, waiting model or not.
    snap = snapshot(instances=busy, replicas=[replica(5, "a", (4,)), replica(6, "a", (1,))])
    for ctx in (waiting, calm):
        c = choose_start(a, snap, smart=True, use_replicas=True, ctx=ctx)
        assert (c.gpus, c.path, c.replica_id) == ((1,), StartPath.PREWARM_HIT, 6)


def test_held_gpus_are_never_chosen():
    snap = snapshot(num_gpus=4, gpus_per_node=4, replicas=[replica(1, "a", (0, 1))])
    a = model("a", tp=2)
    ctx = StartContext(blocked=frozenset({1}), tp_sizes=frozenset({2}))
    c = choose_start(a, snap, smart=True, use_replicas=True, ctx=ctx)
    assert (c.gpus, c.path) == ((2, 3), StartPath.COLD)
    ctx = StartContext(blocked=frozenset({1, 2}), tp_sizes=frozenset({2}))
    assert choose_start(a, snap, smart=True, use_replicas=True, ctx=ctx) is None


@st.composite
def _cluster(draw):
    """A node layout of laminar (buddy-aligned) instances and replicas, with held GPUs."""
    gpn = draw(st.sampled_from([4, 8]))
    nodes = draw(st.integers(1, 2))
    n = gpn * nodes
    used: set[int] = set()
    instances = []
    for k in range(draw(st.integers(0, n))):
        tp = draw(st.sampled_from([1, 2, 4]))
        base = draw(st.integers(0, n // tp - 1)) * tp
        group = tuple(range(base, base + tp))
        if used.isdisjoint(group):
            used.update(group)
            instances.append(instance(100 + k, f"i{k}", group, kv=10))
    replicas = []
    for k in range(draw(st.integers(0, 6))):
        tp = draw(st.sampled_from([1, 2, 4]))
        base = draw(st.integers(0, n // tp - 1)) * tp
        name = draw(st.sampled_from([f"a{tp}", "b"]))  # a model's replicas have its TP
        replicas.append(replica(k, name, tuple(range(base, base + tp)), pages=5))
    blocked = frozenset(draw(st.sets(st.integers(0, n - 1), max_size=n // 2)))
    waiting = frozenset(draw(st.sets(st.sampled_from([1, 2, 4]))))
    snap = snapshot(n, gpn, 200, replicas, instances)
    return snap, StartContext(blocked, waiting, frozenset({1, 2, 4}))


@settings(max_examples=300, deadline=None)
@given(_cluster(), st.sampled_from([1, 2, 4]), st.booleans())
def test_fair_starts_never_overlap_serving_or_held_gpus(cluster, tp, smart):
    snap, ctx = cluster
    m = model(f"a{tp}", tp=tp)
    c = choose_start(m, snap, smart=smart, use_replicas=True, ctx=ctx)
    serving = {g.gpu_id for g in snap.gpus if g.instance_id is not None}
    gpn = snap.gpus_per_node
    if c is None:
        # Nothing was free: no aligned block of the size exists outside serving and held GPUs.
        taken = serving | ctx.blocked
        assert all(not taken.isdisjoint(range(b, b + tp)) for b in range(0, len(snap.gpus), tp))
        return
    assert len(set(c.gpus)) == tp and len({g // gpn for g in c.gpus}) == 1
    assert serving.isdisjoint(c.gpus) and ctx.blocked.isdisjoint(c.gpus)
    if c.path == StartPath.COLD:
        assert c.replica_id is None
    else:
        (r,) = [r for r in snap.replicas if r.replica_id == c.replica_id]
        assert r.model == m.name and r.gpus == c.gpus
    on_gpus = {r.replica_id for r in snap.replicas if set(r.gpus) & set(c.gpus)}
    assert set(c.evict) == on_gpus - {c.replica_id}


# ----- the controller on the books ------------------------------------------------------------


class _Checked(BookReads):
    """The books (read as both drivers read them), refusing any start on GPUs held for another
    model."""

    def __init__(self, books: Books, ctl: Controller) -> None:
        self.books, self.ctl, self.starts, self.released = books, ctl, [], []

    def apply(self, actions) -> None:
        for a in actions:
            if isinstance(a, StartInstance):
                held = self.ctl._blocked(a.model)
                assert held.isdisjoint(a.gpus), f"{a.model} started on held GPUs {a.gpus}"
                self.starts.append(a)
            elif isinstance(a, ReleaseInstance):
                self.released.append(a)
        self.books.apply(actions)


def _setup(models, spec, nodes=1, gpn=8, pages=100, **cfg):
    cfg = ControlConfig(**{"protect_period_s": 0.0, "keep_alive_s": 1e9, **cfg})
    ctl = Controller(cfg, spec, models, _Zero())
    books = Books(
        nodes * gpn, gpn, {m.name: m.pages_per_gpu for m in models}, pages_per_device=pages
    )
    return ctl, _Checked(books, ctl)


def test_a_tp4_start_demotes_the_idle_instances_of_one_aligned_block():
    """Eight idle TP-1 instances fill a node; idle longest alternates between its halves. A
    TP-4 request stops the four of one half (their weights stay prewarmed) and starts there;
    the reclaim without fair starts stops them longest idle first, across both halves."""

    def run(spec):
        small = [model(f"s{k}") for k in range(8)]
        big = model("big", tp=4)
        ctl, h = _setup([*small, big], spec)
        rid = iter(range(10**6))
        for k, m in enumerate(small):
            r = RequestId(next(rid))
            ctl.on_request(float(k), RequestInfo(r, m.name, float(k), 8, 8), h)
            (i,) = [i for i, b in h.books.instances.items() if b.model == m.name]
            h.books.mark_running(i)
        assert sorted(g for s in h.starts for g in s.gpus) == list(range(8))
        on = {s.gpus[0]: s.instance_id for s in h.starts}
        for t, g in enumerate([0, 4, 1, 5, 2, 6, 3, 7]):  # the request on GPU g ends at 10 + t
            (r,) = h.books.instances[on[g]].requests
            h.books.request_done(on[g], r)
            ctl.on_request_done(10.0 + t, r, h)
        ctl.on_request(20.0, RequestInfo(RequestId(next(rid)), big.name, 20.0, 8, 8), h)
        left = {b.model for b in h.books.instances.values()}
        return h, left

    h, left = run(PLUS)
    assert h.starts[-1].model == "big" and h.starts[-1].gpus == (0, 1, 2, 3)
    assert left == {"big", "s4", "s5", "s6", "s7"}  # four stopped, one block
    # Demoted: each stop keeps its weights as a prewarmed replica (the start then takes them).
    assert len(h.released) == 4 and all(a.keep_as is not None for a in h.released)
    h, left = run(NO_FAIR)
    assert h.starts[-1].model == "big"
    # Longest idle first frees GPUs 0, 4, 1, 5, and the start takes them unaligned: both
    # halves of the node are broken for the next TP-4 start.
    assert h.starts[-1].gpus == (0, 1, 4, 5) and left == {"big", "s2", "s3", "s6", "s7"}


def test_idle_models_that_cannot_be_live_together_do_not_demote_each_other():
    """Two workers, a TP-1 and a TP-2 model, both with recent load and nothing waiting: the
    autoscaler's wish for an instance of each must not stop the other's idle instance on every
    tick (each switch a cold start). A waiting request still demotes at once."""
    a, b = model("a"), model("b", tp=2)
    ctl, h = _setup([a, b], PLUS, gpn=2, scale_window_s=1.0, tick_s=0.1)
    now = 0.0
    for k, name in enumerate(["a", "b"]):
        r = RequestId(k)
        ctl.on_request(now, RequestInfo(r, ModelName(name), now, 8, 8), h)
        (i,) = [i for i, x in h.books.instances.items() if x.model == name]
        h.books.mark_running(i)
        now += 0.5
        h.books.request_done(i, r)
        ctl.on_request_done(now, r, h)
    assert [s.model for s in h.starts] == ["a", "b"]  # b's request demoted a's idle instance
    for _ in range(50):
        now += 0.1
        ctl.tick(now, h)
    assert [s.model for s in h.starts] == ["a", "b"] and len(h.released) == 1
    ctl.on_request(now, RequestInfo(RequestId(9), ModelName("a"), now, 8, 8), h)
    assert [s.model for s in h.starts] == ["a", "b", "a"]


def _busy_cluster(spec, cycles=60, gpn=2, big=("c",), big_s=1.0, held=None, **cfg):
    """TP-1 models fill a `gpn`-GPU node and never go idle (each asks again before its request
    ends, so each carries a load of one request); TP-2 models `big` ask once at t = 0, and
    their request ends `big_s` after they start. Returns when each started (None: never);
    `held` (a dict) gets when each was first given a held block."""
    small = [model(f"s{k}") for k in range(gpn)]
    ctl, h = _setup([*small, *(model(n, tp=2) for n in big)], spec, gpn=gpn, **cfg)
    rid = iter(range(10**6))
    now = 0.0
    live: dict[str, list] = {m.name: [] for m in small}
    started: dict[str, float | None] = dict.fromkeys(big)

    def ask(name):
        r = RequestId(next(rid))
        ctl.on_request(now, RequestInfo(r, ModelName(name), now, 8, 8), h)
        if name in live:
            live[name].append(r)

    for name in [*live, *big]:
        ask(name)
    for _ in range(cycles):
        for i in list(h.books.instances):
            h.books.mark_running(i)
        now += 1.0
        for name in live:
            ask(name)
        for name in live:
            old = live[name][0]
            on = [i for i, x in h.books.instances.items() if old in x.requests]
            if not on:  # queued: its model was drained for a starving one
                continue
            live[name].pop(0)
            h.books.request_done(on[0], old)
            ctl.on_request_done(now, old, h)
        for i, x in list(h.books.instances.items()):
            if x.model in started and (t := started[x.model]) is not None and now >= t + big_s:
                for r in list(x.requests):  # a started TP-2 model's request ends big_s later
                    h.books.request_done(i, r)
                    ctl.on_request_done(now, r, h)
        ctl.tick(now, h)
        for name in ctl._reserved:
            if held is not None:
                held.setdefault(name, now)
        for x in h.books.instances.values():
            if x.model in started and started[x.model] is None:
                started[x.model] = now
        if None not in started.values():
            break
    return started if len(big) > 1 else started[big[0]]


def test_a_starving_model_is_served_within_a_bound():
    cfg = {"starve_wait_s": 2.0, "starve_preempt_s": 5.0}
    # Queue aging alone cannot help: no GPU is ever free or idle.
    assert _busy_cluster(NO_FAIR, **cfg) is None
    started = _busy_cluster(PLUS, **cfg)
    # The TP-2 model (one request) would leave both TP-1 models (a load of one request each)
    # with no instance. That preemption pays once its wait, in starve_preempt_s, times its own
    # load covers the two it displaces: at 2 x 5 s. The drains end with the next completions.
    assert started is not None and 2 * 5.0 <= started <= 2 * 5.0 + 2.0
    # The bound moves with the setting.
    later = _busy_cluster(PLUS, starve_wait_s=2.0, starve_preempt_s=12.0)
    assert later is not None and 2 * 12.0 <= later <= 2 * 12.0 + 2.0


def test_preemptions_are_spaced_when_many_models_starve():
    """Two TP-2 models starve on a node of four busy TP-1 models. Each preemption drains two
    models' last instances; the second waits starve_preempt_gap_s after the first, so the busy
    models are not drained for every starving model at once."""
    cfg = {"starve_wait_s": 2.0, "starve_preempt_s": 5.0}
    # The TP-2 models' own requests last a minute, so the first to start does not go idle.
    run = dict(gpn=4, big=("c", "d"), big_s=60.0, cycles=300, **cfg)
    held: dict = {}
    at = _busy_cluster(PLUS, starve_preempt_gap_s=20.0, held=held, **run)
    # The first is held once its price is paid (test_a_preemption_counts_the_wait_behind_the_line),
    # the second only the gap later; it took the cheapest block to drain (the first's, one
    # request), so it waits for that drain.
    c = held["c"]
    assert held["d"] == c + 20.0 and at == {"c": c + 1.0, "d": c + 61.0}
    # The TP-1 models drained for them starve in turn, and their preemptions are spaced too.
    times = sorted(held.values())
    assert len(times) > 2 and all(b - a >= 20.0 for a, b in itertools.pairwise(times))
    held = {}
    at = _busy_cluster(PLUS, starve_preempt_gap_s=0.0, held=held, **run)
    assert (held["c"], held["d"]) == (10.0, 10.0) and max(at.values()) <= 12.0  # both at once


def test_a_preemption_counts_the_wait_behind_the_line():
    """Two TP-2 models (one request each) starve on a node of four TP-1 models that each get a
    request a second. A drain leaves two of those with no instance, and with the other TP-2
    model in line, each would wait a starve_preempt_gap_s (20 s) behind it for room: about 20
    requests missed each, plus the one it drains. The waiting model's own value is its one
    queued request plus what it would miss in that line at its rate (1 request over its
    wait t: 20 / t), scaled by t / starve_preempt_s: t / 5 + 4 >= 2 x 21 from t = 190 s.
    Priced by loads alone (one request each side), it preempted at 2 x starve_preempt_s."""
    held: dict = {}
    run = dict(gpn=4, big=("c", "d"), big_s=60.0, cycles=300, starve_wait_s=2.0)
    _busy_cluster(PLUS, starve_preempt_s=5.0, starve_preempt_gap_s=20.0, held=held, **run)
    assert 190.0 <= held["c"] <= 195.0
    # Alone in line, the same model pays only the loads: two requests, at 2 x 5 s.
    held = {}
    _busy_cluster(PLUS, starve_preempt_s=5.0, starve_wait_s=2.0, held=held)
    assert held == {"c": 10.0}


_OPS = st.lists(
    st.tuples(st.sampled_from(["ask", "done", "tick", "run"]), st.integers(0, 4)),
    max_size=60,
)


@settings(max_examples=60, deadline=None)
@given(_OPS, st.sampled_from([100, 30]))
def test_controller_starts_never_overlap_serving_or_held_groups(ops, pages):
    """Random requests, completions and ticks against the books: no device serves two
    instances, pages never overcommit (held blocks prewarmed while they drain, with 30 pages a
    device, evict other replicas first), and held blocks never overlap. The models need 12
    GPUs of 8, so some starve and get held blocks."""
    models = [model("a"), model("b"), model("c", tp=2), model("d", tp=4), model("e", tp=4)]
    ctl, h = _setup(
        models, PLUS, nodes=2, gpn=4, pages=pages, starve_wait_s=1.0, starve_preempt_s=2.0
    )
    rid = iter(range(10**6))
    now = 0.0
    # Every model asks first (more than fits), then the drawn operations.
    for op, k in [*(("ask", k) for k in range(len(models))), ("run", 0), *ops]:
        now += 0.5
        if op == "ask":
            r = RequestId(next(rid))
            ctl.on_request(now, RequestInfo(r, models[k].name, now, 8, 8), h)
        elif op == "done":
            held = [(i, r) for i, x in h.books.instances.items() for r in x.requests]
            if held:
                i, r = held[k % len(held)]
                h.books.request_done(i, r)
                ctl.on_request_done(now, r, h)
        elif op == "run":
            for i in list(h.books.instances):
                h.books.mark_running(i)
        else:
            ctl.tick(now, h)
        h.books.check_invariants()  # among others: no device serves two instances
        held = list(ctl._reserved.values())
        assert all(set(x).isdisjoint(y) for k, x in enumerate(held) for y in held[k + 1 :])


def _extra_instance_or_last(out=None, **cfg):
    """Three nodes of two GPUs: a rarely used TP-2 model's only instance on one node (one
    request in flight), a busy TP-1 model's three instances (capacity 4, five requests in
    flight) on the others, GPU 5 free. A TP-2 request then waits past starve_preempt_s.
    Returns the block held for it, when (it asked at 10 s), and the models whose instances
    were stopped."""
    rare, pop, w = model("rare", tp=2), model("pop"), model("w", tp=2)
    cfg = {"capacity_per_instance": 4, "starve_wait_s": 2.0, "starve_preempt_s": 5.0, **cfg}
    ctl, h = _setup([rare, pop, w], PLUS, nodes=3, gpn=2, **cfg)
    rid = iter(range(10**6))
    now = 0.0
    for name, count in (("rare", 1), ("pop", 9)):
        for _ in range(count):
            ctl.on_request(now, RequestInfo(RequestId(next(rid)), ModelName(name), now, 8, 8), h)
    for i in h.books.instances:
        h.books.mark_running(i)
    on = {s.instance_id: (s.model, s.gpus) for s in h.starts}
    assert sorted(on.values()) == [("pop", (2,)), ("pop", (3,)), ("pop", (4,)), ("rare", (0, 1))]
    # Four of pop's requests end: five stay in flight, on all three instances.
    for i, x in list(h.books.instances.items()):
        if x.model == "pop":
            for r in list(x.requests)[: 2 if len(x.requests) > 1 else 0]:
                h.books.request_done(i, r)
                ctl.on_request_done(now, r, h)
    assert sorted(x.in_flight for x in ctl._instances.values()) == [1, 1, 2, 2]
    for _ in range(20):  # the load averages settle (scale_window_s): nothing starts or stops
        now += 0.5
        ctl.tick(now, h)
    assert len(h.starts) == 4 and not h.released
    ctl.on_request(now, RequestInfo(RequestId(next(rid)), ModelName("w"), now, 8, 8), h)
    stopped = []
    while "w" not in ctl._reserved and now < 40.0:
        now += 0.5
        before = set(ctl._instances)
        ctl.tick(now, h)
        stopped += [on[i][0] for i in before if ctl._instances.get(i) is None
                    or ctl._instances[i].stopping]  # fmt: skip
    if out is not None:
        out.update(ctl=ctl, h=h, now=now)
    return ctl._reserved.get("w"), now, stopped


def test_a_preemption_drains_a_busy_models_extra_instance_before_a_rare_models_last():
    """Once a model may preempt, a busy model whose other instances carry its load below
    starve_short_threshold is not left short: its extra instance (which keep-alive never stops
    while requests reach it) is drained, not the only instance of a rarely used model, whose
    next request would starve in turn."""
    held, at, stopped = _extra_instance_or_last()
    # Before starve_preempt_s nothing is drained: pop's others would carry 5 requests above
    # the scale-down threshold (2 x 4 x 0.5 = 4), and rare would have no instance.
    assert held == (4, 5) and at == 15.0 and stopped == ["pop"]
    # After, they would carry it below starve_short_threshold (2 x 4 x 0.65 = 5.2 >= 5). Where
    # they would not (2 x 4 x 0.6 = 4.8 < 5), pop counts as short with a load of five, and the
    # rare model's one request is what fits the budget.
    held, at, stopped = _extra_instance_or_last(starve_short_threshold=0.6)
    assert held == (0, 1) and stopped == ["rare"]


def test_a_held_block_is_prewarmed_while_it_drains():
    """The waiting model's weights load into its held block while the instance there drains,
    so its start is a hit on that block rather than a cold load after the drain."""
    run: dict = {}
    held, _, _ = _extra_instance_or_last(out=run)
    ctl, h, now = run["ctl"], run["h"], run["now"]
    assert held == (4, 5)
    # (Prior prewarming may have put replicas of w elsewhere, on GPUs that serve.)
    (rep,) = [r for r in h.books.replicas.values() if r.model == "w" and r.devices == (4, 5)]
    assert h.starts[-1].model != "w"
    # pop's drained instance ends its two requests; the next tick starts w on its replica.
    (drained,) = [i for i, x in ctl._instances.items() if x.stopping]
    for r in list(h.books.instances[drained].requests):
        h.books.request_done(drained, r)
        ctl.on_request_done(now, r, h)
    ctl.tick(now + 0.5, h)
    start = h.starts[-1]
    assert (start.model, start.gpus, start.replica_id) == ("w", (4, 5), rep.replica_id)
    assert start.path in (StartPath.PREWARM_HIT, StartPath.INPROGRESS_HIT)


def _scale_up_while_larger_waits(big_asks: bool):
    """Two nodes of two GPUs: a busy TP-2 model on one, a TP-1 model `a` with three requests
    (above its scale-up threshold, none queued) and an idle TP-1 model `s` on the other. `s`
    is stopped once idle (GPU 3 free); with `big_asks`, a TP-2 request waits from t = 5.
    Returns the GPUs of `a`'s starts."""
    a, s, big0, big = model("a"), model("s"), model("big0", tp=2), model("big", tp=2)
    cfg = {"capacity_per_instance": 4, "scale_up_threshold": 0.5, "scale_down_threshold": 0.25,
           "keep_alive_s": 1.0, "starve_preempt_s": 100.0}  # fmt: skip
    ctl, h = _setup([a, s, big0, big], PLUS, nodes=2, gpn=2, **cfg)
    rid = iter(range(10**6))

    def ask(name, t):
        r = RequestId(next(rid))
        ctl.on_request(t, RequestInfo(r, ModelName(name), t, 8, 8), h)
        return r

    ask("big0", 0.0)
    for _ in range(3):
        ask("a", 0.0)
    r_s = ask("s", 0.0)
    for i in h.books.instances:
        h.books.mark_running(i)
    assert [(x.model, x.gpus) for x in h.starts] == [("big0", (0, 1)), ("a", (2,)), ("s", (3,))]
    (on_s,) = [i for i, x in h.books.instances.items() if x.model == "s"]
    h.books.request_done(on_s, r_s)
    ctl.on_request_done(1.0, r_s, h)
    now = 1.0
    while now < 15.0:
        now += 0.5
        if big_asks and now == 5.0:
            ask("big", now)
        ctl.tick(now, h)
        for i in h.books.instances:
            h.books.mark_running(i)
    assert "s" not in {x.model for x in h.books.instances.values()}  # stopped when idle
    return [x.gpus for x in h.starts if x.model == "a"]


def test_a_start_for_load_alone_waits_while_a_larger_model_waits():
    # Nothing waits: a's second instance takes the GPU s left.
    assert _scale_up_while_larger_waits(False) == [(2,), (3,)]
    # A TP-2 request waits (its block needs GPU 3 and a drain of GPU 2): a's extra instance
    # for load does not take GPU 3 while it waits.
    assert _scale_up_while_larger_waits(True) == [(2,)]


def test_a_held_blocks_prewarm_evicts_the_lowest_scored_replicas_or_nothing():
    """With no free pages on the held block, the waiting model's prewarm evicts other models'
    replicas there, lowest score first, and only as many as it needs; if even that is not
    enough room, it does nothing."""
    w, x, y, z = model("w", tp=2), model("x", tp=2), model("y"), model("z", tp=2)
    ctl, h = _setup([w, x, y, z], PLUS, nodes=1, gpn=2, pages=30)
    h.apply(
        [Prewarm(100, x.name, (0, 1)), Prewarm(101, z.name, (0, 1)), Prewarm(102, y.name, (0,))]
    )
    ctl._replica_scores = {100: 1.0, 101: 5.0, 102: 3.0}
    ctl._prewarm_held(w.name, (0, 1), 0.0, h)
    # GPU 0 is full (three replicas), GPU 1 has 10 free: evicting x (lowest score) is enough.
    (new,) = set(h.books.replicas) - {101, 102}
    assert 100 not in h.books.replicas
    assert (h.books.replicas[new].model, h.books.replicas[new].devices) == ("w", (0, 1))
    # A replica of w is there now: nothing more.
    before = set(h.books.replicas)
    ctl._prewarm_held(w.name, (0, 1), 0.0, h)
    assert set(h.books.replicas) == before
    # No room even after evicting every other replica (a serving instance holds the pages).
    ctl2, h2 = _setup([w, y], PLUS, nodes=1, gpn=2, pages=15)
    ctl2.on_request(0.0, RequestInfo(RequestId(0), y.name, 0.0, 8, 8), h2)
    ctl2._prewarm_held(w.name, (0, 1), 0.0, h2)
    assert not any(r.model == "w" and r.devices == (0, 1) for r in h2.books.replicas.values())


def test_a_draining_instance_lends_its_spare_kv_to_the_held_blocks_prewarm():
    """A drained instance admits nothing new, so the KV its in-flight requests cannot use
    (each at most a full context) goes to the held model's prewarm at once: the start after
    the drain is a hit rather than a cold load. A serving instance keeps its KV."""
    w, y = model("w", tp=2), model("y")
    ctl, h = _setup([w, y], PLUS, nodes=1, gpn=2, pages=30)
    ctl.on_request(0.0, RequestInfo(RequestId(0), y.name, 0.0, 8, 8), h)
    (inst,) = h.books.instances
    h.books.mark_running(inst)
    assert h.books.instances[inst].kv_pages == 20  # every free page of GPU 0
    ctl._prewarm_held(w.name, (0, 1), 1.0, h)  # serving: no room, nothing moves
    assert h.books.instances[inst].kv_pages == 20
    assert not any(r.model == "w" for r in h.books.replicas.values())
    ctl._stop_now([inst], h)  # drained for w
    ctl._prewarm_held(w.name, (0, 1), 2.0, h)
    # One request in flight, at most 2048 tokens = 2 pages; the other 18 make room for w.
    assert h.books.instances[inst].kv_pages == 2
    assert [r.devices for r in h.books.replicas.values() if r.model == "w"] == [(0, 1)]
    h.books.check_invariants()


def test_a_held_block_is_the_one_expected_to_drain_first():
    """Two blocks, each the last instance of its model: `a` (one request in flight, just
    dispatched) and `b` (two, dispatched 9.5 s ago; both models' requests take about 10 s).
    Draining `a` leaves less load short, but `b`'s block frees 9 s sooner, and the waiting
    model's outage is its wait plus that drain."""
    a, b, w = model("a", tp=2), model("b", tp=2), model("w", tp=2)
    ctl, h = _setup([a, b, w], PLUS, nodes=2, gpn=2)
    rid = iter(range(10**6))

    def ask(name, t):
        ctl.on_request(t, RequestInfo(RequestId(next(rid)), ModelName(name), t, 8, 8), h)

    ask("a", 0.0)
    ask("b", 0.0)
    ask("b", 0.0)
    for i in h.books.instances:
        h.books.mark_running(i)
    on = {x.model: i for i, x in h.books.instances.items()}
    assert [s.gpus for s in h.starts] == [(0, 1), (2, 3)]
    (first,) = h.books.instances[on["a"]].requests
    h.books.request_done(on["a"], first)
    ctl.on_request_done(8.5, first, h)  # a's first request took 8.5 s
    ask("a", 8.5)
    for m in ("a", "b"):
        for _ in range(20):
            ctl._service_times.add(ModelName(m), 10.0)
    now = 9.5
    assert ctl._drain_s([on["a"]], ctl._dispatch_times(), now) > 8.0
    assert ctl._drain_s([on["b"]], ctl._dispatch_times(), now) < 1.0
    group, victims = ctl._block_to_free(w.name, h.snapshot(), now, busy=True)
    assert (group, victims) == ((2, 3), [on["b"]])


def _idle_popular_model(with_line: bool, **cfg):
    """One node of two GPUs: a popular TP-2 model ("pop", a request a second for 30 s) holds
    both; its last request ends at 34 s. A rare TP-2 model "b" asked at 30 s and, with
    `with_line`, another ("a") at 30.5 s: both wait in line (starve_wait_s) when pop goes
    idle. Returns the controller, the books and the time after a few more ticks."""
    pop, a, b = model("pop", tp=2), model("a", tp=2), model("b", tp=2)
    cfg = {"starve_wait_s": 2.0, "starve_preempt_s": 15.0, **cfg}
    ctl, h = _setup([pop, a, b], PLUS, gpn=2, **cfg)
    rid = iter(range(10**6))
    last = None
    for t in range(31):
        last = RequestId(next(rid))
        ctl.on_request(float(t), RequestInfo(last, ModelName("pop"), float(t), 8, 8), h)
        for i in h.books.instances:
            h.books.mark_running(i)
        (i,) = h.books.instances
        for r in list(h.books.instances[i].requests):
            if r != last:  # the others end at once; the last runs until 34 s
                h.books.request_done(i, r)
                ctl.on_request_done(float(t), r, h)
    waiting = [("b", 30.0), ("a", 30.5)] if with_line else [("b", 30.0)]
    for name, t in waiting:
        ctl.on_request(t, RequestInfo(RequestId(next(rid)), ModelName(name), t, 8, 8), h)
    now = 30.5
    while now < 34.0:
        now += 0.5
        ctl.tick(now, h)
    (i,) = h.books.instances
    h.books.request_done(i, last)
    ctl.on_request_done(now, last, h)
    for _ in range(4):
        now += 0.5
        ctl.tick(now, h)
    return ctl, h, now


def test_an_idle_popular_model_is_not_stopped_for_a_rare_one_while_others_wait():
    """Stopping a model's idle last instance costs nothing now, but while other models wait in
    line its next request waits behind them: a starve_preempt_gap_s (20 s) per model ahead, at
    its arrival rate (pop: 31 requests in 36 s, 17 requests). The rare model's start saves its
    queued request and what it would miss in that line at its own rate (one request in 36 s):
    under 2, so pop keeps its instance. Alone in line, the rare model takes it, as before."""
    ctl, h, now = _idle_popular_model(with_line=True)
    assert now == 36.0  # pop's 31 requests over 36 s, 20 s behind "a": 17.2 requests
    assert abs(ctl._missed_in_line(ModelName("pop"), now, {ModelName("a")}) - 20 * 31 / 36) < 1e-9
    assert [s.model for s in h.starts] == ["pop"] and not h.released
    assert ctl._in_line(now) == {"a", "b"}
    ctl, h, now = _idle_popular_model(with_line=False)
    assert [s.model for s in h.starts] == ["pop", "b"]


def test_an_idle_stop_counts_the_requests_missed_until_the_model_is_back():
    """With starve_return_s, stopping a model's idle last instance also costs its arrival rate
    (one arrival less than seen) times that wait to come back, whoever else is in line: pop
    (31 requests in 36 s) misses 8.3 requests in 10 s, more than the rare model's one queued
    request saves, so pop keeps its instance. At 0 (the default) the rare model, alone in
    line, takes it at once."""
    ctl, h, now = _idle_popular_model(with_line=False, starve_return_s=10.0)
    assert ctl._idle_stop_cost(ModelName("pop"), now, set()) == pytest.approx(10 * 30 / 36)
    # A single request is no rate: a fresh server's first model is not kept for it.
    assert ctl._idle_stop_cost(ModelName("b"), now, set()) == 0.0
    assert [s.model for s in h.starts] == ["pop"] and not h.released
    # The price is paid once the wait has grown: past starve_preempt_s the budget scales with
    # it (value x waited / starve_preempt_s), and the rare model gets the block.
    while now < 30.0 + 15.0 * 10:
        now += 0.5
        ctl.tick(now, h)
        if len(h.starts) > 1:
            break
    assert [s.model for s in h.starts] == ["pop", "b"] and now > 30.0 + 15.0
    ctl, h, now = _idle_popular_model(with_line=False, starve_return_s=0.0)
    assert [s.model for s in h.starts] == ["pop", "b"]
    with pytest.raises(ValueError, match="starve_return_s"):
        ControlConfig(starve_return_s=-1.0)


def test_arrival_rates_count_the_window_or_the_time_since_the_first_request():
    ctl, h = _setup([model("x"), model("y")], PLUS, starve_rate_window_s=100.0)
    assert ctl.arrival_rate(ModelName("x"), 0.0) == 0.0
    for t in range(0, 200, 2):  # x: a request every 2 s from t = 10 s
        ctl.on_request(10.0 + t, RequestInfo(RequestId(t), ModelName("x"), 10.0 + t, 8, 8), h)
    # Only the window is kept (a long-running server), whether or not a rate is asked for.
    assert len(ctl._arrivals[ModelName("x")]) == 50
    # y never asked: its rate is 0; x's over its last 100 s is one per 2 s.
    assert ctl.arrival_rate(ModelName("y"), 208.0) == 0.0
    assert ctl.arrival_rate(ModelName("x"), 208.5) == 0.5
    # Before a full window has passed, the time since the first request (of any model) counts.
    ctl, h = _setup([model("x")], PLUS, starve_rate_window_s=100.0)
    for t in (10.0, 20.0, 30.0):
        ctl.on_request(t, RequestInfo(RequestId(int(t)), ModelName("x"), t, 8, 8), h)
    assert ctl.arrival_rate(ModelName("x"), 40.0) == 3 / 30.0
    with pytest.raises(ValueError, match="starve_rate_window_s"):
        ControlConfig(starve_rate_window_s=0.0)
