r"""How close are the ensembles to the posterior? ES-MDA and the Ensemble Kalman Sampler
against an MCMC reference, on a twin experiment of ``problems/``.

The posterior is that of the configuration: its Gaussian prior in the unconstrained space
(``[parameters]``), its data and noise. The reference is random-walk Metropolis in the
unconstrained space, ``--chains`` chains advanced together (one batched forward of the
model per step), started from ES-MDA's final ensemble with the proposal covariance
``2.38^2 / N_par`` times that ensemble's covariance (Roberts & Rosenthal's scaling); the
first fifth of the steps is burn-in. Its Monte-Carlo error is estimated by batch means over
chains.

Printed per parameter (physical units): the MCMC mean and sd (and the MC standard error of
the mean), and for each method its mean's distance from the MCMC mean in MCMC sds and its
sd over the MCMC sd; the forwards each method used. EKS's averages are over its iterations
after burn-in, each ensemble weighted by its step ``dt`` (``docs/updates.md`` section 10).
The last line is ``BENCH_JSON {...}``.

Run ``python bench/posterior.py [--problem lorenz63] [--seed 0] [--quick]``; one thread by
default (a shared machine). ``--quick``: fewer steps, to check the script.
"""

from __future__ import annotations

import argparse
import math
import pathlib
import sys
import time

import torch
from _common import emit

import enkal
from enkal.config import load_toml
from enkal.problems.estimation import build
from enkal.problems.parsing import prior_moments

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _log_posterior(exp, m0: torch.Tensor, s0: torch.Tensor):
    obs = exp.observations

    def logp(u: torch.Tensor) -> torch.Tensor:
        pred = exp.model(exp.model.layout.to_physical(u))
        bad = ~torch.isfinite(pred).all(dim=1)
        lik = -obs.misfit(torch.nan_to_num(pred))
        prior = -0.5 * (((u - m0) / s0) ** 2).sum(dim=1)
        return torch.where(bad, torch.full_like(lik, -math.inf), lik + prior)
    return logp


def metropolis(logp, start: torch.Tensor, cov: torch.Tensor, steps: int, seed: int):
    """Random-walk Metropolis, the rows of ``start`` as parallel chains; returns the samples
    after burn-in ``(steps - steps // 5, chains, N_par)`` and the acceptance rate."""
    g = torch.Generator().manual_seed(seed)
    chol = torch.linalg.cholesky(cov * 2.38 ** 2 / start.shape[1])
    u, lp = start.clone(), logp(start)
    kept, accepted = [], 0.0
    for k in range(steps):
        prop = u + torch.randn(u.shape, generator=g, dtype=u.dtype) @ chol.T
        lp_prop = logp(prop)
        accept = torch.log(torch.rand(u.shape[0], generator=g, dtype=u.dtype)) < lp_prop - lp
        u = torch.where(accept[:, None], prop, u)
        lp = torch.where(accept, lp_prop, lp)
        accepted += float(accept.double().mean())
        if k >= steps // 5:
            kept.append(u.clone())
    return torch.stack(kept), accepted / steps


def eks(exp, m0, s0, *, iterations: int, numerator: float, seed: int):
    smoother = enkal.EnsembleSmoother(
        exp.observations, rule=enkal.EnsembleKalmanSampler(m0.tolist(), s0.tolist()),
        schedule=enkal.EKSStable(numerator=numerator), seed=seed)
    state = smoother.init(exp.prior)
    total, s1, s2 = 0.0, 0.0, 0.0
    layout = exp.model.layout
    for k in range(iterations):
        state, info = smoother.step(state, exp.model(layout.to_physical(state.parameters)))
        if k >= iterations // 5:
            dt = info.schedule["dt"]
            phi = layout.to_physical(state.parameters)
            total += dt
            s1 = s1 + dt * phi.mean(0)
            s2 = s2 + dt * (phi ** 2).mean(0)
    mean = s1 / total
    return mean, (s2 / total - mean ** 2).clamp_min(0).sqrt(), iterations * exp.prior.shape[0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--problem", default="lorenz63", help="a problems/NAME.toml (default lorenz63)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chains", type=int, default=100)
    p.add_argument("--mcmc-steps", type=int, default=4000)
    p.add_argument("--eks-iterations", type=int, default=2000)
    p.add_argument("--numerator", type=float, default=0.05, help="EKSStable's numerator")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="few steps: checks the script runs")
    p.add_argument("--json", help="also write the record to this file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        args.mcmc_steps, args.eks_iterations, args.chains = 50, 30, 20
    config = load_toml(ROOT / "problems" / f"{args.problem}.toml")
    exp = build(config, seed=args.seed)
    layout = exp.model.layout
    m0, s0, _ = prior_moments(config["parameters"], layout)
    t0 = time.perf_counter()
    esmda = exp.smoother.run(exp.model, exp.prior, max_iterations=exp.max_iterations)
    t_esmda = time.perf_counter() - t0
    x = esmda.parameters
    start = x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(1))
              [:args.chains] % x.shape[0]]
    if start.shape[0] < args.chains:
        start = start.repeat(-(-args.chains // start.shape[0]), 1)[:args.chains]
    t0 = time.perf_counter()
    samples, rate = metropolis(_log_posterior(exp, m0, s0), start, torch.cov(x.T),
                               args.mcmc_steps, args.seed + 7)
    t_mcmc = time.perf_counter() - t0
    phi = layout.to_physical(samples.reshape(-1, layout.size)).reshape(samples.shape)
    ref_mean, ref_sd = phi.mean(dim=(0, 1)), phi.std(dim=(0, 1))
    chain_means = phi.mean(0)  # (chains, N_par): chains are independent
    se = chain_means.std(0) / math.sqrt(chain_means.shape[0])
    t0 = time.perf_counter()
    eks_mean, eks_sd, eks_forwards = eks(exp, m0, s0, iterations=args.eks_iterations,
                                         numerator=args.numerator, seed=args.seed)
    t_eks = time.perf_counter() - t0
    es_phi = esmda.physical
    rows = {}
    print(f"{args.problem}, seed {args.seed}: MCMC {args.chains} chains x {args.mcmc_steps} "
          f"steps (acceptance {rate:.2f}, {t_mcmc:.0f} s); ES-MDA {esmda.n_forwards} forwards "
          f"({t_esmda:.1f} s); EKS {eks_forwards} forwards ({t_eks:.0f} s), numerator "
          f"{args.numerator}")
    print(f"{'parameter':10} {'MCMC mean':>10} {'sd':>8} {'se':>8} | {'ES-MDA dm/sd':>12} "
          f"{'sd ratio':>8} | {'EKS dm/sd':>9} {'sd ratio':>8}")
    for j, name in enumerate(layout.names):
        es_m, es_s = float(es_phi[:, j].mean()), float(es_phi[:, j].std())
        rec = {"mcmc_mean": float(ref_mean[j]), "mcmc_sd": float(ref_sd[j]),
               "mcmc_se": float(se[j]),
               "esmda_dmean_sd": (es_m - float(ref_mean[j])) / float(ref_sd[j]),
               "esmda_sd_ratio": es_s / float(ref_sd[j]),
               "eks_dmean_sd": (float(eks_mean[j]) - float(ref_mean[j])) / float(ref_sd[j]),
               "eks_sd_ratio": float(eks_sd[j]) / float(ref_sd[j])}
        rows[name] = rec
        print(f"{name:10} {rec['mcmc_mean']:10.4g} {rec['mcmc_sd']:8.3g} {rec['mcmc_se']:8.2g} | "
              f"{rec['esmda_dmean_sd']:12.2f} {rec['esmda_sd_ratio']:8.2f} | "
              f"{rec['eks_dmean_sd']:9.2f} {rec['eks_sd_ratio']:8.2f}")
    emit({"bench": "posterior", "problem": args.problem, "seed": args.seed,
          "mcmc": {"chains": args.chains, "steps": args.mcmc_steps, "acceptance": rate,
                   "seconds": t_mcmc},
          "esmda_forwards": esmda.n_forwards, "eks_forwards": eks_forwards,
          "eks_numerator": args.numerator, "parameters": rows}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
