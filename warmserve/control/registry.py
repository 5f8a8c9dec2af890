"""Policies by name: each name builds a control plane. Baselines register here too."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

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

ControlPlaneFactory = Callable[[ControlConfig, Sequence[ServedModel], Forecaster], ControlPlane]


@dataclass(frozen=True, slots=True)
class RegisteredPolicy:
    spec: PolicySpec  # what the cluster must provide (e.g. unified memory)
    build: ControlPlaneFactory
    needs_future: bool = False  # give it an OracleForecaster (knows the workload ahead)
    # The `costs:` key of the engine start behind the host checkpoint caches, for policies
    # that use them (a cost key's name, so that the control plane stays free of the simulator).
    engine_init_cost: str = "serverless_engine_init_s"


def _warmserve(spec: PolicySpec, needs_future: bool = False) -> RegisteredPolicy:
    def build(cfg: ControlConfig, models: Sequence[ServedModel], fc: Forecaster) -> ControlPlane:
        return Controller(cfg, spec, models, fc)

    return RegisteredPolicy(spec, build, needs_future)


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
POLICIES["static"] = RegisteredPolicy(STATIC, StaticController)
POLICIES["serverlessllm"] = RegisteredPolicy(SERVERLESSLLM, ServerlessLLMController)
POLICIES["serverlessllm-tuned"] = RegisteredPolicy(
    SERVERLESSLLM_TUNED,
    ServerlessLLMTunedController,
    engine_init_cost="serverless_tuned_engine_init_s",
)
POLICIES["muxserve"] = RegisteredPolicy(MUXSERVE, MuxServeController)


class UnknownPolicyError(KeyError):
    def __str__(self) -> str:
        return f"unknown policy {self.args[0]!r} (known: {', '.join(POLICIES)})"


def get_policy(name: str) -> RegisteredPolicy:
    try:
        return POLICIES[name]
    except KeyError:
        raise UnknownPolicyError(name) from None
