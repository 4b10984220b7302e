"""Plug-ins by name: one resolver behind every registry (``fedopt``'s and the topologies').

A name resolves, in order, as

1. a name registered with :meth:`PluginRegistry.register` (the built-ins, or a user's
   ``@REGISTRY.register("mine")`` in code that has been imported);
2. a dotted path ``"package.module:attr"``, imported on demand; ``attr`` may be nested
   (``"package.module:Class.factory"``);
3. an entry point named ``name`` in the registry's group (``fedopt.<kind>``, e.g.
   ``fedopt.topologies``) of any installed distribution.

Every way a plug-in can be broken (a malformed path, a missing module, a module that raises on
import, a missing attribute, something that is not callable, a signature that cannot take the
call, an entry point that fails to load, an unknown name) is one line naming the plug-in and the
problem, raised as the registry's own error type. Importing a plug-in runs its code: whoever
writes the name (a config file, a sweep file) is trusted like code.

This module knows nothing of :mod:`fedopt`; it is the bottom layer.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from importlib import metadata
from typing import Any, Generic, TypeVar

__all__ = ["PATH_FORM", "PluginError", "PluginRegistry", "active_paths", "check_signature", "describe", "load_path",
           "plugin_path"]

F = TypeVar("F", bound=Callable[..., Any])

PATH_FORM = "'package.module:factory'"


class PluginError(LookupError):
    """A plug-in that cannot be resolved; the message is one line (no plug-in name prefix)."""


def describe(e: BaseException) -> str:
    """``"Type: first line of the message"`` (or just ``"Type"``), always one line."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0].strip()}" if lines else type(e).__name__


def _split_path(path: str) -> tuple[str, list[str]]:
    """``"pkg.mod:A.b"`` -> ``("pkg.mod", ["A", "b"])``; a :class:`PluginError` if malformed."""
    module, sep, attr = path.partition(":")
    if not sep or ":" in attr:
        raise PluginError(f"is not a valid plug-in path; expected {PATH_FORM} (exactly one ':')")
    for part, what in ((module, "module"), (attr, "attribute")):
        if not part:
            raise PluginError(f"is not a valid plug-in path; the {what} part is empty (expected {PATH_FORM})")
        if not all(p.isidentifier() for p in part.split(".")):
            raise PluginError(f"is not a valid plug-in path; {part!r} is not a dotted Python name "
                              f"(expected {PATH_FORM})")
    return module, attr.split(".")


def load_path(path: str) -> Any:
    """The object at ``"package.module:attr[.attr...]"``, importing the module on demand.

    Raises :class:`PluginError` (one line) for a malformed path, a missing module, a module that
    raises on import (any exception: its type and first line are named) or a missing attribute."""
    module_name, attrs = _split_path(path)
    try:
        obj = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name is not None and (module_name == e.name or module_name.startswith(e.name + ".")):
            raise PluginError(f"cannot import module {module_name!r} (no module named {e.name!r} "
                              "on the Python path)") from None
        raise PluginError(f"importing module {module_name!r} raised {describe(e)}") from None
    except (Exception, SystemExit) as e:  # noqa: BLE001 -- a plug-in module may raise anything on import
        raise PluginError(f"importing module {module_name!r} raised {describe(e)}") from None
    where = f"module {module_name!r}"
    for i, attr in enumerate(attrs):
        try:
            obj = getattr(obj, attr)
        except AttributeError:
            raise PluginError(f"{where} has no attribute {attr!r}") from None
        except Exception as e:  # noqa: BLE001 -- a property or module __getattr__ may raise anything
            raise PluginError(f"reading {attr!r} from {where} raised {describe(e)}") from None
        where = repr(f"{module_name}:{'.'.join(attrs[:i + 1])}")
    return obj


def check_signature(fn: Callable[..., Any], positional: Sequence[str], *, keyword_only: bool) -> str | None:
    """Why ``fn(*positional, **params)`` cannot work, or ``None`` if it can (or cannot be told).

    ``fn`` must accept ``len(positional)`` positional arguments; every other required parameter
    must be passable by keyword (with ``keyword_only``: be keyword-only, as config parameters are)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # builtins without a signature: nothing to check
        return None
    shown = " ".join(str(sig).split())
    try:
        bound = sig.bind_partial(*([None] * len(positional)))
    except TypeError as e:
        return f"its signature {shown} does not take {len(positional) or 'no'} positional argument(s) ({e})"
    for name, p in sig.parameters.items():
        if name in bound.arguments or p.default is not inspect.Parameter.empty:
            continue
        if p.kind is p.POSITIONAL_ONLY or (keyword_only and p.kind is p.POSITIONAL_OR_KEYWORD):
            return f"its signature {shown} has a required positional parameter {name!r}; " \
                   "parameters must be keyword-only (def f(" + ", ".join([*positional, "*", "..."]) + "))"
    return None


class PluginRegistry(Generic[F]):
    """Name -> factory, plus dotted paths and entry points (see the module docstring).

    Args:
        kind: what the factories make, for messages (``"algorithm"``, ``"topology"``).
        group: the entry-point group searched (``"fedopt.algorithms"``).
        error: the exception type raised for every failure (one-line message).
        positional: the names of the positional arguments the factory is called with (``("n",)``,
            ``("context",)``); keyword parameters follow.
        keyword_only: the other parameters are passed by keyword and must be keyword-only.
    """

    def __init__(self, kind: str, *, group: str, error: type[Exception] = PluginError,
                 positional: Sequence[str] = (), keyword_only: bool = False) -> None:
        self.kind = kind
        self.group = group
        self.error = error
        self.positional = tuple(positional)
        self.keyword_only = keyword_only
        self.registered: dict[str, F] = {}

    @property
    def call(self) -> str:
        """How factories are called, for messages: ``factory(context, **params)``."""
        return f"factory({', '.join([*self.positional, '**params'])})"

    def register(self, name: str) -> Callable[[F], F]:
        """Decorator that registers ``fn`` under ``name``."""

        def deco(fn: F) -> F:
            if name in self.registered and self.registered[name] is not fn:
                raise self.error(f"{self.kind} {name!r} is registered twice")
            self.registered[name] = fn
            return fn

        return deco

    def entry_points(self) -> dict[str, metadata.EntryPoint]:
        """Installed entry points of this registry's group, by name (the first of a name wins).

        A distribution whose entry points cannot be read (a malformed ``entry_points.txt``) is
        skipped here and named in the unknown-name error (:meth:`unreadable`)."""
        return self._scan()[0]

    def unreadable(self) -> list[str]:
        """``"dist version (Type: reason)"`` for every installed distribution whose entry points
        cannot be read."""
        return self._scan()[1]

    def _scan(self) -> tuple[dict[str, metadata.EntryPoint], list[str]]:
        out: dict[str, metadata.EntryPoint] = {}
        broken: list[str] = []
        seen: set[str] = set()
        for dist in metadata.distributions():
            dist_name = getattr(dist, "_normalized_name", None)  # from the folder name: no METADATA parse
            if dist_name is None:
                try:
                    dist_name = dist.metadata["Name"] or "?"
                except Exception:  # noqa: BLE001 -- unreadable metadata: not ours to judge
                    dist_name = "?"
            if dist_name in seen:  # the first of a name on sys.path wins, as importlib.metadata does
                continue
            seen.add(dist_name)
            try:
                eps = [ep for ep in dist.entry_points if ep.group == self.group]
            except Exception as e:  # noqa: BLE001 -- a malformed entry_points.txt raises anything
                try:
                    label = f"{dist.metadata['Name']} {dist.version}"
                except Exception:  # noqa: BLE001
                    label = dist_name
                broken.append(f"{label} ({describe(e)})")
                continue
            for ep in eps:
                out.setdefault(ep.name, ep)
        return out, broken

    def names(self) -> list[str]:
        """Registered names plus installed entry-point names, sorted."""
        return sorted(set(self.registered) | set(self.entry_points()))

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and (name in self.registered or name in self.entry_points())

    def is_plugin(self, name: str) -> bool:
        """Whether ``name`` resolves to user code from outside the registry (a path or entry point)."""
        return name not in self.registered

    def get(self, name: str) -> F:
        """The factory called ``name``: registered, ``module:attr``, or an entry point. Every
        failure is one line, raised as ``self.error``."""
        if not isinstance(name, str) or not name:
            raise self.error(f"{self.kind} name must be a non-empty string, got {name!r}")
        if name in self.registered:
            obj: Any = self.registered[name]
        elif ":" in name:
            try:
                obj = load_path(name)
            except PluginError as e:
                raise self.error(f"{self.kind} {name!r}: {e}") from None
        else:
            ep = self.entry_points().get(name)
            if ep is None:
                hint = ""
                if "." in name and all(p.isidentifier() for p in name.split(".")):
                    module, _, attr = name.rpartition(".")
                    hint = f"; did you mean '{module}:{attr}'?"
                broken = self.unreadable()
                if broken:
                    hint += f"; cannot read the entry points of {', '.join(broken)}"
                raise self.error(f"unknown {self.kind} {name!r}; available: {', '.join(self.names()) or '(none)'} "
                                 f"(or a plug-in {PATH_FORM}){hint}")
            obj = self._load_entry_point(name, ep)
        if not callable(obj):
            raise self.error(f"{self.kind} {name!r} is not callable (got a value of type {type(obj).__name__!r}); "
                             f"expected a factory called as {self.call}")
        problem = check_signature(obj, self.positional, keyword_only=self.keyword_only)
        if problem:
            raise self.error(f"{self.kind} {name!r} cannot be called as {self.call}: {problem}")
        return obj

    def _load_entry_point(self, name: str, ep: metadata.EntryPoint) -> Any:
        dist = getattr(ep, "dist", None)
        where = f"entry point {ep.name} = {ep.value} in group {self.group!r}" + (
            f" of {dist.name} {dist.version}" if dist is not None else "")
        pattern = getattr(ep, "pattern", None)
        if pattern is not None and (pattern.match(ep.value) is None or ":" not in ep.value):
            raise self.error(f"{self.kind} {name!r}: {where} is malformed; expected {PATH_FORM}")
        try:
            return ep.load()
        except (Exception, SystemExit) as e:  # noqa: BLE001 -- loading runs the plug-in's module
            raise self.error(f"{self.kind} {name!r}: {where} failed to load: {describe(e)}") from None


# ---- where plug-in modules are imported from --------------------------------------------------

_ACTIVE: list[str] = []


def active_paths() -> list[str]:
    """The folders :func:`plugin_path` has put on ``sys.path`` now (outermost first; for handing
    to worker processes that do not inherit ``sys.path``, e.g. as ``PYTHONPATH``)."""
    return list(dict.fromkeys(_ACTIVE))


@contextlib.contextmanager
def plugin_path(*folders: str | os.PathLike[str]) -> Iterator[list[str]]:
    """Put ``folders`` (made absolute) at the front of ``sys.path``, in this order, for the block.

    On exit the entries it added are removed again; modules imported meanwhile stay imported.
    Spawned worker processes started inside the block inherit the path (``multiprocessing``
    forwards ``sys.path``)."""
    added = list(dict.fromkeys(os.path.abspath(os.fspath(f)) for f in folders))
    sys.path[:0] = added
    _ACTIVE.extend(added)
    importlib.invalidate_caches()
    try:
        yield added
    finally:
        for entry in added:
            with contextlib.suppress(ValueError):
                sys.path.remove(entry)
            with contextlib.suppress(ValueError):
                _ACTIVE.remove(entry)
