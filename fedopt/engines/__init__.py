"""Engines: where client tasks run (``local`` loop, ``vmap`` batch, ``ray`` actors, ``flower`` clients)."""

from fedopt.engines.base import AbstractEngine
from fedopt.engines.flower_engine import FlowerEngine, flower_engine
from fedopt.engines.local import LocalEngine, local
from fedopt.engines.ray_engine import RayEngine, ray_engine
from fedopt.engines.vmap import VmapEngine, vmap_engine

__all__ = ["AbstractEngine", "FlowerEngine", "LocalEngine", "RayEngine", "VmapEngine", "flower_engine", "local", "ray_engine", "vmap_engine"]
