"""Regenerates the evaluation in docs/evaluation.md: every run, table and plot.

    make evaluate            # or: .venv/bin/python scripts/evaluate.py [--jobs 2] [--quick]

Runs (all on the simulator, seeds fixed):
  headline     the reference setup on Azure Conversation and Coding, every policy, rps 1;
  sweep        the same at rps 2..64: SLO attainment curves and max rps at SLO;
  servegen     ServeGen m-mid: the 8 busiest clients as deployments, 7 days of history;
  sensitivity  popularity skew (alpha), burstiness (inter-arrival CV), cluster size
               (16 -> 256 GPUs, models and rate scaled with it), model count (4 -> 64 on 16 GPUs);
  cost         control-plane time per tick as the cluster grows.
Writes docs/eval/results.json, docs/eval/tables.md and docs/eval/*.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from tqdm import tqdm

from warmserve.experiment import Experiment, ModelEntry, load_experiment
from warmserve.sim.runner import make_workload, run_policy
from warmserve.sim.sweep import max_rate_at_slo

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "eval"
ALL = [
    "warmserve", "warmserve-plus", "warmserve-no-placement", "warmserve-no-prewarm",
    "warmserve-no-kv-prewarm", "oracle", "serverlessllm", "muxserve", "static", "vanilla-autoscale",
]  # fmt: skip
SENS_POLICIES = ["warmserve", "warmserve-plus", "serverlessllm", "muxserve", "vanilla-autoscale"]
SWEEP_RPS = [2, 4, 8, 16, 24, 32, 40, 48, 64]
MIXED8_RPS = [1, 2, 4, 8, 16, 32]  # 8 models of mixed size on 16 GPUs: memory is contended
MIXED8_POLICIES = ["warmserve", "warmserve-plus", "serverlessllm", "muxserve", "static",
                   "vanilla-autoscale"]  # fmt: skip
ABLATION = ["warmserve", "warmserve-no-placement", "warmserve-no-prewarm",
            "warmserve-no-kv-prewarm", "oracle", "warmserve-plus", "vanilla-autoscale"]  # fmt: skip
SWEEPS = ("conv", "code", "conv-8models")
SENS_RPS = 16.0
KEYS = [
    "arrived", "completed", "failed", "ttft_mean_s", "ttft_p50_s", "ttft_p90_s", "ttft_p99_s",
    "tpot_mean_s", "tpot_p99_s", "throughput_rps", "slo_attainment", "cold_starts",
    "prewarm_hits", "inprogress_hits", "forecast_peak_rel_error",
]  # fmt: skip
# One colour per policy in every plot.
COLOURS = dict(zip(ALL, ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b",
                         "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"], strict=True))  # fmt: skip
MIXED = [("llama-2-7b", 1), ("llama-2-7b", 1), ("llama-2-13b", 2), ("llama-2-70b", 4)]


def base(service: str) -> Experiment:
    return load_experiment(ROOT / "experiments" / f"paper-azure-{service}.yaml")


def variant(
    exp: Experiment, *, nodes: int | None = None, models: int | None = None, **wl: Any
) -> Experiment:
    """The experiment with workload settings replaced, and optionally a resized cluster or model
    set (`models` served models cycling through the reference mix as independent deployments)."""
    out = dataclasses.replace(exp, workload=dataclasses.replace(exp.workload, **wl))
    if nodes is not None:
        out = dataclasses.replace(out, cluster=dataclasses.replace(out.cluster, nodes=nodes))
    if models is not None:
        entries = [
            ModelEntry(
                name=f"m{i:02d}-{p.removeprefix('llama-2-')}", preset=p, tp=tp, max_model_len=2048
            )
            for i, (p, tp) in ((i, MIXED[i % len(MIXED)]) for i in range(models))
        ]
        out = dataclasses.replace(out, models=entries)
    return out


def run_job(job: tuple[str, dict[str, Any], Experiment, list[str]]) -> list[dict[str, Any]]:
    """One workload, several policies (workload built once)."""
    group, labels, exp, policies = job
    wl = make_workload(exp)
    rows = []
    for policy in policies:
        s = run_policy(exp, policy, wl).summary
        row = {"group": group, **labels, "policy": policy, **{k: s[k] for k in KEYS}}
        if group in ("headline", "servegen"):
            row["per_model"] = s["per_model"]
        rows.append(row)
    return rows


def jobs(quick: bool) -> list[tuple[str, dict[str, Any], Experiment, list[str]]]:
    out = []
    rates = SWEEP_RPS[:3] if quick else SWEEP_RPS
    for svc in ("conv", "code"):
        b = base(svc)
        out.append(("headline", {"service": svc}, b, ALL))
        for rps in rates:
            out.append(("sweep", {"service": svc, "rps": rps}, variant(b, rps=float(rps)), ALL))
    for rps in MIXED8_RPS[:3] if quick else MIXED8_RPS:
        exp = variant(base("conv"), models=8, rps=float(rps))
        out.append(("sweep", {"service": "conv-8models", "rps": rps}, exp, MIXED8_POLICIES))
    for count in (8, 16) if quick else (8, 16, 32):
        exp = variant(base("conv"), models=count, rps=SENS_RPS)
        out.append(("ablation", {"models": count}, exp, ABLATION))
    servegen = load_experiment(ROOT / "experiments" / "servegen-m-mid.yaml")
    out.append(("servegen", {"service": "servegen-m-mid"}, servegen, ALL))
    conv = base("conv")
    for alpha in (0.5, 1.0, 2.0):
        out.append(
            ("alpha", {"alpha": alpha}, variant(conv, rps=SENS_RPS, alpha=alpha), SENS_POLICIES)
        )
    for cv in (None, 1.0, 2.0, 4.0):
        exp = variant(conv, rps=SENS_RPS, burstiness_cv=cv)
        out.append(("burstiness", {"cv": cv}, exp, SENS_POLICIES))
    for nodes in (2, 4, 8) if quick else (2, 4, 8, 16, 32):
        scale = nodes // 2
        exp = variant(conv, nodes=nodes, models=4 * scale, rps=SENS_RPS * scale, days=None)
        out.append(("cluster", {"gpus": nodes * 8, "models": 4 * scale}, exp, SENS_POLICIES))
    for count in (4, 8, 16) if quick else (4, 8, 16, 32, 64):
        exp = variant(conv, models=count, rps=SENS_RPS)
        out.append(("models", {"models": count}, exp, SENS_POLICIES))
    return out


def sweep_rows(rows: list[dict[str, Any]], svc: str) -> dict[str, list[dict[str, Any]]]:
    by: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r["group"] == "sweep" and r["service"] == svc:
            by.setdefault(r["policy"], []).append(r)
    return {p: sorted(v, key=lambda r: r["rps"]) for p, v in by.items()}


def _scenarios(rows: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Runs grouped by workload: label -> policy -> row."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for r in rows:
        labels = {k: r[k] for k in ("service", "rps", "alpha", "cv", "gpus", "models") if k in r}
        out.setdefault(f"{r['group']} {labels}", {})[r["policy"]] = r
    return out


def headline(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"ttft_p99_vs_serverlessllm": {}, "max_rps_at_slo": {}}
    scen = _scenarios(rows)
    for policy in ("warmserve", "warmserve-plus"):
        ratios = sorted(
            (
                (runs["serverlessllm"]["ttft_p99_s"] / runs[policy]["ttft_p99_s"], name)
                for name, runs in scen.items()
                if policy in runs and "serverlessllm" in runs
            ),
            reverse=True,
        )
        ref = {svc: scen[f"headline {{'service': '{svc}'}}"] for svc in ("conv", "code")}

        def tail(svc: str, other: str, policy: str = policy, ref: Any = ref) -> float:
            return float(ref[svc][other]["ttft_p99_s"] / ref[svc][policy]["ttft_p99_s"])

        out["ttft_p99_vs_serverlessllm"][policy] = {
            "reference_setup_conv": tail("conv", "serverlessllm"),
            "reference_setup_code": tail("code", "serverlessllm"),
            "max": ratios[0][0],
            "max_at": ratios[0][1],
            "min": ratios[-1][0],
            "min_at": ratios[-1][1],
            "vs_vanilla_reference_conv": tail("conv", "vanilla-autoscale"),
        }
    for svc in SWEEPS:
        sw = sweep_rows(rows, svc)
        best = {
            p: max_rate_at_slo([(r["rps"], r["slo_attainment"]) for r in v]) for p, v in sw.items()
        }
        m = best.get("muxserve")
        w, wp = best.get("warmserve"), best.get("warmserve-plus")
        out["max_rps_at_slo"][svc] = {
            "by_policy": best,
            "warmserve_over_muxserve": w / m if w and m else None,
            "warmserve_plus_over_muxserve": wp / m if wp and m else None,
        }
    return out


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e3


def fmt(x: Any, spec: str = "{:.3f}") -> str:
    return "–" if x is None else spec.format(x)


def tables(rows: list[dict[str, Any]], heads: dict[str, Any]) -> str:
    lines = ["<!-- generated by scripts/evaluate.py; do not edit -->", ""]
    for svc in SWEEPS:
        h = heads["max_rps_at_slo"][svc]["by_policy"]
        title = {"conv": "Azure Conversation", "code": "Azure Coding",
                 "conv-8models": "Azure Conversation, 8 models of mixed size"}[svc]  # fmt: skip
        lines += [f"### {title}", ""]
        lines += [
            "| policy | TTFT p50 s | p90 s | p99 s | TPOT mean ms | done | SLO | cold | hits "
            "| max rps at SLO |",
            "|---" * 10 + "|",
        ]
        for r in rows if svc in ("conv", "code") else []:
            if r["group"] == "headline" and r["service"] == svc:
                lines.append(
                    f"| {r['policy']} | {fmt(r['ttft_p50_s'])} | {fmt(r['ttft_p90_s'])} | "
                    f"{fmt(r['ttft_p99_s'])} | {fmt(_ms(r['tpot_mean_s']), '{:.1f}')} | "
                    f"{r['completed']}/{r['arrived']} | {fmt(r['slo_attainment'], '{:.1%}')} | "
                    f"{r['cold_starts']} | {r['prewarm_hits'] + r['inprogress_hits']} | "
                    f"{fmt(h.get(r['policy']), '{:g}')} |"
                )
        rates = MIXED8_RPS if svc == "conv-8models" else SWEEP_RPS
        lines += [
            "",
            "Rate sweep (SLO attainment / P99 TTFT in s; last column: max rps at SLO):",
            "",
        ]
        lines += [
            "| policy | " + " | ".join(f"rps {x}" for x in rates) + " | max |",
            "|---" * (len(rates) + 2) + "|",
        ]
        for p, v in sweep_rows(rows, svc).items():
            cells = [
                f"{fmt(r['slo_attainment'], '{:.0%}')} / {fmt(r['ttft_p99_s'], '{:.2f}')}"
                for r in v
            ]
            lines.append(f"| {p} | " + " | ".join(cells) + f" | {fmt(h.get(p), '{:g}')} |")
        lines += [""]
    lines += ["### Ablations: 8, 16, 32 models of mixed size on 16 GPUs, 16 rps", ""]
    counts = sorted({r["models"] for r in rows if r["group"] == "ablation"})
    lines += [
        "| policy | " + " | ".join(f"{c} models: SLO / p90 / p99 TTFT s" for c in counts) + " |",
        "|---" * (len(counts) + 1) + "|",
    ]
    for p in ABLATION:
        cells = []
        for c in counts:
            r = next(
                r
                for r in rows
                if r["group"] == "ablation" and r["models"] == c and r["policy"] == p
            )
            slo, p90 = fmt(r["slo_attainment"], "{:.1%}"), fmt(r["ttft_p90_s"], "{:.2f}")
            cells.append(f"{slo} / {p90} / {fmt(r['ttft_p99_s'], '{:.2f}')}")
        lines.append(f"| {p} | " + " | ".join(cells) + " |")
    lines += [""]
    lines += ["### ServeGen m-mid: 8 busiest clients as deployments, day 13, 8 rps", ""]
    lines += [
        "| policy | TTFT p50 s | p90 s | p99 s | TPOT mean ms | done | SLO | cold | hits |",
        "|---" * 9 + "|",
    ]
    for r in rows:
        if r["group"] == "servegen":
            lines.append(
                f"| {r['policy']} | {fmt(r['ttft_p50_s'])} | {fmt(r['ttft_p90_s'])} | "
                f"{fmt(r['ttft_p99_s'])} | {fmt(_ms(r['tpot_mean_s']), '{:.1f}')} | "
                f"{r['completed']}/{r['arrived']} | {fmt(r['slo_attainment'], '{:.1%}')} | "
                f"{r['cold_starts']} | {r['prewarm_hits'] + r['inprogress_hits']} |"
            )
    lines += [""]
    for group, label in (
        ("alpha", "alpha"),
        ("burstiness", "cv"),
        ("cluster", "gpus"),
        ("models", "models"),
    ):
        sel = [r for r in rows if r["group"] == group]
        points = sorted({r[label] for r in sel}, key=lambda x: (x is not None, x or 0))
        heads_ = [f"{label} {p if p is not None else 'trace'}" for p in points]
        lines += [
            f"### Sensitivity: {group}",
            "",
            "| policy | " + " | ".join(heads_) + " |",
            "|---" * (len(points) + 1) + "|",
        ]
        for p in SENS_POLICIES:
            cells = []
            for pt in points:
                r = next(r for r in sel if r["policy"] == p and r[label] == pt)
                cells.append(
                    f"{fmt(r['slo_attainment'], '{:.0%}')} / {fmt(r['ttft_p99_s'], '{:.2f}')}"
                )
            lines.append(f"| {p} | " + " | ".join(cells) + " |")
        lines += [""]
    return "\n".join(lines) + "\n"


def plots(rows: list[dict[str, Any]]) -> None:
    fig, axes = plt.subplots(2, 3, figsize=(16, 7.5))
    for col, svc in enumerate(SWEEPS):
        for p, v in sweep_rows(rows, svc).items():
            xs = [r["rps"] for r in v]
            style = ":" if p.startswith("warmserve-no") or p == "oracle" else "-"
            kw = {"marker": "o", "ms": 3, "label": p, "color": COLOURS[p]}
            axes[0][col].plot(xs, [r["slo_attainment"] for r in v], style, **kw)
            axes[1][col].plot(xs, [r["ttft_p99_s"] for r in v], style, **kw)
        axes[0][col].axhline(0.9, color="grey", ls="--", lw=1)
        axes[0][col].set_title(f"{svc}: SLO attainment")
        axes[1][col].set_title(f"{svc}: P99 TTFT (s, log)")
        axes[1][col].set_yscale("log")
        for ax in (axes[0][col], axes[1][col]):
            ax.set_xlabel("requests/s")
            ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(OUT / "sweep.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 4, figsize=(16, 3.8))
    for ax, (group, label) in zip(
        axes,
        (("alpha", "alpha"), ("burstiness", "cv"), ("cluster", "gpus"), ("models", "models")),
        strict=True,
    ):
        sel = [r for r in rows if r["group"] == group]
        for p in SENS_POLICIES:
            pts = sorted(
                ((r[label] if r[label] is not None else 0.0), r["ttft_p99_s"])
                for r in sel
                if r["policy"] == p
            )
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=p, color=COLOURS[p])
        ax.set_yscale("log")
        ax.set_xlabel(label + (" (0 = trace)" if group == "burstiness" else ""))
        ax.set_title(f"P99 TTFT vs {group}")
        ax.grid(True, alpha=0.3)
        if group in ("cluster", "models"):
            ax.set_xscale("log", base=2)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(OUT / "sensitivity.png", dpi=110)
    plt.close(fig)


def cost_curve() -> list[dict[str, Any]]:
    points = []
    for nodes in (8, 16, 32, 64, 128):
        res = subprocess.run(
            [sys.executable, str(ROOT / "benchmarks" / "planner_tick.py"), "--nodes", str(nodes),
             "--models", str(nodes * 2), "--repeats", "3"],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
        points.append(json.loads(res.stdout))
    fig, ax = plt.subplots(figsize=(6, 4))
    gpus = [p["gpus"] for p in points]
    curves = (
        ("steady_plan_ms", "plan, populated cluster"),
        ("shifted_plan_ms", "plan after forecasts move"),
        ("autoscaler_all_models_ms", "autoscaler, all models"),
        ("cold_plan_ms", "first plan, empty cluster"),
    )
    for key, label in curves:
        ax.plot(gpus, [p[key] for p in points], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("GPUs (models = GPUs / 4)")
    ax.set_ylabel("ms")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(OUT / "control_cost.png", dpi=110)
    plt.close(fig)
    return points


def _row_key(r: dict[str, Any]) -> tuple[Any, ...]:
    labels = [(k, r[k]) for k in ("service", "rps", "alpha", "cv", "gpus", "models") if k in r]
    return (r["group"], json.dumps(labels), ALL.index(r["policy"]))


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--jobs", type=int, default=2, help="worker processes")
    ap.add_argument(
        "--quick", action="store_true", help="fewer points (a smoke run, not for the doc)"
    )
    ap.add_argument(
        "--replot", action="store_true", help="redo tables and plots from docs/eval/results.json"
    )
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    if args.replot:
        saved = json.loads((OUT / "results.json").read_text())
        heads = headline(saved["runs"])
        (OUT / "tables.md").write_text(tables(saved["runs"], heads))
        plots(saved["runs"])
        return
    todo = jobs(args.quick)
    rows: list[dict[str, Any]] = []
    with (
        ProcessPoolExecutor(args.jobs) as pool,
        tqdm(total=len(todo), unit="run", desc="evaluate") as bar,
    ):
        futures = {pool.submit(run_job, j): j for j in todo}
        for fut in as_completed(futures):
            rows += fut.result()
            group, labels, _, _ = futures[fut]
            bar.set_postfix_str(f"{group} {labels}")
            bar.update()
    rows.sort(key=_row_key)
    heads = headline(rows)
    print("control-plane cost curve ...", flush=True)
    cost = cost_curve()
    (OUT / "results.json").write_text(
        json.dumps({"headline": heads, "runs": rows, "control_cost": cost}, indent=1) + "\n"
    )
    (OUT / "tables.md").write_text(tables(rows, heads))
    plots(rows)
    print(json.dumps(heads, indent=2))
    print(f"wrote {OUT}/results.json, tables.md, sweep.png, sensitivity.png, control_cost.png")


if __name__ == "__main__":
    main()
