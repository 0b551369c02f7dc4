"""Shared fixtures and helpers for the enkal tests."""

from __future__ import annotations

import contextlib
import hashlib
import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# CI gets more generated cases; local runs stay quick. Deadlines off: the machine is shared.
settings.register_profile(
    "ci", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "dev", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


@contextlib.contextmanager
def torch_threads(n: int = 1):
    """Run the block with ``n`` intra-op threads, restoring the count afterwards.

    One thread: many tiny tensor ops on a shared 2-core machine (where extra threads only
    wait on each other: 2-20x slower measured), and the BLAS path of an
    ``OMP_NUM_THREADS=1`` child process, for bitwise comparisons with one.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def blas_fingerprint() -> str:
    """The first 12 hex digits of the sha256 of seeded float64 GEMMs of small shapes, an
    ``eigh`` and an ``svd`` (one thread): equal where the BLAS/LAPACK kernels round alike."""
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(16, 24, generator=g, dtype=torch.float64),
            torch.randn(24, 110, generator=g, dtype=torch.float64))
    x = torch.randn(96, 6, generator=g, dtype=torch.float64)
    w = torch.randn(6, 8, generator=g, dtype=torch.float64)
    with torch_threads(1):
        gram = a @ a.T
        parts = [a @ b, x @ w, gram, *torch.linalg.eigh(gram),
                 *torch.linalg.svd(a, full_matrices=False)]
    h = hashlib.sha256()
    for t in parts:
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


@pytest.fixture
def one_thread():
    """Fixture form of :func:`torch_threads` (``pytestmark = usefixtures("one_thread")``)."""
    with torch_threads(1):
        yield


def linear_gaussian_problem(n_members: int, n_par: int, n_obs: int, *, seed: int,
                            dense: bool = False, dtype=torch.float64):
    """A random linear model ``Yh = X H^T`` with prior ensemble and observations.

    Returns ``(X, H, obs)`` where ``obs`` has diagonal (or, with ``dense``, full) noise.
    """
    from enkal import Observations

    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n_members, n_par, generator=g, dtype=torch.float64) * 1.5 + 0.3).to(dtype)
    h = torch.randn(n_obs, n_par, generator=g, dtype=torch.float64).to(dtype)
    y = torch.randn(n_obs, generator=g, dtype=torch.float64)
    if dense:
        a = torch.randn(n_obs, n_obs, generator=g, dtype=torch.float64)
        cov = a @ a.T / n_obs + 0.5 * torch.eye(n_obs, dtype=torch.float64)
        obs = Observations(y, noise_cov=cov)
    else:
        std = 0.3 + torch.rand(n_obs, generator=g, dtype=torch.float64)
        obs = Observations(y, noise_std=std)
    return x, h, obs


def kalman_posterior(mean: torch.Tensor, cov: torch.Tensor, h: torch.Tensor, obs):
    """Closed-form Kalman posterior ``(mean, cov)`` for ``y = H x + e``, ``e ~ N(0, R)``."""
    r = obs.covariance()
    s = h @ cov @ h.T + r
    k = torch.linalg.solve(s, h @ cov).T  # C H^T S^-1 (S symmetric)
    return mean + k @ (obs.values - h @ mean), cov - k @ h @ cov


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)
