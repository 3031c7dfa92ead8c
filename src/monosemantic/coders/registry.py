"""The architecture registry: activation name -> SparseCoder subclass.

Each architecture file decorates its class with `@register("name")`; `coders/__init__.py` imports
every architecture file (one line each), so a new architecture is a new file plus one line.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, TypeVar

if TYPE_CHECKING:
    from monosemantic.coders.base import SparseCoder

REGISTRY: dict[str, type["SparseCoder"]] = {}

C = TypeVar("C", bound="type[SparseCoder]")


def register(name: str) -> Callable[[C], C]:
    """Class decorator: make the class available as `CoderConfig(activation=name)`."""

    def wrap(cls: C) -> C:
        if name in REGISTRY and REGISTRY[name] is not cls:
            raise ValueError(f"activation {name!r} is already registered to {REGISTRY[name].__name__}; "
                             "pick another name")
        REGISTRY[name] = cls
        cls.activation_name = name
        return cls

    return wrap


def get(name: str) -> type["SparseCoder"]:
    """The class registered under `name`, or a ValueError listing the choices."""
    if name not in REGISTRY:
        raise ValueError(f"no coder architecture is registered as {name!r}; "
                         f"pick one of {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]
