import math

from helpers import apply_plan, instance, model, replica, snapshot
from hypothesis import given, settings
from hypothesis import strategies as st

from warmserve.control.api import Prewarm
from warmserve.control.forecaster import Forecast
from warmserve.control.placement import GroupCost, Occupancy, is_laminar
from warmserve.control.planner import (
    PlanInput,
    plan_evict_aware,
    plan_round_robin,
    replica_scores,
)


def ids(start=0):
    """A replica-id allocator, as the controller passes one to the planner."""
    return iter(range(start, 10**9)).__next__


def plan_input(snap, models, forecasts, live=None, search="aligned"):
    return PlanInput(
        snapshot=snap,
        models={m.name: m for m in models},
        forecasts=forecasts,
        live_instances=live or {},
        planning_bandwidth=32e9,
        capacity=32,
        group_search=search,
    )


def test_scores_follow_the_reference_formula():
    # avg 40, peak 100 with capacity 32: 2 foundation + 2 burst replicas, N = 4.
    s = replica_scores(Forecast(40, 100), live=0, cold_s=2.0, capacity=32)
    burst = 100 / 40
    assert s == [
        2.0,
        math.exp(-1 / 4) * 2.0,
        math.exp(-2 / 4) * 2.0 * burst,
        math.exp(-3 / 4) * 2.0 * burst,
    ]
    # Live instances cover demand first.
    assert len(replica_scores(Forecast(40, 100), live=3, cold_s=2.0, capacity=32)) == 1
    # A zero average never divides by zero: a pure burst is one burst replica with factor 1.
    assert replica_scores(Forecast(0, 5), live=0, cold_s=1.0, capacity=32) == [1.0]
    assert replica_scores(Forecast(0, 0), live=0, cold_s=1.0, capacity=32) == []


def test_new_replica_prefers_gpus_where_it_outranks_everything():
    # GPU 0 holds a valuable replica, GPU 1 a cheap one; the new 7B-class replica (score 1)
    # must go where it would only ever evict the cheaper one... or a free GPU.
    big = model("big", pages=10)
    cheap = model("cheap", pages=10)
    new = model("new", pages=10, tp=1)
    snap = snapshot(
        num_gpus=2,
        gpus_per_node=2,
        total_pages=25,
        replicas=[replica(0, "big", (0,)), replica(1, "cheap", (1,))],
    )
    fc = {"big": Forecast(64, 64), "cheap": Forecast(0.0, 0.0), "new": Forecast(1, 1)}
    plan = plan_evict_aware(plan_input(snap, [big, cheap, new], fc), ids(10))
    assert plan.scores[1] == 0.0 and plan.scores[0] > 0
    placed = [a for a in plan.actions if a.model == "new"]
    assert placed == [Prewarm(10, "new", (1,))]


def test_nesting_rules_against_an_existing_tp2_replica():
    snap = snapshot(num_gpus=8, replicas=[replica(0, "tp2", (2, 3)), replica(1, "one", (5,))])
    occ = Occupancy(snap, {0: 1.0, 1: 0.5})
    assert occ.cost_if_nested((1, 2, 4, 5), "x") is None  # cuts the TP2 replica in half
    assert occ.cost_if_nested((0, 1, 2, 3), "x") == GroupCost(1.0, 1.0, False)  # contains it
    assert occ.cost_if_nested((2, 4), "x") is None  # same TP, different GPUs
    assert occ.cost_if_nested((2, 3), "x") == GroupCost(1.0, 1.0, False)  # same TP, same GPUs
    assert occ.cost_if_nested((3,), "x") == GroupCost(1.0, 1.0, False)  # smaller: inside it
    assert occ.cost_if_nested((2, 3), "tp2") is None  # never the same model twice on a GPU
    assert occ.cost_if_nested((4, 5, 6, 7), "x") == GroupCost(0.5, 0.5, False)


def test_tp4_placement_keeps_existing_tp2_whole():
    tp2, tp4 = model("tp2", tp=2), model("tp4", tp=4)
    snap = snapshot(num_gpus=8, replicas=[replica(0, "tp2", (2, 3))])
    fc = {"tp2": Forecast(1, 1), "tp4": Forecast(200, 200)}
    for search in ("aligned", "exhaustive"):
        plan = plan_evict_aware(plan_input(snap, [tp2, tp4], fc, search=search), ids(5))
        groups = [set(a.gpus) for a in plan.actions if a.model == "tp4"]
        assert groups, search
        for g in groups:
            assert g >= {2, 3} or not g & {2, 3}, (search, g)


def test_round_robin_reference_quirk_stops_at_first_model_without_quota():
    a, b, c = model("a"), model("b"), model("c")
    fc = {"a": Forecast(64, 64), "b": Forecast(0, 0), "c": Forecast(64, 64)}
    plan = plan_round_robin(plan_input(snapshot(), [a, b, c], fc), ids(), reference_quirk=True)
    assert [x.model for x in plan.actions] == ["a"]  # the reference's quirk
    fc["b"] = Forecast(1, 1)
    plan = plan_round_robin(plan_input(snapshot(), [a, b, c], fc), ids(), reference_quirk=True)
    assert [x.model for x in plan.actions] == ["a", "b", "c", "a"]
    assert plan.actions[0].gpus == (0,) and plan.actions[3].gpus == (1,)  # first fit


def test_round_robin_places_every_model_with_quota_round_robin_over_devices():
    a, b, c = model("a"), model("b"), model("c")
    fc = {"a": Forecast(64, 64), "b": Forecast(0, 0), "c": Forecast(64, 64)}
    plan = plan_round_robin(plan_input(snapshot(), [a, b, c], fc), ids())
    # b wants nothing; a and c still get both their replicas (ceil(64/32) = 2 each).
    assert [x.model for x in plan.actions] == ["a", "c", "a", "c"]
    assert [x.gpus for x in plan.actions] == [(0,), (1,), (2,), (3,)]  # a cursor over devices
    t = model("t", tp=2)
    fc = {"a": Forecast(32, 32), "t": Forecast(64, 64)}
    plan = plan_round_robin(plan_input(snapshot(), [a, t], fc), ids())
    assert [(x.model, x.gpus) for x in plan.actions] == [("a", (0,)), ("t", (1, 2)), ("t", (3, 4))]


# ----- properties ---------------------------------------------------------------------------
model_st = st.tuples(st.sampled_from([1, 2, 4, 8]), st.integers(5, 60))


@st.composite
def scenarios(draw):
    gpn = draw(st.sampled_from([4, 8]))
    nodes = draw(st.integers(1, 3))
    specs = draw(st.lists(model_st, min_size=1, max_size=6))
    models = [model(f"m{i}", tp=min(tp, gpn), pages=p) for i, (tp, p) in enumerate(specs)]
    rounds = draw(
        st.lists(
            st.lists(
                st.tuples(st.floats(0, 200), st.floats(0, 3)),
                min_size=len(models),
                max_size=len(models),
            ),
            min_size=1,
            max_size=4,
        )
    )
    running = draw(st.lists(st.integers(0, len(models) - 1), max_size=2))
    search = draw(st.sampled_from(["aligned", "exhaustive"]))
    return gpn, nodes, models, rounds, running, search


def check_plan_invariants(snap, models_by_name):
    for g in snap.gpus:
        assert g.free_pages >= 0, f"GPU {g.gpu_id} over-committed"
    per_node: dict[int, list[tuple[int, ...]]] = {}
    on_gpu: dict[int, list[str]] = {}
    blocks = [(r.model, r.gpus) for r in snap.replicas] + [
        (i.model, i.gpus) for i in snap.instances
    ]
    for name, gpus in blocks:
        nodes = {g // snap.gpus_per_node for g in gpus}
        assert len(nodes) == 1, "a group spans nodes"
        assert len(gpus) == models_by_name[name].tp
        per_node.setdefault(nodes.pop(), []).append(gpus)
        for g in gpus:
            assert name not in on_gpu.setdefault(g, []), f"two replicas of {name} on GPU {g}"
            on_gpu[g].append(name)
    for groups in per_node.values():
        assert is_laminar(groups), groups


@settings(max_examples=150, deadline=None)
@given(scenarios())
def test_plans_fit_memory_nest_and_never_duplicate(scn):
    gpn, nodes, models, rounds, running, search = scn
    by_name = {m.name: m for m in models}
    instances = []
    for k, idx in enumerate(dict.fromkeys(running)):
        m = models[idx]
        base = k * gpn  # each running instance on its own node, aligned
        if base + m.tp <= nodes * gpn and k < nodes:
            instances.append(
                instance(100 + k, m.name, tuple(range(base, base + m.tp)), kv=20, lent=20)
            )
    snap = snapshot(num_gpus=nodes * gpn, gpus_per_node=gpn, total_pages=100, instances=instances)
    check_plan_invariants(snap, by_name)
    next_id = ids()
    for fc_round in rounds:
        fc = {
            m.name: Forecast(avg, avg * (1 + burst))
            for m, (avg, burst) in zip(models, fc_round, strict=False)
        }
        plan = plan_evict_aware(plan_input(snap, models, fc, search=search), next_id)
        snap = apply_plan(snap, plan.actions, by_name)
        check_plan_invariants(snap, by_name)
        # Existing replicas are valued in the same terms as new ones.
        assert set(plan.scores) <= {r.replica_id for r in snap.replicas}
