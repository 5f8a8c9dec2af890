"""Builders for hand-made cluster snapshots (policy tests need no simulator)."""

from __future__ import annotations

import dataclasses

from warmserve.control.api import (
    ClusterSnapshot,
    Evict,
    GpuView,
    InstanceView,
    Prewarm,
    ReplicaView,
    ServedModel,
)
from warmserve.types import InstanceState, ModelName


def model(name: str, tp: int = 1, pages: int = 10, max_len: int = 2048) -> ServedModel:
    return ServedModel(
        name=ModelName(name),
        tp=tp,
        pages_per_gpu=pages,
        shard_bytes=pages * (2 << 20),
        kv_bytes_per_token_per_gpu=2 << 10,  # 1 page holds 1024 tokens
        max_model_len=max_len,
    )


def snapshot(
    num_gpus: int = 8,
    gpus_per_node: int = 8,
    total_pages: int = 100,
    replicas: list[ReplicaView] | None = None,
    instances: list[InstanceView] | None = None,
) -> ClusterSnapshot:
    """Free pages are derived from the replicas and instances given."""
    used = [0] * num_gpus
    owner: list[int | None] = [None] * num_gpus
    replicas = replicas or []
    instances = instances or []
    for r in replicas:
        for g in r.gpus:
            used[g] += r.pages_per_gpu
    for i in instances:
        for g in i.gpus:
            used[g] += i.kv_pages + 10
            owner[g] = i.instance_id
    gpus = tuple(
        GpuView(g, g // gpus_per_node, total_pages, total_pages - used[g], owner[g])
        for g in range(num_gpus)
    )
    return ClusterSnapshot(gpus, tuple(replicas), tuple(instances), gpus_per_node)


def replica(rid: int, name: str, gpus: tuple[int, ...], pages: int = 10, ready: bool = True):
    return ReplicaView(rid, ModelName(name), gpus, pages, ready)


def instance(
    iid: int, name: str, gpus: tuple[int, ...], kv: int = 50, used: int = 0, lent: int = 0
):
    return InstanceView(iid, ModelName(name), gpus, InstanceState.RUNNING, kv, used, lent)


def apply_plan(
    snap: ClusterSnapshot, actions: list, models: dict[str, ServedModel]
) -> ClusterSnapshot:
    """The snapshot after prewarms and evictions (what a cluster handle would report)."""
    replicas = {r.replica_id: r for r in snap.replicas}
    free = {g.gpu_id: g.free_pages for g in snap.gpus}
    for a in actions:
        if isinstance(a, Prewarm):
            pages = models[a.model].pages_per_gpu
            replicas[a.replica_id] = replica(a.replica_id, a.model, a.gpus, pages, ready=False)
            for g in a.gpus:
                free[g] -= pages
        elif isinstance(a, Evict):
            r = replicas.pop(a.replica_id)
            for g in r.gpus:
                free[g] += r.pages_per_gpu
    gpus = tuple(dataclasses.replace(g, free_pages=free[g.gpu_id]) for g in snap.gpus)
    return ClusterSnapshot(gpus, tuple(replicas.values()), snap.instances, snap.gpus_per_node)
