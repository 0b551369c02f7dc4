"""Observation series and minibatches (issue #17): one epoch of minibatches of a linear model
is the exact posterior (independent batches assimilated in turn are the batch update), a
batch of everything is the plain smoother bit for bit, epochs cover every sample once, and
runs resume bit for bit."""

from __future__ import annotations

import pytest
import torch
from conftest import torch_threads

import enkal
from enkal import (
    ESMDA,
    EnsembleSmoother,
    Iterations,
    Observations,
    ObservationSeries,
    SquareRoot,
)

F64 = torch.float64
N_SAMPLES, M, P = 6, 3, 4


@pytest.fixture(autouse=True)
def one_thread():
    with torch_threads(1):
        yield


def _problem(seed: int = 0, full_noise: bool = False):
    """Six samples of three observations of ``H_i u``; the exact posterior of all of them."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N_SAMPLES * M, P, generator=g, dtype=F64)
    y = torch.randn(N_SAMPLES * M, generator=g, dtype=F64)
    samples, covs = [], []
    for i in range(N_SAMPLES):
        if full_noise:
            f = 0.2 * torch.randn(M, M, generator=g, dtype=F64)
            c = f @ f.T + 0.1 * torch.eye(M, dtype=F64)
            samples.append(Observations(y[i * M:(i + 1) * M], noise_cov=c))
        else:
            c = 0.25 * torch.eye(M, dtype=F64)
            samples.append(Observations(y[i * M:(i + 1) * M], noise_std=0.5))
        covs.append(c)
    rinv = torch.linalg.inv(torch.block_diag(*covs))
    cov = torch.linalg.inv(h.T @ rinv @ h + torch.eye(P, dtype=F64))
    mean = cov @ (h.T @ rinv @ y)
    model = enkal.CallableModel(lambda u: u @ h.T, parameters=P, output_size=N_SAMPLES * M)
    return samples, model, mean, cov


def test_epochs_cover_every_sample_once_in_a_fresh_order():
    samples, *_ = _problem()
    series = ObservationSeries(samples, batch_size=2, seed=3)
    assert series.batches_per_epoch == 3
    orders = []
    for epoch in range(4):
        seen = [i for k in range(3) for i in series.batch(3 * epoch + k)]
        assert sorted(seen) == list(range(N_SAMPLES))
        orders.append(seen)
    assert len({tuple(o) for o in orders}) > 1  # shuffled anew
    again = ObservationSeries(samples, batch_size=2, seed=3)
    assert [again.batch(k) for k in range(12)] == [series.batch(k) for k in range(12)]
    # a batch size that does not divide: the leftover sample sits out that epoch
    four = ObservationSeries(samples, batch_size=4, shuffle=False)
    assert four.batches_per_epoch == 1 and four.batch(0) == four.batch(1) == (0, 1, 2, 3)


@pytest.mark.parametrize("full_noise", [False, True])
def test_one_epoch_of_minibatches_is_the_exact_posterior(full_noise):
    """Independent batches assimilated in turn, each once (alpha = 1), are the batch update:
    for a linear model and E - 1 >= N_par, the exact posterior to 1e-9 (float64 rounding of
    three updates; measured ~1e-14)."""
    samples, model, *_ = _problem(1, full_noise)
    series = ObservationSeries(samples, batch_size=2, seed=5)
    sm = EnsembleSmoother(series, rule=SquareRoot(), schedule=Iterations(3), seed=0)
    x0 = torch.randn(12, P, generator=torch.Generator().manual_seed(2), dtype=F64)
    # a standard-normal prior ensemble: its sample moments are not the prior's, so compare
    # with the posterior of the ensemble's own Gaussian
    m0, c0 = x0.mean(0), torch.cov(x0.T)
    h = model(torch.eye(P, dtype=F64)).T
    rinv = torch.linalg.inv(torch.block_diag(*[s.covariance() for s in samples]))
    y = torch.cat([s.values for s in samples])
    c_post = torch.linalg.inv(torch.linalg.inv(c0) + h.T @ rinv @ h)
    m_post = c_post @ (torch.linalg.solve(c0, m0) + h.T @ rinv @ y)
    x = sm.run(model, x0).parameters
    torch.testing.assert_close(x.mean(0), m_post, rtol=0, atol=1e-9)
    torch.testing.assert_close(torch.cov(x.T), c_post, rtol=0, atol=1e-9)


def test_a_batch_of_everything_is_the_plain_smoother_bit_for_bit():
    samples, model, *_ = _problem(2)
    everything = ObservationSeries(samples, batch_size=N_SAMPLES, shuffle=False)
    x0 = torch.randn(10, P, generator=torch.Generator().manual_seed(0), dtype=F64)
    a = EnsembleSmoother(everything, schedule=ESMDA.constant(3), seed=4).run(model, x0)
    b = EnsembleSmoother(everything.all, schedule=ESMDA.constant(3), seed=4).run(model, x0)
    assert torch.equal(a.parameters, b.parameters)
    assert a.history["misfit"] == b.history["misfit"]


def test_batch_predictions_ask_tell_and_resume():
    samples, model, *_ = _problem(3)
    series = ObservationSeries(samples, batch_size=2, seed=1)
    sm = EnsembleSmoother(series, rule=enkal.PerturbedObservations(), schedule=Iterations(6),
                          seed=2)
    x0 = torch.randn(10, P, generator=torch.Generator().manual_seed(1), dtype=F64)
    full = sm.run(model, x0).state
    # ask/tell, simulating only the batch's samples
    state = sm.init(x0)
    for _ in range(6):
        batch = sm.batch(state)
        y = model(state.parameters)[:, series.columns(batch)]
        state, _ = sm.step(state, y)
    assert torch.equal(state.parameters, full.parameters)
    # resumed half way from a state dict, and from a file
    half = sm.run(model, x0, max_iterations=3).state
    resumed = sm.run(model, state=sm.load_state_dict(sm.state_dict(half))).state
    assert torch.equal(resumed.parameters, full.parameters)


def test_resume_from_a_file_and_the_toml_route(tmp_path):
    samples, model, *_ = _problem(4)
    series = ObservationSeries(samples, batch_size=3, seed=7)
    sm = EnsembleSmoother(series, schedule=Iterations(6), seed=0)
    x0 = torch.randn(10, P, generator=torch.Generator().manual_seed(3), dtype=F64)
    straight = enkal.run(sm, model, x0)
    enkal.run(sm, model, x0, store=tmp_path / "h.h5", max_iterations=4)
    resumed = enkal.run(sm, model, resume=tmp_path / "h.h5", store=tmp_path / "h.h5")
    assert torch.equal(resumed.parameters, straight.parameters)

    from importlib.resources import files

    from enkal.config import load_toml
    from enkal.problems.estimation import build

    cfg = load_toml(str(files("enkal.problems") / "lorenz63.toml"))  # 20 times x 3 values
    cfg["smoother"]["minibatch"] = {"samples": 10, "batch_size": 2, "seed": 1}
    exp = build(cfg)
    assert exp.smoother.series.batch(0) == ObservationSeries(
        exp.smoother.series.samples, 2, seed=1).batch(0)
    assert len(exp.smoother.series) == 10 and exp.smoother.series.sample_size == 6
    cfg["smoother"]["minibatch"] = {"samples": 7, "batch_size": 2}
    with pytest.raises(ValueError, match=r"\[smoother\] minibatch: n_samples: 7 does not"):
        build(cfg)


def test_bad_input_is_refused_naming_it():
    samples, model, *_ = _problem()
    with pytest.raises(TypeError, match="samples: expected a sequence"):
        ObservationSeries(samples[0], batch_size=1)
    with pytest.raises(ValueError, match="samples of one size"):
        ObservationSeries([samples[0], Observations([1.0], noise_std=1.0)], batch_size=1)
    with pytest.raises(ValueError, match="batch_size: expected at most 6"):
        ObservationSeries(samples, batch_size=7)
    with pytest.raises(ValueError, match="correlates different samples"):
        ObservationSeries.split(Observations(torch.zeros(4, dtype=F64),
                                             noise_cov=torch.ones(4, 4) + torch.eye(4)), 2, 1)
    sm = EnsembleSmoother(ObservationSeries(samples, 2), schedule=Iterations(2))
    state = sm.init(torch.randn(5, P, dtype=F64))
    with pytest.raises(ValueError, match=r"predictions: .*18.*every sample; or 6"):
        sm.step(state, torch.zeros(5, 7, dtype=F64))


def test_dtype_is_kept_and_inputs_are_not_mutated():
    samples, model, *_ = _problem(5)
    sm = EnsembleSmoother(ObservationSeries(samples, 2, seed=2), schedule=Iterations(4),
                          seed=1)
    x0 = torch.randn(10, P, generator=torch.Generator().manual_seed(4)).to(torch.float32)
    keep = x0.clone()
    state = sm.init(x0)
    y = model(state.parameters.double()).float()
    y_keep = y.clone()
    new, info = sm.step(state, y)
    assert new.parameters.dtype == torch.float32 and torch.isfinite(new.parameters).all()
    assert torch.equal(x0, keep) and torch.equal(y, y_keep)
