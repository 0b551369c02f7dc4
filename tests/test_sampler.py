"""The Ensemble Kalman Sampler (issue #17, first part): its ensemble-space step equals the
parameter-space EKS/ALDI update, and its stationary ensemble samples the closed-form
posterior of a linear-Gaussian problem."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import torch_threads

import enkal
from enkal.config import build_strategy
from enkal.sampler import EKSStable, EKSStableState, EnsembleKalmanSampler


@pytest.fixture(autouse=True)
def one_thread():
    with torch_threads(1):
        yield


def _linear(seed: int = 0, n_obs: int = 5):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n_obs, 2, generator=g, dtype=torch.float64)
    m0 = torch.tensor([0.5, -0.3], dtype=torch.float64)
    s0 = torch.tensor([1.0, 2.0], dtype=torch.float64)
    noise = 0.5
    y = h @ torch.tensor([1.0, 0.5], dtype=torch.float64) + \
        noise * torch.randn(n_obs, generator=g, dtype=torch.float64)
    # the posterior, in closed form
    prec = torch.diag(1 / s0 ** 2) + h.T @ h / noise ** 2
    cov = torch.linalg.inv(prec)
    mean = cov @ (m0 / s0 ** 2 + h.T @ y / noise ** 2)
    model = enkal.CallableModel(lambda u: u @ h.T, parameters=["a", "b"], output_size=n_obs)
    return model, enkal.Observations(y, noise_std=noise), m0, s0, mean, cov, h


def test_the_ensemble_space_step_is_the_parameter_space_eks_update():
    """W X equals EKP's update written with P x P matrices: (I + dt C S0^-1) u+ = u - dt
    C^{uG} R^-1 (G - y) + dt C S0^-1 m0 + dt (P+1)/E (u - u_mean), plus sqrt(2 dt) C^(1/2) xi
    with C^(1/2) = A^T / sqrt(E) and the same xi; to 1e-12 (float64 rounding of a 6x6 solve)."""
    model, obs, m0, s0, *_ , h = _linear()
    g = torch.Generator().manual_seed(1)
    e, dt = 6, 0.07
    x = m0 + s0 * torch.randn(e, 2, generator=g, dtype=torch.float64)
    y_hat = model(x)
    rule = EnsembleKalmanSampler(m0.tolist(), s0.tolist())
    w = rule.transform(y_hat, obs, alpha=1 / dt, generator=torch.Generator().manual_seed(7),
                       parameters=x)
    z = torch.randn(e, e, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    # parameter space, columns u_j
    u, gm = x.T, y_hat.T
    a = u - u.mean(1, keepdim=True)
    c = a @ a.T / e
    cug = a @ (gm - gm.mean(1, keepdim=True)).T / e
    rinv = torch.eye(5, dtype=torch.float64) / 0.25
    s0inv = torch.diag(1 / s0 ** 2)
    rhs = u - dt * cug @ rinv @ (gm - obs.values[:, None]) + dt * (c @ s0inv @ m0)[:, None] \
        + dt * 3 / e * a
    implicit = torch.linalg.solve(torch.eye(2, dtype=torch.float64) + dt * c @ s0inv, rhs)
    expected = implicit + math.sqrt(2 * dt / e) * a @ z
    torch.testing.assert_close(w @ x, expected.T, rtol=1e-12, atol=1e-12)


def _sample(model, obs, m0, s0, *, n_members, iterations, numerator=0.02, correction=True,
            seed=0):
    smoother = enkal.EnsembleSmoother(
        obs, rule=EnsembleKalmanSampler(m0.tolist(), s0.tolist(), correction=correction),
        schedule=EKSStable(numerator=numerator), seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    state = smoother.init(m0 + s0 * torch.randn(n_members, 2, generator=g,
                                                dtype=torch.float64))
    means, covs, dts = [], [], []
    for k in range(iterations):
        state, info = smoother.step(state, model(state.parameters))
        if k >= iterations // 5:  # burn-in
            means.append(state.parameters.mean(0))
            covs.append(torch.cov(state.parameters.T))
            dts.append(info.schedule["dt"])
    # a time average: each ensemble weighs its step (the adaptive step is smaller when the
    # ensemble is wider; an average over iterations would over-weight those)
    w = torch.tensor(dts, dtype=torch.float64)
    w = w / w.mean()
    return torch.stack(means) * w[:, None], torch.stack(covs) * w[:, None, None]


def _batch_se(series: torch.Tensor, batches: int = 20) -> torch.Tensor:
    """Standard error of a time average of autocorrelated samples, by batch means."""
    n = series.shape[0] // batches * batches
    b = series[:n].reshape(batches, -1, *series.shape[1:]).mean(1)
    return b.std(0) / math.sqrt(batches)


@pytest.mark.slow
def test_the_stationary_ensemble_samples_the_linear_gaussian_posterior():
    """E = 50, 12,000 steps (numerator 0.02): the time-averaged ensemble mean and covariance
    match the closed-form posterior within 4 batch-means standard errors plus the Euler
    step's bias, measured at 0.5-2.6% of the variances for this step size (the docstring of
    EKSStable): allowed 4% of sd_i sd_j, and 5% of a posterior sd for the mean."""
    model, obs, m0, s0, mean, cov, _ = _linear()
    means, covs = _sample(model, obs, m0, s0, n_members=50, iterations=12000)
    m_hat, c_hat = means.mean(0), covs.mean(0)
    se_m, se_c = _batch_se(means), _batch_se(covs)
    sd = cov.diagonal().sqrt()
    assert ((m_hat - mean).abs() <= 4 * se_m + 0.05 * sd).all(), (m_hat, mean, se_m)
    bias = 0.04 * cov.diagonal().sqrt()[:, None] * cov.diagonal().sqrt()[None, :]
    assert ((c_hat - cov).abs() <= 4 * se_c + bias).all(), (c_hat, cov, se_c)


def test_small_ensembles_sample_the_variance_with_aldi_and_not_without():
    """E = 4 > N_par = 2: ALDI's correction keeps the posterior variance (measured ratios
    1.13 and 1.05 at numerator 0.005; here 0.01: within 0.7-1.4, the Monte-Carlo error of 4
    members); the original EKS collapses it (measured 0.39 and 0.04)."""
    model, obs, m0, s0, mean, cov, _ = _linear()
    _, covs = _sample(model, obs, m0, s0, n_members=4, iterations=8000, numerator=0.01)
    ratio = covs.mean(0).diagonal() / cov.diagonal()
    assert ((ratio > 0.7) & (ratio < 1.4)).all(), ratio
    _, covs = _sample(model, obs, m0, s0, n_members=4, iterations=8000, numerator=0.01,
                      correction=False)
    ratio = covs.mean(0).diagonal() / cov.diagonal()
    assert (ratio < 0.6).all(), ratio


def test_eks_stable_steps_and_state():
    model, obs, m0, s0, *_ = _linear()
    x = m0 + s0 * torch.randn(8, 2, generator=torch.Generator().manual_seed(0),
                              dtype=torch.float64)
    y_hat = model(x)
    sched = EKSStable(numerator=0.5)
    alpha, state, info = sched.step(sched.init(), parameters=x, predictions=y_hat,
                                    observations=obs)
    dw = obs.whiten(y_hat - y_hat.mean(0))
    ew = obs.whiten(y_hat - obs.values)
    norm = float(torch.linalg.matrix_norm(dw @ ew.T / 8))
    assert info["dt"] == pytest.approx(0.5 / (norm + 1e-8), rel=1e-12)
    assert alpha == pytest.approx(1 / info["dt"], rel=1e-12)
    assert state == EKSStableState(time=info["dt"], iteration=1)
    fixed = EKSStable(dt=0.1, duration=0.25)
    s = fixed.init()
    for _ in range(3):
        assert not fixed.done(s)
        a, s, _ = fixed.step(s, parameters=x, predictions=y_hat, observations=obs)
        assert a == pytest.approx(10.0)
    assert fixed.done(s) and EKSStable().planned_updates == math.inf


def test_resume_is_bitwise_and_toml_builds_it(tmp_path):
    model, obs, m0, s0, *_ = _linear()
    spec = {"type": "EnsembleKalmanSampler", "prior_mean": m0.tolist(),
            "prior_std": s0.tolist()}
    rule = build_strategy("rule", spec, where="[smoother]")
    schedule = build_strategy("schedule", {"type": "EKSStable", "numerator": 0.1},
                              where="[smoother]")
    assert rule == EnsembleKalmanSampler(m0.tolist(), s0.tolist())

    def smoother():
        return enkal.EnsembleSmoother(obs, rule=rule, schedule=schedule, seed=3)

    prior = m0 + s0 * torch.randn(20, 2, generator=torch.Generator().manual_seed(0),
                                  dtype=torch.float64)
    straight = enkal.run(smoother(), model, prior, max_iterations=12)
    enkal.run(smoother(), model, prior, store=tmp_path / "s.h5", max_iterations=5)
    resumed = enkal.run(smoother(), model, resume=tmp_path / "s.h5", max_iterations=12)
    assert torch.equal(straight.parameters, resumed.parameters)


def test_from_blocks_is_the_prior_ensemble_draws_from():
    blocks = [enkal.constrained_gaussian("k", 2.0, 0.5, lower=0),
              enkal.constrained_gaussian("w", 0.0, 1.0, shape=(2,))]
    rule = EnsembleKalmanSampler.from_blocks(blocks)
    assert rule.prior_mean == (blocks[0].u_mean, 0.0, 0.0)
    assert rule.prior_std == (blocks[0].u_std, 1.0, 1.0)


def test_bad_input_is_refused_naming_it():
    with pytest.raises(ValueError, match="prior_std: expected values > 0"):
        EnsembleKalmanSampler(0.0, [1.0, 0.0])
    with pytest.raises(ValueError, match="prior_mean: expected finite"):
        EnsembleKalmanSampler(float("nan"), 1.0)
    with pytest.raises(TypeError, match="prior_mean: expected a number"):
        EnsembleKalmanSampler(object(), 1.0)
    with pytest.raises(ValueError, match="EKSStable.numerator"):
        EKSStable(numerator=0.0)
    model, obs, m0, s0, *_ = _linear()
    x = torch.randn(6, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="expected 1 or 2 values"):
        EnsembleKalmanSampler([0.0, 0.0, 0.0], 1.0).transform(
            model(x), obs, alpha=10.0, generator=None, parameters=x)
    with pytest.raises(ValueError, match="needs the ensemble"):
        EnsembleKalmanSampler().transform(model(x), obs, alpha=10.0, generator=None)
    with pytest.raises(ValueError, match="updates all parameters at once"):
        from enkal.analysis import analyse
        sched = EKSStable()
        analyse(x, model(x), obs, rule=EnsembleKalmanSampler(), schedule=sched,
                schedule_states=[sched.init(), sched.init()],
                failure=enkal.ResampleFailed(), generator=torch.Generator(),
                sections=[[slice(0, 1)], [slice(1, 2)]])


def test_a_toml_sampler_without_a_prior_takes_the_parameters_prior():
    from importlib.resources import files

    from enkal.config import load_toml
    from enkal.problems.estimation import build

    cfg = load_toml(str(files("enkal.problems") / "lorenz63.toml"))
    cfg["smoother"]["rule"] = {"type": "EnsembleKalmanSampler"}
    cfg["smoother"]["schedule"] = {"type": "EKSStable"}
    rule = build(cfg).smoother.rule
    # lorenz63.toml: prior_median 8, 24, 2.2 and prior_std 0.3 of the logs
    assert rule.prior_mean == pytest.approx([math.log(8), math.log(24), math.log(2.2)],
                                            rel=1e-15)
    assert rule.prior_std == (0.3, 0.3, 0.3)


def test_the_posterior_benchmark_runs(tmp_path):
    """bench/posterior.py --quick (a few steps of each method): its table and JSON line."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(root / "bench" / "posterior.py"), "--quick",
                           "--json", str(tmp_path / "p.json")], capture_output=True, text=True,
                          timeout=300, env=env, cwd=root / "bench")
    assert proc.returncode == 0, proc.stderr
    record = json.loads((tmp_path / "p.json").read_text())
    assert set(record["parameters"]) == {"sigma", "rho", "beta"}
    assert proc.stdout.strip().splitlines()[-1].startswith("BENCH_JSON ")
