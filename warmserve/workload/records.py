"""Per-request records of a run, their summary (the `summary.json` contract) and their rows
(`requests.csv`, the same columns from `warmserve simulate` and `warmserve bench`)."""

from __future__ import annotations

import csv
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from warmserve.frozen import quick_init
from warmserve.types import StartPath


@dataclass(slots=True)
class RequestLog:
    arrival_s: np.ndarray
    model_idx: np.ndarray
    output_tokens: np.ndarray
    ttft_slo_s: np.ndarray
    tpot_slo_s: np.ndarray
    first_token_s: np.ndarray
    finish_s: np.ndarray

    @classmethod
    def create(
        cls,
        arrival_s: np.ndarray,
        model_idx: np.ndarray,
        output_tokens: np.ndarray,
        ttft_slo_s: np.ndarray,
        tpot_slo_s: np.ndarray,
    ) -> RequestLog:
        n = len(arrival_s)
        return cls(
            arrival_s,
            model_idx,
            output_tokens,
            ttft_slo_s,
            tpot_slo_s,
            np.full(n, np.nan),
            np.full(n, np.nan),
        )


def _pct(x: np.ndarray, q: float) -> float | None:
    return float(np.percentile(x, q)) if len(x) else None


def _mean(x: np.ndarray) -> float | None:
    return float(np.mean(x)) if len(x) else None


def summarize_requests(
    log: RequestLog,
    mask: np.ndarray,
    starts: Sequence[StartPath],
    forecast_errors: Sequence[float],
    failed_ttft_s: float,
) -> dict[str, Any]:
    arrived = int(mask.sum())
    done = mask & ~np.isnan(log.finish_s)
    completed = int(done.sum())
    ttft = log.first_token_s - log.arrival_s
    # Failed requests are charged a fixed TTFT so that dropping work never improves a tail.
    ttft_all = np.where(done, ttft, failed_ttft_s)[mask]
    multi = done & (log.output_tokens > 1)
    tpot = (log.finish_s[multi] - log.first_token_s[multi]) / (log.output_tokens[multi] - 1)
    tpot_all = np.zeros(len(log.arrival_s))
    tpot_all[multi] = tpot
    ok = done & (ttft <= log.ttft_slo_s) & (tpot_all <= log.tpot_slo_s)
    if completed:
        span = float(np.nanmax(log.finish_s[done]) - np.min(log.arrival_s[mask]))
        throughput = completed / span if span > 0 else None
    else:
        throughput = 0.0
    return {
        "arrived": arrived,
        "completed": completed,
        "failed": arrived - completed,
        "ttft_mean_s": _mean(ttft_all),
        "ttft_p50_s": _pct(ttft_all, 50),
        "ttft_p90_s": _pct(ttft_all, 90),
        "ttft_p99_s": _pct(ttft_all, 99),
        "tpot_mean_s": _mean(tpot),
        "tpot_p99_s": _pct(tpot, 99),
        "throughput_rps": throughput,
        "slo_attainment": float(ok.sum() / arrived) if arrived else None,
        "cold_starts": sum(1 for p in starts if p == StartPath.COLD),
        "prewarm_hits": sum(1 for p in starts if p == StartPath.PREWARM_HIT),
        "inprogress_hits": sum(1 for p in starts if p == StartPath.INPROGRESS_HIT),
        "forecast_peak_rel_error": float(np.mean(forecast_errors)) if forecast_errors else None,
    }


# One row a request: times are seconds from its arrival; `error` is empty for a completed
# request and says what became of any other.
REQUEST_COLUMNS = (
    "arrival_s",
    "model",
    "input_tokens",
    "output_tokens_asked",
    "ttft_s",
    "finish_s",
    "output_tokens",
    "error",
    "policy",
)


@quick_init
@dataclass(frozen=True, slots=True)
class RequestRow:
    arrival_s: float
    model: str
    input_tokens: int
    output_tokens_asked: int
    ttft_s: float | None
    finish_s: float | None
    output_tokens: int
    error: str
    policy: str


def write_request_rows(path: Path, rows: Iterable[RequestRow]) -> None:
    def t(x: float | None) -> str:
        return "" if x is None else f"{x:.4f}"

    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(REQUEST_COLUMNS)
        for r in rows:
            asked = r.output_tokens_asked
            w.writerow([f"{r.arrival_s:.4f}", r.model, r.input_tokens, asked, t(r.ttft_s),
                        t(r.finish_s), r.output_tokens, r.error, r.policy])  # fmt: skip
