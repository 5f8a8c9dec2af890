"""The server's side of one worker process: spawn it, talk over its pipe, notice its death."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection

from warmserve.runtime import messages as m
from warmserve.runtime.groups import GroupSpec
from warmserve.runtime.worker_main import worker_main
from warmserve.serve_config import WorkerConfig

LOCAL_NODE = "local"


class WorkerProcess:
    """The server's side of one worker process: its pipe and a reader thread."""

    def __init__(
        self,
        worker_id: int,
        incarnation: int,
        cfg: WorkerConfig,
        on_event: Callable[[int, int, m.Event], None],
        on_exit: Callable[[int, int], None],
        groups: GroupSpec | None = None,
    ) -> None:
        self.worker_id = worker_id
        self.incarnation = incarnation
        self.node_id = LOCAL_NODE
        ctx = mp.get_context("spawn")  # no fork of a threaded, torch-loaded server
        self.conn, child = ctx.Pipe()
        w = cfg
        self.process = ctx.Process(
            target=worker_main,
            args=(
                child,
                w.num_pages,
                w.page_bytes,
                w.torch_threads(),
                w.nice,
                groups,
                w.cpus_of(worker_id),
            ),
            name=f"warmserve-worker-{worker_id}",
            daemon=True,
        )
        self.process.start()
        child.close()
        self._send_lock = threading.Lock()
        self._reader = threading.Thread(
            target=self._read,
            args=(self.conn, on_event, on_exit),
            daemon=True,
            name=f"worker-{worker_id}-reader",
        )
        self._reader.start()

    def _read(
        self,
        conn: Connection,
        on_event: Callable[[int, int, m.Event], None],
        on_exit: Callable[[int, int], None],
        groups: GroupSpec | None = None,
    ) -> None:
        while True:
            try:
                event = conn.recv()
            except (EOFError, OSError):
                # Reap the process now: it would stay a zombie until the next spawn.
                self.process.join(5)
                on_exit(self.worker_id, self.incarnation)
                return
            on_event(self.worker_id, self.incarnation, event)

    def send(self, cmd: m.Command) -> None:
        # On a broken pipe the reader sees the death and the runtime recovers.
        with self._send_lock, contextlib.suppress(BrokenPipeError, OSError):
            self.conn.send(cmd)

    @property
    def pid(self) -> int | None:
        return self.process.pid

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()

    def stop(self, timeout_s: float) -> None:
        self.send(m.Shutdown())
        self.process.join(timeout_s)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)
