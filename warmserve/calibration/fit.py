"""Fit the simulator's step-time model (`warmserve/sim/latency.py`) to measured steps.

At TP 1 the model says a step takes

    t = step_overhead + layers · layer_overhead + seqs · seq_overhead + max(bytes / B, flops / F)

where, for the step's model and batch, `bytes` is the weights plus the KV read and `flops` the
matmuls plus attention, both exactly as `StepTimeModel` counts them, and B and F are the
achieved memory bandwidth and FLOP/s. Which side of the max is active depends only on the
step's arithmetic intensity flops/bytes against F/B, so over the samples sorted by intensity
it is a threshold: below it memory-bound, above it compute-bound. For each threshold the fit
is linear (least squares on relative error, so short and long steps count alike); the best
threshold wins. Exact on noise-free data from the model itself (tests/test_calibration.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from warmserve.hardware import GpuSpec
from warmserve.model_spec import ModelSpec
from warmserve.sim.latency import LatencyParams, StepTimeModel


@dataclass(frozen=True, slots=True)
class StepSample:
    """One measured engine step of one model at TP 1."""

    model: str
    kind: Literal["prefill", "decode"]
    batch: int  # sequences in the step
    tokens: int  # prefill: prompt tokens in all; decode: = batch
    ctx: float  # prefill: Σ len² of the prompts; decode: Σ context lengths
    seconds: float


@dataclass(frozen=True, slots=True)
class StepFit:
    latency: LatencyParams
    bandwidth: float  # achieved bytes/s (B)
    flops: float  # achieved FLOP/s (F)
    layer_term: bool  # False when every sample had the same layer count (overheads merged)
    rel_errors: tuple[float, ...]  # (model − measured) / measured, per sample

    @property
    def mean_abs_rel_error(self) -> float:
        return float(np.mean(np.abs(self.rel_errors)))

    @property
    def max_abs_rel_error(self) -> float:
        return float(np.max(np.abs(self.rel_errors)))


def _features(s: StepSample, spec: ModelSpec) -> tuple[float, float, float]:
    """(bytes, flops, layers) of a step, as StepTimeModel counts them at TP 1."""
    kv = spec.kv_bytes_per_token_per_gpu(1)
    attn = 4.0 * spec.num_layers * spec.hidden_size
    if s.kind == "prefill":
        return (spec.shard_bytes(1) + kv * s.tokens,
                2.0 * spec.num_params * s.tokens + attn * s.ctx / 2.0, spec.num_layers)  # fmt: skip
    return (spec.shard_bytes(1) + kv * s.ctx,
            2.0 * spec.num_params * s.batch + attn * s.ctx, spec.num_layers)  # fmt: skip


def fit_step_model(
    samples: Sequence[StepSample], specs: dict[str, ModelSpec], device: GpuSpec
) -> StepFit:
    """Fit overheads, B and F; express B and F as efficiencies of `device`'s peaks."""
    if len(samples) < 4:
        raise ValueError("need at least 4 step samples to fit the step-time model")
    feats = np.array([_features(s, specs[s.model]) for s in samples], dtype=np.float64)
    t = np.array([s.seconds for s in samples], dtype=np.float64)
    if np.any(t <= 0):
        raise ValueError("step times must be > 0")
    mem, flop, layers = feats.T
    seqs = np.array([s.batch for s in samples], dtype=np.float64)
    layer_term = len(set(layers.tolist())) > 1
    # Overhead columns: per step, per layer (only if layer counts differ), per sequence.
    over = [np.ones_like(t)] + ([layers] if layer_term else []) + [seqs]
    order = np.argsort(flop / mem, kind="stable")
    best: tuple[float, np.ndarray] | None = None
    w = 1.0 / t  # relative least squares
    for k in range(len(t) + 1):
        compute = np.zeros(len(t), dtype=bool)
        compute[order[k:]] = True
        a = np.stack([*over, np.where(compute, 0.0, mem), np.where(compute, flop, 0.0)], axis=1)
        coef = _solve(a, t, w, len(over))
        coef = _complete(coef, mem, flop, compute)
        if coef is None:
            continue
        err = (a[:, : len(over)] @ coef[: len(over)]
               + np.maximum(coef[-2] * mem, coef[-1] * flop)) / t - 1.0  # fmt: skip
        score = float(np.sum(err**2))
        if best is None or score < best[0] - 1e-15:
            best = (score, coef)
    if best is None:
        raise ValueError("no physical fit (positive bandwidth and FLOP/s) for these samples")
    coef = best[1]
    inv_b, inv_f = coef[-2], coef[-1]
    bw, fl = float(1.0 / inv_b), float(1.0 / inv_f)
    params = LatencyParams(
        flops_efficiency=float(fl / device.peak_flops),
        bandwidth_efficiency=float(bw / device.hbm_bandwidth),
        step_overhead_s=float(coef[0]),
        layer_overhead_s=float(coef[1]) if layer_term else 0.0,
        allreduce_latency_s=LatencyParams().allreduce_latency_s,
        seq_overhead_s=float(coef[len(over) - 1]),
    )
    errs = tuple(
        float(predict(s, specs[s.model], device, params) / s.seconds - 1.0) for s in samples
    )
    return StepFit(params, bw, fl, layer_term, errs)


def _solve(a: np.ndarray, t: np.ndarray, w: np.ndarray, num_over: int) -> np.ndarray:
    """Weighted least squares with the overheads held >= 0: a negative one is dropped (set
    to 0) and the rest refitted. A regime without samples leaves its column all zero: its
    coefficient stays 0 here and `_complete` bounds it."""
    active = [j for j in range(a.shape[1]) if np.any(a[:, j])]
    coef = np.zeros(a.shape[1])
    for _ in range(num_over + 1):
        sol, *_ = np.linalg.lstsq(a[:, active] * w[:, None], t * w, rcond=None)
        coef = np.zeros(a.shape[1])
        coef[active] = sol
        negative = [j for j in active if j < num_over and coef[j] < 0]
        if not negative:
            break
        active = [j for j in active if j not in negative]
    return coef


def _complete(coef, mem, flop, compute) -> np.ndarray | None:
    """Give a regime with no samples the least coefficient that keeps every sample in the
    other one; reject unphysical fits (non-positive B or F)."""
    inv_b, inv_f = coef[-2], coef[-1]
    if not compute.any():
        inv_f = float(np.min(inv_b * mem / flop))
    if compute.all():
        inv_b = float(np.min(inv_f * flop / mem))
    if inv_b <= 0 or inv_f <= 0:
        return None
    coef = coef.copy()
    coef[-2], coef[-1] = inv_b, inv_f
    return coef


def predict(s: StepSample, spec: ModelSpec, device: GpuSpec, params: LatencyParams) -> float:
    """The simulator's own step time for a sample (StepTimeModel, TP 1)."""
    m = StepTimeModel(spec, 1, device, params)
    if s.kind == "prefill":
        return m.prefill(s.tokens, s.ctx, s.batch)
    return m.decode(s.batch, s.ctx)


def fit_bandwidth(sizes: Sequence[float], seconds: Sequence[float]) -> tuple[float, float]:
    """Bytes/s and fixed seconds of loads `t = fixed + bytes / bw` by least squares; with one
    size, or a negative intercept, the line goes through the origin."""
    x = np.asarray(sizes, dtype=np.float64)
    y = np.asarray(seconds, dtype=np.float64)
    if len(set(x.tolist())) > 1:
        slope, fixed = np.polyfit(x, y, 1)
        if slope > 0 and fixed >= 0:
            return float(1.0 / slope), float(fixed)
    return float(np.sum(x * x) / np.sum(x * y)), 0.0
