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


def choose_start(
    model: ServedModel, snap: ClusterSnapshot, *, smart: bool, use_replicas: bool
) -> StartChoice | None:
    """Finished prewarm hit, then in-progress hit, then a miss on free GPUs; None if no room."""
    free = _free_gpus(snap)
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
