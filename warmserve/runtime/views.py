"""What the runtime shows: model states, Prometheus gauges, the admin view (JSON)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from warmserve.runtime.cluster import RuntimeCluster
from warmserve.runtime.metrics import ServeMetrics
from warmserve.runtime.requests import RuntimeRequest
from warmserve.types import InstanceState, ModelName

if TYPE_CHECKING:
    from warmserve.runtime.runtime import ServingRuntime


def model_state(cluster: RuntimeCluster, name: str) -> str:
    """serving | starting | prewarmed | loading | cold."""
    states = {i.state for i in cluster.instances.values() if i.model == name}
    if InstanceState.RUNNING in states:
        return "serving"
    if InstanceState.STARTING in states:
        return "starting"
    reps = [r for r in cluster.replicas.values() if r.model == name and r.owner is None]
    if any(r.is_ready for r in reps):
        return "prewarmed"
    return "loading" if reps else "cold"


def refresh_gauges(
    mt: ServeMetrics,
    cluster: RuntimeCluster,
    requests: Iterable[RuntimeRequest],
    models: Iterable[str],
) -> None:
    reqs = list(requests)
    for name in models:
        mine = [r for r in reqs if r.model == name]
        waiting = sum(1 for r in mine if r.instance_id is None)
        mt.waiting.labels(name).set(waiting)
        mt.running.labels(name).set(len(mine) - waiting)
        mt.instances.labels(name).set(sum(1 for i in cluster.instances.values() if i.model == name))
        idle = [r for r in cluster.replicas.values() if r.model == name and r.owner is None]
        mt.prewarmed.labels(name).set(len(idle))
    for model, path in cluster.starts:
        mt.instance_starts.labels(model, str(path)).inc()
    cluster.starts.clear()
    for dev in cluster.devices:
        wid = dev.device_id
        weights = dev.prewarm_pages + dev.weights_pages
        insts = [cluster.instances[i] for i in dev.instance_ids]
        for use, n in (("free", dev.free_pages), ("weights", weights), ("kv", dev.kv_pages)):
            mt.pool_pages.labels(str(wid), use).set(n)
        mt.kv_lent_pages.labels(str(wid)).set(sum(i.kv_lent_pages for i in insts))


def admin_view(rt: ServingRuntime) -> dict[str, Any]:
    cluster = rt.cluster
    now = rt.clock.now()
    fc = rt.controller.forecasts()
    return {
        "now_s": now,
        "policy": rt.spec.name,
        "runtime": rt.links.kind,
        "workers": [
            {
                "worker": d.device_id,
                "node": rt.links.nodes[d.device_id],
                "alive": d.alive,
                "pages_total": d.total_pages,
                "pages_free": d.free_pages,
                "instance": d.instance_id,
                "tp_groups_build_s": rt.tp_groups_s.get(d.device_id),
            }
            for d in cluster.devices
        ],
        "instances": [
            {
                "instance": i.instance_id,
                "model": i.model,
                "worker": i.devices[0],  # a TP instance's leader
                "workers": list(i.devices),
                "state": str(i.state),
                "start_path": str(i.path),
                "kv_pages": i.kv_pages,
                "kv_lent_pages": i.kv_lent_pages,
                "kv_blocks": kv.blocks if (kv := cluster.engine_kv.get(i.instance_id)) else 0,
                "kv_used_blocks": kv.used_blocks if kv else 0,
                "requests": len(i.requests),
            }
            for i in cluster.instances.values()
        ],
        "replicas": [
            {
                "replica": r.replica_id,
                "model": r.model,
                "worker": r.devices[0],
                "workers": list(r.devices),
                "pages": r.pages_per_device,
                "ready": r.is_ready,
                "serving": r.owner is not None,
            }
            for r in cluster.replicas.values()
        ],
        "models": {
            name: {
                "state": model_state(cluster, name),
                "load": rt.controller.load(ModelName(name), now),
                "forecast_avg": fc[name].avg,
                "forecast_peak": fc[name].peak,
                "queued": rt.controller.num_queued(ModelName(name)),
            }
            for name in rt.models
        },
    }
