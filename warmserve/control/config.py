"""Policy constants. Defaults are the reference system's; every one can be overridden."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True, slots=True)
class ControlConfig:
    # Autoscaler and router (reference: ctl/common.py).
    capacity_per_instance: int = 32  # in-flight requests one instance takes
    scale_window_s: float = 5.0  # concurrency is averaged over this window
    scale_up_threshold: float = 0.8  # of capacity
    scale_down_threshold: float = 0.5
    protect_period_s: float = 5.0  # a new instance is never stopped before this age
    tick_s: float = 0.5  # control-loop period
    # Forecaster (control/forecaster.py). "reference": the paper's method (same slot of earlier
    # days + 2^-d weighted error correction). "adaptive": seasonal, level and error-corrected
    # forecasts combined with weights fitted online, the peak a quantile of the window's
    # predictive distribution (benchmarks/forecast_error.py compares them).
    forecast_method: Literal["reference", "adaptive"] = "adaptive"
    forecast_window_s: float = 300.0
    forecast_correction_points: int = 10  # K: last K windows' errors, weights 2^-d
    forecast_cycle: Literal["day", "week"] = "day"
    # adaptive only: the quantile of the next window's peak that prewarming provisions for
    # (Forecast.peak); none: the point forecast, the peak that minimises the expected relative
    # error, which forecast errors always score. Higher: fewer under-provisioned bursts, more
    # memory held for bursts that do not come.
    forecast_peak_quantile: float | None = 0.9
    # Planner.
    planning_bandwidth: float = 32e9  # bytes/s used to value a replica (cold-load seconds saved)
    group_search: Literal["aligned", "exhaustive"] = "aligned"
    # KV reservation: requests of max_model_len tokens an instance always keeps room for.
    kv_floor_requests: int = 1
    # warmserve-plus and serverlessllm-tuned: an idle instance lives this long before
    # scale-down.
    keep_alive_s: float = 30.0
    # serverlessllm (control/serverless.py), ServerlessLLM's shipped defaults
    # (sllm/cli/default_config.json; loops in sllm/serve/routers/roundrobin_router.py):
    # instances wanted = ceil(requests in the system / target), at most max_instances; an
    # idle model keeps its instances keep_alive_s; the autoscaling and routing loops run every
    # loop_s (at tick_s granularity); a ready instance takes at most max_queue requests.
    serverless_target: float = 1.0
    serverless_max_instances: int = 10
    serverless_keep_alive_s: float = 0.0
    serverless_loop_s: float = 1.0
    serverless_max_queue: int = 10
    # Calm KV lending (policies with calm_kv, e.g. warmserve-plus). A tick lends or reclaims
    # only when the target moved by at least this fraction of the instance's full KV, and not
    # within kv_lend_min_s of the instance's last change; requests waiting for KV (pressure)
    # reclaim at once regardless. A tick's reclaim never evicts a replica prewarmed less than
    # prewarm_min_life_s ago (it takes free pages only).
    kv_hysteresis: float = 0.25
    kv_lend_min_s: float = 30.0
    prewarm_min_life_s: float = 10.0
    # Fair starts (policies with fair_starts, e.g. warmserve-plus). A model whose oldest queued
    # request has waited this long, with no free room, gets an aligned GPU block held for it:
    # idle instances there are released, busy ones drained, and no other model starts there.
    # Until it has waited starve_preempt_s, only instances the autoscaler could have stopped
    # (their models' other instances carry the load below scale_down_threshold) are drained;
    # after, any (a model's last instance too). Lower: a shorter worst wait, more drains.
    starve_wait_s: float = 2.0
    starve_preempt_s: float = 15.0
    # Such a preemption (a drain that leaves a model short) must pay: what the models left
    # short miss (their load, and their arrival rate times one starve_preempt_gap_s per other
    # model waiting in line, the wait behind it) is at most what the waiting model saves,
    # counted the same way, times (its wait / starve_preempt_s); an idle last instance is
    # stopped for a waiting model only if the same price pays. At most one preemption starts
    # per starve_preempt_gap_s across the cluster. Higher: better attainment when more models
    # than fit compete, longer worst waits.
    starve_preempt_gap_s: float = 20.0
    # Once a model may preempt, a busy model is not left short by a drain if its other
    # instances would carry its load below this fraction of their capacity (earlier drains use
    # scale_down_threshold): its extra instance goes before a rarely used model's last one.
    # Higher: shorter waits for the starving models, busier instances for the popular ones
    # (at 0.8, 0.2 points of attainment lost at 8 models, docs/fair-starts.md).
    starve_short_threshold: float = 0.65
    # The arrival rates in that price are counted over this window (docs/fair-starts.md).
    starve_rate_window_s: float = 300.0
    # Stopping a model's idle last instance for another model also costs the requests it gets
    # while it waits to come back: its arrival rate times this many seconds. 0: an idle stop
    # costs only the wait behind the line. The fair setting (docs/fair-starts.md, Round 5)
    # pairs 10 s with starve_preempt_s 10 s: every model's P99 TTFT within 5x the pooled one at
    # 8 models (20 of 20 seeds), for a pooled P99 about 50 % higher, and a worse P99 on a small
    # real server where one model is always waiting for a worker.
    starve_return_s: float = 0.0

    def __post_init__(self) -> None:
        if self.capacity_per_instance < 1:
            raise ValueError("capacity_per_instance must be >= 1")
        if not 0 <= self.scale_down_threshold < self.scale_up_threshold <= 1:
            raise ValueError("need 0 <= scale_down_threshold < scale_up_threshold <= 1")
        for name in ("scale_window_s", "tick_s", "forecast_window_s", "planning_bandwidth"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0")
        if self.protect_period_s < 0:
            raise ValueError("protect_period_s must be >= 0")
        if self.forecast_correction_points < 1:
            raise ValueError("forecast_correction_points must be >= 1")
        if self.forecast_cycle not in ("day", "week"):
            raise ValueError("forecast_cycle must be 'day' or 'week'")
        if self.forecast_method not in ("reference", "adaptive"):
            raise ValueError("forecast_method must be 'reference' or 'adaptive'")
        q = self.forecast_peak_quantile
        if q is not None and not 0 < q < 1:
            raise ValueError("forecast_peak_quantile must be in (0, 1)")
        if self.group_search not in ("aligned", "exhaustive"):
            raise ValueError("group_search must be 'aligned' or 'exhaustive'")
        if self.kv_floor_requests < 0:
            raise ValueError("kv_floor_requests must be >= 0")
        if not 0 <= self.kv_hysteresis <= 1:
            raise ValueError("kv_hysteresis must lie in [0, 1]")
        if not 0 <= self.starve_wait_s <= self.starve_preempt_s:
            raise ValueError("need 0 <= starve_wait_s <= starve_preempt_s")
        if self.starve_preempt_gap_s < 0:
            raise ValueError("starve_preempt_gap_s must be >= 0")
        if self.starve_return_s < 0:
            raise ValueError("starve_return_s must be >= 0")
        if self.starve_rate_window_s <= 0:
            raise ValueError("starve_rate_window_s must be > 0")
        if not 0 < self.starve_short_threshold <= 1:
            raise ValueError("starve_short_threshold must lie in (0, 1]")
        if self.serverless_target <= 0 or self.serverless_loop_s <= 0:
            raise ValueError("serverless_target and serverless_loop_s must be > 0")
        if self.serverless_max_instances < 1 or self.serverless_max_queue < 1:
            raise ValueError("serverless_max_instances and serverless_max_queue must be >= 1")
        if self.serverless_keep_alive_s < 0:
            raise ValueError("serverless_keep_alive_s must be >= 0")
        if self.kv_lend_min_s < 0 or self.prewarm_min_life_s < 0:
            raise ValueError("kv_lend_min_s and prewarm_min_life_s must be >= 0")


@dataclass(frozen=True, slots=True)
class PolicySpec:
    """Which of WarmServe's techniques a policy uses (the paper's ablation switches)."""

    name: str
    unified_memory: bool = True  # weights stay resident after scale-down; misses load into a slot
    proactive_prewarm: bool = True  # forecast-driven planner
    smart_placement: bool = True  # evict-aware placement and worker choice (else round robin)
    kv_prewarm: bool = True  # lend idle KV pages of running instances to prewarming
    host_checkpoint_cache: bool = False  # ServerlessLLM-style SSD -> DRAM cache -> GPU loads
    # Idle instances live `keep_alive_s` instead of scaling to zero after the short load window,
    # and are stopped at once (weights stay prewarmed) when another model needs their GPUs.
    keep_alive: bool = False
    # Beyond the paper (warmserve-plus). Prior prewarming: a model that no forecast asks a
    # replica for and that has no live instance (a fresh start, a new model, a quiet one) is
    # prewarmed into free pages by its `priority`, with a score below every forecast-driven
    # replica, so those evict it when they need the pages.
    prior_prewarm: bool = False
    # Aging: queued models start in order of their oldest waiting request, not popularity,
    # so the least popular model cannot lose every race for freed GPUs.
    queue_aging: bool = False
    # Calm KV lending: hysteresis and a minimum lifetime for lends (ControlConfig.kv_*).
    calm_kv: bool = False
    # Starts that cannot starve: starts keep free aligned blocks for larger TP degrees (a
    # prewarm hit that would break one a waiting model needs loses to another replica or a
    # miss); a start with no room demotes the idle instances of one aligned block; a model
    # waiting `starve_wait_s` gets an aligned block held for it, its busy instances drained.
    fair_starts: bool = False
    # Without smart placement: the reference's round-robin planner, which stops at the first
    # model with no quota (planner.plan_round_robin); only `warmserve-no-placement-ref`.
    reference_round_robin: bool = False
