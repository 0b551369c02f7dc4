"""``enkal run`` and ``enkal info`` for sequential problems (filter histories).

A plugin whose ``build`` returns a :class:`~enkal.experiment.FilterExperiment` sets
``sequential = True``; ``enkal run`` then runs the filter through :func:`enkal.run_filter`
(recorded, resumable with ``--resume FILE``) and prints the time-averaged scores against the
twin experiment's truth. ``enkal info`` describes a filter history the same way.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

import torch

from .filtering import FilterProgress, time_average
from .filtering.metrics import rmse, spread

__all__ = ["run_command", "info_command", "is_filter_history"]

#: options of ``enkal run`` that belong to the smoother only
_SMOOTHER_ONLY = (("max_iterations", "--max-iterations"), ("executor", "--executor"),
                  ("workers", "--workers"), ("scheduler", "--scheduler"),
                  ("allow_changes", "--allow-changes"))


def is_filter_history(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an enkal filter history (its ``enkal_format`` attribute)."""
    import h5py

    from .storage.filter_h5 import FILTER_FORMAT

    try:
        with h5py.File(path, "r", locking=False) as f:
            fmt = f.attrs.get("enkal_format")
    except OSError:
        return False
    fmt = fmt.decode() if isinstance(fmt, bytes) else fmt
    return fmt == FILTER_FORMAT


def _out(args: argparse.Namespace) -> tuple[str, bool]:
    """The file written and whether it is resumed."""
    if args.resume is not None and not is_filter_history(args.resume):
        raise ValueError(f"--resume {args.resume}: not an enkal filter history (a filtering "
                         "problem continues the --out file of its earlier run)")
    if args.out is not None:
        return str(args.out), args.resume is not None
    if args.resume is not None:
        return str(args.resume), True
    return os.path.splitext(os.path.basename(args.config))[0] + ".h5", False


def run_command(args: argparse.Namespace, plugin: Any, config: dict, *,
                build_kwargs: dict) -> int:
    """``enkal run CONFIG`` for a sequential problem."""
    from .filter_runner import run_filter

    for attr, flag in _SMOOTHER_ONLY:
        if getattr(args, attr, None) not in (None, False):
            raise ValueError(f"{flag}: not used by a filtering problem (the series sets the "
                             "run's length; forecasts run in this process)")
    out, resume = _out(args)
    if os.path.exists(out) and not resume:
        raise ValueError(f"--out {out}: exists; pass --resume {out} to continue its run, or "
                         "choose another --out")
    exp = plugin.build(config, seed=args.seed, device=args.device, **build_kwargs)
    flt = exp.filter
    print(f"{exp.name}: {type(flt.scheme).__name__}, {exp.initial.shape[-2]} members, "
          f"{exp.initial.shape[-1]} state variables, {exp.times.numel()} cycles -> {out}"
          f"{' (resumed)' if resume else ''}", flush=True)
    attrs = {"problem": config.get("problem", "filtering"), "name": exp.name,
             "burn_in": int(exp.burn_in), "problem_config": json.dumps(config, default=str)}
    run_filter(flt, exp.initial, exp.times, exp.values, out=out, resume=resume,
               truth=exp.truth, attrs=attrs,
               sinks=[] if args.quiet else [FilterProgress()])
    _print_scores(out)
    print(f"wrote {out}")
    return 0


def info_command(path: str) -> int:
    """``enkal info FILE`` for a filter history."""
    from .storage import open_filter_history

    with open_filter_history(path) as ds:
        a = ds.attrs
        print(f"{path}: enkal filter history, enkal {a.get('enkal_version', '?')}, created "
              f"{a.get('created', '?')}, complete {a.get('complete', '?')}")
        n = ds.sizes.get("time", 0)
        t = ds.time.values
        span = f", t = {t[0]:g} ... {t[-1]:g}" if n else ""
        print(f"  {n} cycles{span}; {ds.sizes.get('state', 0)} state variables, "
              f"{ds.sizes.get('obs', 0)} observations per cycle")
        print("  " + ", ".join(f"{key} {a[key]}" for key in
                               ("scheme", "n_members", "inflation", "rotate", "lag", "seed")
                               if key in a))
    _print_scores(path)
    return 0


def _print_scores(path: str) -> None:
    """The time-averaged RMSE and spread (after the stored ``burn_in``) of a history."""
    from .storage import open_filter_history

    with open_filter_history(path) as ds:
        n = ds.sizes.get("time", 0)
        burn = min(int(ds.attrs.get("burn_in", 0)), max(n - 1, 0))
        spread_a = time_average(_flat(spread(torch.as_tensor(ds.analysis_spread.values))),
                                burn)
        lines = [f"  analysis spread {spread_a}"]
        if "truth" in ds and n:
            truth = torch.as_tensor(ds.truth.values)
            for what in ("forecast", "analysis", "smoothed"):
                if f"{what}_mean" in ds:
                    err = _flat(rmse(torch.as_tensor(ds[f"{what}_mean"].values), truth))
                    lines.append(f"  {what} RMSE {time_average(err, burn)}")
        print(f"time averages after {burn} cycles (95% intervals, autocorrelation-aware):")
        print("\n".join(lines))


def _flat(series: torch.Tensor) -> torch.Tensor:
    """One value per time (a batch of filters averaged)."""
    return series if series.ndim == 1 else series.mean(dim=tuple(range(1, series.ndim)))
