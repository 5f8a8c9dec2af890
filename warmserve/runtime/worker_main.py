"""One universal worker in its own process: commands in, token batches out.

The loop runs engine steps while there is work and blocks on the pipe (or on a finished
background load) when there is none: no sleeps, no polling. Loads run on the worker's loader
thread, so prewarming never stalls the serving engine; a command that needs a load finished
(`Activate`, `UnloadModel` of a loading model) waits for it in order, as on the reference's
per-GPU queue.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
import traceback
from collections import deque
from multiprocessing.connection import Connection, wait
from pathlib import Path

import torch

from warmserve.engine.engine import Engine, StepOutput
from warmserve.runtime import messages as m
from warmserve.worker.pages import CpuPages
from warmserve.worker.pool import PagePool
from warmserve.worker.weights import LoadCancelled
from warmserve.worker.worker import UniversalWorker, WorkerError


def worker_main(
    conn: Connection, num_pages: int, page_bytes: int, threads: int, nice: int = 0
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
    torch.set_num_threads(max(1, threads))
    pool = PagePool(CpuPages(num_pages, page_bytes))
    worker = UniversalWorker(pool)
    loop = _Loop(conn, worker)
    conn.send(m.Ready(num_pages, page_bytes))
    try:
        loop.run()
    except (EOFError, BrokenPipeError, KeyboardInterrupt):
        pass  # the server went away: exit quietly
    finally:
        worker.close()
        pool.close()


class _Loop:
    def __init__(self, conn: Connection, worker: UniversalWorker) -> None:
        self.conn = conn
        self.worker = worker
        self.engine: Engine | None = None
        self.pending: deque[m.Command] = deque()
        self._send_lock = threading.Lock()  # the loader thread reports loads too
        # A background load wakes the loop through this pipe when it ends.
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)

    def run(self) -> None:
        while True:
            busy = self.engine is not None and self.engine.scheduler.has_work()
            ready = wait([self.conn, self._wake_r], timeout=0 if busy else None)
            if self._wake_r in ready:
                with contextlib.suppress(BlockingIOError):
                    os.read(self._wake_r, 4096)
            if self.conn in ready:
                while self.conn.poll():
                    self.pending.append(self.conn.recv())
            if not self._drain_commands():
                return
            if self.engine is not None and self.engine.scheduler.has_work():
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
                if isinstance(cmd, m.MapKvPages) and not self._set_kv(cmd.pages):
                    return True  # the engine steps meanwhile; retried after each step
                self.pending.popleft()
                if isinstance(cmd, m.Shutdown):
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
            fut = w.prewarm(cmd.name, Path(cmd.model_dir), background=True)
            fut.add_done_callback(lambda f, c=cmd: self._loaded(c, f))
        elif isinstance(cmd, m.UnloadModel):
            w.evict(cmd.name)
        elif isinstance(cmd, m.Activate):
            if cmd.name not in w.resident:
                w.prewarm(cmd.name, Path(cmd.model_dir))  # a cold start: load on the spot
            t0 = time.perf_counter()
            self.engine = w.activate(cmd.name)
            blocks = self.engine.scheduler.alloc.num_blocks
            self.send(
                m.Activated(
                    cmd.name, cmd.instance_id, blocks, w._block_bytes, time.perf_counter() - t0
                )
            )
        elif isinstance(cmd, m.Deactivate):
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
            if eng is not None and cmd.request_id in eng.scheduler.requests:
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
    def _step(self) -> None:
        eng = self.engine
        assert eng is not None
        try:
            out = eng.step()
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
        eng = self.engine
        assert eng is not None
        sched = eng.scheduler
        self.send(m.TokenBatch(items, sched.alloc.num_used, len(sched.waiting)))

    def _set_kv(self, pages: int) -> bool:
        """Move toward `pages` mapped KV pages; False while a lend waits for held blocks."""
        w = self.worker
        if self.engine is None:
            raise WorkerError("no model is active on this worker")
        if pages > w.kv_pages:
            w.reclaim_kv(pages - w.kv_pages)
            self._report(())
            return True
        return pages == w.kv_pages or w.lend_kv(w.kv_pages - pages)
