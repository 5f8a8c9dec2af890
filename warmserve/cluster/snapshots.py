"""The books' reads: the `ClusterSnapshot` and the narrower reads a control tick makes, built
from the records in `books.py` with their frozen views cached (a view whose fields did not
change is the same object in the next snapshot; building views was most of a snapshot's cost).

A mixin of `Books`, which holds the records and marks what changed (`_dirty_devices`,
`_dirty_instances`, `_instance_set_changed`, `_replicas_changed`, the layout and usage
versions); split out only to keep each module about one thing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from warmserve.control.api import ClusterSnapshot, GpuView, InstanceView, ReplicaView
from warmserve.types import InstanceId, InstanceState, ModelName, ReplicaId

if TYPE_CHECKING:
    from warmserve.cluster.books import DeviceBook, HostView, InstanceBook, ReplicaBook

DEAD = -1  # GpuView.instance_id of a device that is down: nothing is placed on it


class Snapshots:
    """Methods of `Books` (its only subclass), which holds the state they read: `devices`,
    `replicas`, `instances`, `devices_per_node`, `page_bytes`, `host_view`, the versions
    (`_layout_version`, `_usage_version`, `_placement_kept`), the change marks and the cached
    views (`_snapshot`, `_snapshot_versions`, `_gpu_views`, `_replica_views`,
    `_instance_views`)."""

    devices: list[DeviceBook]
    replicas: dict[ReplicaId, ReplicaBook]
    instances: dict[InstanceId, InstanceBook]
    devices_per_node: int
    page_bytes: int
    host_view: Callable[[], HostView] | None
    _layout_version: int
    _usage_version: int
    _placement_kept: int
    _snapshot: ClusterSnapshot | None
    _snapshot_versions: tuple[int, int]
    _gpu_views: list[GpuView | None]
    _dirty_devices: set[int]
    _replicas_changed: bool
    _replica_views: dict[ReplicaId, ReplicaView]
    _instance_views: dict[InstanceId, InstanceView]
    _dirty_instances: set[InstanceId]
    _instance_set_changed: bool

    def versions(self) -> tuple[int, int, int]:
        """(layout, usage, placement): the next snapshot is a new one exactly when layout or
        usage moved since the last, and its `gpus` and `replicas` are new tuples exactly when
        layout did. Placement moves with every layout change but a KV resize or an engine
        coming up (`mark_running`): while it stays, so do the replicas the snapshot lists, the
        instances and which of them are stopping (KV, free pages and starting instances'
        readiness may have moved)."""
        return (
            self._layout_version,
            self._usage_version,
            self._layout_version - self._placement_kept,
        )

    def free_pages(self, devices: tuple[int, ...]) -> list[int]:
        """The free pages of each of `devices`, as the next snapshot's GpuViews show them."""
        books = self.devices
        return [books[d].free_pages for d in devices]

    def instance_views(self) -> tuple[InstanceView, ...]:
        """The instances as the next snapshot would show them (the same view objects), without
        building the rest of it."""
        self._refresh_instance_views()
        return tuple(self._instance_views.values())

    def demand_reads(self) -> tuple[tuple[tuple[ReplicaId, ModelName], ...], tuple[ModelName, ...]]:
        """What the planners' demand reads of the next snapshot, without building it: its
        replicas' (id, model) and its stopping instances' models, each in the snapshot's order
        (`_replica_views_now` and `_refresh_instance_views` keep these dicts' orders)."""
        stopping = InstanceState.STOPPING
        return (
            tuple((r.replica_id, r.model) for r in self.replicas.values() if r.owner is None),
            tuple(i.model for i in self.instances.values() if i.state == stopping),
        )

    def snapshot(self) -> ClusterSnapshot:
        versions = (self._layout_version, self._usage_version)
        if self._snapshot is None or self._snapshot_versions != versions:
            self._snapshot = self._build_snapshot(versions[0] != self._snapshot_versions[0])
            self._snapshot_versions = versions
        return self._snapshot

    def _build_snapshot(self, layout_changed: bool) -> ClusterSnapshot:
        # Every snapshot has fresh tuples (consumers test their identity to skip work), but a
        # view whose fields did not change is the cached object: building frozen views is most
        # of a snapshot's cost, and most views are unchanged from one snapshot to the next.
        if layout_changed or self._snapshot is None:
            gpus = self._gpu_views_now()
            if self._replicas_changed or self._snapshot is None:
                replicas = self._replica_views_now()
            else:  # the same views in a fresh tuple, as after any layout change
                replicas = tuple(self._replica_views.values())
        else:  # the same objects: consumers may test identity to skip work
            gpus, replicas = self._snapshot.gpus, self._snapshot.replicas
        self._refresh_instance_views()
        cached, busy = self.host_view() if self.host_view is not None else ((), ())
        return ClusterSnapshot.of(
            gpus,
            replicas,
            tuple(self._instance_views.values()),
            self.devices_per_node,
            cached,
            busy,
            self.page_bytes,
        )

    def _refresh_instance_views(self) -> None:
        """Bring the instance views up to date: a view is replaced only if its instance's
        fields moved, whenever this runs (a snapshot's build or `instance_views`)."""
        dirty = self._dirty_instances
        if self._instance_set_changed:
            views = self._instance_views
            self._instance_views = {
                i.instance_id: self._instance_view(i, views.get(i.instance_id))
                for i in self.instances.values()
            }
            self._instance_set_changed = False
        elif dirty:  # the same instances: only the changed views are replaced, in place
            views = self._instance_views
            for inst_id in dirty:
                i = self.instances[inst_id]
                views[inst_id] = self._instance_view(i, views[inst_id])
        dirty.clear()

    @staticmethod
    def _instance_view(i: InstanceBook, v: InstanceView | None) -> InstanceView:
        """`v` if it still shows `i`, else a fresh view."""
        if (
            v is not None
            and v.kv_used_pages == i.kv_used_pages
            and v.kv_pages == i.kv_pages
            and v.state == i.state
            and v.kv_lent_pages == i.kv_lent_pages
            and v.gpus is i.devices
            and v.model == i.model
        ):
            return v
        return InstanceView(
            i.instance_id, i.model, i.devices, i.state, i.kv_pages, i.kv_used_pages, i.kv_lent_pages
        )

    def _replica_views_now(self) -> tuple[ReplicaView, ...]:
        views = self._replica_views
        fresh: dict[ReplicaId, ReplicaView] = {}
        for r in self.replicas.values():
            if r.owner is None:
                v = views.get(r.replica_id)
                ready = not r.pending
                if (
                    v is None
                    or v.is_ready != ready
                    or v.gpus is not r.devices
                    or v.model != r.model
                    or v.pages_per_gpu != r.pages_per_device
                ):
                    v = ReplicaView(r.replica_id, r.model, r.devices, r.pages_per_device, ready)
                fresh[r.replica_id] = v
        self._replica_views = fresh
        self._replicas_changed = False
        return tuple(fresh.values())

    def _gpu_views_now(self) -> tuple[GpuView, ...]:
        cached = self._gpu_views
        devices = self.devices
        for k in self._dirty_devices:
            d = devices[k]
            ids = d.instance_ids
            inst = (ids[0] if ids else None) if d.alive else DEAD
            v = cached[d.device_id]
            if (
                v is None
                or v.free_pages != d.free_pages
                or v.instance_id != inst
                or v.total_pages != d.total_pages
                or v.node_id != d.node_id
            ):
                cached[d.device_id] = GpuView(
                    d.device_id, d.node_id, d.total_pages, d.free_pages, inst
                )
        self._dirty_devices.clear()
        return tuple(cached)  # type: ignore[arg-type]  # every device has its view by now

    def _check_views(self) -> None:
        """The cached views of devices, replicas and instances not marked changed still match
        their records (`Books.check_invariants`)."""
        for dev, v in zip(self.devices, self._gpu_views, strict=True):
            if v is None or dev.device_id in self._dirty_devices:
                continue
            inst = (dev.instance_ids[0] if dev.instance_ids else None) if dev.alive else DEAD
            seen = (v.free_pages, v.instance_id, v.total_pages)
            assert seen == (dev.free_pages, inst, dev.total_pages), f"device {dev.device_id} view"
        if not self._replicas_changed and self._snapshot is not None:
            assert self._replica_views_now() == self._snapshot.replicas, "replica views"
        if not self._dirty_instances:
            views = self._instance_views
            assert list(views) == list(self.instances), "instance views: the instances"
            for i in self.instances.values():
                seen = views[i.instance_id]
                fields = (i.model, i.devices, i.state, i.kv_pages, i.kv_used_pages,
                          i.kv_lent_pages)  # fmt: skip
                assert (seen.model, seen.gpus, seen.state, seen.kv_pages, seen.kv_used_pages,
                        seen.kv_lent_pages) == fields, f"instance {i.instance_id} view"  # fmt: skip
