"""Sweeps: each policy at several values of one setting (a request rate, or any `workload:`,
`costs:`, `control:`, `latency:` or `slo:` value), and the highest rate that meets the SLO."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

from warmserve.experiment import Experiment, ExperimentError
from warmserve.sim.overrides import WORKLOAD_SHORT, canonical_key, parse_scalar, set_value
from warmserve.sim.runner import PolicyResult, make_workload, run_policy
from warmserve.workload.builders import Workload

SWEEP_KEYS = WORKLOAD_SHORT  # the short keys; dotted keys name any other setting
SLO_TARGET = 0.9  # attainment a rate must reach to count as sustained
SLO_TARGETS = (0.9, 0.99)  # max_rps_at_slo is reported at each
# Settings the workload (arrivals, forecast history) is built from: a sweep over any other
# setting replays the same workload at every point.
_WORKLOAD_PREFIXES = ("workload.", "seed", "latency.", "control.forecast_")

RunFn = Callable[[Experiment, str, Workload], PolicyResult]


def parse_sweep(text: str) -> tuple[str, list[Any]]:
    """`rps=0.5,1,2` -> ("rps", [0.5, 1.0, 2.0]); `costs.serverless_engine_init_s=2,10` ->
    that key with [2, 10]. Numbers are sorted and deduplicated; other values keep their
    order. A dotted key is checked against the experiment by `run_sweep`."""
    key, sep, values = text.partition("=")
    key = key.strip()
    if not sep or not (key in SWEEP_KEYS or "." in key):
        raise ExperimentError(
            f"--sweep: expected KEY=V1,V2,... with KEY in {', '.join(SWEEP_KEYS)} or a dotted "
            "setting (e.g. costs.serverless_engine_init_s, control.keep_alive_s)"
        )
    items = [v.strip() for v in values.split(",") if v.strip()]
    if key in SWEEP_KEYS:
        try:
            points: list[Any] = sorted({float(v) for v in items})
        except ValueError:
            raise ExperimentError(f"--sweep: {values!r} is not a list of numbers") from None
        if not points or min(points) <= 0:
            raise ExperimentError("--sweep: give at least one positive value")
        return key, points
    parsed = [parse_scalar(v) for v in items]
    if not parsed:
        raise ExperimentError("--sweep: give at least one value")
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in parsed):
        parsed = sorted(set(parsed))
    else:
        parsed = list(dict.fromkeys(parsed))
    return key, parsed


def point_experiment(exp: Experiment, key: str, value: Any) -> Experiment:
    return set_value(exp, canonical_key(key), value, "--sweep")


def max_rate_at_slo(
    points: Sequence[tuple[float, float | None]], target: float = SLO_TARGET
) -> float | None:
    """The highest swept rate whose SLO attainment is >= target, or None.

    Not "every lower rate too": with scale-to-zero, attainment can be lowest at the lightest
    load (every sparse request pays an activation). No interpolation: the answer is one of the
    rates actually simulated.
    """
    ok = [rate for rate, attainment in points if attainment is not None and attainment >= target]
    return max(ok) if ok else None


def is_censored(points: Sequence[tuple[float, float | None]], target: float = SLO_TARGET) -> bool:
    """True when the highest rate swept still meets the target: the policy's true maximum
    lies beyond the sweep, so a ratio of maxima taken from it is only a bound."""
    if not points:
        return False
    top = max(points, key=lambda p: p[0])
    return top[1] is not None and top[1] >= target


def knee(
    points: Sequence[tuple[float, float | None]], target: float = SLO_TARGET
) -> tuple[float, float] | None:
    """(the highest passing rate, the next swept rate above it, which fails), or None when
    no rate passes or the sweep is censored: where a finer grid would move the answer."""
    best = max_rate_at_slo(points, target)
    if best is None:
        return None
    above = sorted(rate for rate, _ in points if rate > best)
    return (best, above[0]) if above else None


def run_sweep(
    exp: Experiment,
    key: str,
    values: Sequence[Any],
    run: RunFn | None = None,
) -> dict[str, list[tuple[Any, PolicyResult]]]:
    """Every policy at every value of `key`. The workload is built once per value when the key
    shapes it (workload, seed, latency, forecast settings), else once for the whole sweep."""
    run = run or (lambda e, p, wl: run_policy(e, p, wl))
    out: dict[str, list[tuple[Any, PolicyResult]]] = {p: [] for p in exp.policies}
    shared: Workload | None = None
    rebuild = canonical_key(key).startswith(_WORKLOAD_PREFIXES)
    for value in values:
        point = point_experiment(exp, key, value)
        if rebuild or shared is None:
            wl = make_workload(point)
            shared = None if rebuild else wl
        else:
            wl = shared
        for policy in exp.policies:
            out[policy].append((value, run(point, policy, wl)))
    return out


def refine_knees(
    exp: Experiment,
    swept: dict[str, list[tuple[Any, PolicyResult]]],
    steps: int,
    run: RunFn | None = None,
    target: float = SLO_TARGET,
) -> None:
    """Adaptive refinement of a rate sweep: for each policy, `steps` bisections between its
    highest passing rate and the next swept rate (which fails); the new points join its curve
    (in rate order), so max_rps_at_slo moves to the finer answer."""
    run = run or (lambda e, p, wl: run_policy(e, p, wl))
    for policy, pts in swept.items():
        for _ in range(steps):
            k = knee([(v, r.summary["slo_attainment"]) for v, r in pts], target)
            if k is None:
                break
            mid = round((k[0] + k[1]) / 2, 6)
            if mid in (k[0], k[1]):
                break
            point = point_experiment(exp, "rps", mid)
            single = dataclasses.replace(point, policies=[policy])
            pts.append((mid, run(single, policy, make_workload(single))))
            pts.sort(key=lambda p: p[0])


def sweep_summary(
    key: str, base_value: Any, results: list[tuple[Any, PolicyResult]]
) -> dict[str, Any]:
    """The contract keys at the base point (or the first), the curve, and, for a rate sweep,
    the max rate at SLO at each target with a flag when the sweep is censored there."""
    at = next((r for v, r in results if v == base_value), results[0][1])
    curve = [
        {key: v, **{k: x for k, x in r.summary.items() if k != "per_model"}} for v, r in results
    ]
    summary = dict(at.summary)
    summary["summary_at"] = {key: next(v for v, r in results if r is at)}
    summary["sweep"] = curve
    if key in ("rps", "workload.rps"):
        pts = [(float(v), r.summary["slo_attainment"]) for v, r in results]
        for target in SLO_TARGETS:
            suffix = "" if target == SLO_TARGET else f"_{round(target * 100)}"
            summary[f"max_rps_at_slo{suffix}"] = max_rate_at_slo(pts, target)
            summary[f"max_rps_at_slo{suffix}_censored"] = is_censored(pts, target)
    return summary
