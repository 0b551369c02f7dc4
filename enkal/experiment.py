"""What a problem plugin hands the CLI: a ready-to-run experiment.

Plugins (``problems/``, or any package) register under the entry-point group
``enkal.problems``; each entry point is an object with
``build(config: dict, *, seed: int | None, device: str | None) -> Experiment``, optionally
taking ``base_dir`` (the configuration's directory, which ``enkal run`` passes to a ``build``
that accepts it). The core never imports a plugin directly: :func:`find_plugin` looks it up
by name. ``docs/config.md`` documents the format and the public parsing helpers
(:mod:`enkal.problems.parsing`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import torch

from .forward import ForwardModel
from .observations import Observations
from .smoother import EnsembleSmoother

__all__ = ["Experiment", "FilterExperiment", "find_plugin", "available_plugins"]

ENTRY_POINT_GROUP = "enkal.problems"


@dataclass
class Experiment:
    """A model, its data, a prior ensemble and a configured smoother.

    Attributes
    ----------
    name : str
    model : ForwardModel
    observations : Observations
    prior : Tensor, shape (N_ens, N_par)
        Unconstrained space.
    smoother : EnsembleSmoother
    max_iterations : int
    executor : object, optional
    truth : Tensor, shape (N_par,), optional
        Physical values of a twin experiment's truth.
    config : dict
        The configuration it was built from (stored as provenance).
    """

    name: str
    model: ForwardModel
    observations: Observations
    prior: torch.Tensor
    smoother: EnsembleSmoother
    max_iterations: int = 100
    executor: Any = None
    truth: torch.Tensor | None = None
    config: dict = field(default_factory=dict)


@dataclass
class FilterExperiment:
    """A sequential twin experiment: a filter, its first ensemble and an observation series.

    Attributes
    ----------
    name : str
    filter : EnsembleFilter
    initial : Tensor, shape (N_ens, N_x)
        The ensemble at time 0.
    times : Tensor, shape (K,)
    values : Tensor, shape (K, N_obs)
    truth : Tensor, shape (K, N_x), optional
        The true states at ``times`` (a twin experiment's).
    burn_in : int
        Cycles left out of the time-averaged scores.
    config : dict
    """

    name: str
    filter: Any
    initial: torch.Tensor
    times: torch.Tensor
    values: torch.Tensor
    truth: torch.Tensor | None = None
    burn_in: int = 0
    config: dict = field(default_factory=dict)


def available_plugins() -> dict[str, metadata.EntryPoint]:
    return {ep.name: ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}


def find_plugin(name: str) -> Any:
    """Load the problem plugin registered as ``name``."""
    plugins = available_plugins()
    if not isinstance(name, str) or name not in plugins:
        raise ValueError(
            f"problem: expected one of {sorted(plugins)} (entry points of group "
            f"{ENTRY_POINT_GROUP!r}), got {name!r}"
        )
    return plugins[name].load()
