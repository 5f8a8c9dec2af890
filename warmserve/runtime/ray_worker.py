"""Universal workers as Ray actors: the same worker loop, reached through an actor handle.

The transport seam is `WorkerLink` (`transport.py`): the runtime sends commands and receives
events and exits the same way whether a worker is a local process behind a pipe
(`WorkerProcess`) or a Ray actor on any node of a cluster (`RayWorkerLink`). Inside the actor
the worker loop (`worker_main`) runs on a thread of its own behind an in-process pipe, so the
engine, the page pool and the command order are exactly those of a local worker.

Commands go through one ordered concurrency group (Ray runs them one at a time, in the order
sent); events come back through a long poll on another group, read by one thread per worker
on the server, as the local pipe is. A dead actor (killed, its node lost) fails the poll with
`RayActorError`, which is the worker's exit.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing import Pipe
from typing import Any

import ray

from warmserve.runtime import messages as m
from warmserve.runtime.groups import GroupSpec
from warmserve.runtime.transport import LOOPBACK_ENV
from warmserve.serve_config import RuntimeConfig, WorkerConfig

POLL_S = 1.0  # a long poll returns at least this often, so a stopped server is noticed


@ray.remote(concurrency_groups={"commands": 1, "events": 1})
class WorkerActor:
    def __init__(
        self, num_pages: int, page_bytes: int, threads: int, groups: GroupSpec | None = None
    ) -> None:
        from warmserve.runtime.worker_main import worker_main

        self._conn, child = Pipe()
        self._thread = threading.Thread(
            target=worker_main, args=(child, num_pages, page_bytes, threads, 0, groups),
            daemon=True, name="warmserve-worker",
        )  # fmt: skip
        self._thread.start()

    def where(self) -> tuple[int, str]:
        return os.getpid(), ray.get_runtime_context().get_node_id()

    @ray.method(concurrency_group="commands")
    def send(self, cmd: m.Command) -> None:
        self._conn.send(cmd)

    @ray.method(concurrency_group="events")
    def events(self, timeout_s: float) -> list[m.Event] | None:
        """What the worker said since the last call (waits up to `timeout_s` for something);
        None once the worker loop has ended."""
        out: list[m.Event] = []
        try:
            if self._conn.poll(timeout_s):
                while self._conn.poll():
                    out.append(self._conn.recv())
        except (EOFError, OSError):
            return None
        if not out and not self._thread.is_alive():
            return None
        return out

    @ray.method(concurrency_group="commands")
    def join(self, timeout_s: float) -> bool:
        self._thread.join(timeout_s)
        return not self._thread.is_alive()


@dataclass(frozen=True, slots=True)
class RayPlacement:
    """Where one universal worker runs: a node of the Ray cluster."""

    node_id: str
    node_ip: str


def connect(cfg: RuntimeConfig) -> None:
    """Join the cluster at `cfg.address`, or start a single-node Ray on loopback."""
    if ray.is_initialized():
        return
    if cfg.address:
        ray.init(address=cfg.address, include_dashboard=False, log_to_driver=False)
        return
    # A private cluster on this machine, on loopback only: Ray otherwise registers the node
    # under the primary interface's address. `transport` sets LOOPBACK_ENV before Ray is
    # imported (Ray reads it at import); check that it took.
    ray.init(address="local", include_dashboard=False, log_to_driver=False,
             _node_ip_address="127.0.0.1", object_store_memory=256 << 20)  # fmt: skip
    addresses = {n["NodeManagerAddress"] for n in ray.nodes()}
    if addresses != {"127.0.0.1"}:
        ray.shutdown()
        raise RuntimeError(
            f"the private Ray cluster is not on loopback (nodes at {sorted(addresses)}): Ray "
            f"was imported before {LOOPBACK_ENV}=0 could be set"
        )


def placements(per_node: int) -> list[RayPlacement]:
    """`per_node` workers on every alive node, nodes in a stable order (by address, then
    id), so that worker ids and node-aligned groups stay the same across restarts."""
    nodes = sorted((n["NodeManagerAddress"], n["NodeID"]) for n in ray.nodes() if n["Alive"])
    return [RayPlacement(nid, ip) for ip, nid in nodes for _ in range(per_node)]


class RayWorkerLink:
    """The server's side of one worker actor: its handle and a long-poll reader thread."""

    def __init__(
        self,
        worker_id: int,
        incarnation: int,
        cfg: WorkerConfig,
        placement: RayPlacement,
        on_event: Callable[[int, int, m.Event], None],
        on_exit: Callable[[int, int], None],
        groups: GroupSpec | None = None,
    ) -> None:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        self.worker_id = worker_id
        self.incarnation = incarnation
        self.node_id = placement.node_id
        self.pid: int | None = None
        strategy = NodeAffinitySchedulingStrategy(placement.node_id, soft=False)
        self.actor: Any = WorkerActor.options(  # type: ignore[attr-defined]
            num_cpus=0,  # the pool and threads are sized by workers.*, not by Ray's CPUs
            scheduling_strategy=strategy,
            name=None,
        ).remote(cfg.num_pages, cfg.page_bytes, cfg.torch_threads(), groups)
        self._stopped = threading.Event()
        self._reader = threading.Thread(
            target=self._read, args=(on_event, on_exit), daemon=True,
            name=f"worker-{worker_id}-ray-reader",
        )  # fmt: skip
        self._reader.start()

    def _read(
        self, on_event: Callable[[int, int, m.Event], None], on_exit: Callable[[int, int], None]
    ) -> None:
        try:
            self.pid, _ = ray.get(self.actor.where.remote())
            while True:
                events = ray.get(self.actor.events.remote(POLL_S))
                if events is None:
                    break  # the worker loop ended (Shutdown, or it crashed)
                for ev in events:
                    on_event(self.worker_id, self.incarnation, ev)
        except Exception:  # RayActorError and friends: the actor or its node is gone
            pass
        with contextlib.suppress(Exception):
            ray.kill(self.actor)
        on_exit(self.worker_id, self.incarnation)

    def send(self, cmd: m.Command) -> None:
        # Fire and forget, in order; a dead actor is noticed by the reader.
        with contextlib.suppress(Exception):
            self.actor.send.remote(cmd)

    def kill(self) -> None:
        with contextlib.suppress(Exception):
            ray.kill(self.actor)

    def stop(self, timeout_s: float) -> None:
        self.send(m.Shutdown())
        with contextlib.suppress(Exception):
            ray.get(self.actor.join.remote(timeout_s), timeout=timeout_s + 5)
        self.kill()
        self._reader.join(timeout_s)
