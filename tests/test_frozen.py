"""`quick_init` builds the same objects as the dataclass's own `__init__`."""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass

import pytest

from warmserve.cluster import effects
from warmserve.control import api
from warmserve.frozen import quick_init
from warmserve.workload import records


def _twins() -> tuple[type, type]:
    def make() -> type:
        @dataclass(frozen=True, slots=True)
        class Point:
            x: int
            label: str
            gpus: tuple[int, ...] = ()
            weight: float | None = None

        return Point

    return make(), quick_init(make())


def test_the_same_objects_as_the_dataclass_init():
    plain, quick = _twins()
    assert inspect.signature(quick) == inspect.signature(plain)
    calls = [((1, "a"), {}), ((1, "a", (2, 3)), {"weight": 0.5}), ((), {"x": 2, "label": "b"})]
    for args, kwargs in calls:
        p, q = plain(*args, **kwargs), quick(*args, **kwargs)
        assert dataclasses.astuple(p) == dataclasses.astuple(q)
        assert repr(p).split("(", 1)[1] == repr(q).split("(", 1)[1]
        assert hash(q) == hash(quick(*args, **kwargs)) and q == quick(*args, **kwargs)
        with pytest.raises(dataclasses.FrozenInstanceError):
            q.x = 5  # type: ignore[misc]
    for bad in [((1,), {}), ((1, "a"), {"nope": 1}), ((1, "a", (), None, 2), {})]:
        with pytest.raises(TypeError):
            plain(*bad[0], **bad[1])
        with pytest.raises(TypeError):
            quick(*bad[0], **bad[1])


@pytest.mark.parametrize(
    "cls",
    [
        api.RequestInfo,
        api.GpuView,
        api.ReplicaView,
        api.InstanceView,
        api.Dispatch,
        api.StartInstance,
        api.StopInstance,
        api.ReleaseInstance,
        api.Prewarm,
        api.Evict,
        api.SetKvPages,
        effects.LoadWeights,
        effects.DropWeights,
        effects.Activate,
        effects.Deactivate,
        effects.ResizeKv,
        effects.Route,
        records.RequestRow,
    ],
)
def test_hot_classes_keep_their_fields(cls):
    """Each field is a parameter, in order, with its default; every one lands in its slot."""
    fields = dataclasses.fields(cls)
    params = list(inspect.signature(cls).parameters.values())
    assert [p.name for p in params] == [f.name for f in fields]
    assert [p.default for p in params] == [
        inspect.Parameter.empty if f.default is dataclasses.MISSING else f.default for f in fields
    ]
    values = [object() for _ in fields]
    obj = cls(*values)
    assert [getattr(obj, f.name) for f in fields] == values
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(obj, fields[0].name, 1)


def test_refuses_what_it_would_not_reproduce():
    @dataclass(frozen=True, slots=True)
    class Checked:
        x: int

        def __post_init__(self) -> None:
            pass

    @dataclass(frozen=True, slots=True)
    class Factory:
        xs: list[int] = dataclasses.field(default_factory=list)

    @dataclass(slots=True)
    class Mutable:
        x: int

    @dataclass(frozen=True)
    class NoSlots:
        x: int

    for cls in (Checked, Factory, Mutable, NoSlots):
        with pytest.raises(TypeError):
            quick_init(cls)
