"""Expected time left of an in-flight request, from its model's recent service times."""

import pytest

from warmserve.control.drain_estimate import ServiceTimes
from warmserve.types import ModelName

A, B = ModelName("a"), ModelName("b")


def test_time_left_is_the_mean_excess_of_longer_recent_requests():
    st = ServiceTimes()
    for t in (2.0, 4.0, 10.0):
        st.add(A, t)
    assert st.left(A, 0.0) == pytest.approx(16.0 / 3)
    assert st.left(A, 3.0) == pytest.approx(4.0)  # (4 - 3 + 10 - 3) / 2
    assert st.left(A, 9.0) == pytest.approx(1.0)
    assert st.left(A, 10.0) == 0.0  # longer than any recent one
    assert st.left(B, 1.0) == 0.0  # nothing finished yet
    st.add(A, 20.0)  # a new time is read at once
    assert st.left(A, 10.0) == pytest.approx(10.0)


def test_only_the_last_times_count():
    st = ServiceTimes(keep=2)
    for t in (100.0, 1.0, 3.0):
        st.add(A, t)
    assert st.left(A, 0.0) == pytest.approx(2.0)
    with pytest.raises(ValueError):
        ServiceTimes(keep=0)
