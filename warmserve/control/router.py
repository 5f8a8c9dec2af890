"""Request routing: least-loaded instance with room, else the model's FIFO queue."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from warmserve.types import InstanceId, ModelName


class _Routable(Protocol):
    model: ModelName
    in_flight: int
    stopping: bool


def least_loaded(
    instances: Mapping[InstanceId, _Routable], model: ModelName, capacity: int
) -> InstanceId | None:
    """Of `model`'s instances not stopping, the one with the fewest in-flight requests below
    `capacity` (ties: lowest id); None if all are full. One pass without a generator: it runs
    for every arriving request."""
    best: InstanceId | None = None
    best_n = capacity  # only an instance below capacity is taken
    for inst_id, inst in instances.items():
        if inst.model == model and not inst.stopping:
            n = inst.in_flight
            if n < best_n or (n == best_n and best is not None and inst_id < best):
                best, best_n = inst_id, n
    return best
