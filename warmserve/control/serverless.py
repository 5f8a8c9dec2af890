"""ServerlessLLM baselines: checkpoint loading through host tiers, no GPU prewarming.

Both load a new instance's checkpoint through the node's host tiers (a DRAM cache, else the
SSD) and pick the server by estimated start-up time: a node whose DRAM caches the checkpoint
first, then the shortest SSD queue. Live migration of running inferences is not modelled.

- `serverlessllm`: ServerlessLLM as it ships (`sllm/serve/routers/roundrobin_router.py`,
  defaults from `sllm/cli/default_config.json`). Per model, an autoscaling loop runs every
  `serverless_loop_s` (1 s): it wants ceil(requests in the system / `serverless_target`)
  instances (target 1, at most `serverless_max_instances` = 10), starts one instance a loop
  while it has fewer, and stops one ready instance a loop while it has more and the model has
  been idle `serverless_keep_alive_s` (0). A routing loop, also every second, hands queued
  requests round robin to *ready* instances, at most `serverless_max_queue` (10) in flight on
  each. Requests wait in the queue until then; none is sent to an engine still starting.
- `serverlessllm-tuned`: the earlier, stronger baseline: WarmServe's autoscaler and router
  (32 requests per instance, requests sent at once, also to starting instances), idle
  instances kept alive `keep_alive_s` (30 s), and its own engine start cost (the simulator's
  `serverless_tuned_engine_init_s`, 2 s).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from warmserve.control.allocation import StartChoice
from warmserve.control.api import (
    Action,
    ClusterHandle,
    ClusterSnapshot,
    ReleaseInstance,
    RequestInfo,
    ServedModel,
    StartInstance,
    StopInstance,
)
from warmserve.control.config import ControlConfig, PolicySpec
from warmserve.control.controller import Controller
from warmserve.control.forecaster import Forecaster
from warmserve.types import InstanceState, ModelName, RequestId, StartPath

_HOST_TIERS = dict(
    unified_memory=False,
    proactive_prewarm=False,
    smart_placement=False,
    kv_prewarm=False,
    host_checkpoint_cache=True,
)
SERVERLESSLLM = PolicySpec("serverlessllm", **_HOST_TIERS)
SERVERLESSLLM_TUNED = PolicySpec("serverlessllm-tuned", keep_alive=True, **_HOST_TIERS)


class _LocalityFirst(Controller):
    """ServerlessLLM's start-up-time-aware server choice; no other model can reclaim an idle
    instance's GPUs (`_reclaim_idle` is a WarmServe addition), so requests wait for free GPUs."""

    def _choose_start(
        self, model: ServedModel, snap: ClusterSnapshot, now: float
    ) -> StartChoice | None:
        gpn = snap.gpus_per_node
        best: tuple[tuple[bool, float, int], tuple[int, ...]] | None = None
        for node in range(len(snap.gpus) // gpn):
            free = [
                g.gpu_id for g in snap.gpus[node * gpn : (node + 1) * gpn] if g.instance_id is None
            ]
            group = _aligned(free, model.tp) or (
                tuple(free[: model.tp]) if len(free) >= model.tp else None
            )
            if group is None:
                continue
            cached = bool(snap.host_cached) and model.name in snap.host_cached[node]
            wait = max(0.0, snap.host_busy_until_s[node] - now) if snap.host_busy_until_s else 0.0
            key = (not cached, 0.0 if cached else wait, node)
            if best is None or key < best[0]:
                best = (key, group)
        return None if best is None else StartChoice(best[1], StartPath.COLD, None, ())

    def _reclaim_idle(self, name: ModelName, now: float, cluster: ClusterHandle) -> None:
        return None


class ServerlessLLMTunedController(_LocalityFirst):
    """`serverlessllm-tuned`: WarmServe's autoscaler and router with keep-alive."""

    def __init__(
        self, cfg: ControlConfig, models: Sequence[ServedModel], forecaster: Forecaster
    ) -> None:
        super().__init__(cfg, SERVERLESSLLM_TUNED, models, forecaster)


class ServerlessLLMController(_LocalityFirst):
    """`serverlessllm`: ServerlessLLM's own autoscaling and routing loops (module doc)."""

    def __init__(
        self, cfg: ControlConfig, models: Sequence[ServedModel], forecaster: Forecaster
    ) -> None:
        super().__init__(cfg, SERVERLESSLLM, models, forecaster)
        self._count = dict.fromkeys(self.models, 0)  # requests arrived and not finished
        self._idle_s = dict.fromkeys(self.models, 0.0)  # its keep-alive clock
        self._rr = dict.fromkeys(self.models, 0)  # round-robin position
        self._next_loop_s = float("-inf")

    def on_request(self, now: float, req: RequestInfo, cluster: ClusterHandle) -> None:
        self._load[req.model].add(now, +1)  # for the forecast-error metric only
        self._count[req.model] += 1
        self._idle_s[req.model] = 0.0
        self._queues[req.model].append(req)  # the routing loop sends it on

    def on_request_done(self, now: float, request_id: RequestId, cluster: ClusterHandle) -> None:
        inst_id = self._request_instance.pop(request_id)
        inst = self._instances[inst_id]
        self._load[inst.model].add(now, -1)
        self._count[inst.model] -= 1
        inst.in_flight -= 1
        inst.last_active_s = now
        if inst.stopping and inst.in_flight == 0:
            self._release(inst_id, cluster)

    def cancel_queued(self, now: float, request_id: RequestId) -> bool:
        for name, queue in self._queues.items():
            if any(r.request_id == request_id for r in queue):
                self._count[name] -= 1
                break
        return super().cancel_queued(now, request_id)

    def tick(self, now: float, cluster: ClusterHandle) -> None:
        self._close_windows(now)
        if now < self._next_loop_s - 1e-9:
            return
        self._next_loop_s = now + self.cfg.serverless_loop_s
        for name in self.models:
            self._route_queued(name, now, cluster)
            self._scale(name, now, cluster)

    def _ready(self, name: ModelName, cluster: ClusterHandle) -> list[int]:
        """Its running instances not stopping, oldest first."""
        views = cluster.snapshot().instance_by_id
        return [
            i
            for i, inst in self._instances.items()
            if inst.model == name
            and not inst.stopping
            and (v := views.get(i)) is not None
            and v.state == InstanceState.RUNNING
        ]

    def _route_queued(self, name: ModelName, now: float, cluster: ClusterHandle) -> None:
        queue = self._queues[name]
        if not queue:
            return
        ready = self._ready(name, cluster)
        cap = self.cfg.serverless_max_queue
        while queue and ready:
            for _ in range(len(ready)):
                inst_id = ready[self._rr[name] % len(ready)]
                self._rr[name] += 1
                if self._instances[inst_id].in_flight < cap:
                    self._dispatch(queue.popleft(), inst_id, cluster, now)
                    break
            else:
                return  # every ready instance is full

    def _scale(self, name: ModelName, now: float, cluster: ClusterHandle) -> None:
        cfg = self.cfg
        live = self._live_instances(name)
        desired = min(
            cfg.serverless_max_instances, math.ceil(self._count[name] / cfg.serverless_target)
        )
        if desired > live:
            self._start_one(name, now, cluster)
        elif desired < live:
            if self._idle_s[name] >= cfg.serverless_keep_alive_s:
                ready = self._ready(name, cluster)
                if ready:
                    self._stop(ready[-1], cluster)  # its router pops the newest ready one
                self._idle_s[name] = 0.0
            else:
                self._idle_s[name] += cfg.serverless_loop_s

    def _start_one(self, name: ModelName, now: float, cluster: ClusterHandle) -> None:
        """One new instance, if some node has the GPUs; else the next loop tries again."""
        choice = self._choose_start(self.models[name], cluster.snapshot(), now)
        if choice is None:
            return
        inst_id = self._new_instance_id()
        start = StartInstance(inst_id, name, choice.gpus, choice.path, None)
        self._record([start], now)
        cluster.apply([start])
        self._add_instance(inst_id, name, now)

    def _stop(self, inst_id: int, cluster: ClusterHandle) -> None:
        inst = self._instances[inst_id]
        self._set_stopping(inst)
        action: Action
        if inst.in_flight == 0:
            del self._instances[inst_id]
            action = ReleaseInstance(inst_id, None)
        else:
            action = StopInstance(inst_id)  # drains its requests, then is released
        cluster.apply([action])


def _aligned(free: list[int], tp: int) -> tuple[int, ...] | None:
    fset = set(free)
    for g in sorted(free):
        if g % tp == 0 and all(g + k in fset for k in range(tp)):
            return tuple(range(g, g + tp))
    return None
