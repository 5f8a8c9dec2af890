"""`warmserve` command line: `simulate` and `models prepare`; `serve` and `bench` come next."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from warmserve.control.registry import POLICIES
from warmserve.experiment import Experiment, ExperimentError, load_experiment
from warmserve.models import ModelPrepError
from warmserve.traces import TraceError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="warmserve", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    sim = sub.add_parser("simulate", help="replay a workload on a simulated cluster")
    sim.add_argument("experiment", type=Path, help="experiment YAML file")
    sim.add_argument("--policies", help=f"comma-separated, from: {', '.join(POLICIES)}")
    sim.add_argument("--out", type=Path, help="output folder (default: results/<name>)")
    sim.add_argument("--seed", type=int, help="override the experiment's seed")
    sim.add_argument(
        "--sweep",
        metavar="KEY=V1,V2,...",
        help="run every policy at each value of a workload setting (rps or alpha)",
    )
    sim.add_argument(
        "--check", action="store_true", help="check page conservation after every event (slow)"
    )
    sim.add_argument("--quiet", action="store_true", help="no progress bar")
    models = sub.add_parser("models", help="prepare the packaged real models")
    msub = models.add_subparsers(dest="models_command", required=True)
    prep = msub.add_parser("prepare", help="convert SmolLM2-135M-Instruct once into an HF folder")
    prep.add_argument("--dir", type=Path, help="cache folder (default ~/.cache/warmserve/models)")
    return p


def _models_prepare(args: argparse.Namespace) -> int:
    from warmserve.models import prepare_smollm2

    with tqdm(total=3, desc="SmolLM2-135M-Instruct", unit="step") as bar:
        path = prepare_smollm2(args.dir, lambda name: (bar.set_postfix_str(name), bar.update()))
        bar.update(bar.total - bar.n)
    print(path)
    return 0


def _simulate(args: argparse.Namespace) -> int:
    from warmserve.sim.report import write_report
    from warmserve.sim.runner import PolicyResult, build_models, make_workload, run_policy
    from warmserve.sim.sweep import SLO_TARGET, parse_sweep, run_sweep, sweep_summary
    from warmserve.sim.workload import Workload

    exp = load_experiment(args.experiment)
    if args.seed is not None:
        exp = dataclasses.replace(exp, seed=args.seed)
    if args.policies:
        names = [p.strip() for p in args.policies.split(",") if p.strip()]
        unknown = [p for p in names if p not in POLICIES]
        if unknown:
            raise ExperimentError(f"unknown policy {unknown[0]!r} (known: {', '.join(POLICIES)})")
        exp = dataclasses.replace(exp, policies=names)
    out = args.out or Path("results") / exp.name
    models = build_models(exp)
    try:
        workload = make_workload(exp, models)
    except ValueError as e:
        raise ExperimentError(str(e)) from None
    if workload.num_requests == 0:
        raise ExperimentError("the workload has no requests")
    sweep = parse_sweep(args.sweep) if args.sweep else None
    if sweep is None and exp.sweep:
        ((key, values),) = exp.sweep.items()
        sweep = (key, values)
    results = []
    horizon = float(workload.arrival_s[-1]) + exp.workload.drain_s
    for policy in exp.policies:
        with tqdm(
            total=round(horizon), unit="sim s", desc=policy, disable=args.quiet, leave=True
        ) as bar:

            def progress(t: float, bar: tqdm = bar) -> None:
                bar.update(max(0, round(t) - bar.n))

            result = run_policy(
                exp, policy, workload, check_invariants=args.check, progress=progress
            )
            bar.update(bar.total - bar.n)  # the run ends early once every request is done
        results.append(result)
    meta = {
        "seed": exp.seed,
        "requests": workload.num_requests,
        "failed_ttft_s": exp.slo.failed_ttft_s,
    }
    summaries = {r.policy: r.summary for r in results}
    if sweep is not None:
        key, values = sweep
        runs = len(values) * len(exp.policies)
        with tqdm(total=runs, unit="run", desc=f"sweep {key}", disable=args.quiet) as bar:
            done = {r.policy: r for r in results}
            base = getattr(exp.workload, key)

            def run(point: Experiment, policy: str, wl: Workload) -> PolicyResult:
                value = getattr(point.workload, key)
                bar.set_postfix_str(f"{policy} {key}={value:g}")
                # The base point was just run above: same experiment, same seed, same result.
                result = done[policy] if value == base else run_policy(point, policy, wl)
                bar.update()
                return result

            swept = run_sweep(exp, key, values, run)
        summaries = {p: sweep_summary(key, base, pts) for p, pts in swept.items()}
        meta["sweep"] = {"key": key, "values": list(values), "slo_target": SLO_TARGET}
    write_report(out, exp.name, results, meta, summaries)
    for r in results:
        s = summaries[r.policy]
        if "max_rps_at_slo" in s:
            print(f"{r.policy:26s} max rps at SLO: {s['max_rps_at_slo']}")
        p99 = s["ttft_p99_s"]
        print(
            f"{r.policy:26s} done {s['completed']}/{s['arrived']}  TTFT p99 {p99:.3f} s  "
            f"SLO {s['slo_attainment']:.1%}  cold {s['cold_starts']}  hits {s['prewarm_hits']}"
        )
    print(f"wrote {out}/summary.json, report.md and plots")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "simulate":
            return _simulate(args)
        if args.command == "models":
            return _models_prepare(args)
    except (ExperimentError, TraceError, ModelPrepError) as e:
        print(f"warmserve: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("warmserve: interrupted", file=sys.stderr)
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())
