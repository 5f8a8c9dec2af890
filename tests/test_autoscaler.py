import random
from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from warmserve.control.autoscaler import ActiveInstance, pick_to_stop, scale_delta
from warmserve.control.config import ControlConfig
from warmserve.control.router import least_loaded

CFG = ControlConfig()  # capacity 32, up 0.8, down 0.5


@pytest.mark.parametrize(
    ("load", "active", "delta"),
    [
        (0.0, 0, 0),  # nothing running, nothing wanted
        (0.1, 0, 1),  # scale from zero
        (0.0, 1, -1),  # idle: scale to zero (weights stay as a prewarmed replica)
        (15.9, 1, 0),  # just under half: below 0.5*32 = 16 → one instance still needed
        (16.0, 1, 0),  # exactly half: no change
        (25.6, 1, 0),  # exactly 0.8*32: not above
        (25.7, 1, 1),  # above 0.8: ceil(25.7/0.8/32) = 2
        (60.0, 1, 2),  # ceil(60/25.6) = 3
        (20.0, 3, -1),  # 20 < 0.5*96; keep ceil(20/16) = 2
        (40.0, 3, 0),  # within [48, 76.8]? 40 < 48 → keep ceil(40/16)=3 → 0
        (100.0, 4, 0),  # 100 in [64, 102.4]
        (103.0, 4, 1),  # above 102.4: ceil(103/25.6) = 5
    ],
)
def test_scale_delta_table(load, active, delta):
    assert scale_delta(load, active, CFG) == delta


def test_thresholds_come_from_config():
    cfg = ControlConfig(capacity_per_instance=10, scale_up_threshold=0.5, scale_down_threshold=0.1)
    assert scale_delta(5.5, 1, cfg) == 1
    assert scale_delta(0.5, 1, cfg) == 0
    assert scale_delta(0.0, 2, cfg) == -2
    with pytest.raises(ValueError):
        ControlConfig(scale_up_threshold=0.4, scale_down_threshold=0.5)


def test_stops_least_loaded_instances_past_protect_period():
    cands = [
        ActiveInstance(0, created_s=0.0, in_flight=3),
        ActiveInstance(1, created_s=0.0, in_flight=1),
        ActiveInstance(2, created_s=8.0, in_flight=0),  # 2 s old: protected
        ActiveInstance(3, created_s=1.0, in_flight=1),
    ]
    assert pick_to_stop(cands, 2, now=10.0, cfg=CFG) == [1, 3]
    assert pick_to_stop(cands, 10, now=10.0, cfg=CFG) == [1, 3, 0]


def test_never_stops_a_starting_instance():
    cands = [
        ActiveInstance(0, created_s=0.0, in_flight=3),
        ActiveInstance(1, created_s=0.0, in_flight=1, starting=True),  # a slow cold start
    ]
    assert pick_to_stop(cands, 1, now=60.0, cfg=CFG) == [0]
    assert pick_to_stop(cands, 2, now=60.0, cfg=CFG) == [0]


@dataclass
class _Inst:
    model: str
    in_flight: int
    stopping: bool = False


def _reference_choice(loads, capacity):
    """The rule, written plainly: the fewest in-flight requests below capacity, ties to the
    lowest id."""
    best = None
    for inst_id, n in loads:
        if n < capacity and (best is None or (n, inst_id) < best):
            best = (n, inst_id)
    return None if best is None else best[1]


def test_router_least_loaded_below_capacity():
    def pick(loads, capacity=32):
        return least_loaded({i: _Inst("m", n) for i, n in loads}, "m", capacity)

    assert pick([(0, 5), (1, 2), (2, 2)]) == 1
    assert pick([(2, 2), (1, 2), (0, 5)]) == 1  # ties to the lowest id, in any order
    assert pick([(0, 32), (1, 31)]) == 1
    assert pick([(0, 32), (1, 40)]) is None
    assert pick([]) is None


@given(
    st.lists(st.tuples(st.sampled_from(["a", "b"]), st.integers(0, 5), st.booleans()), max_size=12),
    st.integers(1, 5),
)
def test_least_loaded_follows_the_rule(rows, capacity):
    """The routing pass over instance records picks what the plain rule picks from the
    model's instances not stopping."""
    ids = list(range(len(rows)))
    random.Random(len(rows)).shuffle(ids)  # records in any id order
    insts = {i: _Inst(*row) for i, row in zip(ids, rows, strict=True)}
    for model in ("a", "b"):
        loads = [(i, x.in_flight) for i, x in insts.items() if x.model == model and not x.stopping]
        assert least_loaded(insts, model, capacity) == _reference_choice(loads, capacity)
