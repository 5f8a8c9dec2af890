"""The seam between the runtime and its workers: how a command reaches a worker and how its
events and its death come back. The runtime, the books and the controller are the same for
every transport; only the link differs (a pipe to a local process, or a Ray actor handle)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Protocol

from warmserve.runtime import messages as m
from warmserve.runtime.groups import GroupSpec
from warmserve.serve_config import ServeConfig

# Ray keeps a single-node cluster on 127.0.0.1 only with this set before it is imported (it
# then refuses a second node, which a private cluster never has).
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"

OnEvent = Callable[[int, int, m.Event], None]  # (worker id, incarnation, event)
OnExit = Callable[[int, int], None]  # (worker id, incarnation)


class WorkerLink(Protocol):
    """One incarnation of one universal worker, as the runtime sees it. Events arrive on a
    thread of the link's own, in the order the worker sent them; `on_exit` comes once, last."""

    worker_id: int
    incarnation: int
    node_id: str

    @property
    def pid(self) -> int | None: ...

    def send(self, cmd: m.Command) -> None: ...

    def kill(self) -> None: ...

    def stop(self, timeout_s: float) -> None: ...


class WorkerLinks:
    """Where the workers run and how to start one: `count` workers, each on a fixed node."""

    def __init__(self, cfg: ServeConfig) -> None:
        self.cfg = cfg
        self.kind = cfg.runtime.kind
        self._started_ray = False
        if self.kind == "ray":
            if not cfg.runtime.address:  # a private cluster: loopback only (read at import)
                os.environ.setdefault(LOOPBACK_ENV, "0")
            import ray

            from warmserve.runtime import ray_worker

            self._started_ray = not ray.is_initialized()
            ray_worker.connect(cfg.runtime)
            self._placements = ray_worker.placements(cfg.workers.count)
            if not self._placements:
                raise RuntimeError("the Ray cluster has no alive node")
            self.count = len(self._placements)
            self.nodes = [p.node_id for p in self._placements]
        else:
            from warmserve.runtime.worker_process import LOCAL_NODE

            self.count = cfg.workers.count
            self.nodes = [LOCAL_NODE] * self.count

    def spawn(
        self,
        wid: int,
        incarnation: int,
        on_event: OnEvent,
        on_exit: OnExit,
        groups: GroupSpec | None = None,
    ) -> WorkerLink:
        """`groups`: the node's TP world the worker joins before it reports ready."""
        if self.kind == "ray":
            from warmserve.runtime.ray_worker import RayWorkerLink

            return RayWorkerLink(
                wid, incarnation, self.cfg.workers, self._placements[wid], on_event, on_exit,
                groups,
            )  # fmt: skip
        from warmserve.runtime.worker_process import WorkerProcess

        return WorkerProcess(wid, incarnation, self.cfg.workers, on_event, on_exit, groups)

    def close(self) -> None:
        if self._started_ray:
            import ray

            ray.shutdown()
            self._started_ray = False
