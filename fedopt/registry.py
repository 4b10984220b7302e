"""Name -> factory registries, filled by decorators (``@ALGORITHMS.register("fedmbo")``).

Config values are registry keys, so the config ``algorithm = { name = "fedmbo" }`` and the
factory ``fedmbo(...)`` share one name. Factories take keyword-only parameters with type
annotations; :func:`fedopt.config.build` checks a config's ``params`` against that signature
before calling, so unknown keys and wrong types are caught before any work starts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from fedopt.errors import ConfigError

__all__ = ["ALGORITHMS", "DATASETS", "ENGINES", "PARTITIONERS", "PROBLEMS", "Registry"]

F = TypeVar("F", bound=Callable[..., object])


class Registry(Generic[F]):
    """A named collection of factories."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, F] = {}

    def register(self, name: str) -> Callable[[F], F]:
        """Decorator that registers ``fn`` under ``name``."""

        def deco(fn: F) -> F:
            if name in self._items and self._items[name] is not fn:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = fn
            return fn

        return deco

    def get(self, name: str) -> F:
        """The factory registered as ``name``; the error lists the available names."""
        try:
            return self._items[name]
        except KeyError:
            raise ConfigError(
                f"unknown {self.kind} {name!r}; available: {', '.join(self.names())}"
            ) from None

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items


ALGORITHMS: Registry[Callable[..., object]] = Registry("algorithm")
PROBLEMS: Registry[Callable[..., object]] = Registry("problem")
DATASETS: Registry[Callable[..., object]] = Registry("dataset")
PARTITIONERS: Registry[Callable[..., object]] = Registry("partition")
ENGINES: Registry[Callable[..., object]] = Registry("engine")
