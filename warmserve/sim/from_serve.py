"""The simulated twin of a `warmserve serve` deployment: the same models, workers, page pool,
policy, control settings and forecast history, on a device profile, fed the exact arrivals and
lengths a client sent. `benchmarks/fidelity.py` compares the two; a planner can also start from
a serve file and change one thing (more workers, another profile)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from warmserve.experiment import Experiment, ExperimentError, parse_experiment
from warmserve.hardware import PAGE_BYTES
from warmserve.profiles import ProfileError, load_profile
from warmserve.runtime.history import seed_histories
from warmserve.serve_config import ServeConfig, model_max_len
from warmserve.workload.builders import Workload


def serve_experiment(
    cfg: ServeConfig,
    profile: str,
    model_dirs: dict[str, Path],
    *,
    slo_ttft_s: float,
    slo_tpot_s: float,
    warmup_s: float,
    drain_s: float,
    duration_s: float,
    base_dir: Path = Path(),
) -> Experiment:
    """An experiment that simulates `cfg` on one host with `cfg.workers.count` devices of
    `profile` (a shipped name or a path, relative to `base_dir`), each with the workers' page
    pool. `model_dirs` maps each served name to its model folder (its config.json gives the
    architecture). `warmup_s` is how long the control plane ran before the first request."""
    if cfg.workers.page_bytes != PAGE_BYTES:
        raise ExperimentError(
            f"workers.page_mib {cfg.workers.page_mib}: the simulator's pages are "
            f"{PAGE_BYTES >> 20} MiB"
        )
    models = []
    for m in cfg.models:
        path = model_dirs[m.name]
        models.append({"name": m.name, "config": str(path / "config.json"), "tp": m.tp,
                       "max_model_len": model_max_len(path, m.max_model_len),
                       "priority": m.priority})  # fmt: skip
    try:
        prof = load_profile(profile, base_dir)
    except ProfileError as e:
        raise ExperimentError(str(e)) from None
    # A worker's "device memory" is its page pool.
    device = dataclasses.replace(prof.device, memory_bytes=cfg.workers.pool_mib << 20)
    shortest = min(m["max_model_len"] for m in models)
    raw = {
        "name": "serve-twin",
        "cluster": {
            "nodes": 1,
            "gpus_per_node": cfg.workers.count,
            "profile": profile,
            "pool_fraction": 1.0,
        },
        "models": models,
        # The requests come from the caller; the lengths here only pass validation.
        "workload": {
            "duration_s": duration_s,
            "warmup_s": warmup_s,
            "drain_s": drain_s,
            "max_input_tokens": shortest - 1,
            "min_output_tokens": 1,
            "max_output_tokens": 1,
        },
        "slo": {"ttft_s": slo_ttft_s, "tpot_s": slo_tpot_s},
        "policies": [cfg.policy],
        # The control settings are the server's own (replaced below, as a whole).
    }
    exp = parse_experiment(raw, base_dir, "serve-twin",
                           dataclasses.replace(prof, device=device))  # fmt: skip
    return dataclasses.replace(exp, control=cfg.control)


def replay_workload(
    cfg: ServeConfig,
    arrival_s: np.ndarray,
    model_idx: np.ndarray,
    input_tokens: np.ndarray,
    output_tokens: np.ndarray,
    start_of_day_s: float,
    model_names: Sequence[str] | None = None,
) -> Workload:
    """The requests a client sent (arrivals in seconds from the replay's start, as it sent
    them), with the forecast history the server seeded from `cfg.forecast.history`.
    `start_of_day_s`: the time of day (or week, with `forecast_cycle: week`) the replay
    started, which places the history's slots as the server placed them."""
    names = tuple(model_names or (m.name for m in cfg.models))
    ctl = cfg.control
    histories = (
        seed_histories(cfg.base_dir / cfg.forecast.history, names, ctl.forecast_window_s,
                       ctl.forecast_cycle, cfg.forecast.service_s_per_token)
        if cfg.forecast.history is not None
        else {}
    )  # fmt: skip
    t = np.asarray(arrival_s, dtype=np.float64)
    if np.any(np.diff(t) < 0):  # request k here is request k there: no reordering
        raise ValueError("arrivals must be sorted")
    return Workload(
        names,
        t,
        np.asarray(model_idx, dtype=np.int64),
        np.asarray(input_tokens, dtype=np.int64),
        np.asarray(output_tokens, dtype=np.int64),
        {n: histories.get(n) for n in names},
        dict.fromkeys(names, float(start_of_day_s)),
    )
