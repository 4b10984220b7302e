"""What travels to remote clients: client tasks by value, the problem by reference, tensors as arrays.

A :class:`~fedopt.algorithms.base.Task` is a closure built inside a server program (it captures the
batch size, step sizes and the problem). Remote workers (Ray actors, Flower clients) already hold
the problem and its data, so a task is pickled with ``cloudpickle`` *except* the problem: every
reference to it is written as a persistent id and resolved, on the receiving side, to the
worker's own copy. A task is then a few kilobytes, sent once and cached by its token; per round
only the payload and the replies travel.

Security note: a pickled task is code. A worker runs what its server sends, so the two must trust
each other (the same trust a Flower deployment already places in the server's ClientApp code).
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
from typing import Any

import numpy as np
import torch
from torch.utils._pytree import tree_flatten, tree_unflatten, treespec_dumps, treespec_loads

from fedopt.algorithms.base import Task

__all__ = ["TaskCodec", "decode_tree", "dumps_task", "encode_tree", "loads_task", "ship_plugins_by_value"]

_PROBLEM_ID = "fedopt:problem"


class _TaskUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, problem: Any) -> None:
        super().__init__(file)
        self._problem = problem

    def persistent_load(self, pid: Any) -> Any:  # noqa: D102 - pickle hook
        if pid != _PROBLEM_ID:
            raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")
        return self._problem


def ship_plugins_by_value() -> list[str]:
    """Make plug-in code travel with the objects that use it.

    A plug-in module imported from a plug-in folder (the config file's folder or the current
    folder, see :func:`topologies.plugins.plugin_path`) is not importable in a Ray worker or a
    Flower client process, which do not share this process's ``sys.path``. Every such top-level
    module is registered with ``cloudpickle`` (and Ray's copy of it) to be pickled *by value*, so a
    plug-in problem, model or task arrives with its code. Modules importable without those folders
    (fedopt itself, installed packages) keep travelling by reference. Returns the names registered.
    """
    import importlib.machinery
    import os
    import sys
    from importlib.metadata import packages_distributions

    from topologies.plugins import active_paths

    roots = [os.path.realpath(p) for p in active_paths()]
    if not roots:
        return []
    elsewhere = [p for p in sys.path if p and os.path.realpath(p) not in roots]
    installed = packages_distributions()  # top-level names of installed distributions (editable too)
    names = []
    for name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None)
        if "." in name or not file or not any(os.path.realpath(file).startswith(r + os.sep) for r in roots):
            continue
        if name in installed or importlib.machinery.PathFinder.find_spec(name, elsewhere) is not None:
            continue  # importable anyway (e.g. the current folder is a checkout of an installed package)
        names.append(name)
    picklers = []
    import cloudpickle

    picklers.append(cloudpickle)
    try:
        import ray.cloudpickle as ray_cloudpickle

        picklers.append(ray_cloudpickle)
    except ImportError:
        pass
    for name in names:
        for pickler in picklers:
            pickler.register_pickle_by_value(sys.modules[name])
    return names


def dumps_task(task: Task, problem: Any) -> bytes:
    """``task`` as bytes, with ``problem`` replaced by a reference (needs ``cloudpickle``, which the
    ``ray`` and ``flower`` extras bring)."""
    import cloudpickle

    ship_plugins_by_value()  # a plug-in algorithm's task code travels with the task

    class TaskPickler(cloudpickle.CloudPickler):
        def persistent_id(self, obj: Any) -> str | None:
            return _PROBLEM_ID if obj is problem else None

    buf = io.BytesIO()
    TaskPickler(buf, protocol=pickle.HIGHEST_PROTOCOL).dump(task)
    return buf.getvalue()


def loads_task(blob: bytes, problem: Any) -> Task:
    """The task of :func:`dumps_task`, bound to the receiver's ``problem``."""
    return _TaskUnpickler(io.BytesIO(blob), problem).load()


class TaskCodec:
    """Sender side: each task pickled once, named by the hash of its bytes (its *token*)."""

    def __init__(self, problem: Any) -> None:
        self.problem = problem
        self._cache: dict[int, tuple[Task, str, bytes]] = {}  # id(task) -> (task kept alive, token, blob)

    def encode(self, task: Task) -> tuple[str, bytes]:
        hit = self._cache.get(id(task))
        if hit is None:
            blob = dumps_task(task, self.problem)
            hit = (task, hashlib.sha1(blob).hexdigest(), blob)
            if len(self._cache) > 256:  # programs build a handful of tasks; bound it anyway
                self._cache.clear()
            self._cache[id(task)] = hit
        return hit[1], hit[2]


def encode_tree(tree: Any) -> tuple[list[np.ndarray], str]:
    """A pytree as (numpy arrays, spec string). Tensor leaves become arrays; ``None`` and Python
    numbers are kept in the spec (so ``decode_tree`` gives back exactly the same kinds)."""
    leaves, spec = tree_flatten(tree)
    arrays, kinds = [], []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            arrays.append(leaf.detach().cpu().numpy())
            kinds.append("t")
        elif leaf is None or isinstance(leaf, bool | int | float):
            kinds.append(["v", leaf])
        else:
            raise TypeError(f"cannot send a {type(leaf).__name__} to a client (tensors, numbers and None only)")
    return arrays, json.dumps({"spec": treespec_dumps(spec), "kinds": kinds})


def decode_tree(arrays: list[np.ndarray], spec: str, device: torch.device | str = "cpu") -> Any:
    """Inverse of :func:`encode_tree` (arrays copied into new tensors on ``device``)."""
    meta = json.loads(spec)
    it = iter(arrays)
    leaves = [torch.from_numpy(np.array(next(it), copy=True)).to(device) if kind == "t" else kind[1]
              for kind in meta["kinds"]]
    return tree_unflatten(leaves, treespec_loads(meta["spec"]))
