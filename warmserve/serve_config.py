"""`warmserve serve` configuration: YAML in, validated frozen dataclasses out.

With no file, the embedded default serves three virtual copies of the packaged SmolLM2-135M
on two CPU workers at 127.0.0.1:8000.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from warmserve.control.config import ControlConfig
from warmserve.control.registry import POLICIES, first_unread_message, unread_control_keys
from warmserve.experiment import ExperimentError, build_section, convert_value, read_yaml
from warmserve.model_spec import read_hf_config

PACKAGED = "smollm2"  # a model path naming the packaged SmolLM2-135M-Instruct
# Model paths naming packaged models (`warmserve.models.PACKAGED`), converted on first use;
# gemma3-270m needs the optional gemma extra (Gemma Terms of Use).
PACKAGED_PATHS = (PACKAGED, "gemma3-270m")


class ServeConfigError(ExperimentError):
    """A problem with the serve configuration, phrased for a one-line CLI error."""


@dataclass(frozen=True, slots=True)
class ListenConfig:
    host: str = "127.0.0.1"
    port: int = 8000


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    count: int = 2
    device: Literal["cpu", "cuda"] = "cpu"
    pool_mib: int = 1536  # the page pool of each worker
    page_mib: int = 2
    threads: int = 0  # torch threads per worker; 0: the CPUs divided among the workers
    # Each local worker on a core of its own (CPU affinity) where each runs one torch thread
    # and there are cores for all of them, as vLLM's CPU workers are: a worker's step then
    # keeps its core's caches rather than migrating.
    pin: bool = True
    startup_timeout_s: float = 120.0
    # Scheduling priority below the server's (os.nice). Where workers and the gateway share
    # CPU cores, the event loop then runs first: measured on 2 cores, P50 TTFT 778 -> 576 ms
    # and 0.65 -> 0.78 req/s (benchmarks/ray_scale.py, local runtime). Ray workers get
    # Ray's own (15).
    nice: int = 10
    # Gloo's timeout for building a node's TP groups and for each collective of a TP engine.
    # A follower waits in a collective for the leader's next step, so this bounds how long a
    # TP instance may stay idle before its group is declared broken (and the node's workers
    # replaced); a dead worker is noticed by the supervisor long before.
    tp_timeout_s: float = 3600.0

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ValueError("count must be >= 1")
        if self.page_mib < 1 or self.pool_mib < self.page_mib:
            raise ValueError("need page_mib >= 1 and pool_mib >= page_mib")
        if self.threads < 0:
            raise ValueError("threads must be >= 0")
        if not 0 <= self.nice <= 19:
            raise ValueError("nice must lie in [0, 19]")
        if not self.tp_timeout_s > 0:
            raise ValueError("tp_timeout_s must be > 0")

    @property
    def num_pages(self) -> int:
        return self.pool_mib // self.page_mib

    @property
    def page_bytes(self) -> int:
        return self.page_mib << 20

    def torch_threads(self) -> int:
        return self.threads or max(1, (os.cpu_count() or 1) // self.count)

    def cpus_of(self, worker_id: int) -> tuple[int, ...] | None:
        """The cores local worker `worker_id` is pinned to, or None (not pinned)."""
        try:
            cores = sorted(os.sched_getaffinity(0))
        except AttributeError:  # no affinity on this OS
            return None
        if not self.pin or self.device != "cpu" or self.torch_threads() != 1:
            return None
        if self.count > len(cores):
            return None
        return (cores[worker_id % self.count],)


@dataclass(frozen=True, slots=True)
class ModelConfig:
    name: str
    # An HF directory (config.json + *.safetensors + tokenizer), or one of PACKAGED_PATHS.
    path: str = PACKAGED
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    tp: int = 1
    priority: float = 1.0  # expected-load share before history (policies with prior_prewarm)


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    max_request_bytes: int = 1 << 20  # HTTP bodies above this get 413
    default_max_tokens: int = 256  # when a request gives none
    max_queued_requests: int = 1024  # per model: beyond, 429 rather than an unbounded queue
    shutdown_grace_s: float = 30.0  # in-flight requests get this long on SIGINT/SIGTERM
    queue_timeout_s: float = 600.0  # a request waiting this long for an instance gets 503
    # Slow or idle clients: a connection must send its request head within header_timeout_s
    # and its body within body_timeout_s (else 408); an idle keep-alive connection closes
    # after keep_alive_s; beyond max_connections, new connections get 503. For the internet,
    # put a reverse proxy in front anyway.
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    keep_alive_s: float = 5.0
    max_connections: int = 1024

    def __post_init__(self) -> None:
        for name in ("max_request_bytes", "default_max_tokens", "max_queued_requests",
                     "max_connections"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.queue_timeout_s <= 0 or self.shutdown_grace_s < 0:
            raise ValueError("need queue_timeout_s > 0 and shutdown_grace_s >= 0")
        for name in ("header_timeout_s", "body_timeout_s", "keep_alive_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0")


@dataclass(frozen=True, slots=True)
class RuntimeConfig:
    """Where the universal workers run: local processes, or Ray actors (`workers.count` on
    every node of the cluster at `address`; none: a private single-node Ray on loopback)."""

    kind: Literal["local", "ray"] = "local"
    address: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("local", "ray"):
            raise ValueError(f"kind must be local or ray ({self.kind!r} given)")
        if self.address is not None and self.kind != "ray":
            raise ValueError("address needs kind: ray")


@dataclass(frozen=True, slots=True)
class ForecastConfig:
    # A CSV trace (timestamp_s,model,input_tokens,output_tokens; UTC seconds into the day, or
    # into the week from Monday with control.forecast_cycle: week) whose load seeds each
    # model's slot history; live traffic keeps it up to date.
    history: str | None = None
    service_s_per_token: float = 0.05  # turns a history request into a busy interval


@dataclass(frozen=True, slots=True)
class ServeConfig:
    listen: ListenConfig = field(default_factory=ListenConfig)
    workers: WorkerConfig = field(default_factory=WorkerConfig)
    models: list[ModelConfig] = field(default_factory=list)
    policy: str = "warmserve-plus"  # the faithful paper policy stays as "warmserve"
    control: ControlConfig = field(default_factory=ControlConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    forecast: ForecastConfig = field(default_factory=ForecastConfig)
    api_keys: list[str] = field(default_factory=list)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    base_dir: Path = Path()

    def model_path(self, m: ModelConfig, prepared: Path | None) -> Path:
        if m.path in PACKAGED_PATHS:
            assert prepared is not None
            return prepared
        return (self.base_dir / m.path).resolve()


DEFAULT_YAML = """
listen: {host: 127.0.0.1, port: 8000}
workers: {count: 2, device: cpu, pool_mib: 1536}
models:
  - {name: smollm2-a, path: smollm2, max_model_len: 2048}
  - {name: smollm2-b, path: smollm2, max_model_len: 2048}
  - {name: smollm2-c, path: smollm2, max_model_len: 2048}
  # A second, different model (Gemma 3, the pretrained base: /v1/completions), once the optional
  # gemma extra is installed (Gemma Terms of Use; see the README):
  # - {name: gemma3-270m, path: gemma3-270m, max_model_len: 2048}
policy: warmserve-plus   # or warmserve, the paper's policy as published
control:
  capacity_per_instance: 8   # a CPU worker batches far fewer requests than an H100
  forecast_window_s: 300
"""

_TOP = {
    "listen",
    "workers",
    "models",
    "policy",
    "control",
    "limits",
    "forecast",
    "api_keys",
    "runtime",
}


def default_config() -> ServeConfig:
    return parse_serve_config(yaml.safe_load(DEFAULT_YAML), Path())


def load_serve_config(path: Path) -> ServeConfig:
    return parse_serve_config(read_yaml(path, ServeConfigError), path.parent)


def parse_serve_config(raw: Any, base_dir: Path) -> ServeConfig:
    if not isinstance(raw, dict):
        raise ServeConfigError("the serve configuration must be a YAML mapping")
    unknown = sorted(set(raw) - _TOP)
    if unknown:
        raise ServeConfigError(f"unknown key {unknown[0]!r} (known: {', '.join(sorted(_TOP))})")
    models = raw.get("models")
    if not models or not isinstance(models, list):
        raise ServeConfigError("models: give a list of at least one model")
    try:
        cfg = ServeConfig(
            listen=build_section(ListenConfig, raw.get("listen"), "listen"),
            workers=build_section(WorkerConfig, raw.get("workers"), "workers"),
            models=[build_section(ModelConfig, m, f"models[{k}]") for k, m in enumerate(models)],
            policy=convert_value(raw.get("policy", "warmserve-plus"), str, "policy"),
            control=build_section(ControlConfig, raw.get("control"), "control"),
            limits=build_section(LimitsConfig, raw.get("limits"), "limits"),
            forecast=build_section(ForecastConfig, raw.get("forecast"), "forecast"),
            api_keys=convert_value(raw.get("api_keys", []), list[str], "api_keys"),
            runtime=build_section(RuntimeConfig, raw.get("runtime"), "runtime"),
            base_dir=base_dir,
        )
    except ExperimentError as e:
        raise ServeConfigError(str(e)) from None
    _validate(cfg)
    return cfg


def _validate(cfg: ServeConfig) -> None:
    names = [m.name for m in cfg.models]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ServeConfigError(f"models: name {dup[0]!r} appears twice")
    for k, m in enumerate(cfg.models):
        if not m.name or any(c.isspace() for c in m.name):
            raise ServeConfigError(f"models[{k}].name: {m.name!r} is empty or has spaces")
        _validate_tp(cfg, k, m)
        if m.max_model_len is not None and m.max_model_len < 2:
            raise ServeConfigError(f"models[{k}].max_model_len must be >= 2")
        if not m.priority > 0:
            raise ServeConfigError(f"models[{k}].priority must be > 0")
        known = POLICIES.get(cfg.policy)  # an unknown policy is reported below
        if m.priority != 1.0 and known is not None and not known.spec.prior_prewarm:
            raise ServeConfigError(
                f"models[{k}].priority: policy {cfg.policy!r} does not prewarm by priors "
                "(warmserve-plus does); remove the key or change the policy"
            )
        if m.path not in PACKAGED_PATHS:
            path = cfg.base_dir / m.path
            if not (path / "config.json").is_file():
                raise ServeConfigError(f"models[{k}].path: no config.json in {path}")
            if not any(path.glob("*.safetensors")):
                raise ServeConfigError(f"models[{k}].path: no *.safetensors in {path}")
    if cfg.policy not in POLICIES:
        raise ServeConfigError(f"unknown policy {cfg.policy!r} (known: {', '.join(POLICIES)})")
    unread = first_unread_message(
        unread_control_keys(cfg.control, [cfg.policy]), [cfg.policy], "control."
    )
    if unread:
        raise ServeConfigError(unread)
    spec = POLICIES[cfg.policy].spec
    if spec.host_checkpoint_cache or cfg.policy in ("muxserve", "oracle"):
        raise ServeConfigError(
            f"policy {cfg.policy!r} runs in the simulator only; serve takes warmserve, "
            "warmserve-plus, warmserve-no-placement, warmserve-no-prewarm, "
            "warmserve-no-kv-prewarm, vanilla-autoscale or static"
        )
    if cfg.workers.device == "cuda":
        raise ServeConfigError(
            "workers.device: cuda is not available in the server yet (the CUDA page pool and "
            "engine exist, but serving on a GPU has not been run); use device: cpu"
        )
    if cfg.forecast.history is not None and not (cfg.base_dir / cfg.forecast.history).is_file():
        raise ServeConfigError(f"forecast.history: no file {cfg.base_dir / cfg.forecast.history}")


def _validate_tp(cfg: ServeConfig, k: int, m: ModelConfig) -> None:
    """A TP instance spans `tp` workers of one node, on a pre-built aligned group: a power of
    two dividing the workers of a node (`workers.count` is per node under Ray too). Whether a
    shard fits a worker's pool is checked once the checkpoint is read (`shard_pages_error`)."""
    tp, n = m.tp, cfg.workers.count
    if tp < 1 or tp & (tp - 1):
        raise ServeConfigError(f"models[{k}].tp: {tp} is not a power of two (1, 2, 4, ...)")
    if tp == 1:
        return
    if tp > n or n % tp:
        raise ServeConfigError(
            f"models[{k}].tp: {tp} workers per instance, but a node has workers.count = {n} "
            f"(TP groups stay within a node and must divide its workers)"
        )
    known = POLICIES.get(cfg.policy)
    if known is not None and not known.spec.unified_memory:
        raise ServeConfigError(
            f"models[{k}].tp: policy {cfg.policy!r} restarts a worker process per instance, "
            "which a node's TP communicators cannot survive; use a warmserve policy"
        )


def shard_pages_error(name: str, tp: int, shard_pages: int, cfg: WorkerConfig) -> str | None:
    """Why one TP shard of `name` (`shard_pages` weight pages per worker) cannot be served from
    a worker's pool, or None. Weights must leave at least one page for the KV cache."""
    if shard_pages < cfg.num_pages:
        return None
    what = f"a TP {tp} shard of model {name!r}" if tp > 1 else f"model {name!r}"
    hint = "raise workers.pool_mib" + (" or models[].tp" if tp < cfg.count else "")
    return (
        f"{what} needs {shard_pages} pages of {cfg.page_mib} MiB; a worker pool has "
        f"{cfg.num_pages} ({hint})"
    )


def with_overrides(
    cfg: ServeConfig, host: str | None, port: int | None, ray: str | None = None
) -> ServeConfig:
    """Command-line flags over the file: `--host`, `--port`, `--ray [ADDRESS]` ("" for a
    private single-node Ray on loopback)."""
    if ray is not None:
        cfg = dataclasses.replace(cfg, runtime=RuntimeConfig("ray", ray or None))
    listen = cfg.listen
    if host is not None:
        listen = dataclasses.replace(listen, host=host)
    if port is not None:
        if not 0 <= port < 65536:
            raise ServeConfigError(f"--port {port} is not a TCP port")
        listen = dataclasses.replace(listen, port=port)
    return dataclasses.replace(cfg, listen=listen)


def model_max_len(model_dir: Path, configured: int | None) -> int:
    hf = read_hf_config(model_dir)
    native = int(hf.get("max_position_embeddings") or 2048)
    return min(native, configured) if configured else native
