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

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import os
import pickle
import subprocess
import sys
import time
from collections.abc import Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_stats import (
    NO_DIFFERENCE,
    Spread,
    bold_if,
    censor_text,
    censoring,
    compare,
    flagged_models,
    fmt_ratio,
    fmt_spread,
    max_rate,
    next_rates,
    paired_ratios,
    ratio_censoring,
    spread,
)

from warmserve.control.registry import POLICIES
from warmserve.experiment import Experiment, parse_experiment, read_yaml

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "eval"
EXPERIMENTS = ROOT / "experiments"
SEEDS = (1, 2, 3, 4, 5)
TARGETS = (0.9, 0.99)

# Policy lists; names not registered (yet) are dropped at run time, so the script runs on any
# checkout of the simulator.
ALL = [
    "warmserve",
    "warmserve-plus",
    "warmserve-no-placement",
    "warmserve-no-placement-ref",
    "warmserve-no-prewarm",
    "warmserve-no-kv-prewarm",
    "oracle",
    "serverlessllm",
    "serverlessllm-tuned",
    "muxserve",
    "static",
    "vanilla-autoscale",
]
SWEEP_POLICIES = [
    "warmserve",
    "warmserve-plus",
    "serverlessllm",
    "serverlessllm-tuned",
    "muxserve",
    "static",
    "vanilla-autoscale",
]
QUICK_SWEEP_POLICIES = ["warmserve", "warmserve-plus", "serverlessllm", "muxserve"]
BAND_POLICIES = ["warmserve", "warmserve-plus", "serverlessllm", "serverlessllm-tuned"]
ABLATION = [
    "warmserve",
    "warmserve-no-placement",
    "warmserve-no-placement-ref",
    "warmserve-no-prewarm",
    "warmserve-no-kv-prewarm",
    "oracle",
    "warmserve-plus",
    "vanilla-autoscale",
]
SENS_POLICIES = ["warmserve", "warmserve-plus", "serverlessllm", "muxserve", "vanilla-autoscale"]
SENS_RPS = 16.0
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
MIXED = [("llama-2-7b", 1), ("llama-2-7b", 1), ("llama-2-13b", 2), ("llama-2-70b", 4)]

# Rate sweeps: the starting grid, the cap of the upward extension, and the mixed-model count.
SWEEPS: dict[str, dict[str, Any]] = {
    "conv": {"base": "paper-azure-conv", "grid": [1, 4, 16, 32, 48, 64], "cap": 256},
    "code": {"base": "paper-azure-code", "grid": [1, 4, 16, 64, 128], "cap": 512},
    "conv-8models": {
        "base": "paper-azure-conv",
        "models": 8,
        "grid": [1, 2, 4, 8, 16, 32],
        "cap": 128,
    },
}
SWEEP_TITLES = {
    "conv": "Azure Conversation",
    "code": "Azure Coding",
    "conv-8models": "Azure Conversation, 8 models of mixed size",
}
MAX_ROUNDS = 8  # extension and bisection rounds after the starting grid
REL_RESOLUTION = 0.1  # bisect a knee until its bracket is within this share of the rate
# --quick: fewer starting rates (the extension and bisection find the rest) and a coarser knee.
QUICK_GRIDS = {
    "conv": [1, 16, 32, 48, 64],
    "code": [1, 16, 64, 128],
    "conv-8models": [1, 4, 8, 16, 32],
}
QUICK_RESOLUTION = 0.15

# Assumed costs that set a headline: the key, its band, and where the cited value comes from.
# The cited value itself is read from the experiment (profile + YAML), so it cannot drift
# from what the headline runs used.
BANDS: list[dict[str, Any]] = [
    {
        "key": "costs.serverless_engine_init_s",
        "label": "ServerlessLLM engine start (s)",
        "values": [10.0, 20.0, 34.0, 60.0],
        "source": "vLLM issue #20264: 'init engine (profile, create kv cache, warmup model) took "
        "34.11 seconds' (CUDA-graph capture 17 s); band 10 s (RFC #20098: graph capture "
        "alone can take more than 10 s) to 60 s (#19824: ~60 s of capture for a 70B, TP 8)",
    },
    {
        "key": "costs.engine_attach_s",
        "label": "WarmServe attach on a prewarm hit (s)",
        "values": [0.05, 0.1, 0.3, 0.6, 1.0],
        "source": "assumption: a parked engine attaches to resident weights (Python engine "
        "construction is a few hundred ms); the paper reports no switch time",
    },
    {
        "key": "costs.host_node_bandwidth",
        "label": "node host-to-device bandwidth (GB/s)",
        "scale": 1e9,
        "values": [25e9, 52e9, 110e9, 220e9],
        "source": "ServerlessLLM h100_2025 benchmark: Qwen3-32B (65.5 GB) from DRAM in 1.253 s on "
        "an 8xH100 SXM node; 25 GB/s: its issue #14 (8xA100); 220 GB/s: 4 PCIe Gen5 "
        "switch uplinks x 55 GB/s",
    },
]
QUICK_SKIPS = [
    "sweep policies serverlessllm-tuned, static and vanilla-autoscale",
    "ablation at 32 models (8 and 16 only)",
    "ServeGen m-mid",
    "workload sensitivity: popularity skew, burstiness, cluster size, model count",
    "control-plane cost curve (carried over from the previous results.json)",
]
SUMMARY_KEYS = [
    "arrived",
    "completed",
    "failed",
    "ttft_p50_s",
    "ttft_p90_s",
    "ttft_p99_s",
    "tpot_mean_s",
    "slo_attainment",
    "cold_starts",
    "prewarm_hits",
    "inprogress_hits",
]
PER_MODEL_KEYS = ["arrived", "completed", "failed", "ttft_p99_s", "slo_attainment"]


# --- experiments: a spec (plain data, picklable) -> Experiment in the worker ---


def spec(base: str, *, models: int | None = None, **settings: Any) -> dict[str, Any]:
    """A cell's experiment as data: a shipped experiment, dotted overrides and a model count."""
    return {"base": base, "models": models, "set": settings}


def build(cell: dict[str, Any], seed: int, duration_s: float | None) -> Experiment:
    raw = copy.deepcopy(read_yaml(EXPERIMENTS / f"{cell['base']}.yaml"))
    raw["seed"] = seed
    if cell.get("models"):
        raw["models"] = [
            {
                "name": f"m{i:02d}-{p.removeprefix('llama-2-')}",
                "preset": p,
                "tp": tp,
                "max_model_len": 2048,
            }
            for i, (p, tp) in ((i, MIXED[i % len(MIXED)]) for i in range(cell["models"]))
        ]
    gpu: dict[str, Any] = {}
    for key, value in cell["set"].items():
        section, _, name = key.partition(".")
        if section == "gpu":  # device figures live in the profile, not the YAML
            gpu[name] = value
        else:
            raw.setdefault(section, {})
            raw[section] = {**(raw[section] or {}), name: value}
    if duration_s is not None:
        raw.setdefault("workload", {})["duration_s"] = duration_s
    exp = parse_experiment(raw, EXPERIMENTS, cell["base"])
    if gpu:
        assert exp.profile is not None
        device = dataclasses.replace(exp.profile.device, **gpu)
        exp = dataclasses.replace(exp, profile=dataclasses.replace(exp.profile, device=device))
    return exp


def cited(key: str) -> float:
    """The value the headline runs use for `key`."""
    exp = build(spec("paper-azure-conv"), 1, None)
    section, _, name = key.partition(".")
    obj = exp.gpu if section == "gpu" else getattr(exp, section)
    return float(getattr(obj, name))


# --- running ---

Task = tuple[str, dict[str, Any], dict[str, Any], int, list[str], float | None]


def run_task(task: Task) -> list[dict[str, Any]]:
    """One workload (one cell, one seed), several policies: the workload is built once."""
    from warmserve.sim.runner import make_workload, run_policy

    group, labels, cell, seed, policies, duration_s = task
    t0 = time.perf_counter()
    exp = build(cell, seed, duration_s)
    wl = cached_workload(exp, cell, seed, duration_s, make_workload)
    built = round(time.perf_counter() - t0, 2)
    rows = []
    for policy in policies:
        row: dict[str, Any] = {"group": group, **labels, "seed": seed, "policy": policy}
        t1 = time.perf_counter()
        try:
            s = run_policy(exp, policy, wl).summary
        except Exception as err:  # a simulator fault in one run is reported, not fatal
            row.update({k: None for k in SUMMARY_KEYS})
            row.update(per_model={}, error=f"{type(err).__name__}: {err}")
            rows.append(row)
            continue
        row.update({k: s.get(k) for k in SUMMARY_KEYS})
        row["per_model"] = {
            m: {k: v.get(k) for k in PER_MODEL_KEYS} for m, v in s["per_model"].items()
        }
        row["wall_s"] = round(time.perf_counter() - t1, 2)
        rows.append(row)
    if rows:
        rows[0]["workload_wall_s"] = built
    return rows


CACHE = Path("/tmp/warmserve-eval-workloads")
# What a workload is built from besides the experiment: a change here must not reuse old ones.
WORKLOAD_SOURCES = [
    "warmserve/workload",
    "warmserve/sim/latency.py",
    "warmserve/traces.py",
    "warmserve/models.py",
    "warmserve/model_spec.py",
    "warmserve/hardware.py",
]


def _sources_hash() -> str:
    h = hashlib.sha1()
    for rel in WORKLOAD_SOURCES:
        path = ROOT / rel
        for f in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            if f.exists():
                h.update(f.read_bytes())
    return h.hexdigest()


def cached_workload(
    exp: Experiment, cell: dict[str, Any], seed: int, duration_s: float | None, make: Any
) -> Any:
    """The cell's workload, from a disk cache shared by the worker processes: costs do not
    change a workload, so the band cells reuse the headline's, and a rerun reuses all. The
    forecast history (every earlier day of the trace) makes building one cost seconds."""
    settings = {k: v for k, v in cell["set"].items() if not k.startswith(("costs.", "gpu."))}
    base = (EXPERIMENTS / f"{cell['base']}.yaml").read_text()
    blob = json.dumps(
        [base, cell.get("models"), settings, seed, duration_s, _sources_hash()],
        sort_keys=True,
        default=str,
    )
    path = CACHE / f"{hashlib.sha1(blob.encode()).hexdigest()}.pkl"
    if path.exists():
        try:
            return pickle.loads(path.read_bytes())
        except Exception:  # a torn or stale file: rebuild it
            pass
    wl = make(exp)
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_bytes(pickle.dumps(wl, protocol=pickle.HIGHEST_PROTOCOL))
    tmp.replace(path)
    return wl


def task_cost(task: Task) -> float:
    """Rough work of a task (requests x policies), to start the longest first."""
    _, _, cell, _, policies, _ = task
    rps = float(cell["set"].get("workload.rps", 1.0))
    return rps * len(policies) * (1 + (cell.get("models") or 4) / 16)


class Runner:
    """Runs batches of tasks in a process pool behind one progress bar. Every finished task's
    rows are appended to `partial` at once, so a run cut short can still be reported
    (--from-partial); past `stop_at` the tasks not yet started are cancelled."""

    def __init__(self, jobs: int, partial: Path, stop_at: float) -> None:
        self.pool = ProcessPoolExecutor(jobs)
        self.bar = tqdm(total=0, unit="task", desc="evaluate", smoothing=0.05)
        self.partial = partial
        self.stop_at = stop_at
        self.cancelled = 0

    def run(self, tasks: list[Task], first: list[Task] = ()) -> list[dict[str, Any]]:  # type: ignore[assignment]
        """`first` before the rest (the cheap headline cells); then the longest first."""
        order = list(first) + sorted(tasks, key=task_cost, reverse=True)
        self.bar.total += len(order)
        self.bar.refresh()
        futures: dict[Future[list[dict[str, Any]]], Task] = {
            self.pool.submit(run_task, t): t for t in order
        }
        rows: list[dict[str, Any]] = []
        pending = set(futures)
        while pending:
            done, pending = wait(pending, timeout=10, return_when=FIRST_COMPLETED)
            for fut in done:
                if fut.cancelled():
                    continue
                got = fut.result()
                rows += got
                with self.partial.open("a") as f:
                    f.writelines(json.dumps(r, default=str) + "\n" for r in got)
                group, labels, _, seed, _, _ = futures[fut]
                self.bar.set_postfix_str(f"{group} {labels} seed {seed}")
                self.bar.update()
            if time.perf_counter() > self.stop_at:
                for fut in pending:
                    if fut.cancel():
                        self.cancelled += 1
                pending = {f for f in pending if not f.cancelled()}
        return rows

    def close(self) -> None:
        self.bar.close()
        self.pool.shutdown(cancel_futures=True)


def available(policies: Iterable[str]) -> list[str]:
    return [p for p in policies if p in POLICIES]


def fixed_tasks(
    quick: bool, seeds: list[int], duration_s: float | None, only: set[str] | None
) -> list[Task]:
    """Every task that does not depend on another's result (all but the sweep refinements)."""
    out: list[Task] = []

    def add(group: str, labels: dict[str, Any], cell: dict[str, Any], pols: list[str]) -> None:
        if only is None or group in only:
            for s in seeds:
                out.append((group, labels, cell, s, available(pols), duration_s))

    services = {"conv": "paper-azure-conv", "code": "paper-azure-code"}
    for svc, base in services.items():
        add("headline", {"service": svc}, spec(base), ALL)
        for band in BANDS:
            ref = cited(band["key"])
            for v in band["values"]:
                if v != ref:
                    add(
                        "band",
                        {"service": svc, "key": band["key"], "value": v},
                        spec(base, **{band["key"]: v}),
                        BAND_POLICIES,
                    )
        for corner, settings in corners().items():
            add(
                "band",
                {"service": svc, "key": "corner", "value": corner},
                spec(base, **settings),
                BAND_POLICIES,
            )
    for count in (8, 16) if quick else (8, 16, 32):
        add(
            "ablation",
            {"models": count},
            spec("paper-azure-conv", models=count, **{"workload.rps": SENS_RPS}),
            ABLATION,
        )
    if quick:
        return out
    add("servegen", {"service": "servegen-m-mid"}, spec("servegen-m-mid"), ALL)
    for alpha in (0.5, 1.0, 2.0):
        add(
            "alpha",
            {"alpha": alpha},
            spec("paper-azure-conv", **{"workload.rps": SENS_RPS, "workload.alpha": alpha}),
            SENS_POLICIES,
        )
    for cv in (None, 1.0, 2.0, 4.0):
        add(
            "burstiness",
            {"cv": cv},
            spec("paper-azure-conv", **{"workload.rps": SENS_RPS, "workload.burstiness_cv": cv}),
            SENS_POLICIES,
        )
    for nodes in (2, 4, 8, 16):
        scale = nodes // 2
        cell = spec(
            "paper-azure-conv",
            models=4 * scale,
            **{"cluster.nodes": nodes, "workload.rps": SENS_RPS * scale},
        )
        add("cluster", {"gpus": nodes * 8, "models": 4 * scale}, cell, SENS_POLICIES)
    for count in (4, 8, 16, 32, 64):
        cell = spec("paper-azure-conv", models=count, **{"workload.rps": SENS_RPS})
        add("models", {"models": count}, cell, SENS_POLICIES)
    return out


def corners() -> dict[str, dict[str, float]]:
    """The two ends of the band for the ServerlessLLM / WarmServe ratio: every cost at the end
    of its band that favours ServerlessLLM ('low'), and at the end that favours WarmServe."""
    sllm, attach, bw = (b["values"] for b in BANDS)
    k = [b["key"] for b in BANDS]
    return {
        "low": {k[0]: min(sllm), k[1]: max(attach), k[2]: max(bw)},
        "high": {k[0]: max(sllm), k[1]: min(attach), k[2]: min(bw)},
    }


def sweep_cell(svc: str, rps: float) -> dict[str, Any]:
    s = SWEEPS[svc]
    return spec(s["base"], models=s.get("models"), **{"workload.rps": float(rps)})


def run_sweeps(
    runner: Runner,
    policies: list[str],
    seeds: list[int],
    duration_s: float | None,
    deadline: float,
    first: list[Task],
    done: list[dict[str, Any]] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The starting grid (run together with `first`, the fixed tasks), then rounds of extension
    and bisection per policy until no policy needs another rate or the deadline passes.
    `done`: the rows of an earlier run to continue from (its grid is not run again)."""
    rows: list[dict[str, Any]] = list(done or [])
    plan: dict[tuple[str, float, int], list[str]] = {}
    if done is None:
        for svc, s in SWEEPS.items():
            for rps in s["grid"]:
                for seed in seeds:
                    plan[(svc, float(rps), seed)] = list(policies)
    else:
        plan = _next_plan(rows, policies, seeds)
    rounds = 0 if done is None else 1
    stopped_early = False
    while plan:
        tasks: list[Task] = [
            ("sweep", {"service": svc, "rps": rps}, sweep_cell(svc, rps), seed, pols, duration_s)
            for (svc, rps, seed), pols in plan.items()
        ]
        rows += runner.run(tasks, first)
        first = []
        plan = {}
        if rounds >= MAX_ROUNDS or time.perf_counter() > deadline or runner.cancelled:
            stopped_early = bool(_next_plan(rows, policies, seeds))
            break
        plan = _next_plan(rows, policies, seeds)
        rounds += 1
    meta = {"refinement_rounds": rounds, "stopped_by_deadline_or_round_limit": stopped_early}
    return rows, meta


def _next_plan(
    rows: list[dict[str, Any]], policies: list[str], seeds: list[int]
) -> dict[tuple[str, float, int], list[str]]:
    plan: dict[tuple[str, float, int], list[str]] = {}
    for svc, s in SWEEPS.items():
        for policy in policies:
            points = mean_curve([r for r in rows if r["group"] == "sweep"], svc, policy)
            for rps in next_rates(points, TARGETS, s["grid"], s["cap"], REL_RESOLUTION):
                for seed in seeds:
                    plan.setdefault((svc, rps, seed), []).append(policy)
    return plan


# --- aggregation ---


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


# --- tables ---


def _models(cell: list[dict[str, Any]]) -> list[str]:
    return list(cell[0]["per_model"]) if cell else []


def policy_row(policy: str, cell: list[dict[str, Any]], models: list[str]) -> str:
    """Pooled P99 and attainment, then each model's P99; flagged models (and the policy, when
    any model is flagged) in bold with what happened to them."""
    flags = flagged_models([r["per_model"] for r in cell])
    name = bold_if(policy, bool(flags))
    per = []
    for m in models:
        text = fmt_spread(model_stat(cell, m))
        if m in flags:
            text = f"**{text} ({flags[m]})**"
        per.append(text)
    failed = sum(r["failed"] or 0 for r in cell)
    faults = sum(1 for r in cell if r.get("error"))
    if faults:
        per.append(f"**simulator fault in {faults} of {len(cell)} seeds**")
        name = bold_if(policy, True)
    return (
        f"| {name} | {fmt_spread(stat(cell, 'ttft_p99_s'))} | "
        f"{fmt_spread(stat(cell, 'slo_attainment'), '{:.1f}', pct=True)} | "
        + " | ".join(per)
        + f" | {failed} |"
    )


def cell_table(
    rows: list[dict[str, Any]], group: str, policies: list[str], **labels: Any
) -> list[str]:
    cells = {p: select(rows, group, p, **labels) for p in policies}
    cells = {p: c for p, c in cells.items() if c}
    if not cells:
        return []
    models = _models(next(iter(cells.values())))
    lines = [
        "| policy | P99 TTFT s | SLO attainment | "
        + " | ".join(f"{m} P99 s" for m in models)
        + " | failed (all seeds) |",
        "|---" * (len(models) + 4) + "|",
    ]
    lines += [policy_row(p, c, models) for p, c in cells.items()]
    return lines


def sweep_table(rows: list[dict[str, Any]], svc: str, sw: dict[str, Any]) -> list[str]:
    by = sw[svc]["by_policy"]
    rates = sorted({r["rps"] for r in rows if r["group"] == "sweep" and r["service"] == svc})
    lines = [
        "SLO attainment (mean over seeds) / P99 TTFT s at each rate swept; a policy in bold had "
        "a model with a failed request at that rate; – not run:",
        "",
        "| policy | " + " | ".join(f"{x:g}" for x in rates) + " | max rps @90 % | max rps @99 % |",
        "|---" * (len(rates) + 3) + "|",
    ]
    notes = []
    for p, entry in by.items():
        cells = []
        for x in rates:
            cell = select(rows, "sweep", p, service=svc, rps=x)
            if not cell:
                cells.append("–")
                continue
            flags = flagged_models([r["per_model"] for r in cell])
            att, p99 = stat(cell, "slo_attainment"), stat(cell, "ttft_p99_s")
            if att is None or p99 is None or any(r.get("error") for r in cell):
                cells.append("**fault**")
                continue
            cells.append(bold_if(f"{att.mean:.0%} / {p99.mean:.2g}", bool(flags)))
            if flags:
                what = ", ".join(f"**{m}** {f}" for m, f in flags.items())
                notes.append(f"- {p} at {x:g} rps: {what} (pooled attainment {att.mean:.1%}).")
        maxes = []
        for t in TARGETS:
            e = entry[f"{t}"]
            txt = fmt_spread(spread(e["per_seed"].values()), "{:g}")
            if e["censored"] == "upper":
                txt = "≥ " + txt
            elif e["censored"] == "never":
                txt = "none"
            maxes.append(txt)
            if e["note"]:
                notes.append(f"- {e['note']}")
        lines.append(f"| {p} | " + " | ".join(cells) + " | " + " | ".join(maxes) + " |")
    lines += [""]
    if sw[svc]["ratios"]:
        lines += ["Ratios of max rps at SLO, per seed (mean, min–max):", ""]
        lines += [f"- {k}: {v['text']}" for k, v in sw[svc]["ratios"].items()]
        lines += [""]
    return lines + sorted(set(notes)) + [""]


def tables(rows: list[dict[str, Any]], res: dict[str, Any]) -> str:
    meta = res["meta"]
    lines = [
        "<!-- generated by scripts/evaluate.py; do not edit -->",
        "",
        f"Mode: **{'--quick' if meta['quick'] else 'full'}**, seeds {meta['seeds']}, "
        + (
            f"{meta['tasks']} tasks in {meta['wall_min']:.1f} min "
            if meta.get("wall_min") is not None
            else ""
        )
        + f"on {meta['jobs']} process{'es' if meta['jobs'] != 1 else ''}"
        + (
            f"; workload duration overridden to {meta['duration_s']} s (smoke run)"
            if meta["duration_s"]
            else ""
        )
        + ".",
        "",
        "Every figure is the mean over seeds, with the min–max over seeds in brackets when they "
        "differ. A model in **bold** had a failed request (or was never served) in some seed; "
        "its policy is bold too, whatever its pooled attainment.",
        "",
    ]
    if meta.get("first_run"):
        fr = meta["first_run"]
        lines += [
            f"The first run finished {fr['tasks_finished']} tasks in {fr['wall_min']} min "
            f"({fr['worker_cpu_min']} CPU-minutes in its workers) and was stopped "
            f"{fr['stopped']}.",
            "",
        ]
    for k, rs in enumerate(meta.get("resumes", []), 1):
        what = (
            f"these sweep points, in this order, for {', '.join(rs['policies'])}: {rs['points']}"
            if rs.get("points")
            else f"{rs['refinement_rounds']} more refinement round(s)"
        )
        lines += [
            f"Continued ({k}, --resume, the same code) with {what}; {rs['tasks']} tasks in "
            f"{rs['wall_min']:.1f} min, {rs['cancelled']} cancelled at the time limit.",
            "",
        ]
    for rr in meta.get("reruns", []):
        lines += [
            f"Re-run on later code ({rr['code']}): every {', '.join(rr['policies'])} row at the "
            f"same cells and seeds, {rr['tasks']} tasks in {rr['wall_min']:.1f} min; "
            f"{rr['changed']}; the change: {rr['why']}.",
            "",
        ]
    if meta["quick"]:
        lines += ["Skipped by --quick: " + "; ".join(QUICK_SKIPS) + ".", ""]
    if meta.get("incomplete_cells"):
        lines += [f"**Cells with fewer than {len(meta['seeds'])} seeds** (the run was cut short; "
                  "their spread is over the seeds that finished): "
                  + "; ".join(meta["incomplete_cells"]) + ".", ""]  # fmt: skip
    if res["errors"]:
        faults: dict[tuple[str, str], list[str]] = {}
        for e in res["errors"]:
            where = ", ".join(
                f"{k} {e[k]}"
                for k in ("service", "rps", "models", "key", "value")
                if e.get(k) is not None
            )
            faults.setdefault((e["policy"], e["error"]), []).append(f"{e['group']} {where}")
        lines += [
            "**Simulator faults** (runs that raised; their cells are marked and left out "
            "of every figure):",
            "",
        ]
        for (policy, err), where in faults.items():
            cells = "; ".join(sorted(set(where)))
            lines.append(f"- {policy}: `{err}` in {len(where)} runs ({cells})")
        lines += [""]
    lines += ["## ServerlessLLM / WarmServe P99 TTFT ratio: cited costs and band", ""]
    lines += [
        "| setup: ratio | at cited costs (per seed) | band (range of cell means) | low end at "
        "| high end at |",
        "|---|---|---|---|---|",
    ]
    for k, v in res["band"].items():
        lo, hi = v["band"]
        if len(v["points"]) == 1:
            lines.append(f"| {k} | {v['cited_text']} | not run | | |")
            continue
        lines.append(
            f"| {k} | {v['cited_text']} | {_x(lo)} – {_x(hi)} | {_at(v['band_low_at'])} "
            f"| {_at(v['band_high_at'])} |"
        )
    lines += ["", *band_table(res["band"]), ""]
    lines += [
        "Assumed costs (cited value: what the headline cells use):",
        "",
        "| cost | cited value | band | source |",
        "|---|---|---|---|",
    ]
    for b in BANDS:
        k = b.get("scale", 1.0)
        lines.append(
            f"| {b['label']} (`{b['key']}`) | {res['cited'][b['key']] / k:g} | "
            f"{', '.join(f'{v / k:g}' for v in b['values'])} | {b['source']} |"
        )
    lines += [""]
    for svc in ("conv", "code"):
        lines += [f"## Reference setup, {SWEEP_TITLES[svc]}, 1 rps", ""]
        lines += [*cell_table(rows, "headline", ALL, service=svc), ""]
    lines += ["## Rate sweeps", ""]
    for svc in SWEEPS:
        if any(r["group"] == "sweep" and r["service"] == svc for r in rows):
            lines += [f"### {SWEEP_TITLES[svc]}", "", *sweep_table(rows, svc, res["sweeps"])]
    lines += ["## Ablations: mixed models on 16 GPUs, 16 rps", ""]
    for count, verdicts in res["ablations"].items():
        lines += [f"### {count} models", ""]
        lines += [*cell_table(rows, "ablation", ABLATION, models=int(count)), ""]
        lines += [
            "Against full `warmserve` (min–max over seeds; overlapping ranges are "
            f'"{NO_DIFFERENCE}"):',
            "",
        ]
        for p, v in verdicts.items():
            r = v["p99_ratio_over_warmserve"]
            rtxt = fmt_ratio(Spread(**r)) if r else "–"
            lines.append(
                f"- {p}: P99 {v['p99_vs_warmserve']} (per-seed ratio {rtxt}); "
                f"attainment {v['attainment_vs_warmserve']}"
            )
        lines += [""]
    if any(r["group"] == "servegen" for r in rows):
        lines += ["## ServeGen m-mid", "", *cell_table(rows, "servegen", ALL), ""]
    for group, label in (
        ("alpha", "alpha"),
        ("burstiness", "cv"),
        ("cluster", "gpus"),
        ("models", "models"),
    ):
        sel = [r for r in rows if r["group"] == group]
        if not sel:
            continue
        points = sorted({r[label] for r in sel}, key=lambda x: (x is not None, x or 0))
        lines += [
            f"## Sensitivity: {group} (SLO attainment / P99 TTFT s)",
            "",
            "| policy | " + " | ".join(f"{label} {_v(p)}" for p in points) + " |",
            "|---" * (len(points) + 1) + "|",
        ]
        for p in SENS_POLICIES:
            cells = []
            for pt in points:
                cell = [r for r in sel if r["policy"] == p and r[label] == pt]
                flags = flagged_models([r["per_model"] for r in cell])
                text = (
                    f"{fmt_spread(stat(cell, 'slo_attainment'), '{:.0f}', pct=True)} / "
                    f"{fmt_spread(stat(cell, 'ttft_p99_s'))}"
                )
                cells.append(bold_if(text, bool(flags)))
            lines.append(f"| {p} | " + " | ".join(cells) + " |")
        lines += [""]
    return "\n".join(lines) + "\n"


def band_table(band: dict[str, Any]) -> list[str]:
    """One cost moved at a time (the others cited), per setup: the per-seed ratio at each point."""
    out: list[str] = []
    for svc in sorted({k.split(":")[0] for k in band}):
        cols = [k for k in band if k.startswith(f"{svc}:")]
        if all(len(band[k]["points"]) == 1 for k in cols):
            continue
        heads = [k.split(": ")[1] for k in cols]
        out += [
            f"One cost at a time, {SWEEP_TITLES.get(svc, svc)} (P99 TTFT ratio, per seed):",
            "",
            "| setting | " + " | ".join(heads) + " |",
            "|---" * (len(cols) + 1) + "|",
        ]
        for i, point in enumerate(band[cols[0]]["points"]):
            cells = []
            for k in cols:
                pt = band[k]["points"][i]
                s = Spread(**{f: pt[f] for f in ("mean", "lo", "hi", "n", "missing")})
                cells.append(fmt_ratio(s))
            out.append(f"| {_at([point['key'], point['value']])} | " + " | ".join(cells) + " |")
        out += [""]
    return out


def _x(r: float) -> str:
    return f"{r:.2g}×" if r < 10 else f"{r:.0f}×"


def _at(point: list[Any]) -> str:
    key, value = point
    if key == "cited":
        return "cited costs"
    if key == "corner":
        return f"corner {value} (every cost at its end favouring " + (
            "ServerlessLLM)" if value == "low" else "WarmServe)"
        )
    scale = next((b.get("scale", 1.0) for b in BANDS if b["key"] == key), 1.0)
    return f"{key} = {value / scale:g}"


def _v(x: Any) -> str:
    if x is None:
        return "trace"
    return f"{x:g}" if isinstance(x, float) else str(x)


# --- plots ---


def plots(rows: list[dict[str, Any]], res: dict[str, Any]) -> None:
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
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(OUT / "sweep.png", dpi=110)
        plt.close(fig)

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
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(OUT / "cost_sensitivity.png", dpi=110)
    plt.close(fig)

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
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(OUT / "sensitivity.png", dpi=110)
        plt.close(fig)


def cost_curve() -> list[dict[str, Any]]:
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
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(OUT / "control_cost.png", dpi=110)
    plt.close(fig)
    return points


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


def main() -> None:
    global OUT, REL_RESOLUTION
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
        plots(saved["runs"], res)
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
        REL_RESOLUTION = QUICK_RESOLUTION
        for svc, grid in QUICK_GRIDS.items():
            SWEEPS[svc]["grid"] = grid
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
        "knee_resolution": REL_RESOLUTION,
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


def use_sweep_settings(meta: dict[str, Any]) -> None:
    """The starting grids and knee resolution of the saved run `meta` describes: a resumed or
    re-run sweep refines the same way."""
    global REL_RESOLUTION
    REL_RESOLUTION = meta["knee_resolution"]
    for svc, grid in meta["grids"].items():
        SWEEPS[svc]["grid"] = grid


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
        control = cost_curve()
    (OUT / "results.json").write_text(
        json.dumps({**res, "runs": rows, "control_cost": control}, indent=1, default=str) + "\n"
    )
    (OUT / "tables.md").write_text(tables(rows, res))
    plots(rows, res)
    for k, v in res["band"].items():
        print(f"{k}: cited {v['cited_text']}, band {_x(v['band'][0])} - {_x(v['band'][1])}")
    for svc, sw in res["sweeps"].items():
        for k, v in sw["ratios"].items():
            print(f"{svc} {k}: {v['text']}")
    print(f"wrote {OUT}/results.json, tables.md and plots")


def incomplete(rows: list[dict[str, Any]], seeds: int) -> list[str]:
    """Cells with fewer seeds than asked (a run cut short): named in the tables' header."""
    count: dict[str, int] = {}
    for r in rows:
        labels = {k: r[k] for k in ("service", "key", "value", "rps", "models", "alpha", "cv",
                                    "gpus") if k in r}  # fmt: skip
        name = f"{r['group']} {labels} {r['policy']}"
        count[name] = count.get(name, 0) + 1
    return sorted(n for n, c in count.items() if c < seeds)


if __name__ == "__main__":
    main()
