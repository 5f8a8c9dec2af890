"""Fingerprints of simulator runs, pinned in tests/data/sim_golden.json.

The simulator's speed work must not change what it computes. Each case runs one policy on a
small, fixed-seed experiment and reduces the run to its summary and a hash of every
per-request time, start and memory sample, so an exact match means an identical run.

A deliberate change of behaviour rewrites the pins, from the worktree root:

    PYTHONPATH=$PWD:tests python tests/sim_golden.py --write

or, to pin what another commit computes (e.g. main, before a change meant to keep results),
with `warmserve` imported from a worktree of it and the experiments of this tree:

    git worktree add --detach /tmp/ref main
    PYTHONPATH=/tmp/ref:tests python tests/sim_golden.py --write
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from warmserve.cluster.books import Books
from warmserve.control.registry import POLICIES
from warmserve.experiment import Experiment, load_experiment, parse_experiment
from warmserve.sim.runner import PolicyResult, make_workload, run_policy

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).resolve().parent / "data" / "sim_golden.json"

ALL = tuple(POLICIES)  # every registered policy


def _small() -> Experiment:
    """One node of 4 GPUs, three models, 3 req/s: starts, prewarms and KV lending."""
    return parse_experiment(
        {
            "name": "golden-small",
            "seed": 7,
            "cluster": {"nodes": 1, "gpus_per_node": 4, "gpu": "H100-SXM-80G"},
            "models": [
                {"name": "a", "preset": "llama-2-7b", "tp": 1, "copies": 2, "max_model_len": 2048},
                {"name": "b", "preset": "llama-2-13b", "tp": 2, "max_model_len": 2048},
            ],
            "workload": {"trace": "azure-conv", "rps": 3.0, "alpha": 1.0, "duration_s": 300},
            "policies": list(ALL),
        },
        Path(),
    )


def _with(exp: Experiment, **workload: Any) -> Experiment:
    return dataclasses.replace(exp, workload=dataclasses.replace(exp.workload, **workload))


def cases() -> dict[str, tuple[Experiment, tuple[str, ...]]]:
    """name -> (experiment, policies). Small enough to run every policy in seconds."""
    paper = load_experiment(ROOT / "experiments" / "paper-azure-conv.yaml")
    servegen = load_experiment(ROOT / "experiments" / "servegen-m-mid.yaml")
    return {
        "small": (_small(), ALL),
        # Forecast history, the reference forecaster and two nodes; an hour at the paper's load.
        "paper-azure-conv-1h": (_with(paper, duration_s=3600), ALL),
        # Eight deployments at 16 req/s: evictions, KV lending under pressure, co-location.
        "servegen-m-mid-16rps-5min": (_with(servegen, duration_s=300, rps=16.0), ALL),
        # The same on one node: GPUs run out (starts that wait, idle instances reclaimed).
        "servegen-m-mid-1node-5min": (
            dataclasses.replace(
                _with(servegen, duration_s=300, rps=16.0),
                cluster=dataclasses.replace(servegen.cluster, nodes=1),
            ),
            ALL,
        ),
    }


def _digest(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(str((a.dtype.str, a.shape)).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def fingerprint(r: PolicyResult) -> dict[str, Any]:
    rows = [dataclasses.astuple(row) for row in r.requests]
    return {
        "summary": json.loads(json.dumps(r.summary, sort_keys=True)),
        "requests": _digest(r.log.first_token_s, r.log.finish_s),
        "rows": hashlib.sha256(repr(rows).encode()).hexdigest(),
        "memory": _digest(*(getattr(r.memory, f.name) for f in dataclasses.fields(r.memory))),
    }


def count_snapshot_builds(monkeypatch) -> dict[str, int]:
    """Count every snapshot the books build from now on (`counts["n"]`, resettable), for the
    fast-path tests that check a shortcut builds fewer."""
    counts = {"n": 0}
    plain_build = Books._build_snapshot

    def counted_build(self, layout_changed):
        counts["n"] += 1
        return plain_build(self, layout_changed)

    monkeypatch.setattr(Books, "_build_snapshot", counted_build)
    return counts


def compute_case(exp: Experiment, policies: tuple[str, ...]) -> dict[str, Any]:
    wl = make_workload(exp)
    return {p: fingerprint(run_policy(exp, p, wl)) for p in policies}


def compute() -> dict[str, dict[str, Any]]:
    return {name: compute_case(exp, policies) for name, (exp, policies) in cases().items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--write", action="store_true", help=f"rewrite {GOLDEN}")
    args = ap.parse_args()
    got = compute()
    if args.write:
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
    else:
        print(json.dumps(got, indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
