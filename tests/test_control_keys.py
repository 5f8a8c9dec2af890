"""A control setting or cost no policy of a run reads is refused, and the keys each policy lists
as read (`RegisteredPolicy.reads`, `costs_read`) are the ones that can change its run."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml
from test_sim import small_experiment

from warmserve.cli import main
from warmserve.control.config import ControlConfig
from warmserve.control.registry import ALWAYS_READ, POLICIES, unread_control_keys
from warmserve.experiment import ExperimentError, parse_experiment
from warmserve.sim.costs import StartupCosts
from warmserve.sim.policy_costs import costs_read
from warmserve.sim.runner import make_workload, run_policy

# A valid value other than the default for every key (the pairs scale_down < scale_up and
# starve_wait <= starve_preempt hold together).
ALT = {
    "capacity_per_instance": 8, "scale_window_s": 2.0, "scale_up_threshold": 0.6,
    "scale_down_threshold": 0.0, "protect_period_s": 60.0, "tick_s": 1.0,
    "forecast_method": "reference", "forecast_window_s": 60.0, "forecast_correction_points": 3,
    "forecast_cycle": "week", "forecast_peak_quantile": 0.5, "planning_bandwidth": 4e9,
    "group_search": "exhaustive", "kv_floor_requests": 4, "keep_alive_s": 5.0,
    "serverless_target": 3.0, "serverless_max_instances": 2, "serverless_keep_alive_s": 10.0,
    "serverless_loop_s": 3.0, "serverless_max_queue": 2, "kv_hysteresis": 0.0,
    "kv_lend_min_s": 0.0, "prewarm_min_life_s": 60.0, "starve_wait_s": 0.5,
    "starve_preempt_s": 3.0, "starve_preempt_gap_s": 2.0, "starve_short_threshold": 0.95,
    "starve_rate_window_s": 30.0, "starve_return_s": 10.0,
}  # fmt: skip
# The same for costs, far from the shipped profiles' values (a cold engine start longer than
# the set-up period, so that static deployments pay it too).
COST_ALT = {
    "engine_attach_s": 1.5, "remap_bandwidth": 2e9, "kv_initial_map_bytes": float(8 << 30),
    "weights_source": "ssd", "ssd_bandwidth": 2e9, "cold_engine_init_s": 120.0,
    "vanilla_load_bandwidth": 0.2e9, "host_node_bandwidth": 8e9,
    "serverless_engine_init_s": 8.0, "serverless_tuned_engine_init_s": 9.0,
    "serverless_ssd_bandwidth": 3e9, "serverless_dram_cache_bytes": float(8 << 30),
}  # fmt: skip
_PREWARMING = ("warmserve", "warmserve-no-placement", "warmserve-no-placement-ref",
               "warmserve-no-kv-prewarm", "warmserve-plus", "oracle")  # fmt: skip
_UNIFIED = (*_PREWARMING, "warmserve-no-prewarm")
# Listed keys whose change alone leaves this cell's run as it was, and why. Every other listed
# key must change it alone, so that a list cannot hold a key its policy never reads; the
# exact match also flags an entry here that has started to matter.
CELL_INERT: dict[str, tuple[tuple[str, ...], str]] = {
    "planning_bandwidth": (_PREWARMING, "a common scale of the forecast-driven replicas' values"),
    "costs.ssd_bandwidth": (_UNIFIED, "read only with weights_source: ssd"),
    "starve_rate_window_s": (
        ("warmserve-plus",),
        "the rates it counts over decide no preemption here (idle stops are priced by them "
        "only with starve_return_s)",
    ),
    "protect_period_s": (
        ("serverlessllm-tuned",),
        "keep-alive stops only instances idle for 30 s, older than any protect period here",
    ),
    "scale_window_s": (("serverlessllm-tuned",), "its scale-ups do not move here"),
}
MIXED = [("llama-2-7b", 1), ("llama-2-7b", 1), ("llama-2-13b", 2), ("llama-2-70b", 4)]


def test_every_key_has_an_other_value():
    assert set(ALT) == {f.name for f in dataclasses.fields(ControlConfig)}
    assert all(ALT[k] != getattr(ControlConfig(), k) for k in ALT)
    ControlConfig(**ALT)  # valid together


@pytest.fixture(scope="module")
def contention():
    """Eight mixed models on 16 GPUs at 16 rps for 10 minutes (benchmarks/plus_contention.py's
    cell, shorter): scale-ups, keep-alive stops, KV lends, held blocks and drains all happen."""
    models = [
        {"name": f"m{i}", "preset": p, "tp": tp, "max_model_len": 2048}
        for i, (p, tp) in ((i, MIXED[i % 4]) for i in range(8))
    ]
    raw = {
        "seed": 1,
        "cluster": {"nodes": 2, "gpus_per_node": 8},
        "models": models,
        "workload": {"trace": "azure-conv", "rps": 16.0, "duration_s": 600},
        "policies": list(POLICIES),
    }
    exp = parse_experiment(raw, Path())
    return exp, make_workload(exp)


def _summary(exp, policy, wl, keys=(), costs=()):
    """The run's summary and every request's outcome, with `keys` and `costs` at their other
    values."""
    ctl = dataclasses.replace(exp.control, **{k: ALT[k] for k in keys})
    cst = dataclasses.replace(exp.costs, **{k: COST_ALT[k] for k in costs})
    r = run_policy(dataclasses.replace(exp, control=ctl, costs=cst), policy, wl)
    return r.summary, r.requests, r.num_events


def test_every_cost_has_an_other_value(contention):
    exp, _ = contention
    assert set(COST_ALT) == {f.name for f in dataclasses.fields(StartupCosts)}
    assert all(COST_ALT[k] != getattr(exp.costs, k) for k in COST_ALT)


@pytest.mark.parametrize("policy", list(POLICIES))
def test_only_the_keys_a_policy_reads_change_its_run(contention, policy):
    exp, wl = contention
    reads, pays = POLICIES[policy].reads, costs_read(policy)
    base = _summary(exp, policy, wl)
    # Every key and cost it does not list, changed at once: the run is the same, request for
    # request.
    unread, unpaid = sorted(set(ALT) - reads), sorted(set(COST_ALT) - pays)
    assert unread and unpaid, "every policy leaves some key unread"
    assert _summary(exp, policy, wl, unread, unpaid) == base
    # Each it lists changes it alone, but for CELL_INERT's (the keys every policy reads,
    # ALWAYS_READ, are never refused and not tried here).
    inert = {k for k in sorted(reads - ALWAYS_READ) if _summary(exp, policy, wl, [k]) == base}
    inert |= {f"costs.{k}" for k in sorted(pays) if _summary(exp, policy, wl, costs=[k]) == base}
    assert inert == {k for k, (pols, _) in CELL_INERT.items() if policy in pols}


def test_unread_keys_are_named_with_the_policies_that_read_them():
    cfg = ControlConfig(starve_return_s=10.0, keep_alive_s=5.0, tick_s=1.0)
    unread = unread_control_keys(cfg, ["warmserve"])
    assert set(unread) == {"starve_return_s", "keep_alive_s"}  # tick_s: every policy reads it
    assert unread["starve_return_s"] == ["warmserve-plus"]
    assert "serverlessllm-tuned" in unread["keep_alive_s"]
    assert unread_control_keys(cfg, ["warmserve", "warmserve-plus"]) == {}
    # A key at its default changes nothing, whoever reads it.
    assert unread_control_keys(ControlConfig(starve_return_s=0.0), ["static"]) == {}


def _raw(policies, control):
    return {**small_experiment(duration_s=60), "policies": policies, "control": control}


def test_an_experiment_refuses_a_setting_none_of_its_policies_reads():
    with pytest.raises(ExperimentError, match=r"control.starve_return_s: not read by warmserve, "
                                              r"static \(read by warmserve-plus\)"):  # fmt: skip
        parse_experiment(_raw(["warmserve", "static"], {"starve_return_s": 10}), Path())
    # Shared by several policies: one that reads it is enough.
    exp = parse_experiment(_raw(["warmserve", "warmserve-plus"], {"starve_return_s": 10}), Path())
    assert exp.control.starve_return_s == 10


def test_an_experiment_refuses_a_cost_none_of_its_policies_pays():
    raw = {**_raw(["warmserve", "warmserve-plus"], {}), "costs": {"serverless_engine_init_s": 5}}
    message = r"costs.serverless_engine_init_s: not read by warmserve, warmserve-plus \(read by s"
    with pytest.raises(ExperimentError, match=message):
        parse_experiment(raw, Path())
    raw["policies"] = ["warmserve", "serverlessllm"]
    assert parse_experiment(raw, Path()).costs.serverless_engine_init_s == 5


def test_an_experiment_refuses_a_sweep_none_of_its_policies_reads():
    raw = {**_raw(["warmserve", "static"], {}), "sweep": {"control.keep_alive_s": [0, 60]}}
    with pytest.raises(ExperimentError, match=r"sweep\.control\.keep_alive_s: not read by wa"):
        parse_experiment(raw, Path())
    raw["policies"] = ["warmserve", "warmserve-plus"]
    assert parse_experiment(raw, Path()).sweep == {"control.keep_alive_s": [0, 60]}


def _write(tmp_path, raw) -> str:
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_simulate_notes_a_file_setting_its_policies_leave_unread(tmp_path, capsys):
    path = _write(tmp_path, _raw(["warmserve", "warmserve-plus"], {"keep_alive_s": 5}))
    out = str(tmp_path / "o")
    assert main(["simulate", path, "--policies", "warmserve", "--out", out, "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "note: the experiment's control.keep_alive_s is not read by warmserve" in err


def test_simulate_notes_a_priority_its_policies_leave_unused(tmp_path, capsys):
    raw = _raw(["warmserve", "warmserve-plus"], {})
    raw["models"][0]["priority"] = 2.0
    path = _write(tmp_path, raw)
    out = str(tmp_path / "o")
    assert main(["simulate", path, "--policies", "warmserve", "--out", out, "--quiet"]) == 0
    assert "note: the priority of model 'a' is used only by" in capsys.readouterr().err


def test_simulate_notes_a_file_sweep_its_policies_leave_unread(tmp_path, capsys):
    raw = {**_raw(["warmserve", "warmserve-plus"], {}), "sweep": {"control.keep_alive_s": [0, 60]}}
    out = str(tmp_path / "o")
    assert main(["simulate", _write(tmp_path, raw), "--policies", "warmserve", "--out", out,
                 "--quiet"]) == 0  # fmt: skip
    err = capsys.readouterr().err
    assert "note: sweep.control.keep_alive_s: not read by warmserve" in err
    assert "the sweep changes nothing in this run" in err


@pytest.mark.parametrize(
    "args",
    [
        ["--set", "control.starve_return_s=5", "--policies", "warmserve"],
        ["--set", "control.serverless_target=2"],
        ["--sweep", "control.kv_hysteresis=0,0.5", "--policies", "warmserve"],
        ["--set", "costs.cold_engine_init_s=5"],
        ["--sweep", "costs.serverless_engine_init_s=2,10"],
    ],
)
def test_simulate_refuses_an_override_no_policy_of_the_run_reads(tmp_path, capsys, args):
    path = _write(tmp_path, _raw(["warmserve", "warmserve-plus"], {}))
    assert main(["simulate", path, *args, "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "not read by warmserve" in err and "\n" not in err
