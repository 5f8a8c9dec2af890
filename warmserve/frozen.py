"""A faster `__init__` for the frozen, slotted dataclasses built on the simulator's hot paths.

A frozen dataclass's generated `__init__` sets each field through `object.__setattr__` (its own
`__setattr__` refuses). Setting each slot through the slot's descriptor does the same in half
the time; views, actions and effects are built several times per simulated request, and their
construction was a noticeable part of a long replay. The class stays what it was: the same
fields, signature, defaults, equality, hash, repr and refusal of assignment.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

T = TypeVar("T")


def quick_init(cls: type[T]) -> type[T]:
    """Replace the `__init__` of a frozen, slotted dataclass with one that sets the slots
    directly. Refused (TypeError) for what it would not reproduce: a `__post_init__`, a field
    outside `__init__`, a keyword-only field or a default factory."""
    params = getattr(cls, "__dataclass_params__", None)
    if params is None or not params.frozen or "__slots__" not in cls.__dict__:
        raise TypeError(f"{cls.__name__}: not a frozen, slotted dataclass")
    if hasattr(cls, "__post_init__"):
        raise TypeError(f"{cls.__name__}: has a __post_init__")
    ns: dict[str, Any] = {}
    args: list[str] = []
    body: list[str] = []
    for k, f in enumerate(dataclasses.fields(cls)):  # type: ignore[arg-type]
        if not f.init or f.kw_only or f.default_factory is not dataclasses.MISSING:
            raise TypeError(f"{cls.__name__}.{f.name}: not a plain __init__ parameter")
        if f.default is dataclasses.MISSING:
            args.append(f.name)
        else:
            ns[f"_d{k}"] = f.default
            args.append(f"{f.name}=_d{k}")
        ns[f"_s{k}"] = cls.__dict__[f.name].__set__  # the slot's own setter
        body.append(f"    _s{k}(self, {f.name})")
    src = f"def __init__(self, {', '.join(args)}):\n" + ("\n".join(body) or "    pass") + "\n"
    exec(src, ns)  # generated from the class's own field names, as dataclasses does
    init = ns["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    init.__doc__ = cls.__init__.__doc__
    init.__annotations__ = dict(cls.__init__.__annotations__)  # the same signature, typed
    cls.__init__ = init  # type: ignore[misc]
    return cls
