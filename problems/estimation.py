"""Parameter estimation: a simulator, priors with constraints, data, and a smoother, from TOML.

Stochastic simulators are fitted through summary statistics: a ``[summary]`` section
(``replicates``, ``statistics``, ``seed``, ``covariance_paths``) wraps the model in
:class:`enkal.models.summary.Replicated`, which predicts the *expected* statistics by their
mean over ``K`` replicate paths (common random numbers across members). A twin experiment
observes ``[data] realisations`` independent paths at the truth (default 1: one observed
path, as in the field) and summarises them the same way. ``noise_std = "auto"`` sets the
noise covariance to that of the data's statistics plus the Monte-Carlo error of the model's
``K``-path mean: ``C (1 / K_d + 1 / K)`` with ``C`` the covariance of one path's statistics,
from ``covariance_paths`` (default 1000) further independent paths at the truth. (With
``"std"``, a statistic over realisations, ``K_d >= 2`` and the covariance is bootstrapped
from the data's own paths, times ``1 + K_d / K``.) :func:`calibration` repeats a twin
experiment over seeds and reports how often the intervals cover the truth.

Priors are Gaussian in the unconstrained space ``u`` of each parameter and reported in the
physical space ``phi``: a ``Positive`` parameter is log-normal (``prior_median`` is
``exp(mean u)``, ``prior_std`` the standard deviation of ``log phi``), a ``Bounded`` one is
logit-normal, a ``Real`` one normal. The constraint is the model's (its
:class:`~enkal.ParameterLayout`). Twin experiments simulate data from a ``truth`` with noise
of standard deviation ``noise_std``; real data come as ``values``.

A configuration (see ``problems/lorenz63.toml``)::

    problem = "estimation"
    [model]                       # a class of enkal.models and its arguments
    type = "Lorenz63"
    t_obs = { start = 0.1, stop = 2.0, step = 0.1 }
    solver = { type = "RK4", dt = 0.01 }
    [parameters.sigma]            # one table per parameter block of the model
    prior_median = 8.0
    prior_std = 0.3
    truth = 10.0                  # optional: twin experiment
    [data]
    noise_std = 1.0
    seed = 1                      # noise of the twin experiment
    [smoother]
    ensemble_size = 100
    rule = { type = "PerturbedObservations" }
    schedule = { type = "ESMDA", alphas = [4, 4, 4, 4] }

Run it with ``enkal run problems/lorenz63.toml`` or from Python with :func:`build` /
:func:`run_config`.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch

import enkal
from enkal.config import build_strategy, check_keys, load_toml
from enkal.experiment import Experiment
from enkal.models.summary import monte_carlo_cov, path_statistics_cov, summarise

__all__ = ["build", "calibration", "run_config", "model_registry", "plugin"]

TOP_KEYS = ("problem", "name", "model", "summary", "parameters", "data", "smoother",
            "executor")


def model_registry() -> dict[str, type]:
    """Simulator classes available to configurations, by class name."""
    from enkal.models import jump, ode, sde

    generic = {"ODEModel", "SDEModel", "JumpModel"}  # need Python callables: not from TOML
    reg: dict[str, type] = {}
    for module in (ode, sde, jump):
        for name in getattr(module, "__all__", []):
            obj = getattr(module, name)
            if isinstance(obj, type) and issubclass(obj, enkal.ForwardModel) and \
                    not inspect.isabstract(obj) and name not in generic:
                reg[name] = obj
    return reg


def solver_registry() -> dict[str, type]:
    from enkal.models import jump, ode

    return {"RK4": ode.RK4, "DormandPrince": ode.DormandPrince, "Gillespie": jump.Gillespie,
            "TauLeaping": jump.TauLeaping}


MAX_TIMES = 1_000_000
MAX_STEPS = 10_000_000


def _number(v: Any, where: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"{where}: expected a finite number, got {v!r}"[:200])
    return float(v)


def _int(v: Any, where: str, *, minimum: int = 0, maximum: int = 2**62) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not (minimum <= v <= maximum):
        raise ValueError(f"{where}: expected an int in [{minimum}, {maximum}], got {v!r}"[:200])
    return v


def _times(spec: Any, where: str) -> list[float]:
    if isinstance(spec, dict):
        check_keys(spec, where=where, required=("start", "stop", "step"))
        start, stop, step = (_number(spec[k], f"{where}.{k}") for k in ("start", "stop", "step"))
        if not (step > 0 and stop >= start):
            raise ValueError(f"{where}: expected step > 0 and stop >= start, got {spec}")
        count = (stop - start) / step
        if not count < MAX_TIMES:
            raise ValueError(f"{where}: more than {MAX_TIMES} observation times")
        n = int(math.floor(count + 1e-9)) + 1
        return [round(start + i * step, 12) for i in range(n)]
    if isinstance(spec, list) and 0 < len(spec) <= MAX_TIMES:
        return [_number(t, f"{where}[{i}]") for i, t in enumerate(spec)]
    raise ValueError(f"{where}: expected a list of times or {{start, stop, step}}, got {spec!r}"[:300])


def _check_steps(kwargs: dict, name: str) -> None:
    """Refuse step sizes that would take more than MAX_STEPS steps (a hang, not an error)."""
    t_obs = kwargs.get("t_obs")
    if not t_obs:
        return
    horizon = max(t_obs) - float(kwargs.get("t0", 0.0) or 0.0)
    for label, dt in (("dt", kwargs.get("dt")),
                      ("solver.dt", getattr(kwargs.get("solver"), "dt", None)),
                      ("solver.tau", getattr(kwargs.get("solver"), "tau", None))):
        if isinstance(dt, (int, float)) and not isinstance(dt, bool) and dt > 0 and \
                horizon / dt > MAX_STEPS:
            raise ValueError(f"[model] ({name}) {label}: {dt!r} needs more than {MAX_STEPS} "
                             f"steps to reach t = {max(t_obs)}")


def _build_model(section: dict, *, device: str | None, seed: int | None = None):
    models = model_registry()
    if not isinstance(section, dict) or "type" not in section:
        raise ValueError(f"[model]: missing key 'type' (one of {sorted(models)})")
    name = section["type"]
    cls = models.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ValueError(f"[model]: type {name!r} is not one of {sorted(models)}")
    params = inspect.signature(cls.__init__).parameters
    settable = {p: v for p, v in params.items() if p not in ("self", "device", "dtype")
                and v.kind not in (v.VAR_POSITIONAL, v.VAR_KEYWORD)}
    required = tuple(p for p, v in settable.items() if v.default is inspect.Parameter.empty)
    kwargs = {k: v for k, v in section.items() if k != "type"}
    check_keys(kwargs, where=f"[model] ({name})", required=required,
               optional=tuple(settable))
    if "t_obs" in kwargs:
        kwargs["t_obs"] = _times(kwargs["t_obs"], f"[model] ({name}) t_obs")
    if "solver" in kwargs:
        kwargs["solver"] = _solver(kwargs["solver"], name)
    _check_steps(kwargs, name)
    if device is not None and "device" in params:
        kwargs["device"] = device
    if seed is not None and "seed" in params:
        kwargs["seed"] = seed
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise type(err)(f"[model] ({name}): {err}") from None


def _solver(spec: Any, model_name: str):
    solvers = solver_registry()
    where = f"[model] ({model_name}) solver"
    if not isinstance(spec, dict) or not isinstance(spec.get("type"), str) or \
            spec["type"] not in solvers:
        raise ValueError(f"{where}: expected {{ type = one of {sorted(solvers)}, ... }}, "
                         f"got {spec!r}")
    kw = {k: v for k, v in spec.items() if k != "type"}
    try:
        return solvers[spec["type"]](**kw)
    except (TypeError, ValueError) as err:
        raise type(err)(f"{where}: {err}") from None


def _replicate(model, summary: dict):
    from enkal.models.summary import Replicated

    try:
        return Replicated(model, n_replicates=summary.get("replicates", 100),
                          statistics=tuple(summary.get("statistics", ("mean", "std"))),
                          seed=summary.get("seed", 0))
    except (TypeError, ValueError) as err:
        raise type(err)(f"[summary]: {err}") from None


def _truth_paths(model_section: dict, x_true: torch.Tensor, n: int, *, seed: int,
                 device: str | None) -> torch.Tensor:
    """``n`` independent paths of the simulator at the truth, ``(n, M)`` in float64."""
    sim = _build_model(model_section, device=device, seed=seed % 2**62)
    sim.row_streams, sim.common_noise = True, False  # row i: an independent realisation
    paths = sim(x_true.to(sim.dtype).expand(n, -1))
    if not bool(torch.isfinite(paths).all()):
        raise ValueError("[parameters] truth: the model's prediction at the truth is not finite")
    return paths.to(torch.float64).cpu()


def _twin_statistics(model_section: dict, model, x_true: torch.Tensor, *, device, data_seed: int,
                     realisations: int, n_cov: int, auto: bool):
    """The data of a twin experiment through summary statistics, and its noise covariance.

    The data are the statistics of ``K_d = realisations`` independent paths at the truth
    (one observed realisation by default). Their noise covariance, when ``auto``, is that of
    the data's statistics plus the Monte-Carlo error of the model's ``K``-path estimate
    (independent: covariances add). For per-path statistics both are ``C / K_d`` and
    ``C / K`` with ``C`` the covariance of one path's statistics, estimated from ``n_cov``
    further independent paths at the truth: ``Gamma = C (1 / K_d + 1 / K)``. With ``"std"``
    (a statistic over realisations) the data's covariance is bootstrapped from its own
    ``K_d`` paths and scaled by ``1 + K_d / K``.
    """
    stats, n_times, k = model.statistics, model.n_times, model.n_replicates
    # the truth's noise comes from the data seed, never the ensemble's streams
    paths = _truth_paths(model_section, x_true, realisations, seed=10_007 + data_seed,
                         device=device)
    values = summarise(paths.unsqueeze(0), stats, n_times=n_times)[0]
    if not auto:
        return values, None
    if "std" in stats:
        gen = torch.Generator().manual_seed(data_seed)
        cov = monte_carlo_cov(paths, stats, generator=gen, n_times=n_times)
        return values, (1.0 + realisations / k) * cov
    cov_paths = _truth_paths(model_section, x_true, n_cov, seed=20_011 + 3 * data_seed,
                             device=device)
    cov = path_statistics_cov(cov_paths, stats, n_times=n_times)
    return values, (1.0 / realisations + 1.0 / k) * cov


def _block_values(block, value: Any, where: str) -> torch.Tensor:
    values = value if isinstance(value, list) else [value]
    if len(values) not in (1, block.size):
        raise ValueError(f"{where}: expected a number or {block.size} numbers, got {value!r}"[:200])
    t = torch.tensor([_number(v, where) for v in values], dtype=torch.float64)
    return t.expand(block.size).clone() if t.numel() == 1 else t


def _priors(section: Any, layout: enkal.ParameterLayout, n_members: int,
            gen: torch.Generator):
    names = [b.name for b in layout.blocks]
    if not isinstance(section, dict):
        raise ValueError("[parameters]: expected one table per parameter, e.g. "
                         f"[parameters.{names[0]}]")
    check_keys(section, where="[parameters]", required=tuple(names))
    mean = torch.empty(layout.size, dtype=torch.float64)
    std = torch.empty(layout.size, dtype=torch.float64)
    truth = torch.empty(layout.size, dtype=torch.float64)
    has_truth = []
    for b in layout.blocks:
        where = f"[parameters.{b.name}]"
        spec = check_keys(section[b.name], where=where, required=("prior_median", "prior_std"),
                          optional=("truth",))
        median = _block_values(b, spec["prior_median"], f"{where} prior_median")
        try:
            mean[b.slice] = b.constraint.inverse(median)
        except ValueError as err:
            raise ValueError(f"{where} prior_median: {err}") from None
        s = _block_values(b, spec["prior_std"], f"{where} prior_std")
        if not bool(torch.isfinite(s).all() and (s > 0).all()):
            raise ValueError(f"{where} prior_std: expected finite values > 0, got {spec['prior_std']}")
        std[b.slice] = s
        if "truth" in spec:
            truth[b.slice] = _block_values(b, spec["truth"], f"{where} truth")
        has_truth.append("truth" in spec)
    if any(has_truth) and not all(has_truth):
        raise ValueError("[parameters]: give 'truth' for every parameter or for none")
    prior = enkal.gaussian_ensemble(mean, std, n_members, generator=gen)
    return prior, (truth if all(has_truth) else None)


def build(config: dict, *, seed: int | None = None, device: str | None = None) -> Experiment:
    """Build the experiment a configuration describes (see the module docstring)."""
    check_keys(config, where="configuration", required=("model", "parameters", "smoother"),
               optional=TOP_KEYS)
    smoother_cfg = check_keys(
        config["smoother"], where="[smoother]", required=("ensemble_size",),
        optional=("rule", "schedule", "guard", "failure", "seed", "max_iterations",
                  "chunk_size"))
    data = check_keys(config.get("data", {}), where="[data]",
                      optional=("noise_std", "seed", "values", "realisations"))
    if "name" in config and not isinstance(config["name"], str):
        raise ValueError(f"name: expected a string, got {config['name']!r}"[:200])
    if seed is None:
        seed = _int(smoother_cfg.get("seed", 0), "[smoother] seed", maximum=2**31)
    else:
        seed = _int(seed, "seed", maximum=2**31)
    max_iterations = _int(smoother_cfg.get("max_iterations", 100), "[smoother] max_iterations",
                          minimum=1, maximum=10**9)
    model = _build_model(config["model"], device=device)
    n_members = smoother_cfg["ensemble_size"]
    if isinstance(n_members, bool) or not isinstance(n_members, int) or n_members < 2:
        raise ValueError(f"[smoother] ensemble_size: expected an int >= 2, got {n_members!r}")
    if n_members > 10**6 or n_members * model.layout.size > 2**31:
        raise ValueError(f"[smoother] ensemble_size: {n_members} members of "
                         f"{model.layout.size} parameters is beyond this plugin's limits")
    gen = torch.Generator().manual_seed(seed)
    prior, truth = _priors(config["parameters"], model.layout, n_members, gen)

    if "noise_std" not in data:
        raise ValueError("[data]: missing key 'noise_std'")
    noise_std = data["noise_std"]
    if isinstance(noise_std, str) and noise_std != "auto":
        raise ValueError(f"[data] noise_std: expected a number, a list of numbers or \"auto\", "
                         f"got {noise_std!r}")
    summary = None
    realisations = _int(data.get("realisations", 1), "[data] realisations", minimum=1,
                        maximum=10**6)
    if "summary" in config:
        summary = check_keys(config["summary"], where="[summary]",
                             optional=("replicates", "statistics", "seed", "covariance_paths"))
        # the model's replicate paths follow the run's seed too (a fixed set of paths would
        # bias every repetition of an experiment the same way)
        model = _replicate(model, {**summary, "seed": summary.get("seed", 0) + 7919 * seed})
        if "std" in model.statistics and realisations < 2:
            raise ValueError("[data] realisations: the statistic 'std' is over realisations: "
                             f"expected >= 2 realisations, got {realisations}")
        n_cov = _int(summary.get("covariance_paths", 1000), "[summary] covariance_paths",
                     minimum=model.output_size + 3, maximum=10**5)
    elif noise_std == "auto":
        raise ValueError("[data] noise_std = \"auto\": only with a [summary] section")
    elif "realisations" in data:
        raise ValueError("[data] realisations: only with a [summary] section")
    # the data's noise follows both the configured data seed and the run's seed, so that
    # repeating a twin experiment over seeds repeats it over data sets too
    data_seed = 1_000_003 * _int(data.get("seed", 0), "[data] seed", maximum=2**31) + seed
    if "values" in data:
        values = torch.as_tensor(data["values"], dtype=torch.float64)
        if noise_std == "auto":
            raise ValueError("[data] noise_std = \"auto\": only for twin experiments (truth)")
    elif truth is not None:
        x_true = truth.unsqueeze(0)
        if summary is not None:
            values, noise_cov = _twin_statistics(config["model"], model, x_true, device=device,
                                                 data_seed=data_seed, realisations=realisations,
                                                 n_cov=n_cov, auto=noise_std == "auto")
        else:
            # a stochastic simulator draws the truth's noise from the data seed, not the
            # ensemble's: the members must not share the realisation that made the data
            truth_model = _build_model(config["model"], device=device, seed=10_007 + data_seed)
            clean = truth_model(x_true.to(truth_model.dtype))[0].to(torch.float64).cpu()
            if not bool(torch.isfinite(clean).all()):
                raise ValueError("[parameters] truth: the model's prediction at the truth is "
                                 "not finite")
            noise_gen = torch.Generator().manual_seed(data_seed)
            std = enkal.Observations(clean, noise_std=noise_std).noise_std
            values = clean + std * torch.randn(clean.shape, generator=noise_gen,
                                               dtype=torch.float64)
    else:
        raise ValueError("[data]: give observed 'values', or a 'truth' for every parameter "
                         "(twin experiment)")
    if noise_std == "auto":
        observations = enkal.Observations(values, noise_cov=noise_cov)
    else:
        observations = enkal.Observations(values, noise_std=noise_std)
    if observations.size != model.output_size:
        raise ValueError(f"[data] values: expected {model.output_size} observations (the "
                         f"model's output size), got {observations.size}")
    kwargs = {k: build_strategy(k, smoother_cfg[k], where="[smoother]")
              for k in ("rule", "schedule", "guard", "failure") if k in smoother_cfg}
    smoother = enkal.EnsembleSmoother(observations, seed=seed,
                                      chunk_size=smoother_cfg.get("chunk_size"), **kwargs)
    executor = None
    if "executor" in config:
        executor = build_strategy("executor", config["executor"], where="[executor]")
    dtype = model.dtype
    return Experiment(
        name=config.get("name", config["model"]["type"]), model=model,
        observations=observations, prior=prior.to(dtype=dtype, device=model.device),
        smoother=smoother, max_iterations=max_iterations,
        executor=executor, truth=truth, config=config,
    )


def run_config(path: str, **run_kwargs) -> tuple[Experiment, enkal.SmootherResult]:
    """Build from a TOML file and run; ``run_kwargs`` go to :meth:`EnsembleSmoother.run`."""
    exp = build(load_toml(path))
    run_kwargs.setdefault("max_iterations", exp.max_iterations)
    result = exp.smoother.run(exp.model, exp.prior, executor=exp.executor, **run_kwargs)
    return exp, result


def calibration(config: dict, seeds, *, level: float = 0.9, device: str | None = None,
                callback=None) -> dict:
    """Frequentist calibration of a twin experiment: rebuild and run it for each seed.

    Each seed draws a new data set (the data seed follows the run's seed), prior ensemble
    and model replicates. Returns per parameter (``"parameters"``: name -> record) the
    fraction of seeds whose central ``level`` interval of the final ensemble covers the
    truth (``coverage``), the mean of ``|posterior mean - truth| / |truth|``
    (``rel_error``), the mean interval width over ``|truth|`` (``rel_width``); and
    ``misfit_at_truth``, the mean over seeds of the whitened misfit per observation of the
    model at the truth, ``||L^-1 (G(truth) - y)||^2 / N_obs``: about 1 when the noise
    covariance is that of the data, larger when the noise is underestimated. ``forwards`` is
    the member forward evaluations per seed (each a ``K``-path summary for replicated models).
    ``callback(seed, record)``, if given, sees each seed's covered flags, relative errors and
    widths (tensors, ``(N_par,)``) and misfit as they come.

    A coverage over ``n`` seeds is binomial: standard deviation ``sqrt(p (1 - p) / n)``, 0.067
    for ``p = 0.9`` and ``n = 20``.
    """
    seeds = list(seeds)
    if not seeds:
        raise ValueError("seeds: expected at least one seed")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level: expected a number in (0, 1), got {level!r}")
    lo, hi = (1.0 - level) / 2.0, (1.0 + level) / 2.0
    covered, rel_err, width, misfit, forwards, names = [], [], [], [], 0, None
    for seed in seeds:
        exp = build(config, seed=seed, device=device)
        if exp.truth is None:
            raise ValueError("config: calibration needs a twin experiment (a 'truth')")
        res = exp.smoother.run(exp.model, exp.prior, executor=exp.executor,
                               max_iterations=exp.max_iterations)
        names = exp.model.layout.names
        phys = res.physical.to(torch.float64).cpu()
        truth = exp.truth
        q = torch.quantile(phys, torch.tensor([lo, hi], dtype=torch.float64), dim=0)
        covered.append(((q[0] <= truth) & (truth <= q[1])).double())
        rel_err.append((phys.mean(0) - truth).abs() / truth.abs())
        width.append((q[1] - q[0]) / truth.abs())
        g = exp.model(truth.unsqueeze(0).to(exp.model.dtype)).to(torch.float64).cpu()
        misfit.append(2.0 * float(exp.observations.misfit(g)[0]) / exp.observations.size)
        forwards += res.n_forwards
        if callback is not None:
            callback(seed, {"covered": covered[-1], "rel_error": rel_err[-1],
                            "rel_width": width[-1], "misfit_at_truth": misfit[-1]})
    cov, err, wid = (torch.stack(v).mean(0) for v in (covered, rel_err, width))
    return {
        "seeds": len(seeds), "level": level, "forwards": forwards / len(seeds),
        "misfit_at_truth": sum(misfit) / len(misfit),
        "parameters": {n: {"coverage": float(cov[j]), "rel_error": float(err[j]),
                           "rel_width": float(wid[j])} for j, n in enumerate(names)},
    }


class _Plugin:
    """The ``estimation`` entry point."""

    name = "estimation"

    @staticmethod
    def build(config: dict, *, seed: int | None = None, device: str | None = None) -> Experiment:
        return build(config, seed=seed, device=device)


plugin = _Plugin()
