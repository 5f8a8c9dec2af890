"""How many KV pages a running instance keeps; the rest is lent to prewarming.

Reference: keep free headroom `total × in_flight / capacity` beyond what requests use, lend
the rest, never take it back. Here the instance also keeps a floor (room for
`kv_floor_requests` max-length requests) and reclaims lent pages when load rises, evicting
the lowest-valued replicas that were placed in them if the pages are not free.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from warmserve.control.api import ClusterSnapshot, Evict, InstanceView, ServedModel, SetKvPages
from warmserve.hardware import PAGE_BYTES


def kv_target_pages(
    inst: InstanceView,
    model: ServedModel,
    in_flight: int,
    capacity: int,
    floor_requests: int,
    page_bytes: int = PAGE_BYTES,
) -> int:
    return kv_target(inst, kv_floor_pages(model, floor_requests, page_bytes), in_flight, capacity)


def kv_floor_pages(model: ServedModel, floor_requests: int, page_bytes: int = PAGE_BYTES) -> int:
    """The pages `floor_requests` requests of `max_model_len` tokens take on each GPU."""
    per_request = math.ceil(model.max_model_len * model.kv_bytes_per_token_per_gpu / page_bytes)
    return floor_requests * per_request


def kv_target(inst: InstanceView, floor: int, in_flight: int, capacity: int) -> int:
    """`kv_target_pages` with the model's floor (`kv_floor_pages`) known."""
    full = inst.kv_pages + inst.kv_lent_pages
    headroom = math.ceil(full * min(in_flight, capacity) / capacity)
    return min(full, max(floor, inst.kv_used_pages + headroom))


def kv_actions(
    inst: InstanceView,
    target: int,
    snap: ClusterSnapshot | None,
    replica_scores: Mapping[int, float],
    min_lend_pages: int,
    protected: frozenset[int] = frozenset(),
) -> list[Evict | SetKvPages]:
    """Lend down to `target` (in chunks of at least `min_lend_pages`), or reclaim up to it,
    evicting the lowest-valued replicas in the way except `protected` ones. `snap` is read
    only to reclaim (None: the caller knows `target` is no more than the instance holds)."""
    if target < inst.kv_pages:
        if inst.kv_pages - target < min_lend_pages:
            return []
        return [SetKvPages(inst.instance_id, target)]
    if target == inst.kv_pages:
        return []
    need = target - inst.kv_pages
    assert snap is not None, "a reclaim reads the GPUs' free pages"
    free = {g.gpu_id: g.free_pages for g in snap.gpus}
    actions: list[Evict | SetKvPages] = []
    evicted: set[int] = set()
    for g in inst.gpus:
        if free[g] >= need:
            continue  # no victim needed here (the loop below would evict none)
        victims = sorted(
            (
                r
                for r in snap.replicas_by_gpu[g]
                if r.replica_id not in evicted and r.replica_id not in protected
            ),
            key=lambda r: (replica_scores.get(r.replica_id, 0.0), -r.replica_id),
        )
        while free[g] < need and victims:
            r = victims.pop(0)
            evicted.add(r.replica_id)
            actions.append(Evict(r.replica_id))
            for h in r.gpus:
                free[h] += r.pages_per_gpu
    grant = min(need, *(free[g] for g in inst.gpus))
    if grant > 0:
        actions.append(SetKvPages(inst.instance_id, inst.kv_pages + grant))
    return actions
