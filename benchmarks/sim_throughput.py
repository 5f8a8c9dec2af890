"""Simulator speed on long replays: simulated requests per wall-minute, events/s.

Replays the paper setup (2 x 8 H100) for several days (default: one week) of two workloads:
Azure Conversation (`paper-azure-conv`, four Llama-2 models) and ServeGen (`servegen-m-mid`,
eight client deployments, replaying days 7-13 with days 0-6 as forecast history), at `--rps`
requests/s in all, for each policy. The forecaster starts from the history and keeps learning.

Every run is a fresh subprocess, so runs do not share caches or memory. With
`--baseline-ref GITREF` the same runs also go through the code of that commit (checked out in a
temporary git worktree), interleaved with the current tree's, and the table gives the speed-up
and whether each run's summary is identical: a before/after in one invocation, on the same
(possibly busy) machine. Wall and CPU time are both reported: on a shared machine CPU time is
the steadier figure.

    python benchmarks/sim_throughput.py --days 7 --baseline-ref main \\
        --json results/bench/sim_throughput.json
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_output import write_json

ROOT = Path(__file__).resolve().parent.parent

# name -> (experiment file, workload overrides besides duration and rate)
WORKLOADS: dict[str, tuple[str, dict[str, Any]]] = {
    "azure-conv": ("paper-azure-conv.yaml", {}),
    "servegen": ("servegen-m-mid.yaml", {"days": [7], "start_hour": 0}),
}


def worker(args: argparse.Namespace) -> None:
    """One policy on one workload, with whatever `warmserve` is on the path; a JSON line out."""
    from warmserve.experiment import load_experiment
    from warmserve.sim.runner import make_workload, run_policy

    file, overrides = WORKLOADS[args.workload]
    exp = load_experiment(ROOT / "experiments" / file)
    w = dataclasses.replace(exp.workload, duration_s=args.days * 86_400, rps=args.rps, **overrides)
    exp = dataclasses.replace(exp, workload=w)
    t0 = time.perf_counter()
    wl = make_workload(exp)
    build_s = time.perf_counter() - t0
    t0, c0 = time.perf_counter(), time.process_time()
    r = run_policy(exp, args.policy, wl)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    summary = json.dumps(r.summary, sort_keys=True)
    print(
        json.dumps(
            {
                "workload_build_s": round(build_s, 2),
                "wall_s": round(wall, 2),
                "cpu_s": round(cpu, 2),
                "events": r.num_events,
                "requests": wl.num_requests,
                "ttft_p99_s": r.summary["ttft_p99_s"],
                "summary_sha256": hashlib.sha256(summary.encode()).hexdigest(),
            }
        )
    )


def run_one(tree: Path, workload: str, policy: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", "--workload", workload, "--policy", policy,
           "--days", str(args.days), "--rps", str(args.rps)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{workload}/{policy} under {tree} failed:\n{out.stderr[-3000:]}")
    row = json.loads(out.stdout.strip().splitlines()[-1])
    n = row["requests"]
    row["m_requests_per_wall_min"] = round(n / row["wall_s"] * 60 / 1e6, 3)
    row["m_requests_per_cpu_min"] = round(n / row["cpu_s"] * 60 / 1e6, 3)
    row["events_per_s"] = round(row["events"] / row["wall_s"])
    return row


def checkout(ref: str, into: Path) -> str:
    """A detached worktree of `ref`; its commit hash."""
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--verify", f"{ref}^{{commit}}"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(into), commit],
        capture_output=True, check=True,
    )  # fmt: skip
    return commit


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--days", type=float, default=7.0)
    ap.add_argument("--rps", type=float, default=1.0)
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--policies", default="warmserve,vanilla-autoscale")
    ap.add_argument("--baseline-ref", help="also run the code of this git commit, to compare")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--workload", help=argparse.SUPPRESS)
    ap.add_argument("--policy", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    workloads = args.workloads.split(",")
    unknown = sorted(set(workloads) - set(WORKLOADS))
    if unknown:
        raise SystemExit(f"unknown workloads {unknown}; known: {', '.join(WORKLOADS)}")
    with tempfile.TemporaryDirectory(prefix="sim-baseline-") as tmp:
        trees = {"current": ROOT}
        baseline_commit = None
        if args.baseline_ref:
            base = Path(tmp) / "tree"
            baseline_commit = checkout(args.baseline_ref, base)
            trees = {"baseline": base, **trees}
        try:
            results = []
            for workload in workloads:
                for policy in args.policies.split(","):
                    row: dict[str, Any] = {"workload": workload, "policy": policy}
                    for label, tree in trees.items():  # interleaved: the same machine state
                        row[label] = run_one(tree, workload, policy, args)
                        print(f"{workload:10s} {policy:18s} {label:8s} "
                              f"{json.dumps(row[label])}", flush=True)  # fmt: skip
                    if "baseline" in row:
                        b, c = row["baseline"], row["current"]
                        row["speedup_wall"] = round(b["wall_s"] / c["wall_s"], 2)
                        row["speedup_cpu"] = round(b["cpu_s"] / c["cpu_s"], 2)
                        row["same_summary"] = b["summary_sha256"] == c["summary_sha256"]
                    results.append(row)
        finally:
            if args.baseline_ref:
                subprocess.run(
                    ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)],
                    capture_output=True, check=False,
                )  # fmt: skip
    print()
    print("M simulated requests per minute (wall / CPU):")
    for row in results:
        line = f"  {row['workload']:10s} {row['policy']:18s} {row['current']['requests']:>9,} req"
        for label in trees:
            r = row[label]
            line += (f"  {label} {r['m_requests_per_wall_min']:.3f} / "
                     f"{r['m_requests_per_cpu_min']:.3f}")  # fmt: skip
        if "baseline" in row:
            line += (f"  speed-up {row['speedup_wall']}x wall, {row['speedup_cpu']}x CPU, "
                     f"summary {'identical' if row['same_summary'] else 'DIFFERS'}")  # fmt: skip
        print(line)
    out = {
        "benchmark": "sim_throughput",
        "days": args.days,
        "rps": args.rps,
        "baseline_ref": args.baseline_ref,
        "baseline_commit": baseline_commit,
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "load_average_at_end": os.getloadavg(),
        "results": results,
    }
    write_json(args.json, out)


if __name__ == "__main__":
    main()
