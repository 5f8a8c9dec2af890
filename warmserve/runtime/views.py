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
    if any(r.ready for r in reps):
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
        wid = dev.worker_id
        weights = sum(r.pages for r in cluster.replicas.values() if r.worker_id == wid)
        insts = [i for i in cluster.instances.values() if i.worker_id == wid]
        kv = sum(i.kv_pages for i in insts)
        for use, n in (("free", dev.free_pages), ("weights", weights), ("kv", kv)):
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
                "worker": d.worker_id,
                "node": rt.links.nodes[d.worker_id],
                "alive": d.alive,
                "pages_total": d.total_pages,
                "pages_free": d.free_pages,
                "instance": d.instance_id,
            }
            for d in cluster.devices
        ],
        "instances": [
            {
                "instance": i.instance_id,
                "model": i.model,
                "worker": i.worker_id,
                "state": str(i.state),
                "start_path": str(i.path),
                "kv_pages": i.kv_pages,
                "kv_lent_pages": i.kv_lent_pages,
                "kv_blocks": i.kv_blocks,
                "kv_used_blocks": i.kv_used_blocks,
                "requests": len(i.requests),
            }
            for i in cluster.instances.values()
        ],
        "replicas": [
            {
                "replica": r.replica_id,
                "model": r.model,
                "worker": r.worker_id,
                "pages": r.pages,
                "ready": r.ready,
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
                "queued": sum(
                    1 for r in rt.requests.values() if r.model == name and r.instance_id is None
                ),
            }
            for name in rt.models
        },
    }
