"""The cluster's page and instance books: one copy, under both drivers.

Every device's pages are in exactly one of: free, prewarmed weights (replicas not serving),
serving weights, KV cache. KV pages an instance lends to prewarming return to `free`.
`apply` changes the books synchronously, as `ClusterHandle.apply` promises, checks each
action against them, and returns the effects the driver must carry out; the driver reports
what finished (`mark_loaded`, `mark_running`, `set_kv_used`, `request_done`, devices coming
and going). Every id comes from the actions: the books allocate none.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from warmserve.cluster.effects import (
    Activate,
    Deactivate,
    DropWeights,
    Effect,
    LoadWeights,
    ResizeKv,
    Route,
)
from warmserve.cluster.snapshots import Snapshots
from warmserve.control.api import (
    Action,
    ClusterSnapshot,
    Dispatch,
    Evict,
    GpuView,
    InstanceView,
    Prewarm,
    ReleaseInstance,
    ReplicaView,
    SetKvPages,
    StartInstance,
    StopInstance,
)
from warmserve.hardware import PAGE_BYTES
from warmserve.types import InstanceId, InstanceState, ModelName, ReplicaId, RequestId, StartPath

# Per node, for a cluster with host checkpoint caches: (cached models, SSD busy until).
HostView = tuple[tuple[frozenset[str], ...], tuple[float, ...]]


@dataclass(slots=True)
class DeviceBook:
    device_id: int
    node_id: int
    total_pages: int = 0
    free_pages: int = 0
    prewarm_pages: int = 0  # replicas' weights, not serving
    weights_pages: int = 0  # serving instances' weights
    kv_pages: int = 0
    alive: bool = True
    instance_ids: list[InstanceId] = field(default_factory=list)  # several only co-located

    @property
    def instance_id(self) -> InstanceId | None:
        return self.instance_ids[0] if self.instance_ids else None


@dataclass(slots=True)
class ReplicaBook:
    serial: int  # stable across renames: names the weights' load
    replica_id: ReplicaId
    model: ModelName
    devices: tuple[int, ...]
    pages_per_device: int
    pending: set[int]  # devices whose shard is not loaded yet
    owner: InstanceId | None = None  # the instance serving from these weights

    @property
    def is_ready(self) -> bool:
        return not self.pending


@dataclass(slots=True)
class InstanceBook:
    instance_id: InstanceId
    model: ModelName
    devices: tuple[int, ...]
    path: StartPath
    replica_id: ReplicaId | None  # weights in a slot; None: the engine's own weights
    weight_pages: int  # per device
    kv_pages: int  # per device, owned now
    kv_lent_pages: int = 0
    kv_used_pages: int = 0  # as the driver last reported
    state: InstanceState = InstanceState.STARTING
    requests: set[RequestId] = field(default_factory=set)


class Books(Snapshots):
    def __init__(
        self,
        num_devices: int,
        devices_per_node: int,
        weight_pages: Mapping[str, int],
        *,
        pages_per_device: int = 0,
        alive: bool = True,
        page_bytes: int = PAGE_BYTES,
    ) -> None:
        self.devices = [
            DeviceBook(d, d // devices_per_node, pages_per_device, pages_per_device, alive=alive)
            for d in range(num_devices)
        ]
        self.devices_per_node = devices_per_node
        self.weight_pages = dict(weight_pages)  # per device, per model
        self.page_bytes = page_bytes
        self.replicas: dict[ReplicaId, ReplicaBook] = {}
        self.instances: dict[InstanceId, InstanceBook] = {}
        self.host_view: Callable[[], HostView] | None = None
        self._by_serial: dict[int, ReplicaBook] = {}
        self._next_serial = 0
        # Layout (devices, replicas, instance set) and usage (KV in use) change at different
        # rates; snapshot parts are rebuilt only when their own version moved.
        self._layout_version = 0
        self._usage_version = 0
        # Layout changes that left the placement (`versions`): KV resizes, engines coming up.
        self._placement_kept = 0
        self._snapshot: ClusterSnapshot | None = None
        self._snapshot_versions = (-1, -1)
        # The views in the last snapshot, reused while their fields are unchanged.
        self._gpu_views: list[GpuView | None] = [None] * num_devices
        # Devices whose pages or instances may have changed since their cached view was
        # checked: the only ones a snapshot compares again (all, to begin with).
        self._dirty_devices: set[int] = set(range(num_devices))
        # Whether a replica (or its owner, id or readiness) may have changed since the replica
        # views were built; a KV resize, the commonest layout change, leaves them as they are.
        self._replicas_changed = True
        self._replica_views: dict[ReplicaId, ReplicaView] = {}
        self._instance_views: dict[InstanceId, InstanceView] = {}
        # Instances added, removed or whose view fields may have changed since the instance
        # views were built: the only ones a snapshot compares again.
        self._dirty_instances: set[InstanceId] = set()
        self._instance_set_changed = False  # an instance added or removed since then

    # ----- actions ----------------------------------------------------------------------
    def apply(self, actions: Sequence[Action]) -> list[Effect]:
        out: list[Effect] = []
        dirty = self._dirty_devices
        for a in actions:
            if isinstance(a, Dispatch):
                inst = self.instances[a.instance_id]
                assert inst.state != InstanceState.STOPPING, "routed to a draining instance"
                inst.requests.add(a.request_id)
                out.append(Route(a.request_id, a.instance_id, inst.devices))
                continue  # routing changes no page
            # Each effect names the devices whose pages the action moved.
            if isinstance(a, SetKvPages):
                e = self._set_kv(a.instance_id, a.kv_pages)
                out.append(e)
                dirty.update(e.devices)
                self._placement_kept += 1
            elif isinstance(a, StartInstance):
                out.extend(self._start(a))
                dirty.update(a.gpus)
                self._replicas_changed = True
            elif isinstance(a, StopInstance):
                self._stop(a.instance_id)  # a state change: no page moves
            elif isinstance(a, ReleaseInstance):
                e = self._release(a)
                out.append(e)
                dirty.update(e.devices)
                self._replicas_changed = True
            elif isinstance(a, Prewarm):
                e = self._prewarm(a)
                out.append(e)
                dirty.update(e.devices)
                self._replicas_changed = True
            elif isinstance(a, Evict):
                e = self._evict(a.replica_id)
                out.append(e)
                dirty.update(e.devices)
                self._replicas_changed = True
            else:  # pragma: no cover - the Action union is closed
                raise TypeError(f"unknown action {a!r}")
            self._layout_version += 1
        return out

    def _start(self, a: StartInstance) -> list[Effect]:
        assert a.instance_id not in self.instances, f"instance id {a.instance_id} reused"
        pages = self.weight_pages[a.model]
        for d in a.gpus:
            dev = self.devices[d]
            assert dev.alive, f"device {d} is down"
            assert a.colocate or not dev.instance_ids, f"device {d} already serves"
        out: list[Effect] = []
        rep: ReplicaBook | None = None
        if a.replica_id is not None:
            assert a.new_replica_id is None, "a start uses one replica"
            rep = self.replicas[a.replica_id]
            assert rep.model == a.model and rep.devices == a.gpus and rep.owner is None
            expected = StartPath.PREWARM_HIT if rep.is_ready else StartPath.INPROGRESS_HIT
            assert a.path == expected, f"start path {a.path} but replica is {expected}"
            for d in a.gpus:
                self.devices[d].prewarm_pages -= pages
                self.devices[d].weights_pages += pages
        else:
            assert a.path == StartPath.COLD, f"start path {a.path} without a replica"
            self._take_free(a.gpus, pages)
            if a.new_replica_id is not None:  # a miss loads into a slot, like a prewarm
                rep = self._new_replica(a.new_replica_id, a.model, a.gpus, pages)
                out.append(LoadWeights(rep.serial, rep.replica_id, a.model, a.gpus, True))
        if rep is not None:
            rep.owner = a.instance_id
        kv = min(self.devices[d].free_pages for d in a.gpus)  # KV grows over every free page
        if a.kv_pages is not None:  # a static share (co-located instances split the memory)
            assert a.kv_pages <= kv, f"KV share {a.kv_pages} > {kv} free pages"
            kv = a.kv_pages
        for d in a.gpus:
            dev = self.devices[d]
            dev.free_pages -= kv
            dev.kv_pages += kv
            dev.instance_ids.append(a.instance_id)
        self._dirty_instances.add(a.instance_id)
        self._instance_set_changed = True
        self.instances[a.instance_id] = InstanceBook(
            a.instance_id,
            a.model,
            a.gpus,
            a.path,
            None if rep is None else rep.replica_id,
            pages,
            kv,
        )
        serial = None if rep is None else rep.serial
        ready = rep is not None and rep.is_ready
        out.append(Activate(a.instance_id, a.model, a.gpus, a.path, serial, ready, a.colocate))
        return out

    def _take_free(self, devices: tuple[int, ...], pages: int) -> None:
        for d in devices:
            dev = self.devices[d]
            assert dev.free_pages >= pages, f"device {d}: {dev.free_pages} free < {pages}"
            dev.free_pages -= pages
            dev.weights_pages += pages

    def _stop(self, inst_id: InstanceId) -> None:
        inst = self.instances[inst_id]
        # An engine that never ran would never drain: its requests would wait forever.
        assert inst.state == InstanceState.RUNNING, f"instance {inst_id} is {inst.state}"
        assert inst.requests, "an empty instance is released, not drained"
        inst.state = InstanceState.STOPPING
        self._dirty_instances.add(inst_id)

    def _release(self, a: ReleaseInstance) -> Deactivate:
        inst = self.instances.pop(a.instance_id)
        self._dirty_instances.add(a.instance_id)
        self._instance_set_changed = True
        assert not inst.requests, f"instance {a.instance_id} still holds {len(inst.requests)}"
        # A starting instance's load is in flight: releasing it would keep weights that are
        # not there yet (the autoscaler never stops one).
        assert inst.state != InstanceState.STARTING, f"instance {a.instance_id} is starting"
        keep = a.keep_as is not None
        assert keep == (inst.replica_id is not None), "weights kept exactly when in a slot"
        kept_serial = None
        for d in inst.devices:
            dev = self.devices[d]
            dev.free_pages += inst.kv_pages
            dev.kv_pages -= inst.kv_pages
            dev.weights_pages -= inst.weight_pages
            dev.instance_ids.remove(inst.instance_id)
            if keep:
                dev.prewarm_pages += inst.weight_pages
            else:
                dev.free_pages += inst.weight_pages
        if a.keep_as is not None and inst.replica_id is not None:
            rep = self.replicas.pop(inst.replica_id)
            assert a.keep_as not in self.replicas, f"replica id {a.keep_as} reused"
            rep.owner = None
            rep.replica_id = a.keep_as
            self.replicas[a.keep_as] = rep
            kept_serial = rep.serial
        return Deactivate(inst.instance_id, inst.devices, kept_serial)

    def _set_kv(self, inst_id: InstanceId, kv_pages: int) -> ResizeKv:
        """Lend (the difference becomes free pages for prewarming) or reclaim KV pages."""
        inst = self.instances[inst_id]
        delta = kv_pages - inst.kv_pages
        assert kv_pages >= max(1, inst.kv_used_pages), "cannot lend pages in use"
        assert inst.kv_lent_pages - delta >= 0, "cannot reclaim more than was lent"
        for d in inst.devices:
            dev = self.devices[d]
            assert dev.free_pages >= delta, f"device {d} lacks {delta} free pages to reclaim"
            dev.free_pages -= delta
            dev.kv_pages += delta
        inst.kv_pages = kv_pages
        inst.kv_lent_pages -= delta
        self._dirty_instances.add(inst_id)
        return ResizeKv(inst_id, inst.devices, kv_pages, delta > 0)

    def _prewarm(self, a: Prewarm) -> LoadWeights:
        pages = self.weight_pages[a.model]
        for d in a.gpus:
            dev = self.devices[d]
            assert dev.alive and dev.free_pages >= pages, f"device {d}: no room to prewarm"
            dev.free_pages -= pages
            dev.prewarm_pages += pages
        rep = self._new_replica(a.replica_id, a.model, a.gpus, pages)
        return LoadWeights(rep.serial, rep.replica_id, a.model, a.gpus)

    def _new_replica(
        self, rid: ReplicaId, model: ModelName, devices: tuple[int, ...], pages: int
    ) -> ReplicaBook:
        assert rid not in self.replicas, f"replica id {rid} reused"
        self._next_serial += 1
        rep = ReplicaBook(self._next_serial, rid, model, devices, pages, set(devices))
        self.replicas[rid] = rep
        self._by_serial[rep.serial] = rep
        return rep

    def _evict(self, rid: ReplicaId) -> DropWeights:
        rep = self.replicas.pop(rid)
        assert rep.owner is None, "cannot evict weights that are serving"
        del self._by_serial[rep.serial]
        for d in rep.devices:
            dev = self.devices[d]
            dev.prewarm_pages -= rep.pages_per_device
            dev.free_pages += rep.pages_per_device
        return DropWeights(rep.serial, rep.model, rep.devices)

    # ----- what the driver reports ------------------------------------------------------
    def replica_by_serial(self, serial: int) -> ReplicaBook | None:
        """The replica of a load, if its weights are still in the books."""
        rep = self._by_serial.get(serial)
        return rep if rep is not None and self.replicas.get(rep.replica_id) is rep else None

    def mark_loaded(self, serial: int, device: int) -> ReplicaBook | None:
        """One shard of a load finished; the replica if that made it ready."""
        rep = self.replica_by_serial(serial)
        if rep is None or device not in rep.pending:
            return None
        rep.pending.discard(device)
        if rep.pending:
            return None
        self._layout_version += 1
        self._replicas_changed = True
        return rep

    def mark_running(self, inst_id: InstanceId) -> InstanceBook | None:
        """The instance's engine serves (so its weights are loaded everywhere)."""
        inst = self.instances.get(inst_id)
        if inst is None:
            return None
        if inst.replica_id is not None:
            self.replicas[inst.replica_id].pending.clear()
        if inst.state == InstanceState.STARTING:
            inst.state = InstanceState.RUNNING
            self._dirty_instances.add(inst_id)
        self._layout_version += 1
        # The replica it owns is in no view; a running instance is not a stopping one.
        self._placement_kept += 1
        self._replicas_changed = True
        return inst

    def set_kv_used(self, inst_id: InstanceId, pages: int) -> None:
        """KV use changed: the next snapshot needs fresh instance views."""
        self.instances[inst_id].kv_used_pages = pages
        self._dirty_instances.add(inst_id)
        self._usage_version += 1

    def request_done(self, inst_id: InstanceId, request_id: RequestId) -> None:
        inst = self.instances.get(inst_id)
        if inst is not None:
            inst.requests.discard(request_id)

    def device_ready(self, device: int, num_pages: int) -> None:
        dev = self.devices[device]
        assert not dev.instance_ids, f"device {device} came up holding instances"
        dev.total_pages = dev.free_pages = num_pages
        dev.prewarm_pages = dev.weights_pages = dev.kv_pages = 0
        dev.alive = True
        self._dirty_devices.add(device)
        self._layout_version += 1

    def device_lost(self, device: int) -> list[InstanceId]:
        """Forget everything on a dead device; the instances that ran on it."""
        dev = self.devices[device]
        lost = list(dev.instance_ids)
        for rid in [r for r, rep in self.replicas.items() if device in rep.devices]:
            rep = self.replicas.pop(rid)
            del self._by_serial[rep.serial]
            if rep.owner is not None:
                continue  # its pages are the instance's, freed below
            for d in rep.devices:
                if d != device:  # a group's other devices get their pages back
                    self.devices[d].prewarm_pages -= rep.pages_per_device
                    self.devices[d].free_pages += rep.pages_per_device
        for inst_id in lost:
            inst = self.instances.pop(inst_id)
            self._dirty_instances.add(inst_id)
            self._instance_set_changed = True
            for d in inst.devices:
                if d != device:  # a group's other devices get their pages back
                    self._free_instance_pages(self.devices[d], inst)
        dev.alive, dev.instance_ids = False, []
        dev.total_pages = dev.free_pages = dev.prewarm_pages = 0
        dev.weights_pages = dev.kv_pages = 0
        self._dirty_devices.update(range(len(self.devices)))  # its groups' other devices too
        self._replicas_changed = True
        self._layout_version += 1
        return lost

    def _free_instance_pages(self, dev: DeviceBook, inst: InstanceBook) -> None:
        dev.instance_ids.remove(inst.instance_id)
        dev.kv_pages -= inst.kv_pages
        dev.weights_pages -= inst.weight_pages
        dev.free_pages += inst.kv_pages + inst.weight_pages

    # ----- checks -----------------------------------------------------------------------
    def check_invariants(self) -> None:
        """Pages conserved on every device, and every page's owner accounted for; the cached
        views of devices and replicas not marked changed still match them."""
        self._check_views()
        prewarm = [0] * len(self.devices)
        weights = [0] * len(self.devices)
        kv = [0] * len(self.devices)
        models_on: list[set[str]] = [set() for _ in self.devices]
        for r in self.replicas.values():
            assert self._by_serial[r.serial] is r
            for d in r.devices:
                (weights if r.owner is not None else prewarm)[d] += r.pages_per_device
                assert r.model not in models_on[d], f"two replicas of {r.model} on device {d}"
                models_on[d].add(r.model)
        for inst in self.instances.values():
            assert 0 <= inst.kv_used_pages <= inst.kv_pages and inst.kv_lent_pages >= 0
            if inst.replica_id is not None:
                assert self.replicas[inst.replica_id].owner == inst.instance_id
            for d in inst.devices:
                assert inst.instance_id in self.devices[d].instance_ids
                kv[d] += inst.kv_pages
                if inst.replica_id is None:
                    weights[d] += inst.weight_pages
        for dev in self.devices:
            d = dev.device_id
            assert min(dev.free_pages, dev.prewarm_pages, dev.weights_pages, dev.kv_pages) >= 0
            assert dev.alive or dev.total_pages == 0, f"device {d} is down but holds pages"
            total = dev.free_pages + dev.prewarm_pages + dev.weights_pages + dev.kv_pages
            assert total == dev.total_pages, f"device {d}: {total} pages != {dev.total_pages}"
            assert dev.prewarm_pages == prewarm[d], f"device {d} prewarm books"
            assert dev.weights_pages == weights[d], f"device {d} weight books"
            assert dev.kv_pages == kv[d], f"device {d}: KV books {dev.kv_pages} != {kv[d]}"
