"""The worker processes (or Ray actors) behind the runtime, kept alive.

Starting them; telling one incarnation of a worker from the next (a replaced worker's late
events are dropped); restarting a dead one after a back-off; and, without unified memory
(vanilla autoscaling), one engine process per instance: the process stops with its instance
("parked") and a new one starts with the next `Activate`, paying process start-up, engine
init and the weight load, as scale-from-zero does. Everything here runs on the event loop's
thread; the links' reader threads hand events over with `call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import logging
import os
import tempfile
import uuid
from collections.abc import Callable

from warmserve.runtime import messages as m
from warmserve.runtime.groups import GroupSpec
from warmserve.runtime.transport import WorkerLink, WorkerLinks

log = logging.getLogger("warmserve.runtime")


def restart_delay(deaths: int) -> float:
    """Back off when a worker keeps dying (e.g. it cannot allocate its pool): 0.5 s, 1 s,
    2 s, … up to 30 s after 1, 2, 3, … deaths in a row, so a crash loop does not spin; a
    worker that starts resets the count."""
    return min(30.0, 0.5 * 2 ** (max(1, deaths) - 1))


class NodeWorlds:
    """Each node's TP world: its workers, and the generation of the world they meet in.

    A world cannot take a replaced process back, so the death of any worker of a node ends
    that node's world: the generation moves on and every other worker of the node is replaced
    too (`Supervisor._exit`); the new incarnations meet in the next generation's store."""

    def __init__(
        self, nodes: list[str], max_tp: int, timeout_s: float, rendezvous_s: float
    ) -> None:
        self.max_tp = max_tp
        self.timeout_s = timeout_s
        self.rendezvous_s = rendezvous_s
        self.node_of = nodes
        order = list(dict.fromkeys(nodes))  # nodes in the order of their first worker
        self.index = {n: k for k, n in enumerate(order)}
        self.members: dict[str, list[int]] = {n: [] for n in order}
        for wid, n in enumerate(nodes):
            self.members[n].append(wid)
        self.generation = dict.fromkeys(order, 0)
        self.spawned_in: list[int] = [0] * len(nodes)  # the generation of each incarnation
        # Files on each node's local disk (a node's workers share it); one name per server.
        self._prefix = os.path.join(tempfile.gettempdir(), f"warmserve-tp-{uuid.uuid4().hex[:12]}")

    def spec(self, wid: int) -> GroupSpec:
        node = self.node_of[wid]
        gen = self.generation[node]
        self.spawned_in[wid] = gen
        peers = self.members[node]
        path = f"{self._prefix}-n{self.index[node]}-g{gen}"
        return GroupSpec(
            path, peers.index(wid), len(peers), self.max_tp, self.timeout_s, self.rendezvous_s
        )

    def world_ended(self, wid: int) -> list[int]:
        """Worker `wid` died: the other workers of its node that must now be replaced (none
        when its world had already ended, e.g. it was one of those replaced)."""
        node = self.node_of[wid]
        if self.spawned_in[wid] != self.generation[node]:
            return []
        self.generation[node] += 1
        return [w for w in self.members[node] if w != wid]

    def remove_files(self) -> None:
        """The local node's store files (a remote node's are in its temporary directory)."""
        for path in glob.glob(self._prefix + "-*"):
            with contextlib.suppress(OSError):
                os.remove(path)


class Supervisor:
    def __init__(
        self,
        links: WorkerLinks,
        engine_per_instance: bool,
        on_event: Callable[[int, m.Event, bool], None],
        on_death: Callable[[int], None],
        worlds: NodeWorlds | None = None,
    ) -> None:
        """`on_event(worker, event, fresh)`: an event of a worker's current incarnation;
        `fresh` marks the `Ready` of an engine process started for an instance the books
        already hold. `on_death(worker)`: the current incarnation died (not on purpose).
        `worlds`: each node's TP world, where a served model has TP > 1."""
        n = links.count
        self.worlds = worlds
        self.links = links
        self.workers: list[WorkerLink | None] = [None] * n
        self.respawns: list[asyncio.TimerHandle | None] = [None] * n
        self._engine_per_instance = engine_per_instance
        self._on_event = on_event
        self._on_death = on_death
        self._incarnation = [0] * n
        self._deaths = [0] * n  # in a row, for the back-off
        self._ready: list[asyncio.Future[None] | None] = [None] * n
        self._parked: set[int] = set()
        self._fresh: set[int] = set()  # spawned for an instance: its Ready keeps the books
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started = False
        self._closing = False

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        return self._loop

    async def start(self, timeout_s: float) -> None:
        """Every worker up and ready, or TimeoutError / RuntimeError (one died starting)."""
        self._loop = asyncio.get_running_loop()
        for wid in range(self.links.count):
            self._spawn(wid)
        waits = [f for f in self._ready if f is not None]
        await asyncio.wait_for(asyncio.gather(*waits), timeout_s)
        self._started = True

    async def stop(self, timeout_s: float) -> None:
        self._closing = True
        for handle in self.respawns:
            if handle is not None:
                handle.cancel()
        workers = [w for w in self.workers if w is not None]
        await asyncio.gather(*(asyncio.to_thread(w.stop, timeout_s) for w in workers))
        self.links.close()
        if self.worlds is not None:
            self.worlds.remove_files()

    def send(self, wid: int | None, cmd: m.Command) -> None:
        if wid is None:
            return
        if self._engine_per_instance:
            if isinstance(cmd, m.Deactivate):  # the instance's engine goes away with it
                self._parked.add(wid)
                w = self.workers[wid]
                if w is not None:
                    w.send(m.Shutdown())
                return
            if wid in self._parked:
                if not isinstance(cmd, m.Activate):
                    return  # nothing lives on a parked device
                self._parked.discard(wid)
                self._fresh.add(wid)
                self._spawn(wid)  # the Activate waits in the new process's pipe
        w = self.workers[wid]
        if w is not None:
            w.send(cmd)

    def kill(self, wid: int) -> None:
        """Replace a worker whose state no longer matches the books (it is restarted)."""
        w = self.workers[wid]
        if w is not None:
            w.kill()

    def _spawn(self, wid: int) -> None:
        assert self._loop is not None
        if self._closing:
            return
        self._incarnation[wid] += 1
        self._ready[wid] = self._loop.create_future()
        groups = self.worlds.spec(wid) if self.worlds is not None else None
        self.workers[wid] = self.links.spawn(
            wid, self._incarnation[wid], self._event_threadsafe, self._exit_threadsafe, groups
        )

    # ----- from the links' reader threads -----------------------------------------------
    def _event_threadsafe(self, wid: int, inc: int, event: m.Event) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._event, wid, inc, event)

    def _exit_threadsafe(self, wid: int, inc: int) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._exit, wid, inc)

    def _event(self, wid: int, inc: int, ev: m.Event) -> None:
        if inc != self._incarnation[wid] or self._closing:
            return  # from a worker that has since been replaced
        fresh = False
        if isinstance(ev, m.Ready):
            self._deaths[wid] = 0
            fut = self._ready[wid]
            if fut is not None and not fut.done():
                fut.set_result(None)
            fresh = wid in self._fresh
            self._fresh.discard(wid)
        self._on_event(wid, ev, fresh)

    def _exit(self, wid: int, inc: int) -> None:
        if inc != self._incarnation[wid] or self._closing or wid in self._parked:
            return  # replaced, shutting down, or stopped with its instance on purpose
        fut = self._ready[wid]
        if fut is not None and not fut.done():
            if not self._started:
                fut.set_exception(RuntimeError(f"worker {wid} exited during start-up"))
                return
            fut.cancel()  # a replacement died while starting: handled as any death
        self._fresh.discard(wid)
        self._deaths[wid] += 1
        if self.worlds is not None:
            # Its node's world is broken: the node's other workers (a TP peer may be waiting
            # in a collective on it) are replaced too, and all meet in a new world.
            for peer in self.worlds.world_ended(wid):
                log.error("worker %d died: replacing worker %d of its node's TP world",
                          wid, peer)  # fmt: skip
                self.kill(peer)
        self._on_death(wid)
        assert self._loop is not None
        self.respawns[wid] = self._loop.call_later(
            restart_delay(self._deaths[wid]), self._spawn, wid
        )
