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
from warmserve.runtime import messages as m
from warmserve.runtime import views
from warmserve.runtime.cluster import ModelFiles, RuntimeCluster
from warmserve.runtime.history import seed_histories
from warmserve.runtime.metrics import ServeMetrics
from warmserve.runtime.outputs import OutputProcessor
from warmserve.runtime.requests import (
    Overloaded,
    RuntimeRequest,
    ShuttingDown,
    StreamError,
)
from warmserve.runtime.supervisor import NodeWorlds, Supervisor
from warmserve.runtime.tp import tp_shard_size
from warmserve.runtime.transport import WorkerLinks
from warmserve.serve_config import ServeConfig, shard_pages_error
from warmserve.types import ModelName

log = logging.getLogger("warmserve.runtime")


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
        tps = {mc.name: mc.tp for mc in cfg.models}
        for rm in models:
            tp = tps.get(rm.name, 1)
            shard = tp_shard_size(rm.model_dir, tp, page_bytes, rm.kv_bytes_per_token)
            files[rm.name] = ModelFiles(rm.name, str(rm.model_dir), shard.pages, tp)
            served.append(
                ServedModel(
                    ModelName(rm.name),
                    tp,
                    shard.pages,
                    shard.bytes,
                    shard.kv_bytes_per_token,
                    rm.max_model_len,
                    rm.priority,
                )
            )
            err = shard_pages_error(rm.name, tp, shard.pages, cfg.workers)
            if err is not None:
                raise ValueError(err)
        self.cluster = RuntimeCluster(
            n, files, self._send, self._routed, page_bytes, payload=self._payload,
            workers_per_node=cfg.workers.count,
        )  # fmt: skip
        self.tp_groups_s: dict[int, float] = {}  # per worker: its last TP group build
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
        self.outputs = OutputProcessor(self.metrics, self.clock, self._released)
        # Without unified memory (vanilla autoscaling) every instance is a new engine.
        max_tp = max(tps.values(), default=1)
        worlds = (
            NodeWorlds(self.links.nodes, max_tp, cfg.workers.tp_timeout_s,
                       cfg.workers.startup_timeout_s)
            if max_tp > 1
            else None
        )  # fmt: skip
        self.supervisor = Supervisor(
            self.links, not spec.unified_memory, self._on_event, self._on_worker_death, worlds
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tick_task: asyncio.Task[None] | None = None
        self._next_id = 0
        self._accepting = False
        self._closing = False

    # ----- lifecycle --------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        try:
            await self.supervisor.start(self.cfg.workers.startup_timeout_s)
        except TimeoutError:
            await self.shutdown(0)
            raise RuntimeError("workers did not start in time") from None
        self._accepting = True
        self._tick_task = asyncio.create_task(self._tick_loop(), name="control-tick")

    async def drain(self, grace_s: float) -> None:
        """Stop accepting, let in-flight requests finish for `grace_s`, then fail the rest
        (503 for those that sent nothing yet, an error event in a stream)."""
        self._accepting = False
        if self.requests and grace_s > 0:
            with contextlib.suppress(TimeoutError):
                await self.outputs.wait_all_done(grace_s)
        for req in list(self.requests.values()):
            self.outputs.fail(req, StreamError(503, "the server is shutting down"), "shutdown")

    async def shutdown(self, grace_s: float) -> None:
        """`drain`, then stop the workers."""
        await self.drain(grace_s)
        self._closing = True
        if self._tick_task is not None:
            self._tick_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._tick_task
        await self.supervisor.stop(10.0)

    @property
    def accepting(self) -> bool:
        return self._accepting

    @property
    def requests(self) -> dict[int, RuntimeRequest]:
        """Accepted requests not yet ended, by id."""
        return self.outputs.requests

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
        self.outputs.add(req)
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
        if req is not None and not req.done:
            self.outputs.abort(req, reason)

    def _payload(self, request_id: int) -> tuple[tuple[int, ...], SamplingParams]:
        req = self.requests[request_id]
        return req.prompt_ids, req.params

    def _routed(self, request_id: int, instance_id: int) -> None:
        """The cluster sent the request to its instance's worker: note where it runs."""
        req = self.requests[request_id]
        leader = self.cluster.instances[instance_id].devices[0]  # a TP instance's scheduler
        req.instance_id, req.worker_id = instance_id, leader

    def _send(self, wid: int | None, cmd: m.Command) -> None:
        self.supervisor.send(wid, cmd)

    def _released(self, req: RuntimeRequest, abort_on_worker: bool) -> None:
        """A request ended (`OutputProcessor`): take it out of the control plane's books,
        and off its worker when it may still be running there."""
        now = self.clock.now()
        if req.instance_id is None:  # still queued (or its instance died under it)
            self.controller.cancel_queued(now, req.request_id)
            return
        if req.instance_id not in self.cluster.instances:
            return
        if abort_on_worker:
            self._send(req.worker_id, m.AbortRequest(req.request_id))
        self.cluster.request_done(req.request_id, req.instance_id)
        self.controller.on_request_done(now, req.request_id, self.cluster)

    # ----- worker events (on the loop thread) -------------------------------------------
    def _on_event(self, wid: int, ev: m.Event, fresh: bool) -> None:
        if self._closing:
            return
        if isinstance(ev, m.TokenBatch):
            self.outputs.tokens(ev)
            inst = self.cluster.mark_kv_used(wid, ev.kv_used_blocks)
            if inst is not None and ev.waiting and inst.kv_lent_pages:
                # Requests wait for KV on an instance that lent pages: reclaim them now.
                self.controller.on_kv_pressure(self.clock.now(), inst.instance_id, self.cluster)
        elif isinstance(ev, m.Ready):
            self.metrics.worker_up.labels(str(wid)).set(1)
            if ev.tp_groups:
                self.tp_groups_s[wid] = ev.tp_groups_s
                self.metrics.tp_groups_build.labels(str(wid)).set(ev.tp_groups_s)
                log.info("worker %d: joined its node's TP world and built %d groups in %.3f s",
                         wid, ev.tp_groups, ev.tp_groups_s)  # fmt: skip
            if not fresh:  # (a fresh engine is for an instance the books already hold)
                self.cluster.worker_ready(wid, ev.num_pages)
                self._after_layout_change()
        elif isinstance(ev, m.Loaded):
            self.cluster.mark_loaded(wid, ev.token)
        elif isinstance(ev, m.KvMapped):
            self.cluster.kv_mapped(wid, ev.instance_id, ev.done)
        elif isinstance(ev, m.Activated):
            inst = self.cluster.mark_running(wid, ev.kv_blocks, ev.block_bytes, ev.instance_id)
            if inst is not None:
                self.metrics.activation.labels(inst.model).observe(ev.seconds)
        elif isinstance(ev, m.RequestFailed):
            req = self.requests.get(ev.request_id)
            if req is not None and not req.done:
                if ev.refused:
                    err = StreamError(503, f"the worker refused the request: {ev.message}")
                else:  # its own step failed: never retried, it would fail again
                    err = StreamError(500, f"the engine failed on this request: {ev.message}")
                self.outputs.fail(req, err, "worker_refused" if ev.refused else "engine_error")
        elif isinstance(ev, m.StepFailed):
            log.error("worker %d: an engine step failed; its requests were dropped: %s",
                      wid, ev.detail)  # fmt: skip
        elif isinstance(ev, m.CommandFailed):
            # The worker's state no longer matches the books: replace the process.
            log.error("worker %d: %s failed: %s; restarting it", wid, ev.command, ev.message)
            self.supervisor.kill(wid)

    def _on_worker_death(self, wid: int) -> None:
        """Fail over a dead worker's requests; the supervisor restarts it."""
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
                    self.outputs.fail(req, StreamError(502, msg), "worker_died_twice")
                else:
                    self.outputs.fail(
                        req, StreamError(502, "the worker serving this request died"), "worker_died"
                    )

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
                self.outputs.fail(req, StreamError(503, msg), "queue_timeout")

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
