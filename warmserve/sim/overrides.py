"""Dotted-key overrides of an experiment (`--set costs.engine_attach_s=0.1`, `--sweep`), and
seed lists (`--seeds 1-5`).

One mechanism with the experiment file: a profile gives `costs:` and `latency:`, the file's
sections override single values, and an override here replaces one value of the parsed
experiment the same way (the section's dataclass checks it again), so `--set costs.X=V`
means exactly what `costs: {X: V}` in the file means.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any

import yaml

from warmserve.experiment import Experiment, ExperimentError, convert_value, validate

# Sections a dotted key may name; `cluster` only for its sizes (a profile is read at parse
# time, and its costs and latency are merged then: change the file instead).
SECTIONS = ("workload", "control", "costs", "latency", "slo", "cluster")
TOP_KEYS = ("seed",)
CLUSTER_KEYS = ("nodes", "gpus_per_node", "pool_fraction")
# The older sweep keys, short for workload.KEY.
WORKLOAD_SHORT = ("rps", "alpha", "burstiness_cv")


def canonical_key(key: str) -> str:
    """`rps` -> `workload.rps`; dotted keys as given (checked by `get_value`)."""
    key = key.strip()
    return f"workload.{key}" if key in WORKLOAD_SHORT else key


def _split(exp: Experiment, key: str, where: str) -> tuple[str | None, str, Any]:
    """(section or None, field, the field's type) of a dotted key; one-line errors."""
    if key in TOP_KEYS:
        return None, key, int
    section, dot, field = key.partition(".")
    if not dot or section not in SECTIONS:
        known = ", ".join(f"{s}.KEY" for s in SECTIONS)
        raise ExperimentError(f"{where}: {key!r} is not a setting ({known}, or seed)")
    if section == "cluster" and field not in CLUSTER_KEYS:
        raise ExperimentError(
            f"{where}: cluster.{field} cannot be overridden (only {', '.join(CLUSTER_KEYS)}; "
            "a profile is read with the file: edit it there)"
        )
    obj = getattr(exp, section)
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    if field not in names:
        raise ExperimentError(
            f"{where}: unknown key {key!r} (known in {section}: {', '.join(sorted(names))})"
        )
    return section, field, hints[field]


def get_value(exp: Experiment, key: str, where: str = "--set") -> Any:
    section, field, _ = _split(exp, key, where)
    return getattr(exp if section is None else getattr(exp, section), field)


def set_value(exp: Experiment, key: str, value: Any, where: str = "--set") -> Experiment:
    """The experiment with one value replaced, checked as the file's value would be."""
    section, field, tp = _split(exp, key, where)
    value = convert_value(value, tp, f"{where} {key}")
    try:
        if section is None:
            out = dataclasses.replace(exp, **{field: value})
        else:
            new = dataclasses.replace(getattr(exp, section), **{field: value})
            out = dataclasses.replace(exp, **{section: new})
    except ValueError as e:
        raise ExperimentError(f"{where} {key}: {e}") from None
    validate(out)
    return out


def parse_scalar(text: str) -> Any:
    """A value as YAML reads it: 2 -> int, 2.5 -> float, null -> None, else the string."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_set(text: str) -> tuple[str, Any]:
    """`costs.engine_attach_s=0.1` -> ("costs.engine_attach_s", 0.1)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip() or not value.strip():
        raise ExperimentError(f"--set: expected KEY=VALUE, got {text!r}")
    return canonical_key(key), parse_scalar(value.strip())


def apply_sets(exp: Experiment, items: list[str] | None) -> Experiment:
    for text in items or []:
        key, value = parse_set(text)
        exp = set_value(exp, key, value)
    return exp


def parse_seeds(text: str) -> list[int]:
    """`1-5` -> [1, 2, 3, 4, 5]; `1,2,7` -> [1, 2, 7]; `1-3,9` too."""
    seeds: list[int] = []
    try:
        for part in (p.strip() for p in text.split(",")):
            if not part:
                continue
            lo, dash, hi = part.partition("-")
            if dash:
                a, b = int(lo), int(hi)
                if b < a:
                    raise ValueError
                seeds += range(a, b + 1)
            else:
                seeds.append(int(part))
    except ValueError:
        raise ExperimentError(f"--seeds: expected e.g. 1-5 or 1,2,3, got {text!r}") from None
    if not seeds:
        raise ExperimentError("--seeds: give at least one seed")
    return list(dict.fromkeys(seeds))


def spread(values: list[float | None]) -> dict[str, Any]:
    """Mean and min-max of one metric over seeds (None where a run has no value)."""
    xs = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return {
        "mean": sum(xs) / len(xs) if xs else None,
        "min": min(xs) if xs else None,
        "max": max(xs) if xs else None,
        "values": values,
    }
