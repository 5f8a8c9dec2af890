"""Shared host cores in the simulator, and its twin of a serve deployment (sim/from_serve.py).
Simulated time only: nothing here is timed."""

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from warmserve.experiment import ExperimentError
from warmserve.hardware import GpuSpec
from warmserve.model_spec import spec_from_hf_config
from warmserve.profiles import load_profile
from warmserve.serve_config import parse_serve_config
from warmserve.sim.from_serve import replay_workload, serve_experiment
from warmserve.sim.host import HostParams, SharedHost
from warmserve.sim.instance import SimInstance, SimRequest
from warmserve.sim.latency import LatencyParams, StepTimeModel
from warmserve.sim.loop import EventLoop
from warmserve.sim.runner import build_models, run_policy
from warmserve.types import InstanceState

# SmolLM2-135M's architecture, in fp32 as `warmserve serve` runs it on a CPU.
SMOLLM2 = {"hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9,
           "num_key_value_heads": 3, "intermediate_size": 1536, "vocab_size": 49152,
           "max_position_embeddings": 8192, "tie_word_embeddings": True,
           "torch_dtype": "float32", "model_type": "llama"}  # fmt: skip
CPU = GpuSpec("cpu", 100e9, 10e9, 2**31, 1e9, 10e9)
LAT = LatencyParams(0.7, 0.8, 0.02, 0.0, 0.0, 0.005)


def _finish_times(host: SharedHost | None, n: int, out_tokens: int = 200) -> list[float]:
    """`n` workers, each given one request at t = 0; when each finishes."""
    loop = EventLoop()
    step = StepTimeModel(spec_from_hf_config("m", SMOLLM2), 1, CPU, LAT)
    done: dict[int, float] = {}
    insts = []
    for k in range(n):
        inst = SimInstance(k, "m", (k,), step, 100.0, loop, lambda rid, t: None,
                           lambda i, r, t: done.__setitem__(i.instance_id, t),
                           lambda i: None, host=host)  # fmt: skip
        inst.kv_pages = 100
        inst.state = InstanceState.RUNNING
        insts.append(inst)
    for k, inst in enumerate(insts):
        inst.add(SimRequest(k, 32, out_tokens))
    loop.run(1e9)
    return [done[k] for k in range(n)]


def test_two_workers_on_one_core_take_twice_as_long():
    (solo,) = _finish_times(None, 1)
    both = _finish_times(SharedHost(HostParams(cores=1.0)), 2)
    # The first prefill started alone (a started step keeps its speed), so a hair under 2x.
    assert both[0] == pytest.approx(2 * solo, rel=0.02)
    assert both[1] == pytest.approx(2 * solo, rel=0.02)
    # Two cores: each worker has its own, as if the host were not shared.
    assert _finish_times(SharedHost(HostParams(cores=2.0)), 2) == pytest.approx([solo, solo])


def test_a_worker_finishing_speeds_the_other_up():
    host = SharedHost(HostParams(cores=1.0))
    (short_solo,) = _finish_times(None, 1, out_tokens=50)
    (long_solo,) = _finish_times(None, 1, out_tokens=200)
    loop = EventLoop()
    step = StepTimeModel(spec_from_hf_config("m", SMOLLM2), 1, CPU, LAT)
    done = {}
    insts = []
    for k, out in enumerate((50, 200)):
        inst = SimInstance(k, "m", (k,), step, 100.0, loop, lambda rid, t: None,
                           lambda i, r, t: done.__setitem__(i.instance_id, t),
                           lambda i: None, host=host)  # fmt: skip
        inst.kv_pages, inst.state = 100, InstanceState.RUNNING
        inst.add(SimRequest(k, 32, out))
        insts.append(inst)
    loop.run(1e9)
    assert done[0] == pytest.approx(2 * short_solo, rel=0.03)
    # Shared while the short one ran, then alone: about long_solo + short_solo.
    assert done[1] == pytest.approx(long_solo + short_solo, rel=0.05)
    assert not host.stepping


def test_the_gateway_share_and_loads_add_to_the_demand():
    host = SharedHost(HostParams(cores=1.0, gateway_s_per_token=0.01))
    assert host.slowdown() == 1.0

    class Busy:  # the two attributes the host reads from a stepping instance
        def __init__(self, dev: int, rate: float) -> None:
            self.gpus, self.token_rate, self._run = (dev,), rate, None

    host.set_stepping(Busy(0, 50.0), True)  # type: ignore[arg-type]
    assert host.slowdown() == pytest.approx(1.5)  # one worker + 0.01 s x 50 tokens/s
    host.set_loading(1, True)
    assert host.slowdown() == pytest.approx(2.5)
    host.set_loading(1, False)
    host.set_stepping(Busy(0, 10.0), True)  # type: ignore[arg-type]  # same worker: one process
    assert host.slowdown() == pytest.approx(1.6)


def test_other_jobs_on_the_host_stretch_a_lone_worker():
    (solo,) = _finish_times(None, 1)
    # One worker and 3 other threads on 2 cores: (1 + 3) / 2 = twice as long.
    (busy,) = _finish_times(SharedHost(HostParams(cores=2.0, background_threads=3.0)), 1)
    assert busy == pytest.approx(2 * solo, rel=1e-9)
    # Room to spare: one worker and half a thread on 2 cores run at full speed.
    (spare,) = _finish_times(SharedHost(HostParams(cores=2.0, background_threads=0.5)), 1)
    assert spare == pytest.approx(solo, rel=1e-9)
    with pytest.raises(ValueError, match="background_threads"):
        HostParams(cores=2.0, background_threads=-1.0)


# ----- the other jobs as a time series ------------------------------------------------------
def _trace(params: HostParams | None, workers: int, reqs: list[tuple[float, int, int, int]]):
    """Each (arrival, worker, input, output) request's (first token, finish) times."""
    loop = EventLoop()
    host = None if params is None else SharedHost(params, loop)
    step = StepTimeModel(spec_from_hf_config("m", SMOLLM2), 1, CPU, LAT)
    first: dict[int, float] = {}
    done: dict[int, float] = {}
    insts = []
    for k in range(workers):
        inst = SimInstance(k, "m", (k,), step, 100.0, loop, first.__setitem__,
                           lambda i, r, t: done.__setitem__(r.request_id, t),
                           lambda i: None, host=host)  # fmt: skip
        inst.kv_pages, inst.state = 100, InstanceState.RUNNING
        insts.append(inst)
    for rid, (t, w, inp, out) in enumerate(reqs):
        loop.at(t, insts[w].add, SimRequest(rid, inp, out))
    loop.run(1e9)
    return [(first[k], done[k]) for k in range(len(reqs))]


_REQS = st.lists(st.tuples(st.floats(0.0, 5.0), st.integers(0, 1), st.integers(1, 200),
                           st.integers(1, 40)), min_size=1, max_size=12)  # fmt: skip


@settings(max_examples=40, deadline=None)
@given(reqs=_REQS, level=st.floats(0.0, 4.0), cores=st.sampled_from([1.0, 2.0]),
       times=st.lists(st.floats(-1.0, 8.0), max_size=5, unique=True))  # fmt: skip
def test_a_schedule_at_one_level_is_the_constant_exactly(reqs, level, cores, times):
    reqs = sorted(reqs)
    const = _trace(HostParams(cores=cores, background_threads=level), 2, reqs)
    # The same level from the start, then "changed" to itself at random moments: no change.
    sched = tuple((t, level) for t in sorted([-2.0, *times]))
    assert _trace(HostParams(cores=cores, background_schedule=sched), 2, reqs) == const
    # Constant before the schedule starts, the same level after it.
    later = tuple((t, level) for t in sorted(times))
    assert _trace(HostParams(cores=cores, background_threads=level,
                             background_schedule=later), 2, reqs) == const  # fmt: skip
    # Levels that do change, at any moment (mid-prefill, mid-run, on a boundary): every
    # request is still served, no event falls before its time, and more other jobs than the
    # constant at every moment never make the last finish earlier.
    rising = tuple((t, level + 1.0 + k) for k, t in enumerate(sorted(times)))
    got = _trace(HostParams(cores=cores, background_threads=level,
                            background_schedule=rising), 2, reqs)  # fmt: skip
    assert all(f <= d for f, d in got)
    assert max(d for _, d in got) >= max(d for _, d in const) - 1e-9


def test_a_level_change_mid_step_re_rates_the_step_in_flight():
    step = StepTimeModel(spec_from_hf_config("m", SMOLLM2), 1, CPU, LAT)
    p = step.prefill(32, 32.0**2, 1)
    # One worker on one core; the other jobs go from none to one thread (twice as slow)
    # half-way through the prefill: half its work done alone, the other half at 2x.
    sched = ((p / 2, 1.0),)
    ((first, done),) = _trace(HostParams(cores=1.0, background_schedule=sched), 1,
                              [(0.0, 0, 32, 1)])  # fmt: skip
    assert first == done == pytest.approx(p / 2 + 2 * (p / 2), rel=1e-12)
    # A decode run of two steps, the level rising half-way through its first step and falling
    # back to none half-way through the second: the rest of each at the slowdown it meets.
    d1, d12 = (float(x) for x in step.decode_run(1, 33.0, 2))
    d2 = d12 - d1
    sched = ((p + d1 / 2, 1.0), (p + 1.5 * d1 + d2, 0.0))
    ((first, done),) = _trace(HostParams(cores=1.0, background_schedule=sched), 1,
                              [(0.0, 0, 32, 3)])  # fmt: skip
    assert first == pytest.approx(p, rel=1e-12)
    # Step 1: d1/2 alone, d1/2 at 2x; step 2: d2/2 of its work at 2x (d2 seconds), d2/2 alone.
    assert done == pytest.approx(p + 1.5 * d1 + d2 + d2 / 2, rel=1e-12)
    # Without the change the run ends at p + d1 + d2; the later request sees the level then.
    ((_, plain),) = _trace(HostParams(cores=1.0), 1, [(0.0, 0, 32, 3)])
    assert plain == pytest.approx(p + d12, rel=1e-12)
    assert HostParams(background_threads=0.5, background_schedule=sched).background_at(-1) == 0.5
    assert HostParams(background_schedule=sched).background_at(p + d1) == 1.0
    for bad in (((1.0, 0.0), (1.0, 1.0)), ((0.0, -1.0),), ((float("nan"), 1.0),)):
        with pytest.raises(ValueError, match="background_schedule"):
            HostParams(background_schedule=bad)
    with pytest.raises(ValueError, match="event loop"):
        SharedHost(HostParams(background_schedule=sched))


def test_gpu_profiles_keep_independent_devices():
    for name in ("h100-sxm-80g", "a100-80g"):
        assert load_profile(name).host_params is None
    cpu = load_profile("cpu-2core-shared")
    assert cpu.host_params is not None and cpu.host_params.cores >= 1
    assert dataclasses.replace(cpu, shared_host=False).host_params is None


# ----- the serve twin ----------------------------------------------------------------------
def _serve(tmp_path: Path, **over):
    model = tmp_path / "smollm2"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(SMOLLM2))
    (model / "model.safetensors").touch()  # the serve file checks that weights exist
    hist = tmp_path / "history.csv"
    with hist.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["timestamp_s", "model", "input_tokens", "output_tokens"])
        for t in range(36_000, 36_600, 10):
            w.writerow([t, "a", 64, 8])
            w.writerow([t + 5, "b", 32, 4])
    raw = {
        "workers": {"count": 2, "pool_mib": 1024},
        "models": [{"name": "a", "path": str(model), "max_model_len": 1024},
                   {"name": "b", "path": str(model), "max_model_len": 512}],
        "policy": "warmserve",
        "control": {"capacity_per_instance": 3, "forecast_window_s": 60.0},
        "forecast": {"history": str(hist), "service_s_per_token": 1.0},
        **over,
    }  # fmt: skip
    return parse_serve_config(raw, Path()), model


def test_serve_twin_maps_the_serve_settings(tmp_path):
    cfg, model = _serve(tmp_path)
    exp = serve_experiment(cfg, "cpu-2core-shared", {"a": model, "b": model}, slo_ttft_s=2.0,
                           slo_tpot_s=1.0, warmup_s=7.0, drain_s=60.0, duration_s=30.0)  # fmt: skip
    assert (exp.cluster.nodes, exp.cluster.gpus_per_node) == (1, 2)
    assert exp.pool_pages == 1024 // 2  # the workers' pool, in 2 MiB pages
    assert exp.control == cfg.control and exp.policies == ["warmserve"]
    assert exp.profile is not None and exp.profile.host_params is not None
    assert (exp.workload.warmup_s, exp.workload.drain_s) == (7.0, 60.0)
    assert (exp.slo.ttft_s, exp.slo.tpot_s) == (2.0, 1.0)
    models = build_models(exp)
    assert list(models) == ["a", "b"]
    assert models["a"].served.max_model_len == 1024 and models["b"].served.max_model_len == 512
    # The KV bytes a token takes, as the server computes them from the same config.json.
    assert models["a"].served.kv_bytes_per_token_per_gpu == 2 * 30 * 3 * 64 * 4

    arrival = np.array([0.5, 1.0, 1.0, 4.25])
    idx, inp, out = np.array([0, 1, 0, 1]), np.array([10, 20, 30, 40]), np.array([3, 4, 5, 6])
    wl = replay_workload(cfg, arrival, idx, inp, out, start_of_day_s=36_000.0)
    assert wl.model_names == ("a", "b")
    for got, want in ((wl.arrival_s, arrival), (wl.model_idx, idx), (wl.input_tokens, inp),
                      (wl.output_tokens, out)):  # fmt: skip
        assert np.array_equal(got, want)
    assert wl.forecast_offsets_s == {"a": 36_000.0, "b": 36_000.0}
    # The history the server seeds: model a busy 8 s of every 10 s in 10:00-10:10.
    slot = 36_000 // 60
    assert wl.histories["a"] is not None and wl.histories["b"] is not None
    assert wl.histories["a"].avg[slot] == pytest.approx(0.8)
    assert wl.histories["b"].avg[slot] == pytest.approx(0.4)

    res = run_policy(exp, "warmserve", wl)
    ttft = res.log.first_token_s - res.log.arrival_s
    assert np.all(ttft > 0)  # request k there is request k here, each served
    assert res.summary["completed"] == 4

    with pytest.raises(ValueError, match="sorted"):
        replay_workload(cfg, arrival[::-1], idx, inp, out, 0.0)


def test_serve_twin_refuses_pages_the_simulator_lacks(tmp_path):
    cfg, model = _serve(tmp_path, workers={"count": 2, "pool_mib": 1024, "page_mib": 4})
    with pytest.raises(ExperimentError, match="page_mib 4"):
        serve_experiment(cfg, "cpu-2core-shared", {"a": model, "b": model}, slo_ttft_s=2.0,
                         slo_tpot_s=1.0, warmup_s=1.0, drain_s=1.0, duration_s=1.0)  # fmt: skip


def test_a_host_section_goes_with_shared_host_only():
    import yaml

    from warmserve.profiles import ProfileError, parse_profile, profile_yaml

    cpu = load_profile("cpu-2core-shared")
    raw = yaml.safe_load(profile_yaml(cpu))
    assert parse_profile(raw, "t").host == cpu.host
    with pytest.raises(ProfileError, match="needs a host: section"):
        parse_profile({k: v for k, v in raw.items() if k != "host"}, "t")
    with pytest.raises(ProfileError, match="needs shared_host: true"):
        parse_profile({**raw, "shared_host": False}, "t")
    with pytest.raises(ProfileError, match="cores must be > 0"):
        parse_profile({**raw, "host": {**raw["host"], "cores": 0}}, "t")


def test_serve_twin_replays_a_schedule_of_other_jobs(tmp_path):
    cfg, model = _serve(tmp_path)
    exp = serve_experiment(cfg, "cpu-2core-shared", {"a": model, "b": model}, slo_ttft_s=2.0,
                           slo_tpot_s=1.0, warmup_s=7.0, drain_s=60.0, duration_s=30.0)  # fmt: skip
    assert exp.profile is not None
    arrival = np.array([0.5, 1.0, 1.0, 4.25, 9.0, 9.5])
    idx = np.array([0, 1, 0, 1, 0, 1])
    wl = replay_workload(cfg, arrival, idx, np.full(6, 40), np.full(6, 6), start_of_day_s=36_000.0)

    def ttft(**host) -> np.ndarray:
        prof = dataclasses.replace(exp.profile,
                                   host=dataclasses.replace(exp.profile.host, **host))  # fmt: skip
        res = run_policy(dataclasses.replace(exp, profile=prof), "warmserve", wl)
        return res.log.first_token_s - res.log.arrival_s

    const = ttft(background_threads=2.0)
    # From before the warm-up (the simulator starts at -warmup_s), one level: the constant.
    assert np.array_equal(ttft(background_schedule=((-7.0, 2.0), (3.0, 2.0))), const)
    # A burst of other jobs over the last two requests only: they wait longer, the rest not.
    burst = ttft(background_threads=2.0, background_schedule=((8.5, 12.0), (20.0, 2.0)))
    assert np.array_equal(burst[:4], const[:4]) and np.all(burst[4:] > const[4:])
    # The schedule is no profile key: the profile's YAML is the same with or without one.
    from warmserve.profiles import profile_yaml

    with_sched = dataclasses.replace(exp.profile.host, background_schedule=((0.0, 1.0),))
    assert profile_yaml(dataclasses.replace(exp.profile, host=with_sched)) == profile_yaml(
        exp.profile)  # fmt: skip
