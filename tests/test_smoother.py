"""Schedules, collapse guard, failure policies and the smoother loop."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import kalman_posterior, linear_gaussian_problem
from hypothesis import given
from hypothesis import strategies as st

import enkal
from enkal import (
    ESMDA,
    CallableModel,
    CollapseGuard,
    DataMisfitController,
    EnsembleSmoother,
    FailedMembersError,
    FixedAnnealing,
    IgnoreFailed,
    Observations,
    PerturbedObservations,
    Raise,
    ResampleFailed,
    ScheduleExhaustedError,
    SquareRoot,
)


def linear_model(h):
    return CallableModel(lambda x: x @ h.T, parameters=h.shape[1], output_size=h.shape[0])


# --- schedules ------------------------------------------------------------------------------
def test_esmda_validates_and_exhausts():
    with pytest.raises(ValueError, match=r"sum\(1/alpha\) == 1"):
        ESMDA(alphas=(2.0, 3.0))
    with pytest.raises(ValueError, match="alphas"):
        ESMDA(alphas=())
    s = ESMDA.normalized([9.0, 3.0, 1.0])
    assert math.isclose(sum(1 / a for a in s.alphas), 1.0)
    sched = ESMDA.constant(2)
    st_ = sched.init()
    x = torch.zeros(3, 1)
    obs = Observations([0.0], noise_std=1.0)
    for _ in range(2):
        _, st_, _ = sched.step(st_, parameters=x, predictions=x, observations=obs)
    assert sched.done(st_)
    with pytest.raises(ScheduleExhaustedError):
        sched.step(st_, parameters=x, predictions=x, observations=obs)


@given(st.floats(0.01, 100.0), st.integers(0, 10_000))
def test_data_misfit_controller_reaches_time_one(scale, seed):
    g = torch.Generator().manual_seed(seed)
    obs = Observations(torch.zeros(5), noise_std=1.0)
    sched = DataMisfitController()
    state = sched.init()
    inv_alpha = 0.0
    for _ in range(200):
        if sched.done(state):
            break
        y = scale * torch.randn(20, 5, generator=g, dtype=torch.float64)
        alpha, state, info = sched.step(state, parameters=y, predictions=y, observations=obs)
        assert alpha >= 1.0 - 1e-12
        inv_alpha += 1.0 / alpha
        scale *= 0.5
    assert sched.done(state)
    assert math.isclose(inv_alpha, 1.0, rel_tol=1e-9)


def test_fixed_annealing_follows_the_paper_with_a_floor():
    sched = FixedAnnealing(factor=0.5, initial=1.0, floor=0.2)
    state = sched.init()
    obs = Observations([0.0], noise_std=1.0)
    y = torch.zeros(4, 1)
    wide = torch.randn(4, 3) * 10  # variance >> rho: no annealing
    alpha, state, info = sched.step(state, parameters=wide, predictions=y, observations=obs)
    assert alpha == 1.0 and not info["annealed"]
    narrow = torch.randn(4, 3) * 1e-3
    rhos = []
    for _ in range(5):
        alpha, state, info = sched.step(state, parameters=narrow, predictions=y, observations=obs)
        rhos.append(info["rho"])
        assert math.isclose(alpha, info["rho"] ** 2)
    assert rhos == [0.5, 0.25, 0.2, 0.2, 0.2]
    assert not sched.done(state)
    with pytest.raises(ValueError, match="floor"):
        FixedAnnealing(initial=0.1, floor=0.5)


@pytest.mark.parametrize("schedule", [ESMDA(alphas=(3.0, 3.0, 3.0)),
                                      ESMDA.normalized([10.0, 4.0, 2.0, 1.5]),
                                      DataMisfitController()],
                         ids=["esmda3", "esmda-decreasing", "dmc"])
def test_square_root_multiple_assimilation_equals_one_kalman_update(schedule):
    # For a linear model, assimilating the same data k times with noise alpha_i R and
    # sum 1/alpha_i = 1 is exactly one assimilation with R; SR reproduces each Kalman update
    # of the sample moments exactly, so the end result matches to float64 round-off.
    x, h, obs = linear_gaussian_problem(40, 5, 12, seed=4)
    smoother = EnsembleSmoother(obs, rule=SquareRoot(), schedule=schedule, seed=0)
    result = smoother.run(linear_model(h), x)
    assert result.stopped_by == "schedule"
    m_true, c_true = kalman_posterior(x.mean(0), torch.cov(x.T), h, obs)
    torch.testing.assert_close(result.parameters.mean(0), m_true, atol=1e-9, rtol=0)
    torch.testing.assert_close(torch.cov(result.parameters.T), c_true, atol=1e-9, rtol=0)
    assert math.isclose(sum(1 / a for a in result.history["alpha"]), 1.0, rel_tol=1e-9)


# --- ask/tell, purity, resume --------------------------------------------------------------
def nonlinear_model():
    def fn(x):
        return torch.stack([x[:, 0] ** 2 + x[:, 1], torch.sin(x[:, 1]) * x[:, 2],
                            x[:, 2] - x[:, 0]], dim=1)
    return CallableModel(fn, parameters=["a", "b", "c"], output_size=3)


def make_smoother(**kw):
    obs = Observations(torch.tensor([1.0, 0.3, -0.5]), noise_std=0.1)
    kw.setdefault("rule", PerturbedObservations())
    kw.setdefault("schedule", FixedAnnealing(initial=2.0, floor=0.5))
    return EnsembleSmoother(obs, seed=7, **kw)


def prior(n=24, seed=0):
    return torch.randn(n, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_step_is_pure_and_ask_tell_equals_run():
    smoother = make_smoother(guard=CollapseGuard(threshold=1e-6, reset=1e-4))
    model = nonlinear_model()
    x0 = prior()
    state = smoother.init(x0)
    for _ in range(6):
        y = model(state.parameters)
        before = (state.parameters.clone(), state.rng_state.clone(), state.schedule)
        new_state, info = smoother.step(state, y)
        assert torch.equal(state.parameters, before[0])  # the old state is untouched
        assert torch.equal(state.rng_state, before[1]) and state.schedule == before[2]
        assert not torch.equal(new_state.rng_state, before[1])
        state = new_state
    result = smoother.run(model, x0, max_iterations=6)
    assert torch.equal(result.parameters, state.parameters)
    assert torch.equal(x0, prior())  # the prior is never written to
    assert result.n_forwards == 6 * 24
    assert result.history["iteration"] == list(range(1, 7))


def test_inplace_run_equals_default_run():
    model = nonlinear_model()
    a = make_smoother(chunk_size=2).run(model, prior(), max_iterations=5)
    b = make_smoother(chunk_size=2).run(model, prior(), max_iterations=5, inplace=True)
    assert torch.equal(a.parameters, b.parameters)
    # the spread is of the ensemble *before* each update, also when the update overwrote it
    # (in place it used to be measured after the update from the third iteration on)
    assert a.history["spread"] == b.history["spread"]


def test_state_dict_resume_is_bitwise_identical():
    smoother = make_smoother()
    model = nonlinear_model()
    full = smoother.run(model, prior(), max_iterations=8)
    half = smoother.run(model, prior(), max_iterations=3)
    d = half.state_dict()
    d = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in d.items()}
    resumed = make_smoother().run(model, state=make_smoother().load_state_dict(d),
                                  max_iterations=8)
    assert torch.equal(resumed.parameters, full.parameters)


def test_load_state_dict_rejects_other_schedule():
    d = make_smoother().run(nonlinear_model(), prior(), max_iterations=1).state_dict()
    other = make_smoother(schedule=ESMDA.constant(2))
    with pytest.raises(ValueError, match="schedule state"):
        other.load_state_dict(d)
    with pytest.raises(ValueError, match="missing"):
        other.load_state_dict({"parameters": d["parameters"]})


def test_seed_controls_randomness():
    model = nonlinear_model()
    a = make_smoother().run(model, prior(), max_iterations=3).parameters
    b = make_smoother().run(model, prior(), max_iterations=3).parameters
    obs = Observations(torch.tensor([1.0, 0.3, -0.5]), noise_std=0.1)
    c = EnsembleSmoother(obs, rule=PerturbedObservations(), seed=8,
                         schedule=FixedAnnealing(initial=2.0, floor=0.5)).run(
        model, prior(), max_iterations=3).parameters
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_callbacks_and_tolerance_stop_the_run():
    seen = []
    result = make_smoother().run(nonlinear_model(), prior(), max_iterations=20,
                                 callbacks=[lambda s, i: seen.append(i.iteration) or i.iteration == 4])
    assert seen == [1, 2, 3, 4] and result.stopped_by == "callback"
    result = make_smoother(rule=SquareRoot()).run(nonlinear_model(), prior(), max_iterations=200,
                                                  tolerance=1e-3)
    assert result.stopped_by == "tolerance"


def test_float32_ensemble_stays_float32():
    obs = Observations(torch.tensor([1.0, 0.3, -0.5]), noise_std=0.1)
    model = CallableModel(nonlinear_model()._fn, parameters=3, output_size=3,
                          dtype=torch.float32)
    res = EnsembleSmoother(obs, schedule=ESMDA.constant(2)).run(model, prior().float())
    assert res.parameters.dtype == torch.float32


# --- guard and failures ----------------------------------------------------------------------
def test_collapse_guard_redraws_only_live_collapsed_parameters():
    x = torch.randn(16, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x[:, 1] = 2.0
    x[:, 3] = 0.0
    mask = torch.tensor([True, True, True, False, True])
    out, n = CollapseGuard(threshold=1e-8, reset=0.25).apply(
        x, generator=torch.Generator().manual_seed(1), mask=mask)
    assert n == 1
    assert torch.equal(out[:, 3], x[:, 3])  # masked: untouched
    assert float(out[:, 1].var()) > 0.01 and abs(float(out[:, 1].mean()) - 2.0) < 0.5
    assert torch.equal(out[:, [0, 2, 4]], x[:, [0, 2, 4]])
    with pytest.raises(ValueError, match="reset"):
        CollapseGuard(threshold=1.0, reset=0.5)


def flaky_model(fail_every=4):
    base = nonlinear_model()

    def fn(x):
        y = base(x)
        if x.shape[0] == 1 and int(x[0, 0] * 1e6) % fail_every == 0:
            raise RuntimeError("simulator crashed")
        y[(x[:, 1] * 1e6).long() % fail_every == 1] = float("nan")
        return y
    return CallableModel(fn, parameters=["a", "b", "c"], output_size=3)


def test_resample_failed_keeps_the_run_going():
    res = make_smoother(failure=ResampleFailed()).run(flaky_model(), prior(32), max_iterations=5)
    assert torch.isfinite(res.parameters).all()
    assert sum(res.history["n_failed"]) > 0


def test_ignore_failed_keeps_failed_members_parameters():
    smoother = make_smoother(failure=IgnoreFailed())
    x = prior(10)
    state = smoother.init(x)
    y = nonlinear_model()(x)
    y[2] = float("inf")
    new, info = smoother.step(state, y)
    assert info.n_failed == 1
    assert torch.equal(new.parameters[2], x[2])


def test_raise_policy_and_all_failed():
    x = prior(10)
    y = nonlinear_model()(x)
    y[0] = float("nan")
    with pytest.raises(FailedMembersError, match="Raise"):
        make_smoother(failure=Raise()).step(make_smoother().init(x), y)
    with pytest.raises(FailedMembersError, match="at least 2"):
        make_smoother().step(make_smoother().init(x), torch.full_like(y, float("nan")))
    with pytest.raises(FailedMembersError, match="at least 8"):
        make_smoother(failure=ResampleFailed(min_success=0.8)).step(
            make_smoother().init(x), torch.where(torch.arange(10)[:, None] < 3, float("nan"), y))
    big = y.clone()
    big[0] = 1e30
    _, info = make_smoother(failure=ResampleFailed(max_abs=1e6)).step(make_smoother().init(x), big)
    assert info.n_failed == 1
    # the default unit-free bound: 1e30 is 1e31 noise std's away from the data
    _, info = make_smoother().step(make_smoother().init(x), big)
    assert info.n_failed == 1
    _, info = make_smoother(failure=ResampleFailed(max_sigma=None)).step(
        make_smoother().init(x), big)
    assert info.n_failed == 0


def test_evaluate_isolates_members_that_raise():
    model = CallableModel(lambda t: 1.0 / (t - 1.0) if float(t[0]) != 1.0 else 1 / 0,
                          parameters=1, output_size=1, batched=False)
    report = enkal.evaluate(model, torch.tensor([[0.0], [1.0], [3.0]], dtype=torch.float64))
    y, ok = report
    assert ok.tolist() == [True, False, True]
    assert torch.isnan(y[1]).all() and torch.isfinite(y[[0, 2]]).all()
    assert "ZeroDivisionError" in report.errors[1]


def test_evaluate_refuses_wrong_output_shape():
    model = CallableModel(lambda x: torch.ones(3, x.shape[0], dtype=x.dtype), parameters=2,
                          output_size=3)
    with pytest.raises(ValueError, match="members first"):
        enkal.evaluate(model, torch.zeros(4, 2, dtype=torch.float64))


def test_numpy_and_per_member_callables():
    import numpy as np

    batched = CallableModel(lambda a: np.sin(a), parameters=2, output_size=2, numpy=True)
    single = CallableModel(lambda t: torch.sin(t), parameters=2, output_size=2, batched=False)
    x = torch.randn(5, 2, dtype=torch.float64)
    torch.testing.assert_close(batched(x), single(x))


# --- smoother validation ---------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,exc,pattern", [
    ({"rule": "sqrt"}, TypeError, "rule"),
    ({"schedule": 0.75}, TypeError, "schedule"),
    ({"guard": 1e-4}, TypeError, "guard"),
    ({"failure": "resample"}, TypeError, "failure"),
    ({"seed": -1}, TypeError, "seed"),
    ({"chunk_size": 0}, ValueError, "chunk_size"),
])
def test_smoother_config_validation(kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        EnsembleSmoother(Observations([0.0], noise_std=1.0), **kwargs)


def test_smoother_input_validation():
    smoother = make_smoother()
    with pytest.raises(ValueError, match="at least 2 members"):
        smoother.init(torch.zeros(1, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="finite"):
        smoother.init(torch.full((4, 3), float("nan"), dtype=torch.float64))
    state = smoother.init(prior(8))
    with pytest.raises(ValueError, match=r"members first"):
        smoother.step(state, torch.zeros(3, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="output_size"):
        smoother.run(CallableModel(lambda x: x[:, :2], parameters=3, output_size=2), prior())
    with pytest.raises(ValueError, match="columns"):
        smoother.run(nonlinear_model(), torch.zeros(4, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="exactly one"):
        smoother.run(nonlinear_model())


def test_a_schedule_with_a_step_size_or_trust_radius_is_refused():
    """``RelativeNoise.step_size`` and ``trust_radius`` shape the optimizer's step of the
    mean; the smoother takes the whole update, so it used to ignore them silently (a
    ``RelativeNoise.newton()`` there gave an almost undamped full step): refused, naming them."""
    obs = enkal.Observations([1.0, 2.0], noise_std=0.1)
    for schedule in (enkal.RelativeNoise.newton(), enkal.RelativeNoise(step_size=0.5),
                     enkal.RelativeNoise(trust_radius=1.0)):
        with pytest.raises(ValueError, match="schedule: .*step_size.*trust_radius"):
            enkal.EnsembleSmoother(obs, schedule=schedule)
    enkal.EnsembleSmoother(obs, schedule=enkal.RelativeNoise())  # the plain one is fine
