"""Proactive prewarming: how many replicas of each model, what they are worth, and where they go.

Demand (reference §3): with capacity B per instance and `cur` live instances,
`n_found = max(ceil(avg/B) - cur, 0)`, `n_burst = max(ceil(peak/B) - cur - n_found, 0)`, N = sum.
Foundation replica i scores `exp(-i/N)·cold`, burst replica j `exp(-(n_found+j)/N)·cold·burst`,
where `cold` is the per-GPU cold-load time (seconds a hit saves) and `burst = peak/avg`.
Existing replicas take a model's scores in id order; those beyond N score 0. New replicas are
placed best-first, never evicting (placement only uses free pages, as in the reference).

Prior prewarming (`PlanInput.prior`, warmserve-plus; not in the paper): free pages are wasted
pages. A model with no forecast-driven replica wanted and no live instance (no history yet, a
new model, a quiet one) wants one replica scored `PRIOR_CEILING × priority / max priority`,
below every forecast-driven score (those are ≥ cold/e, milliseconds at least). Priors are
placed only into free pages; a forecast-driven replica that finds no free group evicts priors
(scores ≤ PRIOR_CEILING) to make one, and starts and KV reclaims evict the lowest scores first,
so history always wins the memory.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from warmserve.control.api import ClusterSnapshot, Evict, Prewarm, ServedModel
from warmserve.control.forecaster import Forecast
from warmserve.control.placement import Block, Occupancy
from warmserve.types import ModelName, ReplicaId

# Score of a prior replica of the highest-priority model: far below any forecast-driven one.
PRIOR_CEILING = 1e-6


def replica_scores(fc: Forecast, live: int, cold_s: float, capacity: int) -> list[float]:
    n_found = max(math.ceil(fc.avg / capacity) - live, 0)
    n_burst = max(math.ceil(fc.peak / capacity) - live - n_found, 0)
    total = n_found + n_burst
    scores = [math.exp(-i / total) * cold_s for i in range(n_found)]
    scores += [math.exp(-(n_found + j) / total) * cold_s * fc.burstiness for j in range(n_burst)]
    return scores


@dataclass(frozen=True, slots=True)
class PlanInput:
    snapshot: ClusterSnapshot
    models: Mapping[ModelName, ServedModel]  # in popularity order (the YAML order)
    forecasts: Mapping[ModelName, Forecast]
    live_instances: Mapping[ModelName, int]  # running + starting
    planning_bandwidth: float
    capacity: int
    group_search: str = "aligned"
    prior: bool = False  # prewarm models nothing asks for into free pages (see module doc)


@dataclass(frozen=True, slots=True)
class Plan:
    actions: list[Evict | Prewarm]  # evicted priors come before the prewarm needing them
    scores: dict[ReplicaId, float]  # value of every existing replica (0 = beyond demand)
    # New replicas the demand asked for, placed or not. With none, the plan depends only on
    # the replicas, the draining instances, forecasts and live counts: not on free pages.
    num_wanted: int = 0
    # Pages per GPU of the models wanted, ascending (the evict-aware planner; plan_skip.py).
    wanted_sizes: tuple[int, ...] = ()


@lru_cache(maxsize=4096)
def _cached_scores(fc: Forecast, live: int, cold_s: float, capacity: int) -> tuple[float, ...]:
    """`replica_scores`, memoised: the planner asks every tick, forecasts change per window."""
    return tuple(replica_scores(fc, live, cold_s, capacity))


_NO_FORECAST = Forecast(0.0, 0.0)


def _demands(inp: PlanInput) -> tuple[dict[ReplicaId, float], list[tuple[float, int, ModelName]]]:
    """Scores of existing replicas, and the new replicas wanted as (score, model rank, model)."""
    return demands(
        inp.models,
        [(r.replica_id, r.model) for r in inp.snapshot.replicas],
        [i.model for i in inp.snapshot.instances if i.state == "stopping"],
        inp.forecasts,
        inp.live_instances,
        inp.planning_bandwidth,
        inp.capacity,
        inp.prior,
    )


def demands(
    models: Mapping[ModelName, ServedModel],
    replicas: Iterable[tuple[ReplicaId, ModelName]],
    stopping: Iterable[ModelName],
    forecasts: Mapping[ModelName, Forecast],
    live_instances: Mapping[ModelName, int],
    planning_bandwidth: float,
    capacity: int,
    prior: bool,
) -> tuple[dict[ReplicaId, float], list[tuple[float, int, ModelName]]]:
    """`_demands` from what it reads of a snapshot alone: the replicas' (id, model) and the
    stopping instances' models (the controller has them without building a snapshot)."""
    held: dict[ModelName, list[int]] = {m: [] for m in models}
    for rid, model in sorted(replicas):  # by id: ids are unique, so the model never decides
        held.setdefault(model, []).append(rid)
    draining: dict[ModelName, int] = {}
    for model in stopping:
        draining[model] = draining.get(model, 0) + 1
    existing: dict[ReplicaId, float] = {}
    wanted: list[tuple[float, int, ModelName]] = []
    top: float | None = None  # the highest priority, read only for a prior
    for rank, (name, m) in enumerate(models.items()):
        cold_s = m.shard_bytes / planning_bandwidth
        fc = forecasts.get(name, _NO_FORECAST)
        live = live_instances.get(name, 0)
        scores = _cached_scores(fc, live, cold_s, capacity)
        # A draining instance becomes a prewarmed replica soon: it holds a slot in the list.
        num_draining = draining.get(name, 0)
        scores = scores[num_draining:]
        if prior and not scores and not num_draining and not live:
            if top is None:
                top = max((m.priority for m in models.values()), default=1.0)
            scores = (PRIOR_CEILING * m.priority / top,)
        mine = held[name]
        for k, rid in enumerate(mine):
            existing[rid] = scores[k] if k < len(scores) else 0.0
        wanted += [(s, rank, name) for s in scores[len(mine) :]]
    wanted.sort(key=lambda w: (-w[0], w[1]))
    return existing, wanted


def plan_evict_aware(inp: PlanInput, new_id: Callable[[], ReplicaId]) -> Plan:
    existing, wanted = _demands(inp)
    if not wanted:  # the usual tick: nothing to place, so no occupancy to build
        return Plan([], existing)
    occ = Occupancy(inp.snapshot, existing)
    actions: list[Prewarm] = []
    failed: set[ModelName] = set()
    for score, _, name in wanted:
        if name in failed:
            continue  # its lower-scored replicas cannot fit either
        m = inp.models[name]
        best: tuple[tuple[int, float], tuple[int, ...]] | None = None
        for group in occ.candidate_groups(m.tp, m.pages_per_gpu, inp.group_search):
            cost = occ.cost_if_nested(group, name)
            if cost is None:
                continue
            # Prefer groups where the new replica outranks all it overlaps, then least value hit.
            is_master = not cost.touches_instance and cost.max_score < score
            key = (0 if is_master else 1, cost.sum_score)
            if best is None or key < best[0]:
                best = (key, group)
                if key == (0, 0.0):
                    break  # overlaps nothing of value: no later group can beat it
        victims: list[Block] = []
        if best is None and inp.prior and score > PRIOR_CEILING:
            found = _group_over_priors(occ, name, m.tp, m.pages_per_gpu, inp.group_search)
            if found is not None:
                group, victims = found
                best = ((1, 0.0), group)
        if best is None:
            failed.add(name)
            continue
        for v in victims:
            occ.remove(v)
            existing.pop(v.key[1], None)
            actions.append(Evict(v.key[1]))
        rid = new_id()
        occ.add(Block(("r", rid), name, best[1], score, m.pages_per_gpu), m.pages_per_gpu)
        actions.append(Prewarm(rid, name, best[1]))
    sizes = tuple(sorted({inp.models[name].pages_per_gpu for _, _, name in wanted}))
    return Plan(actions, existing, len(wanted), sizes)


def _group_over_priors(
    occ: Occupancy, name: ModelName, tp: int, pages: int, search: str
) -> tuple[tuple[int, ...], list[Block]] | None:
    """A group that fits `name` once some prior replicas (scores ≤ PRIOR_CEILING) are evicted,
    with the fewest pages evicted, and those victims (lowest score first); None if none."""
    reclaim = np.zeros_like(occ.free)
    for g in range(occ.num_gpus):
        reclaim[g] = sum(
            b.pages for b in occ.on_gpu[g] if not b.is_instance and b.score <= PRIOR_CEILING
        )
    best: tuple[int, tuple[int, ...], list[Block]] | None = None
    for group in occ.candidate_groups(tp, pages, search, occ.free + reclaim):
        victims: dict[tuple[str, int], Block] = {}
        for g in group:
            short = pages - int(occ.free[g]) - sum(v.pages for v in victims.values() if g in v.gpus)
            priors = sorted(
                (b for b in occ.on_gpu[g]
                 if not b.is_instance and b.score <= PRIOR_CEILING and b.key not in victims),
                key=lambda b: (b.score, b.key),
            )  # fmt: skip
            while short > 0 and priors:
                v = priors.pop(0)
                victims[v.key] = v
                short -= v.pages
        for v in victims.values():
            occ.remove(v)
        ok = occ.cost_if_nested(group, name) is not None
        for v in victims.values():
            occ.add(v, v.pages)
        cost = sum(v.pages * len(v.gpus) for v in victims.values())
        if ok and (best is None or cost < best[0]):
            best = (cost, group, list(victims.values()))
    return None if best is None else (best[1], best[2])


def plan_round_robin(
    inp: PlanInput, new_id: Callable[[], ReplicaId], reference_quirk: bool = False
) -> Plan:
    """The `--disable-placement` planner: models in turn (popularity order), one replica each a
    round, placed round robin over devices: the scan for GPUs that have the pages free and hold
    no replica of the model starts after the last GPU used, and the first node (in that order)
    with enough of them takes the replica. A model with no quota left or that fits nowhere
    drops out; the others keep their turns until every quota is placed or nothing fits.

    `reference_quirk` (policy `warmserve-no-placement-ref`): the reference's loop, which returns
    as soon as it meets a model with no quota left or a failed placement. With a model that
    wants no replica early in the order this issues almost nothing, so that ablation measures
    no-prewarm rather than placement; it is kept only to reproduce the reference.
    """
    existing, wanted = _demands(inp)
    if not wanted:
        return Plan([], existing)
    occ = Occupancy(inp.snapshot, existing)
    quota: dict[ModelName, list[float]] = {m: [] for m in inp.models}
    for score, _, name in wanted:
        quota[name].append(score)
    actions: list[Prewarm] = []
    active = list(inp.models)
    cursor = 0
    while active:
        still = []
        for name in active:
            if not quota[name]:
                if reference_quirk:
                    return Plan(actions, existing, len(wanted))
                continue
            m = inp.models[name]
            group = _next_fit(occ, name, m.tp, m.pages_per_gpu, cursor)
            if group is None:
                if reference_quirk:
                    return Plan(actions, existing, len(wanted))
                continue  # fits nowhere now: its later replicas cannot either
            rid = new_id()
            block = Block(("r", rid), name, group, quota[name].pop(0), m.pages_per_gpu)
            occ.add(block, m.pages_per_gpu)
            actions.append(Prewarm(rid, name, group))
            still.append(name)
            if not reference_quirk:  # the reference always scans from GPU 0 (first fit)
                cursor = (group[-1] + 1) % occ.num_gpus
        active = still
    return Plan(actions, existing, len(wanted))


def _next_fit(
    occ: Occupancy, name: ModelName, tp: int, pages: int, cursor: int
) -> tuple[int, ...] | None:
    """`tp` GPUs of one node that fit a replica of `name`, scanning from GPU `cursor` on
    (wrapping round); None if no node has enough."""
    n, gpn = occ.num_gpus, occ.gpus_per_node
    by_node: dict[int, list[int]] = {}
    for k in range(n):
        g = (cursor + k) % n
        if occ.free[g] >= pages and all(b.model != name for b in occ.on_gpu[g]):
            fits = by_node.setdefault(g // gpn, [])
            fits.append(g)
            if len(fits) == tp:
                return tuple(sorted(fits))
    return None
