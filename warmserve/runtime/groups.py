"""The tensor-parallel communicators of one node's workers, built once when the workers start.

Every worker of a node joins one `torch.distributed` world for that node (gloo on CPU) and
creates a process group for every aligned group it can belong to: sizes 2, 4, ... up to the
node's workers, at multiples of the size (the planner's nested groups, `control/placement.py`),
created in the same order on every rank. Activating a TP replica then picks a pre-built
group: no communicator is made on the serving path.

The rendezvous is a `FileStore` on the node's local disk, not a `TCPStore`: every rank of a
node's world is on that node, and a TCPStore's server listens on every interface (this
project keeps to loopback), while a file needs no port and no address. Gloo's own pairs are
on the loopback interface for the same reason: the ranks of a world share the machine.

A world cannot take a replaced process back: when a worker of a node with groups dies, the
supervisor replaces every worker of that node, and the new ones meet in a new world (the
store file names its generation).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

Ranks = tuple[int, ...]  # node-local ranks, ascending


@dataclass(frozen=True, slots=True)
class GroupSpec:
    """How one worker joins its node's world: given by the supervisor at spawn."""

    store_path: str  # a file on the node's local disk, one per world (node, generation)
    rank: int  # this worker's index among its node's workers
    size: int  # the node's workers
    max_tp: int  # the largest group to build (the largest `tp` served)
    timeout_s: float  # gloo's timeout for each collective of a TP group
    rendezvous_s: float = 120.0  # for the node's workers to meet (they start together)
    backend: str = "gloo"


def aligned_groups(size: int, max_tp: int) -> list[Ranks]:
    """Every aligned group of a node with `size` workers, sizes 2, 4, ... <= max_tp, in a
    fixed order (smaller sizes first, then by first rank): the order every rank creates them."""
    out: list[Ranks] = []
    tp = 2
    while tp <= min(size, max_tp):
        out.extend(tuple(range(b, b + tp)) for b in range(0, size - tp + 1, tp))
        tp *= 2
    return out


@dataclass(slots=True)
class NodeGroups:
    """This worker's communicators: `group(ranks)` for each aligned group it belongs to."""

    rank: int
    size: int
    groups: dict[Ranks, Any]
    build_s: float  # the world and every group, wall clock on this rank

    def group(self, ranks: Ranks) -> Any:
        try:
            return self.groups[ranks]
        except KeyError:
            raise KeyError(
                f"no pre-built group for node ranks {ranks} (built: {sorted(self.groups)})"
            ) from None

    def close(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def build_groups(spec: GroupSpec) -> NodeGroups:
    """Join the node's world and create every aligned group (a collective: every rank of the
    node calls this with the same `size`, `max_tp` and `store_path`)."""
    # Gloo binds its pairs to this interface's address: the world's ranks share the node.
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    import torch.distributed as dist

    t0 = time.perf_counter()
    timeout = timedelta(seconds=spec.timeout_s)
    store = dist.FileStore(spec.store_path, spec.size)
    dist.init_process_group(
        spec.backend,
        store=store,
        rank=spec.rank,
        world_size=spec.size,
        timeout=timedelta(seconds=spec.rendezvous_s),
    )
    groups: dict[Ranks, Any] = {}
    for ranks in aligned_groups(spec.size, spec.max_tp):
        # `new_group` is collective over the world: every rank calls it for every group.
        g = dist.new_group(list(ranks), timeout=timeout, backend=spec.backend)
        if spec.rank in ranks:
            groups[ranks] = g
    # One barrier in each group: its pairs are connected now, not at the first activation.
    for g in groups.values():
        dist.barrier(group=g)
    return NodeGroups(spec.rank, spec.size, groups, time.perf_counter() - t0)
