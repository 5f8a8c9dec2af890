"""The pure helpers of scripts/evaluate.py: spread over seeds, "no difference", flags of failed
and never-served models, censored sweeps and the adaptive rate search."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parent.parent / "scripts" / "eval_stats.py"
_spec = importlib.util.spec_from_file_location("eval_stats", _PATH)
assert _spec is not None and _spec.loader is not None
es = importlib.util.module_from_spec(_spec)
sys.modules["eval_stats"] = es
_spec.loader.exec_module(es)


def test_spread_ignores_missing_and_counts_them():
    s = es.spread([1.0, None, 3.0, 2.0])
    assert (s.mean, s.lo, s.hi, s.n, s.missing) == (2.0, 1.0, 3.0, 3, 1)
    assert es.spread([None, None]) is None


def test_overlapping_ranges_are_no_difference():
    a = es.spread([1.0, 2.0, 3.0])
    b = es.spread([2.5, 4.0, 5.0])
    assert es.compare(a, b) == es.NO_DIFFERENCE
    assert es.compare(es.spread([1.0, 1.2]), es.spread([1.3, 2.0])) == "lower"
    assert es.compare(es.spread([3.0, 4.0]), es.spread([1.0, 2.0])) == "higher"


def test_ratio_range_holding_one_is_no_difference():
    r = es.spread(es.paired_ratios([1.0, 3.0], [2.0, 2.0]))  # 0.5 and 1.5
    assert es.ratio_verdict(r) == es.NO_DIFFERENCE
    assert "no difference" in es.fmt_ratio(r)
    up = es.spread(es.paired_ratios([4.0, 6.0], [2.0, 2.0]))
    assert es.ratio_verdict(up) == "higher"
    assert "no difference" not in es.fmt_ratio(up)


def test_paired_ratios_pair_by_position_and_skip_zero():
    assert es.paired_ratios([2.0, None, 3.0], [1.0, 1.0, 0.0]) == [2.0, None, None]
    with pytest.raises(ValueError):
        es.paired_ratios([1.0], [1.0, 2.0])


def test_fmt_spread_shows_range_only_when_seeds_differ():
    assert es.fmt_spread(es.spread([0.5, 0.5])) == "0.5"
    assert es.fmt_spread(es.spread([0.4, 0.6])) == "0.5 (0.4–0.6)"
    assert es.fmt_spread(es.spread([0.9, 1.0]), "{:.0f}", pct=True) == "95 (90–100) %"
    assert es.fmt_spread(None) == "–"


def test_flags_catch_a_never_served_model_whatever_the_pooled_attainment():
    seeds = [
        {"7b": {"arrived": 900, "completed": 900, "failed": 0},
         "70b": {"arrived": 10, "completed": 0, "failed": 10}},
        {"7b": {"arrived": 900, "completed": 899, "failed": 1},
         "70b": {"arrived": 12, "completed": 12, "failed": 0}},
    ]  # fmt: skip
    flags = es.flagged_models(seeds)
    assert flags == {"70b": "never served", "7b": "1 failed"}
    assert es.flagged_models([{"7b": {"arrived": 5, "completed": 5, "failed": 0}}]) == {}
    assert es.bold_if("70b", True) == "**70b**"


def test_max_rate_is_the_highest_rate_meeting_the_target():
    pts = {1.0: 0.85, 4.0: 0.95, 16.0: 0.99, 32.0: 0.92, 48.0: 0.5}
    assert es.max_rate(pts, 0.9) == 32.0
    assert es.max_rate(pts, 0.99) == 16.0
    assert es.max_rate({1.0: 0.5}, 0.9) is None


def test_censoring_and_its_text():
    assert es.censoring({16.0: 0.95, 64.0: 0.93}, 0.9) == "upper"
    assert es.censoring({16.0: 0.95, 64.0: 0.5}, 0.9) == ""
    assert es.censoring({16.0: 0.5, 64.0: 0.4}, 0.9) == "never"
    text = es.censor_text("muxserve", "upper", 64.0, 0.9)
    assert "64 rps" in text and "lower bound" in text and "censored" in text
    assert es.censor_text("muxserve", "", 64.0, 0.9) == ""


def test_a_ratio_over_a_censored_sweep_says_so():
    r = es.spread([2.0, 2.2])
    assert es.ratio_censoring("upper", "") == "lower"
    assert es.fmt_ratio(r, "lower").startswith("≥ ")
    assert "censored" in es.fmt_ratio(r, "lower")
    assert es.fmt_ratio(r, "upper").startswith("≤ ")
    assert es.ratio_censoring("upper", "upper") == "undetermined"
    assert "undetermined" in es.fmt_ratio(r, "undetermined")
    assert "censored" not in es.fmt_ratio(r, "")


def test_next_rates_extends_until_saturation_then_bisects_each_knee():
    grid = [1, 16, 64]
    assert es.next_rates({}, (0.9, 0.99), grid, 256) == [1, 16, 64]
    # Still at SLO at the top of the grid: extend by 1.5x.
    assert es.next_rates({1.0: 0.95, 16.0: 0.95, 64.0: 0.95}, (0.9,), grid, 256) == [96.0]
    # ... but never past the cap.
    assert es.next_rates({1.0: 0.95, 250.0: 0.95}, (0.9,), [], 256) == [256.0]
    assert es.next_rates({1.0: 0.95, 256.0: 0.95}, (0.9,), [], 256) == []
    # Saturated: bisect between the last rate that meets each target and the next one above.
    pts = {1.0: 0.95, 16.0: 0.995, 64.0: 0.92, 128.0: 0.3}
    assert es.next_rates(pts, (0.9, 0.99), grid, 256) == [40.0, 96.0]
    # Knees resolved to within 10 % (or 1 rps): nothing more to run.
    done = {16.0: 0.995, 17.0: 0.98, 100.0: 0.95, 105.0: 0.5}
    assert es.next_rates(done, (0.9, 0.99), grid, 256) == []


def test_a_ratio_with_undefined_seeds_says_how_many():
    r = es.spread([0.25, 0.25, 0.25, None, None])
    assert es.fmt_ratio(r).startswith("0.25×")
    assert "[2 of 5 seeds undefined]" in es.fmt_ratio(r)
