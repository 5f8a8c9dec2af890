"""The serving runtime: the control plane driven by the wall clock over real worker processes.

The same `Controller` the simulator drives decides every start, stop, prewarm and dispatch;
here its `ClusterHandle` is `RuntimeCluster`, whose actions become commands to worker
processes. Everything runs on the asyncio loop's thread: worker events arrive through
`call_soon_threadsafe` from one reader thread per worker, so policy state needs no locks.
Requests with no instance wait in the controller's per-model queue and are dispatched by the
controller when one starts; nothing polls.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from warmserve.clock import Clock, WallClock, seconds_into_day, seconds_into_week
from warmserve.control.api import ControlPlane, RequestInfo, ServedModel
from warmserve.control.forecaster import make_forecaster
from warmserve.control.registry import get_policy
from warmserve.engine.request import SamplingParams
from warmserve.hardware import pages_for
from warmserve.runtime import messages as m
from warmserve.runtime import views
from warmserve.runtime.cluster import ModelFiles, RuntimeCluster
from warmserve.runtime.history import seed_histories
from warmserve.runtime.metrics import ServeMetrics
from warmserve.runtime.requests import (
    Overloaded,
    RuntimeRequest,
    ShuttingDown,
    StreamError,
    TokenDelta,
)
from warmserve.runtime.transport import WorkerLink, WorkerLinks
from warmserve.serve_config import ServeConfig
from warmserve.types import ModelName
from warmserve.worker.layout import checkpoint_files, weights_layout

log = logging.getLogger("warmserve.runtime")


def restart_delay(deaths: int) -> float:
    """Back off when a worker keeps dying (e.g. it cannot allocate its pool): 0.5 s, 1 s,
    2 s, … up to 30 s after 1, 2, 3, … deaths in a row, so a crash loop does not spin; a
    worker that starts resets the count."""
    return min(30.0, 0.5 * 2 ** (max(1, deaths) - 1))


@dataclass(frozen=True, slots=True)
class RuntimeModel:
    name: str
    model_dir: Path
    max_model_len: int
    kv_bytes_per_token: int
    priority: float = 1.0


class ServingRuntime:
    def __init__(
        self,
        cfg: ServeConfig,
        models: list[RuntimeModel],
        clock: Clock | None = None,
        metrics: ServeMetrics | None = None,
    ) -> None:
        self.cfg = cfg
        self.models = {rm.name: rm for rm in models}
        self.clock = clock or WallClock()
        self.metrics = metrics or ServeMetrics()
        self.policy = get_policy(cfg.policy)
        self.spec = spec = self.policy.spec
        page_bytes = cfg.workers.page_bytes
        self.links = WorkerLinks(cfg)  # local processes, or Ray actors on every node
        n = self.links.count
        files: dict[str, ModelFiles] = {}
        served: list[ServedModel] = []
        for rm in models:
            _, total = weights_layout(checkpoint_files(rm.model_dir))
            pages = max(1, pages_for(total, page_bytes))
            files[rm.name] = ModelFiles(rm.name, str(rm.model_dir), pages)
            served.append(
                ServedModel(
                    ModelName(rm.name),
                    1,
                    pages,
                    total,
                    float(rm.kv_bytes_per_token),
                    rm.max_model_len,
                    rm.priority,
                )
            )
            if pages >= cfg.workers.num_pages:
                raise ValueError(
                    f"model {rm.name!r} needs {pages} pages of {cfg.workers.page_mib} MiB; a "
                    f"worker pool has {cfg.workers.num_pages} (raise workers.pool_mib)"
                )
        self.cluster = RuntimeCluster(n, files, self._send, self._dispatch, page_bytes)
        ctl = cfg.control
        self.forecaster = make_forecaster(ctl)
        fc_cfg = cfg.forecast
        histories = (
            seed_histories(cfg.base_dir / fc_cfg.history, (rm.name for rm in models),
                           ctl.forecast_window_s, ctl.forecast_cycle,
                           fc_cfg.service_s_per_token)
            if fc_cfg.history is not None
            else {}
        )  # fmt: skip
        offset = seconds_into_day() if ctl.forecast_cycle == "day" else seconds_into_week()
        for rm in models:
            self.forecaster.add_model(rm.name, offset, histories.get(rm.name))
        self.controller: ControlPlane = self.policy.build(ctl, served, self.forecaster)
        self.requests: dict[int, RuntimeRequest] = {}
        self._workers: list[WorkerLink | None] = [None] * n
        # Without unified memory (vanilla autoscaling) every instance is a new engine: its
        # worker process stops at scale-down ("parked") and a new one starts with the next
        # instance, paying process start-up, engine init and the weight load.
        self._engine_per_instance = not spec.unified_memory
        self._parked: set[int] = set()
        self._fresh: set[int] = set()  # spawned for an instance: its Ready keeps the books
        self._incarnation = [0] * n
        self._deaths = [0] * n  # consecutive, for the restart back-off
        self._respawns: list[asyncio.TimerHandle | None] = [None] * n
        self._ready: list[asyncio.Future[None] | None] = [None] * n
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tick_task: asyncio.Task[None] | None = None
        self._next_id = 0
        self._accepting = False
        self._closing = False
        self._all_done: asyncio.Event | None = None

    # ----- lifecycle --------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._all_done = asyncio.Event()
        self._all_done.set()
        for wid in range(self.links.count):
            self._spawn(wid)
        waits = [f for f in self._ready if f is not None]
        try:
            await asyncio.wait_for(asyncio.gather(*waits), self.cfg.workers.startup_timeout_s)
        except TimeoutError:
            await self.shutdown(0)
            raise RuntimeError("workers did not start in time") from None
        self._accepting = True
        self._tick_task = asyncio.create_task(self._tick_loop(), name="control-tick")

    def _spawn(self, wid: int) -> None:
        assert self._loop is not None
        if self._closing:
            return
        self._incarnation[wid] += 1
        self._ready[wid] = self._loop.create_future()
        self._workers[wid] = self.links.spawn(
            wid, self._incarnation[wid], self._event_threadsafe, self._exit_threadsafe
        )

    async def drain(self, grace_s: float) -> None:
        """Stop accepting, let in-flight requests finish for `grace_s`, then fail the rest
        (503 for those that sent nothing yet, an error event in a stream)."""
        self._accepting = False
        if self._all_done is not None and self.requests and grace_s > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._all_done.wait(), grace_s)
        for req in list(self.requests.values()):
            self._fail(req, StreamError(503, "the server is shutting down"), "shutdown")

    async def shutdown(self, grace_s: float) -> None:
        """`drain`, then stop the workers."""
        await self.drain(grace_s)
        self._closing = True
        for handle in self._respawns:
            if handle is not None:
                handle.cancel()
        if self._tick_task is not None:
            self._tick_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._tick_task
        workers = [w for w in self._workers if w is not None]
        await asyncio.gather(*(asyncio.to_thread(w.stop, 10.0) for w in workers))
        self.links.close()

    @property
    def accepting(self) -> bool:
        return self._accepting

    # ----- requests ---------------------------------------------------------------------
    def submit(self, model: str, prompt_ids: list[int], params: SamplingParams) -> RuntimeRequest:
        if not self._accepting:
            raise ShuttingDown("the server is not accepting requests")
        queued = self.controller.num_queued(ModelName(model)) if model in self.models else 0
        if queued >= self.cfg.limits.max_queued_requests:
            raise Overloaded(f"model {model!r} has {queued} requests queued; try again later")
        now = self.clock.now()
        rid = self._next_id
        self._next_id += 1
        req = RuntimeRequest(rid, model, tuple(prompt_ids), params, now)
        self.requests[rid] = req
        assert self._all_done is not None
        self._all_done.clear()
        self.metrics.prompt_tokens.labels(model).inc(len(prompt_ids))
        self.controller.on_request(now, self._info(req), self.cluster)
        return req

    def _info(self, req: RuntimeRequest) -> RequestInfo:
        return RequestInfo(
            req.request_id,
            ModelName(req.model),
            req.arrival_s,
            len(req.prompt_ids),
            req.params.max_tokens,
        )

    def abort(self, request_id: int, reason: str = "client") -> None:
        """End a request early and free its KV now: the client went away (`client`), or a
        stop string matched (`stop`, a success)."""
        req = self.requests.get(request_id)
        if req is None or req.done:
            return
        if reason == "client":
            self.metrics.request_aborted.labels(req.model).inc()
        if req.instance_id is None:
            self.controller.cancel_queued(self.clock.now(), request_id)
            self._close(req)
        else:
            self._send(req.worker_id, m.AbortRequest(request_id))
            self._finish(req, "stop" if reason == "stop" else "abort")

    def _dispatch(self, request_id: int, instance_id: int) -> None:
        req = self.requests[request_id]
        (wid,) = self.cluster.instances[instance_id].devices
        req.instance_id, req.worker_id = instance_id, wid
        self._send(wid, m.AddRequest(request_id, req.prompt_ids, req.params))

    def _send(self, wid: int | None, cmd: m.Command) -> None:
        if wid is None:
            return
        if self._engine_per_instance:
            if isinstance(cmd, m.Deactivate):  # the instance's engine goes away with it
                self._parked.add(wid)
                w = self._workers[wid]
                if w is not None:
                    w.send(m.Shutdown())
                return
            if wid in self._parked:
                if not isinstance(cmd, m.Activate):
                    return  # nothing lives on a parked device
                self._parked.discard(wid)
                self._fresh.add(wid)
                self._spawn(wid)  # the Activate waits in the new process's pipe
        w = self._workers[wid]
        if w is not None:
            w.send(cmd)

    def _finish(self, req: RuntimeRequest, reason: str) -> None:
        now = self.clock.now()
        inst_id = req.instance_id
        self._close(req)
        if reason != "abort":
            self.metrics.request_success.labels(req.model, reason).inc()
            self.metrics.e2e.labels(req.model).observe(now - req.arrival_s)
            if req.generated > 1 and req.first_token_s is not None:
                tpot = (now - req.first_token_s) / (req.generated - 1)
                self.metrics.tpot.labels(req.model).observe(tpot)
        if inst_id is not None:
            self.cluster.request_done(req.request_id, inst_id)
            self.controller.on_request_done(now, req.request_id, self.cluster)

    def _fail(self, req: RuntimeRequest, err: StreamError, reason: str) -> None:
        req.queue.put_nowait(err)
        self.metrics.request_failure.labels(req.model, reason).inc()
        if req.instance_id is not None and req.instance_id in self.cluster.instances:
            self._send(req.worker_id, m.AbortRequest(req.request_id))
            self._finish(req, "abort")
        else:
            if req.instance_id is None:
                self.controller.cancel_queued(self.clock.now(), req.request_id)
            self._close(req)

    def _close(self, req: RuntimeRequest) -> None:
        req.done = True
        self.requests.pop(req.request_id, None)
        if not self.requests and self._all_done is not None:
            self._all_done.set()

    # ----- worker events (on the loop thread) -------------------------------------------
    def _event_threadsafe(self, wid: int, inc: int, event: m.Event) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._on_event, wid, inc, event)

    def _exit_threadsafe(self, wid: int, inc: int) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._on_exit, wid, inc)

    def _on_event(self, wid: int, inc: int, ev: m.Event) -> None:
        if inc != self._incarnation[wid] or self._closing:
            return  # from a worker process that has since been replaced
        if isinstance(ev, m.TokenBatch):
            self._on_tokens(ev)
            inst = self.cluster.mark_kv_used(wid, ev.kv_used_blocks)
            if inst is not None and ev.waiting and inst.kv_lent_pages:
                # Requests wait for KV on an instance that lent pages: reclaim them now.
                self.controller.on_kv_pressure(self.clock.now(), inst.instance_id, self.cluster)
        elif isinstance(ev, m.Ready):
            self._deaths[wid] = 0
            self.metrics.worker_up.labels(str(wid)).set(1)
            fut = self._ready[wid]
            if fut is not None and not fut.done():
                fut.set_result(None)
            if wid in self._fresh:  # a new engine for an instance the books already hold
                self._fresh.discard(wid)
            else:
                self.cluster.worker_ready(wid, ev.num_pages)
                self._after_layout_change()
        elif isinstance(ev, m.Loaded):
            self.cluster.mark_loaded(wid, ev.token)
        elif isinstance(ev, m.Activated):
            inst = self.cluster.mark_running(wid, ev.kv_blocks, ev.block_bytes)
            if inst is not None:
                self.metrics.activation.labels(inst.model).observe(ev.seconds)
        elif isinstance(ev, m.RequestFailed):
            req = self.requests.get(ev.request_id)
            if req is not None and not req.done:
                if ev.refused:
                    err = StreamError(503, f"the worker refused the request: {ev.message}")
                else:  # its own step failed: never retried, it would fail again
                    err = StreamError(500, f"the engine failed on this request: {ev.message}")
                self._fail(req, err, "worker_refused" if ev.refused else "engine_error")
        elif isinstance(ev, m.StepFailed):
            log.error("worker %d: an engine step failed; its requests were dropped: %s",
                      wid, ev.detail)  # fmt: skip
        elif isinstance(ev, m.CommandFailed):
            # The worker's state no longer matches the books: replace the process.
            log.error("worker %d: %s failed: %s; restarting it", wid, ev.command, ev.message)
            w = self._workers[wid]
            if w is not None:
                w.kill()

    def _on_tokens(self, ev: m.TokenBatch) -> None:
        now = self.clock.now()
        for item in ev.items:
            req = self.requests.get(item.request_id)
            if req is None or req.done:
                continue  # aborted: the worker had already sampled this step
            if req.first_token_s is None:
                req.first_token_s = now
                self.metrics.ttft.labels(req.model).observe(now - req.arrival_s)
            n = len(item.token_ids)
            req.generated += n
            self.metrics.generation_tokens.labels(req.model).inc(n)
            req.queue.put_nowait(
                TokenDelta(item.token_ids, item.finish_reason, item.logprobs, item.prompt_logprobs)
            )
            if item.finish_reason is not None:
                self._finish(req, item.finish_reason)

    def _on_exit(self, wid: int, inc: int) -> None:
        if inc != self._incarnation[wid] or self._closing or wid in self._parked:
            return  # replaced, shutting down, or stopped with its instance on purpose
        fut = self._ready[wid]
        if fut is not None and not fut.done():
            if not self._accepting:
                fut.set_exception(RuntimeError(f"worker {wid} exited during start-up"))
                return
            fut.cancel()  # a replacement died while starting: handled as any death
        self._fresh.discard(wid)
        self._deaths[wid] += 1
        log.error("worker %d died; failing over its requests and restarting it", wid)
        self.metrics.worker_up.labels(str(wid)).set(0)
        self.metrics.worker_restarts.labels(str(wid)).inc()
        now = self.clock.now()
        lost = self.cluster.worker_lost(wid)
        if lost is not None:
            for rid in self.controller.on_instance_failed(now, lost, self.cluster):
                req = self.requests.get(rid)
                if req is None:
                    continue
                req.instance_id = None
                if req.generated == 0 and not req.retried:
                    # Nothing reached the client: run it again on another instance, once.
                    req.retried, req.worker_id = True, None
                    self.controller.on_request(now, self._info(req), self.cluster)
                elif req.generated == 0:
                    # A poison pill, or very bad luck: never a third worker for it.
                    log.error("request %d was on two workers that died; failing it", rid)
                    msg = "two workers died while running this request; it is not retried again"
                    self._fail(req, StreamError(502, msg), "worker_died_twice")
                else:
                    self._fail(
                        req, StreamError(502, "the worker serving this request died"), "worker_died"
                    )
        delay = restart_delay(self._deaths[wid])
        assert self._loop is not None
        self._respawns[wid] = self._loop.call_later(delay, self._spawn, wid)

    def _after_layout_change(self) -> None:
        """A device came (back): let queued requests start without waiting for a tick."""
        self.controller.tick(self.clock.now(), self.cluster)

    # ----- control loop -----------------------------------------------------------------
    async def _tick_loop(self) -> None:
        period = self.cfg.control.tick_s
        while True:
            try:
                self.controller.tick(self.clock.now(), self.cluster)
                self._expire_queued()
            except Exception:  # a policy bug must not stop the control loop silently
                log.exception("control tick failed")
            await asyncio.sleep(period)

    def _expire_queued(self) -> None:
        """Fail requests that waited `limits.queue_timeout_s` without an instance: no
        accepted request waits forever (e.g. while every worker is busy or down)."""
        limit = self.cfg.limits.queue_timeout_s
        now = self.clock.now()
        for req in [r for r in self.requests.values() if r.instance_id is None]:
            if now - req.arrival_s > limit:
                msg = f"no instance of {req.model!r} became available within {limit:g} s"
                self._fail(req, StreamError(503, msg), "queue_timeout")

    # ----- views ------------------------------------------------------------------------
    def model_state(self, name: str) -> str:
        return views.model_state(self.cluster, name)

    def admin_view(self) -> dict[str, Any]:
        return views.admin_view(self)

    def metrics_text(self) -> bytes:
        """Prometheus text; gauges are brought up to date here, not on every event."""
        views.refresh_gauges(self.metrics, self.cluster, self.requests.values(), self.models)
        counters = getattr(self.controller, "counters", None)  # the WarmServe family counts
        if counters is not None:
            for kind, value in dataclasses.asdict(counters).items():
                self.metrics.control_actions.labels(kind).set(value)
        return self.metrics.render()
