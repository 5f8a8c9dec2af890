"""Pure helpers of scripts/evaluate.py: spread over seeds, "no difference", flags, censoring,
and the adaptive rate search. No simulator imports, so the tests of these stay fast."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

NO_DIFFERENCE = "no difference"


@dataclass(frozen=True, slots=True)
class Spread:
    """Mean and min-max of one figure over seeds. `missing` counts seeds without a value
    (a rate search that never met the target, a ratio with a zero denominator)."""

    mean: float
    lo: float
    hi: float
    n: int
    missing: int = 0

    def contains(self, x: float) -> bool:
        return self.lo <= x <= self.hi


def spread(values: Iterable[float | None]) -> Spread | None:
    """Mean and min-max of the values that are not None; None if none are."""
    vals = list(values)
    got = [float(v) for v in vals if v is not None and not math.isnan(v)]
    if not got:
        return None
    return Spread(sum(got) / len(got), min(got), max(got), len(got), len(vals) - len(got))


def paired_ratios(num: Sequence[float | None], den: Sequence[float | None]) -> list[float | None]:
    """Per-seed num/den (same seed, same workload): the ratio's own spread, not a ratio of means."""
    if len(num) != len(den):
        raise ValueError(f"paired ratios need as many values a side ({len(num)} vs {len(den)})")
    pairs = zip(num, den, strict=True)
    return [None if a is None or b is None or b == 0 else a / b for a, b in pairs]


def compare(a: Spread | None, b: Spread | None) -> str:
    """'lower' / 'higher' when a's seed range lies wholly below / above b's; else NO_DIFFERENCE.

    Min-max over seeds, not a significance test: with five seeds, ranges that overlap mean the
    seeds disagree on the order, and we do not rank them."""
    if a is None or b is None:
        return NO_DIFFERENCE
    if a.hi < b.lo:
        return "lower"
    if a.lo > b.hi:
        return "higher"
    return NO_DIFFERENCE


def ratio_verdict(r: Spread | None) -> str:
    """For a per-seed ratio: a ratio whose seed range includes 1 is NO_DIFFERENCE."""
    if r is None:
        return "undefined"
    if r.contains(1.0):
        return NO_DIFFERENCE
    return "higher" if r.lo > 1.0 else "lower"


def _num(x: float, spec: str) -> str:
    return spec.format(x)


def fmt_spread(s: Spread | None, spec: str = "{:.3g}", pct: bool = False) -> str:
    """'0.42 (0.40-0.45)', or '0.42' when every seed agrees; '–' for none."""
    if s is None:
        return "–"
    k = 100.0 if pct else 1.0
    unit = " %" if pct else ""
    mean, lo, hi = _num(s.mean * k, spec), _num(s.lo * k, spec), _num(s.hi * k, spec)
    core = f"{mean}{unit}" if lo == hi else f"{mean} ({lo}–{hi}){unit}"
    if s.missing:
        core += f" [{s.missing} of {s.n + s.missing} seeds: none]"
    return core


def fmt_ratio(s: Spread | None, censor: str = "") -> str:
    """A per-seed ratio as '1.7× (1.5–1.9×)', marked 'no difference' when its range holds 1,
    and prefixed by the censoring bound ('≥', '≤') or replaced when both sides are censored."""
    if censor == "undetermined":
        return "undetermined (both sweeps censored)"
    if s is None:
        return "–"
    spec = "{:.2g}" if s.mean < 10 else "{:.3g}" if s.mean < 100 else "{:.0f}"
    core = dataclasses.replace(s, missing=0)
    body = fmt_spread(core, spec).replace(" (", "× (")
    body = body.replace(")", "×)") if "(" in body else body + "×"
    if s.missing:
        body += f" [{s.missing} of {s.n + s.missing} seeds undefined]"
    bound = {"lower": "≥ ", "upper": "≤ "}.get(censor, "")
    text = bound + body
    if bound:
        text += " (censored sweep)"
    elif ratio_verdict(s) == NO_DIFFERENCE:
        text += ", no difference"
    return text


# --- failed and never-served models ---


def flagged_models(per_model_by_seed: Sequence[Mapping[str, Mapping[str, Any]]]) -> dict[str, str]:
    """Models with a failed request in any seed: name -> 'never served' (a seed where none of
    its requests completed) or 'N failed' (summed over seeds). Pooled attainment hides these."""
    out: dict[str, str] = {}
    names = sorted({n for pm in per_model_by_seed for n in pm})
    for name in names:
        runs = [pm[name] for pm in per_model_by_seed if name in pm]
        failed = sum(int(r.get("failed", 0)) for r in runs)
        never = any(r.get("arrived", 0) > 0 and r.get("completed", 0) == 0 for r in runs)
        if never:
            out[name] = "never served"
        elif failed:
            out[name] = f"{failed} failed"
    return out


def bold_if(text: str, flagged: bool) -> str:
    return f"**{text}**" if flagged else text


# --- rate sweeps: maximum rate at SLO, censoring, adaptive refinement ---


def max_rate(points: Mapping[float, float | None], target: float) -> float | None:
    """The highest evaluated rate whose attainment is >= target (not "every lower rate too":
    with scale-to-zero, attainment can be lowest at the lightest load); None if none is."""
    ok = [r for r, a in points.items() if a is not None and a >= target]
    return max(ok) if ok else None


def censoring(points: Mapping[float, float | None], target: float) -> str:
    """'upper' when the highest evaluated rate still meets the target (the answer is only a
    lower bound), 'never' when no evaluated rate does, '' when the sweep brackets the knee."""
    if not points:
        return "never"
    top = max(points)
    a = points[top]
    if a is not None and a >= target:
        return "upper"
    return "never" if max_rate(points, target) is None else ""


def ratio_censoring(num_censor: str, den_censor: str) -> str:
    """How a ratio of two max rates is bounded: 'lower' (≥, the numerator is censored),
    'upper' (≤, the denominator is), 'undetermined' (both), '' (neither)."""
    n, d = num_censor == "upper", den_censor == "upper"
    if n and d:
        return "undetermined"
    return "lower" if n else "upper" if d else ""


def censor_text(policy: str, censor: str, top: float, target: float) -> str:
    """One sentence for a table note; empty when the sweep brackets the knee."""
    if censor == "upper":
        return (
            f"{policy} still meets {target:.0%} at {top:g} rps, the highest rate swept: "
            f"its maximum is a lower bound, and any ratio over it is censored."
        )
    if censor == "never":
        return f"{policy} meets {target:.0%} at no rate swept."
    return ""


def next_rates(
    points: Mapping[float, float | None],
    targets: Sequence[float],
    grid: Sequence[float],
    cap: float,
    rel_resolution: float = 0.1,
) -> list[float]:
    """Where to simulate next for one policy, given mean attainment at the rates done so far.

    While the policy still meets the lowest target at its highest rate, extend upwards: the next
    grid point, or ×1.5 beyond the grid, up to `cap`. Then, for each target, bisect between the
    highest rate that meets it and the next rate above that does not, until the gap is within
    `rel_resolution` of the lower rate (or 1 rps). Returns new rates only, sorted."""
    done = set(points)
    out: set[float] = set()
    if not points:
        return sorted(set(grid))
    top = max(points)
    top_a = points[top]
    if top_a is not None and top_a >= min(targets) and top < cap:
        above = [g for g in grid if g > top]
        nxt = above[0] if above else min(cap, _round_rate(top * 1.5))
        if nxt not in done:
            out.add(nxt)
    for t in targets:
        lo = max_rate(points, t)
        if lo is None:
            continue
        higher = [r for r in points if r > lo]
        if not higher:
            continue
        hi = min(higher)
        if hi - lo <= max(1.0, rel_resolution * lo):
            continue
        mid = _round_rate((lo + hi) / 2)
        if mid not in done and lo < mid < hi:
            out.add(mid)
    return sorted(out)


def _round_rate(x: float) -> float:
    """Rates above 4 rps to whole numbers, below to halves: stable keys for sharing workloads."""
    return float(round(x)) if x >= 4 else round(x * 2) / 2
