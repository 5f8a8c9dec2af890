"""When a plan that placed nothing would place nothing again, with only free pages moved.

A KV lend frees pages on its instance's GPUs, which changes the plan's inputs: a plan that
wanted replicas it could not place then runs again. The evict-aware planner without prior
prewarming (`planner.plan_evict_aware`, `PlanInput.prior` false) reads free pages only through
tests `free[g] >= pages` of the wanted models' pages per GPU (its candidate groups), as long as
it places nothing (placing is what moves its own free pages). So if no GPU's free pages have
crossed one of those sizes upward since such a plan, every candidate group now was one then,
each was refused then for reasons that are all unchanged (the replicas, instances, forecasts
and live counts are the same), and the plan would again place nothing and score the existing
replicas as before.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class IdlePlan:
    """A plan that wanted replicas and placed none: what it read, free pages apart, and those."""

    demand: tuple  # prewarming's _demand_key
    structure: tuple  # its _layout_key less the free pages: replicas' and instances' GPUs
    free: tuple[int, ...]  # free pages per GPU, in snapshot order
    sizes: tuple[int, ...]  # pages per GPU of the models it wanted, ascending


def still_idle(rec: IdlePlan, demand: tuple, layout: tuple) -> bool:
    """Whether a plan on `demand` and `layout` (free pages per GPU first) places nothing too."""
    if layout[1:] != rec.structure or demand != rec.demand:
        return False
    sizes = rec.sizes
    for now, then in zip(layout[0], rec.free, strict=True):
        if now > then:
            for p in sizes:
                if then < p <= now:
                    return False  # this GPU takes a replica of that size now, not then
    return True
