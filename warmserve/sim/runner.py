"""Runs one policy of an experiment: workload → event loop → SimCluster ↔ Controller → metrics."""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from warmserve.control.api import RequestInfo, ServedModel
from warmserve.control.forecaster import Forecaster, OracleForecaster, make_forecaster
from warmserve.control.registry import get_policy
from warmserve.experiment import Experiment
from warmserve.hardware import pages_for
from warmserve.sim.cluster import SimCluster, SimModel
from warmserve.sim.host_cache import NodeCheckpointCache
from warmserve.sim.instance import SimRequest
from warmserve.sim.latency import StepTimeModel
from warmserve.sim.loop import EventLoop
from warmserve.traces import load_csv_trace
from warmserve.types import ModelName
from warmserve.workload.builders import (
    AzureSpec,
    ServeGenSpec,
    Workload,
    build_azure,
    build_servegen,
    from_trace,
)
from warmserve.workload.concurrency import concurrency_windows
from warmserve.workload.records import RequestLog, RequestRow, summarize_requests
from warmserve.workload.trace_name import parse_trace_name


@dataclass(frozen=True, slots=True)
class MemoryTimeline:
    """Pages per GPU by use, sampled over time: arrays of shape (samples, gpus)."""

    time_s: np.ndarray
    free: np.ndarray
    prewarm: np.ndarray
    weights: np.ndarray
    kv: np.ndarray


@dataclass(frozen=True, slots=True)
class PolicyResult:
    policy: str
    summary: dict[str, Any]
    log: RequestLog
    memory: MemoryTimeline
    num_events: int
    requests: tuple[RequestRow, ...] = ()  # one a request, each with its one outcome


class ConservationError(RuntimeError):
    """An arrived request has no outcome, or more than one: the books lost or doubled it."""


def build_models(exp: Experiment) -> dict[str, SimModel]:
    gpu = exp.gpu
    costs = exp.costs
    bw = gpu.host_to_device_bandwidth if costs.weights_source == "host" else costs.ssd_bandwidth
    # Alone on its node a load still gets no more than the node's host bandwidth.
    node = float("inf") if costs.host_node_bandwidth is None else costs.host_node_bandwidth
    out = {}
    for name, spec, entry in exp.served_models():
        shard = spec.shard_bytes(entry.tp)
        served = ServedModel(
            name=ModelName(name),
            tp=entry.tp,
            pages_per_gpu=pages_for(shard),
            shard_bytes=shard,
            kv_bytes_per_token_per_gpu=spec.kv_bytes_per_token_per_gpu(entry.tp),
            max_model_len=spec.max_model_len,
            priority=entry.priority,
        )
        out[name] = SimModel(
            served=served,
            step_model=StepTimeModel(spec, entry.tp, gpu, exp.latency),
            prewarm_load_s=shard / min(bw, node),
            vanilla_start_s=costs.cold_engine_init_s
            + shard / min(costs.vanilla_load_bandwidth, node),
            load_bandwidth=bw,
        )
    return out


def host_caches(exp: Experiment) -> list[NodeCheckpointCache]:
    c = exp.costs
    return [
        NodeCheckpointCache(
            c.serverless_dram_cache_bytes,
            c.serverless_ssd_bandwidth,
            exp.gpu.host_to_device_bandwidth,
        )
        for _ in range(exp.cluster.nodes)
    ]


def ideal_windows(
    exp: Experiment, models: dict[str, SimModel], wl: Workload
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per model, the (mean, peak) concurrency of each forecast window if every request ran
    for its isolated service time: what a perfect forecaster would predict."""
    window = exp.control.forecast_window_s
    span = (float(wl.arrival_s[-1]) if wl.num_requests else 0.0) + window
    out = {}
    for k, name in enumerate(wl.model_names):
        sel = wl.model_idx == k
        t = wl.arrival_s[sel]
        dur = models[name].step_model.isolated_service_s(
            wl.input_tokens[sel], wl.output_tokens[sel]
        )
        out[name] = concurrency_windows(t, t + dur, span, window)
    return out


def slo_bounds(
    exp: Experiment, models: dict[str, SimModel], wl: Workload
) -> tuple[np.ndarray, np.ndarray]:
    slo = exp.slo
    n = wl.num_requests
    ttft = np.empty(n)
    tpot = np.empty(n)
    for k, name in enumerate(wl.model_names):
        sel = wl.model_idx == k
        step = models[name].step_model
        # Python ints (the values int() of each element gives), not a numpy scalar apiece.
        inp = list(map(int, wl.input_tokens[sel].tolist()))
        out = list(map(int, wl.output_tokens[sel].tolist()))
        if slo.ttft_s is not None:
            ttft[sel] = slo.ttft_s
        else:
            ttft[sel] = slo.ttft_scale * np.array([step.isolated_ttft(i) for i in inp])
        if slo.tpot_s is not None:
            tpot[sel] = slo.tpot_s
        else:
            tpot[sel] = slo.tpot_scale * np.array(
                [step.isolated_tpot(i, o) for i, o in zip(inp, out, strict=True)]
            )
    return ttft, tpot


def run_policy(
    exp: Experiment,
    policy_name: str,
    wl: Workload,
    *,
    check_invariants: bool = False,
    progress: Callable[[float], None] | None = None,
) -> PolicyResult:
    policy = get_policy(policy_name)
    models = build_models(exp)
    cfg = exp.control
    # A set-up period before the first arrival: prewarming (and static deployments) start from
    # an idle cluster, as the reference waits ~60 s after start-up before sending load.
    loop = EventLoop(start_s=-exp.workload.warmup_s)
    if policy.needs_future:
        forecaster: Forecaster = OracleForecaster(
            cfg.forecast_window_s, ideal_windows(exp, models, wl)
        )
    else:
        forecaster = make_forecaster(cfg)
    for name in wl.model_names:
        forecaster.add_model(name, wl.forecast_offsets_s[name], wl.histories[name])
    controller = policy.build(cfg, [m.served for m in models.values()], forecaster)
    ttft_slo, tpot_slo = slo_bounds(exp, models, wl)
    log = RequestLog.create(wl.arrival_s, wl.model_idx, wl.output_tokens, ttft_slo, tpot_slo)
    remaining = [wl.num_requests]
    done = bytearray(wl.num_requests)  # finished yet: a byte, not a NaN test of an array read

    def first_token(rid: int, t: float) -> None:
        log.first_token_s[rid] = t

    def finished(rid: int, t: float) -> None:
        if done[rid]:
            raise ConservationError(f"request {rid} finished twice")
        done[rid] = 1
        log.finish_s[rid] = t
        remaining[0] -= 1
        controller.on_request_done(t, rid, cluster)

    cluster = SimCluster(
        loop,
        exp.cluster.nodes,
        exp.cluster.gpus_per_node,
        exp.pool_pages,
        models,
        exp.costs,
        host_caches(exp) if policy.spec.host_checkpoint_cache else None,
        first_token,
        finished,
        getattr(exp.costs, policy.engine_init_cost),
        exp.profile.host_params if exp.profile is not None else None,
    )
    cluster.on_kv_pressure = lambda inst_id: controller.on_kv_pressure(loop.now(), inst_id, cluster)
    names = wl.model_names
    # Python lists, read once per request: the same values as indexing the arrays, faster.
    arrival = list(map(float, wl.arrival_s.tolist()))
    model_of = [ModelName(names[i]) for i in wl.model_idx.tolist()]
    inputs = list(map(int, wl.input_tokens.tolist()))
    outputs = list(map(int, wl.output_tokens.tolist()))
    last = wl.num_requests - 1
    requests = cluster.requests

    def arrive(k: int) -> None:
        req = SimRequest(k, inputs[k], outputs[k])
        requests[k] = req
        now = loop.now()
        controller.on_request(now, RequestInfo(k, model_of[k], now, req.input_tokens,
                                               req.output_tokens), cluster)  # fmt: skip
        if k < last:
            loop.at(arrival[k + 1], arrive, k + 1)

    last_arrival_s = arrival[-1] if wl.num_requests else 0.0
    end_s = last_arrival_s + exp.workload.drain_s
    sample_every = max(1, round(max(end_s, 1.0) / 2000 / cfg.tick_s))
    samples: list[tuple[float, list[int], list[int], list[int], list[int]]] = []
    ticks = [0]

    def tick() -> None:
        now = loop.now()
        controller.tick(now, cluster)
        if ticks[0] % sample_every == 0:
            g = cluster.books.devices
            samples.append((now, [x.free_pages for x in g], [x.prewarm_pages for x in g],
                            [x.weights_pages for x in g], [x.kv_pages for x in g]))  # fmt: skip
        ticks[0] += 1
        if remaining[0] > 0 or now < last_arrival_s:
            loop.at(now + cfg.tick_s, tick)

    if wl.num_requests:
        loop.at(arrival[0], arrive, 0)
    loop.at(-exp.workload.warmup_s, tick)
    loop.run(
        end_s, after_event=cluster.check_invariants if check_invariants else None, progress=progress
    )

    outcomes = request_outcomes(log, controller.queued_request_ids(), cluster)
    forecast_errors = [e for m in names for e in forecaster.peak_rel_errors(m)]
    starts = [s.path for s in cluster.starts]
    summary = summarize_requests(
        log, np.ones(wl.num_requests, dtype=bool), starts, forecast_errors, exp.slo.failed_ttft_s
    )
    per_model = {}
    for k, name in enumerate(names):
        per_model[name] = summarize_requests(
            log,
            wl.model_idx == k,
            [s.path for s in cluster.starts if s.model == name],
            forecaster.peak_rel_errors(name),
            exp.slo.failed_ttft_s,
        )
    summary["per_model"] = per_model
    add_model_tails(summary, log, wl)
    counters = getattr(controller, "counters", None)  # the WarmServe family counts
    if counters is not None:
        control = dataclasses.asdict(counters)
        control["kv_set_per_min"] = counters.kv_set / (exp.workload.duration_s / 60.0)
        summary["control"] = control
    memory = MemoryTimeline(*(np.array([s[i] for s in samples]) for i in range(5)))
    rows = tuple(request_rows(policy_name, wl, log, outcomes))
    return PolicyResult(policy_name, summary, log, memory, loop.num_events, rows)


def add_model_tails(summary: dict[str, Any], log: RequestLog, wl: Workload) -> None:
    """Per-model tails beside the pooled figures: each model's P99 TTFT, its never-served
    requests (no first token by the end), and a flag on every model with a failed or
    never-served request, whatever the pooled attainment says (a model with 1 % of the
    requests can fail them all and the pool still meet a 90 % target)."""
    per_model = summary["per_model"]
    no_token = np.isnan(log.first_token_s)
    for k, name in enumerate(wl.model_names):
        s = per_model[name]
        s["never_served"] = int(np.count_nonzero(no_token & (wl.model_idx == k)))
        s["flagged"] = bool(s["failed"] or s["never_served"])
    summary["never_served"] = sum(s["never_served"] for s in per_model.values())
    summary["ttft_p99_by_model"] = {n: s["ttft_p99_s"] for n, s in per_model.items()}
    worst = max(per_model, key=lambda n: per_model[n]["ttft_p99_s"] or 0.0, default=None)
    summary["worst_model"] = worst
    summary["worst_model_ttft_p99_s"] = per_model[worst]["ttft_p99_s"] if worst else None
    summary["flagged_models"] = [n for n, s in per_model.items() if s["flagged"]]


def request_rows(
    policy: str, wl: Workload, log: RequestLog, outcomes: tuple[str, ...]
) -> Iterator[RequestRow]:
    """One row per request, in the columns `warmserve bench` writes."""
    # Lists, not per-element array reads: the same values, for every request of a long run.
    ttft = (log.first_token_s - log.arrival_s).tolist()
    latency = (log.finish_s - log.arrival_s).tolist()
    arrival = list(map(float, log.arrival_s.tolist()))
    model = [wl.model_names[i] for i in wl.model_idx.tolist()]
    inputs = list(map(int, wl.input_tokens.tolist()))
    outputs = list(map(int, wl.output_tokens.tolist()))
    # Column by column, then one map over them: the same rows as one call per request.
    n = len(outcomes)
    done = [not o for o in outcomes]
    return map(
        RequestRow,
        arrival[:n],
        model[:n],
        inputs[:n],
        outputs[:n],
        [None if math.isnan(t) else t for t in ttft[:n]],
        [x if d else None for x, d in zip(latency, done, strict=False)],
        [x if d else 0 for x, d in zip(outputs, done, strict=False)],
        outcomes,
        itertools.repeat(policy, n),
    )


def request_outcomes(log: RequestLog, queued: set[int], cluster: SimCluster) -> tuple[str, ...]:
    """Each request's one outcome, counted from where it is, not as arrived - completed: it
    finished, or it still waits in the controller's queue, or it is still on an instance."""
    on_instance: dict[int, list[str]] = {}
    for inst in cluster.books.instances.values():
        for rid in inst.requests:
            where = f"unfinished: on instance {inst.instance_id} ({inst.state}) at the end"
            on_instance.setdefault(rid, []).append(where)
    out = []
    for k, unfinished in enumerate(np.isnan(log.finish_s).tolist()):
        found = [] if unfinished else [""]
        if k in queued:
            found.append("queued: no instance took it by the end")
        found += on_instance.get(k, [])
        if len(found) != 1:
            what = "no outcome" if not found else f"{len(found)} outcomes {found}"
            raise ConservationError(f"{cluster.__class__.__name__}: request {k} has {what}")
        out.append(found[0])
    return tuple(out)


def make_workload(exp: Experiment, models: dict[str, SimModel] | None = None) -> Workload:
    """The experiment's workload: the Azure construction or the user's CSV trace."""
    models = models or build_models(exp)
    served = exp.served_models()
    names = [n for n, _, _ in served]
    lens = [s.max_model_len for _, s, _ in served]
    # Each request's isolated service time: how forecast history turns arrivals into load.
    times = [models[n].step_model.isolated_service_s for n in names]
    w = exp.workload
    trace = parse_trace_name(w.trace)
    if trace is None:  # parse_experiment rejects these
        raise ValueError(f"workload.trace: {w.trace!r} names no trace")
    if trace.kind == "servegen":
        sg = ServeGenSpec(
            model=trace.arg,
            rps=w.rps,
            day=w.days[0] if w.days else 13,
            start_hour=w.start_hour,
            duration_s=w.duration_s,
            max_input_tokens=w.max_input_tokens,
            min_output_tokens=w.min_output_tokens,
            max_output_tokens=w.max_output_tokens,
        )
        return build_servegen(sg, names, lens, times, exp.control.forecast_window_s, exp.seed)
    if trace.kind == "csv":
        csv = load_csv_trace(exp.base_dir / trace.arg)
        return from_trace(
            names, csv.arrival_s, csv.model, csv.input_tokens, csv.output_tokens, w.duration_s
        )
    spec = AzureSpec(
        service=trace.arg,
        rps=w.rps,
        alpha=w.alpha,
        start_hour=w.start_hour,
        days=w.days,
        duration_s=w.duration_s,
        max_input_tokens=w.max_input_tokens,
        min_output_tokens=w.min_output_tokens,
        max_output_tokens=w.max_output_tokens,
        burstiness_cv=w.burstiness_cv,
    )
    window, cycle = exp.control.forecast_window_s, exp.control.forecast_cycle
    return build_azure(spec, names, lens, times, window, cycle, exp.seed)
