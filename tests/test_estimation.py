"""The parameter-estimation plugin: strict configs, twin experiments, calibration."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest
import torch

import enkal
from enkal.config import build_strategy, load_toml
from enkal.problems import estimation

ROOT = pathlib.Path(__file__).resolve().parents[1]
LORENZ = ROOT / "problems" / "lorenz63.toml"


def lorenz_config():
    return load_toml(LORENZ)


@pytest.mark.parametrize("edit,pattern", [
    (lambda c: c["smoother"].update(ensemble_sise=3), r"\[smoother\]: unknown key.*ensemble_sise"),
    (lambda c: c["smoother"].pop("ensemble_size"), r"\[smoother\]: missing key.*ensemble_size"),
    (lambda c: c.update(smother={}), r"configuration: unknown key.*smother"),
    (lambda c: c["model"].update(type="Lorenz64"), r"\[model\]: type 'Lorenz64' is not one of"),
    (lambda c: c["model"].update(dtt=0.1), r"\[model\] \(Lorenz63\): unknown key.*dtt"),
    (lambda c: c["model"].pop("t_obs"), r"missing key.*t_obs"),
    (lambda c: c["parameters"].pop("rho"), r"\[parameters\]: missing key.*rho"),
    (lambda c: c["parameters"]["rho"].update(prior_mean=3.0), r"\[parameters.rho\]: unknown key"),
    (lambda c: c["parameters"]["rho"].update(prior_median=-3.0), r"\[parameters.rho\] prior_median"),
    (lambda c: c["parameters"]["rho"].update(prior_std=0.0), r"prior_std: expected finite values > 0"),
    (lambda c: c["smoother"].update(schedule={"type": "Esmda"}), r"schedule type 'Esmda' is not one of"),
    (lambda c: c["smoother"].update(schedule={"type": "ESMDA", "alphas": [2.0]}),
     r"sum\(1/alpha\) == 1"),
    (lambda c: c["smoother"].update(rule={"type": "SquareRoot", "trunc": 0.9}),
     r"rule SquareRoot has no field.*trunc"),
    (lambda c: c["smoother"].update(ensemble_size=1), r"ensemble_size: expected an int >= 2"),
    (lambda c: c["data"].pop("noise_std"), r"\[data\]: missing key 'noise_std'"),
    (lambda c: c["data"].update(values=[1.0, 2.0]), r"expected 60 observations"),
    (lambda c: c["model"].update(solver={"type": "Euler"}), r"solver: expected"),
])
def test_config_errors_name_the_key(edit, pattern):
    cfg = lorenz_config()
    edit(cfg)
    with pytest.raises((ValueError, TypeError), match=pattern):
        estimation.build(cfg)


def test_build_strategy_round_trips_describe():
    from enkal.config import describe

    for obj in (enkal.SquareRoot(truncation=0.9), enkal.ESMDA.constant(3),
                enkal.FixedAnnealing(factor=0.5, initial=2.0, floor=0.1),
                enkal.CollapseGuard(1e-5, 1e-3), enkal.ResampleFailed(max_abs=1e9)):
        kind = {"SquareRoot": "rule", "ESMDA": "schedule", "FixedAnnealing": "schedule",
                "CollapseGuard": "guard", "ResampleFailed": "failure"}[type(obj).__name__]
        assert build_strategy(kind, describe(obj), where="test") == obj


def test_twin_experiment_is_reproducible_and_in_physical_units():
    a = estimation.build(lorenz_config())
    b = estimation.build(lorenz_config())
    assert torch.equal(a.prior, b.prior) and torch.equal(a.observations.values, b.observations.values)
    assert a.model.layout.names == ["sigma", "rho", "beta"]
    phys = a.model.layout.to_physical(a.prior)
    assert (phys > 0).all()
    # the prior median is the configured one (log-normal): within 3 standard errors
    med = phys.median(0).values
    torch.testing.assert_close(med, torch.tensor([8.0, 24.0, 2.2], dtype=torch.float64),
                               rtol=3 * 0.3 * 1.25 / 10, atol=0)
    c = estimation.build(lorenz_config(), seed=5)
    assert not torch.equal(a.prior, c.prior)


def _peer_esmda(exp, seed):
    """iterative_ensemble_smoother's ES-MDA (4 steps) on the same prior, data and model."""
    ies = pytest.importorskip("iterative_ensemble_smoother")
    obs = exp.observations
    esmda = ies.ESMDA(covariance=obs.noise_std.numpy() ** 2, observations=obs.values.numpy(),
                      alpha=np.array([4.0, 4.0, 4.0, 4.0]), seed=seed)
    x = exp.prior.numpy().T.copy()  # (N_par, N_ens), unconstrained
    forwards = 0
    for _ in range(esmda.num_assimilations()):
        y = exp.model(exp.model.layout.to_physical(torch.from_numpy(x.T.copy()))).numpy().T
        forwards += x.shape[1]
        esmda.prepare_assimilation(Y=y, truncation=1.0)
        x = esmda.assimilate_batch(X=x)
    return exp.model.layout.to_physical(torch.from_numpy(x.T.copy())), forwards


@pytest.mark.slow
def test_lorenz63_against_peer_esmda_over_20_seeds():
    # Issue acceptance: over 20 seeds, enkal's posterior-mean relative error per parameter is
    # no worse than iterative_ensemble_smoother's ES-MDA (4 steps, E = 100) on the same data
    # and prior, with no more forward evaluations; 90% intervals cover the truth in 80-98%
    # of (seed, parameter) cases. Both are Monte-Carlo methods, so "no worse" is tested on
    # the mean error over seeds with a 15% margin (the seed-to-seed spread of the mean error
    # over 20 seeds is about 20%); the coverage band is the issue's.
    ours, peer, covered, cases = [], [], 0, 0
    for seed in range(20):
        exp = estimation.build(lorenz_config(), seed=seed)
        res = exp.smoother.run(exp.model, exp.prior, max_iterations=exp.max_iterations)
        phys = res.physical
        truth = exp.truth
        ours.append(((phys.mean(0) - truth).abs() / truth).numpy())
        q = torch.quantile(phys, torch.tensor([0.05, 0.95], dtype=phys.dtype), dim=0)
        covered += int(((q[0] <= truth) & (truth <= q[1])).sum())
        cases += 3
        peer_phys, peer_forwards = _peer_esmda(exp, seed)
        peer.append(((peer_phys.mean(0) - truth).abs() / truth).numpy())
        assert res.n_forwards <= peer_forwards
    ours_err, peer_err = np.mean(ours, axis=0), np.mean(peer, axis=0)
    print("enkal mean relative error", ours_err, "peer", peer_err, "coverage", covered / cases)
    assert np.all(ours_err <= 1.15 * peer_err), (ours_err, peer_err)
    assert 0.80 <= covered / cases <= 0.98
