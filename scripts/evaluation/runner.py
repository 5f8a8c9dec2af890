"""Running tasks: `run_task` (what a worker process runs: one workload, several policies), the
disk cache of built workloads, and `Runner`, the process pool behind one progress bar that
appends every finished task's rows to a partial file."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

from tqdm import tqdm

from warmserve.experiment import Experiment

from .cells import EXPERIMENTS, PER_MODEL_KEYS, ROOT, SUMMARY_KEYS, Task, build


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
