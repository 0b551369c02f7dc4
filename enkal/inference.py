"""ArviZ: a run as an ``arviz.InferenceData`` (:func:`to_inference_data`).

An ensemble is a sample: its ``N_ens`` members become ``draw`` of one ``chain``, in physical
units, one variable per parameter block (a scalar block ``sigma`` has dims ``(chain, draw)``;
a block of shape ``(n, m)`` adds ``sigma_dim_0, sigma_dim_1``), so ArviZ's summaries and plots
(``az.summary``, ``az.plot_pair``, ``az.plot_posterior``, ``az.plot_ppc``) work on it as on an
MCMC trace. Effective sample size and R-hat computed from one chain of ensemble members are
meaningless (members are not a Markov chain): use ``az.summary(idata, kind="stats")``.

Groups:

* ``posterior``: the final ensemble (the last row of the history that holds one);
* ``prior``: the ensemble of iteration 0, when the history stored it (a file of
  :func:`enkal.run`; not a :class:`~enkal.SmootherResult`, which keeps the final state only);
* ``observed_data``: ``y (output)``, the observations, with ``noise_std``;
* ``posterior_predictive``: ``y (chain, draw, output)``, the predictions of the posterior
  members (``result.predictive``; stored by :func:`enkal.run` by default, see
  :class:`enkal.storage.History`), when available;
* ``sample_stats``: ``data_misfit (chain, draw)``, each posterior member's misfit
  ``||L^-1 (G - y)||^2 / N_obs`` (as :class:`~enkal.StepInfo`'s ``misfit``, per member) when
  the posterior predictive is there, and the run's diagnostics per update (``misfit``,
  ``mean_misfit``, ``alpha``, ``spread``... over ``iteration``).
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from .ensemble import ParameterLayout
from .storage.views import history_of, physical, stored_rows

__all__ = ["to_inference_data"]



def _import_arviz() -> Any:
    try:
        with warnings.catch_warnings():  # arviz 0.2x announces its 1.0 refactor on import
            warnings.simplefilter("ignore", FutureWarning)
            import arviz
    except ImportError as err:
        raise ImportError("to_inference_data needs ArviZ: pip install 'enkal[arviz]' "
                          "(or pip install arviz)") from err
    return arviz


def _blocks(layout: ParameterLayout, values: np.ndarray) -> dict[str, tuple[list, np.ndarray]]:
    """``(N_ens, N_par)`` physical values as one ``(1, N_ens, *shape)`` array per block."""
    out = {}
    for b in layout.blocks:
        dims = ["chain", "draw", *(f"{b.name}_dim_{i}" for i in range(len(b.shape)))]
        block = values[:, b.slice].reshape((1, values.shape[0], *b.shape))
        out[b.name] = (dims, block)
    return out


def _group(ds: Any, layout: ParameterLayout, row: int, attrs: dict) -> Any:
    import xarray as xr

    values = np.asarray(physical(ds.isel(iteration=[row])).values[0])
    group = xr.Dataset({k: v for k, v in _blocks(layout, values).items()},
                       coords={"chain": [0], "draw": np.arange(values.shape[0])})
    group.attrs.update(attrs, iteration=int(ds["iteration"].values[row]))
    return group


def _predictive(ds: Any, row: int) -> tuple[Any, Any] | tuple[None, None]:
    """``posterior_predictive`` and the members' misfits (``None`` without predictions)."""
    import xarray as xr

    if "predictions" not in ds.variables or not int(ds["stored"].values[row]) & 2:
        return None, None
    pred = np.asarray(ds["predictions"].isel(iteration=row).values)
    coords = {"chain": [0], "draw": np.arange(pred.shape[0]),
              "output": ds["output"].values}
    pp = xr.Dataset({"y": (("chain", "draw", "output"), pred[None])}, coords=coords)
    err = pred - ds["observations"].values
    if "noise_chol" in ds.variables:
        from scipy.linalg import solve_triangular

        z = solve_triangular(ds["noise_chol"].values, err.T, lower=True).T
    else:
        z = err / ds["noise_std"].values
    return pp, (np.sum(z * z, axis=1) / err.shape[1])[None]


def _sample_stats(ds: Any, misfit: np.ndarray | None) -> Any:
    import xarray as xr

    from .storage.schema import _RESERVED

    names = [n for n, v in ds.data_vars.items()
             if v.dims == ("iteration",) and n not in _RESERVED and v.dtype.kind in "fiub"]
    stats = xr.Dataset({n: ds[n].load() for n in names})
    if misfit is not None:
        stats["data_misfit"] = (("chain", "draw"), misfit)
        stats = stats.assign_coords(chain=[0], draw=np.arange(misfit.shape[1]))
    return stats


def to_inference_data(source: Any) -> Any:
    """A run as an ``arviz.InferenceData`` in physical units (the module docstring lists
    the groups).

    Parameters
    ----------
    source : SmootherResult, path or xarray.Dataset
        A result of :func:`enkal.run` / :meth:`EnsembleSmoother.run`, the path of an enkal
        history file (``enkal run --out``), or the Dataset :func:`enkal.open` returns.

    Returns
    -------
    arviz.InferenceData
        Loaded into memory (the file is closed again when ``source`` is a path).

    Raises
    ------
    ImportError
        ArviZ is not installed (``pip install 'enkal[arviz]'``).
    ValueError
        The history holds no ensemble to call a posterior.

    ``az.summary(idata, kind="stats")`` gives the mean and standard deviation of
    :meth:`SmootherResult.summary` (both use ``N_ens - 1``).
    """
    az = _import_arviz()
    from .storage import read_layout

    with history_of(source) as (ds, _):
        layout = read_layout(ds)
        rows = stored_rows(ds, 1)
        if rows.size == 0:
            raise ValueError("source: the history holds no ensemble (no row with stored "
                             "parameters)")
        last = int(rows[-1])
        attrs = {"inference_library": "enkal", "enkal_version": str(ds.attrs.get(
            "enkal_version", "")), "created_at": str(ds.attrs.get("created", ""))}
        groups: dict[str, Any] = {"posterior": _group(ds, layout, last, attrs)}
        if int(ds["iteration"].values[0]) == 0 and rows[0] == 0 and last != 0:
            groups["prior"] = _group(ds, layout, 0, attrs)
        import xarray as xr

        groups["observed_data"] = xr.Dataset(
            {"y": ("output", ds["observations"].values),
             "noise_std": ("output", ds["noise_std"].values)},
            coords={"output": ds["output"].values})
        pp, misfit = _predictive(ds, last)
        if pp is not None:
            groups["posterior_predictive"] = pp
        groups["sample_stats"] = _sample_stats(ds, misfit)
        return az.InferenceData(**groups)

