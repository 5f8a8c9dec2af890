"""Worker choice when an instance starts (reference §4.4), and what it evicts."""

from __future__ import annotations

from dataclasses import dataclass

from warmserve.control.api import ClusterSnapshot, ReplicaView, ServedModel
from warmserve.types import ReplicaId, StartPath


@dataclass(frozen=True, slots=True)
class StartChoice:
    gpus: tuple[int, ...]
    path: StartPath
    replica_id: ReplicaId | None
    evict: tuple[ReplicaId, ...]  # replicas overlapping the chosen GPUs, to drop first


def _free_gpus(snap: ClusterSnapshot) -> set[int]:
    return {g.gpu_id for g in snap.gpus if g.instance_id is None}


def _choice(
    snap: ClusterSnapshot, gpus: tuple[int, ...], path: StartPath, keep: ReplicaView | None
) -> StartChoice:
    evict: dict[ReplicaId, None] = {}
    for g in gpus:
        for r in snap.replicas_by_gpu[g]:
            if keep is None or r.replica_id != keep.replica_id:
                evict[r.replica_id] = None
    return StartChoice(gpus, path, keep.replica_id if keep else None, tuple(evict))


@dataclass(frozen=True, slots=True)
class StartContext:
    """What fragmentation-aware starts (warmserve-plus's fair_starts) weigh besides the model."""

    blocked: frozenset[int] = frozenset()  # free GPUs held back for another model's start
    waiting_tps: frozenset[int] = frozenset()  # TP degrees of other models with queued requests
    tp_sizes: frozenset[int] = frozenset()  # TP degrees of every served model


def choose_start(
    model: ServedModel,
    snap: ClusterSnapshot,
    *,
    smart: bool,
    use_replicas: bool,
    ctx: StartContext | None = None,
) -> StartChoice | None:
    """Finished prewarm hit, then in-progress hit, then a miss on free GPUs; None if no room.

    With `ctx` (fair starts), GPUs in `ctx.blocked` are not free, and the start that breaks
    the fewest free aligned blocks of larger TP degrees wins: first those of models waiting
    now, then (after the start path) those of any served model."""
    free = _free_gpus(snap)
    if ctx is not None:
        return _choose_fair(model, snap, free - ctx.blocked, ctx, smart, use_replicas)
    if use_replicas:
        mine = sorted(
            (r for r in snap.replicas if r.model == model.name), key=lambda r: r.replica_id
        )
        for ready, path in ((True, StartPath.PREWARM_HIT), (False, StartPath.INPROGRESS_HIT)):
            for r in mine:
                if r.is_ready == ready and free.issuperset(r.gpus):
                    return _choice(snap, r.gpus, path, r)
    gpus = _miss_gpus(model.tp, snap, free, smart)
    return None if gpus is None else _choice(snap, gpus, StartPath.COLD, None)


def _miss_gpus(
    tp: int, snap: ClusterSnapshot, free: set[int], smart: bool
) -> tuple[int, ...] | None:
    gpn = snap.gpus_per_node
    num_nodes = len(snap.gpus) // gpn
    if not smart:  # first fit
        for node in range(num_nodes):
            fits = [g for g in range(node * gpn, (node + 1) * gpn) if g in free]
            if len(fits) >= tp:
                return tuple(fits[:tp])
        return None
    hosted = {g: len(rs) for g, rs in snap.replicas_by_gpu.items()}
    # Aligned blocks keep live instances nested with prewarmed replicas; fewest replicas wins.
    best: tuple[int, tuple[int, ...]] | None = None
    if gpn % tp == 0:
        for base in range(0, num_nodes * gpn, tp):
            group = tuple(range(base, base + tp))
            if free.issuperset(group):
                cost = sum(hosted[g] for g in group)
                if best is None or cost < best[0]:
                    best = (cost, group)
    if best is not None:
        return best[1]
    # No aligned block free: the reference's rule, fewest-hosting free GPUs of the first node.
    for node in range(num_nodes):
        fits = [g for g in range(node * gpn, (node + 1) * gpn) if g in free]
        if len(fits) >= tp:
            fits.sort(key=lambda g: hosted[g])
            return tuple(sorted(fits[:tp]))
    return None


def _broken(group: tuple[int, ...], free: set[int], sizes: list[int], gpn: int) -> tuple[int, ...]:
    """Per TP degree in `sizes` (largest first): free aligned blocks of that degree that a
    start on `group` would break. Such blocks are what a large model needs to start at all."""
    out = []
    for t in sizes:
        if gpn % t:
            out.append(0)
            continue
        bases = {g - g % t for g in group}
        out.append(sum(1 for b in bases if free.issuperset(range(b, b + t))))
    return tuple(out)


def _choose_fair(
    model: ServedModel,
    snap: ClusterSnapshot,
    free: set[int],
    ctx: StartContext,
    smart: bool,
    use_replicas: bool,
) -> StartChoice | None:
    gpn = snap.gpus_per_node
    tp = model.tp
    waiting = sorted((t for t in ctx.waiting_tps if t > tp), reverse=True)
    larger = sorted((t for t in ctx.tp_sizes if t > tp and t not in ctx.waiting_tps), reverse=True)
    # (key, gpus, path, replica); the key ranks a hit that breaks a block a waiting model needs
    # below a replica or miss that does not.
    best: tuple[tuple, tuple[int, ...], StartPath, ReplicaView | None] | None = None

    def consider(gpus: tuple[int, ...], rank: int, path: StartPath, keep, cost: int) -> None:
        nonlocal best
        key = (
            _broken(gpus, free, waiting, gpn), rank, _broken(gpus, free, larger, gpn), cost, gpus
        )  # fmt: skip
        if best is None or key < best[0]:
            best = (key, gpus, path, keep)

    if use_replicas:
        for r in snap.replicas:
            if r.model == model.name and free.issuperset(r.gpus):
                ready = r.is_ready
                path = StartPath.PREWARM_HIT if ready else StartPath.INPROGRESS_HIT
                consider(r.gpus, 0 if ready else 1, path, r, r.replica_id)
    hosted = {g: len(rs) for g, rs in snap.replicas_by_gpu.items()}
    if smart and gpn % tp == 0:
        for base in range(0, len(snap.gpus), tp):
            group = tuple(range(base, base + tp))
            if free.issuperset(group):
                consider(group, 2, StartPath.COLD, None, sum(hosted[g] for g in group))
    else:
        gpus = _miss_gpus(tp, snap, free, smart)
        if gpus is not None:
            consider(gpus, 2, StartPath.COLD, None, sum(hosted[g] for g in gpus))
    if best is None:
        return None
    return _choice(snap, best[1], best[2], best[3])
