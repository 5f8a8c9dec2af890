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

from warmserve.sim.overrides import spread
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


def flag_text(s: dict[str, Any]) -> str:
    """The models of a summary with failed or never-served requests, in bold; '' if none."""
    parts = []
    for name, m in s.get("per_model", {}).items():
        if m.get("flagged"):
            parts.append(f"**{name}: {m['failed']} failed, {m['never_served']} never served**")
    return "; ".join(parts)


def _table(rows: Sequence[tuple[str, dict[str, Any]]], pooled: bool = False) -> list[str]:
    """One row a summary. `pooled`: policy rows, with the worst model's P99 TTFT and the
    flagged models beside the pooled figures. Otherwise per-model rows, a flagged model's
    name in bold with its never-served count."""
    extra = ["worst model p99 s", "flagged models"] if pooled else ["never served"]
    head = "| | " + " | ".join([h for _, h, _ in _COLUMNS] + extra) + " |"
    sep = "|---" * (len(_COLUMNS) + len(extra) + 1) + "|"
    body = []
    for name, s in rows:
        cells = [_cell(s.get(k), f) for k, _, f in _COLUMNS]
        if pooled:
            worst = s.get("worst_model")
            p99 = _cell(s.get("worst_model_ttft_p99_s"), "{:.3f}")
            cells += [f"{p99} ({worst})" if worst else "–", flag_text(s) or "none"]
        else:
            cells.append(_cell(s.get("never_served"), "{}"))
            if s.get("flagged"):
                name = f"**{name} (failed/never served)**"
        body.append(f"| {name} | " + " | ".join(cells) + " |")
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
    lines += _table([(r.policy, r.summary) for r in results], pooled=True)
    if "sweep" in meta:
        lines += _sweep_section(meta["sweep"], summaries)
        _plot_sweep(out, meta["sweep"], summaries)
    if "seeds" in meta:
        lines += _seeds_section(meta["seeds"])
    for r in results:
        lines += ["", f"## {r.policy}", ""]
        lines += _table([("all", r.summary), *r.summary["per_model"].items()])
    lines += [
        "",
        "Flagged (bold): a model with any failed or never-served request, whatever the pooled "
        "attainment says; worst model p99: the highest per-model P99 TTFT. "
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
    rate = key in ("rps", "workload.rps")
    lines = ["", f"## Sweep over {key}", ""]
    lines.append(f"| policy | {key} | SLO | TTFT p99 s | worst model p99 s | done | flagged |")
    lines.append("|---|---|---|---|---|---|---|")
    for policy, s in summaries.items():
        for pt in s["sweep"]:
            flagged = pt.get("flagged_models") or []
            lines.append(
                f"| {policy} | {_value(pt[key])} | {_cell(pt['slo_attainment'], '{:.1%}')} | "
                f"{_cell(pt['ttft_p99_s'], '{:.3f}')} | "
                f"{_cell(pt.get('worst_model_ttft_p99_s'), '{:.3f}')} | "
                f"{pt['completed']}/{pt['arrived']} | "
                f"{'**' + ', '.join(flagged) + '**' if flagged else ''} |"
            )
    if rate:
        lines += ["", "| policy | max rps at 90 % | max rps at 99 % |", "|---|---|---|"]
        for policy, s in summaries.items():
            cells = []
            for suffix in ("", "_99"):
                best = s.get(f"max_rps_at_slo{suffix}")
                text = "none" if best is None else f"{best:g}"
                if s.get(f"max_rps_at_slo{suffix}_censored"):
                    text = f"≥ {text} (censored)"
                cells.append(text)
            lines.append(f"| {policy} | {cells[0]} | {cells[1]} |")
        lines += [
            "",
            "Max rps at SLO: the highest swept rate whose SLO attainment is >= the target. "
            "Censored: the top of the sweep still meets it, so the true maximum lies beyond the "
            "sweep and a ratio taken from it is only a bound.",
        ]
    lines += ["", f"Plot: `sweep_{_slug(key)}.png`."]
    return lines


def _value(v: Any) -> str:
    return f"{v:g}" if isinstance(v, int | float) and not isinstance(v, bool) else str(v)


def _slug(key: str) -> str:
    return key.replace(".", "_")


def seeds_summary(seeds: list[int], per_seed: list[dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """Mean and min-max over seeds of each policy's P99 TTFT, attainment, worst-model P99,
    failed and never-served counts (and max rps at SLO for rate sweeps), plus the models
    flagged in any seed."""
    out: dict[str, Any] = {"seeds": seeds, "policies": {}}
    keys = ["ttft_p99_s", "slo_attainment", "worst_model_ttft_p99_s", "failed", "never_served"]
    keys += ["max_rps_at_slo", "max_rps_at_slo_99"]
    for policy in per_seed[0]:
        runs = [s[policy] for s in per_seed]
        agg: dict[str, Any] = {k: spread([r.get(k) for r in runs]) for k in keys if k in runs[0]}
        agg["flagged_models"] = sorted({m for r in runs for m in r.get("flagged_models", [])})
        if "max_rps_at_slo_censored" in runs[0]:
            agg["censored"] = any(r["max_rps_at_slo_censored"] for r in runs)
            agg["censored_99"] = any(r["max_rps_at_slo_99_censored"] for r in runs)
        out["policies"][policy] = agg
    return out


def _seeds_section(agg: dict[str, Any]) -> list[str]:
    n = len(agg["seeds"])
    lines = ["", f"## Over {n} seeds ({', '.join(map(str, agg['seeds']))})", ""]
    lines.append("| policy | TTFT p99 s, mean [min-max] | SLO, mean [min-max] | worst model p99 s "
                 "| never served | flagged in any seed |")  # fmt: skip
    lines.append("|---|---|---|---|---|---|")

    def fmt(d: dict[str, Any] | None, f: str) -> str:
        if not d or d["mean"] is None:
            return "–"
        return f"{_cell(d['mean'], f)} [{_cell(d['min'], f)}-{_cell(d['max'], f)}]"

    for policy, a in agg["policies"].items():
        flagged = a["flagged_models"]
        lines.append(
            f"| {policy} | {fmt(a['ttft_p99_s'], '{:.3f}')} | "
            f"{fmt(a['slo_attainment'], '{:.1%}')} | "
            f"{fmt(a.get('worst_model_ttft_p99_s'), '{:.3f}')} | "
            f"{fmt(a.get('never_served'), '{:.1f}')} | "
            f"{'**' + ', '.join(flagged) + '**' if flagged else 'none'} |"
        )
    lines += ["", "Sections above show the first seed. A difference between policies inside "
              "these ranges is no difference."]  # fmt: skip
    return lines


def _plot_sweep(out: Path, sweep: dict[str, Any], summaries: dict[str, dict[str, Any]]) -> None:
    key = sweep["key"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    numeric = all(
        isinstance(pt[key], int | float) and not isinstance(pt[key], bool) and pt[key] > 0
        for s in summaries.values()
        for pt in s["sweep"]
    )
    for policy, s in summaries.items():
        xs = [pt[key] if numeric else str(pt[key]) for pt in s["sweep"]]
        a1.plot(xs, [pt["slo_attainment"] or 0 for pt in s["sweep"]], marker="o", label=policy)
        a2.plot(xs, [pt["ttft_p99_s"] for pt in s["sweep"]], marker="o", label=policy)
    a1.axhline(sweep["slo_target"], color="grey", linestyle="--", linewidth=1)
    a1.set_xlabel(key)
    a1.set_ylabel("SLO attainment")
    a2.set_xlabel(key)
    a2.set_ylabel("TTFT p99 (s, log)")
    a2.set_yscale("log")
    for ax in (a1, a2):
        if numeric:
            ax.set_xscale("log")
        ax.grid(True, alpha=0.3)
    a1.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / f"sweep_{_slug(key)}.png", dpi=120)
    plt.close(fig)
