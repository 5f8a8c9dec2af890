"""One universal worker in its own process: commands in, token batches out.

The loop runs engine steps while there is work and blocks on the pipe (or on a finished
background load) when there is none: no sleeps, no polling. Loads run on the worker's loader
thread, so prewarming never stalls the serving engine; a command that needs a load finished
(`Activate`, `UnloadModel` of a loading model) waits for it in order, as on the reference's
per-GPU queue.

Tensor parallelism: a worker serving a TP instance is its leader or a follower. The leader
(the group's lowest worker) hosts the scheduler, takes `AddRequest` and steps as any engine,
its steps broadcast to the group. A follower runs its shard's part of each step on a thread
of its own, blocked in `engine.follow()`, so that its loop still takes commands (loads for
other replicas, KV lend and reclaim, deactivation) in order: relaying them through the
leader would put another replica's prewarm behind the leader's queue, and a follower's pool
belongs to it alone. The follow thread touches only the instance's KV and weight pages,
which no command frees while it runs: `Deactivate` waits for it to end (the leader's
`stop_followers`), and KV pages are lent only once the leader no longer hands out the blocks
on them (`GroupKv`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path

import torch

from warmserve.engine.engine import Engine, StepOutput
from warmserve.engine.lockstep import TPBroken, tp_group
from warmserve.runtime import messages as m
from warmserve.runtime.groups import GroupSpec, NodeGroups, build_groups
from warmserve.worker.pages import CpuPages
from warmserve.worker.pool import PagePool
from warmserve.worker.weights import LoadCancelled
from warmserve.worker.worker import UniversalWorker, WorkerError


def worker_main(
    conn: Connection,
    num_pages: int,
    page_bytes: int,
    threads: int,
    nice: int = 0,
    groups: GroupSpec | None = None,
    cpus: tuple[int, ...] | None = None,
) -> None:
    # Ctrl-C and service managers signal the whole process group; the server shuts its
    # workers down in order (a `Shutdown` command, or EOF on the pipe if it died). A Ray
    # actor runs this on a thread of its own and leaves signals to Ray.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if nice:
        # Below the server's priority: where the workers and the gateway share cores, the
        # event loop (tokens to clients, new requests in) runs first.
        os.nice(nice)
    if cpus:
        # Before any thread starts: the loader and torch's threads inherit the affinity.
        os.sched_setaffinity(0, cpus)
    torch.set_num_threads(max(1, threads))
    pool = PagePool(CpuPages(num_pages, page_bytes))
    worker = UniversalWorker(pool)
    # The node's TP communicators, once, before the worker counts as up.
    node_groups = build_groups(groups) if groups is not None else None
    loop = _Loop(conn, worker, node_groups)
    if node_groups is None:
        conn.send(m.Ready(num_pages, page_bytes))
    else:
        conn.send(m.Ready(num_pages, page_bytes, len(node_groups.groups), node_groups.build_s))
    try:
        loop.run()
    except (EOFError, BrokenPipeError, KeyboardInterrupt):
        pass  # the server went away: exit quietly
    finally:
        worker.close()
        pool.close()
        if node_groups is not None:
            node_groups.close()


@dataclass(slots=True)
class _TpRole:
    """This worker's part in the TP instance it serves."""

    instance_id: int
    rank: int
    size: int
    done: list[int]  # KV resizes each rank has finished, as last reported (GroupKv)
    follow: threading.Thread | None = None  # a follower's step thread


class _Loop:
    def __init__(
        self, conn: Connection, worker: UniversalWorker, groups: NodeGroups | None = None
    ) -> None:
        self.conn = conn
        self.worker = worker
        self.groups = groups
        self.engine: Engine | None = None  # the engine this loop steps (none on a follower)
        self.tp: _TpRole | None = None
        self.pending: deque[m.Command] = deque()
        self._send_lock = threading.Lock()  # the loader thread reports loads too
        # A background load wakes the loop through this pipe when it ends.
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)

    def run(self) -> None:
        while True:
            busy = self.engine is not None and self.engine.has_work()
            ready = wait([self.conn, self._wake_r], timeout=0 if busy else None)
            if self._wake_r in ready:
                with contextlib.suppress(BlockingIOError):
                    os.read(self._wake_r, 4096)
            if self.conn in ready:
                while self.conn.poll():
                    cmd = self.conn.recv()
                    if isinstance(cmd, m.GroupKv):  # news, not work: never queued
                        if self.tp is not None and self.tp.instance_id == cmd.instance_id:
                            self.tp.done = [max(a, b) for a, b in
                                            zip(self.tp.done, cmd.done, strict=True)]  # fmt: skip
                    else:
                        self.pending.append(cmd)
            if not self._drain_commands():
                return
            if self.engine is not None and self.engine.has_work():
                self._step()

    def send(self, event: m.Event) -> None:
        with self._send_lock:
            self.conn.send(event)

    # ----- commands ---------------------------------------------------------------------
    def _drain_commands(self) -> bool:
        """Run queued commands in order; stop at one that must wait (for a load, or for KV
        blocks to be released before their pages are lent). False: exit."""
        while self.pending:
            cmd = self.pending[0]
            if isinstance(cmd, m.Activate) and self._must_wait(cmd.name):
                return True
            try:
                waits = isinstance(cmd, m.MapKvPages) and not self._set_kv(cmd.pages)
                if waits and not self._deactivating():
                    return True  # the engine steps meanwhile; retried after each step
                self.pending.popleft()
                if isinstance(cmd, m.Shutdown):
                    self._leave_tp()
                    return False
                self._run(cmd)
            except Exception as e:  # a command's failure is reported, the worker lives on
                if self.pending and self.pending[0] is cmd:
                    self.pending.popleft()
                if isinstance(cmd, m.AddRequest):
                    # Our own refusals are phrased for the client; anything else is not shown.
                    why = str(e) if isinstance(e, (ValueError, WorkerError)) else (
                        f"internal error ({type(e).__name__})")  # fmt: skip
                    self.send(m.RequestFailed(cmd.request_id, why, refused=True))
                else:
                    detail = str(e) if isinstance(e, WorkerError) else traceback.format_exc(-1)
                    self.send(m.CommandFailed(type(cmd).__name__, detail.strip()))
        return True

    def _deactivating(self) -> bool:
        """A TP rank's resize waits for its peers, but the instance is going away (a
        `Deactivate` is queued behind): drop the resize, since the KV goes with the instance,
        and the peers' news may never come (the runtime relays none for a released instance).
        Nothing is unmapped early: a follower frees its KV only after the leader's release."""
        return self.tp is not None and any(isinstance(c, m.Deactivate) for c in self.pending)

    def _leave_tp(self) -> None:
        """Shutting down while serving a TP instance: release the followers (the leader) or
        wait for the release (a follower; every worker is told to shut down), so that no
        thread is left inside a collective when the process group is destroyed."""
        role, self.tp = self.tp, None
        if role is None:
            return
        if role.follow is not None:
            role.follow.join(10.0)
        elif self.engine is not None:
            with contextlib.suppress(Exception):  # a follower may have gone already
                self.engine.stop_followers()

    def _must_wait(self, name: str) -> bool:
        """Activation waits for every load (its own, and cancelled ones freeing pages)."""
        loading = self.worker.status().loading
        if not loading:
            return False
        self.worker.cancel_loads(keep=name)  # an activation evicts the others: cancel now
        return True

    def _run(self, cmd: m.Command) -> None:
        w = self.worker
        if isinstance(cmd, m.LoadModel):
            fut = w.prewarm(cmd.name, Path(cmd.model_dir), background=True,
                            tp_rank=cmd.tp_rank, tp_size=cmd.tp_size)  # fmt: skip
            fut.add_done_callback(lambda f, c=cmd: self._loaded(c, f))
        elif isinstance(cmd, m.UnloadModel):
            w.evict(cmd.name)
        elif isinstance(cmd, m.Activate):
            size = max(1, len(cmd.group))
            if cmd.name not in w.resident:  # a cold start: load on the spot
                w.prewarm(cmd.name, Path(cmd.model_dir), tp_rank=cmd.rank, tp_size=size)
            t0 = time.perf_counter()
            tp = None
            if cmd.group:
                if self.groups is None:
                    raise WorkerError("a TP instance on a worker without TP groups")
                tp = tp_group(self.groups.group(cmd.group))
            engine = w.activate(cmd.name, tp=tp, kv_pages=cmd.kv_pages)
            seconds = time.perf_counter() - t0
            if tp is not None:
                self.tp = _TpRole(cmd.instance_id, cmd.rank, size, [0] * size)
            if tp is None or tp.is_leader:
                self.engine = engine
            else:
                assert self.tp is not None
                self.tp.follow = threading.Thread(
                    target=self._follow, args=(engine,), daemon=True, name="tp-follow"
                )
                self.tp.follow.start()
            blocks = engine.num_kv_blocks
            self.send(m.Activated(cmd.name, cmd.instance_id, blocks, w._block_bytes, seconds))
        elif isinstance(cmd, m.Deactivate):
            role, self.tp = self.tp, None
            if role is not None and role.follow is not None:
                role.follow.join()  # ends with the leader's `stop_followers`
            elif role is not None and self.engine is not None:
                self.engine.stop_followers()
            w.deactivate(cmd.keep_weights)
            self.engine = None
        elif isinstance(cmd, m.MapKvPages):
            pass  # applied by `_set_kv` before it left the queue
        elif isinstance(cmd, m.AddRequest):
            if self.engine is None:
                raise WorkerError("no model is active on this worker")
            self.engine.add(cmd.prompt_ids, cmd.params, cmd.request_id)
        elif isinstance(cmd, m.AbortRequest):
            eng = self.engine
            if eng is not None and eng.has_request(cmd.request_id):
                eng.abort(cmd.request_id)
                self._report(())  # the KV the abort freed

    def _loaded(self, cmd: m.LoadModel, fut) -> None:  # on the loader thread
        try:
            seconds = fut.result()
        except LoadCancelled:
            pass  # evicted while loading: never reported as loaded
        except Exception as e:
            self.send(m.CommandFailed("LoadModel", f"loading {cmd.name}: {e}"))
        else:
            self.send(m.Loaded(cmd.name, cmd.token, seconds))
        os.write(self._wake_w, b"x")

    # ----- engine -----------------------------------------------------------------------
    def _follow(self, engine: Engine) -> None:  # a follower's step thread
        try:
            while engine.follow():
                pass
        except Exception:
            # The group is broken (a peer died, or gloo timed out): the server replaces this
            # worker, and with it the node's world.
            detail = traceback.format_exc(-1).strip()
            self.send(m.CommandFailed("follow", f"a TP follower's step failed: {detail}"))

    def _step(self) -> None:
        eng = self.engine
        assert eng is not None
        try:
            out = eng.step()
        except TPBroken as e:  # a TP peer is gone: no step can run; the server replaces us
            self.send(m.CommandFailed("step", f"the TP group broke: {e}"))
            self.engine = None
            return
        except Exception:  # a bug below the engine's own isolation: drop what runs, live on
            detail = traceback.format_exc(-1).strip()
            out = StepOutput(failed={rid: "the engine step failed" for rid in eng.abort_all()})
            self.send(m.StepFailed(detail))
        for rid, why in out.failed.items():
            self.send(m.RequestFailed(rid, why))
        items = tuple(
            m.TokenOut(rid, (tok,), out.finished.get(rid),
                       None if rid not in out.logprobs else (out.logprobs[rid],),
                       out.prompt_logprobs.get(rid))
            for rid, tok in out.tokens.items()
        )  # fmt: skip
        self._report(items)

    def _report(self, items: tuple[m.TokenOut, ...]) -> None:
        assert self.engine is not None
        used, waiting = self.engine.usage()
        self.send(m.TokenBatch(items, used, waiting))

    def _set_kv(self, pages: int) -> bool:
        """Move toward `pages` mapped KV pages; False while a lend waits for held blocks (or,
        in a TP instance, for the other ranks: see `GroupKv`)."""
        w = self.worker
        if w.engine is None:
            raise WorkerError("no model is active on this worker")
        tp = self.tp
        k = tp.done[tp.rank] + 1 if tp is not None else 0  # this resize's number
        if pages > w.kv_pages:
            if tp is not None and tp.rank == 0 and min(tp.done[1:]) < k:
                return False  # a follower has not mapped the pages the new blocks need
            w.reclaim_kv(pages - w.kv_pages)
            if self.engine is not None:
                self._report(())
        elif pages < w.kv_pages:
            if tp is not None and tp.rank > 0 and tp.done[0] < k:
                return False  # the leader may still hand out blocks on these pages
            if not w.lend_kv(w.kv_pages - pages):
                return False
        if tp is not None:
            tp.done[tp.rank] = k
            self.send(m.KvMapped(tp.instance_id, k))
        return True
