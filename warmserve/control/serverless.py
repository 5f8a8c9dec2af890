"""`serverlessllm`: reactive autoscaling with ServerlessLLM's start-up mechanisms.

Same load-triggered autoscaler and router as WarmServe, but nothing is prewarmed on GPUs. A
new instance loads its checkpoint through the host tiers; the server is chosen by estimated
start-up time (a node whose DRAM already caches the checkpoint first, then the shortest SSD
queue), and idle instances are kept alive for `keep_alive_s` before scale-down may stop them.
Live migration of running inferences is not modelled.
"""

from __future__ import annotations

from collections.abc import Sequence

from warmserve.control.allocation import StartChoice
from warmserve.control.api import ClusterHandle, ClusterSnapshot, ServedModel
from warmserve.control.config import ControlConfig, PolicySpec
from warmserve.control.controller import Controller
from warmserve.control.forecaster import Forecaster
from warmserve.types import ModelName, StartPath

SERVERLESSLLM = PolicySpec(
    "serverlessllm",
    unified_memory=False,
    proactive_prewarm=False,
    smart_placement=False,
    kv_prewarm=False,
    host_checkpoint_cache=True,
    keep_alive=True,
)


class ServerlessLLMController(Controller):
    """Keep-alive as in the base controller; no other model can reclaim an idle instance's
    GPUs (`_reclaim_idle` is a WarmServe addition), so requests wait for free GPUs."""

    def __init__(
        self, cfg: ControlConfig, models: Sequence[ServedModel], forecaster: Forecaster
    ) -> None:
        super().__init__(cfg, SERVERLESSLLM, models, forecaster)

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


def _aligned(free: list[int], tp: int) -> tuple[int, ...] | None:
    fset = set(free)
    for g in sorted(free):
        if g % tp == 0 and all(g + k in fset for k in range(tp)):
            return tuple(range(g, g + tp))
    return None
