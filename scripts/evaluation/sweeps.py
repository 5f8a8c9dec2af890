"""Rate sweeps: the starting grid, then rounds of upward extension and bisection near each knee
(per policy, until no policy needs another rate or the deadline passes), and the sweep settings
a run uses (starting grids, knee resolution), which --quick, --resume and --rerun set."""

from __future__ import annotations

import time
from typing import Any

from eval_stats import next_rates

from .aggregate import mean_curve
from .cells import SWEEPS, TARGETS, Task, sweep_cell
from .runner import Runner

MAX_ROUNDS = 8  # extension and bisection rounds after the starting grid
REL_RESOLUTION = 0.1  # bisect a knee until its bracket is within this share of the rate


def use_sweep_settings(meta: dict[str, Any]) -> None:
    """The starting grids and knee resolution `meta` names (--quick's, or a saved run's: a
    resumed or re-run sweep refines the way the saved run did)."""
    global REL_RESOLUTION
    REL_RESOLUTION = meta["knee_resolution"]
    for svc, grid in meta["grids"].items():
        SWEEPS[svc]["grid"] = grid


def run_sweeps(
    runner: Runner,
    policies: list[str],
    seeds: list[int],
    duration_s: float | None,
    deadline: float,
    first: list[Task],
    done: list[dict[str, Any]] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The starting grid (run together with `first`, the fixed tasks), then rounds of extension
    and bisection per policy until no policy needs another rate or the deadline passes.
    `done`: the rows of an earlier run to continue from (its grid is not run again)."""
    rows: list[dict[str, Any]] = list(done or [])
    plan: dict[tuple[str, float, int], list[str]] = {}
    if done is None:
        for svc, s in SWEEPS.items():
            for rps in s["grid"]:
                for seed in seeds:
                    plan[(svc, float(rps), seed)] = list(policies)
    else:
        plan = _next_plan(rows, policies, seeds)
    rounds = 0 if done is None else 1
    stopped_early = False
    while plan:
        tasks: list[Task] = [
            ("sweep", {"service": svc, "rps": rps}, sweep_cell(svc, rps), seed, pols, duration_s)
            for (svc, rps, seed), pols in plan.items()
        ]
        rows += runner.run(tasks, first)
        first = []
        plan = {}
        if rounds >= MAX_ROUNDS or time.perf_counter() > deadline or runner.cancelled:
            stopped_early = bool(_next_plan(rows, policies, seeds))
            break
        plan = _next_plan(rows, policies, seeds)
        rounds += 1
    meta = {"refinement_rounds": rounds, "stopped_by_deadline_or_round_limit": stopped_early}
    return rows, meta


def _next_plan(
    rows: list[dict[str, Any]], policies: list[str], seeds: list[int]
) -> dict[tuple[str, float, int], list[str]]:
    plan: dict[tuple[str, float, int], list[str]] = {}
    for svc, s in SWEEPS.items():
        for policy in policies:
            points = mean_curve([r for r in rows if r["group"] == "sweep"], svc, policy)
            for rps in next_rates(points, TARGETS, s["grid"], s["cap"], REL_RESOLUTION):
                for seed in seeds:
                    plan.setdefault((svc, rps, seed), []).append(policy)
    return plan
