"""warmserve-plus behaviour at the policy level, on the shared cluster books (no simulator):
queue aging, and prior prewarming giving the memory back to forecast-driven replicas."""

import dataclasses

import pytest
from helpers import model, replica, snapshot

from warmserve.cluster.books import Books
from warmserve.control.api import Evict, Prewarm, RequestInfo
from warmserve.control.config import ControlConfig
from warmserve.control.controller import Controller
from warmserve.control.forecaster import Forecast, Forecaster
from warmserve.control.planner import PRIOR_CEILING, PlanInput, plan_evict_aware
from warmserve.control.registry import get_policy
from warmserve.types import ModelName, RequestId


def ids(start=0):
    return iter(range(start, 10**9)).__next__


def plan_input(snap, models, forecasts=None, live=None, prior=True):
    return PlanInput(
        snapshot=snap,
        models={m.name: m for m in models},
        forecasts=forecasts or {},
        live_instances=live or {},
        planning_bandwidth=32e9,
        capacity=32,
        prior=prior,
    )


def test_no_history_prewarms_by_priority_into_free_pages_only():
    models = [
        dataclasses.replace(model("a"), priority=1.0),
        dataclasses.replace(model("b"), priority=3.0),
        dataclasses.replace(model("c"), priority=2.0),
    ]
    # One GPU with room for two replicas: the two highest priorities get them.
    snap = snapshot(num_gpus=1, gpus_per_node=1, total_pages=25)
    plan = plan_evict_aware(plan_input(snap, models), ids())
    assert {a.model for a in plan.actions} == {"b", "c"}
    assert all(isinstance(a, Prewarm) for a in plan.actions)
    # The paper's planner leaves the memory idle with no forecast.
    assert plan_evict_aware(plan_input(snap, models, prior=False), ids()).actions == []
    # A model with a live instance needs no prior; one that has a replica keeps it, scored.
    snap = snapshot(num_gpus=2, gpus_per_node=2, total_pages=25, replicas=[replica(7, "b", (0,))])
    plan = plan_evict_aware(plan_input(snap, models, live={ModelName("c"): 1}), ids())
    assert [a.model for a in plan.actions] == ["a"]
    assert 0 < plan.scores[7] <= PRIOR_CEILING


def test_forecast_driven_replica_evicts_priors_but_priors_never_evict():
    a, b, c = model("a"), model("b"), model("c")
    full = snapshot(
        num_gpus=1, gpus_per_node=1, total_pages=20,
        replicas=[replica(0, "a", (0,)), replica(1, "b", (0,))],
    )  # fmt: skip
    busy = {ModelName("c"): Forecast(40.0, 60.0)}
    plan = plan_evict_aware(plan_input(full, [a, b, c], busy), ids(10))
    # c's history wins the memory: one prior goes (the lowest-scored: b, the later model).
    evicted = [x.replica_id for x in plan.actions if isinstance(x, Evict)]
    assert len(evicted) == 1
    assert plan.actions[-1] == Prewarm(10, ModelName("c"), (0,))
    # Without history for c, nothing is displaced.
    assert plan_evict_aware(plan_input(full, [a, b, c]), ids(10)).actions == []
    # Forecast-driven replicas are never evicted to make room for a prior.
    held = snapshot(num_gpus=1, gpus_per_node=1, total_pages=20,
                    replicas=[replica(0, "c", (0,)), replica(1, "c", (0,))])  # fmt: skip
    plan = plan_evict_aware(plan_input(held, [a, c], busy), ids(10))
    assert not any(isinstance(x, Evict) for x in plan.actions)


class _Zero(Forecaster):
    def __init__(self) -> None:
        super().__init__(300.0, 10)

    def forecast(self, model):  # no history at all
        return Forecast(0.0, 0.0)


def _run_contention(aging: bool, cycles: int = 6) -> int | None:
    """One GPU, three models in popularity order a, b, c. Each cycle the instance on the GPU
    finishes its request while the other two models have requests queued; the next tick
    decides who gets the GPU, and the winner's request runs through the next cycle. `c` asks
    once, at the start; `a` and `b` ask again every cycle. Returns the cycle c started in."""
    models = [model("a"), model("b"), model("c")]
    cfg = ControlConfig(protect_period_s=0.0, keep_alive_s=0.0)
    spec = dataclasses.replace(get_policy("warmserve-plus").spec, queue_aging=aging)
    ctl = Controller(cfg, spec, models, _Zero())
    books = Books(1, 1, {m.name: m.pages_per_gpu for m in models}, pages_per_device=100)
    rid = iter(range(10**6))
    now = 0.0

    def ask(name: str) -> None:
        req = RequestInfo(RequestId(next(rid)), ModelName(name), now, 8, 8)
        ctl.on_request(now, req, books)

    ask("a")  # a takes the GPU
    ask("c")  # c waits from the very start
    for cycle in range(cycles):
        now += 1.0
        for name in ("a", "b"):
            if not ctl.num_queued(ModelName(name)) and not _serving(books, name):
                ask(name)
        # The running request ends; the GPU's instance goes idle; the tick hands it out.
        (inst,) = books.instances.values()
        for r in list(inst.requests):
            books.request_done(inst.instance_id, r)
            ctl.on_request_done(now, r, books)
        for i in list(books.instances):
            books.mark_running(i)
        now += 10.0
        ctl.tick(now, books)
        if _serving(books, "c"):
            return cycle
    return None


def _serving(books: Books, name: str) -> bool:
    return any(i.model == name for i in books.instances.values())


@pytest.mark.parametrize("aging", [True, False])
def test_aging_serves_a_starving_model_within_a_bound(aging):
    started = _run_contention(aging)
    if aging:
        assert started == 0  # the longest wait goes first: served at the first freed GPU
    else:
        assert started is None  # popularity order: c loses every race


def _kv_churn(calm: bool, ticks: int = 40) -> tuple[int, Controller, Books, int]:
    """One instance whose in-flight count swings between 2 and 6 every tick (a target change
    of 11 of its 90 KV pages): SetKvPages issued by ticks alone, and the instance id."""
    m = model("a")
    spec = dataclasses.replace(get_policy("warmserve-plus").spec, calm_kv=calm)
    ctl = Controller(ControlConfig(), spec, [m], _Zero())
    books = Books(1, 1, {m.name: m.pages_per_gpu}, pages_per_device=100)
    rid = iter(range(10**6))
    live: list[int] = []
    now = 0.0

    def ask() -> None:
        r = RequestId(next(rid))
        ctl.on_request(now, RequestInfo(r, ModelName("a"), now, 8, 8), books)
        live.append(r)

    ask()
    (inst_id,) = books.instances
    books.mark_running(inst_id)
    for k in range(ticks):
        now += 0.5
        want = 6 if k % 2 else 2
        while len(live) < want:
            ask()
        while len(live) > want:
            r = live.pop()
            books.request_done(inst_id, r)
            ctl.on_request_done(now, r, books)
        ctl.tick(now, books)
    return ctl.counters.kv_set, ctl, books, inst_id


def test_calm_kv_lending_ignores_small_target_swings_but_reclaims_on_pressure():
    calm, ctl, books, inst_id = _kv_churn(calm=True)
    eager, _, _, _ = _kv_churn(calm=False)
    assert eager >= 20  # the paper's reservation follows every swing
    assert calm == 1  # one lend down to the target, then nothing within the band
    assert ctl.counters.kv_lends == 1 and ctl.counters.kv_reclaims == 0
    lent = books.instances[inst_id].kv_lent_pages
    assert lent > 0
    # Requests waiting for KV reclaim at once, inside the lend's minimum lifetime.
    books.set_kv_used(inst_id, books.instances[inst_id].kv_pages)
    ctl.on_kv_pressure(20.5, inst_id, books)
    assert ctl.counters.kv_reclaims == 1
    assert books.instances[inst_id].kv_lent_pages < lent


def test_priority_reaches_the_control_plane_from_experiment_and_serve_files(tmp_path):
    from test_sim import small_experiment

    from warmserve.experiment import ExperimentError, parse_experiment
    from warmserve.serve_config import ServeConfigError, parse_serve_config
    from warmserve.sim.runner import build_models

    raw = small_experiment()
    raw["models"][1]["priority"] = 3.0
    served = {n: m.served for n, m in build_models(parse_experiment(raw, tmp_path)).items()}
    assert served["b"].priority == 3.0 and served["a-0"].priority == 1.0
    raw["models"][1]["priority"] = -1
    with pytest.raises(ExperimentError, match="priority"):
        parse_experiment(raw, tmp_path)
    cfg = parse_serve_config(
        {"models": [{"name": "x", "priority": 2.5}], "policy": "warmserve-plus"}, tmp_path
    )
    assert cfg.models[0].priority == 2.5
    # Accepted only where it is honoured: the faithful policy has no priors.
    with pytest.raises(ServeConfigError, match="does not prewarm by priors"):
        parse_serve_config(
            {"models": [{"name": "x", "priority": 2.5}], "policy": "warmserve"}, tmp_path
        )
    # The serve default is warmserve-plus, which honours it.
    assert parse_serve_config({"models": [{"name": "x", "priority": 2.5}]}, tmp_path).policy == (
        "warmserve-plus"
    )
    raw["models"][1]["priority"] = 3.0
    raw["policies"] = ["warmserve", "vanilla-autoscale"]
    with pytest.raises(ExperimentError, match="prewarm by priors"):
        parse_experiment(raw, tmp_path)
    with pytest.raises(ServeConfigError, match="priority"):
        parse_serve_config({"models": [{"name": "x", "priority": 0}]}, tmp_path)
