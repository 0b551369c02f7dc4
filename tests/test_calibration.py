"""Calibration of the stochastic twin experiments (issue #4): 90% intervals over 20 seeds.

A calibrated posterior covers the truth with its central 90% interval in 90% of data sets.
Each seed here is a new data set (one observed realisation), prior ensemble and set of model
replicates; the count of covering seeds is binomial. The problems are the shipped
``problems/ou.toml`` and ``problems/sir.toml`` made cheaper (a shorter OU path with a
coarser Euler step, fewer model replicates) so that both fit in a few minutes on two cores; the method (statistics of one
realisation, noise covariance ``C (1 + 1/K)`` from paths at the truth, ES-MDA) is theirs.
``bench/calibration.py`` reports the full configurations.

Bands, per problem, with ``n`` (seed, parameter) cases and ``p = 0.9`` (cases treated as
independent; parameters of one seed are correlated, which widens the spread somewhat):
* pooled coverage in the issue's [0.80, 0.98]: a calibrated method falls outside with
  probability 1.9% for OU (``n = 60``, sd 0.039) and 3.0% for SIR (``n = 40``, sd 0.047),
  mostly at the top (all cases covered). Per parameter over 20 seeds (sd 0.067) the same
  band would fail a calibrated method 16% of the time (20 of 20 alone: 12%), so
* each parameter's own coverage is only held to at least 0.70 (13 or fewer of 20 has
  probability 0.24% at p = 0.9): one parameter cannot fail while the others hide it;
* the mean whitened misfit per observation at the truth in [0.6, 1.6]: chi-square mean 1,
  standard deviation of the mean over 20 seeds ``sqrt(2 / (N_obs 20))`` = 0.16 for OU's
  four statistics, 0.09 for SIR's twelve counts; the former bootstrapped covariance gave
  1.64.
Measured (2026-11): OU theta 0.90, mu 1.00, sigma 0.95, misfit 0.93; SIR beta 0.80, gamma
1.00, misfit 0.99. Runtime: 1.9 (OU) and 2.5 (SIR) CPU seconds per seed, about 90 s in
all on an idle core (a loaded shared machine: 5-10 times the wall time).
The seeds are fixed, so the test is deterministic; the probabilities say how likely a
correct method is to land outside the bands with other seeds.
"""

from __future__ import annotations

import pathlib

import pytest
from conftest import torch_threads

from enkal.config import load_toml
from enkal.problems import estimation

ROOT = pathlib.Path(__file__).resolve().parents[1]
SEEDS = range(20)


def small_ou():
    cfg = load_toml(ROOT / "problems" / "ou.toml")
    cfg["model"]["t_obs"] = {"start": 0.5, "stop": 50.0, "step": 0.5}
    cfg["model"]["dt"] = 0.25  # two Euler steps per observation: 2.5 times cheaper than 0.1
    cfg["summary"]["replicates"] = 4
    cfg["summary"]["covariance_paths"] = 500
    return cfg


def small_sir():
    cfg = load_toml(ROOT / "problems" / "sir.toml")
    cfg["summary"]["replicates"] = 5
    cfg["summary"]["covariance_paths"] = 500
    return cfg


def check(result):
    rows = result["parameters"]
    pooled = sum(r["coverage"] for r in rows.values()) / len(rows)
    assert 0.80 <= pooled <= 0.98, rows
    assert all(r["coverage"] >= 0.70 for r in rows.values()), rows
    assert 0.6 <= result["misfit_at_truth"] <= 1.6, result


@pytest.mark.slow
@pytest.mark.timeout(1800)  # ~40-50 s each on an idle core; far more on a loaded one
@pytest.mark.parametrize("make", [small_ou, small_sir], ids=["ou", "sir"])
def test_90_percent_intervals_cover_the_truth_in_80_to_98_percent_of_20_seeds(make):
    with torch_threads(1):  # many tiny ops per step: extra threads only wait on each other
        result = estimation.calibration(make(), SEEDS)
    print(result)
    check(result)


def test_calibration_records_are_checked():
    # the checker fails an under-dispersed posterior and an over-dispersed one
    bad = {"misfit_at_truth": 1.0,
           "parameters": {"a": {"coverage": 0.75}, "b": {"coverage": 0.75}}}
    with pytest.raises(AssertionError):
        check(bad)
    bad["parameters"] = {"a": {"coverage": 1.0}, "b": {"coverage": 1.0}}
    with pytest.raises(AssertionError):
        check(bad)
    bad["parameters"] = {"a": {"coverage": 0.9}, "b": {"coverage": 0.9}}
    bad["misfit_at_truth"] = 1.64
    with pytest.raises(AssertionError):
        check(bad)
