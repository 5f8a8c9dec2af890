"""Which start-up costs (`costs.py`) each policy's starts pay, so that a run can refuse a cost
none of its policies would pay instead of ignoring it (experiment.py). Kept out of costs.py, a
plain data module, so that reading costs does not load the control plane's registry."""

from __future__ import annotations

from warmserve.control.registry import POLICIES

# Every load crosses the node's host link. tests/test_control_keys.py checks each list
# against simulated runs. ssd_bandwidth is listed though only `weights_source: ssd` reads it.
_UNIFIED = frozenset(  # prewarm loads, misses into a slot, activations
    {"engine_attach_s", "remap_bandwidth", "kv_initial_map_bytes", "weights_source",
     "ssd_bandwidth"}
)  # fmt: skip
_FRESH_ENGINE = frozenset({"cold_engine_init_s", "vanilla_load_bandwidth"})
_HOST_TIERS = frozenset({"serverless_ssd_bandwidth", "serverless_dram_cache_bytes"})


def costs_read(policy: str) -> frozenset[str]:
    """The `costs:` keys the registered policy `policy` pays."""
    reg = POLICIES[policy]
    keys = {"host_node_bandwidth"}
    if reg.spec.unified_memory:
        keys |= _UNIFIED
    elif reg.spec.host_checkpoint_cache:
        keys |= _HOST_TIERS | {reg.engine_init_cost}
    else:
        keys |= _FRESH_ENGINE
    return frozenset(keys)
