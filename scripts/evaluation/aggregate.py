"""Rows -> results: a cell's rows and their spread over seeds, attainment curves, max rps at
each SLO target and its censoring, per-seed ratios (band, sweeps, ablations), and the row
bookkeeping shared by finish and --rerun (ordering, headline stand-ins, incomplete cells)."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from eval_stats import (
    Spread,
    censor_text,
    censoring,
    compare,
    fmt_ratio,
    max_rate,
    paired_ratios,
    ratio_censoring,
    spread,
)

from .cells import ABLATION, ALL, BANDS, SWEEPS, TARGETS, cited


def mean_curve(rows: list[dict[str, Any]], svc: str, policy: str) -> dict[float, float | None]:
    """rps -> attainment averaged over seeds."""
    by: dict[float, list[float | None]] = {}
    for r in rows:
        if r["group"] == "sweep" and r["service"] == svc and r["policy"] == policy:
            by.setdefault(r["rps"], []).append(r["slo_attainment"])
    out = {}
    for rps, vals in by.items():
        s = spread(vals)
        out[rps] = None if s is None else s.mean
    return out


def seed_curves(rows: list[dict[str, Any]], svc: str, policy: str) -> dict[int, dict[float, Any]]:
    out: dict[int, dict[float, Any]] = {}
    for r in rows:
        if r["group"] == "sweep" and r["service"] == svc and r["policy"] == policy:
            out.setdefault(r["seed"], {})[r["rps"]] = r["slo_attainment"]
    return out


def select(rows: list[dict[str, Any]], group: str, policy: str, **labels: Any) -> list[dict]:
    """A cell's rows (one per seed, sorted by seed)."""
    sel = [
        r
        for r in rows
        if r["group"] == group
        and r["policy"] == policy
        and all(r.get(k) == v for k, v in labels.items())
    ]
    return sorted(sel, key=lambda r: r["seed"])


def stat(cell: list[dict[str, Any]], key: str) -> Spread | None:
    return spread(r[key] for r in cell)


def model_stat(cell: list[dict[str, Any]], model: str, key: str = "ttft_p99_s") -> Spread | None:
    return spread(r["per_model"][model][key] for r in cell if model in r["per_model"])


def ratio(num: list[dict[str, Any]], den: list[dict[str, Any]], key: str) -> Spread | None:
    """Per-seed num[key] / den[key], paired by seed."""
    a = {r["seed"]: r[key] for r in num}
    b = {r["seed"]: r[key] for r in den}
    seeds = sorted(set(a) & set(b))
    return spread(paired_ratios([a[s] for s in seeds], [b[s] for s in seeds]))


def _d(s: Spread | None) -> dict[str, Any] | None:
    return None if s is None else dataclasses.asdict(s)


def sweep_results(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per service and policy: max rps at each target per seed, its spread and censoring; and
    the WarmServe (and warmserve-plus) / MuxServe ratios, per seed, with how they are bounded."""
    out: dict[str, Any] = {}
    for svc in SWEEPS:
        pols = sorted({r["policy"] for r in rows if r["group"] == "sweep" and r["service"] == svc})
        by: dict[str, Any] = {}
        for p in pols:
            curves = seed_curves(rows, svc, p)
            entry: dict[str, Any] = {"rates": sorted(mean_curve(rows, svc, p))}
            for t in TARGETS:
                per_seed = {s: max_rate(c, t) for s, c in sorted(curves.items())}
                cens = {censoring(c, t) for c in curves.values()}
                cen = "upper" if "upper" in cens else "never" if cens == {"never"} else ""
                entry[f"{t}"] = {
                    "per_seed": per_seed,
                    "spread": _d(spread(per_seed.values())),
                    "censored": cen,
                    "note": censor_text(p, cen, max(entry["rates"]), t),
                }
            by[p] = entry
        ratios: dict[str, Any] = {}
        for num in ("warmserve", "warmserve-plus"):
            if num not in by or "muxserve" not in by:
                continue
            for t in TARGETS:
                a, b = by[num][f"{t}"], by["muxserve"][f"{t}"]
                seeds = sorted(set(a["per_seed"]) & set(b["per_seed"]))
                r = spread(
                    paired_ratios(
                        [a["per_seed"][s] for s in seeds], [b["per_seed"][s] for s in seeds]
                    )
                )
                cen = ratio_censoring(a["censored"], b["censored"])
                never = [p for p, e in ((num, a), ("muxserve", b)) if e["censored"] == "never"]
                text = fmt_ratio(r, cen)
                if never:
                    verb = "meets" if len(never) == 1 else "meet"
                    text = f"undefined: {' and '.join(never)} {verb} {t:.0%} at no rate swept"
                ratios[f"{num}/muxserve@{t}"] = {"spread": _d(r), "censored": cen, "text": text}
        out[svc] = {"by_policy": by, "ratios": ratios}
    return out


def _num(x: Any) -> float:
    return float(x) if isinstance(x, int | float) else 0.0


def band_results(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """ServerlessLLM (as shipped and tuned) P99 over WarmServe's and warmserve-plus's, per seed,
    at the cited costs (the headline cells) and at every band point; the band is the range of
    the per-cell means, with the settings at each end."""
    out: dict[str, Any] = {}
    services = sorted({r["service"] for r in rows if r["group"] == "headline"})
    for svc in services:
        for num in ("serverlessllm", "serverlessllm-tuned"):
            for den in ("warmserve", "warmserve-plus"):
                at = ratio(
                    select(rows, "headline", num, service=svc),
                    select(rows, "headline", den, service=svc),
                    "ttft_p99_s",
                )
                if at is None:
                    continue
                points = [("cited", None, at)]
                keys = sorted(
                    {(r["key"], r["value"]) for r in rows
                     if r["group"] == "band" and r["service"] == svc},
                    key=lambda kv: (kv[0] == "corner", kv[0], _num(kv[1]), str(kv[1])),
                )  # fmt: skip
                for key, value in keys:
                    r = ratio(
                        select(rows, "band", num, service=svc, key=key, value=value),
                        select(rows, "band", den, service=svc, key=key, value=value),
                        "ttft_p99_s",
                    )
                    if r is not None:
                        points.append((key, value, r))
                lo = min(points, key=lambda p: p[2].mean)
                hi = max(points, key=lambda p: p[2].mean)
                out[f"{svc}: {num}/{den}"] = {
                    "cited": _d(at),
                    "cited_text": fmt_ratio(at),
                    "band": [lo[2].mean, hi[2].mean],
                    "band_low_at": [lo[0], lo[1]],
                    "band_high_at": [hi[0], hi[1]],
                    "points": [{"key": k, "value": v, **(_d(s) or {})} for k, v, s in points],
                }
    return out


def ablation_results(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per model count: each variant against full WarmServe, by P99 and attainment."""
    out: dict[str, Any] = {}
    for count in sorted({r["models"] for r in rows if r["group"] == "ablation"}):
        ref = select(rows, "ablation", "warmserve", models=count)
        entry = {}
        for p in ABLATION:
            cell = select(rows, "ablation", p, models=count)
            if not cell or p == "warmserve":
                continue
            entry[p] = {
                "p99_vs_warmserve": compare(stat(cell, "ttft_p99_s"), stat(ref, "ttft_p99_s")),
                "p99_ratio_over_warmserve": _d(ratio(cell, ref, "ttft_p99_s")),
                "attainment_vs_warmserve": compare(
                    stat(cell, "slo_attainment"), stat(ref, "slo_attainment")
                ),
            }
        out[str(count)] = entry
    return out


def analyse(rows: list[dict[str, Any]], meta: dict[str, Any]) -> dict[str, Any]:
    return {
        "meta": meta,
        "cited": {b["key"]: cited(b["key"]) for b in BANDS},
        "band": band_results(rows),
        "sweeps": sweep_results(rows),
        "ablations": ablation_results(rows),
        "errors": [
            {
                k: r.get(k)
                for k in (
                    "group",
                    "service",
                    "rps",
                    "models",
                    "key",
                    "value",
                    "seed",
                    "policy",
                    "error",
                )
            }
            for r in rows
            if r.get("error")
        ],
    }


def _row_key(r: dict[str, Any]) -> tuple[Any, ...]:
    labels = [
        (k, r[k])
        for k in ("service", "key", "value", "rps", "alpha", "cv", "gpus", "models")
        if k in r
    ]
    order = ALL.index(r["policy"]) if r["policy"] in ALL else len(ALL)
    return (r["group"], json.dumps(labels, default=str), order, r["seed"])


def with_headline_points(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The headline cells are the sweeps' 1 rps points (the same experiment and seeds): where a
    sweep lacks its 1 rps point, they stand in, marked `from_headline`."""
    have = {(r["service"], r["policy"]) for r in rows if r["group"] == "sweep" and r["rps"] == 1}
    swept = {(r["service"], r["policy"]) for r in rows if r["group"] == "sweep"}
    extra = [
        {**r, "group": "sweep", "rps": 1.0, "from_headline": True}
        for r in rows
        if r["group"] == "headline" and (r["service"], r["policy"]) in swept - have
    ]
    return rows + extra


def incomplete(rows: list[dict[str, Any]], seeds: int) -> list[str]:
    """Cells with fewer seeds than asked (a run cut short): named in the tables' header."""
    count: dict[str, int] = {}
    for r in rows:
        labels = {k: r[k] for k in ("service", "key", "value", "rps", "models", "alpha", "cv",
                                    "gpus") if k in r}  # fmt: skip
        name = f"{r['group']} {labels} {r['policy']}"
        count[name] = count.get(name, 0) + 1
    return sorted(n for n, c in count.items() if c < seeds)
