"""The figure of a filter run: :func:`series`.

Time runs along the x axis. One panel per shown state variable: the truth (a twin
experiment's, when known), the observations of that variable (when it is observed
directly), and the analysis mean with a band of two analysis spreads; a last panel with the
RMSE of the forecast and analysis means against the truth, and the analysis spread (a
well-tuned filter has spread close to the RMSE). Like :mod:`enkal.plot` it returns a
``matplotlib.figure.Figure`` in matplotlib's constrained layout, and imports matplotlib
only when called.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch

from ._checks import check_positive_int
from .plot import _new_figure, _style

__all__ = ["series"]


def _read(source: Any, truth: Any) -> dict[str, Any]:
    """Arrays of a filter run from a FilterResult (with ``truth``), a path or a Dataset."""
    if hasattr(source, "analysis_mean") and isinstance(source.analysis_mean, torch.Tensor):
        d: dict[str, Any] = {
            k: np.asarray(getattr(source, k).detach().cpu(), dtype=np.float64)
            for k in ("times", "forecast_mean", "analysis_mean", "analysis_spread")}
        d["observations"], d["observed"] = None, None
        d["truth"] = None if truth is None else np.asarray(torch.as_tensor(truth).cpu(),
                                                           dtype=np.float64)
        return d
    if isinstance(source, (str, bytes)) or hasattr(source, "__fspath__"):
        from .storage import open_filter_history

        with open_filter_history(source) as ds:
            return _read(ds.load(), truth)
    ds = source
    d = {"times": ds.time.values, "forecast_mean": ds.forecast_mean.values,
         "analysis_mean": ds.analysis_mean.values, "analysis_spread": ds.analysis_spread.values,
         "observations": ds.observations.values, "observed": _observed(ds),
         "truth": ds.truth.values if "truth" in ds else None}
    if truth is not None:
        d["truth"] = np.asarray(torch.as_tensor(truth).cpu(), dtype=np.float64)
    return d


def _observed(ds: Any) -> np.ndarray | None:
    """The state variable each observation is of: the file's ``observed_state``, or all of
    them in order when the filter observed the whole state (``observe`` null)."""
    if "observed_state" in ds:
        return np.asarray(ds.observed_state.values)
    try:
        observe = json.loads(str(ds.attrs.get("config", "{}"))).get("observe", "?")
    except ValueError:
        return None
    same = ds.sizes.get("obs") == ds.sizes.get("state")
    return np.arange(ds.sizes["state"]) if observe is None and same else None


def series(source: Any, *, variables: Any = None, max_panels: int = 6, last: int = 1000,
           truth: Any = None) -> Any:
    """Truth, observations and the analysis over time, and the errors.

    Parameters
    ----------
    source : FilterResult, path or xarray.Dataset
        A run (:func:`enkal.filtering.run_filter`'s result) or its filter history
        (:func:`enkal.run_filter` with ``out=``).
    variables : sequence of int, optional
        The state variables shown (default the first ``max_panels``).
    last : int
        Show the last ``last`` cycles (a long series is a solid band otherwise).
    truth : Tensor (K, N_x), optional
        The true states at the run's times (a file stores its own).
    """
    check_positive_int(max_panels, "max_panels")
    check_positive_int(last, "last")
    d = _read(source, truth)
    if d["analysis_mean"].ndim != 2:
        raise ValueError("source: one filter expected (a batch of filters: plot one of them)")
    n_t, n_x = d["analysis_mean"].shape
    chosen = list(range(min(n_x, max_panels))) if variables is None else \
        [int(i) for i in variables]
    if not chosen or min(chosen) < 0 or max(chosen) >= n_x:
        raise ValueError(f"variables: expected indices in [0, {n_x}), got {variables!r}")
    keep = slice(max(0, n_t - last), n_t)
    t = d["times"][keep]
    fig = _new_figure(figsize=(8.0, 1.6 * (len(chosen) + 1) + 0.6))
    axes = fig.subplots(len(chosen) + 1, 1, sharex=True, squeeze=False)[:, 0]
    for ax, i in zip(axes, chosen, strict=False):
        _variable_panel(ax, d, keep, t, i)
    _error_panel(axes[-1], d, keep, t)
    axes[-1].set_xlabel("time", fontsize=8)
    shown = f"last {t.size} of {n_t} cycles" if t.size < n_t else f"{n_t} cycles"
    fig.suptitle(f"filter run: {shown}", fontsize=10)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncols=len(handles),
                   fontsize=8, frameon=False)
    return fig


def _variable_panel(ax: Any, d: dict, keep: slice, t: np.ndarray, i: int) -> None:
    mean, sd = d["analysis_mean"][keep, i], d["analysis_spread"][keep, i]
    ax.fill_between(t, mean - 2 * sd, mean + 2 * sd, color="C0", alpha=0.25, lw=0,
                    label="analysis ± 2 spread")
    ax.plot(t, mean, color="C0", lw=1.0, label="analysis mean")
    if d["truth"] is not None:
        ax.plot(t, d["truth"][keep, i], color="k", lw=0.8, label="truth")
    observed = d.get("observed")
    if observed is not None and d["observations"] is not None:
        cols = np.nonzero(np.asarray(observed) == i)[0]
        if cols.size:
            ax.plot(t, d["observations"][keep, cols[0]], ".", color="C3", ms=2.5,
                    label="observations")
    _style(ax, ylabel=f"x[{i}]")


def _error_panel(ax: Any, d: dict, keep: slice, t: np.ndarray) -> None:
    spread = np.sqrt(np.mean(d["analysis_spread"][keep] ** 2, axis=1))
    if d["truth"] is not None:
        for what, colour in (("forecast", "C1"), ("analysis", "C0")):
            err = np.sqrt(np.mean((d[f"{what}_mean"][keep] - d["truth"][keep]) ** 2, axis=1))
            ax.plot(t, err, color=colour, lw=0.8, label=f"{what} RMSE")
    ax.plot(t, spread, color="C2", lw=0.8, label="analysis spread")
    ax.set_yscale("log")
    ax.legend(fontsize=7, loc="lower right", frameon=False, ncols=3)
    _style(ax, ylabel="error")
    ax.tick_params(which="both", labelsize=7)
