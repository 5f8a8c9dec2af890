"""`muxserve`: static co-location of models on GPU groups by popularity; no autoscaling.

A simplified version of MuxServe's placement (its greedy enumeration of "LLM units"):
1. each model needs `ceil(mean load / capacity)` units (at least one), where the mean load
   comes from the forecaster's history (what MuxServe's optimiser gets as arrival rates);
2. units are placed by descending compute demand (mean load × model size), all first units
   before any second one: on a free aligned GPU group of the model's TP size if one is left,
   otherwise co-located on the least-loaded group of that size with room for its weights;
3. groups left free afterwards take extra units of the models with the highest load per unit.
Models on one group share its memory (KV split so that each gets the same number of token
slots, MuxServe's intended split) and its time (see `SharedDevice` in the simulator).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from warmserve.control.api import ClusterHandle, ClusterSnapshot, ServedModel, StartInstance
from warmserve.control.config import ControlConfig, PolicySpec
from warmserve.control.controller import Controller
from warmserve.control.forecaster import Forecaster
from warmserve.types import ModelName, StartPath

MUXSERVE = PolicySpec(
    "muxserve",
    unified_memory=False,
    proactive_prewarm=False,
    smart_placement=False,
    kv_prewarm=False,
)


@dataclass(slots=True)
class Mesh:
    gpus: tuple[int, ...]
    models: list[ModelName] = field(default_factory=list)
    load: float = 0.0


def plan_meshes(
    snap: ClusterSnapshot,
    models: Sequence[ServedModel],
    loads: dict[ModelName, float],
    capacity: int,
) -> list[Mesh]:
    gpn = snap.gpus_per_node
    pool = min(g.total_pages for g in snap.gpus)
    free_gpus = {g.gpu_id for g in snap.gpus if g.instance_id is None}
    by_name = {m.name: m for m in models}
    meshes: list[Mesh] = []

    def free_block(tp: int) -> tuple[int, ...] | None:
        for base in range(0, len(snap.gpus), tp):
            group = tuple(range(base, base + tp))
            if base // gpn == (base + tp - 1) // gpn and free_gpus.issuperset(group):
                return group
        return None

    def room(mesh: Mesh, m: ServedModel) -> bool:
        members = [by_name[n] for n in mesh.models] + [m]
        floor = sum(
            math.ceil(x.max_model_len * x.kv_bytes_per_token_per_gpu / snap.page_bytes)
            for x in members
        )
        return sum(x.pages_per_gpu for x in members) + floor <= pool and m.name not in mesh.models

    def place(m: ServedModel, load: float, allow_shared: bool) -> bool:
        block = free_block(m.tp)
        if block is not None:
            free_gpus.difference_update(block)
            meshes.append(Mesh(block, [m.name], load))
            return True
        if not allow_shared:
            return False
        shared = [x for x in meshes if len(x.gpus) == m.tp and room(x, m)]
        if not shared:
            return False
        best = min(shared, key=lambda x: (x.load, x.gpus))
        best.models.append(m.name)
        best.load += load
        return True

    need = {m.name: max(1, math.ceil(loads[m.name] / capacity)) for m in models}
    demand = sorted(models, key=lambda m: (-loads[m.name] * m.shard_bytes * m.tp, m.name))
    placed = dict.fromkeys(need, 0)
    for round_ in range(max(need.values())):
        for m in demand:
            if need[m.name] > round_ and place(m, loads[m.name] / need[m.name], allow_shared=True):
                placed[m.name] += 1
    while True:  # spare groups: more units for the busiest models per unit
        spare = sorted(models, key=lambda m: (-loads[m.name] / max(placed[m.name], 1), m.name))
        for m in spare:
            if loads[m.name] > 0 and place(
                m, loads[m.name] / (placed[m.name] + 1), allow_shared=False
            ):
                placed[m.name] += 1
                break
        else:
            return meshes


class MuxServeController(Controller):
    def __init__(
        self, cfg: ControlConfig, models: Sequence[ServedModel], forecaster: Forecaster
    ) -> None:
        super().__init__(cfg, MUXSERVE, models, forecaster)
        self.meshes: list[Mesh] | None = None

    def _autoscale(self, name: ModelName, now: float, cluster: ClusterHandle) -> None:
        if self.meshes is None:
            self._deploy(now, cluster)

    def _deploy(self, now: float, cluster: ClusterHandle) -> None:
        snap = cluster.snapshot()
        loads = {m: self.forecaster.history_mean(m) or 1.0 for m in self.models}
        self.meshes = plan_meshes(
            snap, list(self.models.values()), loads, self.cfg.capacity_per_instance
        )
        pool = min(g.total_pages for g in snap.gpus)
        for mesh in self.meshes:
            members = [self.models[n] for n in mesh.models]
            kv_total = pool - sum(m.pages_per_gpu for m in members)
            weight = sum(m.kv_bytes_per_token_per_gpu for m in members)
            for m in members:
                share = int(kv_total * m.kv_bytes_per_token_per_gpu / weight)
                inst_id = self._new_instance_id()
                start = StartInstance(inst_id, m.name, mesh.gpus, StartPath.COLD, None, share, True)
                cluster.apply([start])
                self._add_instance(inst_id, m.name, now)
