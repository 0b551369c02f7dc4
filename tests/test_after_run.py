"""After the run (issue #14): physical units in the file, CF attributes, the posterior
predictive, ArviZ, priors in physical units."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
import warnings

import h5py
import numpy as np
import pytest
import torch
import xarray as xr

import enkal
from enkal.cli import main

az = pytest.importorskip("arviz")

N_ENS = 40


def _linear_problem(n_obs: int = 6, seed: int = 0):
    """phi = (exp(u0), 1 + 2 sigmoid(u1)) enter G(phi) = A phi linearly: a twin experiment
    with a Positive and a Bounded parameter."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n_obs, 2, generator=g, dtype=torch.float64)
    layout = enkal.ParameterLayout([("k", (), enkal.Positive()), ("c", (), enkal.Bounded(1, 3))])
    model = enkal.CallableModel(lambda phi: phi @ a.T, parameters=layout, output_size=n_obs)
    truth = torch.tensor([2.0, 2.5], dtype=torch.float64)
    y = a @ truth + 0.05 * torch.randn(n_obs, generator=g, dtype=torch.float64)
    obs = enkal.Observations(y, noise_std=0.05)
    return model, obs, truth


def _run(tmp_path=None, **kw):
    model, obs, truth = _linear_problem()
    smoother = enkal.EnsembleSmoother(obs, schedule=enkal.ESMDA(), seed=1)
    layout, prior = enkal.prior_ensemble(
        [enkal.constrained_gaussian("k", 1.5, 1.0, lower=0),
         enkal.constrained_gaussian("c", 2.0, 0.4, 1, 3)], N_ENS,
        generator=torch.Generator().manual_seed(2))
    store = None if tmp_path is None else tmp_path / "run.h5"
    result = enkal.run(smoother, model, prior, store=store, **kw)
    return result, model, store


# -- physical values in the file -------------------------------------------------------------
def test_plain_xarray_reads_physical_values_of_lorenz63_within_15_percent(tmp_path):
    """Acceptance: ``xr.open_dataset(out)`` of problems/lorenz63.toml, plain xarray code in a
    process that never imports enkal, gives member means within 15% of the truth (the run's
    90% intervals are within 12% of it; the unconstrained values are 77% off)."""
    out = tmp_path / "l63.h5"
    assert main(["run", _lorenz63(), "--out", str(out), "--quiet"]) == 0
    code = textwrap.dedent(f"""
        import sys, json, xarray as xr
        ds = xr.open_dataset({str(out)!r})
        mean = ds["parameters_physical"].isel(iteration=-1).mean("member")
        truth = ds.attrs["truth"]
        print(json.dumps([[float(m), float(t)] for m, t in zip(mean.values, truth)]))
        assert "enkal" not in sys.modules
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    pairs = np.array(eval(res.stdout))  # noqa: S307 - our own JSON numbers
    rel = np.abs(pairs[:, 0] - pairs[:, 1]) / pairs[:, 1]
    assert rel.max() < 0.15, rel
    with xr.open_dataset(out) as ds:  # the unconstrained variable says what it is
        assert ds.parameters.attrs["space"] == "unconstrained"
        assert "parameters_physical" in ds.parameters.attrs["comment"]
        unconstrained = ds.parameters.isel(iteration=-1).mean("member").values
        assert np.abs(unconstrained - pairs[:, 1]).max() / pairs[:, 1].max() > 0.5


def _lorenz63() -> str:
    from importlib.resources import files

    return str(files("enkal.problems") / "lorenz63.toml")


def test_physical_values_are_the_layout_map_of_the_parameters(tmp_path):
    result, model, store = _run(tmp_path)
    with enkal.open(store) as ds:
        x = torch.from_numpy(ds.parameters.values.reshape(-1, 2))
        stored = ds.parameters_physical.values.reshape(-1, 2)
        rows = np.isfinite(stored[:, 0])
        assert torch.equal(model.layout.to_physical(x)[torch.from_numpy(rows)],
                           torch.from_numpy(stored[rows]))
        assert torch.equal(torch.from_numpy(ds.parameters_physical.values[-1]),
                           result.physical)
        assert ds.parameters_physical.attrs["space"] == "physical"
        # enkal.storage.physical reads the stored variable
        assert np.array_equal(enkal.storage.physical(ds).values[-1], stored.reshape(
            ds.parameters.shape)[-1])


def test_an_unconstrained_layout_stores_no_second_copy(tmp_path):
    layout = enkal.ParameterLayout.flat(2)
    model = enkal.CallableModel(lambda phi: phi.clone(), parameters=layout, output_size=2)
    obs = enkal.Observations(torch.zeros(2, dtype=torch.float64), noise_std=1.0)
    enkal.run(enkal.EnsembleSmoother(obs, seed=0), model,
              torch.randn(8, 2, dtype=torch.float64), store=tmp_path / "u.h5",
              max_iterations=2)
    with enkal.open(tmp_path / "u.h5") as ds:
        assert "parameters_physical" not in ds
        assert "also the physical values" in ds.parameters.attrs["comment"]


def test_cf_attributes_and_every_stored_value_is_declared_by_the_flag_masks(tmp_path):
    """Old files declared flag_masks [1, 2] while rows held 5 (parameters + state)."""
    _run(tmp_path)
    with h5py.File(tmp_path / "run.h5") as f:
        assert f.attrs["Conventions"] == "CF-1.10"
        # version 2: an enkal that predates parameters_physical refuses to resume it
        assert int(np.asarray(f.attrs["enkal_format_version"]).ravel()[0]) == 2
        assert f.attrs["source"].startswith("enkal ")
        masks = f["stored"].attrs["flag_masks"].astype(int)
        meanings = f["stored"].attrs["flag_meanings"].split()
        assert len(masks) == len(meanings) == 4
        declared = int(np.bitwise_or.reduce(masks))
        values = f["stored"][:].astype(int)
        assert set(values.tolist()) >= {5}  # rows that hold the parameters and the state
        assert all(v & ~declared == 0 for v in values)
        for name, v in f.items():  # CF: every data variable says what it is
            if isinstance(v, h5py.Dataset) and v.ndim and "iteration" not in name and \
                    name not in ("member", "parameter", "output", "rng_byte", "output2",
                                 "observations", "noise_std"):
                assert "long_name" in v.attrs, name


def test_xarray_holding_the_file_does_not_block_enkal_open(tmp_path):
    """The notebook workflow of docs/schema.md: xr.open_dataset, then enkal.open and
    enkal.to_inference_data of the same path in one process."""
    _run(tmp_path)
    held = xr.open_dataset(tmp_path / "run.h5")
    try:
        held.parameters.values  # noqa: B018 - the file is open and read
        with enkal.open(tmp_path / "run.h5") as ds:
            assert ds.sizes["member"] == N_ENS
        assert "posterior" in enkal.to_inference_data(tmp_path / "run.h5").groups()
    finally:
        held.close()


# -- the posterior predictive ------------------------------------------------------------------
def test_the_posterior_predictive_is_g_of_the_final_ensemble_and_is_stored(tmp_path):
    result, model, store = _run(tmp_path)
    expected = model(result.physical)
    assert torch.equal(result.predictive, expected)
    assert result.n_forwards == 4 * N_ENS  # the predictive's forwards are not counted
    with enkal.open(store) as ds:
        assert int(ds.stored.values[-1]) & 2
        assert np.array_equal(ds.predictions.values[-1], expected.numpy())
        assert np.isnan(ds.predictions.values[:-1]).all()  # only the posterior's
    # the result's xarray view holds it too
    assert np.array_equal(enkal.to_xarray(result).predictions.values[-1], expected.numpy())


def test_no_predictive_when_asked_not_or_when_the_data_is_large(tmp_path, monkeypatch):
    result, _, store = _run(tmp_path, predictive=False)
    assert result.predictive is None
    with enkal.open(store) as ds:
        assert not int(ds.stored.values[-1]) & 2
    monkeypatch.setattr(enkal.runner, "PREDICTIVE_MAX_OUTPUTS", 5)  # 6 outputs here
    assert _run()[0].predictive is None
    with pytest.raises(TypeError, match="predictive"):
        _run(predictive=1)


# -- ArviZ ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["result", "path", "dataset"])
def test_to_inference_data_groups_and_summary_equal_result_summary(kind, tmp_path):
    result, model, store = _run(tmp_path)
    if kind == "result":
        source = result
    elif kind == "path":
        source = store
    else:
        source = enkal.open(store)
    idata = enkal.to_inference_data(source)
    assert {"posterior", "observed_data", "posterior_predictive",
            "sample_stats"} <= set(idata.groups())
    # a SmootherResult keeps the final state only; the file keeps the prior too
    assert ("prior" in idata.groups()) == (kind != "result")
    post = idata.posterior
    assert post.sizes["chain"] == 1 and post.sizes["draw"] == N_ENS
    assert np.array_equal(np.stack([post.k.values[0], post.c.values[0]], 1),
                          result.physical.numpy())
    summary = az.summary(idata, kind="stats", round_to="none")
    mine = result.summary()
    for name in ("k", "c"):  # both with N_ens - 1; only summation order differs
        assert summary.loc[name, "mean"] == pytest.approx(mine[name]["mean"], rel=1e-12)
        assert summary.loc[name, "sd"] == pytest.approx(mine[name]["std"], rel=1e-12)
    assert np.array_equal(idata.posterior_predictive.y.values[0], result.predictive.numpy())
    np.testing.assert_array_equal(idata.observed_data.y.values,
                                  result.smoother.observations.values.numpy())
    if kind != "result":  # the prior group is iteration 0, in physical units
        with enkal.open(store) as ds:
            x0 = torch.from_numpy(ds.parameters.values[0])
        assert np.array_equal(idata.prior.k.values[0],
                              model.layout.to_physical(x0)[:, 0].numpy())
    # the members' misfits as StepInfo.misfit defines it, per member
    z = (result.predictive - result.smoother.observations.values) / 0.05
    np.testing.assert_allclose(idata.sample_stats.data_misfit.values[0],
                               (z * z).mean(1).numpy(), rtol=1e-12)
    assert idata.sample_stats.mean_misfit.dims == ("iteration",)
    if kind == "dataset":
        source.close()


def test_to_inference_data_of_a_vector_block_and_bad_sources(tmp_path):
    layout = enkal.ParameterLayout([("w", (2, 3))])
    model = enkal.CallableModel(lambda phi: phi.clone(), parameters=layout, output_size=6)
    obs = enkal.Observations(torch.zeros(6, dtype=torch.float64), noise_std=1.0)
    result = enkal.run(enkal.EnsembleSmoother(obs, seed=0), model,
                       torch.randn(8, 6, dtype=torch.float64), max_iterations=2)
    idata = enkal.to_inference_data(result)
    assert idata.posterior.w.dims == ("chain", "draw", "w_dim_0", "w_dim_1")
    assert np.array_equal(idata.posterior.w.values[0].reshape(8, 6), result.physical.numpy())
    with pytest.raises(TypeError, match="source"):
        enkal.to_inference_data(42)
    with pytest.raises(FileNotFoundError):
        enkal.to_inference_data(tmp_path / "missing.h5")


# -- priors in physical units ----------------------------------------------------------------
def test_constrained_gaussian_positive_matches_the_log_normal_moments_exactly():
    b = enkal.constrained_gaussian("K", 50.0, 20.0, lower=0)
    assert isinstance(b.constraint, enkal.Positive)
    # the log-normal's moments in closed form
    mean = math.exp(b.u_mean + b.u_std ** 2 / 2)
    std = math.sqrt(math.expm1(b.u_std ** 2)) * mean
    assert mean == pytest.approx(50.0, rel=1e-14) and std == pytest.approx(20.0, rel=1e-14)
    r = enkal.constrained_gaussian("a", -3.0, 2.0)
    assert isinstance(r.constraint, enkal.Real) and (r.u_mean, r.u_std) == (-3.0, 2.0)


@pytest.mark.parametrize("mean, std", [(2.0, 0.3), (1.2, 0.1), (2.9, 0.05), (2.0, 0.9)])
def test_constrained_gaussian_bounded_matches_the_moments(mean, std):
    """Checked by adaptive quadrature (scipy.integrate.quad, independent of the
    Gauss-Hermite rule the solve uses), to 1e-6 relative to std."""
    from scipy.integrate import quad

    b = enkal.constrained_gaussian("c", mean, std, 1.0, 3.0)
    assert isinstance(b.constraint, enkal.Bounded)

    def moment(k):
        def f(z):
            phi = 1.0 + 2.0 / (1.0 + math.exp(-(b.u_mean + b.u_std * z)))
            return phi ** k * math.exp(-z * z / 2) / math.sqrt(2 * math.pi)
        return quad(f, -12, 12, epsabs=1e-13, epsrel=1e-13, limit=200)[0]

    m1, m2 = moment(1), moment(2)
    assert abs(m1 - mean) < 1e-6 * std
    assert abs(math.sqrt(m2 - m1 * m1) - std) < 1e-6 * std


def test_prior_ensemble_draws_the_physical_moments():
    """20,000 members: the sample mean is within 4 standard errors of the target."""
    blocks = [enkal.constrained_gaussian("K", 50.0, 20.0, lower=0),
              enkal.constrained_gaussian("p", 0.3, 0.1, 0, 1, shape=(2,))]
    layout, x = enkal.prior_ensemble(blocks, 20000, generator=torch.Generator().manual_seed(0))
    assert layout.names == ["K", "p[0]", "p[1]"]
    assert isinstance(layout.blocks[1].constraint, enkal.Bounded)
    phi = layout.to_physical(x)
    for j, (m, s) in enumerate([(50.0, 20.0), (0.3, 0.1), (0.3, 0.1)]):
        assert abs(float(phi[:, j].mean()) - m) < 4 * s / math.sqrt(20000)


@pytest.mark.parametrize("args, kwargs, match", [
    (("K", 50.0, 20.0), {"lower": 5.0}, "lower, upper"),
    (("K", -1.0, 1.0), {"lower": 0.0}, "mean: expected a value strictly between"),
    (("K", 1.0, 0.0), {"lower": 0.0}, "std > 0"),
    (("p", 0.5, 0.5), {"lower": 0.0, "upper": 1.0}, "std: expected less than"),
    (("K", "50", 20.0), {}, "mean: expected a number"),
    (("", 1.0, 1.0), {}, "name"),
    (("K", 1.0, 1.0), {"shape": (0,)}, "shape"),
])
def test_constrained_gaussian_refuses_bad_input_naming_it(args, kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        enkal.constrained_gaussian(*args, **kwargs)
    with pytest.raises(TypeError, match="blocks"):
        enkal.prior_ensemble(enkal.constrained_gaussian("a", 0.0, 1.0), 4)


def test_a_prior_in_physical_units_given_unconstrained_warns(recwarn):
    """The issue's example: K mean 50, std 20 meant physically, given to the unconstrained
    space (K = exp(50 +- 20)), warns; a constrained_gaussian prior does not."""
    model, obs, _ = _linear_problem()
    g = torch.Generator().manual_seed(0)
    bad = torch.stack([50 + 20 * torch.randn(N_ENS, generator=g, dtype=torch.float64),
                       torch.zeros(N_ENS, dtype=torch.float64)], 1)
    smoother = enkal.EnsembleSmoother(obs, schedule=enkal.ESMDA([2.0, 2.0]), seed=0)
    with pytest.warns(UserWarning, match=r"block 'k' \(Positive\).*constrained_gaussian"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # exp overflows to inf
            smoother.run(model, bad, max_iterations=1)
    _, good = enkal.prior_ensemble([enkal.constrained_gaussian("k", 50, 20, lower=0),
                                    enkal.constrained_gaussian("c", 2, 0.3, 1, 3)], N_ENS)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        smoother.run(model, good, max_iterations=1)


def test_priors_constrained_gaussian_makes_never_warn_and_shape_takes_an_int(recwarn):
    """Large or small SI quantities (1e22 +- 3e21: unconstrained mean 50.6) and a wide
    logit-normal (std 0.46 on (0, 1): unconstrained std 10.2) are plausible priors."""
    blocks = [enkal.constrained_gaussian("n", 1e22, 3e21, lower=0),
              enkal.constrained_gaussian("x", 0.5, 0.46, 0, 1, shape=3)]
    layout, prior = enkal.prior_ensemble(blocks, 64, generator=torch.Generator().manual_seed(0))
    assert layout.size == 4
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        enkal.priors.check_prior_scale(layout, prior)
    with pytest.raises(TypeError, match="shape: expected an int or a tuple"):
        enkal.constrained_gaussian("x", 0.5, 0.1, 0, 1, shape="3")
