"""QuietModels remembers that a model's autoscaling is 0 until its load or live count moves
(or, for a load that went idle, until its window leaves the last request behind): every answer
it gives, at once or from memory, is the one the windowed mean gives."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from warmserve.control.autoscaler import QuietModels, scale_delta
from warmserve.control.config import ControlConfig
from warmserve.control.load import ConcurrencySeries

# Small capacities put the thresholds among the counts a short series reaches.
configs = st.builds(
    ControlConfig,
    capacity_per_instance=st.integers(1, 4),
    scale_up_threshold=st.sampled_from([0.8, 0.7, 1.0, 0.55]),
    scale_down_threshold=st.sampled_from([0.5, 0.0, 0.3, 0.1]),
    scale_window_s=st.sampled_from([5.0, 0.5, 3.0, 7.3]),
)


@settings(max_examples=500, deadline=None)
@given(
    st.floats(-100.0, 1e6),
    st.lists(
        st.tuples(st.sampled_from([0.0, 0.0, 1e-9, 0.1, 0.5, 1.0, 2.5, 7.0]), st.booleans()),
        max_size=40,
    ),
    st.integers(0, 5),
    st.lists(
        st.sampled_from([0.0, 1e-9, 0.01, 0.25, 0.5, 1.0, 3.0, 10.0]), min_size=1, max_size=12
    ),
    configs,
)
def test_remembered_answers_are_the_means(t0, events, live, later, cfg):
    series = ConcurrencySeries(cfg.scale_window_s, start_s=t0)
    quiet = QuietModels({"m": series}, cfg)
    t, n = t0, 0
    for dt, up in events:
        t += dt
        series.add(t, +1 if up or n == 0 else -1)
        n += 1 if up or n == 0 else -1
    now = t
    for dt in later:
        now += dt
        exact = scale_delta(series.mean(now, cfg.scale_window_s), live, cfg) == 0
        k = quiet.known.get("m")
        remembered = (
            k is not None
            and k[0] is series.last_step
            and k[1] == live
            and now - cfg.scale_window_s < k[2]
            and quiet.in_range(now)
        )
        if remembered:  # what the tick reads without a call
            assert exact
        assert quiet.scale_is_zero("m", live, now) == exact


@given(
    st.floats(0.0, 1e4),
    st.floats(0.0, 1e4),
    st.integers(0, 40),
    configs,
)
def test_scale_delta_never_falls_as_load_grows(a, b, live, cfg):
    """What QuietModels' bounds rely on: 0 at both ends of a range of loads is 0 within."""
    lo, hi = min(a, b), max(a, b)
    assert scale_delta(lo, live, cfg) <= scale_delta(hi, live, cfg)


def test_a_busy_model_is_remembered():
    """One instance, a load between 1 and 3 in flight: known after each change, not
    recomputed on the ticks between changes; and an idle one until its window empties."""
    cfg = ControlConfig()
    series = ConcurrencySeries(cfg.scale_window_s)
    quiet = QuietModels({"m": series}, cfg)
    for t, d in [(0.0, 1), (1.0, 1), (2.0, 1), (2.5, -1)]:
        series.add(t, d)
    assert quiet.scale_is_zero("m", 1, 3.0)
    assert quiet.known["m"][:2] == (series.last_step, 1)
    series.add(3.2, -1)
    series.add(3.4, -1)  # idle from 3.4: the mean is positive until 8.4, then 0
    assert quiet.scale_is_zero("m", 1, 4.0)
    assert quiet.known["m"][2] == 3.4  # the window must start before the last request left
    assert not quiet.scale_is_zero("m", 1, 8.5)  # an idle instance is stopped


@settings(max_examples=500, deadline=None)
@given(
    st.floats(-20.0, 1e5),
    st.lists(
        st.tuples(
            st.sampled_from([0.0, 1e-9, 0.1, 0.5, 1.0, 2.5, 7.0]),
            st.booleans(),
            st.lists(st.sampled_from([0.0, 1e-9, 0.2, 0.5, 3.0]), max_size=3),
        ),
        max_size=40,
    ),
    st.integers(0, 4),
    configs,
)
def test_answers_carried_over_each_change_are_the_means(t0, events, live, cfg):
    """Asked between changes (as ticks do), an answer remembered and carried over a change
    (the new count within its bounds) is still the mean's."""
    series = ConcurrencySeries(cfg.scale_window_s, start_s=t0)
    quiet = QuietModels({"m": series}, cfg)
    t, n = t0, 0
    for dt, up, asks in events:
        t += dt
        delta = +1 if up or n == 0 else -1
        series.add(t, delta)
        n += delta
        now = t
        for ask in asks:
            now += ask
            exact = scale_delta(series.mean(now, cfg.scale_window_s), live, cfg) == 0
            assert quiet.scale_is_zero("m", live, now) == exact
        t = now
