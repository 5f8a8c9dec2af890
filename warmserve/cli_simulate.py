"""`warmserve simulate`: an experiment file's policies over the simulated cluster, with
overrides (--set), a sweep, seeds, and the report (the parser is cli.py's)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from warmserve.control.registry import POLICIES, unread_message
from warmserve.experiment import (
    Experiment,
    ExperimentError,
    load_experiment,
    unread_settings,
    unread_sweep_message,
    unused_priorities,
)


def _check_settings(
    file_exp: Experiment, exp: Experiment, sweep: tuple[str, Any] | None, cli_sweep: bool
) -> None:
    """Refuse a control setting or cost from --set or --sweep that none of the run's policies
    reads. The file's own (its settings, sweep and model priorities) were checked against
    the file's policies; one that `--policies` leaves unread gets a note, since the file holds
    it for the others."""
    names = exp.policies

    def note(what: str) -> None:
        print(f"warmserve simulate: note: {what}", file=sys.stderr)

    for section, unread in unread_settings(exp, names).items():
        for key, readers in unread.items():
            if getattr(getattr(exp, section), key) != getattr(getattr(file_exp, section), key):
                raise ExperimentError(unread_message(key, names, readers, f"--set {section}."))
            note(
                f"the experiment's {section}.{key} is not read by {', '.join(names)}; it has "
                "no effect in this run"
            )
    for name in unused_priorities(exp, names):
        note(
            f"the priority of model {name!r} is used only by policies that prewarm by priors; "
            f"none of {', '.join(names)} does"
        )
    if sweep is not None:
        message = unread_sweep_message(sweep[0], names, "--sweep " if cli_sweep else "sweep.")
        if message and cli_sweep:
            raise ExperimentError(message)
        if message:
            note(f"{message.partition(';')[0]}: the sweep changes nothing in this run")


def simulate(args: argparse.Namespace) -> int:
    from warmserve.sim.overrides import apply_sets, canonical_key, get_value, parse_seeds
    from warmserve.sim.report import seeds_summary, write_report
    from warmserve.sim.sweep import SLO_TARGET, SLO_TARGETS, parse_sweep, point_experiment

    exp = file_exp = load_experiment(args.experiment)
    if args.seed is not None:
        exp = dataclasses.replace(exp, seed=args.seed)
    exp = apply_sets(exp, args.set)
    if args.policies:
        names = [p.strip() for p in args.policies.split(",") if p.strip()]
        unknown = [p for p in names if p not in POLICIES]
        if unknown:
            raise ExperimentError(f"unknown policy {unknown[0]!r} (known: {', '.join(POLICIES)})")
        exp = dataclasses.replace(exp, policies=names)
    out = args.out or Path("results") / exp.name
    sweep = parse_sweep(args.sweep) if args.sweep else None
    if sweep is None and exp.sweep:
        ((key, values),) = exp.sweep.items()
        sweep = (key, values)
    if sweep is not None:
        get_value(exp, canonical_key(sweep[0]), "--sweep")  # a known setting
        for value in sweep[1]:  # each value valid, before any run
            point_experiment(exp, sweep[0], value)
    _check_settings(file_exp, exp, sweep, cli_sweep=bool(args.sweep))
    if args.refine and (sweep is None or canonical_key(sweep[0]) != "workload.rps"):
        raise ExperimentError("--refine: needs a rate sweep (--sweep rps=...)")
    seeds = parse_seeds(args.seeds) if args.seeds else [exp.seed]
    per_seed = []
    for seed in seeds:
        label = f"seed {seed}: " if len(seeds) > 1 else ""
        per_seed.append(_simulate_seed(dataclasses.replace(exp, seed=seed), sweep, args, label))
    results, summaries, requests = per_seed[0]
    meta: dict[str, Any] = {
        "seed": seeds[0],
        "requests": requests,
        "failed_ttft_s": exp.slo.failed_ttft_s,
    }
    if args.set:
        meta["overrides"] = list(args.set)
    if sweep is not None:
        key, values = sweep
        meta["sweep"] = {"key": key, "values": list(values), "slo_target": SLO_TARGET}
        meta["slo_targets"] = list(SLO_TARGETS)
    if len(seeds) > 1:
        key = sweep[0] if sweep is not None else None
        meta["seeds"] = seeds_summary(seeds, [s for _, s, _ in per_seed], key)
    write_report(out, exp.name, results, meta, summaries)
    for r in results:
        s = summaries[r.policy]
        if "max_rps_at_slo" in s:
            cens = [f"{t:.0%}" for t in SLO_TARGETS
                    if s.get(f"max_rps_at_slo{'' if t == SLO_TARGET else f'_{round(t * 100)}'}"
                             "_censored")]  # fmt: skip
            note = f"  (censored at {', '.join(cens)}: the top rate still meets the SLO)"
            print(
                f"{r.policy:26s} max rps at SLO: {s['max_rps_at_slo']} (90 %), "
                f"{s.get('max_rps_at_slo_99')} (99 %){note if cens else ''}"
            )
        p99 = s["ttft_p99_s"]
        flagged = s.get("flagged_models") or []
        print(
            f"{r.policy:26s} done {s['completed']}/{s['arrived']}  TTFT p99 {p99:.3f} s  "
            f"SLO {s['slo_attainment']:.1%}  cold {s['cold_starts']}  hits {s['prewarm_hits']}"
            + (f"  FLAGGED: {', '.join(flagged)}" if flagged else "")
        )
    if len(seeds) > 1:
        for policy, agg in meta["seeds"]["policies"].items():
            p, a = agg["ttft_p99_s"], agg["slo_attainment"]
            print(
                f"{policy:26s} {len(seeds)} seeds: TTFT p99 mean {p['mean']:.3f} s "
                f"[{p['min']:.3f}-{p['max']:.3f}]  SLO mean {a['mean']:.1%} "
                f"[{a['min']:.1%}-{a['max']:.1%}]"
            )
    print(f"wrote {out}/summary.json, report.md and plots")
    return 0


def _simulate_seed(
    exp: Experiment, sweep: tuple[str, list[Any]] | None, args: argparse.Namespace, label: str
) -> tuple[list[Any], dict[str, dict[str, Any]], int]:
    """One seed: every policy at the experiment's own settings, then the sweep (its point at
    the experiment's value reuses those runs). (results, summaries, requests)."""
    from warmserve.sim.overrides import canonical_key, get_value
    from warmserve.sim.runner import PolicyResult, build_models, make_workload, run_policy
    from warmserve.sim.sweep import refine_knees, run_sweep, sweep_summary
    from warmserve.workload.builders import Workload

    models = build_models(exp)
    try:
        workload = make_workload(exp, models)
    except ValueError as e:
        raise ExperimentError(str(e)) from None
    if workload.num_requests == 0:
        raise ExperimentError("the workload has no requests")
    results = []
    horizon = float(workload.arrival_s[-1]) + exp.workload.drain_s
    for policy in exp.policies:
        with tqdm(
            total=round(horizon), unit="sim s", desc=label + policy, disable=args.quiet, leave=True
        ) as bar:

            def progress(t: float, bar: tqdm = bar) -> None:
                bar.update(max(0, round(t) - bar.n))

            result = run_policy(
                exp, policy, workload, check_invariants=args.check, progress=progress
            )
            bar.update(bar.total - bar.n)  # the run ends early once every request is done
        results.append(result)
    summaries = {r.policy: r.summary for r in results}
    if sweep is not None:
        key, values = sweep
        runs = len(values) * len(exp.policies) + args.refine * len(exp.policies)
        with tqdm(total=runs, unit="run", desc=f"{label}sweep {key}", disable=args.quiet) as bar:
            done = {r.policy: r for r in results}
            base = get_value(exp, canonical_key(key))

            def run(point: Experiment, policy: str, wl: Workload) -> PolicyResult:
                value = get_value(point, canonical_key(key))
                bar.set_postfix_str(f"{policy} {key}={value}")
                # The base point was just run above: same experiment, same seed, same result.
                same = value == base and point.policies == exp.policies
                result = done[policy] if same else run_policy(point, policy, wl)
                bar.update()
                return result

            swept = run_sweep(exp, key, values, run)
            if args.refine:
                refine_knees(exp, swept, args.refine, run)
        summaries = {p: sweep_summary(key, base, pts) for p, pts in swept.items()}
    return results, summaries, workload.num_requests
