"""``enkal.plot``: the figures' layout (no overlapping panels, titles or legends at 1, 3, 12
and 50 parameters), separate bins for prior and posterior, the corner plot's panels, the
predictive band against the closed-form linear-Gaussian answer, and the three kinds of
source (result, path, Dataset). Real runs of a linear model, drawn with the Agg backend."""

from __future__ import annotations

import sys
from itertools import combinations

import matplotlib
import numpy as np
import pytest
import torch

import enkal
import enkal.plot
from enkal.storage import History

matplotlib.use("Agg")

NOISE = 0.3


def _linear(n_par, *, n_obs=30, n_ens=60, seed=0, prior_std=1.0, positive=False):
    """A linear model ``y(t) = A theta`` with outputs named ``y(t=...)``; the truth draws
    the data. ``positive`` makes the last parameter Positive (``phi = exp(u)``)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n_obs, n_par, generator=g, dtype=torch.float64) / n_par ** 0.5
    blocks = [f"p{j}" for j in range(n_par)]
    if positive:
        blocks[-1] = (blocks[-1], (), enkal.Positive())
    layout = enkal.ParameterLayout(blocks)
    names = [f"y(t={0.5 * i:g})" for i in range(n_obs)]
    model = enkal.CallableModel(lambda x: x @ a.T, parameters=layout, output_size=n_obs,
                                output_names=names)
    truth_u = torch.randn(n_par, generator=g, dtype=torch.float64)
    truth = layout.to_physical(truth_u[None])[0]
    y = model(truth[None])[0] + NOISE * torch.randn(n_obs, generator=g, dtype=torch.float64)
    smoother = enkal.EnsembleSmoother(enkal.Observations(y, noise_std=NOISE),
                                      rule=enkal.SquareRoot(), schedule=enkal.ESMDA.constant(4),
                                      seed=seed)
    prior = prior_std * torch.randn(n_ens, n_par, generator=g, dtype=torch.float64)
    return model, smoother, prior, truth, a


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Histories (predictions kept) of linear runs with 1, 3, 12 and 50 parameters."""
    d = tmp_path_factory.mktemp("plot")
    out = {}
    for n in (1, 3, 12, 50):
        model, smoother, prior, truth, _ = _linear(n, positive=n == 3, seed=n)
        path = d / f"lin{n}.h5"
        result = enkal.run(smoother, model, prior, store=path, truth=truth,
                           history=History(predictions=True))
        out[n] = (path, result, prior, model)
    return out


def _overlap(a, b) -> float:
    """How far two display boxes overlap, in pixels: the smaller of the widths and heights
    they share (0 when apart; constrained layout's iterations leave neighbours touching to
    within a fraction of a pixel, which the callers allow)."""
    return max(min(min(a.x1, b.x1) - max(a.x0, b.x0), min(a.y1, b.y1) - max(a.y0, b.y0)), 0.0)


def _texts(fig):
    """The figure-level texts: suptitles and legends of the figure and its subfigures
    (``_suptitle`` is matplotlib's attribute for it; there is no public accessor)."""
    out = []
    for f in [fig, *getattr(fig, "subfigs", [])]:
        if getattr(f, "_suptitle", None) is not None:
            out.append(("suptitle", f._suptitle))
        out += [("legend", leg) for leg in f.legends]
    return out


def _assert_nothing_overlaps(fig):
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    boxes = [ax.get_tightbbox(r) for ax in fig.axes]
    bad = [(i, j, _overlap(a, b)) for (i, a), (j, b) in combinations(enumerate(boxes), 2)
           if _overlap(a, b) > 1.0]
    assert not bad, [(fig.axes[i].get_title(), fig.axes[j].get_title(), s) for i, j, s in bad]
    for ax in fig.axes:  # an inset (with its title and ticks) stays inside its panel
        outer = ax.get_window_extent(r)
        for inset in ax.child_axes:
            b = inset.get_tightbbox(r)
            assert b.x0 >= outer.x0 - 1 and b.x1 <= outer.x1 + 1 and b.y0 >= outer.y0 - 1 \
                and b.y1 <= outer.y1 + 1, ax.get_title()
    texts = [(kind, t.get_window_extent(r)) for kind, t in _texts(fig)]
    assert texts, "expected a suptitle and a legend"
    for kind, box in texts:
        for ax, axbox in zip(fig.axes, boxes, strict=True):
            assert _overlap(box, axbox) <= 1.0, (kind, ax.get_title())
    for (k1, b1), (k2, b2) in combinations(texts, 2):
        assert _overlap(b1, b2) <= 1.0, (k1, k2)
    fig_box = fig.bbox
    for box in boxes:  # nothing cut off at the figure's edge either
        assert box.x0 >= -1 and box.y0 >= -1 and box.x1 <= fig_box.x1 + 1 and \
            box.y1 <= fig_box.y1 + 1


# -- layout ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 3, 12, 50])
@pytest.mark.parametrize("kind", ["summary", "pair", "predictive"])
def test_no_two_axes_titles_or_legends_overlap(runs, n, kind):
    path, *_ = runs[n]
    fig = getattr(enkal.plot, kind)(path)
    assert fig.get_layout_engine() is not None
    _assert_nothing_overlaps(fig)


def test_summary_panels_at_1_3_12_50_parameters(runs):
    titles = {n: [ax.get_title() for ax in enkal.plot.summary(runs[n][0]).axes]
              for n in (1, 3, 12, 50)}
    for n, got in titles.items():
        assert got[:3] == ["data misfit", "parameter spread", "noise inflation"]
        shown = min(n, 12)  # the default cap: the first 12 marginals
        assert got[3:3 + shown] == [f"p{j}" for j in range(shown)]
        # the all-parameter panels only with 8 or more parameters (never single bars)
        assert any(t.startswith("spread reduction") for t in got) == (n >= 8)
    fig = enkal.plot.summary(runs[50][0])
    assert fig.subfigs[1]._suptitle.get_text().endswith("12 of 50 parameters")
    spread = next(ax for ax in fig.axes if ax.get_title().startswith("spread reduction"))
    heights = [p.get_height() for p in spread.patches]
    assert sum(heights) == 50 and sum(h > 0 for h in heights) >= 3


def test_parameters_choose_the_marginals_and_bad_ones_are_named(runs):
    path = runs[12][0]
    fig = enkal.plot.summary(path, parameters=["p11", 0, "p5"])
    assert [ax.get_title() for ax in fig.axes][3:6] == ["p11", "p0", "p5"]
    with pytest.raises(ValueError, match=r"parameters: .*12 parameters \(p0, p1.*'nope'"):
        enkal.plot.summary(path, parameters=["nope"])
    with pytest.raises(ValueError, match="parameters"):
        enkal.plot.pair(path, parameters=[12])
    with pytest.raises(ValueError, match="max_marginals"):
        enkal.plot.summary(path, max_marginals=0)
    with pytest.raises(TypeError, match="source: expected an enkal.SmootherResult"):
        enkal.plot.summary(42)


# -- histograms -----------------------------------------------------------------------------------
def _stairs(ax, gid):
    [patch] = [p for p in ax.patches if p.get_gid() == gid]
    return patch.get_data()


def test_prior_and_posterior_are_binned_separately(tmp_path):
    # y = theta observed 30 times with noise 0.3: posterior std 0.3 / sqrt(30) = 0.055,
    # against the prior's 1: about 18 times narrower
    model, smoother, prior, truth, _ = _linear(1, n_ens=200, seed=1)
    path = tmp_path / "one.h5"
    result = enkal.run(smoother, model, prior, store=path, truth=truth)
    fig = enkal.plot.summary(path)
    ax = next(ax for ax in fig.axes if ax.get_title() == "p0")
    pri, post = _stairs(ax, "prior"), _stairs(ax, "posterior")
    x0 = prior[:, 0].numpy()
    x1 = result.physical[:, 0].numpy()
    # each histogram spans its own ensemble exactly (numpy's "auto" edges: min to max)
    np.testing.assert_allclose(pri.edges[[0, -1]], [x0.min(), x0.max()], rtol=1e-12)
    np.testing.assert_allclose(post.edges[[0, -1]], [x1.min(), x1.max()], rtol=1e-12)
    assert len(post.values) > 3 and len(pri.values) > 3
    assert np.diff(post.edges).max() < np.diff(pri.edges).min() / 5
    assert pri.values.max() == post.values.max() == 1.0  # both scaled to the same height
    # the narrow posterior gets a zoomed inset with its own histogram
    [inset] = ax.child_axes
    assert inset.get_title() == "posterior, zoomed"
    lo, hi = inset.get_xlim()
    assert lo <= x1.min() and hi >= x1.max() and hi - lo < (x0.max() - x0.min()) / 5


def test_marginals_are_in_physical_units(runs):
    path, result, *_ = runs[3]  # p2 is Positive: the file holds log(p2)
    ax = next(ax for ax in enkal.plot.summary(path).axes if ax.get_title() == "p2")
    phys = result.physical[:, 2].numpy()
    assert (phys > 0).all()
    np.testing.assert_allclose(_stairs(ax, "posterior").edges[[0, -1]],
                               [phys.min(), phys.max()], rtol=1e-12)
    with enkal.open(path) as ds:
        truth = ds.attrs["truth"]
    [line] = [ln for ln in ax.lines if ln.get_gid() == "truth"]
    assert line.get_xdata()[0] == pytest.approx(truth[2], rel=1e-12)


# -- pair -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("n", "kwargs", "shown"), [
    (1, {}, 1), (3, {}, 3), (12, {}, 6), (12, {"max_parameters": 4}, 4),
    (50, {"parameters": ["p3", "p7"]}, 2)])
def test_pair_has_a_panel_per_pair(runs, n, kwargs, shown):
    fig = enkal.plot.pair(runs[n][0], **kwargs)
    assert len(fig.axes) == shown * (shown + 1) // 2
    assert all(ax.get_visible() for ax in fig.axes)
    scatters = [ax for ax in fig.axes if ax.collections]
    assert len(scatters) == shown * (shown - 1) // 2
    _assert_nothing_overlaps(fig)


def test_pair_scatters_the_posterior_members(runs):
    path, result, *_ = runs[3]
    fig = enkal.plot.pair(path, show_prior=True)
    lower = fig.axes[1]  # row 1, column 0: p1 against p0; prior first, posterior second
    prior_pts, post_pts = (c.get_offsets() for c in lower.collections)
    np.testing.assert_allclose(post_pts, result.physical[:, [0, 1]].numpy(), rtol=1e-12)
    assert len(prior_pts) == len(post_pts)


# -- predictive -----------------------------------------------------------------------------------
def _band(ax, gid):
    """(x, low, high) of a fill_between band: the polygon's two vertices at each x."""
    [poly] = [c for c in ax.collections if c.get_gid() == gid]
    v = poly.get_paths()[0].vertices
    xs = np.unique(v[:, 0])
    lo = np.array([v[v[:, 0] == x, 1].min() for x in xs])
    hi = np.array([v[v[:, 0] == x, 1].max() for x in xs])
    return xs, lo, hi


def test_predictive_band_is_the_linear_gaussian_posterior_predictive(tmp_path):
    n_par, n_obs, n_ens = 3, 40, 2000
    model, smoother, prior, truth, a = _linear(n_par, n_obs=n_obs, n_ens=n_ens, seed=5)
    result = smoother.run(model, prior)
    fig = enkal.plot.predictive(result, model=model)
    [ax] = fig.axes
    x, lo, hi = _band(ax, "band-data")
    np.testing.assert_allclose(x, 0.5 * np.arange(n_obs))
    # closed form: prior N(0, I), y = A theta + N(0, s^2 I) -> posterior N(m, C) with
    # C = (A^T A / s^2 + I)^-1, m = C A^T y / s^2; new data y* ~ N(A m, A C A^T + s^2 I)
    y = smoother.observations.values.numpy()
    a = a.numpy()
    cov = np.linalg.inv(a.T @ a / NOISE ** 2 + np.eye(n_par))
    mean = a @ cov @ a.T @ y / NOISE ** 2
    sd_g = np.sqrt(np.diag(a @ cov @ a.T))  # of A theta; about 0.45 sd here
    sd = np.sqrt(sd_g ** 2 + NOISE ** 2)
    # the square-root ES-MDA ensemble carries the posterior mean and covariance of its prior
    # sample: their Monte-Carlo error on an output is ~ (sd_g / sd) / sqrt(N_ens) = 0.01 sd;
    # measured max 0.0034 sd over seeds 5-7, so 0.03 sd is 3 such errors, and a band
    # without the noise (mean +- 1.645 sd_g) is off by ~0.9 sd
    np.testing.assert_array_less(np.abs(lo - (mean - 1.6449 * sd)) / sd, 0.03)
    np.testing.assert_array_less(np.abs(hi - (mean + 1.6449 * sd)) / sd, 0.03)
    # the predictions' band: empirical 5% / 95% quantiles of 2000 members, whose sampling
    # error is sqrt(0.05 * 0.95 / 2000) / phi(1.645) = 0.047 sd_g (measured max 0.06 sd_g)
    _, mlo, mhi = _band(ax, "band-model")
    np.testing.assert_array_less(np.abs(mlo - (mean - 1.6449 * sd_g)) / sd_g, 0.2)
    np.testing.assert_array_less(np.abs(mhi - (mean + 1.6449 * sd_g)) / sd_g, 0.2)
    # and the data: about 90% inside (binomial sd for 40 points ~5%; the fitted mean only
    # brings them closer), all of them inside the model band widened by 3 noise sd
    inside = np.mean((lo <= y) & (y <= hi))
    assert inside >= 0.75, inside
    assert ((mlo - 3 * NOISE <= y) & (y <= mhi + 3 * NOISE)).all()
    assert (mhi - mlo < hi - lo).all()  # the predictions' band is inside the data's


def test_predictive_reads_stored_predictions_and_names_the_ensemble(runs):
    path, result, *_ = runs[12]
    fig = enkal.plot.predictive(path)
    # enkal.run keeps the posterior predictive: the predictions of the final ensemble 4
    assert "ensemble 4 (final)" in fig._suptitle.get_text()
    [ax] = fig.axes
    assert ax.get_title() == "y" and ax.get_xlabel() == "t"
    median = next(ln for ln in ax.lines if ln.get_label() == "median prediction")
    np.testing.assert_allclose(median.get_ydata(), np.median(result.predictive.numpy(), axis=0),
                               rtol=1e-12)


def test_predictive_of_a_run_without_the_posterior_predictive_names_the_ensemble(tmp_path):
    model, smoother, prior, truth, _ = _linear(2, seed=2)
    path = tmp_path / "rows.h5"
    result = enkal.run(smoother, model, prior, store=path, predictive=False,
                       history=History(predictions=True))
    fig = enkal.plot.predictive(path)
    # the last predictions kept are those of ensemble 3, the one before the last update
    assert "ensemble 3 (before the last update)" in fig._suptitle.get_text()
    median = next(ln for ln in fig.axes[0].lines if ln.get_label() == "median prediction")
    np.testing.assert_allclose(median.get_ydata(), np.median(result.predictions.numpy(), axis=0),
                               rtol=1e-12)


def test_predictive_without_predictions_says_how_to_store_them(tmp_path):
    model, smoother, prior, truth, _ = _linear(2, seed=2)
    path = tmp_path / "nopred.h5"
    enkal.run(smoother, model, prior, store=path, predictive=False)
    with pytest.raises(ValueError, match=r"no predictions stored.*predictive=True.*model="):
        enkal.plot.predictive(path)
    assert len(enkal.plot.predictive(path, model=model).axes) == 1


def test_output_series_are_parsed_from_the_output_names():
    from enkal.plot import _series

    got = _series(["x(t=0.1)", "y(t=0.1)", "x(t=2e-1)", "y(t=0.2)"])
    assert [(s, k, i.tolist(), x.tolist()) for s, k, i, x in got] == [
        ("x", "t", [0, 2], [0.1, 0.2]), ("y", "t", [1, 3], [0.1, 0.2])]
    assert [(s, k) for s, k, *_ in _series(["y[1]", "y[0]"])] == [("y", "index")]
    assert _series(["y[1]", "y[0]"])[0][2].tolist() == [1, 0]  # sorted by index
    s, k, i, x = _series(["a", "b(t=1)"])[0]  # not all parseable: one series by position
    assert (s, k, i.tolist()) == ("outputs", "output", [0, 1])


# -- sources --------------------------------------------------------------------------------------
def test_every_figure_accepts_a_result_a_path_and_a_dataset(runs):
    path, result, prior, model = runs[3]
    with enkal.open(path) as ds:
        figs = {"path": enkal.plot.summary(path), "dataset": enkal.plot.summary(ds),
                "result": enkal.plot.summary(result, prior=prior)}
        pairs = [enkal.plot.pair(s) for s in (path, ds, result)]
        preds = [enkal.plot.predictive(s) for s in (path, ds, result)]
    data = {k: [(_stairs(ax, "prior"), _stairs(ax, "posterior")) for ax in f.axes[3:6]]
            for k, f in figs.items()}
    for k in ("dataset", "result"):
        for (p1, q1), (p2, q2) in zip(data["path"], data[k], strict=True):
            np.testing.assert_array_equal(p1.edges, p2.edges)
            np.testing.assert_array_equal(q1.edges, q2.edges)
    assert figs["result"]._suptitle.get_text() == "SmootherResult"
    offsets = [f.axes[1].collections[0].get_offsets() for f in pairs]
    np.testing.assert_array_equal(offsets[0], offsets[1])
    np.testing.assert_array_equal(offsets[0], offsets[2])
    # a result keeps the last predictions too (its truth is not kept: pass truth=)
    medians = [next(ln for ln in f.axes[0].lines if ln.get_label() == "median prediction")
               for f in preds]
    np.testing.assert_array_equal(medians[0].get_ydata(), medians[2].get_ydata())
    with pytest.raises(ValueError, match=r"prior: expected the prior ensemble"):
        enkal.plot.summary(result, prior=prior[:, :2])
    with pytest.raises(ValueError, match=r"truth: expected 3 physical values"):
        enkal.plot.summary(result, truth=[1.0])


def test_without_matplotlib_the_error_names_the_extra(runs, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails
    with pytest.raises(ImportError, match=r'enkal\[plot\]'):
        enkal.plot.summary(runs[1][0])
