"""Workloads: the reference's Azure construction, or a user's CSV trace; and forecast history.

Azure construction (reference §9.3, with the trace data we have): served model i replays one
hour-aligned stretch of day D_i (default `7 - M + i`, Monday = 0) of the Azure 2024 week,
thinned to `rps · p_i` requests/s on average over the normalisation window (the replayed hour,
or the whole replay if longer), `p_i ∝ (i+1)^-alpha`. Only 10-second counts of the 2024 trace
are public, so arrivals are drawn uniformly inside each 10-s bucket and token lengths are drawn
from the Azure 2023 trace of the same service (input clamped to `max_input_tokens`, output to
`[min_output_tokens, max_output_tokens]`). Forecast history is the per-window mean and peak
concurrency of the earlier days, built the same way, with the instance's isolated service time
(prefill + output × decode step) as each request's duration.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from warmserve.control.forecaster import SlotHistory, cycle_slots
from warmserve.traces import (
    BUCKET_S,
    SERVEGEN_LENGTH_WINDOW_S,
    SERVEGEN_WINDOW_S,
    ServeGenClient,
    azure_2023_lengths,
    azure_week_counts,
    servegen_clients,
)
from warmserve.workload.concurrency import observe_intervals

ServiceTime = Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclass(frozen=True, slots=True)
class Workload:
    model_names: tuple[str, ...]
    arrival_s: np.ndarray  # sorted
    model_idx: np.ndarray
    input_tokens: np.ndarray
    output_tokens: np.ndarray
    histories: dict[str, SlotHistory | None]
    forecast_offsets_s: dict[str, float]  # time of day (or week) at t = 0, per model

    @property
    def num_requests(self) -> int:
        return len(self.arrival_s)


@dataclass(frozen=True, slots=True)
class AzureSpec:
    service: str  # "conv" | "code"
    rps: float
    alpha: float
    start_hour: float
    days: Sequence[int] | None
    duration_s: float
    max_input_tokens: int
    min_output_tokens: int
    max_output_tokens: int
    burstiness_cv: float | None = None  # re-draw inter-arrival gaps with this CV


def apply_burstiness(
    t: np.ndarray, cv: float, span_s: float, rng: np.random.Generator
) -> np.ndarray:
    """Arrival times with Gamma(1/cv², ·) gaps, rescaled to the same count and time span.

    As the reference's generator does: the trace's rate over the whole replay is kept, its
    shape within it is replaced by a renewal process of the given coefficient of variation.
    """
    if len(t) < 2:
        return t
    shape = 1.0 / (cv * cv)
    gaps = rng.gamma(shape, 1.0 / shape, size=len(t))
    times = np.cumsum(gaps)
    return times / times[-1] * (span_s * len(t) / (len(t) + 1))


def popularity(num_models: int, alpha: float) -> np.ndarray:
    w = (np.arange(num_models) + 1.0) ** -alpha
    return w / w.sum()


def _thin(counts: np.ndarray, q: float, rng: np.random.Generator) -> np.ndarray:
    """Each real request kept floor(q) times plus once more with probability frac(q)."""
    whole = int(np.floor(q))
    return counts * whole + rng.binomial(counts, q - whole)


def thinned_arrivals(
    week: np.ndarray, t0: float, span_s: float, q: float, rng: np.random.Generator
) -> np.ndarray:
    first = int(t0 // BUCKET_S)
    n_buckets = int(np.ceil(span_s / BUCKET_S))
    idx = (first + np.arange(n_buckets)) % len(week)
    kept = _thin(week[idx], q, rng)
    base = np.repeat(np.arange(n_buckets) * BUCKET_S, kept).astype(np.float64)
    times = base + rng.uniform(0.0, BUCKET_S, size=len(base))
    times = np.sort(times[times < span_s])
    return times


def _lengths(
    service: str, n: int, spec: AzureSpec, max_model_len: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    ctx, gen = azure_2023_lengths(service)
    pick = rng.integers(0, len(ctx), size=n)
    inp = np.clip(ctx[pick], 1, min(spec.max_input_tokens, max_model_len - spec.min_output_tokens))
    out = np.clip(gen[pick], spec.min_output_tokens, spec.max_output_tokens)
    out = np.minimum(out, max_model_len - inp)
    return inp, out


def build_azure(
    spec: AzureSpec,
    model_names: Sequence[str],
    max_model_lens: Sequence[int],
    service_times: Sequence[ServiceTime],
    window_s: float,
    cycle: str,
    seed: int,
) -> Workload:
    week = azure_week_counts(spec.service)
    m = len(model_names)
    p = popularity(m, spec.alpha)
    num_slots = cycle_slots(cycle, window_s)
    arrivals, idxs, inps, outs = [], [], [], []
    histories: dict[str, SlotHistory | None] = {}
    offsets: dict[str, float] = {}
    for i, name in enumerate(model_names):
        day = (spec.days[i] if spec.days else 7 - m + i) % 7
        t0 = day * 86_400 + spec.start_hour * 3600
        norm_s = max(spec.duration_s, 3600.0)
        real = week[(int(t0 // BUCKET_S) + np.arange(int(norm_s // BUCKET_S))) % len(week)].sum()
        q = spec.rps * p[i] * norm_s / max(int(real), 1)
        rng = np.random.default_rng([seed, i])
        t = thinned_arrivals(week, t0, spec.duration_s, q, rng)
        if spec.burstiness_cv is not None:
            t = apply_burstiness(t, spec.burstiness_cv, spec.duration_s, rng)
        inp, out = _lengths(spec.service, len(t), spec, max_model_lens[i], rng)
        arrivals.append(t)
        idxs.append(np.full(len(t), i, dtype=np.int64))
        inps.append(inp)
        outs.append(out)
        # History: every earlier day of the week, whole days, same thinning.
        cycle_offset = 0.0 if cycle == "day" else day * 86_400.0
        offsets[name] = cycle_offset + spec.start_hour * 3600.0
        hist = SlotHistory.empty(num_slots)
        for d in range(day):
            hrng = np.random.default_rng([seed, i, 1000 + d])
            ht = thinned_arrivals(week, d * 86_400, 86_400, q, hrng)
            hin, hout = _lengths(spec.service, len(ht), spec, max_model_lens[i], hrng)
            first = 0 if cycle == "day" else int(d * 86_400 // window_s)
            ends = ht + service_times[i](hin, hout)
            observe_intervals(hist, ht, ends, 86_400, window_s, first)
        histories[name] = hist if day > 0 else None
    return _merge(tuple(model_names), arrivals, idxs, inps, outs, histories, offsets)


def _merge(
    names: tuple[str, ...],
    arrivals: list[np.ndarray],
    idxs: list[np.ndarray],
    inps: list[np.ndarray],
    outs: list[np.ndarray],
    histories: dict[str, SlotHistory | None],
    offsets: dict[str, float],
) -> Workload:
    t = np.concatenate(arrivals) if arrivals else np.zeros(0)
    order = np.argsort(t, kind="stable")
    return Workload(
        names,
        t[order],
        np.concatenate(idxs)[order],
        np.concatenate(inps)[order],
        np.concatenate(outs)[order],
        histories,
        offsets,
    )


def from_trace(
    model_names: Sequence[str],
    arrival_s: np.ndarray,
    models: Sequence[str],
    input_tokens: np.ndarray,
    output_tokens: np.ndarray,
    duration_s: float | None,
) -> Workload:
    """A workload from per-request rows (e.g. a CSV trace); the forecaster learns online."""
    index = {n: k for k, n in enumerate(model_names)}
    unknown = sorted(set(models) - set(index))
    if unknown:
        raise ValueError(f"trace names models not in the experiment: {', '.join(unknown)}")
    idx = np.array([index[m] for m in models], dtype=np.int64)
    keep = arrival_s < duration_s if duration_s is not None else np.ones(len(idx), dtype=bool)
    t0 = float(arrival_s[keep].min()) if keep.any() else 0.0
    names = tuple(model_names)
    return _merge(
        names,
        [arrival_s[keep] - t0],
        [idx[keep]],
        [input_tokens[keep]],
        [output_tokens[keep]],
        dict.fromkeys(names),
        dict.fromkeys(names, 0.0),
    )


@dataclass(frozen=True, slots=True)
class ServeGenSpec:
    model: str  # ServeGen model whose clients become deployments, e.g. "m-mid"
    rps: float  # mean requests/s over all deployments during the replay
    day: int  # day of the 14 replayed (history: up to 7 earlier days)
    start_hour: float
    duration_s: float
    max_input_tokens: int
    min_output_tokens: int
    max_output_tokens: int


def _renewal(rate: float, cv: float, span_s: float, rng: np.random.Generator) -> np.ndarray:
    """Arrivals over [0, span) of a renewal process with Gamma gaps of mean 1/rate and `cv`."""
    if rate <= 0:
        return np.zeros(0)
    cv = cv if cv > 0 else 1.0
    shape = 1.0 / (cv * cv)
    chunks, total = [], 0.0
    batch = max(16, int(2 * rate * span_s))
    while total < span_s:
        gaps = rng.gamma(shape, 1.0 / (shape * rate), size=batch)
        t = total + np.cumsum(gaps)
        chunks.append(t)
        total = float(t[-1])
    t = np.concatenate(chunks)
    return t[t < span_s]


def _servegen_stream(
    client: ServeGenClient, t0: float, span_s: float, q: float, rng: np.random.Generator
) -> np.ndarray:
    """One client's arrivals in [t0, t0 + span), its rates scaled by q, window by window."""
    w = SERVEGEN_WINDOW_S
    out = []
    for k in range(int(t0 // w), int(np.ceil((t0 + span_s) / w))):
        lo, hi = max(k * w, t0), min((k + 1) * w, t0 + span_s)
        idx = k % len(client.rate)
        t = _renewal(client.rate[idx] * q, client.cv[idx], hi - lo, rng)
        out.append(t + (lo - t0))
    return np.concatenate(out) if out else np.zeros(0)


def _servegen_lengths(
    clients: Sequence[ServeGenClient],
    client: ServeGenClient,
    t_abs: np.ndarray,
    spec: ServeGenSpec,
    max_model_len: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Lengths from the client's PMF of each 6-h window; clients without one (missing
    upstream) borrow the PMF of the first shipped client that has that window."""
    inp = np.empty(len(t_abs), dtype=np.int64)
    out = np.empty(len(t_abs), dtype=np.int64)
    win = (t_abs // SERVEGEN_LENGTH_WINDOW_S).astype(np.int64) * SERVEGEN_LENGTH_WINDOW_S
    for start in np.unique(win):
        sel = win == start
        pmf = client.lengths.get(int(start)) or next(
            (c.lengths[int(start)] for c in clients if int(start) in c.lengths), None
        )
        if pmf is None:
            raise ValueError(f"ServeGen: no length distribution for window {int(start)}")
        n = int(sel.sum())
        inp[sel] = rng.choice(pmf[0], size=n, p=pmf[1])
        out[sel] = rng.choice(pmf[2], size=n, p=pmf[3])
    inp = np.clip(inp, 1, min(spec.max_input_tokens, max_model_len - spec.min_output_tokens))
    out = np.clip(out, spec.min_output_tokens, spec.max_output_tokens)
    return inp, np.minimum(out, max_model_len - inp)


def build_servegen(
    spec: ServeGenSpec,
    model_names: Sequence[str],
    max_model_lens: Sequence[int],
    service_times: Sequence[ServiceTime],
    window_s: float,
    seed: int,
) -> Workload:
    """ServeGen: the busiest clients of one model become the deployments, in order.

    Each deployment replays its client's own rate and inter-arrival CV per 10-minute window
    (Gamma renewal gaps), all rates scaled by one factor so the replay averages `rps`; the
    popularity skew is the clients' own. History: the same construction on up to 7 earlier
    days, per 5-minute window of the day.
    """
    clients = servegen_clients(spec.model)
    m = len(model_names)
    if m > len(clients):
        raise ValueError(f"ServeGen {spec.model}: {m} models but {len(clients)} clients shipped")
    use = clients[:m]
    t0 = spec.day * 86_400 + spec.start_hour * 3600
    w = SERVEGEN_WINDOW_S
    ks = np.arange(int(t0 // w), int(np.ceil((t0 + spec.duration_s) / w)))
    expected = sum(float(c.rate[ks % len(c.rate)].sum()) * w for c in use)
    q = spec.rps * spec.duration_s / max(expected, 1e-9)
    num_slots = cycle_slots("day", window_s)
    arrivals, idxs, inps, outs = [], [], [], []
    histories: dict[str, SlotHistory | None] = {}
    for i, (name, client) in enumerate(zip(model_names, use, strict=True)):
        rng = np.random.default_rng([seed, i])
        t = _servegen_stream(client, t0, spec.duration_s, q, rng)
        inp, out = _servegen_lengths(clients, client, t + t0, spec, max_model_lens[i], rng)
        arrivals.append(t)
        idxs.append(np.full(len(t), i, dtype=np.int64))
        inps.append(inp)
        outs.append(out)
        hist = SlotHistory.empty(num_slots)
        for d in range(max(0, spec.day - 7), spec.day):
            hrng = np.random.default_rng([seed, i, 1000 + d])
            ht = _servegen_stream(client, d * 86_400, 86_400, q, hrng)
            hin, hout = _servegen_lengths(
                clients, client, ht + d * 86_400, spec, max_model_lens[i], hrng
            )
            ends = ht + service_times[i](hin, hout)
            observe_intervals(hist, ht, ends, 86_400, window_s)
        histories[name] = hist if spec.day > 0 else None
    offsets = dict.fromkeys(model_names, spec.start_hour * 3600.0)
    return _merge(tuple(model_names), arrivals, idxs, inps, outs, histories, offsets)
