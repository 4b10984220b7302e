"""Name -> factory registries, filled by decorators (``@ALGORITHMS.register("fedmbo")``).

Config values are registry keys, so the config ``algorithm = { name = "fedmbo" }`` and the
factory ``fedmbo(...)`` share one name. Factories take keyword-only parameters with type
annotations; the config layer (:func:`fedopt.config.check_params`) checks a config's ``params``
against that signature before calling, so unknown keys and wrong types are caught before any work
starts.

Plug-ins: besides a registered name, every registry resolves a dotted path
``"package.module:factory"`` (imported on demand, from the config file's folder and the current
folder as well when run by ``fedopt run`` / :func:`fedopt.run`) and an entry point in the group
``fedopt.<kind>`` (``fedopt.algorithms``, ``fedopt.problems``, ``fedopt.datasets``,
``fedopt.partitioners``, ``fedopt.engines``; topologies: ``fedopt.topologies``) of an installed
distribution. One resolver does this for all of them, :class:`topologies.plugins.PluginRegistry`.
A broken plug-in (missing module, module that raises on import, missing attribute, not callable,
a signature that cannot take the config, an entry point that fails to load, a factory that raises)
is one :class:`~fedopt.errors.ConfigError` line naming it, never a traceback.

Trust: a dotted path or an entry point *runs code* when it is resolved. A config or sweep file is
therefore code: run only the ones you would run as a Python script, and treat one from someone else
as you would their program.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from fedopt.errors import ConfigError
from topologies.plugins import PluginRegistry, describe

__all__ = ["ALGORITHMS", "DATASETS", "ENGINES", "PARTITIONERS", "PROBLEMS", "Registry"]

F = TypeVar("F", bound=Callable[..., object])


class Registry(PluginRegistry[F]):
    """A named collection of factories, plus plug-ins by dotted path and entry point.

    Args:
        kind: what the factories make, in messages (``"algorithm"``).
        group: the entry-point group (default ``"fedopt.<kind>s"``).
        positional: the positional arguments factories are called with before their keyword-only
            parameters (problems: ``("context",)``, engines: ``("problem",)``); a plug-in whose
            signature cannot take that call is a one-line :class:`ConfigError`.
    """

    def __init__(self, kind: str, *, group: str | None = None, positional: Sequence[str] = ()) -> None:
        super().__init__(kind, group=group or f"fedopt.{kind}s", error=ConfigError, positional=positional,
                         keyword_only=True)

    def get(self, name: str) -> F:
        """The factory called ``name``; the error lists the available names. A plug-in factory
        comes wrapped so that an exception it raises is a one-line :class:`ConfigError` too."""
        fn = super().get(name)
        if not self.is_plugin(name):
            return fn
        kind = self.kind

        @functools.wraps(fn)
        def plugin(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except ConfigError:
                raise
            except Exception as e:
                raise ConfigError(f"{kind} {name!r} raised {describe(e)}") from None

        return plugin  # type: ignore[return-value]


ALGORITHMS: Registry[Callable[..., object]] = Registry("algorithm")
PROBLEMS: Registry[Callable[..., object]] = Registry("problem", positional=("context",))
DATASETS: Registry[Callable[..., object]] = Registry("dataset")
PARTITIONERS: Registry[Callable[..., object]] = Registry("partition", group="fedopt.partitioners")
ENGINES: Registry[Callable[..., object]] = Registry("engine", positional=("problem",))
