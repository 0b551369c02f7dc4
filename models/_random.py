"""Counter-based random streams for the stochastic models, vectorised over members.

Why not a ``torch.Generator``? A generator fills a tensor of shape ``(n, ...)`` in an order
that depends on ``n`` (and on the device), so the noise a member sees would depend on how many
other members share its forward call: batched != one-by-one and chunked != unchunked. Here
every random number is a pure function of three integers,

    value = mix(key + (counter + 1) * gamma),

the SplitMix64 generator (Steele, Lea & Flood 2014; ``mix`` is its 64-bit finaliser,
``gamma`` the golden-ratio increment) evaluated at position ``counter`` of the stream
``key``. A member's ``key`` comes from the model's ``seed`` and either its parameter values
(default), its row in the call (``row_streams=True``), or nothing at all
(``common_noise=True``: common random numbers, one stream for every member); ``counter``
says which draw of that member it is (time step, component, event number). No state is kept
between calls, so the same parameters and seed always give the same prediction, on any
device and in any batch.

The arithmetic is 64-bit integer arithmetic modulo ``2**64`` done in ``torch.int64``
(two's-complement wrap-around; logical shifts are arithmetic shifts plus a mask).

Uniforms take the top 52 (float64) or 23 (float32) bits: ``u = (b + 0.5) 2^-bits`` lies in
the open interval ``(0, 1)``, so ``log(u)`` is finite. Normals use Box-Muller on pairs of
uniforms; Poisson counts use sequential inversion of the CDF for ``lambda < 10`` and
Hoermann's PTRS rejection sampler (as numpy does) above.

>>> import torch
>>> key = stream_keys(torch.zeros(3, 1, dtype=torch.float64), seed=0, row_streams=True)
>>> u = uniform(key[:, None], torch.arange(4)[None, :], torch.float64)
>>> u.shape, bool(((u > 0) & (u < 1)).all())
(torch.Size([3, 4]), True)
>>> torch.equal(u, uniform(key[:, None], torch.arange(4)[None, :], torch.float64))
True
"""

from __future__ import annotations

import math
from numbers import Integral

import torch

__all__ = ["stream_keys", "generator_keys", "uniform", "standard_normal", "poisson",
           "check_seed"]

_M64 = 1 << 64


def _s64(c: int) -> int:
    """An unsigned 64-bit constant as the signed int64 with the same bits."""
    c %= _M64
    return c - _M64 if c >= 1 << 63 else c


_GAMMA = _s64(0x9E3779B97F4A7C15)
_M1 = _s64(0xBF58476D1CE4E5B9)
_M2 = _s64(0x94D049BB133111EB)
_ROW_SALT = _s64(0xD1B54A32D192ED03)
_PAR_SALT = _s64(0x8CB92BA72F3D8DD7)


def _srl(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 bits."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def _mix(z: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finaliser: a bijection of 64-bit words with good avalanche."""
    z = (z ^ _srl(z, 30)) * _M1
    z = (z ^ _srl(z, 27)) * _M2
    return z ^ _srl(z, 31)


def _mix_int(z: int) -> int:
    """``_mix`` on one Python int (for seeds)."""
    z %= _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % _M64
    return _s64(z ^ (z >> 31))


def check_seed(seed: object) -> int:
    """Validate a model's ``seed`` (any Python int)."""
    if isinstance(seed, bool) or not isinstance(seed, Integral):
        raise TypeError(f"seed: expected an int, got {type(seed).__name__} {seed!r}"[:200])
    return int(seed)


def stream_keys(
    parameters: torch.Tensor,
    *,
    seed: int,
    common_noise: bool = False,
    row_streams: bool = False,
) -> torch.Tensor:
    """One stream key per member, shape ``(N_ens,)`` (or ``(1,)`` for common noise).

    Parameters
    ----------
    parameters : Tensor, shape (N_ens, N_par)
        The physical parameters of the members in this call.
    seed : int
    common_noise : bool
        One key for everybody: common random numbers.
    row_streams : bool
        Key by the row index within the call instead of by the parameter values.
    """
    base = _mix_int(seed)
    device = parameters.device
    if common_noise:
        return torch.full((1,), base, dtype=torch.int64, device=device)
    n = parameters.shape[0]
    if row_streams:
        rows = torch.arange(n, dtype=torch.int64, device=device)
        return _mix(_mix(rows * _GAMMA + _ROW_SALT) ^ base)
    # the float64 bits of the values (exact for float32 too, so a float32 and a float64 model
    # key the same values alike); devices without float64 hash on the CPU
    host = parameters if parameters.device.type != "mps" else parameters.cpu()
    bits = host.to(torch.float64).contiguous().view(torch.int64)
    cols = torch.arange(1, parameters.shape[1] + 1, dtype=torch.int64, device=host.device)
    h = _mix(bits + cols * _GAMMA).sum(dim=1)  # wraps modulo 2**64
    return _mix(_mix(h + _PAR_SALT) ^ base).to(device)


def generator_keys(n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """``n`` fresh stream keys, shape ``(n,)``, drawn from ``generator`` (uniform int64 words,
    on the generator's device, then moved to ``device``): the keys of one ``propagate`` call
    of a stochastic model, one per member, so the caller's generator alone fixes the noise.

    >>> g = torch.Generator().manual_seed(0)
    >>> k = generator_keys(3, g, torch.device("cpu"))
    >>> k.shape, k.dtype, torch.equal(k, generator_keys(3, g, torch.device("cpu")))
    (torch.Size([3]), torch.int64, False)
    """
    return torch.randint(-(2 ** 63), 2 ** 63 - 1, (n,), generator=generator, dtype=torch.int64,
                         device=generator.device).to(device)


def _bits(key: torch.Tensor, counter: torch.Tensor | int) -> torch.Tensor:
    if isinstance(counter, torch.Tensor):
        return _mix(key + (counter + 1) * _GAMMA)
    return _mix(key + _s64((int(counter) + 1) * _GAMMA))


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def uniform(key: torch.Tensor, counter: torch.Tensor | int, dtype: torch.dtype) -> torch.Tensor:
    """Uniforms on the open interval ``(0, 1)``; ``key`` and ``counter`` broadcast.

    Float64 uses 52 random bits, anything else 23 bits computed in float32 (then cast), so a
    float32 and a float64 model see the same numbers to about ``1e-7``.
    """
    if _work_dtype(dtype) == torch.float64:
        b = _srl(_bits(key, counter), 12).to(torch.float64)
        u = (b + 0.5) * 2.0 ** -52
    else:
        b = _srl(_bits(key, counter), 41).to(torch.float32)
        u = (b + 0.5) * 2.0 ** -23
    return u.to(dtype)


def standard_normal(key: torch.Tensor, first: int, count: int, dtype: torch.dtype) -> torch.Tensor:
    """``(len(key), count)`` standard normals from pairs ``first, first + 1, ...`` of a stream.

    Box-Muller: pair ``q`` uses the uniforms at counters ``2q`` and ``2q + 1`` and gives two
    normals ``r cos(2 pi u2)`` and ``r sin(2 pi u2)``, ``r = sqrt(-2 log u1)``; a draw of
    ``count`` normals uses ``ceil(count / 2)`` pairs.
    """
    wd = _work_dtype(dtype)
    pairs = (count + 1) // 2
    q = torch.arange(first, first + pairs, dtype=torch.int64, device=key.device)
    k = key[:, None]
    u1 = uniform(k, 2 * q, wd)
    u2 = uniform(k, 2 * q + 1, wd)
    r = torch.sqrt(-2.0 * torch.log(u1))
    ang = (2.0 * math.pi) * u2
    z = torch.stack([r * torch.cos(ang), r * torch.sin(ang)], dim=-1).reshape(key.shape[0], -1)
    return z[:, :count].to(dtype)


# Each Poisson draw owns a sub-stream of _POISSON_STRIDE uniforms (rejection needs a variable
# number of them); the caller's counter names the draw.
_POISSON_STRIDE = 1 << 12
_SMALL_LAMBDA = 10.0
_TABLE = 64  # P(X >= 64 | lambda < 10) < 1e-25; also caps a CDF that rounds below u


def poisson(key: torch.Tensor, counter: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """Poisson counts with means ``lam`` (any shape; ``key``, ``counter`` broadcast to it).

    Returned in ``lam``'s dtype (float: exact integers up to ``2**24`` in float32). Computed
    in float64 unless the device lacks it (then float32). ``lam < 10``: inversion, one
    uniform, walking the CDF term by term. ``lam >= 10``: PTRS (Hoermann 1993,
    "The transformed rejection method for generating Poisson random variables"), two
    uniforms per trial, about 1.1 trials on average.
    """
    out_dtype = lam.dtype
    wd = torch.float32 if lam.device.type == "mps" else torch.float64
    lam = lam.to(wd)
    key, counter, lam = torch.broadcast_tensors(key, counter, lam)
    base = counter * _POISSON_STRIDE
    flat_lam = lam.reshape(-1)
    flat_key = key.reshape(-1)
    flat_base = base.reshape(-1)
    out = torch.zeros_like(flat_lam)

    small = flat_lam < _SMALL_LAMBDA
    if bool(small.any()):
        idx = torch.nonzero(small).squeeze(1)
        out[idx] = _inversion(flat_key[idx], flat_base[idx], flat_lam[idx].clamp(min=0.0))

    large = ~small & torch.isfinite(flat_lam)
    if bool(large.any()):
        idx = torch.nonzero(large).squeeze(1)
        out[idx] = _ptrs(flat_key[idx], flat_base[idx], flat_lam[idx])
    out = torch.where(torch.isnan(flat_lam) | torch.isinf(flat_lam), flat_lam, out)
    return out.reshape(lam.shape).to(out_dtype)


def _inversion(key: torch.Tensor, base: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """Smallest ``k`` with ``F(k) >= u``, walking the CDF with ``p_k = p_{k-1} lam / k``.

    The sweep runs until every draw is found (at most ``_TABLE`` terms), but each draw's
    answer depends only on its own ``lam`` and ``u``.
    """
    u = uniform(key, base, lam.dtype)
    p = torch.exp(-lam)
    cdf = p
    k = torch.zeros_like(lam)
    todo = u > cdf
    for i in range(1, _TABLE + 1):
        if not bool(todo.any()):
            break
        p = p * lam / i
        cdf = cdf + p
        k = k + todo.to(lam.dtype)
        todo = todo & (u > cdf)
    return k


def _ptrs(key: torch.Tensor, base: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    wd = lam.dtype
    slam = torch.sqrt(lam)
    loglam = torch.log(lam)
    b = 0.931 + 2.53 * slam
    a = -0.059 + 0.02483 * b
    invalpha = 1.1239 + 1.1328 / (b - 3.4)
    vr = 0.9277 - 3.6224 / (b - 2.0)
    out = torch.zeros_like(lam)
    todo = torch.ones_like(lam, dtype=torch.bool)
    for trial in range(_POISSON_STRIDE // 2):
        uu = uniform(key, base + 2 * trial, wd) - 0.5
        v = uniform(key, base + 2 * trial + 1, wd)
        us = 0.5 - uu.abs()
        k = torch.floor((2.0 * a / us + b) * uu + lam + 0.43)
        fast = (us >= 0.07) & (v <= vr)
        slow = (k >= 0) & ~((us < 0.013) & (v > us))
        lhs = torch.log(v) + torch.log(invalpha) - torch.log(a / (us * us) + b)
        rhs = -lam + k * loglam - torch.lgamma(k.clamp(min=0.0) + 1.0)
        accept = todo & (fast | (slow & (lhs <= rhs)))
        out = torch.where(accept, k, out)
        todo = todo & ~accept
        if not bool(todo.any()):
            break
    return out
