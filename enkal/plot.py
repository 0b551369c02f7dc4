"""Figures of a run: :func:`summary`, :func:`pair` and :func:`predictive`.

Each takes a :class:`~enkal.SmootherResult`, the path of an enkal history file or its
``xarray.Dataset`` (``enkal.open(path)``) and returns a ``matplotlib.figure.Figure`` (no
pyplot state: ``fig.savefig(path)``; a notebook shows it), parameters in **physical units**
under the layout's names. matplotlib is imported only when a figure is made (``pip install
"enkal[plot]"``). The layout is matplotlib's ``"constrained"``: no two panels, titles or
legends overlap (``tests/test_plot.py`` checks it at 1, 3, 12 and 50 parameters).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ._checks import check_positive_int
from .storage.views import history_of, stored_rows

__all__ = ["summary", "pair", "predictive"]

_PRIOR, _POST, _TRUTH = "0.55", "C0", "k"  # colours: grey prior, blue posterior, black truth
_MIN_FOR_SPREAD_PANELS = 8  # parameters below which per-parameter histograms say nothing
_ZOOM_BELOW = 0.2  # inset when the posterior's range is below this fraction of the prior's
_MAX_BINS = 50
_DIAGNOSTICS = ("misfit", "mean_misfit", "spread", "alpha")


def _new_figure(**kwargs: Any) -> Any:
    """A constrained-layout ``Figure`` on an Agg canvas (not registered with pyplot)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError('enkal.plot needs matplotlib, which is not installed: pip install '
                          '"enkal[plot]"') from err
    fig = Figure(layout="constrained", **kwargs)
    FigureCanvasAgg(fig)
    return fig


def _style(ax: Any, title: str = "", xlabel: str = "", ylabel: str = "") -> None:
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.tick_params(labelsize=7)


# -- reading a run ------------------------------------------------------------------------------
@dataclass
class _Run:
    """What the figures draw (physical units): ``prior`` the first stored ensemble."""

    label: str
    names: list[str]
    iterations: np.ndarray
    diagnostics: dict[str, np.ndarray]
    posterior: np.ndarray
    posterior_iteration: int
    observations: np.ndarray
    noise_std: np.ndarray
    output_names: list[str]
    truth: np.ndarray | None
    prior: np.ndarray | None = None
    prior_iteration: int | None = None
    predictions: np.ndarray | None = None
    predictions_iteration: int | None = None


def _physical_rows(ds: Any, rows: Sequence[int]) -> np.ndarray:
    """Physical values of the Dataset's ``rows``, ``(len(rows), N_ens, N_par)``: the one
    place that reads parameters (a file that stores physical values would be read here)."""
    from .storage import physical

    return np.asarray(physical(ds.isel(iteration=list(rows))).values, dtype=np.float64)


def _file_truth(ds: Any) -> np.ndarray | None:
    t = np.atleast_1d(np.asarray(ds.attrs.get("truth", np.nan), dtype=np.float64))
    return t if t.shape == (ds.sizes.get("parameter", -1),) else None


def _prior_physical(prior: Any, ds: Any) -> np.ndarray:
    """A prior ensemble given by the caller (unconstrained, as given to ``run``), physical."""
    from .storage import read_layout

    layout = read_layout(ds)
    if not isinstance(prior, torch.Tensor) or prior.ndim != 2 or prior.shape[1] != layout.size:
        raise ValueError(f"prior: expected the prior ensemble, a tensor (N_ens, {layout.size}) "
                         "in the unconstrained space (as given to run), got "
                         f"{type(prior).__name__} {tuple(getattr(prior, 'shape', ()))}")
    phys = layout.to_physical(prior.detach().cpu().to(torch.float64))
    return np.asarray(phys.numpy(), dtype=np.float64)


def _read(source: Any, *, prior: Any = None, truth: Any = None,
          predictions: bool = False) -> _Run:
    """The first and last stored ensembles, diagnostics, data and last predictions."""
    with history_of(source) as (ds, label):
        rows = stored_rows(ds, 1).tolist()
        if not rows:
            raise ValueError(f"{label}: no ensemble stored, nothing to plot")
        its = np.asarray(ds["iteration"].values)
        first, last = rows[0], rows[-1]
        ens = _physical_rows(ds, [first, last] if first != last else [last])
        run = _Run(label=label, names=[str(n) for n in ds["parameter"].values], iterations=its,
                   diagnostics={v: np.asarray(ds[v].values, dtype=np.float64)
                                for v in _DIAGNOSTICS if v in ds}, posterior=ens[-1],
                   posterior_iteration=int(its[last]),
                   observations=np.asarray(ds["observations"].values, dtype=np.float64),
                   noise_std=np.asarray(ds["noise_std"].values, dtype=np.float64),
                   output_names=[str(n) for n in ds["output"].values], truth=_file_truth(ds))
        if prior is not None:
            run.prior, run.prior_iteration = _prior_physical(prior, ds), 0
        elif first != last:
            run.prior, run.prior_iteration = ens[0], int(its[first])
        pred_rows = stored_rows(ds, 2).tolist() if predictions and "predictions" in ds \
            else []
        if pred_rows:
            run.predictions = np.asarray(ds["predictions"].isel(iteration=pred_rows[-1]).values,
                                         dtype=np.float64)
            run.predictions_iteration = int(its[pred_rows[-1]])
    if truth is not None:
        run.truth = _checked_truth(truth, len(run.names))
    return run


def _checked_truth(truth: Any, n: int) -> np.ndarray:
    t = np.atleast_1d(np.asarray(truth.detach().cpu() if isinstance(truth, torch.Tensor)
                                 else truth, dtype=np.float64))
    if t.shape != (n,):
        raise ValueError(f"truth: expected {n} physical values (N_par), got shape {t.shape}")
    return t


def _select(names: list[str], parameters: Any, limit: int) -> list[int]:
    """Column indices of ``parameters`` (names or indices; default the first ``limit``)."""
    if parameters is None:
        return list(range(min(len(names), limit)))
    wanted = [parameters] if isinstance(parameters, (str, int)) else list(parameters)
    index: dict[Any, int] = {**{n: i for i, n in enumerate(names)}, **{i: i for i in range(len(names))}}
    bad = [p for p in wanted if isinstance(p, (bool, float)) or p not in index]
    if bad or not wanted:
        shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
        raise ValueError(f"parameters: expected names or indices of the run's {len(names)} "
                         f"parameters ({shown}), got {bad[0] if bad else 'none'!r}")
    return [index[p] for p in wanted]


def _chosen(n_shown: int, n_total: int) -> str:
    return f"{n_shown} of {n_total} parameters" if n_shown < n_total else \
        f"{n_total} parameter{'s' * (n_total > 1)}"


# -- histograms ---------------------------------------------------------------------------------
def _edges(x: np.ndarray) -> np.ndarray | None:
    """numpy's ``"auto"`` bin edges of ``x`` (at most 50 bins), ``None`` if all are equal."""
    x = x[np.isfinite(x)]
    if x.size == 0 or np.ptp(x) == 0:
        return None
    edges = np.histogram_bin_edges(x, bins="auto")
    return edges if edges.size <= _MAX_BINS + 1 else np.histogram_bin_edges(x, bins=_MAX_BINS)


def _stairs(ax: Any, x: np.ndarray, *, prior: bool) -> None:
    """A histogram of ``x`` on its own bins, scaled to peak 1 (grey prior, blue posterior)."""
    edges, x = _edges(x), x[np.isfinite(x)]
    colour, gid = (_PRIOR, "prior") if prior else (_POST, "posterior")
    if edges is None:
        ax.axvline(x[0] if x.size else np.nan, color=colour, lw=2, gid=gid)
        return
    counts = np.histogram(x, bins=edges)[0] / np.diff(edges)
    ax.stairs(counts / counts.max(), edges, fill=prior, color=colour, lw=1.6,
              alpha=0.45 if prior else 1.0, gid=gid)


def _range(*columns: np.ndarray | None) -> tuple[float, float]:
    vals = np.concatenate([c[np.isfinite(c)] for c in columns if c is not None])
    lo, hi = float(vals.min()), float(vals.max())
    pad = 0.05 * (hi - lo) if hi > lo else 0.5 * max(abs(lo), 1.0)
    return lo - pad, hi + pad


def _histograms(ax: Any, post: np.ndarray, pri: np.ndarray | None, t: float | None) -> None:
    """Prior and posterior of one parameter, each binned on its own, and the truth."""
    if pri is not None:
        _stairs(ax, pri, prior=True)
    _stairs(ax, post, prior=False)
    if t is not None:
        ax.axvline(t, color=_TRUTH, ls="--", lw=1.2, gid="truth")
    ax.set_xlim(*_range(pri, post, None if t is None else np.array([t])))
    ax.set_ylim(0, 1.08)
    ax.set_yticks([])


def _marginal(ax: Any, run: _Run, j: int) -> None:
    post, pri = run.posterior[:, j], None if run.prior is None else run.prior[:, j]
    t = None if run.truth is None else float(run.truth[j])
    _histograms(ax, post, pri, t)
    _style(ax, run.names[j])
    if pri is not None and _narrow(post, pri):
        _zoom(ax, post, t)


def _narrow(post: np.ndarray, pri: np.ndarray) -> bool:
    return bool(np.nanmax(post) - np.nanmin(post) <
                _ZOOM_BELOW * (np.nanmax(pri) - np.nanmin(pri)))


def _zoom(ax: Any, post: np.ndarray, truth: float | None) -> None:
    """An inset on the posterior's range (and a near truth), on the side away from it."""
    lo, hi = _range(post)
    if truth is not None and lo - 3 * (hi - lo) <= truth <= hi + 3 * (hi - lo):
        lo, hi = _range(post, np.array([truth]))
    left = np.nanmedian(post) > np.mean(ax.get_xlim())
    inset = ax.inset_axes([0.03 if left else 0.55, 0.36, 0.42, 0.44])
    _stairs(inset, post, prior=False)
    if truth is not None:
        inset.axvline(truth, color=_TRUTH, ls="--", lw=1.0)
    inset.set_xlim(lo, hi)
    inset.set_ylim(0, 1.1)
    inset.set_yticks([])
    _style(inset)
    inset.set_title("posterior, zoomed", fontsize=7, pad=2)
    inset.xaxis.get_major_locator().set_params(nbins=3)


def _legend_handles(run: _Run, prior: bool = True) -> tuple[list[Any], list[str]]:
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    items: list[tuple[Any, str]] = [(Patch(color=_PRIOR, alpha=0.45), f"prior (iteration {run.prior_iteration})")
             ] if prior and run.prior is not None else []
    items.append((Line2D([], [], color=_POST, lw=1.6),
                  f"posterior (iteration {run.posterior_iteration})"))
    if run.truth is not None:
        items.append((Line2D([], [], color=_TRUTH, ls="--"), "truth"))
    return [h for h, _ in items], [lab for _, lab in items]


# -- summary ------------------------------------------------------------------------------------
_PANELS = (("data misfit", (("misfit", "members' mean"), ("mean_misfit", "ensemble mean")),
            "before", "misfit / N_obs"),
           ("parameter spread", (("spread", "spread"),), "before", "RMS std, unconstrained"),
           ("noise inflation", (("alpha", "alpha"),), "update", "alpha"))


def _diagnostic_panels(run: _Run) -> list[tuple[str, list[tuple[str, str]], str, str]]:
    """(title, [(variable, label)], x meaning, y label) of the diagnostics present."""
    out = []
    for title, variables, x_is, ylabel in _PANELS:
        have = [(v, lab) for v, lab in variables
                if v in run.diagnostics and np.isfinite(run.diagnostics[v]).any()]
        if have:
            out.append((title, have, x_is, ylabel))
    return out


def _draw_diagnostics(sub: Any, run: _Run, panels: list) -> None:
    axes = sub.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, variables, x_is, ylabel) in zip(axes, panels, strict=True):
        for v, label in variables:
            y = run.diagnostics[v]
            ok = np.isfinite(y)
            # misfit and spread of update k describe the ensemble before it (k - 1)
            x = run.iterations[ok] - (1 if x_is == "before" else 0)
            ax.plot(x, y[ok], marker="o", ms=3, label=label)
        ys = np.concatenate([run.diagnostics[v] for v, _ in variables])
        if np.nanmin(ys) > 0 and np.nanmax(ys) > 10 * np.nanmin(ys):
            ax.set_yscale("log")
        _style(ax, title, "ensemble (0 = prior)" if x_is == "before" else "update", ylabel)
        ax.xaxis.get_major_locator().set_params(integer=True)
        if title == "data misfit":
            ax.axhline(1.0, color="0.5", lw=0.8, ls=":")
            ax.legend(fontsize=7, title="misfit of", title_fontsize=7)


def _draw_marginals(sub: Any, run: _Run, cols: list[int], ncols: int, heading: str) -> None:
    nrows = math.ceil(len(cols) / ncols)
    axes = sub.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, j in zip(axes, cols, strict=False):
        _marginal(ax, run, j)
    for ax in axes[len(cols):]:
        ax.remove()
    handles, labels = _legend_handles(run)
    sub.legend(handles, labels, loc="outside lower center", ncols=len(labels), fontsize=8,
               frameon=False)
    sub.suptitle(heading, fontsize=10)


def _spread_panels(run: _Run) -> bool:
    """The all-parameter panels carry information: enough parameters that differ."""
    if len(run.names) < _MIN_FOR_SPREAD_PANELS:
        return False
    post = np.nanstd(run.posterior, axis=0)
    return bool(np.ptp(post) > 0) or run.truth is not None


def _draw_spread(sub: Any, run: _Run) -> None:
    twin = run.truth is not None
    axes = sub.subplots(1, 2 if twin else 1, squeeze=False)[0]
    post = np.nanstd(run.posterior, axis=0, ddof=1)
    ax = axes[0]
    if run.prior is not None:
        ratio = post / np.nanstd(run.prior, axis=0, ddof=1)
        values, what = np.log10(ratio[np.isfinite(ratio) & (ratio > 0)]), \
            "log10(posterior std / prior std)"
    else:
        values, what = np.log10(post[post > 0]), "log10 posterior std (physical)"
    edges = _edges(values)
    ax.hist(values, bins=edges if edges is not None else 1, color=_POST, alpha=0.7)
    _style(ax, f"spread reduction, all {len(run.names)} parameters", what, "parameters")
    if twin:
        _draw_recovery(axes[1], run)


def _draw_recovery(ax: Any, run: _Run) -> None:
    assert run.truth is not None
    mean = np.nanmean(run.posterior, axis=0)
    q05, q95 = np.nanquantile(run.posterior, [0.05, 0.95], axis=0)
    ax.errorbar(run.truth, mean, yerr=[mean - q05, q95 - mean], fmt="o", ms=3, lw=0.8,
                color=_POST, label="posterior mean, 5-95%")
    lo, hi = _range(run.truth, q05, q95)
    ax.plot([lo, hi], [lo, hi], color=_TRUTH, lw=0.8, ls="--", label="= truth")
    inside = np.mean((q05 <= run.truth) & (run.truth <= q95))
    _style(ax, f"posterior vs truth ({100 * inside:.0f}% in the 90% interval)", "truth",
           "posterior")
    ax.legend(fontsize=7)


def summary(source: Any, *, parameters: Any = None, max_marginals: int = 12, prior: Any = None,
            truth: Any = None, title: str | None = None) -> Any:
    """The summary figure of a run, in rows (each only when it has something to draw).

    1. The misfit per observation of the members and of their mean (1 is the noise level)
       and the parameter spread, of each ensemble; the inflation ``alpha`` of each update.
    2. Each parameter's marginal: prior (the first stored ensemble, grey) and posterior
       (the last, blue), each binned on its own (numpy ``"auto"``: the larger of Sturges
       and Freedman-Diaconis) and scaled to the same height, so both read even when the
       posterior is 100 times narrower; then an inset zooms on the posterior (when its
       range is under a fifth of the prior's). The truth of a twin experiment dashed.
    3. With 8 or more parameters: every parameter's spread reduction (a histogram) and,
       with a truth, the posterior means and 90% intervals against it.

    Parameters
    ----------
    source : SmootherResult, path or xarray.Dataset
        A ``SmootherResult`` keeps only its final ensemble: pass ``prior=`` for the prior.
    parameters : sequence of str or int, optional
        Names or column indices of the marginals drawn (a grid that grows); default the
        first ``max_marginals`` (the heading says how many of how many).
    max_marginals : int
    prior : Tensor, shape (N_ens, N_par), optional
        The prior ensemble, unconstrained as given to ``run``.
    truth : array-like, shape (N_par,), optional
        Physical truth (default: the file's, from ``run(truth=...)``).
    title : str, optional
        Default: the file's name.

    Returns
    -------
    matplotlib.figure.Figure

    >>> import torch, enkal, enkal.plot
    >>> model = enkal.CallableModel(lambda x: x, parameters=["a", "b"], output_size=2)
    >>> smoother = enkal.EnsembleSmoother(enkal.Observations([1.0, 2.0], noise_std=0.1),
    ...                                   schedule=enkal.ESMDA.constant(2))
    >>> prior = torch.randn(32, 2, generator=torch.Generator().manual_seed(0),
    ...                     dtype=torch.float64)
    >>> fig = enkal.plot.summary(smoother.run(model, prior), prior=prior)
    >>> [ax.get_title() for ax in fig.axes][-2:]
    ['a', 'b']
    """
    check_positive_int(max_marginals, "max_marginals")
    run = _read(source, prior=prior, truth=truth)
    cols = _select(run.names, parameters, max_marginals)
    panels = _diagnostic_panels(run)
    spread = _spread_panels(run)
    ncols = min(4, len(cols))
    nrows = math.ceil(len(cols) / ncols)
    heights = ([2.6] if panels else []) + [0.5 + 2.0 * nrows] + ([2.8] if spread else [])
    fig = _new_figure(figsize=(11.0 if len(cols) > 1 else 8.0, sum(heights) + 0.5))
    subs = list(np.atleast_1d(fig.subfigures(len(heights), 1, height_ratios=heights)))
    if panels:
        _draw_diagnostics(subs.pop(0), run, panels)
    heading = (f"marginals in physical units, "
               f"{_chosen(len(cols), len(run.names))}")
    _draw_marginals(subs.pop(0), run, cols, ncols, heading)
    if spread:
        _draw_spread(subs.pop(0), run)
    fig.suptitle(title or run.label, fontsize=11)
    return fig


# -- pair ---------------------------------------------------------------------------------------
def pair(source: Any, *, parameters: Any = None, max_parameters: int = 6, prior: Any = None,
         show_prior: bool = False, truth: Any = None, title: str | None = None) -> Any:
    """A corner plot of the posterior members: scatter plots below the diagonal, each
    parameter's histogram on it, the truth marked (dashed lines, a cross). ``parameters``,
    ``prior``, ``truth`` and ``title`` are as for :func:`summary`; the first
    ``max_parameters`` are drawn by default (``n`` make ``n (n + 1) / 2`` panels).
    ``show_prior`` adds the prior members, faint grey (the axes then cover them). Returns a
    ``matplotlib.figure.Figure``.
    """
    check_positive_int(max_parameters, "max_parameters")
    if not isinstance(show_prior, bool):
        raise TypeError(f"show_prior: expected a bool, got {show_prior!r}")
    run = _read(source, prior=prior, truth=truth)
    cols = _select(run.names, parameters, max_parameters)
    n = len(cols)
    fig = _new_figure(figsize=(1.9 * n + 1.6, 1.9 * n + 1.2))
    axes = fig.subplots(n, n, squeeze=False)
    pri = run.prior if show_prior else None
    limits = [_range(run.posterior[:, j], None if pri is None else pri[:, j],
                     None if run.truth is None else run.truth[j:j + 1]) for j in cols]
    for (r, c), ax in np.ndenumerate(axes):
        if c > r:
            ax.remove()
            continue
        _pair_panel(ax, run, pri, cols[r], cols[c])
        ax.set_xlim(*limits[c])
        if r != c:
            ax.set_ylim(*limits[r])
        _style(ax, "", run.names[cols[c]] if r == n - 1 else "",
               run.names[cols[r]] if c == 0 and r > 0 else "")
        ax.xaxis.get_major_locator().set_params(nbins=3)
        ax.yaxis.get_major_locator().set_params(nbins=3)
        ax.tick_params(axis="x", labelrotation=30, labelbottom=r == n - 1)
        ax.tick_params(axis="y", labelleft=c == 0 and r > 0)
    handles, labels = _legend_handles(run, prior=pri is not None)
    fig.legend(handles, labels, loc="outside lower center", ncols=len(labels), fontsize=8,
               frameon=False)
    fig.suptitle(f"{title or run.label}: posterior members, "
                 f"{_chosen(n, len(run.names))}", fontsize=10)
    return fig


def _pair_panel(ax: Any, run: _Run, pri: np.ndarray | None, jr: int, jc: int) -> None:
    t = run.truth
    if jr == jc:
        _histograms(ax, run.posterior[:, jc], None if pri is None else pri[:, jc],
                    None if t is None else float(t[jc]))
        return
    if pri is not None:
        ax.scatter(pri[:, jc], pri[:, jr], s=3, color=_PRIOR, alpha=0.3, lw=0)
    ax.scatter(run.posterior[:, jc], run.posterior[:, jr], s=5, color=_POST, alpha=0.6, lw=0)
    if t is not None:
        ax.axvline(t[jc], color=_TRUTH, ls="--", lw=0.7)
        ax.axhline(t[jr], color=_TRUTH, ls="--", lw=0.7)
        ax.plot(t[jc], t[jr], marker="x", color=_TRUTH, ms=6)


# -- predictive ---------------------------------------------------------------------------------
_NUMBER = r"(?P<value>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)"
_KEYED = re.compile(r"^(?P<series>.+?)\((?P<key>[A-Za-z_]\w*)=" + _NUMBER + r"\)$")
_INDEXED = re.compile(r"^(?P<series>.+?)\[(?P<value>-?\d+)\]$")


def _series(names: list[str]) -> list[tuple[str, str, np.ndarray, np.ndarray]]:
    """Output series (name, x label, output indices, x): ``I(t=1.5)`` is series ``I`` at
    ``t = 1.5``, ``y[3]`` series ``y`` at index 3; other names make one series by position."""
    groups: dict[str, tuple[str, list[int], list[float]]] = {}
    for i, name in enumerate(names):
        m = _KEYED.match(name) or _INDEXED.match(name)
        if m is None:
            return [("outputs", "output", np.arange(len(names)), np.arange(len(names)))]
        group = groups.setdefault(m["series"], (m.groupdict().get("key") or "index", [], []))
        group[1].append(i)
        group[2].append(float(m["value"]))
    out = []
    for series, (key, idx, xs) in groups.items():
        order = np.argsort(xs, kind="stable")
        out.append((series, key, np.asarray(idx)[order], np.asarray(xs)[order]))
    return out


def _mixture_quantiles(pred: np.ndarray, std: np.ndarray, q: float) -> np.ndarray:
    """The ``q`` quantile per output of ``G(theta_m) + N(0, std^2)`` over the members ``m``
    (a Gaussian mixture), by bisection on its CDF: 60 halvings, to 1e-18 of the bracket."""
    g, sd = torch.from_numpy(pred), torch.from_numpy(np.maximum(std, 1e-300))
    lo, hi = g.min(dim=0).values - 10 * sd, g.max(dim=0).values + 10 * sd
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        below = torch.special.ndtr((mid - g) / sd).mean(dim=0) < q
        lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
    return (0.5 * (lo + hi)).numpy()


def _final_predictions(run: _Run, model: Any) -> tuple[np.ndarray, str]:
    if model is not None:
        from .forward import evaluate

        pred, ok = evaluate(model, torch.from_numpy(run.posterior))
        return np.asarray(pred[ok].detach().cpu(), dtype=np.float64), \
            f"ensemble {run.posterior_iteration} (final, run here)"
    if run.predictions is None:
        raise ValueError(f"{run.label}: no predictions stored, so no predictive band: "
                         "enkal.run(..., predictive=True) stores the posterior predictive "
                         "(the default up to 10,000 observations), or pass model= to run "
                         "the model on the final ensemble")
    pred = run.predictions[np.isfinite(run.predictions).all(axis=1)]
    last = "final" if run.predictions_iteration == run.posterior_iteration else \
        "before the last update"
    return pred, f"ensemble {run.predictions_iteration} ({last})"


def predictive(source: Any, *, model: Any = None, max_panels: int = 12,
               title: str | None = None) -> Any:
    """The data with the posterior-predictive band, a panel per output series.

    Outputs named ``NAME(t=VALUE)`` (the ODE models) are series ``NAME`` against ``t``,
    ``NAME[i]`` against ``i``, other names one series by position (the first ``max_panels``
    series are drawn). Per output: the median of the members' predictions (line), their
    5-95% range (dark band), the 5-95% range of new data ``G(theta) + noise`` (light band:
    the members' predictions widened by ``noise_std``, a Gaussian mixture) and the data
    (dots); about 90% of the data fall in the light band when the fit is right.

    The predictions are the last ones ``source`` stored: the posterior predictive that
    :func:`enkal.run` keeps at the final row (by default), else an earlier ensemble's (the
    title says which); or those of ``model`` (a ``ForwardModel``, whose ``output_names``
    then name the outputs) run here on the final ensemble. Without either, a ``ValueError``
    says how to store them. Returns a ``matplotlib.figure.Figure``.
    """
    check_positive_int(max_panels, "max_panels")
    run = _read(source, predictions=model is None)
    pred, which = _final_predictions(run, model)
    if pred.shape[0] < 2:
        raise ValueError(f"{run.label}: fewer than 2 members with finite predictions")
    series = _series(getattr(model, "output_names", None) or run.output_names)
    shown = series[:max_panels]
    ncols = min(3, len(shown))
    nrows = math.ceil(len(shown) / ncols)
    fig = _new_figure(figsize=(max(7.0, 4.0 * ncols + 0.5), 2.8 * nrows + 0.8))
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    bands = {"model": np.quantile(pred, [0.05, 0.5, 0.95], axis=0),
             "data": [_mixture_quantiles(pred, run.noise_std, q) for q in (0.05, 0.95)]}
    for ax, s in zip(axes, shown, strict=False):
        _predictive_panel(ax, run, bands, s)
    for ax in axes[len(shown):]:
        ax.remove()
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=len(labels), fontsize=8,
               frameon=False)
    more = f", the first {len(shown)} of {len(series)} series" if len(shown) < len(series) \
        else ""
    fig.suptitle(f"{title or run.label}: data and predictions of {which}{more}", fontsize=10)
    return fig


def _predictive_panel(ax: Any, run: _Run, bands: dict, s: tuple) -> None:
    name, key, idx, x = s
    lo_d, hi_d = bands["data"][0][idx], bands["data"][1][idx]
    lo_m, med, hi_m = (b[idx] for b in bands["model"])
    if x.size == 1:  # one point: a band one unit wide around it
        x, lo_d, hi_d, lo_m, med, hi_m = (np.repeat(v, 2) for v in (x, lo_d, hi_d, lo_m, med, hi_m))
        x = x + np.array([-0.5, 0.5])
    ax.fill_between(x, lo_d, hi_d, color=_POST, alpha=0.15, lw=0, gid="band-data",
                    label="5-95% of new data")
    ax.fill_between(x, lo_m, hi_m, color=_POST, alpha=0.4, lw=0, gid="band-model",
                    label="5-95% of predictions")
    ax.plot(x, med, color=_POST, lw=1.2, label="median prediction")
    ax.plot(x if x.size == idx.size else x.mean(keepdims=True), run.observations[idx], ".",
            color=_TRUTH, ms=4, label="data")
    _style(ax, name or "outputs", key)
