"""Identifiers and small enums shared by the control plane and its drivers."""

from __future__ import annotations

from enum import StrEnum
from typing import NewType

ModelName = NewType("ModelName", str)
GpuId = int
InstanceId = int
ReplicaId = int
RequestId = int


class InstanceState(StrEnum):
    STARTING = "starting"  # workers chosen; weights loading or engine attaching
    RUNNING = "running"
    STOPPING = "stopping"  # out of routing, draining; becomes a prewarmed replica when empty


class StartPath(StrEnum):
    """How an instance got its weights (the reference's worker-choice order)."""

    PREWARM_HIT = "prewarm_hit"  # a finished prewarmed replica on free GPUs
    INPROGRESS_HIT = "inprogress_hit"  # a replica still loading on free GPUs
    COLD = "cold"  # nothing resident: weights are loaded on the critical path
