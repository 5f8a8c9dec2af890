"""Occupancy of GPU groups, and the nested-group (laminar) rule that evict-aware placement keeps.

A *block* is a set of GPUs holding one model: a prewarmed or loading replica, or a live instance.
Placing a new block of TP degree t on group G is allowed only if, for every block q meeting G:
same TP ⇒ same GPUs; smaller TP ⇒ q inside G; larger TP ⇒ G inside q; and no GPU of G already
holds the same model. Activating a block then evicts only blocks lying wholly inside it and
larger blocks containing it (their shards on G become its memory); never a block that straddles
G's edge, so no prewarm outside G is wasted.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from warmserve.control.api import ClusterSnapshot
from warmserve.types import ModelName

PINNED = float("inf")  # score of a live instance: never displaced by planning


@dataclass(frozen=True, slots=True)
class Block:
    key: tuple[str, int]  # ("r", replica_id) or ("i", instance_id)
    model: ModelName
    gpus: tuple[int, ...]
    score: float
    pages: int = 0  # per GPU (replicas; what evicting the block frees)

    @property
    def is_instance(self) -> bool:
        return self.key[0] == "i"


@dataclass(frozen=True, slots=True)
class GroupCost:
    max_score: float  # over overlapped replicas
    sum_score: float
    touches_instance: bool


class Occupancy:
    """Mutable per-plan view: free pages and blocks per GPU, updated as replicas are placed."""

    def __init__(self, snap: ClusterSnapshot, scores: dict[int, float]) -> None:
        self.gpus_per_node = snap.gpus_per_node
        self.num_gpus = len(snap.gpus)
        self.free = np.array([g.free_pages for g in snap.gpus], dtype=np.int64)
        self.on_gpu: list[list[Block]] = [[] for _ in range(self.num_gpus)]
        for r in snap.replicas:
            block = Block(
                ("r", r.replica_id), r.model, r.gpus, scores.get(r.replica_id, 0.0), r.pages_per_gpu
            )
            self.add(block)
        for inst in snap.instances:
            self.add(Block(("i", inst.instance_id), inst.model, inst.gpus, PINNED))

    def add(self, block: Block, pages_per_gpu: int = 0) -> None:
        for g in block.gpus:
            self.on_gpu[g].append(block)
            self.free[g] -= pages_per_gpu

    def remove(self, block: Block) -> None:
        """Drop a replica block (evicted by this plan): its pages are free again."""
        for g in block.gpus:
            self.on_gpu[g].remove(block)
            self.free[g] += block.pages

    def blocks_on(self, gpus: tuple[int, ...]) -> list[Block]:
        seen: dict[tuple[str, int], Block] = {}
        for g in gpus:
            for b in self.on_gpu[g]:
                seen.setdefault(b.key, b)
        return list(seen.values())

    def cost_if_nested(self, group: tuple[int, ...], model: ModelName) -> GroupCost | None:
        """Cost of placing `model` on `group`, or None if it breaks the nesting rules."""
        gset = set(group)
        t = len(group)
        max_s, sum_s, touches = 0.0, 0.0, False
        for b in self.blocks_on(group):
            if b.model == model:
                return None
            bt = len(b.gpus)
            if bt == t:
                if set(b.gpus) != gset:
                    return None
            elif bt < t:
                if not gset.issuperset(b.gpus):
                    return None
            elif not gset.issubset(b.gpus):
                return None
            if b.is_instance:
                touches = True
            else:
                max_s = max(max_s, b.score)
                sum_s += b.score
        return GroupCost(max_s, sum_s, touches)

    def candidate_groups(
        self, tp: int, pages: int, search: str, free: np.ndarray | None = None
    ) -> Iterator[tuple[int, ...]]:
        """GPU groups of size tp, within one node, whose GPUs all have `pages` free (in
        `free` if given: pages that could be made free)."""
        free = self.free if free is None else free
        gpn = self.gpus_per_node
        num_nodes = self.num_gpus // gpn
        if search == "aligned" and gpn % tp == 0:
            # Buddy-aligned blocks: any two are nested or disjoint, like a buddy allocator.
            ok = free.reshape(num_nodes, gpn // tp, tp).min(axis=2) >= pages
            for node, k in zip(*np.nonzero(ok), strict=True):
                base = int(node) * gpn + int(k) * tp
                yield tuple(range(base, base + tp))
            return
        for node in range(num_nodes):
            fits = [g for g in range(node * gpn, (node + 1) * gpn) if free[g] >= pages]
            yield from itertools.combinations(fits, tp)


def is_laminar(groups: list[tuple[int, ...]]) -> bool:
    """Every two groups are nested or disjoint, and equal-size groups that meet are equal."""
    sets = [frozenset(g) for g in groups]
    return all(not (a & b and not (a <= b or b <= a)) for a, b in itertools.combinations(sets, 2))
