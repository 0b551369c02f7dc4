r"""Localization where spurious correlations hurt: a 1-D field, few members, local data.

A Gaussian field of ``--n`` values on a line (squared-exponential correlation, length 5
grid points), observed at every 10th point with noise 0.2; the prior ensemble is a draw of
``--members`` from the true prior. With a linear observation operator the exact posterior
is known in closed form, so each method's single update (one assimilation, ``alpha = 1``)
is scored against it over ``--seeds`` data sets:

* ``mean err``: RMS distance of the ensemble mean from the exact posterior mean, over the
  field, in units of the exact posterior standard deviation (RMS over the field);
* ``sd ratio``: the ensemble's standard deviation over the exact one (geometric mean over
  the field; 1 is right, below 1 an ensemble too confident);
* ``90% cov``: the fraction of the field whose exact posterior mean lies inside the
  ensemble's 5-95% Gaussian interval;
* the wall time of the update.

Methods on the same prior draws and data: enkal's global ``SquareRoot`` and
``PerturbedObservations``, ``LocalSquareRoot`` (Gaspari-Cohn half-widths ``--radii``),
``CorrelationLocalSquareRoot`` (correlation thresholding at ``3 / sqrt(E)``, no positions),
``SECLocalSquareRoot`` (sampling-error correction: SECNice's tuning-free taper, and Lee's
``|r|^2``),
and iterative_ensemble_smoother's ``ESMDA`` and ``AdaptiveESMDA`` (correlation thresholding at
``3 / sqrt(E)``, its default) when installed. The last line is ``BENCH_JSON {...}``.

Run ``python bench/localization.py [--n 200 2000] [--members 20 50] [--seeds 20]``;
``--quick`` for a small check. One thread by default.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np
import torch
from _common import emit, environment

from enkal import (
    ESMDA,
    CorrelationLocalSquareRoot,
    EnsembleSmoother,
    LocalSquareRoot,
    Observations,
    PerturbedObservations,
    SECLocalSquareRoot,
    SquareRoot,
)

NOISE, LENGTH, EVERY = 0.2, 5.0, 10


def problem(n: int, n_members: int, seed: int):
    """Prior draws ``(E, n)``, the observed sites, data, and the exact posterior mean/sd."""
    g = torch.Generator().manual_seed(seed)
    i = torch.arange(n, dtype=torch.float64)
    cov = torch.exp(-0.5 * ((i[:, None] - i[None, :]) / LENGTH) ** 2) \
        + 1e-8 * torch.eye(n, dtype=torch.float64)
    chol = torch.linalg.cholesky(cov)
    sites = torch.arange(EVERY // 2, n, EVERY)
    truth = chol @ torch.randn(n, generator=g, dtype=torch.float64)
    y = truth[sites] + NOISE * torch.randn(len(sites), generator=g, dtype=torch.float64)
    gain = torch.linalg.solve(cov[sites][:, sites] + NOISE ** 2 * torch.eye(len(sites)),
                              cov[sites]).T  # (n, m)
    mean = gain @ y
    sd = (torch.diagonal(cov) - (gain * cov[:, sites]).sum(1)).clamp_min(1e-12).sqrt()
    x = (chol @ torch.randn(n, n_members, generator=g, dtype=torch.float64)).T
    return x, sites, y, mean, sd


def _enkal(rule) -> Callable:
    def update(x, sites, y, seed):
        smoother = EnsembleSmoother(Observations(y, noise_std=NOISE), rule=rule,
                                    schedule=ESMDA.constant(1), seed=seed)
        return smoother.step(smoother.init(x), x[:, sites])[0].parameters
    return update


def _ies(adaptive: bool) -> Callable:
    import iterative_ensemble_smoother as ies

    def update(x, sites, y, seed):
        cls = ies.AdaptiveESMDA if adaptive else ies.ESMDA
        smoother = cls(covariance=np.full(len(sites), NOISE ** 2), observations=y.numpy(),
                       alpha=1, seed=seed)
        xt = x.T.numpy().copy()  # (n, E): parameters first, as IES has it
        smoother.prepare_assimilation(Y=xt[sites.numpy()], truncation=1.0)
        kwargs = {"n_jobs": 1} if adaptive else {}
        return torch.from_numpy(smoother.assimilate_batch(X=xt, **kwargs).T.copy())
    return update


def methods(radii: list[float]) -> dict[str, Callable]:
    out = {"enkal SquareRoot": _enkal(SquareRoot()),
           "enkal PerturbedObservations": _enkal(PerturbedObservations())}
    for r in radii:
        out[f"enkal LocalSquareRoot r={r:g}"] = None  # filled per problem (needs the sites)
    out["enkal CorrelationLocalSquareRoot"] = _enkal(CorrelationLocalSquareRoot())
    out["enkal SECLocalSquareRoot (SECNice)"] = _enkal(SECLocalSquareRoot())
    out["enkal SECLocalSquareRoot a=2"] = _enkal(SECLocalSquareRoot(exponent=2.0))
    try:
        import iterative_ensemble_smoother  # noqa: F401
    except ImportError:
        print("iterative_ensemble_smoother not installed: its rows are skipped")
        return out
    out["IES ESMDA"] = _ies(False)
    out["IES AdaptiveESMDA"] = _ies(True)
    return out


def score(new: torch.Tensor, mean: torch.Tensor, sd: torch.Tensor) -> dict[str, float]:
    m, s = new.mean(0), new.std(0)
    z = 1.6448536269514722  # the 95% standard normal quantile
    return {"mean_err": float(((m - mean) / sd).square().mean().sqrt()),
            "sd_ratio": float(torch.exp(torch.log(s / sd).mean())),
            "coverage": float(((mean - m).abs() <= z * s).double().mean())}


def run(n: int, n_members: int, seeds: int, radii: list[float]) -> list[dict]:
    table = methods(radii)
    rows = {name: {"mean_err": [], "sd_ratio": [], "coverage": [], "wall": []}
            for name in table}
    for seed in range(seeds):
        x, sites, y, mean, sd = problem(n, n_members, seed)
        for name, fn in table.items():
            if fn is None:
                r = float(name.split("r=")[1])
                fn = _enkal(LocalSquareRoot(radius=r, obs_coordinates=sites.tolist()))
            t0 = time.perf_counter()
            new = fn(x, sites, y, seed)
            rows[name]["wall"].append(time.perf_counter() - t0)
            for k, v in score(new, mean, sd).items():
                rows[name][k].append(v)
    return [{"n": n, "members": n_members, "method": name,
             **{k: statistics.mean(v) for k, v in r.items() if k != "wall"},
             "wall_s": statistics.median(r["wall"])} for name, r in rows.items()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, nargs="+", default=[200, 2000])
    p.add_argument("--members", type=int, nargs="+", default=[20, 50])
    p.add_argument("--seeds", type=int, default=20)
    p.add_argument("--radii", type=float, nargs="+", default=[5.0, 10.0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    sizes = [200] if args.quick else args.n
    members = [20] if args.quick else args.members
    seeds = 2 if args.quick else args.seeds
    print(f"{'N_par':>6} {'E':>4} {'method':<32} {'mean err':>9} {'sd ratio':>9} "
          f"{'90% cov':>8} {'wall s':>8}   ({seeds} seeds; errors in posterior sds)")
    rows = []
    for n in sizes:
        for e in members:
            for r in run(n, e, seeds, args.radii):
                rows.append(r)
                print(f"{n:>6} {e:>4} {r['method']:<32} {r['mean_err']:>9.3f} "
                      f"{r['sd_ratio']:>9.3f} {r['coverage']:>8.2f} {r['wall_s']:>8.4f}",
                      flush=True)
    emit({"bench": "localization", "env": environment(), "seeds": seeds, "rows": rows},
         args.json)
    return 0 if all(math.isfinite(r["mean_err"]) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
