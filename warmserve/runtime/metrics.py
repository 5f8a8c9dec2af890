"""Prometheus metrics of the serving runtime, named in the style of vLLM's (`warmserve:` prefix).

One registry per runtime (no process-wide globals), rendered by `GET /metrics`.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_TTFT_BUCKETS = (
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
_TPOT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)


class ServeMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        model = ["model_name"]
        self.ttft = Histogram(
            "warmserve:time_to_first_token_seconds",
            "Time to first token",
            model,
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "warmserve:time_per_output_token_seconds",
            "Time per output token after the first",
            model,
            buckets=_TPOT_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "warmserve:e2e_request_latency_seconds",
            "Request latency",
            model,
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter("warmserve:prompt_tokens", "Prompt tokens", model, registry=r)
        self.generation_tokens = Counter(
            "warmserve:generation_tokens", "Generated tokens", model, registry=r
        )
        self.request_success = Counter(
            "warmserve:request_success",
            "Finished requests",
            [*model, "finished_reason"],
            registry=r,
        )
        self.request_failure = Counter(
            "warmserve:request_failure",
            "Requests that failed after being accepted",
            [*model, "reason"],
            registry=r,
        )
        self.request_aborted = Counter(
            "warmserve:request_aborted",
            "Requests ended early because the client went away",
            model,
            registry=r,
        )
        self.waiting = Gauge(
            "warmserve:num_requests_waiting", "Requests queued for an instance", model, registry=r
        )
        self.running = Gauge(
            "warmserve:num_requests_running",
            "Requests dispatched to an instance",
            model,
            registry=r,
        )
        self.instances = Gauge("warmserve:num_instances", "Serving instances", model, registry=r)
        self.prewarmed = Gauge(
            "warmserve:num_prewarmed_replicas",
            "Prewarmed (resident, not serving) replicas",
            model,
            registry=r,
        )
        self.instance_starts = Counter(
            "warmserve:instance_starts",
            "Instance starts by path (prewarm_hit, inprogress_hit, cold)",
            [*model, "path"],
            registry=r,
        )
        self.activation = Histogram(
            "warmserve:activation_seconds",
            "Worker time to turn resident weights into an instance",
            model,
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self.pool_pages = Gauge(
            "warmserve:pool_pages", "Worker pool pages by use", ["worker", "use"], registry=r
        )
        self.kv_lent_pages = Gauge(
            "warmserve:kv_lent_pages",
            "KV pages a serving instance lent to prewarming (counted as free or weights)",
            ["worker"],
            registry=r,
        )
        # Cumulative counts kept by the control plane (ControlCounters), copied at each scrape.
        self.control_actions = Gauge(
            "warmserve:control_memory_actions",
            "Memory actions of the control plane since start-up: kv_set (SetKvPages), kv_lends, "
            "kv_reclaims, prewarms, evictions, quick_evictions (prewarms evicted within 10 s)",
            ["kind"],
            registry=r,
        )
        self.worker_up = Gauge(
            "warmserve:worker_up", "1 while the worker process is ready", ["worker"], registry=r
        )
        self.tp_groups_build = Gauge(
            "warmserve:tp_groups_build_seconds",
            "Joining the node's TP world and building every aligned group, at the worker's start",
            ["worker"],
            registry=r,
        )
        self.worker_restarts = Counter(
            "warmserve:worker_restarts",
            "Worker processes restarted after dying",
            ["worker"],
            registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
