"""Twin experiments for the filters: a truth run, its noisy observations, a first ensemble.

The literature's standard settings are kept here as data (:data:`SAKOV2012_L63`,
:data:`SAKOV2008_L96`), with the scores their references report, so that
``bench/filtering.py``, the tests and ``enkal run`` share them:

* Lorenz-63 as in Sakov, Oliver & Bertino (2012), Table 1 [Sakov2012]: all three variables
  observed every 25 RK4 steps of 0.01 with noise variance 2; truth and first ensemble drawn
  from ``N(x0, 2 I)``.
* Lorenz-96 (40 variables, F = 8) as in Sakov & Oke (2008) [Sakov2008]: every variable
  observed every 0.05 (one RK4 step) with unit noise; truth and first ensemble from
  ``N(x0, 0.001 I)`` around a state on the attractor.

>>> from enkal.models import Lorenz63, RK4
>>> model = Lorenz63(t_obs=[0.25], solver=RK4(dt=0.01))
>>> twin = twin_experiment(model, x0=[1.509, -1.531, 25.46], parameters=[10.0, 28.0, 8 / 3],
...                        dt_obs=0.25, n_cycles=4, noise_std=2 ** 0.5, initial_std=2 ** 0.5,
...                        n_members=10, seed=0)
>>> twin.truth.shape, twin.values.shape, twin.initial.shape
(torch.Size([4, 3]), torch.Size([4, 3]), torch.Size([10, 3]))
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from enkal.config import build_strategy, check_keys, register_strategy
from enkal.experiment import FilterExperiment
from enkal.filtering import ETKF, LETKF, AdaptiveInflation, EnKF, EnsembleFilter
from enkal.problems.parsing import block_values, integer, number

__all__ = ["Twin", "twin_experiment", "build", "plugin", "SAKOV2012_L63", "SAKOV2008_L96"]

for _cls in (EnKF, ETKF, LETKF):
    register_strategy("scheme", _cls)
register_strategy("inflation", AdaptiveInflation)


@dataclass(frozen=True)
class Twin:
    """A twin experiment's data: observation ``times`` ``(K,)``, the ``truth`` at those
    times ``(K, N_x)`` and the observed ``values`` ``(K, N_obs)`` (``(K, B, ...)`` for ``B``
    independent experiments), and the ``initial`` ensemble at time 0 ``(N_ens, N_x)``
    (``(B, N_ens, N_x)``)."""

    times: torch.Tensor
    truth: torch.Tensor
    values: torch.Tensor
    initial: torch.Tensor


def twin_experiment(model: Any, *, x0: Sequence[float], dt_obs: float, n_cycles: int,
                    noise_std: float, initial_std: float, n_members: int,
                    parameters: Sequence[float] | None = None,
                    observe: Sequence[int] | None = None, spin_up: int = 0,
                    n_experiments: int = 1, seed: int = 0,
                    dtype: torch.dtype = torch.float64) -> Twin:
    """Simulate a truth from ``N(x0', initial_std^2 I)`` and observe it.

    ``x0'`` is ``x0`` propagated by ``spin_up`` observation intervals (onto the attractor).
    The first ensemble is drawn from the same distribution as the truth's start, as
    DAPPER does. ``n_experiments > 1`` makes independent truths, data and ensembles with a
    leading batch axis (for a batch of filters).
    """
    g = torch.Generator().manual_seed(seed)
    p = None if parameters is None else torch.as_tensor(parameters, dtype=dtype)
    start = torch.as_tensor(x0, dtype=dtype).reshape(1, -1)
    for _ in range(spin_up):
        start = model.propagate(start, 0.0, dt_obs, parameters=p, generator=g)
    n_x = start.shape[1]
    b = n_experiments
    x = start + initial_std * torch.randn(b, n_x, generator=g, dtype=dtype)
    initial = start + initial_std * torch.randn(b, n_members, n_x, generator=g, dtype=dtype)
    idx = list(range(n_x)) if observe is None else list(observe)
    truth, values = [], []
    for k in range(n_cycles):
        x = model.propagate(x, k * dt_obs, (k + 1) * dt_obs, parameters=p, generator=g)
        truth.append(x)
        values.append(x[:, idx] + noise_std * torch.randn(b, len(idx), generator=g,
                                                            dtype=dtype))
    times = torch.arange(1, n_cycles + 1, dtype=torch.float64) * dt_obs
    truth_t, values_t = torch.stack(truth), torch.stack(values)
    if b == 1:
        return Twin(times, truth_t[:, 0], values_t[:, 0], initial[0])
    return Twin(times, truth_t, values_t, initial)


#: Sakov, Oliver & Bertino (2012), Table 1 settings (DAPPER's ``mods/Lorenz63/sakov2012.py``)
SAKOV2012_L63: dict[str, Any] = {
    "x0": (1.509, -1.531, 25.46), "parameters": (10.0, 28.0, 8.0 / 3.0), "dt": 0.01,
    "steps_per_obs": 25, "noise_std": 2.0 ** 0.5, "initial_std": 2.0 ** 0.5, "spin_up": 0,
}

#: Sakov & Oke (2008) settings (DAPPER's ``mods/Lorenz96/sakov2008.py``)
SAKOV2008_L96: dict[str, Any] = {
    "n_sites": 40, "forcing": 8.0, "dt": 0.05, "steps_per_obs": 1, "noise_std": 1.0,
    "initial_std": 0.001 ** 0.5, "spin_up": 1000,
}


TOP_KEYS = ("problem", "name", "model", "parameters", "twin", "filter")
TWIN_KEYS = ("x0", "dt_obs", "cycles", "noise_std", "initial_std", "observe", "spin_up", "seed",
             "burn_in")
FILTER_KEYS = ("ensemble_size", "scheme", "inflation", "rotate", "lag", "seed", "failure")


def build(config: dict, *, seed: int | None = None, device: str | None = None,
          base_dir: str | os.PathLike | None = None) -> FilterExperiment:
    """The twin experiment a ``problem = "filtering"`` configuration describes
    (``docs/config.md``, "Filtering twin experiments"): a truth run of ``[model]`` with the
    known ``[parameters]``, observed per ``[twin]``, and the filter of ``[filter]``.
    ``seed`` (``enkal run --seed``) replaces both the twin's and the filter's seeds."""
    from enkal.problems.estimation import _registered_model

    check_keys(config, where="configuration", required=("model", "parameters", "twin",
                                                        "filter"), optional=TOP_KEYS)
    twin_cfg = check_keys(config["twin"], where="[twin]",
                          required=("x0", "dt_obs", "cycles", "noise_std", "initial_std"),
                          optional=TWIN_KEYS)
    filter_cfg = check_keys(config["filter"], where="[filter]", required=("ensemble_size",),
                            optional=FILTER_KEYS)
    dt_obs = number(twin_cfg["dt_obs"], "[twin] dt_obs")
    model_cfg = dict(config["model"])
    if "t_obs" in model_cfg:
        raise ValueError("[model] t_obs: a filter's model is advanced between the [twin] "
                         "observation times; leave t_obs out")
    model_cfg["t_obs"] = [dt_obs]
    model = _registered_model(model_cfg, device=device, seed=None)
    theta = _known_parameters(config["parameters"], model)
    twin_seed = integer(twin_cfg.get("seed", 0), "[twin] seed") if seed is None else seed
    observe = twin_cfg.get("observe")
    noise = number(twin_cfg["noise_std"], "[twin] noise_std")
    twin = twin_experiment(
        model, x0=[number(v, "[twin] x0") for v in twin_cfg["x0"]], dt_obs=dt_obs,
        n_cycles=integer(twin_cfg["cycles"], "[twin] cycles", minimum=1),
        noise_std=noise, initial_std=number(twin_cfg["initial_std"], "[twin] initial_std"),
        n_members=integer(filter_cfg["ensemble_size"], "[filter] ensemble_size", minimum=2),
        parameters=theta.tolist(), observe=observe,
        spin_up=integer(twin_cfg.get("spin_up", 0), "[twin] spin_up"), seed=twin_seed,
        dtype=model.dtype)
    flt = EnsembleFilter(
        model, build_strategy("scheme", filter_cfg.get("scheme", "ETKF"), where="[filter]"),
        noise_std=noise, observe=observe, inflation=_inflation(filter_cfg.get("inflation", 1.0)),
        rotate=bool(filter_cfg.get("rotate", False)),
        lag=integer(filter_cfg.get("lag", 0), "[filter] lag"), parameters=theta,
        failure=build_strategy("failure", filter_cfg["failure"], where="[filter]")
        if "failure" in filter_cfg else None,
        seed=integer(filter_cfg.get("seed", 0), "[filter] seed") if seed is None else seed)
    return FilterExperiment(
        name=config.get("name", f"{type(model).__name__}-filter"), filter=flt,
        initial=twin.initial.to(device=model.device), times=twin.times, values=twin.values,
        truth=twin.truth, burn_in=integer(twin_cfg.get("burn_in", 0), "[twin] burn_in"),
        config=config)


def _known_parameters(section: Any, model: Any) -> torch.Tensor:
    """``[parameters]``: ``name = value`` for every block of the model (physical units)."""
    names = [b.name for b in model.layout.blocks]
    check_keys(section, where="[parameters]", required=tuple(names))
    return torch.cat([block_values(b, section[b.name], f"[parameters] {b.name}").reshape(-1)
                      for b in model.layout.blocks]).to(torch.float64)


def _inflation(spec: Any) -> float | AdaptiveInflation:
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        return number(spec, "[filter] inflation")
    return build_strategy("inflation", spec, where="[filter]")


class _Plugin:
    """The ``filtering`` entry point."""

    name = "filtering"
    sequential = True  # enkal run: a filter over a series (enkal.filter_cli)

    @staticmethod
    def build(config: dict, *, seed: int | None = None, device: str | None = None,
              base_dir: str | os.PathLike | None = None) -> FilterExperiment:
        return build(config, seed=seed, device=device, base_dir=base_dir)


plugin = _Plugin()
