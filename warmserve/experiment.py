"""Experiment files: YAML in, validated frozen dataclasses out, with one-line errors."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from warmserve.control.config import ControlConfig
from warmserve.control.registry import (
    POLICIES,
    control_reads,
    first_unread_message,
    unread_keys,
    unread_message,
)
from warmserve.hardware import PAGE_BYTES, GpuSpec, pages_for
from warmserve.model_spec import (
    MODEL_PRESETS,
    ModelSpec,
    ModelSpecError,
    read_hf_config,
    spec_from_hf_config,
)
from warmserve.profiles import (
    LEGACY_GPU_NAMES,
    DeviceProfile,
    ProfileError,
    load_profile,
)
from warmserve.sim.costs import StartupCosts
from warmserve.sim.latency import LatencyParams
from warmserve.sim.policy_costs import costs_read
from warmserve.workload.trace_name import TRACE_NAMES, parse_trace_name


class ExperimentError(ValueError):
    """A problem with an experiment file, phrased for a one-line CLI error."""


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    nodes: int = 2
    gpus_per_node: int = 8
    # A device profile (warmserve/profiles.py): a shipped name or a path to a profile file,
    # relative to the experiment file. The experiment's `latency:` and `costs:` sections
    # override single values of the profile's.
    profile: str | None = None
    gpu: str | None = None  # the older key: H100-SXM-80G or A100-80G, the shipped profiles
    pool_fraction: float = 0.9  # of device memory managed as the page pool


@dataclass(frozen=True, slots=True)
class ModelEntry:
    name: str
    preset: str | None = None
    config: str | None = None  # path to an HF config.json, relative to the experiment file
    tp: int = 1
    copies: int = 1  # virtual copies: same weights, independent load (named NAME-0, NAME-1, ...)
    max_model_len: int | None = None
    priority: float = 1.0  # expected-load share before history (policies with prior_prewarm)


@dataclass(frozen=True, slots=True)
class WorkloadConfig:
    trace: str = "azure-conv"  # azure-conv | azure-code | servegen:m-mid | PATH.csv
    rps: float = 1.0
    alpha: float = 2.0
    start_hour: float = 0.0
    days: list[int] | None = None  # day of week (Monday = 0) each model replays
    duration_s: float = 1200.0
    max_input_tokens: int = 1024
    min_output_tokens: int = 3
    max_output_tokens: int = 1023
    drain_s: float = 1800.0  # after the last arrival; requests unfinished by then fail
    warmup_s: float = 60.0  # the control plane runs this long before the first arrival
    burstiness_cv: float | None = None  # Azure traces: re-draw gaps with this CV (None: keep)


@dataclass(frozen=True, slots=True)
class SloConfig:
    ttft_scale: float = 5.0  # × the request's TTFT on an idle, running instance
    tpot_scale: float = 5.0
    ttft_s: float | None = None  # absolute bounds replace the scaled ones when set
    tpot_s: float | None = None
    failed_ttft_s: float = 999.0  # TTFT charged to a failed request (the reference's convention)


@dataclass(frozen=True, slots=True)
class Experiment:
    name: str
    seed: int
    cluster: ClusterConfig
    models: list[ModelEntry]
    workload: WorkloadConfig
    slo: SloConfig = field(default_factory=SloConfig)
    policies: list[str] = field(default_factory=lambda: ["warmserve"])
    control: ControlConfig = field(default_factory=ControlConfig)
    costs: StartupCosts = field(default_factory=StartupCosts)
    latency: LatencyParams = field(default_factory=LatencyParams)
    sweep: dict[str, list[Any]] | None = None  # e.g. {"rps": [0.5, 1, 2]}, {"costs.X": [2, 10]}
    base_dir: Path = Path()
    profile: DeviceProfile | None = None  # the profile `costs` and `latency` start from

    @property
    def gpu(self) -> GpuSpec:
        assert self.profile is not None, "experiments are built by parse_experiment"
        return self.profile.device

    @property
    def pool_pages(self) -> int:
        return int(self.gpu.memory_bytes * self.cluster.pool_fraction) // PAGE_BYTES

    def served_models(self) -> list[tuple[str, ModelSpec, ModelEntry]]:
        """(served name, spec, entry) for every model and virtual copy, in popularity order."""
        out = []
        for e in self.models:
            spec = self._spec(e)
            names = [e.name] if e.copies == 1 else [f"{e.name}-{k}" for k in range(e.copies)]
            out += [(n, spec, e) for n in names]
        return out

    def _spec(self, e: ModelEntry) -> ModelSpec:
        if e.preset is not None:
            spec = MODEL_PRESETS[e.preset]
        else:
            assert e.config is not None
            path = self.base_dir / e.config
            try:
                spec = spec_from_hf_config(e.name, read_hf_config(path))
            except OSError as err:
                raise ExperimentError(
                    f"model {e.name!r}: cannot read {path}: {err.strerror}"
                ) from None
            except (json.JSONDecodeError, ModelSpecError) as err:
                raise ExperimentError(f"model {e.name!r}: {path}: {err}") from None
        if e.max_model_len is not None:
            spec = dataclasses.replace(spec, max_model_len=e.max_model_len)
        return spec


# ----- parsing ----------------------------------------------------------------------------
def convert_value(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return convert_value(value, args[0], where)
    if origin is list:
        if not isinstance(value, list):
            raise ExperimentError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [convert_value(v, item, f"{where}[{k}]") for k, v in enumerate(value)]
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise ExperimentError(f"{where}: expected one of {typing.get_args(tp)}, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ExperimentError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ExperimentError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ExperimentError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ExperimentError(f"{where}: expected a string, got {value!r}")
        return value
    raise ExperimentError(f"{where}: unsupported setting")  # pragma: no cover


def build_section(
    cls: Any, data: Any, where: str, skip: tuple[str, ...] = (), base: Any = None
) -> Any:
    """`cls` from a mapping; with `base`, keys not given keep `base`'s values."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ExperimentError(f"{where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in skip}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ExperimentError(
            f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(fields))})"
        )
    kwargs = {k: convert_value(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    if base is not None:
        kwargs = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)} | kwargs
    missing = [
        n
        for n, f in fields.items()
        if n not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ExperimentError(f"{where}: missing key {missing[0]!r}")
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise ExperimentError(f"{where}: {e}") from None


_TOP = {"name", "seed", "cluster", "models", "workload", "slo", "policies", "control", "costs",
        "latency", "sweep"}  # fmt: skip


def read_yaml(path: Path, error: type[ExperimentError] = ExperimentError) -> Any:
    """A YAML file's content; unreadable or invalid files raise `error` with one line."""
    try:
        return yaml.safe_load(path.read_text())
    except OSError as e:
        raise error(f"cannot read {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise error(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None


def load_experiment(path: Path) -> Experiment:
    return parse_experiment(read_yaml(path), path.parent, path.stem)


def parse_experiment(
    raw: Any, base_dir: Path, default_name: str = "experiment", profile: DeviceProfile | None = None
) -> Experiment:
    """An experiment from its YAML mapping; `profile`, if given, replaces the one `cluster`
    names (a caller that adjusted a loaded profile: sim/from_serve.py)."""
    if not isinstance(raw, dict):
        raise ExperimentError("experiment file must be a YAML mapping")
    unknown = sorted(set(raw) - _TOP)
    if unknown:
        raise ExperimentError(f"unknown key {unknown[0]!r} (known: {', '.join(sorted(_TOP))})")
    if not raw.get("models"):
        raise ExperimentError("models: at least one model is required")
    if not isinstance(raw["models"], list):
        raise ExperimentError("models: expected a list")
    cluster = build_section(ClusterConfig, raw.get("cluster"), "cluster")
    profile = profile or _profile(cluster, base_dir)
    exp = Experiment(
        name=convert_value(raw.get("name", default_name), str, "name"),
        seed=convert_value(raw.get("seed", 0), int, "seed"),
        cluster=cluster,
        models=[build_section(ModelEntry, m, f"models[{k}]") for k, m in enumerate(raw["models"])],
        workload=build_section(WorkloadConfig, raw.get("workload"), "workload"),
        slo=build_section(SloConfig, raw.get("slo"), "slo"),
        policies=convert_value(raw.get("policies", ["warmserve"]), list[str], "policies"),
        control=build_section(ControlConfig, raw.get("control"), "control"),
        costs=build_section(StartupCosts, raw.get("costs"), "costs", base=profile.costs),
        latency=build_section(LatencyParams, raw.get("latency"), "latency", base=profile.latency),
        sweep=_parse_sweep(raw.get("sweep")),
        base_dir=base_dir,
        profile=profile,
    )
    validate(exp)
    check_shared_settings(exp)
    return exp


# Sections some of whose keys only some policies read, with what each registered policy reads.
SETTING_READERS: dict[str, Callable[[str], frozenset[str]]] = {
    "control": control_reads,
    "costs": costs_read,
}


def unread_settings(exp: Experiment, policies: list[str]) -> dict[str, dict[str, list[str]]]:
    """Per section of SETTING_READERS, the keys `exp` changes (from the defaults; costs from
    the device profile's) that none of `policies` reads, each with the policies that do."""
    assert exp.profile is not None, "experiments are built by parse_experiment"
    bases = {"control": ControlConfig(), "costs": exp.profile.costs}
    return {
        section: unread_keys(getattr(exp, section), bases[section], policies, reads)
        for section, reads in SETTING_READERS.items()
    }


def unread_sweep_message(key: str, policies: list[str], where: str) -> str | None:
    """The error for a sweep over a SETTING_READERS key (`control.X`) none of `policies`
    reads, or None; `where`: how the user wrote the sweep ("sweep.", "--sweep ")."""
    section, _, name = key.partition(".")
    reads = SETTING_READERS.get(section)
    if reads is None or any(name in reads(p) for p in policies):
        return None
    readers = [p for p in POLICIES if name in reads(p)]
    return unread_message(name, policies, readers, f"{where}{section}.")


def check_shared_settings(exp: Experiment) -> None:
    """The file's control settings, costs, sweep and model priorities are shared by its
    policies: each must matter to one of them. A run of fewer policies (`--policies`) says
    which no longer do (cli.py), and its sweep points are not checked again."""
    for section, unread in unread_settings(exp, exp.policies).items():
        message = first_unread_message(unread, exp.policies, f"{section}.")
        if message:
            raise ExperimentError(message)
    if exp.sweep:
        message = unread_sweep_message(next(iter(exp.sweep)), exp.policies, "sweep.")
        if message:
            raise ExperimentError(message)
    unused = unused_priorities(exp, exp.policies)
    if unused:
        raise ExperimentError(
            f"model {unused[0]!r}: priority is used only by policies that prewarm by priors "
            f"(warmserve-plus); none of {', '.join(exp.policies)} does"
        )


def unused_priorities(exp: Experiment, policies: list[str]) -> list[str]:
    """The models whose `priority` none of `policies` reads (none prewarms by priors)."""
    if any(POLICIES[p].spec.prior_prewarm for p in policies):
        return []
    return [e.name for e in exp.models if e.priority != 1.0]


def _profile(c: ClusterConfig, base_dir: Path) -> DeviceProfile:
    """The cluster's device profile: `profile`, or the shipped one the older `gpu` names."""
    if c.profile is not None and c.gpu is not None:
        raise ExperimentError("cluster: give profile or gpu, not both")
    if c.gpu is not None:
        if c.gpu not in LEGACY_GPU_NAMES:
            raise ExperimentError(
                f"cluster.gpu: unknown GPU {c.gpu!r} (known: {', '.join(LEGACY_GPU_NAMES)}; "
                "or use cluster.profile)"
            )
        ref = LEGACY_GPU_NAMES[c.gpu]
    else:
        ref = c.profile or "h100-sxm-80g"
    try:
        return load_profile(ref, base_dir)
    except ProfileError as e:
        raise ExperimentError(f"cluster.profile: {e}") from None


def _parse_sweep(raw: Any) -> dict[str, list[float]] | None:
    if raw is None:
        return None
    if not isinstance(raw, dict) or len(raw) != 1:
        raise ExperimentError("sweep: expected one key, e.g. {rps: [0.5, 1, 2]}")
    ((key, values),) = raw.items()
    if isinstance(key, str) and "." in key:
        # Any setting by its dotted key (costs.X, control.X, ...): `warmserve simulate` checks
        # the key and each value as `--set` would.
        if not isinstance(values, list) or not values:
            raise ExperimentError(f"sweep.{key}: expected a list of values")
        return {key: values}
    if key not in ("rps", "alpha", "burstiness_cv"):
        raise ExperimentError(
            f"sweep: cannot sweep {key!r} (rps, alpha, burstiness_cv or a dotted key such as "
            "costs.serverless_engine_init_s; seeds: --seeds)"
        )
    points = convert_value(values, list[float], f"sweep.{key}")
    if not points or min(points) <= 0:
        raise ExperimentError(f"sweep.{key}: give at least one positive value")
    return {key: sorted(set(points))}


def validate(exp: Experiment) -> None:
    c = exp.cluster
    if c.nodes < 1 or c.gpus_per_node < 1:
        raise ExperimentError("cluster: nodes and gpus_per_node must be >= 1")
    if not 0 < c.pool_fraction <= 1:
        raise ExperimentError("cluster.pool_fraction must be in (0, 1]")
    for p in exp.policies:
        if p not in POLICIES:
            raise ExperimentError(f"unknown policy {p!r} (known: {', '.join(POLICIES)})")
    seen: set[str] = set()
    for e in exp.models:
        if (e.preset is None) == (e.config is None):
            raise ExperimentError(f"model {e.name!r}: give exactly one of preset or config")
        if e.preset is not None and e.preset not in MODEL_PRESETS:
            raise ExperimentError(
                f"model {e.name!r}: unknown preset {e.preset!r} (known: {', '.join(MODEL_PRESETS)})"
            )
        if not 1 <= e.tp <= c.gpus_per_node:
            raise ExperimentError(
                f"model {e.name!r}: tp {e.tp} needs 1..{c.gpus_per_node} GPUs of one node"
            )
        if e.copies < 1:
            raise ExperimentError(f"model {e.name!r}: copies must be >= 1")
        if not e.priority > 0:
            raise ExperimentError(f"model {e.name!r}: priority must be > 0")
    w = exp.workload
    if w.rps <= 0 or w.duration_s <= 0 or w.drain_s < 0 or w.warmup_s < 0:
        raise ExperimentError("workload: rps and duration_s must be > 0; drain_s, warmup_s >= 0")
    if w.burstiness_cv is not None and w.burstiness_cv <= 0:
        raise ExperimentError("workload.burstiness_cv must be > 0")
    if w.min_output_tokens < 1 or w.max_output_tokens < w.min_output_tokens:
        raise ExperimentError("workload: need 1 <= min_output_tokens <= max_output_tokens")
    trace = parse_trace_name(w.trace)
    if trace is None:
        raise ExperimentError(f"workload.trace: {w.trace!r} is not {TRACE_NAMES}")
    if trace.kind == "servegen" and w.days and not 0 <= w.days[0] <= 13:
        raise ExperimentError("workload.days: a ServeGen replay day must be in 0..13")
    for name, spec, e in exp.served_models():
        if name in seen:
            raise ExperimentError(f"model name {name!r} is used twice")
        seen.add(name)
        shard = pages_for(spec.shard_bytes(e.tp))
        kv_floor = pages_for(spec.max_model_len * spec.kv_bytes_per_token_per_gpu(e.tp))
        if shard + kv_floor > exp.pool_pages:
            gib = exp.pool_pages * PAGE_BYTES / 2**30
            raise ExperimentError(
                f"model {name!r} cannot be placed: {shard * 2} MiB of weights per GPU at TP "
                f"{e.tp} plus KV for one {spec.max_model_len}-token request exceed the "
                f"{gib:.1f} GiB pool of a {exp.gpu.name}"
            )
        if w.max_input_tokens + w.min_output_tokens > spec.max_model_len:
            raise ExperimentError(
                f"model {name!r}: max_input_tokens + min_output_tokens exceed max_model_len "
                f"{spec.max_model_len}"
            )
