"""Policies by name. Each maps to a control plane; later baselines register here too."""

from __future__ import annotations

from warmserve.control.config import PolicySpec

POLICIES: dict[str, PolicySpec] = {
    p.name: p
    for p in (
        PolicySpec("warmserve"),
        PolicySpec("warmserve-no-placement", smart_placement=False),
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


class UnknownPolicyError(KeyError):
    def __str__(self) -> str:
        return f"unknown policy {self.args[0]!r} (known: {', '.join(POLICIES)})"


def get_policy(name: str) -> PolicySpec:
    try:
        return POLICIES[name]
    except KeyError:
        raise UnknownPolicyError(name) from None
