"""Device profiles: the shipped files, loading by name or path, validation, experiments."""

import dataclasses
from pathlib import Path

import pytest
import yaml

from warmserve.experiment import ExperimentError, parse_experiment
from warmserve.profiles import (
    ProfileError,
    load_profile,
    parse_profile,
    profile_yaml,
    shipped_profiles,
)
from warmserve.sim.costs import StartupCosts
from warmserve.sim.latency import LatencyParams

EXPERIMENTS = Path(__file__).parent.parent / "experiments"


def test_shipped_profiles_load_and_the_gpu_ones_keep_the_former_constants():
    names = shipped_profiles()
    assert {"h100-sxm-80g", "a100-80g"} <= set(names)
    for name in names:
        p = load_profile(name)
        assert p.name == name and p.device.memory_bytes > 0
    h100, a100 = load_profile("h100-sxm-80g"), load_profile("a100-80g")
    # The shipped experiments' results stay as they were: the GPU profiles hold exactly the
    # constants the simulator used before profiles existed.
    assert h100.latency == LatencyParams() and h100.costs == StartupCosts()
    # The A100 node's host link is its own (ServerlessLLM issue #14's 8xA100 figure).
    assert a100.latency == LatencyParams()
    assert a100.costs == dataclasses.replace(StartupCosts(), host_node_bandwidth=25e9)
    assert (h100.device.peak_flops, h100.device.hbm_bandwidth) == (989e12, 3.35e12)
    assert (h100.device.host_to_device_bandwidth, h100.device.nvlink_bandwidth) == (55e9, 450e9)
    assert (a100.device.peak_flops, a100.device.hbm_bandwidth) == (312e12, 2.039e12)
    assert (a100.device.host_to_device_bandwidth, a100.device.nvlink_bandwidth) == (24.8e9, 300e9)
    assert h100.device.memory_bytes == a100.device.memory_bytes == 80 * 2**30
    assert not h100.shared_host


def test_shipped_cpu_profile_is_a_shared_host():
    cpu = [n for n in shipped_profiles() if n.startswith("cpu")]
    assert cpu, "a measured CPU profile ships"
    p = load_profile(cpu[0])
    assert p.shared_host and p.latency.seq_overhead_s > 0


def test_every_shipped_experiment_names_a_profile():
    for path in sorted(EXPERIMENTS.glob("*.yaml")):
        raw = yaml.safe_load(path.read_text())
        assert raw["cluster"]["profile"] == "h100-sxm-80g", path.name
        exp = parse_experiment(raw, path.parent, path.stem)
        assert exp.gpu == load_profile("h100-sxm-80g").device


def _raw(**cluster):
    return {
        "cluster": {"nodes": 1, "gpus_per_node": 2, **cluster},
        "models": [{"name": "a", "preset": "llama-2-7b", "max_model_len": 2048}],
    }


def test_old_gpu_key_and_profile_name_are_the_same_experiment():
    old = parse_experiment(_raw(gpu="A100-80G"), Path())
    new = parse_experiment(_raw(profile="a100-80g"), Path())
    assert (old.gpu, old.latency, old.costs) == (new.gpu, new.latency, new.costs)
    default = parse_experiment(_raw(), Path())
    assert default.gpu == load_profile("h100-sxm-80g").device


def test_profile_by_path_and_experiment_overrides(tmp_path):
    base = load_profile("h100-sxm-80g")
    mine = dataclasses.replace(
        base,
        name="mine",
        device=dataclasses.replace(base.device, name="mine", hbm_bandwidth=1e12),
        costs=dataclasses.replace(base.costs, engine_attach_s=0.05),
    )
    (tmp_path / "hw").mkdir()
    (tmp_path / "hw" / "mine.yaml").write_text(profile_yaml(mine, {"costs.engine_attach_s": "x"}))
    raw = _raw(profile="hw/mine.yaml")  # relative to the experiment file's folder
    raw["costs"] = {"cold_engine_init_s": 3.0}  # the experiment overrides one value
    raw["policies"] = ["warmserve", "vanilla-autoscale"]  # (one that pays it)
    exp = parse_experiment(raw, tmp_path)
    assert exp.gpu.hbm_bandwidth == 1e12 and exp.gpu.name == "mine"
    assert exp.costs.engine_attach_s == 0.05  # from the profile
    assert exp.costs.cold_engine_init_s == 3.0  # from the experiment
    assert exp.costs.remap_bandwidth == base.costs.remap_bandwidth
    with pytest.raises(ExperimentError, match="cannot read profile"):
        parse_experiment(_raw(profile="hw/none.yaml"), tmp_path)


def test_profile_yaml_round_trips():
    for name in shipped_profiles():
        p = load_profile(name)
        assert parse_profile(yaml.safe_load(profile_yaml(p, header="a\nb")), "t") == p


DEVICE = {"peak_flops": 1e12, "hbm_bandwidth": 1e11, "memory_bytes": 2**30,
          "host_to_device_bandwidth": 1e9, "nvlink_bandwidth": 1e9}  # fmt: skip
GOOD = {"name": "x", "device": DEVICE}


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda r: r.update(gpu="x"), "unknown key 'gpu'"),
        (lambda r: r.pop("device"), "missing key 'device'"),
        (lambda r: r["device"].pop("memory_bytes"), "device: missing key 'memory_bytes'"),
        (lambda r: r["device"].update(peak_flops=0), "device.peak_flops must be > 0"),
        (lambda r: r["device"].update(peak_flops="fast"), "device.peak_flops: expected float"),
        (lambda r: r["device"].update(flops=1), "device: unknown key 'flops'"),
        (lambda r: r.update(latency={"step_overhead_s": -1.0}), "overheads must be >= 0"),
        (lambda r: r.update(latency={"flops_efficiency": 0}), "efficiencies must be > 0"),
        (lambda r: r.update(costs={"remap_bandwidth": 0}), "remap_bandwidth must be > 0"),
        (lambda r: r.update(costs={"weights_source": "tape"}), "expected one of"),
        (lambda r: r.update(shared_host="yes"), "shared_host must be true or false"),
    ],
)  # fmt: skip
def test_bad_profiles_are_one_line_errors(mutate, message):
    raw = {"name": "x", "device": dict(GOOD["device"])}
    mutate(raw)
    with pytest.raises(ProfileError, match=message) as err:
        parse_profile(raw, "p.yaml")
    assert "\n" not in str(err.value)


def test_good_profile_takes_defaults_for_missing_sections():
    p = parse_profile(GOOD, "p.yaml")
    assert p.latency == LatencyParams() and p.costs == StartupCosts() and not p.shared_host


def test_unknown_profile_names_the_shipped_ones():
    with pytest.raises(ProfileError, match="unknown profile 'nope' \\(shipped: a100-80g"):
        load_profile("nope")


def test_the_cpu_profile_simulates_the_served_model(smollm2_dir):
    from warmserve.sim.runner import make_workload, run_policy

    raw = {
        "seed": 1,
        "cluster": {"nodes": 1, "gpus_per_node": 2, "profile": "cpu-2core-shared",
                    "pool_fraction": 1.0},
        "models": [{"name": "smollm2", "config": str(smollm2_dir / "config.json"),
                    "max_model_len": 640}],
        "workload": {"trace": "azure-conv", "rps": 0.2, "duration_s": 120,
                     "max_input_tokens": 512, "max_output_tokens": 64},
        "policies": ["warmserve"],
    }  # fmt: skip
    exp = parse_experiment(raw, Path())
    result = run_policy(exp, "warmserve", make_workload(exp))
    s = result.summary
    assert s["arrived"] > 0 and s["completed"] == s["arrived"]
    # The CPU's step times, not an H100's: a first token takes tens of ms at least.
    assert s["ttft_p50_s"] > 0.05
