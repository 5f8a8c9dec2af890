"""Turn calibration measurements into a device profile, a short report and a fit plot."""

from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path

from warmserve.calibration.fit import StepFit, fit_bandwidth, fit_step_model, predict
from warmserve.calibration.measure import Measurements
from warmserve.hardware import GpuSpec
from warmserve.profiles import DeviceProfile, load_profile, profile_yaml
from warmserve.sim.costs import StartupCosts
from warmserve.sim.host import HostParams

# The gateway's host CPU per streamed token is not measured by calibrate (it needs the whole
# server and a client): benchmarks/fidelity.py measures it (this process's CPU time over a
# replay, divided by the tokens streamed: gateway, control plane and bench client) and the
# shipped CPU profile holds the figure it printed on the 2-core development machine.
GATEWAY_S_PER_TOKEN = 0.0032


def build_profile(meas: Measurements, name: str) -> tuple[DeviceProfile, StepFit, dict[str, str]]:
    """The profile, the step-time fit and a comment (its source) for every number."""
    cpu = meas.device == "cpu"
    link = meas.host_to_device_bandwidth
    loads = [(t.weights_bytes, statistics.median(t.load_cached_s)) for t in meas.models]
    load_bw, load_fixed = fit_bandwidth([b for b, _ in loads], [s for _, s in loads])
    disk = [(t.weights_bytes, statistics.median(t.load_disk_s)) for t in meas.models
            if t.load_disk_s]  # fmt: skip
    disk_bw = fit_bandwidth([b for b, _ in disk], [s for _, s in disk])[0] if disk else None
    # Prewarm loads: on a CPU the "device" is the host, so a prewarm is the checkpoint copied
    # from the page cache into the pool; on a GPU it crosses the host link.
    h2d = load_bw if cpu or link is None else link
    device = GpuSpec(
        name=name,
        peak_flops=meas.peak_flops,
        hbm_bandwidth=meas.memory_bandwidth,
        memory_bytes=meas.memory_bytes,
        host_to_device_bandwidth=h2d,
        # No NVLink on a CPU: TP > 1 is not served there; the memory bandwidth stands in.
        nvlink_bandwidth=meas.memory_bandwidth
        if cpu
        else load_profile("h100-sxm-80g").device.nvlink_bandwidth,
    )
    fit = fit_step_model(meas.steps, meas.specs, device)
    smallest = min(meas.models, key=lambda t: t.weights_bytes)
    act = statistics.median(smallest.activate_s)
    kv_map_s = smallest.kv_bytes / meas.kv_map_bandwidth
    start = statistics.median(meas.process_start_s)
    ref = StartupCosts()  # the H100 profile's values, for what is not measured here
    costs = dataclasses.replace(
        ref,
        engine_attach_s=max(act - kv_map_s, 0.0),
        remap_bandwidth=meas.kv_map_bandwidth,
        kv_initial_map_bytes=float(smallest.kv_bytes),
        ssd_bandwidth=disk_bw if disk_bw is not None else ref.ssd_bandwidth,
        # A vanilla start: a fresh worker process, then the same load into the pool.
        cold_engine_init_s=start + load_fixed,
        vanilla_load_bandwidth=load_bw,
        # Not measured concurrently: concurrent loads share one load's rate.
        host_node_bandwidth=h2d,
    )
    # Four significant digits: the measurements are not better than that.
    device, costs = _rounded(device), _rounded(costs)
    latency = _rounded(fit.latency)
    cores = meas.host_cores or 1
    host = HostParams(float(cores), meas.threads, GATEWAY_S_PER_TOKEN)
    profile = DeviceProfile(name, device, latency, costs, shared_host=cpu,
                            description=f"{meas.device_name}, {meas.threads} torch thread(s), "
                            "measured by warmserve calibrate", host=host)  # fmt: skip
    acts = ", ".join(f"{t.name} {statistics.median(t.activate_s) * 1e3:.0f} ms"
                     for t in meas.models)  # fmt: skip
    loads_txt = ", ".join(f"{t.name} {t.weights_bytes / 1e6:.0f} MB in {s:.2f} s"
                          for t, (_, s) in zip(meas.models, loads, strict=True))  # fmt: skip
    dtype = "fp32" if cpu else "bf16"
    notes = {
        "device.peak_flops": f"measured: best {dtype} matmul FLOP/s",
        "device.hbm_bandwidth": "measured: best large copy, bytes read + written per second",
        "device.memory_bytes": "the worker's page pool (workers.pool_mib)"
        if cpu
        else "measured: the device's total memory",
        "device.host_to_device_bandwidth": (
            f"measured: prewarm loads from the page cache ({loads_txt})"
            if cpu or link is None
            else "measured: pinned host -> device copy of 1 GiB"
        ),
        "device.nvlink_bandwidth": "no interconnect: TP > 1 is not served on a CPU; set to the "
        "memory bandwidth"
        if cpu
        else "not measured: the H100 profile's NVLink figure",
        "latency.flops_efficiency": "fitted (step times, see the report)",
        "latency.bandwidth_efficiency": "fitted",
        "latency.step_overhead_s": "fitted",
        "latency.layer_overhead_s": "fitted"
        if fit.layer_term
        else "not separable with one layer count: merged into step_overhead_s",
        "latency.allreduce_latency_s": "not measured (TP 1 only): the H100 profile's",
        "latency.seq_overhead_s": "fitted",
        "costs.engine_attach_s": f"measured: activation ({acts}) less its KV mapping",
        "costs.remap_bandwidth": "measured: mapping fresh KV pages into a slot",
        "costs.kv_initial_map_bytes": "measured: the KV an activation maps (the pool's free pages)",
        "costs.weights_source": "prewarm loads read the host's page cache",
        "costs.ssd_bandwidth": "measured: loads after dropping the page cache"
        if disk_bw
        else "not measured (needs --drop-caches, as root): the H100 profile's",
        "costs.cold_engine_init_s": f"measured: worker process start {start:.2f} s + load "
        f"fixed cost {load_fixed:.2f} s",
        "costs.vanilla_load_bandwidth": "measured: as host_to_device_bandwidth (the same "
        "worker load)",
        "costs.serverless_engine_init_s": "not measured (ServerlessLLM baseline): the H100 "
        "profile's",
        "costs.serverless_tuned_engine_init_s": "not measured (serverlessllm-tuned): the H100 "
        "profile's",
        "costs.host_node_bandwidth": "assumption: concurrent loads share one load's measured "
        "rate (not measured concurrently)",
        "costs.serverless_ssd_bandwidth": "not measured: the H100 profile's",
        "costs.serverless_dram_cache_bytes": "not measured: the H100 profile's",
        "host.cores": "measured: the CPUs this process may run on"
        if meas.host_cores
        else "not measured: assumed 1",
        "host.threads_per_device": "the torch threads calibrate ran with (--threads)",
        "host.gateway_s_per_token": "not measured by calibrate: benchmarks/fidelity.py's figure "
        "on the 2-core development machine (rerun it and set yours)",
    }
    return profile, fit, notes


def _rounded(obj):
    return dataclasses.replace(obj, **{
        f.name: float(f"{getattr(obj, f.name):.4g}") for f in dataclasses.fields(obj)
        if isinstance(getattr(obj, f.name), float)})  # fmt: skip


def write_outputs(meas: Measurements, name: str, out: Path, header: str) -> tuple[
    DeviceProfile, StepFit, Path
]:  # fmt: skip
    """Write the profile to `out`, and report.md, fit.png and measurements.json beside it in
    `<out stem>-report/`. Returns the profile, the fit and the report folder."""
    profile, fit, notes = build_profile(meas, name)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(profile_yaml(profile, notes, header))
    load_profile(str(out.resolve()))  # what was written reads back
    folder = out.parent / f"{out.stem}-report"
    folder.mkdir(exist_ok=True)
    (folder / "measurements.json").write_text(json.dumps(_as_json(meas), indent=1))
    _plot(meas, profile, folder / "fit.png")
    (folder / "report.md").write_text(report_text(meas, profile, fit, out))
    return profile, fit, folder


def _as_json(meas: Measurements) -> dict:
    d = dataclasses.asdict(meas)
    d["specs"] = {k: dataclasses.asdict(v) for k, v in meas.specs.items()}
    return d


def fit_table(meas: Measurements, profile: DeviceProfile) -> list[tuple[str, float, float]]:
    rows = []
    for s in meas.steps:
        model = predict(s, meas.specs[s.model], profile.device, profile.latency)
        label = f"{s.model} {s.kind} b={s.batch} " + (
            f"tokens={s.tokens}" if s.kind == "prefill" else f"ctx={s.ctx / s.batch:.0f}"
        )
        rows.append((label, s.seconds, model))
    return rows


def report_text(meas: Measurements, profile: DeviceProfile, fit: StepFit, out: Path) -> str:
    lat = profile.latency
    lines = [
        f"# Calibration of {profile.name}",
        "",
        f"Device: {meas.device_name} ({meas.device}), {meas.threads} torch thread(s). "
        f"Profile: `{out.name}`.",
        "",
        "## Step-time fit",
        "",
        f"Mean |model − measured| / measured: {fit.mean_abs_rel_error:.1%}; worst "
        f"{fit.max_abs_rel_error:.1%} over {len(meas.steps)} steps.",
        f"Achieved FLOP/s {fit.flops:.3g} ({lat.flops_efficiency:.2f} of the measured peak "
        f"{profile.device.peak_flops:.3g}); bandwidth {fit.bandwidth:.3g} B/s "
        f"({lat.bandwidth_efficiency:.2f} of {profile.device.hbm_bandwidth:.3g}); "
        f"overheads {lat.step_overhead_s * 1e3:.2f} ms a step + "
        f"{lat.layer_overhead_s * 1e6:.1f} µs a layer.",
        "",
        "![measured vs model](fit.png)",
        "",
        "| step | measured ms | model ms | error |",
        "|---|---|---|---|",
    ]
    for label, real, model in fit_table(meas, profile):
        lines.append(f"| {label} | {real * 1e3:.1f} | {model * 1e3:.1f} | "
                     f"{model / real - 1:+.1%} |")  # fmt: skip
    lines += ["", "## Start-up", "", "| model | weights MB | load (page cache) s | "
              "load (disk) s | activate ms |", "|---|---|---|---|---|"]  # fmt: skip
    for t in meas.models:
        disk = f"{statistics.median(t.load_disk_s):.2f}" if t.load_disk_s else "not measured"
        lines.append(f"| {t.name} | {t.weights_bytes / 1e6:.0f} | "
                     f"{statistics.median(t.load_cached_s):.2f} | {disk} | "
                     f"{statistics.median(t.activate_s) * 1e3:.0f} |")  # fmt: skip
    starts = ", ".join(f"{s:.2f}" for s in meas.process_start_s)
    lines += ["", f"Worker process start (spawn to ready): {starts} s. KV mapping "
              f"{meas.kv_map_bandwidth / 1e9:.2f} GB/s."]  # fmt: skip
    if meas.host_to_device_bandwidth is not None:
        lines.append(f"Pinned host -> device: {meas.host_to_device_bandwidth / 1e9:.1f} GB/s.")
    return "\n".join(lines) + "\n"


def _plot(meas: Measurements, profile: DeviceProfile, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 5))
    for kind, marker in (("prefill", "o"), ("decode", "s")):
        pts = [(s.seconds * 1e3,
                predict(s, meas.specs[s.model], profile.device, profile.latency) * 1e3)
               for s in meas.steps if s.kind == kind]  # fmt: skip
        if pts:
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=kind)
    lo = min(s.seconds for s in meas.steps) * 1e3 * 0.8
    hi = max(s.seconds for s in meas.steps) * 1e3 * 1.25
    ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="model = measured")
    ax.set(xscale="log", yscale="log", xlabel="measured step (ms)", ylabel="model step (ms)",
           title=f"{profile.name}: step-time fit")  # fmt: skip
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
