"""`static`: dedicated instances sized from each model's average load; no sharing, no scaling."""

from __future__ import annotations

import math
from collections.abc import Sequence

from warmserve.control.api import ClusterHandle, ServedModel
from warmserve.control.config import ControlConfig, PolicySpec
from warmserve.control.controller import Controller
from warmserve.control.forecaster import Forecaster
from warmserve.types import ModelName

STATIC = PolicySpec(
    "static", unified_memory=False, proactive_prewarm=False, smart_placement=True, kv_prewarm=False
)


class StaticController(Controller):
    """Holds `ceil(daily mean load / capacity)` instances per model (at least one) for good.

    The size comes from the forecaster's history (what an operator would provision from past
    traffic); a model without history gets one instance. Instances start in the set-up period
    before the first request; requests beyond capacity queue.
    """

    def __init__(
        self, cfg: ControlConfig, models: Sequence[ServedModel], forecaster: Forecaster
    ) -> None:
        super().__init__(cfg, STATIC, models, forecaster)
        self.sizes: dict[ModelName, int] = {}
        for m in models:
            mean = forecaster.history_mean(m.name)
            self.sizes[m.name] = max(1, math.ceil((mean or 0.0) / cfg.capacity_per_instance))

    def _autoscale(self, name: ModelName, now: float, cluster: ClusterHandle) -> None:
        live = self._live_instances(name)
        for _ in range(self.sizes[name] - live):
            if not self._start(name, now, cluster):
                break  # the cluster is full: fewer instances than sized
