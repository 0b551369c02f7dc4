r"""An independent check of the MCMC references of ``bench/methods.py``.

The stored references (``bench/reference/methods_mcmc.json``) come from emcee's stretch move
started around an ES-MDA ensemble. This script samples the same log posterior
(:meth:`methods.Problem.log_posterior`) with another move and another start: emcee's
differential-evolution move ``DEMove``, walkers started over-dispersed around UKI's Gaussian
posterior (its mean +- 3 of its sds, uniform), a different seed. It first runs the same
sampler on a correlated 20-dimensional Gaussian and prints its sds over the exact ones: the
sampler's own check. (emcee 3.1.6's ``DESnookerMove`` failed it: alone, sds 25% too small;
as 20% of the moves beside ``DEMove``, 8% too small.) The first half of the steps is
burn-in (three times the steps for more than 10 parameters); the Monte-Carlo standard error
of each mean is ``sd sqrt(tau / (walkers (steps - burn)))`` with emcee's integrated
autocorrelation time ``tau``.

Printed per problem and parameter: the difference of the two means in reference sds and in
their joint Monte-Carlo error ``z = (m_new - m_ref) / sqrt(se_new^2 + se_ref^2)``, and the
ratio of the sds. Two chains of the same posterior give ``|z|`` below 2 in about 95% of
parameters and sd ratios within a few Monte-Carlo errors of 1 (``se(sd) / sd`` is about
``se(mean) / sd / sqrt(2)`` for a Gaussian).

Run ``python bench/methods_mcmc_check.py [--problems lorenz63 lorenz96] [--walkers 64]
[--steps 1500]`` (about 7 minutes for all four); one thread. The last line is ``BENCH_JSON {...}``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import emcee
import numpy as np
import torch
from _common import emit, environment
from methods import REFERENCE, Problem, problems, uki

import enkal


def check(pb: Problem, ref: dict, *, walkers: int, steps: int, seed: int) -> dict:
    if hasattr(enkal, "UnscentedKalmanInversion"):
        centre, width, _ = uki(pb, seed)
    else:  # an enkal before issue #17's methods: the reference's own moments
        centre, width = torch.tensor(ref["mean"]), torch.tensor(ref["sd"])
    g = np.random.default_rng(seed)
    p0 = centre.numpy() + 3 * width.numpy() * g.uniform(-1, 1, (walkers, pb.n_par))

    def logp(u: np.ndarray) -> np.ndarray:
        return pb.log_posterior(torch.from_numpy(np.ascontiguousarray(u))).numpy()

    sampler = emcee.EnsembleSampler(walkers, pb.n_par, logp, vectorize=True,
                                    moves=emcee.moves.DEMove())
    sampler.random_state = np.random.RandomState(seed).get_state()
    t0 = time.perf_counter()
    sampler.run_mcmc(p0, steps, progress=False)
    wall = time.perf_counter() - t0
    burn = steps // 2
    chain = sampler.get_chain(discard=burn)
    tau = emcee.autocorr.integrated_time(chain, quiet=True)
    flat = chain.reshape(-1, pb.n_par)
    mean, sd = flat.mean(0), flat.std(0, ddof=1)
    se = sd * np.sqrt(tau / (chain.shape[0] * walkers))
    m_ref, s_ref = np.array(ref["mean"]), np.array(ref["sd"])
    se_ref = s_ref * np.sqrt(np.array(ref["tau"]) / ((ref["steps"] - ref["burn"])
                                                     * ref["walkers"]))
    return {"walkers": walkers, "steps": steps, "burn": burn, "tau_max": float(tau.max()),
            "steps_over_tau": float((steps - burn) / tau.max()),
            "acceptance": float(np.mean(sampler.acceptance_fraction)), "wall_s": wall,
            "dmean_sd": ((mean - m_ref) / s_ref).tolist(),
            "z": ((mean - m_ref) / np.sqrt(se ** 2 + se_ref ** 2)).tolist(),
            "sd_ratio": (sd / s_ref).tolist(), "se_over_sd": float(np.max(se / sd))}


def gaussian_check(*, walkers: int, steps: int, seed: int, dim: int = 20) -> dict:
    """The sampler of :func:`check` on ``N(0, C)``, ``C`` a random correlated covariance:
    its sds over the exact ones after the same burn-in (half the steps)."""
    g = np.random.default_rng(seed)
    a = g.standard_normal((dim, dim))
    cov = a @ a.T / dim + 0.1 * np.eye(dim)
    prec, sd = np.linalg.inv(cov), np.sqrt(np.diag(cov))

    def logp(x: np.ndarray) -> np.ndarray:
        return -0.5 * np.einsum("ij,jk,ik->i", x, prec, x)

    sampler = emcee.EnsembleSampler(walkers, dim, logp, vectorize=True,
                                    moves=emcee.moves.DEMove())
    sampler.random_state = np.random.RandomState(seed).get_state()
    sampler.run_mcmc(3 * sd * g.uniform(-1, 1, (walkers, dim)), steps, progress=False)
    flat = sampler.get_chain(discard=steps // 2).reshape(-1, dim)
    ratio = flat.std(0, ddof=1) / sd
    return {"dim": dim, "sd_ratio_min": float(ratio.min()), "sd_ratio_max": float(ratio.max()),
            "dmean_sd_max": float(np.abs(flat.mean(0) / sd).max())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--problems", nargs="+", default=list(problems()), choices=list(problems()))
    p.add_argument("--walkers", type=int, default=64)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", help="also write the record to this file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    import json

    refs = json.loads(REFERENCE.read_text())
    configs = problems()
    out = {}
    gauss = gaussian_check(walkers=max(args.walkers, 80), steps=3 * args.steps, seed=args.seed)
    print(f"the sampler on a correlated {gauss['dim']}-dimensional Gaussian: sd / exact sd "
          f"{gauss['sd_ratio_min']:.3f}-{gauss['sd_ratio_max']:.3f}, |mean| / sd max "
          f"{gauss['dmean_sd_max']:.3f}", flush=True)
    for name in args.problems:
        pb = Problem(configs[name], 0)
        walkers = max(args.walkers, 4 * pb.n_par)
        steps = args.steps * (3 if pb.n_par > 10 else 1)
        r = check(pb, refs[name], walkers=walkers, steps=steps, seed=args.seed)
        out[name] = r
        print(f"{name}: {walkers} walkers x {steps} steps (DEMove), acceptance "
              f"{r['acceptance']:.2f}, tau max {r['tau_max']:.0f} ({r['steps_over_tau']:.0f} "
              f"tau after burn-in), MC se/sd {r['se_over_sd']:.3f}, {r['wall_s']:.0f} s; "
              f"|mean - ref| / sd max {max(map(abs, r['dmean_sd'])):.3f}, |z| max "
              f"{max(map(abs, r['z'])):.2f}, sd ratio {min(r['sd_ratio']):.3f}-"
              f"{max(r['sd_ratio']):.3f}", flush=True)
        if not all(math.isfinite(v) for v in r["z"]):
            print(f"  {name}: non-finite z", flush=True)
    emit({"bench": "methods_mcmc_check", "env": environment(), "emcee": emcee.__version__,
          "gaussian": gauss, "problems": out}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
