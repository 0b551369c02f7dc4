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
physical space ``phi``: a ``Positive`` parameter is log-normal, a ``Bounded`` one
logit-normal, a ``Real`` one normal; given by their physical ``mean`` and ``std``
(:func:`enkal.constrained_gaussian`) or by ``prior_median`` (``exp(mean u)`` for a positive
one) and ``prior_std`` (the standard deviation of ``u``). The constraint is the model's (its
:class:`~enkal.ParameterLayout`). Twin experiments simulate data from a ``truth`` with noise
of standard deviation ``noise_std``; real data come as ``values`` or from a ``file``. The
model is a class of :mod:`enkal.models` (``type``), your own factory (``target =
"module:factory"``) or ODE right-hand side (``rhs``): ``docs/config.md`` documents every key.

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
import os
from typing import Any

import torch

import enkal
from enkal.config import build_strategy, check_keys, load_toml
from enkal.experiment import Experiment
from enkal.models.summary import monte_carlo_cov, path_statistics_cov, summarise
from enkal.problems.parsing import (
    import_target,
    integer,
    layout_from_parameters,
    load_values,
    prior_moments,
    times,
)

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


MAX_STEPS = 10_000_000


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


def _build_model(section: Any, *, device: str | None, seed: int | None = None,
                 parameters: Any = None, base_dir: Any = None):
    """The model ``[model]`` names: ``type`` (a class of :func:`model_registry`), ``target``
    (your factory) or ``rhs`` (your ODE right-hand side, the layout from ``[parameters]``)."""
    kinds = [k for k in ("type", "target", "rhs") if isinstance(section, dict) and k in section]
    if len(kinds) != 1:
        raise ValueError("[model]: expected exactly one of 'type' (one of "
                         f"{sorted(model_registry())}), 'target' (your ForwardModel factory, "
                         "\"module:function\") or 'rhs' (your ODE right-hand side, "
                         f"\"module:function\"), got {kinds or 'none'}")
    if kinds == ["target"]:
        return _target_model(section, device=device, seed=seed, base_dir=base_dir)
    if kinds == ["rhs"]:
        return _rhs_model(section, device=device, parameters=parameters, base_dir=base_dir)
    return _registered_model(section, device=device, seed=seed)


def _registered_model(section: dict, *, device: str | None, seed: int | None):
    models = model_registry()
    name = section["type"]
    cls = models.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ValueError(f"[model]: type {name!r} is not one of {sorted(models)} (your own "
                         "model: target = \"module:factory\", docs/config.md)")
    params = inspect.signature(cls.__init__).parameters
    settable = {p: v for p, v in params.items() if p not in ("self", "device", "dtype")
                and v.kind not in (v.VAR_POSITIONAL, v.VAR_KEYWORD)}
    required = tuple(p for p, v in settable.items() if v.default is inspect.Parameter.empty)
    kwargs = {k: v for k, v in section.items() if k != "type"}
    check_keys(kwargs, where=f"[model] ({name})", required=required,
               optional=tuple(settable))
    _convert(kwargs, name)
    if device is not None and "device" in params:
        kwargs["device"] = device
    if seed is not None and "seed" in params:
        kwargs["seed"] = seed
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise type(err)(f"[model] ({name}): {err}") from None


def _convert(kwargs: dict, name: str) -> None:
    """TOML values of the simulators' common arguments: times, solver, step limits."""
    if "t_obs" in kwargs:
        kwargs["t_obs"] = times(kwargs["t_obs"], f"[model] ({name}) t_obs")
    if "solver" in kwargs:
        kwargs["solver"] = _solver(kwargs["solver"], name)
    _check_steps(kwargs, name)


def _accepts(fn: Any) -> set[str]:
    try:
        return set(inspect.signature(fn).parameters)
    except (TypeError, ValueError):  # a builtin without a signature
        return set()


def _target_model(section: dict, *, device: str | None, seed: int | None, base_dir: Any):
    """``target = "module:factory"``: the factory called with the table's other keys (and
    ``device`` / ``seed`` when it takes them) must return an :class:`enkal.ForwardModel`."""
    target = section["target"]
    factory = import_target(target, "[model] target", base_dir=base_dir)
    if not callable(factory):
        raise ValueError(f"[model] target: {target!r} is a {type(factory).__name__}, not a "
                         "factory (expected a function or class returning an "
                         "enkal.ForwardModel)")
    kwargs = {k: v for k, v in section.items() if k != "target"}
    accepts = _accepts(factory)
    if device is not None and "device" in accepts:
        kwargs.setdefault("device", device)
    if seed is not None and "seed" in accepts:
        kwargs["seed"] = seed
    try:
        model = factory(**kwargs)
    except Exception as err:  # noqa: BLE001 - the user's factory failed: one line
        raise ValueError(f"[model] target {target!r} raised {type(err).__name__}: "
                         f"{err}") from None
    if not isinstance(model, enkal.ForwardModel):
        raise ValueError(f"[model] target: {target!r} returned a {type(model).__name__}, not "
                         "an enkal.ForwardModel (a factory: a function or class that builds "
                         "one; an ODE right-hand side goes under rhs =)")
    return model


def _rhs_model(section: dict, *, device: str | None, parameters: Any, base_dir: Any):
    """``rhs = "module:function"``: ``f(t, x, p) -> dx/dt`` integrated by
    :class:`enkal.models.ode.ODEModel`, the parameters from ``[parameters]``."""
    from enkal.models.ode import ODEModel

    rhs = import_target(section["rhs"], "[model] rhs", base_dir=base_dir)
    if not callable(rhs):
        raise ValueError(f"[model] rhs: {section['rhs']!r} is a {type(rhs).__name__}, not a "
                         "function f(t, x, p) -> dx/dt")
    kwargs = check_keys({k: v for k, v in section.items() if k != "rhs"},
                        where="[model] (rhs)", required=("x0", "t_obs"),
                        optional=("solver", "observe", "t0", "state_names"))
    _convert(kwargs, "rhs")
    layout = layout_from_parameters(parameters)
    try:
        return ODEModel(rhs, layout, device=device or "cpu", **kwargs)
    except (TypeError, ValueError) as err:
        raise type(err)(f"[model] (rhs): {err}") from None


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


def _truth_paths(make: Any, x_true: torch.Tensor, n: int, *, seed: int) -> torch.Tensor:
    """``n`` independent paths of the simulator ``make(seed)`` builds at the truth, ``(n, M)``
    in float64."""
    sim = make(seed % 2**62)
    sim.row_streams, sim.common_noise = True, False  # row i: an independent realisation
    paths = sim(x_true.to(sim.dtype).expand(n, -1))
    if not bool(torch.isfinite(paths).all()):
        raise ValueError("[parameters] truth: the model's prediction at the truth is not finite")
    return paths.to(torch.float64).cpu()


def _twin_statistics(make: Any, model, x_true: torch.Tensor, *, data_seed: int,
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
    paths = _truth_paths(make, x_true, realisations, seed=10_007 + data_seed)
    values = summarise(paths.unsqueeze(0), stats, n_times=n_times)[0]
    if not auto:
        return values, None
    if "std" in stats:
        gen = torch.Generator().manual_seed(data_seed)
        cov = monte_carlo_cov(paths, stats, generator=gen, n_times=n_times)
        return values, (1.0 + realisations / k) * cov
    cov_paths = _truth_paths(make, x_true, n_cov, seed=20_011 + 3 * data_seed)
    cov = path_statistics_cov(cov_paths, stats, n_times=n_times)
    return values, (1.0 / realisations + 1.0 / k) * cov


def build(config: dict, *, seed: int | None = None, device: str | None = None,
          base_dir: str | os.PathLike | None = None) -> Experiment:
    """Build the experiment a configuration describes (``docs/config.md``).

    ``base_dir``: the directory relative paths of the configuration (a data ``file``, a
    module beside it named by ``target``/``rhs``) are relative to: the configuration file's
    own directory (``enkal run`` and :func:`run_config` pass it); default the working
    directory.
    """
    check_keys(config, where="configuration", required=("model", "parameters", "smoother"),
               optional=TOP_KEYS)
    smoother_cfg, data, seed, max_iterations = _settings(config, seed)
    make = _model_factory(config, device=device, base_dir=base_dir)
    model = make(None)
    n_members = _ensemble_size(smoother_cfg, model)
    gen = torch.Generator().manual_seed(seed)
    u_mean, u_std, truth = prior_moments(config["parameters"], model.layout,
                                         layout_keys="rhs" in config["model"])
    prior = enkal.gaussian_ensemble(u_mean, u_std, n_members, generator=gen)
    noise_std = _noise_std(data)
    model, twin = _summary(config, model, data, seed, noise_std)
    # the data's noise follows both the configured data seed and the run's seed, so that
    # repeating a twin experiment over seeds repeats it over data sets too
    data_seed = 1_000_003 * integer(data.get("seed", 0), "[data] seed", maximum=2**31) + seed
    values, noise_cov = _data_values(data, make, model, truth, twin, noise_std=noise_std,
                                     data_seed=data_seed, base_dir=base_dir)
    source = "file" if "file" in data else "values"
    if values.numel() != model.output_size:
        raise ValueError(f"[data] {source}: expected {model.output_size} observations (the "
                         f"model's output size), got {values.numel()}")
    try:
        if noise_std == "auto":
            observations = enkal.Observations(values, noise_cov=noise_cov)
        else:
            observations = enkal.Observations(values, noise_std=noise_std)
    except (TypeError, ValueError) as err:
        raise type(err)(f"[data] noise_std: {err}") from None
    kwargs = {k: build_strategy(k, smoother_cfg[k], where="[smoother]")
              for k in ("rule", "schedule", "guard", "failure", "accelerator")
              if k in smoother_cfg}
    kwargs.update(_rule_prior(smoother_cfg.get("rule"), u_mean, u_std))
    prior = _sigma_points(kwargs.get("rule"), prior, n_members)
    if "minibatch" in smoother_cfg:
        observations = _series(smoother_cfg["minibatch"], observations)
    smoother = enkal.EnsembleSmoother(observations, seed=seed,
                                      chunk_size=smoother_cfg.get("chunk_size"), **kwargs)
    executor = None
    if "executor" in config:
        executor = build_strategy("executor", config["executor"], where="[executor]")
    return Experiment(
        name=config.get("name", _model_name(config["model"])), model=model,
        observations=observations, prior=prior.to(dtype=model.dtype, device=model.device),
        smoother=smoother, max_iterations=max_iterations,
        executor=executor, truth=truth, config=config,
    )


#: rules that know the Gaussian prior (given in a configuration without one, they take the
#: ``[parameters]`` prior's unconstrained moments)
PRIOR_RULES = ("EnsembleKalmanSampler", "GaussNewton", "UnscentedKalmanInversion")


def _rule_prior(spec: Any, u_mean: torch.Tensor, u_std: torch.Tensor) -> dict:
    """A rule of :data:`PRIOR_RULES` given without a prior works with the configuration's own
    prior, ``[parameters]`` (its unconstrained moments)."""
    if not isinstance(spec, dict) or spec.get("type") not in PRIOR_RULES or \
            "prior_mean" in spec or "prior_std" in spec:
        return {}
    cls = getattr(enkal, spec["type"])
    options = {k: v for k, v in spec.items() if k != "type"}
    return {"rule": cls(u_mean.tolist(), u_std.tolist(), **options)}


def _sigma_points(rule: Any, prior: torch.Tensor, n_members: int) -> torch.Tensor:
    """UKI starts from its sigma points of the prior (``ensemble_size = 2 N_par + 1``)."""
    if not isinstance(rule, enkal.UnscentedKalmanInversion):
        return prior
    n_par = prior.shape[1]
    if n_members != 2 * n_par + 1:
        raise ValueError(f"[smoother] ensemble_size: UnscentedKalmanInversion needs 2 N_par + "
                         f"1 = {2 * n_par + 1} members (its sigma points), got {n_members}")
    return rule.initial_ensemble(n_par, dtype=prior.dtype)


def _series(spec: Any, observations: Any) -> Any:
    """``[smoother] minibatch = { samples = n, batch_size = b, shuffle = true, seed = 0 }``:
    the data cut into ``n`` consecutive samples, ``b`` of them per update."""
    spec = check_keys(spec, where="[smoother] minibatch", required=("samples", "batch_size"),
                      optional=("shuffle", "seed"))
    try:
        return enkal.ObservationSeries.split(
            observations, spec["samples"], spec["batch_size"],
            shuffle=spec.get("shuffle", True), seed=spec.get("seed", 0))
    except (TypeError, ValueError) as err:
        raise type(err)(f"[smoother] minibatch: {err}") from None


def _model_name(section: dict) -> str:
    return str(next(section[k] for k in ("type", "target", "rhs") if k in section))


def _settings(config: dict, seed: int | None) -> tuple[dict, dict, int, int]:
    """``[smoother]``, ``[data]``, the run's seed and ``max_iterations``, checked."""
    smoother_cfg = check_keys(
        config["smoother"], where="[smoother]", required=("ensemble_size",),
        optional=("rule", "schedule", "guard", "failure", "accelerator", "minibatch", "seed",
                  "max_iterations", "chunk_size"))
    data = check_keys(config.get("data", {}), where="[data]",
                      optional=("noise_std", "seed", "values", "file", "column", "variable",
                                "realisations"))
    if "name" in config and not isinstance(config["name"], str):
        raise ValueError(f"name: expected a string, got {config['name']!r}"[:200])
    if seed is None:
        seed = integer(smoother_cfg.get("seed", 0), "[smoother] seed", maximum=2**31)
    else:
        seed = integer(seed, "seed", maximum=2**31)
    max_iterations = integer(smoother_cfg.get("max_iterations", 100),
                             "[smoother] max_iterations", minimum=1, maximum=10**9)
    return smoother_cfg, data, seed, max_iterations


def _model_factory(config: dict, *, device: str | None, base_dir: Any) -> Any:
    """``make(seed)``: the configured model (``seed`` for a stochastic simulator's noise)."""
    section, parameters = config["model"], config.get("parameters")

    def make(seed: int | None):
        return _build_model(section, device=device, seed=seed, parameters=parameters,
                            base_dir=base_dir)
    return make


def _ensemble_size(smoother_cfg: dict, model: Any) -> int:
    n_members = smoother_cfg["ensemble_size"]
    if isinstance(n_members, bool) or not isinstance(n_members, int) or n_members < 2:
        raise ValueError(f"[smoother] ensemble_size: expected an int >= 2, got {n_members!r}")
    if n_members > 10**6 or n_members * model.layout.size > 2**31:
        raise ValueError(f"[smoother] ensemble_size: {n_members} members of "
                         f"{model.layout.size} parameters is beyond this plugin's limits")
    return n_members


def _noise_std(data: dict) -> Any:
    if "noise_std" not in data:
        raise ValueError("[data]: missing key 'noise_std'")
    noise_std = data["noise_std"]
    if isinstance(noise_std, str) and noise_std != "auto":
        raise ValueError(f"[data] noise_std: expected a number, a list of numbers or \"auto\", "
                         f"got {noise_std!r}")
    return noise_std


def _summary(config: dict, model: Any, data: dict, seed: int, noise_std: Any
             ) -> tuple[Any, tuple[int, int] | None]:
    """The model through ``[summary]`` statistics, and ``(realisations, covariance paths)``
    of its twin experiment (``None`` without a ``[summary]``)."""
    realisations = integer(data.get("realisations", 1), "[data] realisations", minimum=1,
                           maximum=10**6)
    if "summary" not in config:
        if noise_std == "auto":
            raise ValueError("[data] noise_std = \"auto\": only with a [summary] section")
        if "realisations" in data:
            raise ValueError("[data] realisations: only with a [summary] section")
        return model, None
    summary = check_keys(config["summary"], where="[summary]",
                         optional=("replicates", "statistics", "seed", "covariance_paths"))
    # the model's replicate paths follow the run's seed too (a fixed set of paths would
    # bias every repetition of an experiment the same way)
    model = _replicate(model, {**summary, "seed": summary.get("seed", 0) + 7919 * seed})
    if "std" in model.statistics and realisations < 2:
        raise ValueError("[data] realisations: the statistic 'std' is over realisations: "
                         f"expected >= 2 realisations, got {realisations}")
    n_cov = integer(summary.get("covariance_paths", 1000), "[summary] covariance_paths",
                    minimum=model.output_size + 3, maximum=10**5)
    return model, (realisations, n_cov)


def _data_values(data: dict, make: Any, model: Any, truth: torch.Tensor | None,
                 twin: tuple[int, int] | None, *, noise_std: Any, data_seed: int,
                 base_dir: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The observed values (given inline, from a file, or simulated at the truth) and, for
    ``noise_std = "auto"``, their noise covariance."""
    given = [k for k in ("values", "file") if k in data]
    if len(given) > 1:
        raise ValueError("[data]: give 'values' or 'file', not both")
    if "file" not in data and ("column" in data or "variable" in data):
        raise ValueError("[data] column/variable: only with file")
    if given:
        if noise_std == "auto":
            raise ValueError("[data] noise_std = \"auto\": only for twin experiments (truth)")
        if given == ["file"]:
            spec = {k: data[k] for k in ("file", "column", "variable") if k in data}
            return load_values(spec, "[data]", base_dir=base_dir), None
        return torch.as_tensor(data["values"], dtype=torch.float64), None
    if truth is None:
        raise ValueError("[data]: give observed 'values' or a 'file', or a 'truth' for every "
                         "parameter (twin experiment)")
    x_true = truth.unsqueeze(0)
    if twin is not None:
        return _twin_statistics(make, model, x_true, data_seed=data_seed,
                                realisations=twin[0], n_cov=twin[1], auto=noise_std == "auto")
    # a stochastic simulator draws the truth's noise from the data seed, not the
    # ensemble's: the members must not share the realisation that made the data
    truth_model = make(10_007 + data_seed)
    clean = truth_model(x_true.to(truth_model.dtype))[0].to(torch.float64).cpu()
    if not bool(torch.isfinite(clean).all()):
        raise ValueError("[parameters] truth: the model's prediction at the truth is "
                         "not finite")
    noise_gen = torch.Generator().manual_seed(data_seed)
    std = enkal.Observations(clean, noise_std=noise_std).noise_std
    return clean + std * torch.randn(clean.shape, generator=noise_gen,
                                     dtype=torch.float64), None


def run_config(path: str, **run_kwargs) -> tuple[Experiment, enkal.SmootherResult]:
    """Build from a TOML file and run; ``run_kwargs`` go to :meth:`EnsembleSmoother.run`."""
    exp = build(load_toml(path), base_dir=os.path.dirname(os.path.abspath(path)))
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
    def build(config: dict, *, seed: int | None = None, device: str | None = None,
              base_dir: str | os.PathLike | None = None) -> Experiment:
        return build(config, seed=seed, device=device, base_dir=base_dir)


plugin = _Plugin()
