"""Policies by name: each name builds a control plane. Baselines register here too."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from warmserve.control.api import ControlPlane, ServedModel
from warmserve.control.config import ControlConfig, PolicySpec
from warmserve.control.controller import Controller
from warmserve.control.forecaster import Forecaster
from warmserve.control.muxserve import MUXSERVE, MuxServeController
from warmserve.control.serverless import (
    SERVERLESSLLM,
    SERVERLESSLLM_TUNED,
    ServerlessLLMController,
    ServerlessLLMTunedController,
)
from warmserve.control.static import STATIC, StaticController

T = TypeVar("T")
ControlPlaneFactory = Callable[[ControlConfig, Sequence[ServedModel], Forecaster], ControlPlane]

# The ControlConfig keys a policy reads, so that a run can refuse a setting that none of its
# policies would use instead of ignoring it (experiment.py, serve_config.py). Every driver
# ticks, and every policy runs a forecaster whose error is reported (the oracle's knows the
# workload, so it has no method of its own); the rest follow the policy's control loop and
# its techniques. A key is listed where the code reads it, even if a value of another key
# makes it moot (forecast_peak_quantile under the reference forecaster).
# tests/test_control_keys.py checks each list against simulated runs.
ALWAYS_READ = frozenset(
    {"tick_s", "forecast_method", "forecast_window_s", "forecast_correction_points",
     "forecast_cycle", "forecast_peak_quantile"}
)  # fmt: skip
FORECAST_METHOD_KEYS = frozenset(
    {"forecast_method", "forecast_correction_points", "forecast_peak_quantile"}
)  # fmt: skip
AUTOSCALER_KEYS = frozenset(
    {"capacity_per_instance", "scale_window_s", "scale_up_threshold", "scale_down_threshold",
     "protect_period_s"}
)  # fmt: skip
SERVERLESS_KEYS = frozenset(
    {"serverless_target", "serverless_max_instances", "serverless_keep_alive_s",
     "serverless_loop_s", "serverless_max_queue"}
)  # fmt: skip
_TECHNIQUE_KEYS: dict[str, frozenset[str]] = {  # PolicySpec switch -> the keys it reads
    "proactive_prewarm": frozenset({"planning_bandwidth"}),
    "kv_prewarm": frozenset({"kv_floor_requests"}),
    "keep_alive": frozenset({"keep_alive_s"}),
    "calm_kv": frozenset({"kv_hysteresis", "kv_lend_min_s", "prewarm_min_life_s"}),
    "fair_starts": frozenset(
        {"starve_wait_s", "starve_preempt_s", "starve_preempt_gap_s", "starve_short_threshold",
         "starve_rate_window_s", "starve_return_s"}
    ),
}  # fmt: skip


def keys_read(spec: PolicySpec, loop_keys: frozenset[str] = AUTOSCALER_KEYS) -> frozenset[str]:
    """What a policy with these techniques reads; `loop_keys`: those of its control loop (the
    autoscaler's unless the policy replaces it)."""
    keys = ALWAYS_READ | loop_keys
    for switch, extra in _TECHNIQUE_KEYS.items():
        if getattr(spec, switch):
            keys |= extra
    if spec.proactive_prewarm and spec.smart_placement:  # round robin searches no groups
        keys |= {"group_search"}
    return keys


@dataclass(frozen=True, slots=True)
class RegisteredPolicy:
    spec: PolicySpec  # what the cluster must provide (e.g. unified memory)
    build: ControlPlaneFactory
    reads: frozenset[str]  # the ControlConfig keys it reads (keys_read)
    needs_future: bool = False  # give it an OracleForecaster (knows the workload ahead)
    # The `costs:` key of the engine start behind the host checkpoint caches, for policies
    # that use them (a cost key's name, so that the control plane stays free of the simulator).
    engine_init_cost: str = "serverless_engine_init_s"


def _warmserve(spec: PolicySpec, needs_future: bool = False) -> RegisteredPolicy:
    def build(cfg: ControlConfig, models: Sequence[ServedModel], fc: Forecaster) -> ControlPlane:
        return Controller(cfg, spec, models, fc)

    # The oracle's forecaster knows the workload: no forecasting method of its own.
    reads = keys_read(spec) - (FORECAST_METHOD_KEYS if needs_future else frozenset())
    return RegisteredPolicy(spec, build, reads, needs_future)


POLICIES: dict[str, RegisteredPolicy] = {
    p.name: _warmserve(p)
    for p in (
        PolicySpec("warmserve"),
        PolicySpec("warmserve-no-placement", smart_placement=False),
        PolicySpec("warmserve-no-placement-ref", smart_placement=False, reference_round_robin=True),
        PolicySpec("warmserve-no-prewarm", proactive_prewarm=False),
        PolicySpec("warmserve-no-kv-prewarm", kv_prewarm=False),
        PolicySpec(
            "vanilla-autoscale",
            unified_memory=False,
            proactive_prewarm=False,
            smart_placement=False,
            kv_prewarm=False,
        ),
    )
}
POLICIES["warmserve-plus"] = _warmserve(
    PolicySpec(
        "warmserve-plus",
        keep_alive=True,
        prior_prewarm=True,
        queue_aging=True,
        calm_kv=True,
        fair_starts=True,
    )
)
POLICIES["oracle"] = _warmserve(PolicySpec("oracle"), needs_future=True)
# Static sizes and MuxServe's placement replace the autoscaler; they read only the capacity.
_CAPACITY = frozenset({"capacity_per_instance"})
POLICIES["static"] = RegisteredPolicy(
    STATIC, StaticController, keys_read(STATIC, loop_keys=_CAPACITY)
)
POLICIES["serverlessllm"] = RegisteredPolicy(
    SERVERLESSLLM, ServerlessLLMController, keys_read(SERVERLESSLLM, loop_keys=SERVERLESS_KEYS)
)
POLICIES["serverlessllm-tuned"] = RegisteredPolicy(
    SERVERLESSLLM_TUNED,
    ServerlessLLMTunedController,
    keys_read(SERVERLESSLLM_TUNED),
    engine_init_cost="serverless_tuned_engine_init_s",
)
POLICIES["muxserve"] = RegisteredPolicy(
    MUXSERVE, MuxServeController, keys_read(MUXSERVE, loop_keys=_CAPACITY)
)


def unread_keys(
    settings: T, base: T, policies: Iterable[str], reads: Callable[[str], frozenset[str]]
) -> dict[str, list[str]]:
    """The fields of the dataclass `settings` that differ from `base` and that none of
    `policies` reads (`reads(name)`: the keys a registered policy reads), each with the
    registered policies that do read it (for the error). A key left at `base` changes
    nothing, so it passes. An unknown policy name raises UnknownPolicyError."""
    names = list(policies)
    for p in names:
        get_policy(p)
    out: dict[str, list[str]] = {}
    for f in dataclasses.fields(settings):  # type: ignore[arg-type]
        if getattr(settings, f.name) == getattr(base, f.name):
            continue
        if not any(f.name in reads(p) for p in names):
            out[f.name] = [p for p in POLICIES if f.name in reads(p)]
    return out


def control_reads(policy: str) -> frozenset[str]:
    return POLICIES[policy].reads


def unread_control_keys(cfg: ControlConfig, policies: Iterable[str]) -> dict[str, list[str]]:
    """The keys `cfg` changes from their defaults that none of `policies` reads."""
    return unread_keys(cfg, ControlConfig(), policies, control_reads)


def unread_message(key: str, policies: Sequence[str], readers: Sequence[str], where: str) -> str:
    """`where`: how the user wrote the key, up to it ("control.", "--set control.")."""
    by = ", ".join(readers) if readers else "no policy"
    return (
        f"{where}{key}: not read by {', '.join(policies)} (read by {by}); "
        "remove it or run a policy that reads it"
    )


def first_unread_message(
    unread: dict[str, list[str]], policies: Sequence[str], where: str
) -> str | None:
    """One line naming the first key of an `unread_keys` result, or None if it is empty."""
    if not unread:
        return None
    key, readers = next(iter(unread.items()))
    return unread_message(key, policies, readers, where)


class UnknownPolicyError(KeyError):
    def __str__(self) -> str:
        return f"unknown policy {self.args[0]!r} (known: {', '.join(POLICIES)})"


def get_policy(name: str) -> RegisteredPolicy:
    try:
        return POLICIES[name]
    except KeyError:
        raise UnknownPolicyError(name) from None
