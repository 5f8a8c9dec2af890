"""What applying an action asks of the world, in no driver's vocabulary.

`Books.apply` returns these in the order the work must happen. The simulator turns them into
timed events; the serving runtime into commands on each worker's ordered pipe.
"""

from __future__ import annotations

from dataclasses import dataclass

from warmserve.frozen import quick_init
from warmserve.types import InstanceId, ModelName, ReplicaId, RequestId, StartPath


@quick_init
@dataclass(frozen=True, slots=True)
class LoadWeights:
    """Load a replica's shards into a slot on each of its devices.

    `serial` names the load for as long as it lives, across the replica's renames; the
    runtime also uses it as the worker's load token. `for_activation`: the weights of a cold
    start under unified memory, which an engine that loads its own weights loads anyway.
    """

    serial: int
    replica_id: ReplicaId
    model: ModelName
    devices: tuple[int, ...]
    for_activation: bool = False


@quick_init
@dataclass(frozen=True, slots=True)
class DropWeights:
    """Free a replica's slot: cancel its load if it is queued or in progress."""

    serial: int
    model: ModelName
    devices: tuple[int, ...]


@quick_init
@dataclass(frozen=True, slots=True)
class Activate:
    """Bring up an engine for an instance, on the replica's weights if it has one."""

    instance_id: InstanceId
    model: ModelName
    devices: tuple[int, ...]
    path: StartPath
    replica_serial: int | None  # the weights' load; None: an engine with its own weights
    weights_ready: bool
    shared: bool  # co-located with other instances on the same devices


@quick_init
@dataclass(frozen=True, slots=True)
class Deactivate:
    """The instance is gone from the books; its engine stops. Its weights stay resident as
    the replica of load `kept_serial`, or (None) are freed with the engine."""

    instance_id: InstanceId
    devices: tuple[int, ...]
    kept_serial: int | None

    @property
    def keep_weights(self) -> bool:
        return self.kept_serial is not None


@quick_init
@dataclass(frozen=True, slots=True)
class ResizeKv:
    instance_id: InstanceId
    devices: tuple[int, ...]
    kv_pages: int
    grew: bool  # pages came back: requests waiting for KV may now be admitted


@quick_init
@dataclass(frozen=True, slots=True)
class Route:
    request_id: RequestId
    instance_id: InstanceId
    devices: tuple[int, ...]


Effect = LoadWeights | DropWeights | Activate | Deactivate | ResizeKv | Route
