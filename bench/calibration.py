r"""Calibration of the twin experiments of ``problems/``: do the 90% intervals cover the truth?

For each problem and each seed ``0 .. N-1`` the experiment is rebuilt with that seed (a new
data set: the data seed follows the run's seed; a new prior ensemble and new model
replicates) and run to the end of its schedule; :func:`enkal.problems.estimation.calibration`
records whether the central 90% interval of the final ensemble covers the truth. A
calibrated posterior covers it in 90% of data sets; over ``N`` seeds the count is binomial,
standard deviation ``sqrt(0.9 * 0.1 / N)`` = 0.067 for ``N = 20``, so the issue's band
[0.80, 0.98] is about -1.5 to +1.2 standard deviations.

Printed per parameter: coverage, mean relative error of the posterior mean, mean relative
width of the 90% interval; per problem the mean whitened misfit per observation of the model
at the truth (about 1 when the noise covariance matches the data's; the former OU
configuration, mean and std of 100 paths with a bootstrapped covariance, gave 1.64) and the
member forward evaluations per seed (each one a ``K``-path summary for the stochastic
models). The last line is ``BENCH_JSON {...}``.

Run ``python bench/calibration.py [--seeds N] [--quick] [--problems ou sir lorenz63]``;
``--quick`` is 4 seeds of OU and SIR. One thread by default (``--threads``): a shared machine.
Full run (20 seeds of OU and SIR): 23 and 9.3 CPU seconds per seed (4000 OU paths of 1000
Euler steps, 8000 epidemics), about 11 minutes on an idle core; on the shared 2-core
development box under a load of about 10 a seed took 2-5 times its CPU time. Reference (20 seeds, E = 100,
ES-MDA 4 x 4): OU theta 0.95, mu 0.85, sigma 0.90 (misfit 1.27); SIR beta 0.80, gamma 1.00
(misfit 0.96); see docs/models.md, section 7.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import torch
from _common import emit

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROBLEMS = {"ou": "ou.toml", "sir": "sir.toml", "lorenz63": "lorenz63.toml"}


def main(argv: list[str] | None = None) -> dict:
    from enkal.config import load_toml
    from enkal.problems import estimation

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=20, help="seeds 0 .. N-1 (default 20)")
    ap.add_argument("--quick", action="store_true", help="4 seeds of OU and SIR")
    ap.add_argument("--problems", nargs="+", choices=sorted(PROBLEMS), default=["ou", "sir"])
    ap.add_argument("--level", type=float, default=0.9)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    ap.add_argument("--json", help="also write the record to this file")
    args = ap.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    n_seeds = 4 if args.quick else args.seeds
    if n_seeds < 1:
        ap.error("--seeds: expected >= 1")

    record = {"bench": "calibration", "seeds": n_seeds, "level": args.level, "problems": {}}
    print(f"{'problem':10} {'parameter':10} {'coverage':>8} {'rel.err':>8} {'rel.width':>9} "
          f"{'misfit@truth':>12} {'forwards':>8} {'s/seed':>7}")
    for name in args.problems:
        cfg = load_toml(ROOT / "problems" / PROBLEMS[name])
        t0 = time.perf_counter()
        def progress(seed, rec, name=name, t0=t0):
            print(f"  {name} seed {seed}: covered {rec['covered'].int().tolist()} misfit "
                  f"{rec['misfit_at_truth']:.2f} ({time.perf_counter() - t0:.0f} s)",
                  file=sys.stderr, flush=True)

        res = estimation.calibration(cfg, range(n_seeds), level=args.level, callback=progress)
        res["seconds_per_seed"] = (time.perf_counter() - t0) / n_seeds
        record["problems"][name] = res
        for j, (par, row) in enumerate(res["parameters"].items()):
            tail = (f"{res['misfit_at_truth']:12.2f} {res['forwards']:8.0f} "
                    f"{res['seconds_per_seed']:7.1f}") if j == 0 else ""
            print(f"{name:10} {par:10} {row['coverage']:8.2f} {row['rel_error']:8.3f} "
                  f"{row['rel_width']:9.3f} {tail}", flush=True)
    record["torch"] = torch.__version__
    record["threads"] = torch.get_num_threads()
    emit(record, args.json)
    return record


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
