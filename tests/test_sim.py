import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from warmserve.control.registry import POLICIES
from warmserve.experiment import parse_experiment
from warmserve.sim.runner import build_models, make_workload, run_policy


def small_experiment(tmp_path: Path | None = None, **workload) -> dict:
    return {
        "name": "small",
        "seed": 7,
        "cluster": {"nodes": 1, "gpus_per_node": 4, "gpu": "H100-SXM-80G"},
        "models": [
            {"name": "a", "preset": "llama-2-7b", "tp": 1, "copies": 2, "max_model_len": 2048},
            {"name": "b", "preset": "llama-2-13b", "tp": 2, "max_model_len": 2048},
        ],
        "workload": {
            "trace": "azure-conv",
            "rps": 3.0,
            "alpha": 1.0,
            "duration_s": 300,
            **workload,
        },
        "policies": list(POLICIES),
    }


@pytest.fixture(scope="module")
def small():
    exp = parse_experiment(small_experiment(), Path())
    return exp, make_workload(exp)


@pytest.mark.parametrize("policy", list(POLICIES))
def test_pages_and_requests_are_conserved(small, policy):
    exp, wl = small
    # check_invariants: page books balance on every GPU after every event.
    r = run_policy(exp, policy, wl, check_invariants=True)
    s = r.summary
    assert s["arrived"] == wl.num_requests > 300
    assert s["completed"] + s["failed"] == s["arrived"]
    assert s["failed"] == 0
    assert np.all(r.log.first_token_s >= r.log.arrival_s)
    assert np.all(r.log.finish_s >= r.log.first_token_s)
    assert sum(m["arrived"] for m in s["per_model"].values()) == s["arrived"]
    assert s["cold_starts"] + s["prewarm_hits"] + s["inprogress_hits"] >= 3


def test_same_seed_same_results_other_seed_differs():
    exp = parse_experiment(small_experiment(), Path())
    a = run_policy(exp, "warmserve", make_workload(exp)).summary
    b = run_policy(exp, "warmserve", make_workload(exp)).summary
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
    other = dataclasses.replace(exp, seed=8)
    c = run_policy(other, "warmserve", make_workload(other)).summary
    assert json.dumps(a, sort_keys=True) != json.dumps(c, sort_keys=True)


def test_vanilla_pays_cold_starts_warmserve_does_not(small):
    exp, wl = small
    warm = run_policy(exp, "warmserve", wl).summary
    cold = run_policy(exp, "vanilla-autoscale", wl).summary
    assert cold["prewarm_hits"] == 0 and cold["cold_starts"] > 3
    assert warm["prewarm_hits"] > warm["cold_starts"]
    assert warm["ttft_p99_s"] * 5 < cold["ttft_p99_s"]


def write_trace(tmp_path: Path, rows: list[tuple[float, str, int, int]]) -> str:
    path = tmp_path / "trace.csv"
    lines = ["timestamp_s,model,input_tokens,output_tokens"] + [",".join(map(str, r)) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def one_model_experiment(tmp_path, rows):
    raw = small_experiment()
    raw["models"] = [{"name": "a", "preset": "llama-2-7b", "tp": 1, "max_model_len": 2048}]
    raw["workload"] = {"trace": write_trace(tmp_path, rows), "duration_s": 1000}
    return parse_experiment(raw, Path())


def test_hand_computed_cold_start_then_prewarm_hit(tmp_path):
    exp = one_model_experiment(tmp_path, [(1.0, "a", 100, 3), (60.0, "a", 200, 2)])
    wl = make_workload(exp)
    assert list(wl.arrival_s) == [0.0, 59.0]  # the trace is shifted to start at 0
    m = build_models(exp)["a"]
    step = m.step_model
    attach = exp.costs.engine_attach_s + exp.costs.kv_initial_map_bytes / exp.costs.remap_bandwidth

    # Unified memory without the planner: the first start loads weights on the critical path;
    # after scale-to-zero the weights stay, so the second start is a prewarm hit.
    r = run_policy(exp, "warmserve-no-prewarm", wl)
    ready = m.prewarm_load_s + attach
    ttft0 = ready + step.prefill(100, 100**2)
    assert r.log.first_token_s[0] == pytest.approx(ttft0)
    finish0 = ttft0 + step.decode(1, 101) + step.decode(1, 102)
    assert r.log.finish_s[0] == pytest.approx(finish0)
    assert r.log.first_token_s[1] == pytest.approx(59.0 + attach + step.prefill(200, 200**2))
    assert (r.summary["cold_starts"], r.summary["prewarm_hits"]) == (1, 1)

    # Vanilla autoscaling: a fresh engine and a plain load each time.
    r = run_policy(exp, "vanilla-autoscale", wl)
    assert r.log.first_token_s[0] == pytest.approx(m.vanilla_start_s + step.prefill(100, 100**2))
    assert r.log.first_token_s[1] == pytest.approx(
        59.0 + m.vanilla_start_s + step.prefill(200, 40_000)
    )
    assert r.summary["cold_starts"] == 2


def test_kv_prewarm_lends_pages_and_the_ablation_does_not(small):
    exp, wl = small
    on = run_policy(exp, "warmserve", wl).memory
    off = run_policy(exp, "warmserve-no-kv-prewarm", wl).memory
    # Busy GPUs: with KV prewarm, part of their KV pages are free for prewarming.
    busy_on = on.kv > 0
    busy_off = off.kv > 0
    assert (on.free[busy_on] + on.prewarm[busy_on]).max() > 0
    assert (off.free[busy_off] + off.prewarm[busy_off]).max() == 0


def test_no_prewarm_ablation_places_nothing_ahead(small):
    exp, wl = small
    r = run_policy(exp, "warmserve-no-prewarm", wl)
    # Replicas only appear by demotion of stopped instances, never before the first start.
    assert r.memory.prewarm[0].sum() == 0
    r = run_policy(exp, "warmserve", wl)
    assert r.memory.prewarm[0].sum() > 0  # forecast-driven replicas from the first tick


def test_burstiness_redraws_gaps_keeping_count_and_span():
    from warmserve.workload.builders import apply_burstiness

    rng = np.random.default_rng(0)
    t = np.sort(rng.uniform(0, 1000, 5000))
    for cv in (0.5, 1.0, 4.0):
        b = apply_burstiness(t, cv, 1000.0, np.random.default_rng(1))
        gaps = np.diff(b)
        assert len(b) == len(t) and b[-1] <= 1000.0 and np.all(gaps >= 0)
        assert abs(gaps.std() / gaps.mean() - cv) < 0.15 * cv
    exp = parse_experiment(small_experiment(burstiness_cv=3.0), Path())
    base = parse_experiment(small_experiment(), Path())
    assert make_workload(exp).num_requests == make_workload(base).num_requests


def test_stopping_instance_released_once_when_a_step_finishes_several_requests():
    # Regression: two requests finishing in the same decode run of a draining instance.
    from warmserve.experiment import load_experiment

    exp = load_experiment(Path(__file__).parent.parent / "experiments" / "paper-azure-conv.yaml")
    exp = dataclasses.replace(exp, workload=dataclasses.replace(exp.workload, rps=16.0, alpha=0.5))
    r = run_policy(exp, "vanilla-autoscale", make_workload(exp))
    assert r.summary["failed"] == 0


def test_servegen_clients_become_deployments():
    raw = small_experiment()
    raw["models"] = [
        {"name": "c60", "preset": "llama-2-7b", "tp": 1, "max_model_len": 2048},
        {"name": "c36", "preset": "llama-2-7b", "tp": 1, "max_model_len": 2048},
        {"name": "c73", "preset": "llama-2-13b", "tp": 2, "max_model_len": 2048},
    ]
    raw["workload"] = {"trace": "servegen:m-mid", "rps": 4.0, "days": [9], "start_hour": 10,
                       "duration_s": 600}  # fmt: skip
    exp = parse_experiment(raw, Path())
    wl = make_workload(exp)
    # Scaled to the requested mean rate (bursty clients: within a wide band), busiest first.
    assert 0.5 * 4.0 * 600 < wl.num_requests < 2.0 * 4.0 * 600
    counts = np.bincount(wl.model_idx, minlength=3)
    assert counts[0] > counts[1] > 0
    assert all(wl.histories[n] is not None for n in wl.model_names)
    assert wl.input_tokens.max() <= 1024 and wl.output_tokens.min() >= 3
    again = make_workload(exp)
    np.testing.assert_array_equal(wl.arrival_s, again.arrival_s)
    r = run_policy(exp, "warmserve", wl, check_invariants=True)
    assert r.summary["completed"] + r.summary["failed"] == wl.num_requests


def test_lent_kv_comes_back_mid_run_for_a_waiting_request(tmp_path):
    # The instance idles down to its KV floor (one 2048-token request), then a long request
    # runs and a second one arrives: the lent pages must come back at once, not when the
    # first request's 600-token decode run ends.
    rows = [(1.0, "a", 10, 3), (20.1, "a", 1000, 600), (20.2, "a", 1000, 50)]  # between ticks
    exp = one_model_experiment(tmp_path, rows)
    r = run_policy(exp, "warmserve-plus", make_workload(exp), check_invariants=True)
    ttft = r.log.first_token_s - r.log.arrival_s
    # One start, kept alive (a prewarm hit: with no history the model was prewarmed by prior).
    assert r.summary["cold_starts"] == 0 and r.summary["prewarm_hits"] == 1
    assert ttft[2] < 0.2, ttft
    assert r.log.finish_s[2] < r.log.finish_s[1]


def test_a_starting_instance_is_never_stopped(tmp_path):
    # Regression: twenty requests hold the first instance; a burst at t = 20 overflows it, so
    # a second instance starts cold (about 14 s) with one request. When the burst and the
    # shorter ten are done the load asks for one instance, and the starting one is the least
    # loaded past its protect period: stopping it left its request waiting forever while the
    # controller counted it in flight.
    rows = [(0.0, "a", 100, 3000)] * 10 + [(0.0, "a", 100, 1000)] * 10
    rows += [(20.0, "a", 50, 400)] * 13
    exp = one_model_experiment(tmp_path, rows)
    wl = make_workload(exp)
    r = run_policy(exp, "vanilla-autoscale", wl, check_invariants=True)
    assert r.summary["cold_starts"] == 2  # the scenario: a second start during the burst
    assert r.summary["failed"] == 0 and r.summary["completed"] == wl.num_requests


def test_a_request_without_exactly_one_outcome_fails_the_run(small, monkeypatch):
    from warmserve.control.controller import Controller
    from warmserve.sim.runner import ConservationError

    exp, wl = small
    on_request = Controller.on_request

    def lose_request_3(self, now, req, cluster):
        if req.request_id != 3:  # the control plane drops it: never queued, never routed
            on_request(self, now, req, cluster)

    monkeypatch.setattr(Controller, "on_request", lose_request_3)
    with pytest.raises(ConservationError, match="request 3 has no outcome"):
        run_policy(exp, "warmserve", wl)
