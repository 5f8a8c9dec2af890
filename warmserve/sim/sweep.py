"""Rate sweeps: each policy at several request rates, and the highest rate that meets the SLO."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

from warmserve.experiment import Experiment, ExperimentError
from warmserve.sim.runner import PolicyResult, make_workload, run_policy

SWEEP_KEYS = ("rps", "alpha", "burstiness_cv")
SLO_TARGET = 0.9  # attainment a rate must reach to count as sustained


def parse_sweep(text: str) -> tuple[str, list[float]]:
    """`rps=0.5,1,2` -> ("rps", [0.5, 1.0, 2.0])."""
    key, sep, values = text.partition("=")
    key = key.strip()
    if not sep or key not in SWEEP_KEYS:
        raise ExperimentError(
            f"--sweep: expected KEY=V1,V2,... with KEY in {', '.join(SWEEP_KEYS)}"
        )
    try:
        points = sorted({float(v) for v in values.split(",") if v.strip()})
    except ValueError:
        raise ExperimentError(f"--sweep: {values!r} is not a list of numbers") from None
    if not points or min(points) <= 0:
        raise ExperimentError("--sweep: give at least one positive value")
    return key, points


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


def run_sweep(
    exp: Experiment,
    key: str,
    values: Sequence[float],
    run: Callable[[Experiment, str, Any], PolicyResult] | None = None,
) -> dict[str, list[tuple[float, PolicyResult]]]:
    """Every policy at every value of `key` (a workload setting); workloads built once per value."""
    run = run or (lambda e, p, wl: run_policy(e, p, wl))
    out: dict[str, list[tuple[float, PolicyResult]]] = {p: [] for p in exp.policies}
    for value in values:
        point = dataclasses.replace(exp, workload=dataclasses.replace(exp.workload, **{key: value}))
        wl = make_workload(point)
        for policy in exp.policies:
            out[policy].append((value, run(point, policy, wl)))
    return out


def sweep_summary(
    key: str, base_value: float, results: list[tuple[float, PolicyResult]]
) -> dict[str, Any]:
    """The contract keys at the base point (or the lowest rate), the curve, and max rate at SLO."""
    at = next((r for v, r in results if v == base_value), results[0][1])
    curve = [
        {key: v, **{k: x for k, x in r.summary.items() if k != "per_model"}} for v, r in results
    ]
    summary = dict(at.summary)
    summary["summary_at"] = {key: next(v for v, r in results if r is at)}
    summary["sweep"] = curve
    if key == "rps":
        summary["max_rps_at_slo"] = max_rate_at_slo(
            [(v, r.summary["slo_attainment"]) for v, r in results]
        )
    return summary
