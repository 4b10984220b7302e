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

The torch ops below are the specification. On CPU the same integer arithmetic runs in numpy
(``_on_host``): for one key with Python ints, for a batch of keys as one numpy call, and under
``vmap`` by unwrapping the batched keys so a whole cohort's draws are one call rather than about
fifteen batched tensor ops. The results are bit-identical (tested against the torch ops, also
under nested and chunked ``vmap``); ``HOST_FAST_PATH = False`` turns the fast path off.

Example:
    >>> k = key(0)
    >>> u = uniform(fold_in(k, 3), (4,), dtype=torch.float64)
    >>> bool(((u > 0) & (u < 1)).all())
    True
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

try:  # vmap's batched-tensor internals, for the host fast path of the draws (``_on_host``)
    import torch._C._functorch as _ft

    _ft.is_batchedtensor, _ft.maybe_get_level, _ft._unwrap_batched, _ft._add_batch_dim  # noqa: B018
    _ft.is_functorch_wrapped_tensor  # noqa: B018
except (ImportError, AttributeError):  # pragma: no cover - other torch versions: torch ops only
    _ft = None

__all__ = [
    "fold_in", "fold_in_host", "key", "key_host", "normal", "permutation", "randint", "randint_rows", "uniform",
    "uniform_host",
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


_MASK = (1 << 64) - 1


def _mix_int(z: int) -> int:
    """:func:`_mix` on one unsigned 64-bit Python int."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


@functools.lru_cache(maxsize=4096)
def _fold_constant(data: int) -> int:
    """``_mix(data * golden + 1)`` as an unsigned Python int: what :func:`fold_in` xors into a key."""
    return _mix_int(((data & _MASK) * 0x9E3779B97F4A7C15 + 1) & _MASK)


def fold_in(k: torch.Tensor, data: int | torch.Tensor) -> torch.Tensor:
    """A new key derived from ``k`` and an integer (a round, a client id, a stream tag).

    ``k`` and ``data`` broadcast, so ``fold_in(round_key, client_ids)`` gives one key per client.
    """
    if isinstance(data, int) and -(2**63) <= data < 2**63:
        c = _fold_constant(data)
        if (k.dim() == 0 and HOST_FAST_PATH and k.device.type == "cpu" and not k.requires_grad
                and _ft is not None and not _ft.is_functorch_wrapped_tensor(k)):
            z = _mix_int((int(k) & _MASK) ^ c)  # one key: Python ints beat ten tensor ops
            return torch.tensor(z - (1 << 64) if z >> 63 else z, dtype=torch.int64)
        out = _on_host(lambda kn: _mix_host(kn ^ _U(c)), k)
        if out is not None:
            return out
    d = torch.as_tensor(data, dtype=torch.int64, device=k.device)
    if isinstance(data, torch.Tensor):
        out = _on_host(lambda kn, dn: _mix_host(kn ^ _mix_host(dn * _GOLDEN_U + _U(1))), k, d)
        if out is not None:
            return out
    return _mix(k ^ _mix(d * _GOLDEN + 1))


# Host-side twins of `key` / `fold_in` on numpy uint64 (bit-identical, about 50x cheaper for
# the per-round key derivation the runner does outside any vmap).
_U = np.uint64


_S30, _S27, _S31 = _U(30), _U(27), _U(31)
_M1_U, _M2_U, _GOLDEN_U = _U(0xBF58476D1CE4E5B9), _U(0x94D049BB133111EB), _U(0x9E3779B97F4A7C15)


def _mix_host(z: np.ndarray) -> np.ndarray:
    # uint64 *arrays* wrap silently (only numpy scalars warn), so no errstate is needed. The first
    # line makes a new array; the rest work in place on it (fewer temporaries, same numbers).
    z = z ^ (z >> _S30)
    z *= _M1_U
    z ^= z >> _S27
    z *= _M2_U
    z ^= z >> _S31
    return z


def _as_u64(a: int | np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().numpy()
    return np.atleast_1d(np.asarray(a, dtype=np.int64)).view(np.uint64)


HOST_FAST_PATH = True  # False: always the torch ops (the tests compare the two)


def _on_host(kernel, *args: torch.Tensor) -> torch.Tensor | None:
    """Evaluate an integer ``kernel`` on numpy uint64 for CPU int64 tensors, also under ``vmap``.

    The torch functions in this module are the specification; this is their fast path. On CPU a
    draw is about fifteen tiny int64 ops, and under ``vmap`` each one pays a batching rule, so a
    cohort's minibatch indices cost more than the gradient they feed. Here ``vmap``-batched
    arguments are unwrapped level by level (the kernels broadcast over leading axes, so the whole
    cohort is one numpy call) and the result is wrapped again at the same levels. Arguments are
    aligned as broadcasting aligns them: on the right, after the batch axis.

    Returns ``None`` (callers then run the torch ops) for other devices, tensors that track
    gradients, other functorch wrappers, or a torch without these functorch internals.
    """
    if _ft is None or not HOST_FAST_PATH:
        return None
    if not any(map(_ft.is_functorch_wrapped_tensor, args)):  # plain tensors: the common case, first
        if any(a.device.type != "cpu" or a.requires_grad for a in args):
            return None
        out = kernel(*(a.numpy().view(np.uint64) if a.dim() else a.numpy().reshape(1).view(np.uint64) for a in args))
        if out.ndim > 0 and out.shape[0] == 1 and all(a.dim() == 0 for a in args):
            out = out.reshape(out.shape[1:])  # the 0-d arguments were made 1-d above; undo it
        if out.dtype == np.uint64:
            out = out.view(np.int64)
        return torch.from_numpy(out if out.flags.c_contiguous else out.copy())  # (ascontiguousarray makes 0-d 1-d)
    level = max((_ft.maybe_get_level(a) for a in args if _ft.is_batchedtensor(a)), default=None)
    if level is None:  # wrapped by another transform (grad tracking): the torch ops
        return None
    rank = max(a.dim() for a in args)
    size, inner = 0, []
    for a in args:
        if _ft.is_batchedtensor(a) and _ft.maybe_get_level(a) == level:
            u, bdim = _ft._unwrap_batched(a, level)
            if bdim:
                u = u.movedim(bdim, 0)
            size = u.shape[0]
        else:
            u = a.unsqueeze(0)
        if a.dim() < rank:
            u = u.reshape((u.shape[0],) + (1,) * (rank - a.dim()) + tuple(u.shape[1:]))
        inner.append(u)
    out = _on_host(kernel, *inner)
    if out is None:
        return None
    if out.shape[0] != size:
        out = out.expand((size,) + tuple(out.shape[1:]))
    return _ft._add_batch_dim(out, 0, level)


def key_host(seed: int) -> np.ndarray:
    """:func:`key` computed on the host: an int64 array of shape ``[1]``."""
    return _mix_host(_as_u64(seed) + _GOLDEN_U).view(np.int64)


def fold_in_host(k: int | np.ndarray | torch.Tensor, data: int | np.ndarray | torch.Tensor) -> np.ndarray:
    """:func:`fold_in` computed on the host (numpy, broadcasting), bit-identical."""
    kk, dd = _as_u64(k), _as_u64(data)
    if dd.shape == (1,):  # one datum (a round, a tag): its mixed constant is cached
        if kk.shape == (1,):  # and one key: Python ints beat numpy's per-call cost
            return np.array([_mix_int(int(kk[0]) ^ _fold_constant(int(dd[0])))], dtype=np.uint64).view(np.int64)
        return _mix_host(kk ^ _U(_fold_constant(int(dd[0])))).view(np.int64)
    return _mix_host(kk ^ _mix_host(dd * _GOLDEN_U + _U(1))).view(np.int64)


def uniform_host(k: int | np.ndarray, n: int) -> np.ndarray:
    """:func:`uniform` for one key on the host: ``n`` float64 numbers in (0, 1), bit-identical."""
    return _uniform_host(_as_u64(k)[:1], (n,))[0]


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


_HOST_COUNTERS: dict[int, np.ndarray] = {}


def _bits_host(kn: np.ndarray, n: int) -> np.ndarray:
    """:func:`_bits` on numpy uint64 (bit-identical): ``kn.shape + (n,)`` mixed counters."""
    c = _HOST_COUNTERS.get(n)
    if c is None:
        c = _HOST_COUNTERS[n] = np.arange(1, n + 1, dtype=np.uint64) * _GOLDEN_U
    return _mix_host(kn[..., None] + c)


def _uniform_host(kn: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    u = (_bits_host(kn, math.prod(shape)) >> _U(11)).astype(np.float64)
    u += 0.5
    u *= 2.0**-53  # every step is exact in float64, so this equals the torch path bit for bit
    return u.reshape(kn.shape + tuple(shape))


def uniform(k: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Uniform numbers in the open interval (0, 1), 53 random bits each."""
    out = _on_host(lambda kn: _uniform_host(kn, tuple(shape)), k)
    if out is not None:
        return out.to(dtype)
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

    def host(kn: np.ndarray, hn: np.ndarray) -> np.ndarray:
        z = (_bits_host(kn, n) >> _U(32)).reshape(kn.shape + tuple(shape))
        z = z * hn.reshape(hn.shape + (1,) * len(shape))  # not in place: a per-key bound may broadcast z
        z >>= _U(32)
        return z

    out = _on_host(host, k, high_t)
    if out is not None:
        return out
    if high_t.dim() > 0:  # one bound per key: align with the key's batch dimensions
        high_t = high_t.reshape(tuple(high_t.shape) + (1,) * len(shape))
    bits = _srl(_bits(k, n), 32).reshape(tuple(k.shape) + tuple(shape))
    return (bits * high_t) >> 32  # bits < 2**32 and high < 2**31: the product fits in int64


def randint_rows(k: torch.Tensor, client: torch.Tensor, offsets: torch.Tensor, counts: torch.Tensor,
                 shape: tuple[int, ...]) -> torch.Tensor:
    """Rows of client ``client``'s block in a client-major array (``offsets[client]`` onwards,
    ``counts[client]`` rows): ``offsets[client] + randint(k, counts[client], shape)``, the same
    numbers. ``client`` and ``k`` may carry leading (cohort) axes or be ``vmap``-batched; on CPU the
    lookup and the draw are one host call."""
    n = math.prod(shape)
    if offsets.device.type == "cpu" and HOST_FAST_PATH:
        off_u, cnt_u = offsets.numpy().view(np.uint64), counts.numpy().view(np.uint64)

        def host(kn: np.ndarray, cn: np.ndarray) -> np.ndarray:
            tail = (1,) * len(shape)
            z = (_bits_host(kn, n) >> _U(32)).reshape(kn.shape + tuple(shape))
            z = z * cnt_u[cn].reshape(cn.shape + tail)  # not in place: the bound may broadcast z
            z >>= _U(32)
            z += off_u[cn].reshape(cn.shape + tail)
            return z

        out = _on_host(host, k, client)
        if out is not None:
            return out
    tail = (1,) * len(shape)
    return offsets[client].reshape(client.shape + tail) + randint(k, counts[client], shape)


def permutation(k: torch.Tensor, n: int) -> torch.Tensor:
    """A uniformly random permutation of ``range(n)`` (argsort of uniforms)."""
    return torch.argsort(uniform(k, (n,)), dim=-1)
