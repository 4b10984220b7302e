"""Counter-based random numbers that are pure functions of a key.

Why not ``torch.Generator``: a generator is mutable state, so it cannot be ``vmap``-ed, and the
numbers a client draws would depend on how many clients ran before it in the same process. Here a
*key* is an int64 tensor and every draw is a pure function of ``(key, shape)``, so

* a client's minibatch depends only on ``(seed, communication round, client id)``, never on the
  engine (loop, ``vmap``, Ray actor, Flower client) or on the other clients in the cohort;
* keys can be batched: a ``[m]`` tensor of keys under ``torch.func.vmap`` gives ``m`` independent
  streams in one call.

The bit mixer is SplitMix64's finalizer (Steele, Lea and Flood, "Fast splittable pseudorandom
number generators", OOPSLA 2014), evaluated with wrapping int64 arithmetic. Streams are derived
JAX-style with :func:`fold_in`. The numbers are good enough for simulation noise and minibatch
indices; they are not meant for cryptography.

Example:
    >>> k = key(0)
    >>> u = uniform(fold_in(k, 3), (4,), dtype=torch.float64)
    >>> bool(((u > 0) & (u < 1)).all())
    True
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = [
    "fold_in", "fold_in_host", "key", "key_host", "normal", "permutation", "randint", "uniform", "uniform_host",
]

# 64-bit constants written as signed int64 (two's complement) so torch accepts them.
_GOLDEN = -7046029254386353131  # 0x9E3779B97F4A7C15
_M1 = -4658895280553007687  # 0xBF58476D1CE4E5B9
_M2 = -7723592293110705685  # 0x94D049BB133111EB


def _srl(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift on int64 (torch's ``>>`` is arithmetic for signed integers)."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def _mix(z: torch.Tensor) -> torch.Tensor:
    z = (z ^ _srl(z, 30)) * _M1
    z = (z ^ _srl(z, 27)) * _M2
    return z ^ _srl(z, 31)


def key(seed: int | torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """The root key of a seed (an int64 scalar tensor)."""
    s = torch.as_tensor(seed, dtype=torch.int64, device=device)
    return _mix(s + _GOLDEN)


def fold_in(k: torch.Tensor, data: int | torch.Tensor) -> torch.Tensor:
    """A new key derived from ``k`` and an integer (a round, a client id, a stream tag).

    ``k`` and ``data`` broadcast, so ``fold_in(round_key, client_ids)`` gives one key per client.
    """
    d = torch.as_tensor(data, dtype=torch.int64, device=k.device)
    return _mix(k ^ _mix(d * _GOLDEN + 1))


# Host-side twins of `key` / `fold_in` on numpy uint64 (bit-identical, about 50x cheaper for
# the per-round key derivation the runner does outside any vmap).
_U = np.uint64


def _mix_host(z: np.ndarray) -> np.ndarray:
    # uint64 *arrays* wrap silently (only numpy scalars warn), so no errstate is needed.
    z = (z ^ (z >> _U(30))) * _U(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> _U(27))) * _U(0x94D049BB133111EB)
    return z ^ (z >> _U(31))


def _as_u64(a: int | np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().numpy()
    return np.atleast_1d(np.asarray(a, dtype=np.int64)).view(np.uint64)


def key_host(seed: int) -> np.ndarray:
    """:func:`key` computed on the host: an int64 array of shape ``[1]``."""
    return _mix_host(_as_u64(seed) + _U(0x9E3779B97F4A7C15)).view(np.int64)


def fold_in_host(k: int | np.ndarray | torch.Tensor, data: int | np.ndarray | torch.Tensor) -> np.ndarray:
    """:func:`fold_in` computed on the host (numpy, broadcasting), bit-identical."""
    d = _mix_host(_as_u64(data) * _U(0x9E3779B97F4A7C15) + _U(1))
    return _mix_host(_as_u64(k) ^ d).view(np.int64)


def uniform_host(k: int | np.ndarray, n: int) -> np.ndarray:
    """:func:`uniform` for one key on the host: ``n`` float64 numbers in (0, 1), bit-identical."""
    counter = np.arange(1, n + 1, dtype=np.uint64)
    bits = _mix_host(_as_u64(k) + counter * _U(0x9E3779B97F4A7C15))
    return ((bits >> _U(11)).astype(np.float64) + 0.5) * (2.0**-53)


_COUNTERS: dict[tuple[int, str], torch.Tensor] = {}


def _counter(n: int, device: torch.device) -> torch.Tensor:
    """``(1..n) * golden``, cached per size and device (it is the same for every key)."""
    c = _COUNTERS.get((n, str(device)))
    if c is None:
        c = torch.arange(1, n + 1, dtype=torch.int64, device=device) * _GOLDEN
        _COUNTERS[(n, str(device))] = c
    return c


def _bits(k: torch.Tensor, n: int) -> torch.Tensor:
    return _mix(k.unsqueeze(-1) + _counter(n, k.device))


def uniform(k: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Uniform numbers in the open interval (0, 1), 53 random bits each."""
    n = math.prod(shape)
    bits = _srl(_bits(k, n), 11)  # the top 53 bits
    u = (bits.to(torch.float64) + 0.5) * (2.0**-53)
    return u.reshape(tuple(k.shape) + tuple(shape)).to(dtype)


def normal(k: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Standard normal numbers by the Box-Muller transform."""
    n = math.prod(shape)
    u = uniform(k, (2, n), dtype=torch.float64)
    z = torch.sqrt(-2.0 * torch.log(u[..., 0, :])) * torch.cos((2.0 * math.pi) * u[..., 1, :])
    return z.reshape(tuple(k.shape) + tuple(shape)).to(dtype)


def randint(k: torch.Tensor, high: int | torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Integers uniform on ``{0, ..., high - 1}`` for ``high < 2**31``; ``high`` may be a (batched)
    tensor. Lemire's multiply-shift range reduction of the top 32 random bits,
    ``(bits * high) >> 32`` (bias below ``high / 2**32``; no integer division, which is slow)."""
    n = math.prod(shape)
    high_t = torch.as_tensor(high, dtype=torch.int64, device=k.device)
    if high_t.dim() > 0:  # one bound per key: align with the key's batch dimensions
        high_t = high_t.reshape(tuple(high_t.shape) + (1,) * len(shape))
    bits = _srl(_bits(k, n), 32).reshape(tuple(k.shape) + tuple(shape))
    return (bits * high_t) >> 32  # bits < 2**32 and high < 2**31: the product fits in int64


def permutation(k: torch.Tensor, n: int) -> torch.Tensor:
    """A uniformly random permutation of ``range(n)`` (argsort of uniforms)."""
    return torch.argsort(uniform(k, (n,)), dim=-1)
