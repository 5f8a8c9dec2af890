import json
from pathlib import Path

import pytest
import yaml
from test_sim import small_experiment

from warmserve.cli import main

CONTRACT_KEYS = {
    "arrived", "completed", "failed", "ttft_mean_s", "ttft_p50_s", "ttft_p90_s", "ttft_p99_s",
    "tpot_mean_s", "tpot_p99_s", "throughput_rps", "slo_attainment", "cold_starts",
    "prewarm_hits", "forecast_peak_rel_error", "per_model",
}  # fmt: skip


def write(tmp_path: Path, raw: dict) -> str:
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_simulate_writes_summary_report_and_plots(tmp_path, capsys):
    raw = small_experiment(duration_s=120)
    out = tmp_path / "out"
    rc = main(["simulate", write(tmp_path, raw), "--policies", "warmserve,vanilla-autoscale",
               "--out", str(out), "--seed", "3", "--quiet"])  # fmt: skip
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seed"] == 3
    assert set(summary["policies"]) == {"warmserve", "vanilla-autoscale"}
    for s in summary["policies"].values():
        assert set(s) >= CONTRACT_KEYS
        assert set(s["per_model"]) == {"a-0", "a-1", "b"}
        for m in s["per_model"].values():
            assert CONTRACT_KEYS - {"per_model"} <= set(m)
    report = (out / "report.md").read_text()
    assert "| warmserve |" in report and "| a-1 |" in report
    for png in ("ttft_cdf.png", "memory_warmserve.png", "memory_vanilla-autoscale.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    assert "wrote" in capsys.readouterr().out


def test_simulate_writes_one_outcome_per_request_and_policy(tmp_path):
    import csv

    from warmserve.workload.records import REQUEST_COLUMNS

    out = tmp_path / "out"
    rc = main(["simulate", write(tmp_path, small_experiment(duration_s=120)), "--policies",
               "warmserve,vanilla-autoscale", "--out", str(out), "--quiet"])  # fmt: skip
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())["policies"]
    with (out / "requests.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == REQUEST_COLUMNS  # the columns `warmserve bench` writes
    for policy, s in summary.items():
        mine = [r for r in rows if r["policy"] == policy]
        assert len(mine) == s["arrived"]
        assert sum(1 for r in mine if r["error"] == "") == s["completed"]
        assert all(float(r["finish_s"]) >= float(r["ttft_s"]) >= 0 for r in mine if not r["error"])


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda r: r.update(bogus=1), "unknown key 'bogus'"),
        (lambda r: r["cluster"].update(gpus=3), "cluster: unknown key 'gpus'"),
        (lambda r: r["models"][0].update(preset="llama-9b"), "unknown preset 'llama-9b'"),
        (lambda r: r["models"][0].update(tp="two"), "models[0].tp: expected an integer"),
        (lambda r: r.update(policies=["warmserve", "nope"]), "unknown policy 'nope'"),
        (lambda r: r["cluster"].update(gpu="TPU"), "unknown GPU 'TPU'"),
        (lambda r: r["cluster"].update(profile="h100-sxm-80g"), "profile or gpu, not both"),
        (lambda r: (r["cluster"].pop("gpu"), r["cluster"].update(profile="tpu-v9")),
         "cluster.profile: unknown profile 'tpu-v9' (shipped: a100-80g"),
        (lambda r: (r["cluster"].pop("gpu"), r["cluster"].update(profile="nowhere.yaml")),
         "cannot read profile"),
        (lambda r: r["models"][1].update(preset="llama-2-70b", tp=1), "cannot be placed"),
        (lambda r: r["models"][1].update(tp=8), "tp 8 needs 1..4 GPUs of one node"),
        (lambda r: r["workload"].update(trace="nothing"), "is not azure-conv"),
        (lambda r: r["workload"].update(trace="missing.csv"), "cannot read trace"),
        (lambda r: r.update(control={"scale_up_threshold": 0.1}), "scale_down_threshold"),
    ],
)  # fmt: skip
def test_bad_experiments_get_one_line_and_exit_2(tmp_path, capsys, mutate, message):
    raw = small_experiment()
    mutate(raw)
    rc = main(["simulate", write(tmp_path, raw), "--out", str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and err.startswith("warmserve: error:")
    assert message in err
    assert not (tmp_path / "o").exists()


def test_unknown_policy_flag_and_missing_file(tmp_path, capsys):
    rc = main(["simulate", write(tmp_path, small_experiment()), "--policies", "magic", "--quiet"])
    assert rc == 2 and "unknown policy 'magic'" in capsys.readouterr().err
    rc = main(["simulate", str(tmp_path / "none.yaml")])
    assert rc == 2 and "cannot read" in capsys.readouterr().err
    (tmp_path / "bad.yaml").write_text("models: [a\n")
    assert main(["simulate", str(tmp_path / "bad.yaml")]) == 2
    assert "not valid YAML" in capsys.readouterr().err


def test_csv_trace_with_unknown_model_is_rejected(tmp_path, capsys):
    trace = tmp_path / "t.csv"
    trace.write_text("timestamp_s,model,input_tokens,output_tokens\n0.5,zzz,10,10\n")
    raw = small_experiment()
    raw["workload"] = {"trace": str(trace)}
    assert main(["simulate", write(tmp_path, raw), "--quiet"]) == 2
    assert "trace names models not in the experiment: zzz" in capsys.readouterr().err
    trace.write_text("time,model\n1,a\n")
    assert main(["simulate", write(tmp_path, raw), "--quiet"]) == 2
    assert "header must be" in capsys.readouterr().err


def test_shipped_experiment_parses():
    from warmserve.experiment import load_experiment

    exp = load_experiment(Path(__file__).parent.parent / "experiments" / "paper-azure-conv.yaml")
    names = [n for n, _, _ in exp.served_models()]
    assert names == ["llama-7b-0", "llama-7b-1", "llama-13b", "llama-70b"]
    assert (exp.cluster.nodes, exp.cluster.gpus_per_node, exp.workload.duration_s) == (2, 8, 1200)


def test_rate_sweep_reports_curve_and_max_rps_at_slo(tmp_path):
    raw = small_experiment(duration_s=120)
    raw["slo"] = {"ttft_s": 5.0, "tpot_s": 1.0}  # met by hot starts, missed by cold ones
    out = tmp_path / "sweep"
    rc = main(["simulate", write(tmp_path, raw), "--policies", "warmserve,vanilla-autoscale",
               "--sweep", "rps=1,3,6", "--out", str(out), "--quiet"])  # fmt: skip
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["sweep"] == {"key": "rps", "values": [1.0, 3.0, 6.0], "slo_target": 0.9}
    for s in summary["policies"].values():
        assert set(s) >= CONTRACT_KEYS
        assert [pt["rps"] for pt in s["sweep"]] == [1.0, 3.0, 6.0]
        assert s["summary_at"] == {"rps": 3.0}  # the experiment's own rate
        assert s["ttft_p99_s"] == s["sweep"][1]["ttft_p99_s"]
        ok = [pt["rps"] for pt in s["sweep"] if pt["slo_attainment"] >= 0.9]
        assert s["max_rps_at_slo"] == (max(ok) if ok else None)
    arrived = [pt["arrived"] for pt in summary["policies"]["warmserve"]["sweep"]]
    assert arrived[0] < arrived[1] < arrived[2]
    assert summary["policies"]["warmserve"]["max_rps_at_slo"] == 6.0
    assert (out / "sweep_rps.png").exists() and "## Sweep over rps" in (
        out / "report.md"
    ).read_text()


def test_bad_sweeps(tmp_path, capsys):
    path = write(tmp_path, small_experiment())
    for arg, msg in [
        ("rps", "KEY=V1"),
        ("tp=1,2", "KEY=V1"),
        ("rps=a,b", "not a list"),
        ("rps=0", "positive"),
    ]:
        assert main(["simulate", path, "--sweep", arg, "--quiet"]) == 2
        assert msg in capsys.readouterr().err
    raw = small_experiment()
    raw["sweep"] = {"seed": [1, 2]}
    assert main(["simulate", write(tmp_path, raw), "--quiet"]) == 2
    assert "cannot sweep 'seed'" in capsys.readouterr().err
