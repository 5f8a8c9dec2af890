"""Request routing: least-loaded instance with room, else the model's FIFO queue."""

from __future__ import annotations

from collections.abc import Iterable

from warmserve.types import InstanceId


def choose_instance(loads: Iterable[tuple[InstanceId, int]], capacity: int) -> InstanceId | None:
    """The instance with the fewest in-flight requests below capacity (ties: lowest id)."""
    best: tuple[int, InstanceId] | None = None
    for inst_id, n in loads:
        if n < capacity and (best is None or (n, inst_id) < best):
            best = (n, inst_id)
    return None if best is None else best[1]
