"""Writes a simulation's results: summary.json, report.md and plots."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from warmserve.sim.runner import PolicyResult
from warmserve.workload.records import write_request_rows

_COLUMNS = [
    ("arrived", "arrived", "{}"),
    ("completed", "done", "{}"),
    ("failed", "failed", "{}"),
    ("ttft_p50_s", "TTFT p50 s", "{:.3f}"),
    ("ttft_p90_s", "TTFT p90 s", "{:.3f}"),
    ("ttft_p99_s", "TTFT p99 s", "{:.3f}"),
    ("tpot_mean_s", "TPOT mean ms", "ms"),
    ("tpot_p99_s", "TPOT p99 ms", "ms"),
    ("slo_attainment", "SLO", "{:.1%}"),
    ("cold_starts", "cold", "{}"),
    ("prewarm_hits", "hits", "{}"),
    ("forecast_peak_rel_error", "fcst err", "{:.1%}"),
]


def _cell(value: Any, fmt: str) -> str:
    if value is None:
        return "–"
    if fmt == "ms":
        return f"{value * 1e3:.1f}"
    return fmt.format(value)


def _table(rows: Sequence[tuple[str, dict[str, Any]]]) -> list[str]:
    head = "| | " + " | ".join(h for _, h, _ in _COLUMNS) + " |"
    sep = "|---" * (len(_COLUMNS) + 1) + "|"
    body = [
        f"| {name} | " + " | ".join(_cell(s.get(k), f) for k, _, f in _COLUMNS) + " |"
        for name, s in rows
    ]
    return [head, sep, *body]


def write_report(
    out: Path,
    experiment: str,
    results: Sequence[PolicyResult],
    meta: dict[str, Any],
    summaries: dict[str, dict[str, Any]] | None = None,
) -> None:
    """`summaries` replaces the runs' own summaries (a sweep adds its curve to them)."""
    out.mkdir(parents=True, exist_ok=True)
    summaries = summaries or {r.policy: r.summary for r in results}
    summary = {"experiment": experiment, **meta, "policies": summaries}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = [f"# {experiment}", "", "## All policies", ""]
    lines += _table([(r.policy, r.summary) for r in results])
    if "sweep" in meta:
        lines += _sweep_section(meta["sweep"], summaries)
        _plot_sweep(out, meta["sweep"], summaries)
    for r in results:
        lines += ["", f"## {r.policy}", ""]
        lines += _table([("all", r.summary), *r.summary["per_model"].items()])
    lines += [
        "",
        "TTFT includes queueing and instance start-up; failed requests count as "
        f"{meta.get('failed_ttft_s', 999)} s. SLO = share of arrived requests meeting both the "
        "TTFT and TPOT bounds. cold/hits: instance starts by path. fcst err: mean relative "
        "error of the forecast 5-minute peak concurrency.",
        "",
        "Plots: `ttft_cdf.png`, `memory_<policy>.png` (pages per GPU by use over time).",
    ]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    write_request_rows(out / "requests.csv", (row for r in results for row in r.requests))
    _plot_ttft(out / "ttft_cdf.png", results)
    for r in results:
        _plot_memory(out / f"memory_{r.policy}.png", r)


def _plot_ttft(path: Path, results: Sequence[PolicyResult]) -> None:
    curves = []
    for r in results:
        log = r.log
        ttft = (log.first_token_s - log.arrival_s)[~np.isnan(log.first_token_s)]
        curves.append((r.policy, ttft, len(log.arrival_s)))
    plot_ttft_cdf(path, curves)


def plot_ttft_cdf(path: Path, curves: Sequence[tuple[str, np.ndarray, int]]) -> None:
    """One CDF per (label, TTFTs of finished requests, requests in all): unfinished ones keep
    each curve below 1."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, ttft, total in curves:
        if len(ttft):
            ax.plot(np.sort(ttft), np.arange(1, len(ttft) + 1) / total, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("TTFT (s, log scale)")
    ax.set_ylabel("fraction of requests")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_memory(path: Path, r: PolicyResult) -> None:
    mem = r.memory
    if len(mem.time_s) == 0:
        return
    num_gpus = mem.free.shape[1]
    cols = min(num_gpus, 8)
    rows = -(-num_gpus // cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(2.2 * cols, 1.8 * rows), sharex=True, sharey=True, squeeze=False
    )
    gib = 2 / 1024  # pages of 2 MiB
    for g in range(num_gpus):
        ax = axes[g // cols][g % cols]
        parts = [mem.weights[:, g], mem.kv[:, g], mem.prewarm[:, g], mem.free[:, g]]
        ax.stackplot(
            mem.time_s / 60,
            *(p * gib for p in parts),
            labels=["serving weights", "KV cache", "prewarmed", "free"],
            colors=["#d62728", "#1f77b4", "#2ca02c", "#e0e0e0"],
        )
        ax.set_title(f"GPU {g}", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in axes.flat[num_gpus:]:
        ax.set_visible(False)
    axes[0][0].legend(loc="lower left", fontsize=6)
    fig.supxlabel("time (min)", fontsize=9)
    fig.supylabel("GiB", fontsize=9)
    fig.suptitle(f"{r.policy}: device memory by use", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _sweep_section(sweep: dict[str, Any], summaries: dict[str, dict[str, Any]]) -> list[str]:
    key = sweep["key"]
    lines = ["", f"## Sweep over {key}", ""]
    lines.append(f"| policy | {key} | SLO | TTFT p99 s | done | max {key} at SLO |")
    lines.append("|---|---|---|---|---|---|")
    for policy, s in summaries.items():
        best = s.get("max_rps_at_slo", "–") if key == "rps" else "–"
        for pt in s["sweep"]:
            lines.append(
                f"| {policy} | {pt[key]:g} | {_cell(pt['slo_attainment'], '{:.1%}')} | "
                f"{_cell(pt['ttft_p99_s'], '{:.3f}')} | {pt['completed']}/{pt['arrived']} | "
                f"{best if best is not None else 'none'} |"
            )
    target = f"{sweep['slo_target']:.0%}"
    lines += [
        "",
        f"Max {key} at SLO: the highest swept value whose SLO attainment is >= {target}. "
        f"Plot: `sweep_{key}.png`.",
    ]
    return lines


def _plot_sweep(out: Path, sweep: dict[str, Any], summaries: dict[str, dict[str, Any]]) -> None:
    key = sweep["key"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for policy, s in summaries.items():
        xs = [pt[key] for pt in s["sweep"]]
        a1.plot(xs, [pt["slo_attainment"] or 0 for pt in s["sweep"]], marker="o", label=policy)
        a2.plot(xs, [pt["ttft_p99_s"] for pt in s["sweep"]], marker="o", label=policy)
    a1.axhline(sweep["slo_target"], color="grey", linestyle="--", linewidth=1)
    a1.set_xlabel(key)
    a1.set_ylabel("SLO attainment")
    a2.set_xlabel(key)
    a2.set_ylabel("TTFT p99 (s, log)")
    a2.set_yscale("log")
    for ax in (a1, a2):
        ax.set_xscale("log")
        ax.grid(True, alpha=0.3)
    a1.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / f"sweep_{key}.png", dpi=120)
    plt.close(fig)
