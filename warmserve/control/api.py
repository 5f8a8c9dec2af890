"""The seam between policy and the world: snapshots in, actions out.

The simulator (`warmserve.sim`) and the real runtime implement `ClusterHandle`; the `Controller`
only ever sees frozen views and answers with actions. `apply` must update the handle's books
synchronously (the physical work may finish later), so the next snapshot reflects the
actions. A handle may return the very same `gpus`, `replicas` and `instances` tuples while
they have not changed; the controller then skips work whose inputs are unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Protocol

from warmserve.frozen import quick_init
from warmserve.hardware import PAGE_BYTES
from warmserve.types import InstanceId, InstanceState, ModelName, ReplicaId, RequestId, StartPath


@dataclass(frozen=True, slots=True)
class ServedModel:
    """What policy needs to know about one served model."""

    name: ModelName
    tp: int
    pages_per_gpu: int  # weight pages of one TP shard
    shard_bytes: int
    kv_bytes_per_token_per_gpu: float
    max_model_len: int
    # Relative expected load before any history exists (policies with prior prewarming):
    # shares of the free memory prewarmed for models that no forecast asks for yet.
    priority: float = 1.0


@quick_init
@dataclass(frozen=True, slots=True)
class RequestInfo:
    request_id: RequestId
    model: ModelName
    arrival_s: float
    input_tokens: int
    max_tokens: int


@quick_init
@dataclass(frozen=True, slots=True)
class GpuView:
    gpu_id: int
    node_id: int
    total_pages: int
    free_pages: int
    instance_id: InstanceId | None  # the instance running here, if any


@quick_init
@dataclass(frozen=True, slots=True)
class ReplicaView:
    """Weights of one model resident (or loading) on a GPU group, not serving."""

    replica_id: ReplicaId
    model: ModelName
    gpus: tuple[int, ...]
    pages_per_gpu: int
    is_ready: bool


@quick_init
@dataclass(frozen=True, slots=True)
class InstanceView:
    instance_id: InstanceId
    model: ModelName
    gpus: tuple[int, ...]
    state: InstanceState
    kv_pages: int  # per GPU, owned by the instance now
    kv_used_pages: int  # per GPU, held by admitted requests
    kv_lent_pages: int  # per GPU, lent to prewarming (kv_pages + lent = KV at activation)


@dataclass(frozen=True)  # no slots: the indexes below are cached on first use
class ClusterSnapshot:
    gpus: tuple[GpuView, ...]
    replicas: tuple[ReplicaView, ...]
    instances: tuple[InstanceView, ...]
    gpus_per_node: int
    # Per node, for clusters with a host-memory checkpoint cache (ServerlessLLM-style loading):
    host_cached: tuple[frozenset[str], ...] = ()  # checkpoints in the node's DRAM cache
    host_busy_until_s: tuple[float, ...] = ()  # when the node's SSD finishes queued reads
    page_bytes: int = PAGE_BYTES  # the size of every page counted here

    @classmethod
    def of(
        cls,
        gpus: tuple[GpuView, ...],
        replicas: tuple[ReplicaView, ...],
        instances: tuple[InstanceView, ...],
        gpus_per_node: int,
        host_cached: tuple[frozenset[str], ...],
        host_busy_until_s: tuple[float, ...],
        page_bytes: int,
    ) -> ClusterSnapshot:
        """The snapshot `__init__` makes with every field given, without its seven frozen
        `object.__setattr__` calls (the class has no `__post_init__`): a handle builds one
        after every change of the cluster, and that construction was a noticeable part."""
        snap = object.__new__(cls)
        snap.__dict__.update(
            gpus=gpus,
            replicas=replicas,
            instances=instances,
            gpus_per_node=gpus_per_node,
            host_cached=host_cached,
            host_busy_until_s=host_busy_until_s,
            page_bytes=page_bytes,
        )
        return snap

    @cached_property
    def replicas_by_gpu(self) -> dict[int, list[ReplicaView]]:
        out: dict[int, list[ReplicaView]] = {g.gpu_id: [] for g in self.gpus}
        for r in self.replicas:
            for g in r.gpus:
                out[g].append(r)
        return out

    @cached_property
    def instance_by_id(self) -> dict[InstanceId, InstanceView]:
        return {i.instance_id: i for i in self.instances}


# Actions. The controller allocates ids, so every decision is reproducible for a given input.
@quick_init
@dataclass(frozen=True, slots=True)
class Dispatch:
    request_id: RequestId
    instance_id: InstanceId


@quick_init
@dataclass(frozen=True, slots=True)
class StartInstance:
    instance_id: InstanceId
    model: ModelName
    gpus: tuple[int, ...]
    path: StartPath
    replica_id: ReplicaId | None  # the replica activated (hits); None on a cold start
    kv_pages: int | None = None  # a fixed KV share per GPU; None: all free pages
    colocate: bool = False  # share the GPUs with other co-located instances (MuxServe)
    # A cold start under unified memory loads its weights into a slot, like a prewarm: the
    # id that replica gets (allocated here, like every id). None: the engine owns its weights.
    new_replica_id: ReplicaId | None = None


@quick_init
@dataclass(frozen=True, slots=True)
class StopInstance:
    """Out of routing: the instance drains the requests it holds. The controller releases it
    (`ReleaseInstance`) once the last one is done; an empty instance is released directly."""

    instance_id: InstanceId


@quick_init
@dataclass(frozen=True, slots=True)
class ReleaseInstance:
    """The instance holds no request: free its KV pages. Its weights stay as the prewarmed
    replica `keep_as` (they sit in a slot, under unified memory) or are freed (None)."""

    instance_id: InstanceId
    keep_as: ReplicaId | None


@quick_init
@dataclass(frozen=True, slots=True)
class Prewarm:
    replica_id: ReplicaId
    model: ModelName
    gpus: tuple[int, ...]


@quick_init
@dataclass(frozen=True, slots=True)
class Evict:
    replica_id: ReplicaId


@quick_init
@dataclass(frozen=True, slots=True)
class SetKvPages:
    """Grow or shrink an instance's own KV pages (per GPU); the difference is lent or reclaimed."""

    instance_id: InstanceId
    kv_pages: int


Action = Dispatch | StartInstance | StopInstance | ReleaseInstance | Prewarm | Evict | SetKvPages


class ClusterHandle(Protocol):
    def snapshot(self) -> ClusterSnapshot: ...

    def apply(self, actions: Sequence[Action]) -> None: ...

    # Narrower than a snapshot, for checks made every tick (`cluster/books.py` has them).
    def versions(self) -> tuple[int, int, int]:
        """(layout, usage, placement) counters: the next snapshot is a new object exactly when
        layout or usage moved since the last one; its `gpus` and `replicas` are new exactly
        when layout did. Placement moves with every layout change but a KV resize (the only
        change that leaves every replica, instance and instance state as it was)."""
        ...

    def instance_views(self) -> tuple[InstanceView, ...]:
        """`snapshot().instances`' views (the same objects), without building a snapshot."""
        ...

    def demand_reads(self) -> tuple[tuple[tuple[ReplicaId, ModelName], ...], tuple[ModelName, ...]]:
        """`snapshot()`'s replicas as (id, model) and its stopping instances' models, in its
        order, without building a snapshot: all the planners' demand reads of it."""
        ...

    def free_pages(self, gpus: tuple[int, ...]) -> list[int]:
        """Each of `gpus`' free pages, as `snapshot().gpus` would show them."""
        ...

    @property
    def page_bytes(self) -> int:
        """`snapshot().page_bytes`: fixed for the handle's life."""
        ...


class ForecastView(Protocol):
    """A model's forecast for the next window, as drivers show it (`forecaster.Forecast`)."""

    @property
    def avg(self) -> float: ...

    @property
    def peak(self) -> float: ...


class ControlPlane(Protocol):
    """What a driver (simulator or serving runtime) calls; every policy implements it."""

    def on_request(self, now: float, req: RequestInfo, cluster: ClusterHandle) -> None: ...

    def on_request_done(
        self, now: float, request_id: RequestId, cluster: ClusterHandle
    ) -> None: ...

    def tick(self, now: float, cluster: ClusterHandle) -> None: ...

    def on_kv_pressure(self, now: float, instance_id: InstanceId, cluster: ClusterHandle) -> None:
        """Requests wait for KV pages on an instance that has lent some."""
        ...

    def cancel_queued(self, now: float, request_id: RequestId) -> bool:
        """Drop a request still waiting for an instance; False if it was dispatched."""
        ...

    def on_instance_failed(
        self, now: float, instance_id: InstanceId, cluster: ClusterHandle
    ) -> list[RequestId]:
        """The instance died with its device; the requests it held, to retry or fail."""
        ...

    # Views for the driver's operators (admin pages, metrics, per-request records).
    def load(self, model: ModelName, now: float) -> float: ...

    def forecasts(self) -> Mapping[ModelName, ForecastView]: ...

    def num_queued(self, model: ModelName) -> int: ...

    def queued_request_ids(self) -> set[RequestId]: ...
