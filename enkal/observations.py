"""Observations ``y`` (``N_obs``) and their noise covariance ``R = L L^T``.

The noise is given one of three ways (exactly one):

* ``noise_std``: a scalar or an ``(N_obs,)`` vector of standard deviations (diagonal ``R``);
* ``noise_cov``: a full ``(N_obs, N_obs)`` symmetric positive-definite covariance;
* ``noise_chol``: its lower Cholesky factor ``L``.

Everything downstream only needs two operations, both members first: whitening
``Z L^-T`` of an ``(N_ens, N_obs)`` array, and drawing noise ``eps ~ N(0, alpha R)``.
A diagonal noise never builds an ``N_obs x N_obs`` matrix.

>>> import torch
>>> obs = Observations(torch.tensor([1.0, 2.0]), noise_std=0.5)
>>> obs.whiten(torch.ones(3, 2))[0]
tensor([2., 2.], dtype=torch.float64)
"""

from __future__ import annotations

from typing import Any

import torch

from ._checks import as_float_tensor, check_finite

__all__ = ["Observations"]


class Observations:
    """Observed values and their Gaussian noise.

    Parameters
    ----------
    values : array-like, shape (N_obs,)
        The observations ``y``. Finite.
    noise_std : float or array-like of shape (N_obs,), optional
        Standard deviations of independent noise. Strictly positive and finite.
    noise_cov : array-like, shape (N_obs, N_obs), optional
        Full noise covariance ``R`` (symmetric positive definite).
    noise_chol : array-like, shape (N_obs, N_obs), optional
        Lower-triangular Cholesky factor ``L`` of ``R`` with positive diagonal.

    Values and noise are kept in float64 on the device of ``values``; the update kernels
    move them to the predictions' device (they are small).
    """

    def __init__(self, values: Any, noise_std: Any = None, *, noise_cov: Any = None,
                 noise_chol: Any = None) -> None:
        given = [n for n, v in (("noise_std", noise_std), ("noise_cov", noise_cov),
                                ("noise_chol", noise_chol)) if v is not None]
        if len(given) != 1:
            raise ValueError(
                "Observations: expected exactly one of noise_std, noise_cov, noise_chol, "
                f"got {given or 'none'}"
            )
        y = as_float_tensor(values, "values", dtype=torch.float64)
        if y.ndim == 2 and 1 in y.shape:
            raise ValueError(
                f"values: expected a 1-D (N_obs,) vector, got shape {tuple(y.shape)}; "
                "flatten it with .reshape(-1)"
            )
        if y.ndim != 1 or y.numel() == 0:
            raise ValueError(
                f"values: expected a non-empty 1-D (N_obs,) vector, got shape {tuple(y.shape)}"
            )
        check_finite(y, "values")
        self._values = y
        self._std: torch.Tensor | None = None
        self._chol: torch.Tensor | None = None
        if noise_std is not None:
            self._std = _check_std(noise_std, y)
        elif noise_cov is not None:
            self._chol = _cholesky(_check_square(noise_cov, "noise_cov", y))
        else:
            self._chol = _check_chol(_check_square(noise_chol, "noise_chol", y))

    # -- properties -------------------------------------------------------------------------
    @property
    def values(self) -> torch.Tensor:
        """The observations ``y``, shape ``(N_obs,)``, float64."""
        return self._values

    @property
    def size(self) -> int:
        """``N_obs``."""
        return self._values.numel()

    @property
    def is_diagonal(self) -> bool:
        return self._std is not None

    @property
    def noise_std(self) -> torch.Tensor:
        """Marginal standard deviations ``sqrt(diag R)``, shape ``(N_obs,)``."""
        if self._std is not None:
            return self._std
        return self._factor().square().sum(dim=1).sqrt()

    @property
    def noise_chol(self) -> torch.Tensor | None:
        """The lower Cholesky factor ``L`` for a full covariance, else ``None``."""
        return self._chol

    def _factor(self) -> torch.Tensor:
        """``L`` of a full covariance (only called when the noise is not diagonal)."""
        if self._chol is None:  # pragma: no cover - an invariant: _std or _chol is set
            raise RuntimeError("Observations: neither noise_std nor noise_chol is set")
        return self._chol

    def covariance(self) -> torch.Tensor:
        """The dense ``R`` (builds ``N_obs x N_obs``: for tests and small problems)."""
        if self._std is not None:
            return torch.diag(self._std.square())
        chol = self._factor()
        return chol @ chol.T

    def to(self, device: torch.device | str | None = None) -> Observations:
        """A copy on ``device`` (values stay float64)."""
        new = object.__new__(Observations)
        new._values = self._values.to(device)
        new._std = None if self._std is None else self._std.to(device)
        new._chol = None if self._chol is None else self._chol.to(device)
        return new

    # -- the two operations the kernels need ------------------------------------------------
    def whiten(self, z: torch.Tensor) -> torch.Tensor:
        """``Z L^-T`` for members-first ``Z`` of shape ``(N_ens, N_obs)``, in float64."""
        z = z.to(dtype=torch.float64)
        if self._std is not None:
            return z / self._std.to(z.device)
        chol = self._factor().to(z.device)
        # (L^-1 Z^T)^T: a triangular solve, never an explicit inverse.
        return torch.linalg.solve_triangular(chol, z.T, upper=False).T

    def sample_noise(self, n_members: int, *, generator: torch.Generator | None,
                     device: torch.device | str | None = None,
                     scale: float = 1.0) -> torch.Tensor:
        """Draw ``eps ~ N(0, scale * R)``, shape ``(n_members, N_obs)``, float64."""
        device = torch.device(device) if device is not None else self._values.device
        z = torch.randn(n_members, self.size, generator=generator, dtype=torch.float64,
                        device=device)
        if self._std is not None:
            eps = z * self._std.to(device)
        else:
            eps = z @ self._factor().to(device).T
        return eps * (scale ** 0.5)

    def misfit(self, predictions: torch.Tensor) -> torch.Tensor:
        """Per-member ``1/2 ||L^-1 (Yh_j - y)||^2``, shape ``(N_ens,)``, float64."""
        y = self._values.to(predictions.device)
        r = self.whiten(predictions.to(torch.float64) - y)
        return 0.5 * r.square().sum(dim=1)

    def __repr__(self) -> str:
        kind = "diagonal" if self._std is not None else "full"
        return f"Observations(N_obs={self.size}, noise={kind})"


def _check_std(noise_std: Any, y: torch.Tensor) -> torch.Tensor:
    """``noise_std`` as an ``(N_obs,)`` float64 vector of positive standard deviations."""
    m = y.numel()
    s = as_float_tensor(noise_std, "noise_std", dtype=torch.float64, device=y.device)
    if s.ndim == 2:
        raise ValueError(
            f"noise_std: expected a scalar or an (N_obs,) = ({m},) vector of standard "
            f"deviations, got a matrix of shape {tuple(s.shape)}; pass a covariance "
            "as noise_cov= or its Cholesky factor as noise_chol="
        )
    if s.ndim == 0:
        s = s.expand(m).clone()
    if s.shape != (m,):
        raise ValueError(
            f"noise_std: expected a scalar or shape ({m},) to match values, "
            f"got shape {tuple(s.shape)}"
        )
    if bool((torch.isfinite(s) & (s > 0)).all()):  # one host read when all is well
        return s
    check_finite(s, "noise_std")
    if bool((s <= 0).any()):
        raise ValueError(
            f"noise_std: expected strictly positive standard deviations, got minimum "
            f"{float(s.min()):g}"
        )
    return s


def _check_square(raw: Any, name: str, y: torch.Tensor) -> torch.Tensor:
    """A finite float64 ``(N_obs, N_obs)`` matrix from ``raw``."""
    m = y.numel()
    c = as_float_tensor(raw, name, dtype=torch.float64, device=y.device)
    if c.shape != (m, m):
        raise ValueError(f"{name}: expected shape ({m}, {m}) to match values, got "
                         f"{tuple(c.shape)}")
    check_finite(c, name)
    return c


def _cholesky(c: torch.Tensor) -> torch.Tensor:
    """The lower Cholesky factor of a symmetric positive-definite ``noise_cov``."""
    if not torch.allclose(c, c.T, rtol=1e-10, atol=1e-12 * float(c.abs().max())):
        raise ValueError("noise_cov: expected a symmetric matrix")
    chol, info = torch.linalg.cholesky_ex(c)
    if int(info) != 0:
        raise ValueError(
            "noise_cov: expected a positive-definite covariance; Cholesky failed "
            f"at column {int(info) - 1}"
        )
    return chol


def _check_chol(c: torch.Tensor) -> torch.Tensor:
    """``noise_chol``: lower triangular with a strictly positive diagonal."""
    if bool((torch.triu(c, diagonal=1) != 0).any()):
        raise ValueError("noise_chol: expected a lower-triangular Cholesky factor")
    if bool((torch.diagonal(c) <= 0).any()):
        raise ValueError("noise_chol: expected a strictly positive diagonal")
    return c
