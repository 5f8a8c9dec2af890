"""Device profiles: one YAML file holds what the simulator assumes about a kind of device.

A profile has three sections, each a frozen dataclass the simulator already takes:

- `device` (`GpuSpec`): memory, peak FLOP/s, memory and host-to-device bandwidth, NVLink;
- `latency` (`LatencyParams`): the step-time model's coefficients (efficiencies, overheads);
- `costs` (`StartupCosts`): engine attach, KV mapping, load bandwidths, cold engine start;
- `host` (`HostParams`, only with `shared_host: true`): the cores the devices and the gateway
  share, and the gateway's CPU cost per streamed token (warmserve/sim/host.py).

Experiments name a shipped profile (`cluster: {profile: h100-sxm-80g}`) or give a path to
one (relative to the experiment file); `warmserve calibrate` writes one measured on the
machine it runs on. Shipped profiles live in `warmserve/data/profiles/`, each number with its
source in a comment.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass
from dataclasses import field as dc_field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from warmserve.hardware import GpuSpec
from warmserve.sim.costs import StartupCosts
from warmserve.sim.host import HostParams
from warmserve.sim.latency import LatencyParams


class ProfileError(ValueError):
    """A profile that cannot be found or read, phrased for a one-line CLI error."""


@dataclass(frozen=True, slots=True)
class DeviceProfile:
    name: str
    device: GpuSpec
    latency: LatencyParams
    costs: StartupCosts
    # Devices that share one host's cores (a CPU "device" is the host): the simulator may
    # charge them for contention. False for GPUs, which run independently.
    shared_host: bool = False
    description: str = ""
    host: HostParams = dc_field(default_factory=HostParams)  # read only with shared_host

    @property
    def host_params(self) -> HostParams | None:
        """The shared host the simulator models, or None for independent devices."""
        return self.host if self.shared_host else None


# The names the old `cluster.gpu` key took, and the shipped profile each now means.
LEGACY_GPU_NAMES = {"H100-SXM-80G": "h100-sxm-80g", "A100-80G": "a100-80g"}
_SECTIONS = {"name", "description", "shared_host", "device", "latency", "costs", "host"}


def shipped_profiles() -> list[str]:
    """Names of the profiles shipped with WarmServe."""
    root = resources.files("warmserve.data") / "profiles"
    return sorted(p.name.removesuffix(".yaml") for p in root.iterdir() if p.name.endswith(".yaml"))


def resolve_profile_path(ref: str, base_dir: Path = Path()) -> Path:
    """A shipped profile's file for a bare name, else a path (relative to `base_dir`)."""
    if "/" not in ref and not ref.endswith((".yaml", ".yml")):
        path = Path(str(resources.files("warmserve.data") / "profiles" / f"{ref}.yaml"))
        if not path.is_file():
            raise ProfileError(
                f"unknown profile {ref!r} (shipped: {', '.join(shipped_profiles())}; "
                "or give a path to a profile file)"
            )
        return path
    path = Path(ref).expanduser()
    return path if path.is_absolute() else base_dir / path


def load_profile(ref: str, base_dir: Path = Path()) -> DeviceProfile:
    """A shipped profile by name, or a profile file by path."""
    path = resolve_profile_path(ref, base_dir)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ProfileError(f"cannot read profile {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ProfileError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    return parse_profile(raw, str(path))


def parse_profile(raw: Any, where: str) -> DeviceProfile:
    if not isinstance(raw, dict):
        raise ProfileError(f"{where}: a profile must be a YAML mapping")
    unknown = sorted(set(raw) - _SECTIONS)
    if unknown:
        raise ProfileError(
            f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(_SECTIONS))})"
        )
    for key in ("name", "device"):
        if key not in raw:
            raise ProfileError(f"{where}: missing key {key!r}")
    name = raw["name"]
    if not isinstance(name, str) or not name:
        raise ProfileError(f"{where}: name must be a non-empty string")
    shared = raw.get("shared_host", False)
    if not isinstance(shared, bool):
        raise ProfileError(f"{where}: shared_host must be true or false")
    device = _section(GpuSpec, {"name": name, **_mapping(raw["device"], where, "device")},
                      where, "device")  # fmt: skip
    for field in ("peak_flops", "hbm_bandwidth", "memory_bytes", "host_to_device_bandwidth",
                  "nvlink_bandwidth"):  # fmt: skip
        if getattr(device, field) <= 0:
            raise ProfileError(f"{where}: device.{field} must be > 0")
    latency = _section(LatencyParams, _mapping(raw.get("latency"), where, "latency"), where,
                       "latency")  # fmt: skip
    if not (latency.flops_efficiency > 0 and latency.bandwidth_efficiency > 0):
        raise ProfileError(f"{where}: latency efficiencies must be > 0")
    if min(latency.step_overhead_s, latency.layer_overhead_s, latency.allreduce_latency_s) < 0:
        raise ProfileError(f"{where}: latency overheads must be >= 0")
    costs = _section(StartupCosts, _mapping(raw.get("costs"), where, "costs"), where, "costs")
    if "host" in raw and not shared:
        raise ProfileError(f"{where}: a host: section needs shared_host: true")
    if shared and "host" not in raw:
        raise ProfileError(f"{where}: shared_host: true needs a host: section (cores, ...)")
    host = _section(HostParams, _mapping(raw.get("host"), where, "host"), where, "host")
    return DeviceProfile(name, device, latency, costs, shared, str(raw.get("description", "")),
                         host)  # fmt: skip


def _mapping(value: Any, where: str, key: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ProfileError(f"{where}: {key}: expected a mapping, got {value!r}")
    return value


def _section(cls: Any, data: dict[str, Any], where: str, key: str) -> Any:
    """`cls` from a mapping: unknown keys, missing keys and wrong types are one-line errors.
    Missing optional keys take the dataclass defaults (the H100 preset's values)."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.metadata.get("profile", True)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ProfileError(
            f"{where}: {key}: unknown key {unknown[0]!r} (known: {', '.join(sorted(fields))})"
        )
    kwargs: dict[str, Any] = {}
    for k, v in data.items():
        tp = hints[k]
        if tp is float and isinstance(v, int | float) and not isinstance(v, bool):
            v = float(v)
        elif tp is int and isinstance(v, float) and v.is_integer():
            v = int(v)
        elif typing.get_origin(tp) is typing.Literal:
            if v not in typing.get_args(tp):
                raise ProfileError(f"{where}: {key}.{k}: expected one of {typing.get_args(tp)}")
        elif not isinstance(v, tp) or isinstance(v, bool):
            raise ProfileError(f"{where}: {key}.{k}: expected {tp.__name__}, got {v!r}")
        kwargs[k] = v
    missing = [
        n
        for n, f in fields.items()
        if n not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ProfileError(f"{where}: {key}: missing key {missing[0]!r}")
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise ProfileError(f"{where}: {key}: {e}") from None


def _scalar(value: Any) -> str:
    """A YAML scalar that reads back to the same value; floats always with a dot (YAML 1.1
    reads `1e+10` as a string)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        text = repr(value)
        mant, _, exp = text.partition("e")
        if "." not in mant and mant not in ("inf", "-inf", "nan"):
            mant += ".0"
        return mant + (f"e{exp}" if exp else "")
    if isinstance(value, int):
        return str(value)
    return json.dumps(value)


def profile_yaml(profile: DeviceProfile, comments: dict[str, str] | None = None,
                 header: str = "") -> str:  # fmt: skip
    """A profile as YAML, with an optional comment after any `section.key` line."""
    comments = comments or {}
    lines = [f"# {h}" if h else "#" for h in header.splitlines()]
    lines.append(f"name: {profile.name}")
    if profile.description:
        lines.append(f"description: {json.dumps(profile.description)}")  # JSON is YAML
    lines.append(f"shared_host: {'true' if profile.shared_host else 'false'}")
    sections = ("device", "latency", "costs") + (("host",) if profile.shared_host else ())
    for section in sections:
        lines.append(f"{section}:")
        for f in dataclasses.fields(getattr(profile, section)):
            if (section == "device" and f.name == "name") or not f.metadata.get("profile", True):
                continue
            value = getattr(getattr(profile, section), f.name)
            note = comments.get(f"{section}.{f.name}")
            lines.append(f"  {f.name}: {_scalar(value)}" + (f"  # {note}" if note else ""))
    return "\n".join(lines) + "\n"
