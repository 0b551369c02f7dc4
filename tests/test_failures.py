"""Failing members in a real run: keep working, lose nothing, explain clearly."""

from __future__ import annotations

import math
import pathlib

import pytest
import torch

import enkal
from enkal.config import load_toml
from enkal.problems import estimation

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _uniform(rows: torch.Tensor, salt: float) -> torch.Tensor:
    """A deterministic pseudo-uniform in [0, 1) per row of parameters (a hash of the row)."""
    z = torch.sin(rows.to(torch.float64) @ torch.tensor([12.9898, 78.233, 37.719],
                                                       dtype=torch.float64) + salt) * 43758.5453
    return z - torch.floor(z)


class Flaky(enkal.ForwardModel):
    """Wraps a model; ~30% of members fail: NaN, an exception, or 1e30 outputs, mixed.

    Which members fail is a function of their parameters (so a batch and its member-by-member
    retry agree), and parameters change every iteration, so failures move around.
    """

    def __init__(self, inner: enkal.ForwardModel, rate: float = 0.3) -> None:
        self.inner = inner
        self.rate = rate
        self.device, self.dtype = inner.device, inner.dtype

    @property
    def layout(self):
        return self.inner.layout

    @property
    def output_size(self):
        return self.inner.output_size

    def forward(self, parameters):
        u = _uniform(parameters, 0.0)
        kind = _uniform(parameters, 1.0)
        fail = u < self.rate
        if bool((fail & (kind < 1 / 3)).any()):
            raise RuntimeError("simulated solver crash")
        y = self.inner(parameters)
        y[fail & (kind >= 1 / 3) & (kind < 2 / 3)] = float("nan")
        y[fail & (kind >= 2 / 3)] = 1e30
        return y


@pytest.mark.slow
def test_lorenz63_with_30_percent_failures_matches_the_failure_free_run(tmp_path):
    exp = estimation.build(load_toml(ROOT / "problems" / "lorenz63.toml"), seed=3)
    clean = exp.smoother.run(exp.model, exp.prior, max_iterations=exp.max_iterations)
    store = tmp_path / "flaky.h5"
    flaky = enkal.run(exp.smoother, Flaky(exp.model), exp.prior,
                      max_iterations=exp.max_iterations, store=store)
    failed = flaky.history["n_failed"]
    # about 30% of 100 members each iteration (binomial sd ~4.6): between 15 and 45
    assert all(15 <= f <= 45 for f in failed), failed
    pc, pf = clean.physical, flaky.physical
    assert torch.isfinite(pf).all()
    # failures cost effective ensemble size, not correctness: the posterior mean stays
    # within two posterior standard deviations of the failure-free run's
    dist = (pf.mean(0) - pc.mean(0)).abs() / pc.std(0)
    assert bool((dist < 2).all()), dist
    with enkal.storage.open_dataset(store) as ds:
        assert ds["n_failed"].values[1:].tolist() == failed


def test_all_members_failing_stops_with_a_clear_error_and_a_usable_checkpoint(tmp_path):
    exp = estimation.build(load_toml(ROOT / "problems" / "lorenz63.toml"), seed=0)
    dead = enkal.CallableModel(lambda x: torch.full((x.shape[0], 60), float("nan"),
                                                    dtype=x.dtype),
                               parameters=exp.model.layout, output_size=60)
    store = tmp_path / "dead.h5"
    with pytest.raises(enkal.FailedMembersError, match="only 0 of 100 members succeeded"):
        enkal.run(exp.smoother, dead, exp.prior, store=store)
    ckpt = tmp_path / "dead.ckpt.h5"
    state = enkal.storage.read_checkpoint(ckpt, exp.smoother)
    assert state.iteration == 0 and torch.equal(state.parameters, exp.prior)
    with enkal.storage.open_dataset(store) as ds:
        assert ds.sizes["iteration"] == 1  # the prior row


def test_min_success_fraction_stops_early():
    exp = estimation.build(load_toml(ROOT / "problems" / "lorenz63.toml"), seed=0)
    smoother = enkal.EnsembleSmoother(exp.observations,
                                      failure=enkal.ResampleFailed(min_success=0.9))
    with pytest.raises(enkal.FailedMembersError, match="at least 90"):
        smoother.run(Flaky(exp.model, rate=0.5), exp.prior, max_iterations=2)


def test_members_that_raise_are_reported():
    exp = estimation.build(load_toml(ROOT / "problems" / "lorenz63.toml"), seed=0)
    phys = exp.model.layout.to_physical(exp.prior[:20])
    report = enkal.evaluate(Flaky(exp.model, rate=0.5), phys)
    y, ok = report
    kinds = _uniform(phys, 1.0)
    fail = _uniform(phys, 0.0) < 0.5
    raised = fail & (kinds < 1 / 3)
    assert not ok[raised].any() and not ok[fail & (kinds >= 1 / 3) & (kinds < 2 / 3)].any()
    assert all("simulated solver crash" in report.errors[int(i)]
               for i in torch.nonzero(raised).squeeze(1))
    assert math.isfinite(float(y[ok].sum()))
