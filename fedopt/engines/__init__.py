"""Engines: where client tasks run (``local`` loop, ``vmap`` batch)."""

from fedopt.engines.base import AbstractEngine
from fedopt.engines.local import LocalEngine, local
from fedopt.engines.vmap import VmapEngine, vmap_engine

__all__ = ["AbstractEngine", "LocalEngine", "VmapEngine", "local", "vmap_engine"]
