r"""Which inversion method when? enkal's methods against an MCMC reference on nonlinear ODEs.

Four twin experiments, built through enkal's own configuration route
(:func:`enkal.problems.estimation.build`; the Gaussian prior of ``[parameters]`` in the
unconstrained space, its data and noise):

* ``lorenz63``: ``problems/lorenz63.toml`` (sigma, rho, beta; 60 observations);
* ``lotka-volterra``: predator-prey, 4 rates, both species at 20 times (noise 1 on
  populations of 5-40);
* ``sir``: an epidemic ODE, infection and recovery rates from the infected fraction at 20
  days (noise 0.01);
* ``lorenz96``: Lorenz-96 with a forcing per site on 20 sites (20 parameters), every other
  site observed at 10 times (noise 0.5).

The reference is emcee's affine-invariant ensemble sampler [ForemanMackey2013] on the same
log posterior (the prior in the unconstrained space plus ``-Observations.misfit``), all
walkers in one batched forward per step, started from an ES-MDA ensemble; the first
``burn`` steps are dropped, the integrated autocorrelation time ``tau`` of every parameter
is reported, and the Monte-Carlo standard error of the mean is ``sd sqrt(tau / (walkers
steps))``. References are stored in ``bench/reference/methods_mcmc.json`` and read from
there; ``--mcmc`` recomputes them (minutes).

Methods, on the same prior draws for each seed (``--seeds``, default 20):

* ``enkal ES-MDA``: :class:`~enkal.SquareRoot` with ``ESMDA.constant(4)``, 100 members;
* ``enkal ES-MDA PO``: the same with :class:`~enkal.PerturbedObservations` (IES's update);
* ``enkal ES-MDA E=25``: the square-root one with 25 members (100 forwards, a budget like
  Gauss-Newton's; its own 25 draws, not a subset of the 100);
* ``IES ESMDA``: iterative_ensemble_smoother's ``ESMDA`` (perturbed observations,
  ``alpha = (4, 4, 4, 4)``) on the same 100-member draws;
* ``enkal GaussNewton``: ``GaussNewton(prior)``, ``E = 2 N_par + 2``, 8 iterations,
  ``Iterations(8, start=16)`` (noise inflations 16, 8, 4, 2, then 1: a continuation);
  ``enkal GN 4(N+1)``: the same with ``E = 4 (N_par + 1)``;
* ``enkal UKI``: ``UnscentedKalmanInversion(prior)``, ``2 N_par + 1`` sigma points, 15
  iterations at ``alpha = 2`` (deterministic: one run);
* ``enkal EKS`` (``--eks``): the Ensemble Kalman Sampler, 100 members, ``EKSStable()``,
  averages over the second half of 1000 steps weighted by ``dt``.

Printed per problem and method, all in the unconstrained space: ``err`` and ``rms``, the
largest and the root mean square over parameters of ``|mean - MCMC mean| / MCMC sd``
(medians over seeds); ``sd ratio``, the
smallest and largest over parameters of ``sd / MCMC sd`` (medians over seeds); ``cov90``,
the fraction of the truth's parameters inside the method's 90% Gaussian interval ``mean +-
1.645 sd``, over ``--datasets`` independent data sets (default 20; each with its own noise
draw and the method's seed equal to it); forwards per run; wall seconds per run. Then one
line per problem with issue #17's acceptance (:func:`verdict`): the best enkal row, and the
cheapest enkal row whose ``err`` is at most IES ESMDA's, with both forward counts. The rows
of methods this enkal lacks (``GaussNewton``, ``UnscentedKalmanInversion``) print "not
available" and are skipped.

``--exact-coverage`` adds, for two-parameter problems (``sir``), the coverage of the truth by
the exact posterior's own 90% intervals (marginals on a grid): what a perfect method would
score with these data sets.

Run ``python bench/methods.py [--problems lorenz63 sir] [--seeds 20] [--datasets 20]
[--eks] [--mcmc] [--exact-coverage]``; ``--quick`` (2 seeds, 2 data sets, short MCMC if asked) checks the
script. One thread by default. The last line is ``BENCH_JSON {...}``.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import functools
import json
import math
import pathlib
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from _common import emit, environment

import enkal
from enkal.config import load_toml
from enkal.problems.estimation import build
from enkal.problems.parsing import prior_moments

ROOT = pathlib.Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "bench" / "reference" / "methods_mcmc.json"
Z90 = 1.6448536269514722  # the 95% normal quantile: a 90% central interval


def _rate(median: float, std: float, truth: float) -> dict:
    return {"prior_median": median, "prior_std": std, "truth": truth}


def problems() -> dict[str, dict]:
    """The four configurations (plain dicts, as TOML gives them)."""
    l63 = load_toml(ROOT / "problems" / "lorenz63.toml")
    lv = {"problem": "estimation", "name": "lotka-volterra",
          "model": {"type": "LotkaVolterra", "t_obs": {"start": 0.5, "stop": 10.0, "step": 0.5},
                    "x0": [10.0, 5.0], "solver": {"type": "RK4", "dt": 0.02}},
          "parameters": {"alpha": _rate(1.0, 0.3, 1.1), "beta": _rate(0.1, 0.3, 0.12),
                         "gamma": _rate(0.5, 0.3, 0.45), "delta": _rate(0.05, 0.3, 0.06)},
          "data": {"noise_std": 1.0, "seed": 1},
          "smoother": {"ensemble_size": 100}}
    sir = {"problem": "estimation", "name": "sir",
           "model": {"type": "SIR", "t_obs": {"start": 1.0, "stop": 20.0, "step": 1.0},
                     "infected": 0.01, "observe": ["I"], "solver": {"type": "RK4", "dt": 0.1}},
           "parameters": {"beta": _rate(0.4, 0.5, 0.5), "gamma": _rate(0.2, 0.5, 0.25)},
           "data": {"noise_std": 0.01, "seed": 1},
           "smoother": {"ensemble_size": 100}}
    l96 = {"problem": "estimation", "name": "lorenz96",
           "model": {"type": "Lorenz96", "n_sites": 20, "per_site": True,
                     "t_obs": {"start": 0.05, "stop": 0.5, "step": 0.05},
                     "observe": list(range(0, 20, 2)), "solver": {"type": "RK4", "dt": 0.01}},
           "parameters": {"F": _rate(6.0, 2.0, 8.0)},
           "data": {"noise_std": 0.5, "seed": 1},
           "smoother": {"ensemble_size": 100}}
    return {"lorenz63": l63, "lotka-volterra": lv, "sir": sir, "lorenz96": l96}


class Problem:
    """One data set of a configuration: model, observations, prior moments, truth."""

    def __init__(self, config: dict, dataset: int) -> None:
        exp = build(copy.deepcopy(config), seed=dataset)
        self.model, self.observations = exp.model, exp.observations
        layout = exp.model.layout
        self.u_mean, self.u_std, truth = prior_moments(config["parameters"], layout)
        self.truth = layout.to_unconstrained(truth.unsqueeze(0).to(torch.float64))[0]
        self.n_par = layout.size

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """Predictions of unconstrained parameters ``(n, N_par)``."""
        return self.model(self.model.layout.to_physical(u))

    def prior(self, n: int, seed: int) -> torch.Tensor:
        return enkal.gaussian_ensemble(self.u_mean, self.u_std, n,
                                       generator=torch.Generator().manual_seed(1000 + seed))

    def log_posterior(self, u: torch.Tensor) -> torch.Tensor:
        pred = self.forward(u)
        bad = ~torch.isfinite(pred).all(dim=1)
        lik = -self.observations.misfit(torch.nan_to_num(pred))
        prior = -0.5 * (((u - self.u_mean) / self.u_std) ** 2).sum(dim=1)
        return torch.where(bad, torch.full_like(lik, -math.inf), lik + prior)


# -- methods: each returns (mean, sd, forwards) in the unconstrained space -----------------
def _moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x.mean(0), x.std(0)


def enkal_esmda(pb: Problem, seed: int, *, rule: Any = None, members: int = 100):
    """ES-MDA, ``ESMDA.constant(4)``: the square-root update by default."""
    sm = enkal.EnsembleSmoother(pb.observations, rule=rule or enkal.SquareRoot(),
                                schedule=enkal.ESMDA.constant(4), seed=seed)
    x = sm.run(pb.model, pb.prior(members, seed)).parameters
    return (*_moments(x), 4 * members)


def ies_esmda(pb: Problem, seed: int):
    import iterative_ensemble_smoother as ies

    obs = pb.observations
    smoother = ies.ESMDA(covariance=(obs.noise_std ** 2).numpy(), observations=obs.values.numpy(),
                         alpha=np.array([4.0, 4.0, 4.0, 4.0]), seed=seed)
    x = pb.prior(100, seed).T.numpy().copy()  # (N_par, E): parameters first, as IES has it
    for _ in range(4):
        y = pb.forward(torch.from_numpy(x.T.copy())).T.numpy()
        smoother.prepare_assimilation(Y=y, truncation=1.0)  # one alpha each call
        x = smoother.assimilate_batch(X=x)
    return (*_moments(torch.from_numpy(x.T.copy())), 400)


def gauss_newton(pb: Problem, seed: int, *, factor: int = 2):
    """``E = factor (N_par + 1)`` members, 8 iterations from ``start=16``."""
    e = factor * (pb.n_par + 1)
    sm = enkal.EnsembleSmoother(
        pb.observations, rule=enkal.GaussNewton(pb.u_mean.tolist(), pb.u_std.tolist()),
        schedule=enkal.Iterations(8, start=16.0), seed=seed)
    x = sm.run(pb.model, pb.prior(e, seed)).parameters
    return (*_moments(x), 8 * e)


def uki(pb: Problem, seed: int):
    rule = enkal.UnscentedKalmanInversion(pb.u_mean.tolist(), pb.u_std.tolist())
    sm = enkal.EnsembleSmoother(pb.observations, rule=rule,
                                schedule=enkal.Iterations(15, alpha=2.0), seed=seed)
    x = sm.run(pb.model, rule.initial_ensemble(pb.n_par)).parameters
    mean, cov = rule.posterior(x, alpha=2.0)
    return mean, cov.diagonal().sqrt(), 15 * (2 * pb.n_par + 1)


def eks(pb: Problem, seed: int, steps: int = 1000):
    sm = enkal.EnsembleSmoother(
        pb.observations,
        rule=enkal.EnsembleKalmanSampler(pb.u_mean.tolist(), pb.u_std.tolist()),
        schedule=enkal.EKSStable(), seed=seed)
    state = sm.init(pb.prior(100, seed))
    total, s1, s2 = 0.0, 0.0, 0.0
    for k in range(steps):
        state, info = sm.step(state, pb.forward(state.parameters))
        if k >= steps // 2:
            dt = info.schedule["dt"]
            total += dt
            s1 = s1 + dt * state.parameters.mean(0)
            s2 = s2 + dt * (state.parameters ** 2).mean(0)
    mean = s1 / total
    return mean, (s2 / total - mean ** 2).clamp_min(0).sqrt(), 100 * steps


METHODS: dict[str, Callable] = {
    "enkal ES-MDA": enkal_esmda,
    "enkal ES-MDA PO": functools.partial(enkal_esmda, rule=enkal.PerturbedObservations()),
    "enkal ES-MDA E=25": functools.partial(enkal_esmda, members=25),
    "IES ESMDA": ies_esmda,
    "enkal GaussNewton": gauss_newton,
    "enkal GN 4(N+1)": functools.partial(gauss_newton, factor=4),
    "enkal UKI": uki,
}
NEW = {"enkal GaussNewton": "GaussNewton", "enkal GN 4(N+1)": "GaussNewton",
       "enkal UKI": "UnscentedKalmanInversion"}  # the rows that need these names of enkal
DETERMINISTIC = {"enkal UKI"}


# -- the MCMC reference ----------------------------------------------------------------------
def mcmc(pb: Problem, *, walkers: int, steps: int, seed: int) -> dict:
    """emcee on ``pb``'s log posterior; its moments and diagnostics."""
    import emcee

    start_x = enkal_esmda(pb, seed)  # mean, sd of an ES-MDA ensemble: the walkers' start
    g = np.random.default_rng(seed)
    p0 = start_x[0].numpy() + start_x[1].numpy() * g.standard_normal((walkers, pb.n_par))

    def logp(u: np.ndarray) -> np.ndarray:
        return pb.log_posterior(torch.from_numpy(np.ascontiguousarray(u))).numpy()

    sampler = emcee.EnsembleSampler(walkers, pb.n_par, logp, vectorize=True)
    sampler.random_state = np.random.RandomState(seed).get_state()  # reproducible moves
    t0 = time.perf_counter()
    sampler.run_mcmc(p0, steps, progress=False)
    wall = time.perf_counter() - t0
    tau = sampler.get_autocorr_time(quiet=True)
    burn = int(min(steps // 2, 5 * np.max(tau)))
    chain = sampler.get_chain(discard=burn)  # (steps - burn, walkers, N_par)
    flat = chain.reshape(-1, pb.n_par)
    sd = flat.std(0, ddof=1)
    se = sd * np.sqrt(tau / (chain.shape[0] * walkers))
    return {"mean": flat.mean(0).tolist(), "sd": sd.tolist(),
            "q05": np.quantile(flat, 0.05, axis=0).tolist(),
            "q95": np.quantile(flat, 0.95, axis=0).tolist(),
            "tau": tau.tolist(), "burn": burn, "walkers": walkers, "steps": steps,
            "acceptance": float(np.mean(sampler.acceptance_fraction)),
            "se_over_sd": float(np.max(se / sd)), "wall_s": wall,
            "emcee": emcee.__version__, "date": datetime.date.today().isoformat()}


def references(names: list[str], configs: dict, recompute: bool, quick: bool) -> dict:
    stored = json.loads(REFERENCE.read_text()) if REFERENCE.exists() else {}
    out = {}
    for name in names:
        if not recompute and name in stored:
            out[name] = stored[name]
            continue
        if not recompute:
            raise SystemExit(f"no MCMC reference for {name!r} in {REFERENCE}: run with --mcmc")
        pb = Problem(configs[name], 0)
        walkers = max(32, 4 * pb.n_par)
        steps = 200 if quick else (20000 if pb.n_par > 10 else 6000)
        out[name] = mcmc(pb, walkers=walkers, steps=steps, seed=0)
        r = out[name]
        print(f"  MCMC {name}: {walkers} walkers x {steps} steps, acceptance "
              f"{r['acceptance']:.2f}, tau max {max(r['tau']):.0f}, burn {r['burn']}, "
              f"MC se/sd {r['se_over_sd']:.3f}, {r['wall_s']:.0f} s", flush=True)
        if not quick:
            stored[name] = out[name]
            REFERENCE.write_text(json.dumps(stored, indent=1) + "\n")
    return out


def _grid(pb: Problem, centre: list[float], half: list[float], n: int):
    """The normalised posterior on an ``n x n`` grid ``centre +- half`` and its axes."""
    axes = [c + h * torch.linspace(-1.0, 1.0, n, dtype=torch.float64)
            for c, h in zip(centre, half, strict=True)]
    a, b = torch.meshgrid(*axes, indexing="ij")
    u = torch.stack([a.reshape(-1), b.reshape(-1)], dim=1)
    lp = torch.cat([pb.log_posterior(c) for c in u.split(4096)]).reshape(n, n)
    w = torch.exp(lp - lp.max())
    return w / w.sum(), axes


def grid_coverage(config: dict, datasets: int, n: int = 301) -> float:
    """For a two-parameter problem: the coverage of the truth by the exact posterior's 90%
    intervals, its marginals on a grid of the unconstrained space: first +- 8 prior sds,
    then +- 10 posterior sds around the posterior mean (mass at the edges checked to be
    below 1e-6)."""
    inside, total = 0, 0
    for d in range(datasets):
        pb = Problem(config, d)
        w, axes = _grid(pb, pb.u_mean.tolist(), (8 * pb.u_std).tolist(), n)
        margs = (w.sum(1), w.sum(0))
        mean = [float((m * x).sum()) for m, x in zip(margs, axes, strict=True)]
        sd = [float((m * (x - c) ** 2).sum().sqrt())
              for m, x, c in zip(margs, axes, mean, strict=True)]
        w, axes = _grid(pb, mean, [10 * s for s in sd], n)
        for j, marg in enumerate((w.sum(1), w.sum(0))):
            if float(marg[0] + marg[-1]) > 1e-6:
                raise RuntimeError(f"data set {d}: posterior mass at the grid's edge")
            cdf = marg.cumsum(0)
            lo = axes[j][int(torch.searchsorted(cdf, torch.tensor(0.05, dtype=cdf.dtype)))]
            hi = axes[j][int(torch.searchsorted(cdf, torch.tensor(0.95, dtype=cdf.dtype)))]
            inside += int(lo <= pb.truth[j] <= hi)
            total += 1
    return inside / total


# -- scoring ----------------------------------------------------------------------------------
def _median(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan


def score(methods: dict, configs: dict, name: str, ref: dict, seeds: int, datasets: int
          ) -> list[dict]:
    pb = Problem(configs[name], 0)
    m_ref, s_ref = torch.tensor(ref["mean"]), torch.tensor(ref["sd"])
    rows = []
    for label, fn in methods.items():
        errs, rmss, lo, hi, walls, forwards = [], [], [], [], [], 0
        for seed in range(1 if label in DETERMINISTIC else seeds):
            t0 = time.perf_counter()
            mean, sd, forwards = fn(pb, seed)
            walls.append(time.perf_counter() - t0)
            z = ((mean.double() - m_ref) / s_ref).abs()
            ratio = sd.double() / s_ref
            finite = bool(torch.isfinite(z).all())
            errs.append(float(z.max()) if finite else math.inf)
            rmss.append(float(z.square().mean().sqrt()) if finite else math.inf)
            lo.append(float(ratio.min()))
            hi.append(float(ratio.max()))
        inside, total = 0, 0
        for d in range(datasets):
            data = Problem(configs[name], d)
            mean, sd, _ = fn(data, d)
            inside += int(((mean.double() - data.truth).abs() <= Z90 * sd.double()).sum())
            total += data.n_par
        rows.append({"problem": name, "method": label, "err": _median(errs),
                     "rms": _median(rmss), "sd_min": _median(lo), "sd_max": _median(hi),
                     "cov90": inside / total if total else None, "forwards": forwards,
                     "wall_s": _median(walls)})
        r = rows[-1]
        cov = f"{r['cov90']:6.2f}" if total else f"{'-':>6}"
        print(f"{name:15} {label:18} {r['err']:6.2f} {r['rms']:6.2f} "
              f"{r['sd_min']:6.2f}-{r['sd_max']:<5.2f} {cov} {r['forwards']:8d} "
              f"{r['wall_s']:7.2f}", flush=True)
    return rows


def verdict(rows: list[dict]) -> dict | None:
    """Issue #17's acceptance on one problem's rows: the best enkal method (smallest
    ``err``) within 0.5 MCMC sd with every sd ratio in 0.7-1.4, and reaching IES ESMDA's
    ``err`` with fewer forwards (the cheapest enkal row that does)."""
    ours = [r for r in rows if r["method"].startswith("enkal") and math.isfinite(r["err"])]
    ies = next((r for r in rows if r["method"] == "IES ESMDA"), None)
    if not ours:
        return None
    best = min(ours, key=lambda r: r["err"])
    out = {"best": best["method"], "best_err": best["err"],
           "best_sd": [best["sd_min"], best["sd_max"]], "best_forwards": best["forwards"],
           "within_0.5_sd": best["err"] <= 0.5,
           "sd_in_0.7_1.4": 0.7 <= best["sd_min"] and best["sd_max"] <= 1.4}
    if ies is not None:
        reach = [r for r in ours if r["err"] <= ies["err"]]
        cheapest = min(reach, key=lambda r: r["forwards"]) if reach else None
        out.update({"ies_err": ies["err"], "ies_forwards": ies["forwards"],
                    "reaches_ies": cheapest and cheapest["method"],
                    "reaches_ies_forwards": cheapest and cheapest["forwards"],
                    "fewer_forwards": bool(cheapest) and cheapest["forwards"] < ies["forwards"]})
    return out


def _verdicts(rows: list[dict]) -> dict:
    """:func:`verdict` of every problem in ``rows``, printed."""
    out = {}
    for name in dict.fromkeys(r["problem"] for r in rows):
        v = verdict([r for r in rows if r["problem"] == name])
        if v is not None:
            out[name] = v
            _print_verdict(name, v)
    return out


def _print_verdict(name: str, v: dict) -> None:
    line = (f"{name}: best {v['best']}, err {v['best_err']:.2f} sd, sd ratio "
            f"{v['best_sd'][0]:.2f}-{v['best_sd'][1]:.2f}, {v['best_forwards']} forwards")
    if "ies_err" in v:
        line += (f"; IES ESMDA err {v['ies_err']:.2f} with {v['ies_forwards']} forwards, "
                 + (f"reached by {v['reaches_ies']} with {v['reaches_ies_forwards']} forwards"
                    if v["reaches_ies"] else "not reached by any enkal row"))
    print(line, flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--problems", nargs="+", default=list(problems()),
                   choices=list(problems()))
    p.add_argument("--seeds", type=int, default=20)
    p.add_argument("--datasets", type=int, default=20)
    p.add_argument("--eks", action="store_true", help="also the Ensemble Kalman Sampler")
    p.add_argument("--mcmc", action="store_true", help="recompute the MCMC references")
    p.add_argument("--exact-coverage", action="store_true",
                   help="also the exact posterior's coverage of the truth (grid; 2 parameters)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="2 seeds, 2 data sets")
    p.add_argument("--json", help="also write the record to this file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        args.seeds, args.datasets = 2, 2
    methods = dict(METHODS)
    try:
        import iterative_ensemble_smoother  # noqa: F401
    except ImportError:
        print("iterative_ensemble_smoother not installed: its rows are skipped")
        del methods["IES ESMDA"]
    for label, attr in NEW.items():  # an enkal without them (before issue #17's methods)
        if not hasattr(enkal, attr):
            print(f"{label}: not available (enkal has no {attr})")
            del methods[label]
    if args.eks:
        methods["enkal EKS"] = (lambda pb, seed: eks(pb, seed, steps=60)) if args.quick \
            else eks
    configs = problems()
    refs = references(args.problems, configs, args.mcmc, args.quick)
    print(f"{'problem':15} {'method':18} {'err':>6} {'rms':>6} {'sd ratio':>11} {'cov90':>6} "
          f"{'forwards':>8} {'wall s':>7}   (err, rms: max and RMS over parameters of |mean - "
          f"MCMC| / MCMC sd, medians of {args.seeds} seeds; cov90 over {args.datasets} data "
          f"sets)")
    rows = []
    for name in args.problems:
        rows += score(methods, configs, name, refs[name], args.seeds, args.datasets)
        if args.exact_coverage and Problem(configs[name], 0).n_par == 2:
            cov = grid_coverage(configs[name], args.datasets)
            rows.append({"problem": name, "method": "exact posterior (grid)", "cov90": cov})
            print(f"{name:15} {'exact (grid)':18} {'':6} {'':6} {'':11} {cov:6.2f}", flush=True)
    emit({"bench": "methods", "env": environment(), "seeds": args.seeds,
          "datasets": args.datasets,
          "mcmc": {k: {f: v[f] for f in ("walkers", "steps", "acceptance", "se_over_sd")}
                   for k, v in refs.items()},
          "rows": rows, "verdicts": _verdicts(rows)}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
