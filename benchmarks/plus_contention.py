"""warmserve-plus against its earlier form and the faithful policy under memory contention
(8 models of mixed size on 16 H100s, Azure Conversation at 16 rps), over several seeds.

Reports pooled and per-model P99 TTFT, the worst model's P99 over the pooled P99 (starvation),
SLO attainment, start paths and the control plane's memory actions (SetKvPages per minute,
lends, reclaims, prewarms evicted within 10 s), as mean ± standard deviation over seeds; with
--out, every run and that summary as JSON.

    python benchmarks/plus_contention.py --seeds 1,2,3,4,5 [--rps 16] [--models 8] \
        [--policies warmserve,plus-no-fair,warmserve-plus] [--out results.json]
    # the same policies on a shipped experiment as it is (no-regression check):
    python benchmarks/plus_contention.py --experiment experiments/paper-azure-conv.yaml
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from warmserve.control.config import ControlConfig  # noqa: E402
from warmserve.control.registry import (  # noqa: E402
    POLICIES,
    _warmserve,
    first_unread_message,
    unread_control_keys,
)
from warmserve.experiment import ModelEntry, load_experiment  # noqa: E402
from warmserve.sim.runner import make_workload, run_policy  # noqa: E402

MIXED = [("llama-2-7b", 1), ("llama-2-7b", 1), ("llama-2-13b", 2), ("llama-2-70b", 4)]
PLUS = POLICIES["warmserve-plus"].spec
# warmserve-plus before prior prewarming, aging and calm KV lending (keep-alive only), and
# with each addition alone removed.
VARIANTS = {
    "plus-keepalive-only": dataclasses.replace(
        PLUS, prior_prewarm=False, queue_aging=False, calm_kv=False
    ),
    "plus-no-calm-kv": dataclasses.replace(PLUS, calm_kv=False),
    "plus-no-prior": dataclasses.replace(PLUS, prior_prewarm=False),
    "plus-no-aging": dataclasses.replace(PLUS, queue_aging=False),
    # warmserve-plus before fair starts (fragmentation-aware starts, held blocks, drains).
    "plus-no-fair": dataclasses.replace(PLUS, fair_starts=False),
}


def experiment(
    rps: float,
    models: int,
    seed: int,
    control: dict | None = None,
    duration_s: float | None = None,
):
    exp = load_experiment(ROOT / "experiments" / "paper-azure-conv.yaml")
    if duration_s is not None:
        exp = dataclasses.replace(
            exp, workload=dataclasses.replace(exp.workload, duration_s=duration_s)
        )
    entries = [
        ModelEntry(name=f"m{i:02d}-{p.removeprefix('llama-2-')}", preset=p, tp=tp,
                   max_model_len=2048)
        for i, (p, tp) in ((i, MIXED[i % len(MIXED)]) for i in range(models))
    ]  # fmt: skip
    return dataclasses.replace(
        exp,
        seed=seed,
        models=entries,
        workload=dataclasses.replace(exp.workload, rps=rps),
        control=dataclasses.replace(exp.control, **(control or {})),
    )


def row(summary: dict) -> dict:
    per_model_p99 = {m: s["ttft_p99_s"] for m, s in summary["per_model"].items()}
    worst = max(v for v in per_model_p99.values() if v is not None)
    c = summary.get("control", {})
    return {
        "ttft_p99_s": summary["ttft_p99_s"],
        "worst_model_p99_s": worst,
        "worst_over_pooled": worst / summary["ttft_p99_s"],
        "slo_attainment": summary["slo_attainment"],
        "cold_starts": summary["cold_starts"],
        "prewarm_hits": summary["prewarm_hits"],
        "kv_set_per_min": c.get("kv_set_per_min"),
        "kv_lends": c.get("kv_lends"),
        "kv_reclaims": c.get("kv_reclaims"),
        "quick_evictions": c.get("quick_evictions"),
        "per_model_p99_s": per_model_p99,
    }


def _value(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="1,2,3,4,5")
    ap.add_argument("--rps", type=float, default=16.0)
    ap.add_argument("--models", type=int, default=8)
    ap.add_argument("--policies", default="warmserve,plus-no-fair,warmserve-plus")
    ap.add_argument("--out", default=None, help="write every run and the summary as JSON here")
    ap.add_argument(
        "--experiment",
        default=None,
        help="run this experiment file as it is (its models, rate and duration; only the seed "
        "changes) instead of the contention setup, e.g. experiments/paper-azure-conv.yaml",
    )
    ap.add_argument("--duration-s", type=float, default=None, help="shorter runs (default 1200)")
    ap.add_argument(
        "--control",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a ControlConfig field (a number or a word), e.g. starve_wait_s=5 or "
        "forecast_method=adaptive (the experiment file selects the paper's forecaster)",
    )
    args = ap.parse_args()
    for name, spec in VARIANTS.items():
        POLICIES[name] = _warmserve(dataclasses.replace(spec, name=name))
    policies = args.policies.split(",")
    control = {k: _value(v) for k, v in (kv.split("=", 1) for kv in args.control)}
    unknown = [p for p in policies if p not in POLICIES]
    if unknown:
        sys.exit(
            f"plus_contention.py: unknown policy {unknown[0]!r} (known: {', '.join(POLICIES)})"
        )
    # The overrides alone: the experiment's own settings are checked when it is parsed.
    overrides = dataclasses.replace(ControlConfig(), **control)
    unread = first_unread_message(unread_control_keys(overrides, policies), policies, "--control ")
    if unread:
        sys.exit(f"plus_contention.py: {unread}")
    runs: dict[str, list[dict]] = {p: [] for p in policies}
    for seed in (int(s) for s in args.seeds.split(",")):
        if args.experiment:
            exp = load_experiment(Path(args.experiment))
            exp = dataclasses.replace(
                exp, seed=seed, control=dataclasses.replace(exp.control, **control)
            )
        else:
            exp = experiment(args.rps, args.models, seed, control, args.duration_s)
        wl = make_workload(exp)
        for p in policies:
            runs[p].append(row(run_policy(exp, p, wl).summary))
            brief = {k: v for k, v in runs[p][-1].items() if k != "per_model_p99_s"}
            print(f"seed {seed} {p}: {json.dumps(brief)}", flush=True)
    keys = ["ttft_p99_s", "worst_model_p99_s", "worst_over_pooled", "slo_attainment",
            "cold_starts", "prewarm_hits", "kv_set_per_min", "kv_lends", "kv_reclaims",
            "quick_evictions"]  # fmt: skip
    print("\n| policy | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    summary: dict[str, dict[str, dict[str, float] | None]] = {}
    for p, rs in runs.items():
        cells = []
        summary[p] = {}
        for k in keys:
            vals = [r[k] for r in rs if r[k] is not None]
            if not vals:
                cells.append("–")
                summary[p][k] = None
                continue
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            summary[p][k] = {"mean": statistics.mean(vals), "sd": sd}
            cells.append(f"{statistics.mean(vals):.3g} ± {sd:.2g}")
        print(f"| {p} | " + " | ".join(cells) + " |")
    if args.out:
        setup = {k: v for k, v in vars(args).items() if k != "out"}
        doc = {"setup": setup, "summary": summary, "runs": runs}
        Path(args.out).write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
