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


# -- stochastic twin experiments through summary statistics ----------------------------------
def test_path_statistics_of_white_noise_have_their_known_covariance():
    # T iid N(0, 1) values per path: Var(time mean) = 1/T, E(time var) = 1, and the lag-1
    # autocorrelation has mean ~ -1/T and variance ~ 1/T. 4000 paths: the variances are
    # within 4 standard errors (4 sqrt(2/4000) = 9% relative).
    from enkal.models.summary import path_statistics, path_statistics_cov

    t = 50
    paths = torch.randn(4000, t, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    stats = ("time_mean", "time_var", "acf1")
    s = path_statistics(paths, stats)
    assert s.shape == (4000, 3)
    cov = path_statistics_cov(paths, stats)
    torch.testing.assert_close(cov[0, 0] * t, torch.tensor(1.0, dtype=torch.float64), rtol=0.09,
                               atol=0)
    torch.testing.assert_close(cov[2, 2] * t, torch.tensor(1.0, dtype=torch.float64), rtol=0.15,
                               atol=0)  # 1/T up to O(1/T^2)
    assert abs(float(s[:, 1].mean()) - 1.0) < 4 * (2 / t / 4000) ** 0.5
    # per-time statistics of one path: the values themselves, and log(1 + x) of counts
    both = path_statistics(paths.abs(), ("mean", "log1p"))
    assert torch.equal(both, torch.cat([paths.abs(), torch.log1p(paths.abs())], dim=1))


def ou_config(**summary):
    cfg = load_toml(ROOT / "problems" / "ou.toml")
    cfg["model"]["t_obs"] = {"start": 0.5, "stop": 20.0, "step": 0.5}
    cfg["summary"].update({"replicates": 4, "covariance_paths": 200, **summary})
    return cfg


def test_twin_statistics_noise_is_one_realisation_plus_the_models_monte_carlo_error():
    from enkal.models.summary import path_statistics_cov

    exp = estimation.build(ou_config())
    k = exp.model.n_replicates
    assert exp.observations.size == 4 and exp.model.output_names[0] == "time_mean x"
    # the same covariance paths, rebuilt: Gamma = C (1/K_d + 1/K) with K_d = 1
    cfg = ou_config()
    make = estimation._model_factory(cfg, device=None, base_dir=None)
    paths = estimation._truth_paths(make, exp.truth.unsqueeze(0), 200,
                                    seed=20_011 + 3 * (1_000_003 * 1 + 0))
    c = path_statistics_cov(paths, exp.model.statistics, n_times=exp.model.n_times)
    torch.testing.assert_close(exp.observations.covariance(), (1 + 1 / k) * c, rtol=1e-12,
                               atol=1e-15)
    cfg["data"]["realisations"] = 3
    exp3 = estimation.build(cfg)
    torch.testing.assert_close(exp3.observations.covariance(), (1 / 3 + 1 / k) * c,
                               rtol=1e-12, atol=1e-15)
    assert not torch.equal(exp3.observations.values, exp.observations.values)


@pytest.mark.parametrize("edit,pattern", [
    (lambda c: c["summary"].update(statistics=["std"]), r"\[data\] realisations: .*'std'"),
    (lambda c: c["summary"].update(statistics=["acf3"]), r"\[summary\]: statistics: expected"),
    (lambda c: c["summary"].update(covariance_paths=3), r"\[summary\] covariance_paths"),
    (lambda c: c["data"].update(realisations=0), r"\[data\] realisations"),
    (lambda c: c.pop("summary"), r"noise_std = \"auto\": only with a \[summary\]"),
])
def test_summary_config_errors_name_the_key(edit, pattern):
    cfg = ou_config()
    edit(cfg)
    with pytest.raises((ValueError, TypeError), match=pattern):
        estimation.build(cfg)


def test_statistics_over_several_realisations_bootstrap_their_covariance():
    # "std" is a statistic over realisations: K_d = 6 observed paths, covariance bootstrapped
    # from them and scaled by 1 + K_d / K for the model's own K = 4 replicates
    from enkal.models.summary import monte_carlo_cov

    cfg = ou_config(statistics=["mean", "std"])
    cfg["model"]["t_obs"] = [0.5, 1.0, 1.5]
    cfg["data"]["realisations"] = 6
    exp = estimation.build(cfg)
    paths = estimation._truth_paths(estimation._model_factory(cfg, device=None, base_dir=None),
                                    exp.truth.unsqueeze(0), 6, seed=10_007 + 1_000_003)
    torch.testing.assert_close(exp.observations.values[:3], paths.mean(0))
    cov = monte_carlo_cov(paths, ("mean", "std"),
                          generator=torch.Generator().manual_seed(1_000_003))
    torch.testing.assert_close(exp.observations.covariance(), (1 + 6 / 4) * cov, rtol=1e-12,
                               atol=1e-15)
