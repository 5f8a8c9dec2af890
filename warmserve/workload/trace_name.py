"""What a workload's `trace` names: `azure-conv`, `azure-code`, `servegen:MODEL` or `FILE.csv`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

TRACE_NAMES = "azure-conv, azure-code, servegen:MODEL or a .csv file"


@dataclass(frozen=True, slots=True)
class TraceName:
    kind: Literal["azure", "servegen", "csv"]
    arg: str  # the Azure service, the ServeGen model, or the CSV path


def parse_trace_name(name: str) -> TraceName | None:
    """The decoded name, or None when it names no known trace (callers word the error)."""
    if name in ("azure-conv", "azure-code"):
        return TraceName("azure", name.removeprefix("azure-"))
    if name.startswith("servegen:"):
        return TraceName("servegen", name.removeprefix("servegen:"))
    if name.endswith(".csv"):
        return TraceName("csv", name)
    return None
