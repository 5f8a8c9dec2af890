"""serverlessllm as shipped, the host link, overrides, seeds, sweeps, per-model flags."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from test_sim import small_experiment, write_trace

from warmserve.cli import main
from warmserve.experiment import ExperimentError, parse_experiment
from warmserve.sim.host_link import NodeLink, fair_rates
from warmserve.sim.loop import EventLoop
from warmserve.sim.overrides import parse_seeds, parse_set, set_value
from warmserve.sim.runner import build_models, make_workload, run_policy
from warmserve.sim.sweep import (
    is_censored,
    knee,
    max_rate_at_slo,
    parse_sweep,
    refine_knees,
    sweep_summary,
)

GB = 1e9


def experiment(tmp_path, rows, models=None, **sections):
    raw = small_experiment()
    raw["models"] = models or [
        {"name": "a", "preset": "llama-2-7b", "tp": 1, "max_model_len": 2048}
    ]
    raw["workload"] = {"trace": write_trace(tmp_path, rows), "duration_s": 1000}
    for k, v in sections.items():
        raw.setdefault(k, {}).update(v)
    return parse_experiment(raw, Path())


# ----- serverlessllm as shipped ----------------------------------------------------------
def test_serverlessllm_keep_alive_0_scales_to_zero_after_the_last_request(tmp_path):
    rows = [(1.0, "a", 100, 3), (200.0, "a", 100, 3)]
    exp = experiment(tmp_path, rows)
    wl = make_workload(exp)
    r = run_policy(exp, "serverlessllm", wl, check_invariants=True)
    assert r.summary["failed"] == 0
    assert r.summary["cold_starts"] == 2  # nothing kept between the two requests
    # Its GPU holds no weights from a couple of loops after the first request finished.
    mem = r.memory
    quiet = (mem.time_s > r.log.finish_s[0] + 2.5) & (mem.time_s < 199.0)
    assert quiet.any() and mem.weights[quiet].sum() == 0
    # Kept alive 300 s (a `control:` key), the second request finds the instance up.
    exp = experiment(tmp_path, rows, control={"serverless_keep_alive_s": 300.0})
    r = run_policy(exp, "serverlessllm", make_workload(exp))
    assert r.summary["cold_starts"] == 1


def test_serverlessllm_target_1_starts_an_instance_per_request(tmp_path):
    rows = [(1.0, "a", 100, 200)] * 4  # four at once, long enough to overlap
    exp = experiment(tmp_path, rows)
    wl = make_workload(exp)
    shipped = run_policy(exp, "serverlessllm", wl, check_invariants=True).summary
    tuned = run_policy(exp, "serverlessllm-tuned", wl).summary
    assert shipped["cold_starts"] == 4 and tuned["cold_starts"] == 1
    exp = experiment(tmp_path, rows, control={"serverless_target": 2.0})
    assert run_policy(exp, "serverlessllm", make_workload(exp)).summary["cold_starts"] == 2


def test_serverlessllm_routes_only_to_ready_engines_on_its_1_s_loop(tmp_path):
    exp = experiment(tmp_path, [(1.0, "a", 100, 3)])
    r = run_policy(exp, "serverlessllm", make_workload(exp))
    m = build_models(exp)["a"]
    c = exp.costs
    link = min(c.serverless_ssd_bandwidth, c.host_node_bandwidth)
    ready = c.serverless_engine_init_s + m.served.shard_bytes / link
    prefill = m.step_model.prefill(100, 1e4)
    # Started at the first 1 s loop after arrival, sent on at the first loop after ready.
    ttft = r.log.first_token_s[0]
    assert ready + prefill < ttft <= ready + 2.0 + prefill
    assert c.serverless_engine_init_s == 34.0  # the cited figure, not the tuned 2 s
    tuned = run_policy(exp, "serverlessllm-tuned", make_workload(exp))
    assert tuned.log.first_token_s[0] < 10.0


# ----- the node's host link ----------------------------------------------------------------
def test_fair_rates_fill_water_under_the_cap():
    assert fair_rates([55.0, 55.0], None) == [55.0, 55.0]
    assert fair_rates([55.0, 55.0], 52.0) == [26.0, 26.0]
    assert fair_rates([10.0, 55.0, 55.0], 52.0) == [10.0, 21.0, 21.0]
    assert fair_rates([10.0, 20.0], 52.0) == [10.0, 20.0]


def test_two_concurrent_loads_take_twice_as_long_and_are_retimed_when_one_ends():
    loop = EventLoop()
    link = NodeLink(loop, 52 * GB)
    done: dict[str, float] = {}
    link.start(26 * GB, 55 * GB, lambda: done.setdefault("a", loop.now()))
    link.start(26 * GB, 55 * GB, lambda: done.setdefault("b", loop.now()))
    loop.run(100.0)
    assert done == {"a": pytest.approx(1.0), "b": pytest.approx(1.0)}  # 52 GB at 52 GB/s
    loop = EventLoop()
    link = NodeLink(loop, 52 * GB)
    done.clear()
    link.start(13 * GB, 55 * GB, lambda: done.setdefault("short", loop.now()))
    link.start(39 * GB, 55 * GB, lambda: done.setdefault("long", loop.now()))
    loop.run(100.0)
    # Both at 26 GB/s until 0.5 s; then the long one alone at 52 GB/s for its last 26 GB.
    assert done == {"short": pytest.approx(0.5), "long": pytest.approx(1.0)}


def test_concurrent_misses_on_one_node_share_its_host_bandwidth(tmp_path):
    models = [{"name": "a", "preset": "llama-2-7b", "tp": 1, "copies": 2, "max_model_len": 2048}]
    both = [(1.0, "a-0", 100, 3), (1.0, "a-1", 100, 3)]
    one = [(1.0, "a-0", 100, 3)]

    def ttft(rows, **sections):
        exp = experiment(tmp_path, rows, models=models, **sections)
        return run_policy(exp, "warmserve-no-prewarm", make_workload(exp)).log.first_token_s[0]

    cap = 52 * GB  # the H100 profile's node cap
    shard = build_models(experiment(tmp_path, one, models=models))["a-0"].served.shard_bytes
    alone, shared = ttft(one), ttft(both)
    assert shared - alone == pytest.approx(shard / cap, rel=1e-3)  # two loads: twice the time
    unlimited = ttft(both, costs={"host_node_bandwidth": None})
    assert unlimited < alone  # each at its own 55 GB/s link


# ----- the no-placement ablation ----------------------------------------------------------
def test_no_placement_prewarms_every_model_and_differs_from_no_prewarm():
    exp = parse_experiment(small_experiment(duration_s=300), Path())
    wl = make_workload(exp)
    rr = run_policy(exp, "warmserve-no-placement", wl, check_invariants=True).summary
    none = run_policy(exp, "warmserve-no-prewarm", wl).summary
    assert rr["control"]["prewarms"] > 0 and none["control"]["prewarms"] == 0
    assert (rr["prewarm_hits"], rr["cold_starts"]) != (none["prewarm_hits"], none["cold_starts"])


# ----- per-model flags ----------------------------------------------------------------------
def test_a_model_with_unserved_requests_is_flagged(tmp_path):
    rows = [(1.0, "a", 100, 3), (50.0, "a", 100, 3)]
    exp = experiment(tmp_path, rows, workload={"drain_s": 1.0})
    out = tmp_path / "flag"
    r = run_policy(exp, "vanilla-autoscale", make_workload(exp))
    s = r.summary
    assert s["per_model"]["a"]["never_served"] == 1 and s["per_model"]["a"]["flagged"]
    assert s["flagged_models"] == ["a"] and s["never_served"] == 1
    assert s["worst_model"] == "a" and s["worst_model_ttft_p99_s"] == s["ttft_p99_s"]
    from warmserve.sim.report import write_report

    write_report(out, "flag", [r], {"seed": 1})
    report = (out / "report.md").read_text()
    assert "**a: 1 failed, 1 never served**" in report
    assert json.loads((out / "summary.json").read_text())["policies"]["vanilla-autoscale"][
        "flagged_models"
    ] == ["a"]


# ----- sweeps, overrides and seeds ----------------------------------------------------------
def test_parsing_of_sweeps_sets_and_seeds():
    assert parse_sweep("costs.serverless_engine_init_s=30,2,10") == (
        "costs.serverless_engine_init_s",
        [2, 10, 30],
    )
    assert parse_sweep("rps=2,1") == ("rps", [1.0, 2.0])
    assert parse_sweep("control.forecast_method=reference,adaptive")[1] == [
        "reference",
        "adaptive",
    ]
    assert parse_set("costs.host_node_bandwidth=null") == ("costs.host_node_bandwidth", None)
    assert parse_set("rps=4") == ("workload.rps", 4)
    assert parse_seeds("1-5") == [1, 2, 3, 4, 5]
    assert parse_seeds("1,2,3") == [1, 2, 3] and parse_seeds("1-2,7") == [1, 2, 7]
    for bad in ("5-1", "a", ""):
        with pytest.raises(ExperimentError, match="--seeds"):
            parse_seeds(bad)
    for bad in ("x", "costs.engine_attach_s"):
        with pytest.raises(ExperimentError, match="--set"):
            parse_set(bad)


def test_set_value_is_the_files_mechanism():
    raw = small_experiment()
    raw["costs"] = {"engine_attach_s": 0.1}
    from_file = parse_experiment(raw, Path())
    base = parse_experiment(small_experiment(), Path())
    assert set_value(base, "costs.engine_attach_s", 0.1).costs == from_file.costs
    assert set_value(base, "control.keep_alive_s", 0).control.keep_alive_s == 0.0
    assert set_value(base, "seed", 3).seed == 3
    for key, value, msg in [
        ("costs.nope", 1, "unknown key"),
        ("costs.engine_attach_s", -1, "must be >= 0"),
        ("costs.engine_attach_s", "x", "expected a number"),
        ("cluster.profile", "a100-80g", "cannot be overridden"),
        ("tp", 1, "not a setting"),
    ]:
        with pytest.raises(ExperimentError, match=msg):
            set_value(base, key, value)


def test_cost_sweep_with_seeds_through_the_cli(tmp_path, capsys):
    raw = small_experiment(duration_s=60, rps=1.0)
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(raw))
    out = tmp_path / "out"
    rc = main(["simulate", str(path), "--policies", "serverlessllm", "--quiet", "--out", str(out),
               "--sweep", "costs.serverless_engine_init_s=2,30", "--seeds", "1-2",
               "--set", "control.serverless_keep_alive_s=0"])  # fmt: skip
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    curve = summary["policies"]["serverlessllm"]["sweep"]
    assert [pt["costs.serverless_engine_init_s"] for pt in curve] == [2, 30]
    assert curve[0]["ttft_p99_s"] + 20 < curve[1]["ttft_p99_s"]  # the start cost is on the tail
    seeds = summary["seeds"]
    assert seeds["seeds"] == [1, 2]
    agg = seeds["policies"]["serverlessllm"]["ttft_p99_s"]
    assert len(agg["values"]) == 2 and agg["min"] <= agg["mean"] <= agg["max"]
    assert summary["overrides"] == ["control.serverless_keep_alive_s=0"]
    assert "## Over 2 seeds" in (out / "report.md").read_text()
    assert "2 seeds: TTFT p99 mean" in capsys.readouterr().out


def test_censored_sweeps_are_detected():
    pts = [(1.0, 1.0), (2.0, 0.95), (4.0, 0.92)]
    assert max_rate_at_slo(pts) == 4.0 and is_censored(pts)
    assert max_rate_at_slo(pts, 0.99) == 1.0 and not is_censored(pts, 0.99)
    assert knee(pts) is None and knee(pts, 0.99) == (1.0, 2.0)
    results = [(v, SimpleNamespace(summary={"slo_attainment": a, "per_model": {}}))
               for v, a in pts]  # fmt: skip
    s = sweep_summary("rps", 2.0, results)
    assert (s["max_rps_at_slo"], s["max_rps_at_slo_censored"]) == (4.0, True)
    assert (s["max_rps_at_slo_99"], s["max_rps_at_slo_99_censored"]) == (1.0, False)
    assert is_censored([(1.0, 0.5), (2.0, None)]) is False


def test_refinement_bisects_towards_the_knee():
    exp = parse_experiment(small_experiment(duration_s=60), Path())

    def run(point, policy, wl):  # attainment falls below 90 % above 3.3 rps
        ok = 1.0 if point.workload.rps <= 3.3 else 0.5
        return SimpleNamespace(summary={"slo_attainment": ok, "per_model": {}})

    swept = {"p": [(1.0, run(exp, "p", None)), (8.0, run(set_value(exp, "workload.rps", 8.0),
                                                          "p", None))]}  # fmt: skip
    refine_knees(exp, swept, 3, run)
    rates = [v for v, _ in swept["p"]]
    assert rates == [1.0, 2.75, 3.625, 4.5, 8.0]  # 1|8 -> 4.5 fails, 2.75 passes, 3.625 fails
    s = sweep_summary("rps", 1.0, swept["p"])
    assert s["max_rps_at_slo"] == 2.75 and not s["max_rps_at_slo_censored"]
