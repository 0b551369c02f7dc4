r"""Filters on the literature's twin experiments, side by side with the published scores.

Lorenz-63 as in Sakov, Oliver & Bertino (2012) and Lorenz-96 (40 variables, F = 8) as in
Sakov & Oke (2008), the settings of :mod:`enkal.problems.filtering`, run through enkal's own
API (``enkal.models.Lorenz63/Lorenz96.propagate``, :class:`enkal.filtering.EnsembleFilter`).
Each configuration runs ``--seeds`` independent twin experiments (own truth, data and first
ensemble) as *one batch of filters*; the score is the time-averaged analysis RMSE after
``--burn-in`` cycles, averaged over the experiments, with a 95% interval corrected for
autocorrelation (:func:`enkal.filtering.time_average`).

Printed side by side per configuration: the score documented by DAPPER's model module (the
values its authors reproduce from the papers' tables), DAPPER 1.7.1 run by us on the same
settings (``bench/reference/filtering_dapper.json``, made by ``bench/filtering_dapper.py``
in a separate environment with ``pip install dapper==1.7.1``), enkal's score, and the
ratios. Then a batch of ``--batch`` filters against the same filters run one by one (wall
time, median of 3). The last line is ``BENCH_JSON {...}``.

Run ``python bench/filtering.py [--cycles 20000] [--seeds 3] [--only l63|l96]
[--device cpu]``; ``--quick`` runs a few hundred cycles to check the script. One thread by
default (a shared machine).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from _common import emit, environment

from enkal.filtering import (
    ETKF,
    LETKF,
    AdaptiveInflation,
    EnKF,
    EnsembleFilter,
    rmse,
    run_filter,
)
from enkal.models import RK4, Lorenz63, Lorenz96
from enkal.problems.filtering import SAKOV2008_L96, SAKOV2012_L63, twin_experiment

ROOT = pathlib.Path(__file__).resolve().parent
PEERS = ROOT / "reference" / "filtering_dapper.json"

#: DAPPER's ``loc_rad`` is the distance where its Gaspari-Cohn taper is exp(-1/2); the taper's
#: half-width (enkal's ``LETKF.radius``) is 1.82 times it (DAPPER's ``tools/localization.py``)
DAPPER_GC = 1.82



def _letkf() -> LETKF:
    """DAPPER's ``LETKF(loc_rad=4)`` on the Lorenz-96 ring, one local analysis per site."""
    return LETKF(radius=DAPPER_GC * 4, period=40.0)


#: (id, system, scheme, N_ens, inflation, rotate, lag, DAPPER's documented rmse.a or None;
#: the LETKF's 0.22 is with DAPPER's batches of 2 sites, "_b1" rows analyse each site)
CONFIGS: list[tuple[str, str, Callable[[], Any], int, Any, bool, int, float | None]] = [
    ("L63_R2_Sqrt_N3_i1.30", "l63", ETKF, 3, 1.30, False, 0, 0.80),
    ("L63_R2_Sqrt_N10_i1.02_rot", "l63", ETKF, 10, 1.02, True, 0, 0.60),
    ("L63_R2_Sqrt_N10_i1.02_norot", "l63", ETKF, 10, 1.02, False, 0, None),
    ("L63_R2_PertObs_N10_i1.04", "l63", EnKF, 10, 1.04, False, 0, 0.65),
    ("L63_R2_PertObs_N100_i1.01", "l63", EnKF, 100, 1.01, False, 0, 0.56),
    ("L63_R2_Sqrt_N10_adaptive_rot", "l63", ETKF, 10, "adaptive", True, 0, None),
    ("L63_R2_Sqrt_N10_i1.02_rot_lag2", "l63", ETKF, 10, 1.02, True, 2, None),
    # the reading of Sakov et al. (2012): unit observation noise (the paper: 2)
    ("L63_R1_Sqrt_N3_i1.30", "l63u", ETKF, 3, 1.30, False, 0, None),
    ("L63_R1_Sqrt_N10_i1.02_rot", "l63u", ETKF, 10, 1.02, True, 0, None),
    ("L63_R1_PertObs_N10_i1.04", "l63u", EnKF, 10, 1.04, False, 0, None),
    ("L96_PertObs_N40_i1.06", "l96", EnKF, 40, 1.06, False, 0, 0.22),
    ("L96_PertObs_N28_i1.08", "l96", EnKF, 28, 1.08, False, 0, 0.24),
    ("L96_Sqrt_N24_i1.013_rot", "l96", ETKF, 24, 1.013, True, 0, 0.18),
    ("L96_Sqrt_N24_i1.013_norot", "l96", ETKF, 24, 1.013, False, 0, None),
    ("L96_Sqrt_N40_i1.01_rot", "l96", ETKF, 40, 1.01, True, 0, None),
    ("L96_Sqrt_N40_i1.01_norot", "l96", ETKF, 40, 1.01, False, 0, None),
    ("L96_Sqrt_N24_adaptive_rot", "l96", ETKF, 24, "adaptive", True, 0, None),
    ("L96_LETKF_N7_i1.04_rot_r4_b1", "l96", _letkf, 7, 1.04, True, 0, 0.22),
    ("L96_LETKF_N10_i1.04_norot_r4_b1", "l96", _letkf, 10, 1.04, False, 0, None),
    ("L96_LETKF_N10_adaptive_rot_r4_b1", "l96", _letkf, 10, "adaptive", True, 0, None),
]


def _system(name: str, device: str) -> tuple[Any, dict, dict]:
    """The model, its settings and the twin keywords of one system."""
    if name in ("l63", "l63u"):
        s = SAKOV2012_L63 if name == "l63" else {**SAKOV2012_L63, "noise_std": 1.0}
        dt_obs = s["dt"] * s["steps_per_obs"]
        model = Lorenz63(t_obs=[dt_obs], solver=RK4(dt=s["dt"]), device=device)
        return model, s, {"x0": s["x0"], "parameters": s["parameters"], "dt_obs": dt_obs}
    s = SAKOV2008_L96
    dt_obs = s["dt"] * s["steps_per_obs"]
    model = Lorenz96(t_obs=[dt_obs], n_sites=s["n_sites"], solver=RK4(dt=s["dt"]),
                     device=device)
    x0 = [s["forcing"]] * s["n_sites"]
    x0[0] += 0.01
    return model, s, {"x0": x0, "parameters": [s["forcing"]], "dt_obs": dt_obs}


def run_config(cfg: tuple, *, cycles: int, seeds: int, burn_in: int, device: str) -> dict:
    name, system, scheme, n, infl, rotate, lag, _ = cfg
    model, s, kw = _system(system, device)
    twin = twin_experiment(model, n_cycles=cycles, noise_std=s["noise_std"],
                           initial_std=s["initial_std"], n_members=n, spin_up=s["spin_up"],
                           n_experiments=seeds, seed=2026, **kw)
    inflation = AdaptiveInflation() if infl == "adaptive" else infl
    flt = EnsembleFilter(model, scheme(), noise_std=s["noise_std"], inflation=inflation,
                         rotate=rotate, lag=lag, parameters=kw["parameters"], seed=1)
    init = twin.initial if seeds > 1 else twin.initial
    t0 = time.perf_counter()
    res = run_filter(flt, flt.init(init.to(device)), twin.times, twin.values.to(device))
    wall = time.perf_counter() - t0
    truth = twin.truth.to(device)
    scores = res.scores(truth, burn_in=burn_in)
    # each experiment's time average: one above the observation noise has lost the truth
    # (a filter divergence, the rare event marginal inflations risk in long runs)
    per = rmse(res.analysis_mean, truth)[burn_in:]
    per = per.mean(dim=0).reshape(-1).tolist() if per.ndim > 1 else [float(per.mean())]
    kept = [v for v in per if v < s["noise_std"]]
    out = {"id": name, "cycles": cycles, "seeds": seeds, "burn_in": burn_in,
           "rmse_a": scores["analysis"].mean, "rmse_a_ci": scores["analysis"].half_width,
           "rmse_f": scores["forecast"].mean, "spread_a": scores["spread"].mean,
           "wall_s": wall, "failed": int(res.n_failed.sum()), "per_experiment": per,
           "diverged": len(per) - len(kept),
           "rmse_a_tracking": sum(kept) / len(kept) if kept else float("nan")}
    if "smoothed" in scores:
        out["rmse_s"] = scores["smoothed"].mean
    return out


def batch_timing(*, n_filters: int, cycles: int, device: str) -> dict:
    """``n_filters`` L96 ETKF filters as one batch against the same filters one by one."""
    model, s, kw = _system("l96", device)
    twin = twin_experiment(model, n_cycles=cycles, noise_std=1.0, initial_std=s["initial_std"],
                           n_members=24, spin_up=s["spin_up"], n_experiments=n_filters,
                           seed=7, **kw)
    flt = EnsembleFilter(model, ETKF(), noise_std=1.0, inflation=1.02,
                         parameters=kw["parameters"])
    x0, ys = twin.initial.to(device), twin.values.to(device)

    def batch() -> None:
        run_filter(flt, flt.init(x0), twin.times, ys)

    def loop() -> None:
        for b in range(n_filters):
            run_filter(flt, flt.init(x0[b]), twin.times, ys[:, b])

    times = {}
    for label, fn in (("batch", batch), ("loop", loop)):
        runs = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            if device != "cpu":
                torch.cuda.synchronize()
            runs.append(time.perf_counter() - t0)
        times[label] = statistics.median(runs)
    return {"n_filters": n_filters, "cycles": cycles, "batch_s": times["batch"],
            "loop_s": times["loop"], "speedup": times["loop"] / times["batch"]}


def _peers() -> dict[str, dict]:
    if not PEERS.exists():
        return {}
    return {r["id"]: r for r in json.loads(PEERS.read_text())}


def _row(r: dict, documented: float | None, peer: dict | None) -> str:
    dap = peer.get("rmse_a_mean") if peer else None
    cells = [f"{r['id']:<30}", f"{documented:>6.2f}" if documented else f"{'-':>6}",
             f"{dap:>6.3f}" if dap else f"{'-':>6}",
             f"{r['rmse_a']:>6.3f} ± {r['rmse_a_ci']:.3f}",
             f"{r['rmse_a'] / documented:>5.2f}" if documented else f"{'-':>5}",
             f"{r['rmse_a'] / dap:>5.2f}" if dap else f"{'-':>5}",
             f"{r['spread_a']:>6.3f}", f"{r.get('rmse_s', float('nan')):>6.3f}",
             f"{r['diverged']:>2}/{r['seeds']:<2} {r['rmse_a_tracking']:>6.3f}",
             f"{r['wall_s']:>6.1f}"]
    return " ".join(cells)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cycles", type=int, default=20000)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--burn-in", type=int, default=None,
                   help="cycles left out of the averages (default: a tenth)")
    p.add_argument("--only", choices=("l63", "l63u", "l96"), default=None)
    p.add_argument("--select", default=None, metavar="REGEX",
                   help="only the configurations whose id matches REGEX")
    p.add_argument("--batch", type=int, default=16, help="filters in the batch timing")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="a few hundred cycles")
    p.add_argument("--json", default=None, help="also write the record to this file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cycles = 300 if args.quick else args.cycles
    burn_in = args.burn_in if args.burn_in is not None else cycles // 10
    peers = _peers()
    print(f"{'configuration':<30} {'doc':>6} {'DAPPER':>6} {'enkal rmse.a':>15} "
          f"{'/doc':>5} {'/DAP':>5} {'spread':>6} {'smooth':>6} {'lost':>5} {'rest':>6} "
          f"{'wall s':>6}")
    rows = []
    for cfg in CONFIGS:
        if args.only and cfg[1] != args.only or \
                args.select and not re.search(args.select, cfg[0]):
            continue
        r = run_config(cfg, cycles=cycles, seeds=args.seeds, burn_in=burn_in,
                       device=args.device)
        r["documented"] = cfg[7]
        peer = peers.get(cfg[0])
        r["dapper"] = peer.get("rmse_a_mean") if peer else None
        rows.append(r)
        print(_row(r, cfg[7], peer), flush=True)
    timing = batch_timing(n_filters=args.batch, cycles=50 if args.quick else 300,
                          device=args.device)
    print(f"\n{timing['n_filters']} L96 ETKF filters x {timing['cycles']} cycles: one batch "
          f"{timing['batch_s']:.2f} s, one by one {timing['loop_s']:.2f} s "
          f"({timing['speedup']:.1f}x)")
    emit({"bench": "filtering", "env": environment(), "device": args.device, "rows": rows,
          "batch": timing}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
