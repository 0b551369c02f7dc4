"""Few-forward inversion (issue #17): the ensemble Gauss-Newton smoother and Unscented Kalman
Inversion against closed forms (linear-Gaussian posteriors, the least-squares solution, an
autograd MAP), their schedule, the TOML route and bad input."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import torch_threads

import enkal
from enkal import (
    EnsembleSmoother,
    GaussNewton,
    Iterations,
    Observations,
    UnscentedKalmanInversion,
)
from enkal.config import build_strategy

F64 = torch.float64


@pytest.fixture(autouse=True)
def one_thread():
    with torch_threads(1):
        yield


def _linear(n_par: int = 3, n_obs: int = 5, seed: int = 0, full_noise: bool = False):
    """``y = H u + e``, prior ``N(m0, diag(s0^2))``: the posterior and the flat-prior
    (least-squares) posterior in closed form."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n_obs, n_par, generator=g, dtype=F64)
    m0 = torch.linspace(-0.5, 0.5, n_par, dtype=F64)
    s0 = torch.linspace(0.5, 2.0, n_par, dtype=F64)
    y = torch.randn(n_obs, generator=g, dtype=F64)
    if full_noise:
        f = torch.randn(n_obs, n_obs, generator=g, dtype=F64) * 0.1
        r = f @ f.T + 0.09 * torch.eye(n_obs, dtype=F64)
        obs = Observations(y, noise_cov=r)
    else:
        r = 0.09 * torch.eye(n_obs, dtype=F64)
        obs = Observations(y, noise_std=0.3)
    rinv = torch.linalg.inv(r)
    prec = h.T @ rinv @ h + torch.diag(1 / s0 ** 2)
    cov = torch.linalg.inv(prec)
    mean = cov @ (h.T @ rinv @ y + m0 / s0 ** 2)
    flat_cov = torch.linalg.inv(h.T @ rinv @ h)
    flat_mean = flat_cov @ (h.T @ rinv @ y)
    return h, obs, m0, s0, (mean, cov), (flat_mean, flat_cov)


def _run(rule, schedule, obs, x, forward, steps):
    smoother = EnsembleSmoother(obs, rule=rule, schedule=schedule, seed=0)
    state = smoother.init(x)
    for _ in range(steps):
        state, info = smoother.step(state, forward(state.parameters))
    return state


# -- Gauss-Newton ---------------------------------------------------------------------------
@pytest.mark.parametrize("full_noise", [False, True])
@pytest.mark.parametrize("members", [4, 7, 40])
def test_gauss_newton_is_the_exact_posterior_of_a_linear_model_in_one_step(members, full_noise):
    """E > N_par: the mean is the MAP and the sample covariance the posterior covariance, to
    1e-10 (float64 rounding of E x E eigendecompositions; measured ~1e-14), from a prior
    draw anywhere; a second iteration stays there."""
    h, obs, m0, s0, (mean, cov), _ = _linear(full_noise=full_noise)
    x = m0 + 3 * s0 * torch.randn(members, 3, generator=torch.Generator().manual_seed(1),
                                  dtype=F64) + 2.0
    rule = GaussNewton(m0.tolist(), s0.tolist())
    for steps in (1, 2):
        got = _run(rule, Iterations(steps), obs, x, lambda u: u @ h.T, steps).parameters
        assert torch.allclose(got.mean(0), mean, rtol=0, atol=1e-10)
        assert torch.allclose(torch.cov(got.T), cov, rtol=0, atol=1e-10)


def test_gauss_newton_in_a_small_ensemble_solves_the_map_in_its_span():
    """E - 1 < N_par: the new mean minimises the MAP cost over the ensemble's affine span
    (the cost's gradient is orthogonal to the span, to 1e-9 relative), and the members stay
    in the span."""
    h, obs, m0, s0, *_ = _linear(n_par=8, n_obs=12, seed=3)
    x = m0 + s0 * torch.randn(4, 8, generator=torch.Generator().manual_seed(2), dtype=F64)
    got = _run(GaussNewton(m0.tolist(), s0.tolist()), Iterations(1), obs, x,
               lambda u: u @ h.T, 1).parameters
    u = got.mean(0).clone().requires_grad_(True)
    cost = obs.misfit((u @ h.T).unsqueeze(0))[0] + 0.5 * (((u - m0) / s0) ** 2).sum()
    (grad,) = torch.autograd.grad(cost, u)
    span = torch.linalg.svd(x - x.mean(0), full_matrices=False)[2][:3]  # 3 directions
    assert (span @ grad).abs().max() <= 1e-9 * grad.abs().max()
    resid = (got - x.mean(0)) - ((got - x.mean(0)) @ span.T) @ span
    assert resid.abs().max() < 1e-10


def test_gauss_newton_step_scales_the_mean_increment_only():
    h, obs, m0, s0, *_ = _linear()
    x = m0 + s0 * torch.randn(6, 3, generator=torch.Generator().manual_seed(4), dtype=F64)
    full = _run(GaussNewton(m0.tolist(), s0.tolist()), Iterations(1), obs, x,
                lambda u: u @ h.T, 1).parameters
    half = _run(GaussNewton(m0.tolist(), s0.tolist(), step=0.5), Iterations(1), obs, x,
                lambda u: u @ h.T, 1).parameters
    assert torch.allclose(half.mean(0) - x.mean(0), 0.5 * (full.mean(0) - x.mean(0)),
                          rtol=0, atol=1e-12)
    assert torch.allclose(half - half.mean(0), full - full.mean(0), rtol=0, atol=1e-12)


def _nonlinear(u: torch.Tensor) -> torch.Tensor:
    a, b = u[..., 0], u[..., 1]
    return torch.stack([torch.exp(0.5 * a), a * b, b ** 3 + b, torch.sin(a + b)], dim=-1)


def test_gauss_newton_reaches_the_map_of_a_nonlinear_model_with_a_narrow_posterior():
    """Informative data (noise 0.01): over the posterior's width the model is nearly linear,
    so the statistically linearised fixed point is the MAP (autograd Newton) up to
    O(curvature x posterior variance): within 0.05 posterior sd (measured 0.003)."""
    truth = torch.tensor([0.4, -0.7], dtype=F64)
    noise = 0.01
    y = _nonlinear(truth) + noise * torch.tensor([0.5, -1.0, 0.3, 0.8], dtype=F64)
    obs = Observations(y, noise_std=noise)
    m0, s0 = torch.zeros(2, dtype=F64), torch.ones(2, dtype=F64)

    def cost(u):
        return 0.5 * (((_nonlinear(u) - y) / noise) ** 2).sum() + \
            0.5 * (((u - m0) / s0) ** 2).sum()

    u = truth.clone()
    for _ in range(50):  # Newton with the exact Hessian
        hess = torch.autograd.functional.hessian(cost, u)
        grad = torch.autograd.functional.jacobian(cost, u)
        u = u - torch.linalg.solve(hess, grad)
    sd = torch.linalg.inv(torch.autograd.functional.hessian(cost, u)).diag().sqrt()
    x = m0 + s0 * torch.randn(8, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    got = _run(GaussNewton(0.0, 1.0, step=0.5), Iterations(40), obs, x, _nonlinear, 40)
    err = ((got.parameters.mean(0) - u) / sd).abs().max()
    assert err < 0.05, err
    ratio = got.parameters.std(0) / sd
    assert ((ratio > 0.9) & (ratio < 1.1)).all(), ratio  # the Laplace spread, +-10%


# -- Unscented Kalman Inversion -------------------------------------------------------------
def test_the_first_sigma_points_carry_the_prior_exactly():
    m0, s0 = [0.5, -1.0, 2.0, 0.0, 1.0], [1.0, 2.0, 0.5, 1.5, 3.0]
    rule = UnscentedKalmanInversion(m0, s0)
    x = rule.initial_ensemble()
    assert x.shape == (11, 5) and x.dtype == F64
    c = UnscentedKalmanInversion.spread(5)
    assert c == pytest.approx(2.0)  # EKP: a = min(sqrt(4/N), 1), c = a sqrt(N)
    a = (x[1:] - x[0]) / c
    assert torch.allclose(x[0], torch.tensor(m0, dtype=F64))
    assert torch.allclose(0.5 * a.T @ a, torch.diag(torch.tensor(s0, dtype=F64) ** 2),
                          atol=1e-14)
    assert torch.allclose(x.mean(0), x[0], atol=1e-14)  # symmetric


@pytest.mark.parametrize("alpha", [1.5, 2.0, 4.0])
def test_uki_converges_to_the_linear_posterior(alpha):
    """impose_prior: the fixed point is the posterior for every alpha > 1, approached
    geometrically at rate 1 - 1/alpha per iteration: 60 iterations at alpha = 4 leave
    0.75^60 ~ 3e-8 of the first error (bound 1e-6 relative)."""
    h, obs, m0, s0, (mean, cov), _ = _linear(full_noise=True)
    rule = UnscentedKalmanInversion(m0.tolist(), s0.tolist())
    state = _run(rule, Iterations(60, alpha=alpha), obs, rule.initial_ensemble(),
                 lambda u: u @ h.T, 60)
    m, c = rule.posterior(state.parameters, alpha=alpha)
    assert torch.allclose(m, mean, rtol=0, atol=1e-6 * float(cov.diag().sqrt().min()))
    assert torch.allclose(c, cov, rtol=0, atol=1e-6 * float(cov.diag().max()))


def test_uki_without_the_prior_converges_to_least_squares():
    """impose_prior=False: the prior only starts it; the fixed point is the flat-prior
    posterior (EKP's update_freq = 1, alpha_reg = 1)."""
    h, obs, m0, s0, _, (flat_mean, flat_cov) = _linear()
    rule = UnscentedKalmanInversion(m0.tolist(), s0.tolist(), impose_prior=False)
    state = _run(rule, Iterations(50, alpha=2.0), obs, rule.initial_ensemble(),
                 lambda u: u @ h.T, 50)
    m, c = rule.posterior(state.parameters)
    assert torch.allclose(m, flat_mean, rtol=0, atol=1e-9)
    assert torch.allclose(c, flat_cov, rtol=0, atol=1e-9)


def test_uki_on_a_nonlinear_model_reaches_the_narrow_posterior():
    """As for Gauss-Newton: informative data, the Gaussian approximation is the Laplace one
    (within 0.05 sd in the mean, 10% in the sd)."""
    truth = torch.tensor([0.4, -0.7], dtype=F64)
    y = _nonlinear(truth) + 0.01 * torch.tensor([0.5, -1.0, 0.3, 0.8], dtype=F64)
    obs = Observations(y, noise_std=0.01)
    gn_rule = GaussNewton(0.0, 1.0, step=0.5)
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    gn = _run(gn_rule, Iterations(40), obs, x, _nonlinear, 40).parameters
    rule = UnscentedKalmanInversion(0.0, 1.0)
    state = _run(rule, Iterations(40, alpha=2.0), obs, rule.initial_ensemble(2),
                 _nonlinear, 40)
    m, c = rule.posterior(state.parameters)
    sd = gn.std(0)
    assert ((m - gn.mean(0)) / sd).abs().max() < 0.05
    ratio = c.diag().sqrt() / sd
    assert ((ratio > 0.9) & (ratio < 1.1)).all(), ratio


def test_a_failed_sigma_point_stops_uki_naming_it():
    rule = UnscentedKalmanInversion(0.0, 1.0)
    x = rule.initial_ensemble(2)
    obs = Observations(torch.zeros(2, dtype=F64), noise_std=1.0)

    def forward(u):
        y = u.clone()
        y[3] = math.nan
        return y

    with pytest.raises(enkal.FailedMembersError, match=r"sigma point\(s\) \[3\] failed"):
        _run(rule, Iterations(2, alpha=2.0), obs, x, forward, 1)


# -- schedule, TOML, bad input ---------------------------------------------------------------
def test_iterations_gives_its_alpha_steps_times_then_stops():
    sched = Iterations(3, alpha=2.5)
    state = sched.init()
    x = torch.zeros(2, 1)
    for k in range(3):
        assert not sched.done(state)
        alpha, state, info = sched.step(state, parameters=x, predictions=x, observations=None)
        assert alpha == 2.5 and info == {"step": k + 1}
    assert sched.done(state) and sched.planned_updates == 3
    with pytest.raises(enkal.ScheduleExhaustedError):
        sched.step(state, parameters=x, predictions=x, observations=None)
    with pytest.raises(ValueError, match="Iterations.steps"):
        Iterations(0)
    with pytest.raises(ValueError, match="Iterations.alpha"):
        Iterations(2, alpha=0.0)
    # the continuation: halved from start down to alpha
    warm, state, alphas = Iterations(7, start=16.0), Iterations(7, start=16.0).init(), []
    while not warm.done(state):
        a, state, _ = warm.step(state, parameters=x, predictions=x, observations=None)
        alphas.append(a)
    assert alphas == [16.0, 8.0, 4.0, 2.0, 1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="Iterations.start: expected start >= alpha"):
        Iterations(3, alpha=2.0, start=1.0)


def test_the_continuation_keeps_gauss_newton_from_diverging():
    """An SIR epidemic (infected fraction at 20 days, noise 0.01), log-normal rate priors,
    6 members: plain Gauss-Newton (``Iterations(8)``) ends at another point in 5 of these
    20 seeds (measured: off by 0.15-14 in the log-rates, one diverged); the continuation
    ``Iterations(8, start=16)`` (inflations 16, 8, 4, 2, then 1) brings every seed to the
    same fixed point (all within 0.01 of their median; the posterior sds are ~0.03), 0.06
    from the truth."""
    from enkal.models import RK4, SIR

    model = SIR(t_obs=[float(t) for t in range(1, 21)], infected=0.01, observe=["I"],
                solver=RK4(dt=0.1))
    truth = torch.log(torch.tensor([0.5, 0.25], dtype=F64))
    y = model(truth.exp().unsqueeze(0))[0] + 0.01 * torch.randn(
        20, generator=torch.Generator().manual_seed(1), dtype=F64)
    obs = Observations(y, noise_std=0.01)
    m0, s0 = torch.log(torch.tensor([0.4, 0.2], dtype=F64)), torch.full((2,), 0.5, dtype=F64)
    rule = GaussNewton(m0.tolist(), s0.tolist())

    def ends(schedule):
        out = []
        for seed in range(20):
            x = m0 + s0 * torch.randn(6, 2, generator=torch.Generator().manual_seed(seed),
                                      dtype=F64)
            try:
                out.append(_run(rule, schedule, obs, x, lambda u: model(u.exp()),
                                8).parameters.mean(0))
            except enkal.FailedMembersError:
                out.append(torch.full((2,), math.inf, dtype=F64))
        return torch.stack(out)

    warm = ends(Iterations(8, start=16.0))
    assert ((warm - warm.median(0).values).abs() < 0.01).all()
    assert ((warm.median(0).values - truth).abs() < 0.1).all()
    plain = ends(Iterations(8))
    assert ((plain - warm.median(0).values).abs() > 0.1).any(dim=1).sum() >= 3


def test_toml_builds_both_with_the_parameters_prior():
    from importlib.resources import files

    from enkal.config import load_toml
    from enkal.problems.estimation import build

    cfg = load_toml(str(files("enkal.problems") / "lorenz63.toml"))
    cfg["smoother"]["rule"] = {"type": "GaussNewton", "step": 0.5}
    cfg["smoother"]["schedule"] = {"type": "Iterations", "steps": 6}
    exp = build(cfg)
    assert exp.smoother.rule.prior_mean == pytest.approx(
        [math.log(8), math.log(24), math.log(2.2)], rel=1e-15)
    assert exp.smoother.rule.step == 0.5 and exp.smoother.schedule == Iterations(6)
    cfg["smoother"]["rule"] = {"type": "UnscentedKalmanInversion"}
    cfg["smoother"]["schedule"] = {"type": "Iterations", "steps": 6, "alpha": 2.0}
    with pytest.raises(ValueError, match=r"ensemble_size: UnscentedKalmanInversion needs 2 "
                                         r"N_par \+ 1 = 7"):
        build(cfg)
    cfg["smoother"]["ensemble_size"] = 7
    exp = build(cfg)
    assert torch.equal(exp.prior, exp.smoother.rule.initial_ensemble(3))
    assert build_strategy("rule", {"type": "GaussNewton", "prior_std": [1.0, 2.0]},
                          where="[smoother]") == GaussNewton(0.0, [1.0, 2.0])


def test_bad_input_is_refused_naming_it():
    with pytest.raises(ValueError, match="GaussNewton.prior_std: expected values > 0"):
        GaussNewton(0.0, [1.0, 0.0])
    with pytest.raises(ValueError, match="GaussNewton.step"):
        GaussNewton(step=1.5)
    with pytest.raises(TypeError, match="UnscentedKalmanInversion.prior_mean: expected a "):
        UnscentedKalmanInversion(object(), 1.0)
    with pytest.raises(TypeError, match="impose_prior: expected a bool"):
        UnscentedKalmanInversion(impose_prior=1)
    h, obs, m0, s0, *_ = _linear()
    x = torch.randn(6, 3, dtype=F64)
    with pytest.raises(ValueError, match="needs the ensemble"):
        GaussNewton().transform(x @ h.T, obs, alpha=1.0, generator=None)
    with pytest.raises(ValueError, match="expected 1 or 3 values"):
        GaussNewton([0.0, 1.0], 1.0).transform(x @ h.T, obs, alpha=1.0, generator=None,
                                               parameters=x)
    with pytest.raises(TypeError, match="builds its next sigma points itself"):
        enkal.assimilate(x, x @ h.T, obs, rule=UnscentedKalmanInversion())
    rule = UnscentedKalmanInversion(m0.tolist(), s0.tolist())
    with pytest.raises(ValueError, match=r"expected 2 N_par \+ 1 = 7 sigma points, got 6"):
        _run(rule, Iterations(2, alpha=2.0), obs, x, lambda u: u @ h.T, 1)
    with pytest.raises(ValueError, match="alpha > 1"):
        _run(rule, Iterations(2, alpha=1.0), obs, rule.initial_ensemble(), lambda u: u @ h.T, 1)
    with pytest.raises(ValueError, match="n_par: expected a positive int"):
        UnscentedKalmanInversion().initial_ensemble(0)
    with pytest.raises(ValueError, match="builds the new ensemble itself"):
        from enkal.analysis import analyse
        sched = Iterations(2, alpha=2.0)
        x7 = rule.initial_ensemble()
        analyse(x7, x7 @ h.T, obs, rule=rule, schedule=sched,
                schedule_states=[sched.init(), sched.init()], failure=enkal.ResampleFailed(),
                generator=torch.Generator(), sections=[[slice(0, 1)], [slice(1, 3)]])
