"""Regenerates the evaluation in docs/evaluation.md: every run, table and plot.

    make evaluate            # or: .venv/bin/python scripts/evaluate.py [--jobs 2] [--quick]

Every cell runs on the simulator for each of --seeds seeds (default 5) and is reported as the
mean and min-max over seeds. Groups:
  headline   the reference setup (Azure Conversation and Coding, 1 rps), every policy;
  band       the same with one assumed cost moved at a time across its plausible band (engine
             starts, WarmServe's attach, load bandwidths), plus the two corners: the
             ServerlessLLM / WarmServe P99 ratio at the cited costs and its range;
  sweep      rate sweeps (Conversation, Coding, 8 mixed models) that extend until every policy
             fails the SLO and bisect near each knee, for max rps at 90 % and 99 % attainment;
  ablation   8 / 16 (/ 32) mixed models on 16 GPUs at 16 rps, WarmServe and its ablations;
  full only  ServeGen m-mid, workload sensitivity (popularity skew, burstiness, cluster size,
             model count) and the control-plane cost curve.
--quick runs the first four with fewer points (see QUICK_SKIPS) and says so in results.json.
Writes docs/eval/results.json (machine-readable), docs/eval/tables.md and docs/eval/*.png.
"""

# The CLI: arguments, main, --rerun and finish. The rest lives in scripts/evaluation/ (cells,
# runner, sweeps, aggregate, tables, plots).

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from evaluation import sweeps
from evaluation.aggregate import (
    _row_key,
    analyse,
    incomplete,
    with_headline_points,
)
from evaluation.cells import (
    ALL,
    QUICK_GRIDS,
    QUICK_RESOLUTION,
    QUICK_SKIPS,
    QUICK_SWEEP_POLICIES,
    ROOT,
    SEEDS,
    SUMMARY_KEYS,
    SWEEP_POLICIES,
    SWEEPS,
    Task,
    available,
    fixed_tasks,
    sweep_cell,
)
from evaluation.plots import cost_curve, plots
from evaluation.runner import Runner
from evaluation.sweeps import run_sweeps, use_sweep_settings
from evaluation.tables import _x, tables

from warmserve.control.registry import POLICIES

OUT = ROOT / "docs" / "eval"


def main() -> None:
    global OUT
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--jobs", type=int, default=2, help="worker processes")
    ap.add_argument("--quick", action="store_true", help="the subset in QUICK_SKIPS' complement")
    ap.add_argument(
        "--seeds", type=int, default=len(SEEDS), help="seeds per cell (>= 5 for the doc)"
    )
    ap.add_argument(
        "--budget-min",
        type=float,
        default=25.0,
        help="no new sweep-refinement round starts after this many minutes",
    )
    ap.add_argument(
        "--duration",
        type=float,
        default=None,
        help="override every workload's duration_s (smoke runs only)",
    )
    ap.add_argument(
        "--stop-min",
        type=float,
        default=None,
        help="cancel tasks not yet started after this many minutes and report what finished",
    )
    ap.add_argument("--only", default=None, help="comma-separated groups (smoke runs)")
    ap.add_argument("--out", type=Path, default=OUT, help="output folder")
    ap.add_argument("--replot", action="store_true", help="tables and plots from results.json")
    ap.add_argument(
        "--from-partial",
        action="store_true",
        help="report a run that was cut short, from OUT/partial.jsonl",
    )
    ap.add_argument(
        "--resume",
        action="store_true",
        help="continue the sweep refinement of a run from OUT/partial.jsonl",
    )
    ap.add_argument(
        "--points",
        default=None,
        help="with --resume: sweep points SERVICE@RPS,... to run, in this order, instead of "
        "the next refinement round",
    )
    ap.add_argument("--sweep-policies", default=None, help="with --points: the policies")
    ap.add_argument(
        "--rerun",
        default=None,
        help="POLICY,...: re-run every row of these policies in OUT/results.json on this code "
        "(same cells and seeds), refine their sweeps where the new curves need it, and report",
    )
    ap.add_argument("--why", default=None, help="with --rerun: the change, for the tables' header")
    args = ap.parse_args()
    OUT = args.out
    OUT.mkdir(parents=True, exist_ok=True)
    partial = OUT / "partial.jsonl"
    if args.rerun:
        rerun(args.rerun.split(","), args.why, args.jobs, args.budget_min)
        return
    if args.replot:
        saved = json.loads((OUT / "results.json").read_text())
        saved["runs"] = with_headline_points(saved["runs"])
        res = analyse(saved["runs"], saved["meta"])
        (OUT / "tables.md").write_text(tables(saved["runs"], res))
        plots(saved["runs"], res, OUT)
        return
    seeds = list(range(1, args.seeds + 1))
    only = set(args.only.split(",")) if args.only else None
    if args.resume:
        # Continue a run whose refinement rounds were cut short: the same code, the rows so far.
        done = [json.loads(line) for line in partial.read_text().splitlines() if line.strip()]
        meta = json.loads((OUT / "partial-meta.json").read_text())
        if (OUT / "results.json").exists():  # the finished first part's, with its timings
            first_meta = json.loads((OUT / "results.json").read_text()).get("meta", {})
            if first_meta.get("grids") == meta["grids"]:
                meta = first_meta
        use_sweep_settings(meta)
        t0 = time.perf_counter()
        stop_at = t0 + args.stop_min * 60 if args.stop_min else float("inf")
        runner = Runner(args.jobs, partial, stop_at)
        pols = sorted({r["policy"] for r in done if r["group"] == "sweep"}, key=ALL.index)
        if args.points:
            # An explicit list of sweep points, run in the order given: when the machine is too
            # slow for every round, the points that decide a headline go first.
            pols = args.sweep_policies.split(",") if args.sweep_policies else pols
            tasks: list[Task] = []
            for item in args.points.split(","):
                svc, _, rps = item.partition("@")
                for seed in meta["seeds"]:
                    labels = {"service": svc, "rps": float(rps)}
                    cell = sweep_cell(svc, float(rps))
                    tasks.append(("sweep", labels, cell, seed, pols, meta["duration_s"]))
            try:
                rows = done + runner.run([], tasks)
            finally:
                runner.close()
            resume = {"tasks": int(runner.bar.total), "cancelled": runner.cancelled,
                      "wall_min": (time.perf_counter() - t0) / 60, "points": args.points,
                      "policies": pols}  # fmt: skip
            meta["resumes"] = [*meta.get("resumes", []), resume]
            finish(rows, meta, True)
            return
        try:
            rows, sweep_meta = run_sweeps(
                runner, pols, meta["seeds"], meta["duration_s"], t0 + args.budget_min * 60, [],
                done,
            )  # fmt: skip
        finally:
            runner.close()
        resume = {"tasks": int(runner.bar.total), "cancelled": runner.cancelled,
                  "wall_min": (time.perf_counter() - t0) / 60, **sweep_meta}  # fmt: skip
        meta["resumes"] = [*meta.get("resumes", []), resume]
        finish(rows, meta, True)
        return
    if args.from_partial:
        rows = [json.loads(line) for line in partial.read_text().splitlines() if line.strip()]
        meta = json.loads((OUT / "partial-meta.json").read_text())
        meta.update(cut_short=True, wall_min=None)
        finish(rows, meta, args.quick or only is not None)
        return
    if args.quick:
        use_sweep_settings({"knee_resolution": QUICK_RESOLUTION, "grids": QUICK_GRIDS})
    t0 = time.perf_counter()
    first = fixed_tasks(args.quick, seeds, args.duration, only)
    stop_at = t0 + args.stop_min * 60 if args.stop_min else float("inf")
    partial.write_text("")
    meta: dict[str, Any] = {
        "quick": args.quick,
        "skipped": QUICK_SKIPS if args.quick else [],
        "seeds": seeds,
        "jobs": args.jobs,
        "duration_s": args.duration,
        "only": sorted(only) if only else None,
        "grids": {svc: sw["grid"] for svc, sw in SWEEPS.items()},
        "knee_resolution": sweeps.REL_RESOLUTION,
    }
    (OUT / "partial-meta.json").write_text(json.dumps(meta))
    runner = Runner(args.jobs, partial, stop_at)
    try:
        if only is None or "sweep" in only:
            pols = available(QUICK_SWEEP_POLICIES if args.quick else SWEEP_POLICIES)
            deadline = t0 + args.budget_min * 60
            rows, sweep_meta = run_sweeps(runner, pols, seeds, args.duration, deadline, first)
        else:
            rows, sweep_meta = runner.run(first), {}
    finally:
        runner.close()
    meta.update(
        tasks=int(runner.bar.total),
        cancelled_tasks=runner.cancelled,
        wall_min=(time.perf_counter() - t0) / 60,
        **sweep_meta,
    )
    finish(rows, meta, args.quick or only is not None)


LABEL_KEYS = ("service", "key", "value", "rps", "alpha", "cv", "gpus", "models")


def _cell_of(row: dict[str, Any], fixed: list[Task]) -> dict[str, Any]:
    """The cell a saved row ran on: a sweep point's, or the fixed task with its labels."""
    if row["group"] == "sweep":
        return sweep_cell(row["service"], row["rps"])
    for group, labels, cell, seed, _, _ in fixed:
        same = group == row["group"] and seed == row["seed"]
        if same and all(row.get(k) == v for k, v in labels.items()):
            return cell
    raise SystemExit(f"evaluate: no cell for a saved {row['group']} row {row}")


def _outcome(row: dict[str, Any]) -> str:
    return json.dumps([{k: row.get(k) for k in SUMMARY_KEYS}, row.get("per_model")],
                      sort_keys=True, default=str)  # fmt: skip


def rerun(policies: list[str], why: str | None, jobs: int, budget_min: float) -> None:
    """Re-run every saved row of `policies` on this code, at the same cells and seeds, keep
    every other row, and run more sweep points for them where their new curves need it (a knee
    that moved). The tables' header records the code, what changed and `why`."""
    unknown = [p for p in policies if p not in POLICIES]
    if unknown or not why:
        raise SystemExit(f"evaluate --rerun: unknown policies {unknown}" if unknown
                         else "evaluate --rerun: say what changed with --why TEXT")  # fmt: skip
    saved = json.loads((OUT / "results.json").read_text())
    meta = saved["meta"]
    use_sweep_settings(meta)
    old = [r for r in saved["runs"] if not r.get("from_headline")]
    redo = [r for r in old if r["policy"] in policies]
    if not redo:
        raise SystemExit(f"evaluate --rerun: no saved rows of {policies} in {OUT}")
    only = set(meta["only"]) if meta.get("only") else None
    fixed = fixed_tasks(meta["quick"], meta["seeds"], meta["duration_s"], only)
    tasks: dict[tuple[Any, ...], Task] = {}
    for r in redo:
        labels = {k: r[k] for k in LABEL_KEYS if k in r}
        key = (r["group"], json.dumps(labels, sort_keys=True, default=str), r["seed"])
        if key not in tasks:
            tasks[key] = (r["group"], labels, _cell_of(r, fixed), r["seed"], [], meta["duration_s"])
        tasks[key][4].append(r["policy"])
    t0 = time.perf_counter()
    runner = Runner(jobs, OUT / "rerun-partial.jsonl", float("inf"))
    (OUT / "rerun-partial.jsonl").write_text("")
    try:
        rows = [r for r in old if r["policy"] not in policies] + runner.run(list(tasks.values()))
        swept = [
            p for p in policies if any(r["group"] == "sweep" for r in redo if r["policy"] == p)
        ]
        before = len(rows)
        if swept:
            rows, _ = run_sweeps(runner, swept, meta["seeds"], meta["duration_s"],
                                 t0 + budget_min * 60, [], rows)  # fmt: skip
    finally:
        runner.close()
    was = {(*_row_key(r), r["policy"]): _outcome(r) for r in redo}
    changed: dict[str, int] = {}
    for r in rows:
        k = (*_row_key(r), r["policy"])
        if k in was and was[k] != _outcome(r):
            changed[r["group"]] = changed.get(r["group"], 0) + 1
    groups = ", ".join(f"{n} {g}" for g, n in sorted(changed.items())) or "none"
    text = f"{sum(changed.values())} of {len(redo)} rows changed ({groups})"
    if len(rows) > before:
        text += f", and {len(rows) - before} rows at new sweep points"
    code = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                          text=True).stdout.strip() or "unknown"  # fmt: skip
    entry = {"code": code, "policies": policies, "tasks": int(runner.bar.total),
             "wall_min": (time.perf_counter() - t0) / 60, "changed": text, "why": why}  # fmt: skip
    meta["reruns"] = [*meta.get("reruns", []), entry]
    print(f"rerun: {text}")
    finish(rows, meta, True)


def finish(rows: list[dict[str, Any]], meta: dict[str, Any], carry_cost: bool) -> None:
    rows = with_headline_points(rows)
    rows.sort(key=_row_key)
    meta["incomplete_cells"] = incomplete(rows, len(meta["seeds"]))
    res = analyse(rows, meta)
    if carry_cost:
        prev = OUT / "results.json"
        old = json.loads(prev.read_text()) if prev.exists() else {}
        control = old.get("control_cost")
        meta["control_cost_carried_over"] = True
    else:
        print("control-plane cost curve ...", flush=True)
        control = cost_curve(OUT)
    (OUT / "results.json").write_text(
        json.dumps({**res, "runs": rows, "control_cost": control}, indent=1, default=str) + "\n"
    )
    (OUT / "tables.md").write_text(tables(rows, res))
    plots(rows, res, OUT)
    for k, v in res["band"].items():
        print(f"{k}: cited {v['cited_text']}, band {_x(v['band'][0])} - {_x(v['band'][1])}")
    for svc, sw in res["sweeps"].items():
        for k, v in sw["ratios"].items():
            print(f"{svc} {k}: {v['text']}")
    print(f"wrote {OUT}/results.json, tables.md and plots")


if __name__ == "__main__":
    main()
