from pathlib import Path

import numpy as np
import pytest
from helpers import instance, model, snapshot
from test_sim import one_model_experiment, small_experiment

from warmserve.control.config import ControlConfig
from warmserve.control.forecaster import Forecast, OracleForecaster
from warmserve.control.serverless import ServerlessLLMController
from warmserve.experiment import parse_experiment
from warmserve.sim.host_cache import NodeCheckpointCache
from warmserve.sim.runner import build_models, make_workload, run_policy
from warmserve.types import StartPath

GB = 1e9


def test_dram_cache_hit_loads_faster_than_ssd_and_evicts_lru():
    cache = NodeCheckpointCache(
        capacity_bytes=30 * GB, ssd_bandwidth=10 * GB, host_to_device_bandwidth=50 * GB
    )
    cold, tier = cache.load_s("a", int(20 * GB), int(10 * GB), now=0.0)
    assert tier == "ssd" and cold == pytest.approx(2.0)  # 20 GB at 10 GB/s, GPU copy overlapped
    hot, tier = cache.load_s("a", int(20 * GB), int(10 * GB), now=5.0)
    assert tier == "dram" and hot == pytest.approx(0.2)  # 10 GB shard at 50 GB/s
    cache.load_s("b", int(15 * GB), int(15 * GB), now=10.0)  # evicts "a" (LRU, 35 GB > 30)
    assert list(cache.cached) == ["b"]


def test_ssd_reads_queue_per_node():
    cache = NodeCheckpointCache(
        capacity_bytes=100 * GB, ssd_bandwidth=10 * GB, host_to_device_bandwidth=50 * GB
    )
    first, _ = cache.load_s("a", int(10 * GB), int(10 * GB), now=0.0)
    second, _ = cache.load_s("b", int(10 * GB), int(10 * GB), now=0.0)
    assert (first, second) == (pytest.approx(1.0), pytest.approx(2.0))


def test_serverlessllm_prefers_the_node_caching_the_checkpoint_then_the_shortest_queue():
    m = model("m", tp=2)
    ctl = ServerlessLLMController(
        ControlConfig(), [m], OracleForecaster(300, {"m": (np.zeros(1), np.zeros(1))})
    )
    base = snapshot(num_gpus=16, gpus_per_node=8)
    snap = type(base)(base.gpus, (), (), 8, (frozenset(), frozenset({"m"})), (0.0, 0.0))
    choice = ctl._choose_start(m, snap, now=0.0)
    assert choice.gpus == (8, 9) and choice.path == StartPath.COLD
    snap = type(base)(base.gpus, (), (), 8, (frozenset(), frozenset()), (30.0, 4.0))
    assert ctl._choose_start(m, snap, now=2.0).gpus == (8, 9)
    busy = snapshot(num_gpus=16, gpus_per_node=8, instances=[instance(0, "x", tuple(range(8, 16)))])
    snap = type(busy)(busy.gpus, (), busy.instances, 8, (frozenset(), frozenset({"m"})), (0.0, 0.0))
    assert ctl._choose_start(m, snap, now=0.0).gpus == (0, 1)  # cached node has no free GPUs


def test_keep_alive_spares_idle_instances_that_scale_to_zero_would_stop(tmp_path):
    rows = [(1.0, "a", 100, 3), (15.0, "a", 100, 3), (25.0, "a", 100, 3)]
    exp = one_model_experiment(tmp_path, rows)
    wl = make_workload(exp)
    sllm = run_policy(exp, "serverlessllm-tuned", wl)
    assert sllm.summary["cold_starts"] == 1  # kept alive across the 10-14 s gaps
    warm = run_policy(exp, "warmserve-no-prewarm", wl)
    assert (
        warm.summary["cold_starts"] + warm.summary["prewarm_hits"] == 3
    )  # stopped after ~5 s idle
    # A second start of the same checkpoint on that node reads it from DRAM, not SSD.
    rows = [(1.0, "a", 100, 3), (100.0, "a", 100, 3)]
    exp = one_model_experiment(tmp_path, rows)
    r = run_policy(exp, "serverlessllm-tuned", make_workload(exp))
    m = build_models(exp)["a"]
    c = exp.costs
    first = r.log.first_token_s[0]
    second = r.log.first_token_s[1] - 99.0
    assert first == pytest.approx(
        c.serverless_tuned_engine_init_s
        + m.served.shard_bytes / c.serverless_ssd_bandwidth
        + m.step_model.prefill(100, 1e4)
    )
    # From DRAM: the GPU's link, or the node's host bandwidth if that is lower.
    link = min(exp.gpu.host_to_device_bandwidth, c.host_node_bandwidth)
    assert second == pytest.approx(
        c.serverless_tuned_engine_init_s
        + m.served.shard_bytes / link
        + m.step_model.prefill(100, 1e4)
    )
    assert second < first


def test_static_sizes_from_history_and_never_scales():
    raw = small_experiment()
    exp = parse_experiment(raw, Path())
    wl = make_workload(exp)
    r = run_policy(exp, "static", wl, check_invariants=True)
    s = r.summary
    # All instances start in the set-up period, one per model here, and never stop or grow.
    assert s["cold_starts"] == 3 and s["failed"] == 0
    assert np.all(np.diff(r.memory.weights[r.memory.time_s >= 0], axis=0) == 0)
    # Started before the first request: no request pays a start-up.
    assert s["ttft_p99_s"] < 1.0


def test_oracle_forecasts_the_true_windows():
    future = {"m": (np.array([1.0, 5.0, 2.0]), np.array([3.0, 9.0, 4.0]))}
    f = OracleForecaster(300, future)
    f.add_model("m", 0.0)
    assert f.forecast("m") == Forecast(1.0, 3.0)
    assert f.close_window("m", 0, 7.0, 7.0) == Forecast(5.0, 9.0)  # observations don't matter
    assert f.close_window("m", 1, 0.0, 0.0) == Forecast(2.0, 4.0)
    assert f.close_window("m", 2, 0.0, 0.0) == Forecast(0.0, 0.0)


def test_oracle_runs_like_warmserve_with_perfect_forecasts():
    exp = parse_experiment(small_experiment(), Path())
    wl = make_workload(exp)
    r = run_policy(exp, "oracle", wl, check_invariants=True)
    assert r.summary["failed"] == 0 and r.summary["prewarm_hits"] > 0
