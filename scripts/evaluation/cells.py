"""What the evaluation runs: policy lists, assumed-cost bands, rate-sweep grids, the keys a row
keeps, and the cells themselves. A cell is plain data (picklable, sent to a worker), built into an
Experiment there; a task is one cell at one seed for several policies."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from warmserve.control.registry import POLICIES
from warmserve.experiment import Experiment, parse_experiment, read_yaml

ROOT = Path(__file__).resolve().parents[2]
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


# --- tasks: (group, labels, cell, seed, policies, duration_s): one workload, several policies ---

Task = tuple[str, dict[str, Any], dict[str, Any], int, list[str], float | None]


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
