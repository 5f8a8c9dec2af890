"""`ClusterHandle` over real universal workers: the shared books, and their effects as commands.

The books (`warmserve.cluster.books`) change synchronously in `apply`, as the controller's
contract asks; each effect becomes a command on its worker's ordered pipe. The physical work
finishes later and comes back as worker events (`mark_loaded`, `mark_running`, ...), which
update the books. One worker is one device here (TP = 1); a dead worker's device is out of
the snapshot until its replacement reports ready.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from warmserve.cluster.books import Books, DeviceBook, InstanceBook, ReplicaBook
from warmserve.cluster.effects import (
    Activate,
    Deactivate,
    DropWeights,
    LoadWeights,
    ResizeKv,
    Route,
)
from warmserve.control.api import Action, ClusterSnapshot, StartInstance
from warmserve.engine.request import SamplingParams
from warmserve.hardware import PAGE_BYTES
from warmserve.runtime import messages as m
from warmserve.types import InstanceId, ReplicaId, RequestId, StartPath


@dataclass(frozen=True, slots=True)
class ModelFiles:
    name: str
    model_dir: str
    weight_pages: int


@dataclass(slots=True)
class EngineKv:
    """An instance's KV cache as its engine reports it."""

    blocks: int
    block_bytes: int
    used_blocks: int = 0


class RuntimeCluster:
    def __init__(
        self,
        num_workers: int,
        models: dict[str, ModelFiles],
        send: Callable[[int, m.Command], None],
        on_dispatch: Callable[[RequestId, InstanceId], None],
        page_bytes: int = PAGE_BYTES,
        payload: Callable[[RequestId], tuple[tuple[int, ...], SamplingParams]] | None = None,
    ) -> None:
        """`on_dispatch(request, instance)`: a request was routed (after its `AddRequest`
        went out, when `payload` gives each request's prompt and sampling parameters)."""
        weights = {name: f.weight_pages for name, f in models.items()}
        # Every worker is one device on its own; none is up until it reports ready.
        self.books = Books(num_workers, num_workers, weights, alive=False, page_bytes=page_bytes)
        self.models = models
        self.page_bytes = page_bytes
        self.starts: list[tuple[str, StartPath]] = []
        self.engine_kv: dict[InstanceId, EngineKv] = {}
        self._send = send
        self._on_dispatch = on_dispatch
        self._payload = payload

    @property
    def devices(self) -> list[DeviceBook]:
        return self.books.devices

    @property
    def replicas(self) -> dict[ReplicaId, ReplicaBook]:
        return self.books.replicas

    @property
    def instances(self) -> dict[InstanceId, InstanceBook]:
        return self.books.instances

    # ----- ClusterHandle ----------------------------------------------------------------
    def snapshot(self) -> ClusterSnapshot:
        return self.books.snapshot()

    def apply(self, actions: Sequence[Action]) -> None:
        for a in actions:
            if isinstance(a, StartInstance) and (len(a.gpus) != 1 or a.colocate):
                raise NotImplementedError("the serving runtime runs one model per worker (TP = 1)")
        for e in self.books.apply(actions):
            if isinstance(e, Route):
                if self._payload is not None:
                    (wid,) = self.books.instances[e.instance_id].devices
                    self._send(wid, m.AddRequest(e.request_id, *self._payload(e.request_id)))
                self._on_dispatch(e.request_id, e.instance_id)
                continue
            (wid,) = e.devices
            if isinstance(e, Activate):
                self.starts.append((e.model, e.path))
                self._send(wid, m.Activate(e.model, self.models[e.model].model_dir, e.instance_id))
            elif isinstance(e, Deactivate):
                self.engine_kv.pop(e.instance_id, None)
                self._send(wid, m.Deactivate(keep_weights=e.keep_weights))
                if e.kept_serial is not None:
                    # The pipe is ordered: whatever the worker runs next finds them resident.
                    self.books.mark_loaded(e.kept_serial, wid)
            elif isinstance(e, LoadWeights):
                if not e.for_activation:  # otherwise the Activate that follows loads them
                    self._send(wid, m.LoadModel(e.model, self.models[e.model].model_dir, e.serial))
            elif isinstance(e, DropWeights):
                self._send(wid, m.UnloadModel(e.model))
            elif isinstance(e, ResizeKv):
                self._send(wid, m.MapKvPages(e.kv_pages))
            else:  # pragma: no cover - the Effect union is closed
                raise TypeError(f"unknown effect {e!r}")

    def request_done(self, request_id: RequestId, inst_id: InstanceId) -> None:
        """Before the controller hears of it: it may then release a drained instance."""
        self.books.request_done(inst_id, request_id)

    # ----- events from workers ----------------------------------------------------------
    def worker_ready(self, wid: int, num_pages: int) -> None:
        self.books.device_ready(wid, num_pages)

    def mark_loaded(self, wid: int, token: int) -> None:
        self.books.mark_loaded(token, wid)

    def mark_running(
        self, wid: int, kv_blocks: int, block_bytes: int, instance_id: InstanceId | None = None
    ) -> InstanceBook | None:
        """The worker's engine is up. `instance_id`: the one it was activated for; an echo
        that arrives after that instance was released is not taken for the next one."""
        inst_id = self.books.devices[wid].instance_id
        if instance_id is not None and inst_id != instance_id:
            return None
        inst = self.books.mark_running(inst_id) if inst_id is not None else None
        if inst is not None:
            self.engine_kv[inst.instance_id] = EngineKv(kv_blocks, block_bytes)
        return inst

    def mark_kv_used(self, wid: int, used_blocks: int) -> InstanceBook | None:
        inst_id = self.books.devices[wid].instance_id
        inst = self.books.instances.get(inst_id) if inst_id is not None else None
        kv = self.engine_kv.get(inst_id) if inst_id is not None else None
        if inst is not None and kv is not None and kv.used_blocks != used_blocks:
            kv.used_blocks = used_blocks
            used = -(-used_blocks * kv.block_bytes // self.page_bytes)
            self.books.set_kv_used(inst.instance_id, min(inst.kv_pages, used))
        return inst

    def worker_lost(self, wid: int) -> InstanceId | None:
        """Forget everything on a dead worker; the instance it ran, if any."""
        lost = self.books.device_lost(wid)
        for inst_id in lost:
            self.engine_kv.pop(inst_id, None)
        return lost[0] if lost else None

    def check(self) -> None:
        self.books.check_invariants()
