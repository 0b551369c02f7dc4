r"""Batched ensemble-space analysis kernels of the filters (pure functions).

Every filter analysis in enkal is one ``E x E`` matrix ``W`` per *domain*, applied as
``X+ = W X`` (members first, ``docs/glossary.md``): one domain for the global EnKF and ETKF,
one per state variable for the LETKF, and one per filter when several independent filters
run as a batch. These kernels take a leading batch dimension ``B`` (domains or filters) and
are the same algebra as :func:`enkal.update.square_root_transform` and
:func:`enkal.update.perturbed_transform` (the tests check the equality to 1e-10), written
for a batch so that 40 local analyses or 64 filters are one batched ``eigh``.

With a diagonal noise ``R = diag(r)`` and localization weights ``rho`` (``0 <= rho <= 1``,
one per observation and domain; ``rho = 1`` without localization), the whitened, scaled
prediction anomalies and innovation of a domain are

    S = (Yh - 1 yb^T) diag(sqrt(rho / r)) / sqrt(E - 1),     d = diag(sqrt(rho / r)) (y - yb),

so a tapered observation counts as one with noise variance ``r / rho`` (the LETKF's
R-localization, [Hunt2007]; ``rho = 0`` removes it). With the eigendecomposition
``S S^T = V Lam V^T`` (``E x E``, float64):

* square root (ETKF, symmetric [Sakov2008]): ``w = V (Lam + I)^-1 V^T S d / sqrt(E - 1)``,
  ``T = V (Lam + I)^-1/2 V^T`` and ``W = 1 1^T / E + 1 (Pi w)^T + T Pi``;
* perturbed observations (stochastic EnKF [Burgers1998]): ``W = I + G Pi`` with
  ``G = Psi S^T V (Lam + I)^-1 V^T / sqrt(E - 1)`` and ``Psi = (y + eps - Yh) diag(sqrt(rho
  / r))`` for draws ``eps ~ N(0, R)``.

``Pi = I - 1 1^T / E``. The full ``E x E`` eigenbasis is kept: directions with ``Lam = 0``
(more members than observations) get the identity, as they should. With fewer observations
than members (a local analysis sees a handful) the same ``W`` comes from the small
``S^T S = U Lam U^T`` instead: ``w = S (I + S^T S)^-1 d / sqrt(E - 1)`` and
``T = I + S U g(Lam) U^T S^T``, ``g(l) = ((1 + l)^-1/2 - 1) / l`` (finite at ``l = 0``), at
``O(E N_obs^2 + E^2 N_obs)`` instead of ``O(E^3)``.

>>> import torch
>>> g = torch.Generator().manual_seed(0)
>>> yh = torch.randn(2, 8, 3, generator=g, dtype=torch.float64)   # B = 2 domains, E = 8
>>> w = sqrt_transforms(yh, torch.zeros(2, 3, dtype=torch.float64), torch.ones(3))
>>> w.shape, bool(torch.allclose(w.sum(dim=2), torch.ones(2, 8, dtype=torch.float64)))
(torch.Size([2, 8, 8]), True)
"""

from __future__ import annotations

import math

import torch

__all__ = ["sqrt_transforms", "perturbed_transforms", "gaspari_cohn", "random_rotation"]


def _whiten(yh: torch.Tensor, y: torch.Tensor, noise_std: torch.Tensor,
            weights: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(S, d, scale)``: ``S`` ``(B, E, m)``, ``d`` ``(B, m)`` and the per-column scale
    ``sqrt(rho) / r^(1/2)`` ``(B, m)`` (float64)."""
    n = yh.shape[-2]
    yh = yh.to(torch.float64)
    scale = 1.0 / noise_std.to(device=yh.device, dtype=torch.float64)
    scale = scale.expand(yh.shape[0], yh.shape[-1])
    if weights is not None:
        scale = scale * weights.to(device=yh.device, dtype=torch.float64).sqrt()
    ybar = yh.mean(dim=-2)
    s = (yh - ybar.unsqueeze(-2)) * (scale.unsqueeze(-2) / math.sqrt(n - 1))
    d = (y.to(device=yh.device, dtype=torch.float64) - ybar) * scale
    return s, d, scale


def _basis(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Lam, V)`` of the batched Gram ``S S^T`` (``(B, E)``, ``(B, E, E)``)."""
    lam, v = torch.linalg.eigh(s @ s.transpose(-1, -2))
    return lam.clamp_min(0.0), v


def sqrt_transforms(predictions: torch.Tensor, values: torch.Tensor, noise_std: torch.Tensor,
                    weights: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric square-root transforms ``W`` ``(B, E, E)`` (float64; module docstring).

    Parameters
    ----------
    predictions : Tensor, shape (B, E, N_obs)
        Predicted observations of each domain's ensemble (finite).
    values : Tensor, shape (B, N_obs)
        Observed values ``y`` (the same for every domain of one filter).
    noise_std : Tensor, shape (N_obs,) or (B, N_obs)
        Noise standard deviations (diagonal ``R``).
    weights : Tensor, shape (B, N_obs), optional
        Localization weights ``rho`` in ``[0, 1]``.
    """
    n, m = predictions.shape[-2:]
    s, d, _ = _whiten(predictions, values, noise_std, weights)
    if m < n:  # fewer observations than members: the N_obs x N_obs form (module docstring)
        t, w = _sqrt_dual(s, d)
    else:
        lam, v = _basis(s)
        sd = (s @ d.unsqueeze(-1)).squeeze(-1)  # (B, E)
        vt_sd = (v.transpose(-1, -2) @ sd.unsqueeze(-1)).squeeze(-1)
        w = (v @ (vt_sd / (lam + 1.0)).unsqueeze(-1)).squeeze(-1)
        t = (v * (lam + 1.0).rsqrt().unsqueeze(-2)) @ v.transpose(-1, -2)
    w = w / math.sqrt(n - 1)
    return (t - t.sum(dim=-1, keepdim=True) / n) + (1.0 / n) \
        + (w - w.mean(dim=-1, keepdim=True)).unsqueeze(-2)


def _sqrt_dual(s: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(T, w sqrt(E-1))`` from the small ``S^T S = U Lam U^T`` (``N_obs x N_obs``):
    ``w = S (I + S^T S)^-1 d`` and ``T = I + S U g(Lam) U^T S^T`` with
    ``g(l) = ((1 + l)^-1/2 - 1) / l = -1 / (sqrt(1 + l) (1 + sqrt(1 + l)))``, finite at 0."""
    n = s.shape[-2]
    gram = s.transpose(-1, -2) @ s
    lam, u = torch.linalg.eigh(gram)
    lam = lam.clamp_min(0.0)
    root = (lam + 1.0).sqrt()
    ut_d = (u.transpose(-1, -2) @ d.unsqueeze(-1)).squeeze(-1)
    w = (s @ (u @ (ut_d / (lam + 1.0)).unsqueeze(-1))).squeeze(-1)
    su = s @ u
    t = torch.eye(n, dtype=s.dtype, device=s.device) \
        + (su * (-1.0 / (root * (1.0 + root))).unsqueeze(-2)) @ su.transpose(-1, -2)
    return t, w


def perturbed_transforms(predictions: torch.Tensor, values: torch.Tensor,
                         noise_std: torch.Tensor, perturbations: torch.Tensor,
                         weights: torch.Tensor | None = None) -> torch.Tensor:
    """Perturbed-observation transforms ``W = I + G Pi`` ``(B, E, E)`` (float64).

    ``perturbations`` ``(B, E, N_obs)`` are the draws ``eps ~ N(0, R)`` (unscaled by the
    weights); other arguments as :func:`sqrt_transforms`.
    """
    n = predictions.shape[-2]
    s, _, scale = _whiten(predictions, values, noise_std, weights)
    lam, v = _basis(s)
    yh = predictions.to(torch.float64)
    psi = (values.to(yh).unsqueeze(-2) + perturbations.to(yh) - yh) * scale.unsqueeze(-2)
    g = ((psi @ s.transpose(-1, -2)) @ v / (lam + 1.0).unsqueeze(-2)) @ v.transpose(-1, -2)
    g = g / math.sqrt(n - 1)
    eye = torch.eye(n, dtype=torch.float64, device=s.device)
    return eye + (g - g.sum(dim=-1, keepdim=True) / n)


def gaspari_cohn(distance: torch.Tensor, radius: float) -> torch.Tensor:
    r"""The Gaspari & Cohn (1999) fifth-order compactly supported taper, eq. (4.10).

    ``radius`` is the half-width ``c``: the taper is 1 at distance 0, about 0.21 at ``c`` and
    0 from ``2 c`` on (so ``radius = 4`` touches observations up to 8 grid points away).
    With ``z = |distance| / c``::

        z <= 1:       -z^5/4 + z^4/2 + 5 z^3/8 - 5 z^2/3 + 1
        1 < z <= 2:   z^5/12 - z^4/2 + 5 z^3/8 + 5 z^2/3 - 5 z + 4 - 2 / (3 z)

    >>> import torch
    >>> gaspari_cohn(torch.tensor([0.0, 1.0, 2.0, 3.0], dtype=torch.float64), 1.0)
    tensor([1.0000, 0.2083, 0.0000, 0.0000], dtype=torch.float64)
    """
    z = distance.abs() / radius
    inner = ((-0.25 * z + 0.5) * z + 0.625) * z ** 3 - (5.0 / 3.0) * z ** 2 + 1.0
    zo = z.clamp(min=1.0)  # the outer branch only where z > 1 (no 1/0 at z = 0)
    outer = (((zo / 12.0 - 0.5) * zo + 0.625) * zo + 5.0 / 3.0) * zo ** 2 - 5.0 * zo + 4.0 \
        - 2.0 / (3.0 * zo)
    return torch.where(z <= 1.0, inner, torch.where(z < 2.0, outer, torch.zeros_like(z)))


def random_rotation(n: int, generator: torch.Generator, *, device: torch.device | str = "cpu"
                    ) -> torch.Tensor:
    """A Haar-random ``E x E`` orthogonal matrix ``Q`` with ``Q 1 = 1`` (float64).

    ``X+ = Q X`` leaves the ensemble mean and sample covariance unchanged and spreads the
    anomalies over the members (the "random rotations" of [Sakov2008]). Built as
    ``1 1^T / E + U O U^T`` with ``U`` an orthonormal basis of ``1^perp`` and ``O`` Haar on
    ``O(E - 1)`` (QR of a Gaussian matrix with the signs of ``diag(R)`` fixed, Mezzadri 2007).
    """
    ones = torch.ones(n, 1, dtype=torch.float64, device=device)
    basis, _ = torch.linalg.qr(torch.cat([ones, torch.eye(n, dtype=torch.float64,
                                                          device=device)[:, :n - 1]], dim=1))
    u = basis[:, 1:]
    z = torch.randn(n - 1, n - 1, generator=generator, dtype=torch.float64,
                    device=generator.device).to(device)
    q, r = torch.linalg.qr(z)
    o = q * torch.sign(torch.diagonal(r)).unsqueeze(0)
    return torch.full((n, n), 1.0 / n, dtype=torch.float64, device=device) + u @ o @ u.T
