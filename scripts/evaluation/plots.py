"""Results -> docs/eval/*.png (matplotlib, headless): the sweep curves, the cost sensitivity and
the workload sensitivity; and the control-plane cost curve (benchmarks/planner_tick.py at
growing cluster sizes), plotted as it is measured."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from .aggregate import mean_curve, select, stat
from .cells import ALL, BANDS, ROOT, SENS_POLICIES, SWEEPS, TARGETS

COLOURS = dict(
    zip(
        ALL,
        [
            "#1f77b4",
            "#ff7f0e",
            "#2ca02c",
            "#98df8a",
            "#d62728",
            "#9467bd",
            "#8c564b",
            "#e377c2",
            "#f7b6d2",
            "#7f7f7f",
            "#bcbd22",
            "#17becf",
        ],
        strict=True,
    )
)


def _save(fig: Any, legend_ax: Any, path: Path) -> None:
    """Every figure's ending: a legend on `legend_ax`, laid out, written, closed."""
    legend_ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plots(rows: list[dict[str, Any]], res: dict[str, Any], out: Path) -> None:
    """The sweep, cost-sensitivity and (when run) workload-sensitivity plots, into `out`."""
    svcs = [s for s in SWEEPS if any(r["group"] == "sweep" and r["service"] == s for r in rows)]
    if svcs:
        fig, axes = plt.subplots(2, len(svcs), figsize=(5.3 * len(svcs), 7.5), squeeze=False)
        for col, svc in enumerate(svcs):
            for p in res["sweeps"][svc]["by_policy"]:
                kw = {"marker": "o", "ms": 3, "label": p, "color": COLOURS.get(p)}
                for ax, key in ((axes[0][col], "slo_attainment"), (axes[1][col], "ttft_p99_s")):
                    pts = [
                        (x, stat(select(rows, "sweep", p, service=svc, rps=x), key))
                        for x in sorted(mean_curve(rows, svc, p))
                    ]
                    got = [(x, y) for x, y in pts if y is not None]  # faults left out
                    xs = [x for x, _ in got]
                    ax.plot(xs, [y.mean for _, y in got], **kw)
                    ax.fill_between(
                        xs,
                        [y.lo for _, y in got],
                        [y.hi for _, y in got],
                        color=COLOURS.get(p),
                        alpha=0.15,
                    )
            for t in TARGETS:
                axes[0][col].axhline(t, color="grey", ls="--", lw=1)
            axes[0][col].set_title(f"{svc}: SLO attainment")
            axes[1][col].set_title(f"{svc}: P99 TTFT (s, log)")
            axes[1][col].set_yscale("log")
            for ax in (axes[0][col], axes[1][col]):
                ax.set_xlabel("requests/s (band: min-max over seeds)")
                ax.set_xscale("log", base=2)
                ax.grid(True, alpha=0.3)
        _save(fig, axes[0][0], out / "sweep.png")

    # The cost sensitivity: the ratio against each assumed cost, the others at their cited value.
    fig, axes = plt.subplots(1, len(BANDS), figsize=(5.2 * len(BANDS), 3.9), squeeze=False)
    for ax, b in zip(axes[0], BANDS, strict=True):
        k = b.get("scale", 1.0)
        for label, v in res["band"].items():
            if not label.startswith("conv:"):
                continue
            pts = [(res["cited"][b["key"]], p) for p in v["points"] if p["key"] == "cited"]
            pts += [(p["value"], p) for p in v["points"] if p["key"] == b["key"]]
            pts.sort(key=lambda x: x[0])
            xs = [x / k for x, _ in pts]
            ax.plot(xs, [p["mean"] for _, p in pts], marker="o", label=label.split(": ")[1])
            ax.fill_between(xs, [p["lo"] for _, p in pts], [p["hi"] for _, p in pts], alpha=0.15)
        ax.axvline(res["cited"][b["key"]] / k, color="grey", ls="--", lw=1)
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_yscale("log")
        ax.set_xscale("log")
        ax.set_xlabel(b["label"] + " (dashed: cited)")
        ax.set_title("P99 TTFT ratio, Azure Conversation, 1 rps", fontsize=9)
        ax.grid(True, alpha=0.3)
    _save(fig, axes[0][0], out / "cost_sensitivity.png")

    groups = [
        g
        for g in ("alpha", "burstiness", "cluster", "models")
        if any(r["group"] == g for r in rows)
    ]
    if groups:
        labels = {"alpha": "alpha", "burstiness": "cv", "cluster": "gpus", "models": "models"}
        fig, axes = plt.subplots(1, len(groups), figsize=(4 * len(groups), 3.8), squeeze=False)
        for ax, group in zip(axes[0], groups, strict=True):
            label = labels[group]
            sel = [r for r in rows if r["group"] == group]
            for p in SENS_POLICIES:
                xs = sorted(
                    {r[label] for r in sel if r["policy"] == p},
                    key=lambda x: (x is not None, x or 0),
                )
                ys = [
                    stat([r for r in sel if r["policy"] == p and r[label] == x], "ttft_p99_s")
                    for x in xs
                ]
                ax.plot(
                    [x or 0.0 for x in xs],
                    [y.mean for y in ys],  # type: ignore[union-attr]
                    marker="o",
                    label=p,
                    color=COLOURS.get(p),
                )
            ax.set_yscale("log")
            ax.set_title(f"P99 TTFT vs {group}")
            ax.grid(True, alpha=0.3)
        _save(fig, axes[0][0], out / "sensitivity.png")


def cost_curve(out: Path) -> list[dict[str, Any]]:
    """The planner and autoscaler tick cost against cluster size; the plot goes into `out`."""
    points = []
    for nodes in (8, 16, 32, 64, 128):
        res = subprocess.run(
            [
                sys.executable,
                str(ROOT / "benchmarks" / "planner_tick.py"),
                "--nodes",
                str(nodes),
                "--models",
                str(nodes * 2),
                "--repeats",
                "3",
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        points.append(json.loads(res.stdout))
    fig, ax = plt.subplots(figsize=(6, 4))
    gpus = [p["gpus"] for p in points]
    for key, label in (
        ("steady_plan_ms", "plan, populated cluster"),
        ("shifted_plan_ms", "plan after forecasts move"),
        ("autoscaler_all_models_ms", "autoscaler, all models"),
        ("cold_plan_ms", "first plan, empty cluster"),
    ):
        ax.plot(gpus, [p[key] for p in points], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("GPUs (models = GPUs / 4)")
    ax.set_ylabel("ms")
    ax.grid(True, alpha=0.3)
    _save(fig, ax, out / "control_cost.png")
    return points
