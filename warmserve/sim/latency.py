"""Roofline step-time model for one instance (a model at some TP on some GPU type).

A step reads the weight shard and the batch's KV from HBM and does 2·params/tp FLOPs per token
plus attention; it takes the larger of the memory and compute times, plus fixed per-step costs
(scheduler and sampling, eager-mode kernel launches per layer) and tensor-parallel all-reduces.
Calibration (see docs/simulator.md): the efficiency factors and overheads below put an idle
instance within ±35% of the reference system's service-time constants (7B: 35 ms prefill,
15 ms/token; 13B TP2: 70/20; 70B TP4: 100/30), checked in tests/test_latency.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from warmserve.hardware import GpuSpec
from warmserve.model_spec import ModelSpec


@dataclass(frozen=True, slots=True)
class LatencyParams:
    flops_efficiency: float = 0.5  # achieved / peak dense FLOP/s (prefill MFU)
    bandwidth_efficiency: float = 0.7  # achieved / peak HBM bandwidth
    step_overhead_s: float = 0.002  # scheduling, sampling, Python per step
    layer_overhead_s: float = 0.00018  # eager kernel launches per layer per step
    allreduce_latency_s: float = 0.00002  # per all-reduce, NVLink
    # Per sequence per step: host work that grows with the batch (block tables, sampling,
    # per-sequence attention calls). Zero in the GPU profiles (the reference's constants do
    # not separate it); `warmserve calibrate` fits it, and on a CPU it is large.
    seq_overhead_s: float = 0.0


# The most contexts a model's table of memory times holds (2 MiB): runs whose contexts reach
# beyond it are computed directly.
_MEM_TABLE_MAX = 1 << 18


class StepTimeModel:
    """Seconds per prefill or decode step; constants folded once at construction."""

    __slots__ = (
        "_attn",
        "_comm_tok",
        "_fixed",
        "_flop_tok",
        "_kv_over_attn",
        "_kv_tok",
        "_mem_by_ctx",
        "_seq",
        "_weights",
    )

    def __init__(self, spec: ModelSpec, tp: int, gpu: GpuSpec, p: LatencyParams) -> None:
        bw = gpu.hbm_bandwidth * p.bandwidth_efficiency
        flops = gpu.peak_flops * p.flops_efficiency
        self._weights = spec.shard_bytes(tp) / bw
        self._kv_tok = spec.kv_bytes_per_token_per_gpu(tp) / bw
        self._flop_tok = 2.0 * spec.num_params / tp / flops
        # QK^T and AV: 4·layers·(heads·head_dim) FLOPs per (query, key) pair, split over TP.
        self._attn = 4.0 * spec.num_layers * spec.hidden_size / tp / flops
        self._fixed = p.step_overhead_s + spec.num_layers * p.layer_overhead_s
        self._seq = p.seq_overhead_s
        self._comm_tok = 0.0
        if tp > 1:
            self._fixed += 2 * spec.num_layers * p.allreduce_latency_s
            ring = 2.0 * (tp - 1) / tp  # ring all-reduce traffic factor
            act_bytes = spec.hidden_size * spec.dtype_bytes
            self._comm_tok = 2 * spec.num_layers * act_bytes * ring / gpu.nvlink_bandwidth
        # A context token costs at least as much memory time as attention time (always so on
        # GPUs): decode_run may then skip the compute branch, see there.
        self._kv_over_attn = self._kv_tok >= self._attn >= 0.0
        # fl(fl(c·kv_tok) + weights) for every integral context c below its length: a
        # memory-bound run's step times before the per-step constants (`decode_run`).
        self._mem_by_ctx = np.empty(0)

    def decode(self, batch: int, ctx_sum: float) -> float:
        mem = self._weights + self._kv_tok * ctx_sum
        comp = self._flop_tok * batch + self._attn * ctx_sum
        return self._fixed + self._seq * batch + max(mem, comp) + self._comm_tok * batch

    def decode_run(self, batch: int, ctx_sum: float, steps: int) -> np.ndarray:
        """Cumulative end times of `steps` decode steps; the context grows by `batch` a step."""
        # In place, one operation at a time in the order of `decode` (IEEE + and * commute, so
        # every step time is bit-identical to it): a run is computed at every batch change.
        # Contexts are token counts: for an integral ctx_sum every one is an exact integer,
        # and arange's start + i·step gives the same doubles as i·batch + ctx_sum, in one call.
        flop = self._flop_tok * batch
        end = ctx_sum + batch * steps
        memory_bound = self._kv_over_attn and self._weights >= flop
        if memory_bound and ctx_sum.is_integer() and ctx_sum >= 0.0 and end <= _MEM_TABLE_MAX:
            # Integral contexts: each step's memory time is the table's entry for its context,
            # the same doubles as computed below, read as a strided slice (copied: it is
            # added to in place).
            table = self._mem_by_ctx
            if end > len(table):
                table = self._mem_table(int(end))
            mem = table[int(ctx_sum) : int(end) : batch].copy()
        else:
            if ctx_sum.is_integer():
                ctx = np.arange(ctx_sum, end, batch, dtype=np.float64)
            else:
                ctx = np.arange(steps, dtype=np.float64)
                ctx *= batch
                ctx += ctx_sum
            if memory_bound:
                # Memory-bound at every step, exactly: ctx ≥ 0 and kv_tok ≥ attn give
                # fl(ctx·kv_tok) ≥ fl(ctx·attn), and weights ≥ fl(flop_tok·batch) then gives
                # mem ≥ comp after the addition (rounding is monotone), so the maximum is mem.
                ctx *= self._kv_tok
                ctx += self._weights
                mem = ctx
            else:
                mem = ctx * self._kv_tok
                mem += self._weights
                ctx *= self._attn
                ctx += flop
                np.maximum(mem, ctx, out=mem)
        mem += self._fixed + self._seq * batch
        comm = self._comm_tok * batch
        if comm != 0.0:  # adding 0.0 leaves every (positive) step time as it is
            mem += comm
        return np.add.accumulate(mem, out=mem)

    def _mem_table(self, length: int) -> np.ndarray:
        """`_mem_by_ctx` grown to at least `length` contexts (doubling, up to the cap)."""
        n = min(_MEM_TABLE_MAX, max(length, 2 * len(self._mem_by_ctx), 1024))
        table = np.arange(n, dtype=np.float64)
        table *= self._kv_tok
        table += self._weights
        self._mem_by_ctx = table
        return table

    def prefill(self, num_tokens: int, sum_sq_tokens: float, num_seqs: int = 1) -> float:
        """A prefill step over `num_seqs` prompts with `num_tokens` in all and
        Σ len² = `sum_sq_tokens`."""
        mem = self._weights + self._kv_tok * num_tokens
        comp = self._flop_tok * num_tokens + self._attn * sum_sq_tokens / 2.0
        return self._fixed + self._seq * num_seqs + max(mem, comp) + self._comm_tok * num_tokens

    def isolated_service_s(self, inp: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Per request, prefill alone then one decode step per further token (batch of one),
        at the context halfway through the output: the request's service time on an idle
        instance. Vectorised; used for forecast history and ideal windows."""
        n = inp.astype(np.float64)
        pre_mem = self._weights + self._kv_tok * n
        pre_comp = self._flop_tok * n + self._attn * n * n / 2.0
        fixed = self._fixed + self._seq
        prefill = fixed + np.maximum(pre_mem, pre_comp) + self._comm_tok * n
        ctx = n + out / 2.0
        dec = fixed + np.maximum(
            self._weights + self._kv_tok * ctx, self._flop_tok + self._attn * ctx
        )
        return prefill + np.maximum(out - 1, 0) * (dec + self._comm_tok)

    def isolated_ttft(self, input_tokens: int) -> float:
        return self.prefill(input_tokens, float(input_tokens) ** 2)

    def isolated_tpot(self, input_tokens: int, output_tokens: int) -> float:
        mid_ctx = input_tokens + output_tokens / 2.0
        return self.decode(1, mid_ctx)
