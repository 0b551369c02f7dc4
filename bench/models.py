r"""Time one ensemble forward of each simulator in ``enkal.models`` at E = 1, 64, 1024 members.

The models are vectorised over members (the members are the batch dimension; only the time
loop, or the event loop, is a Python loop), so the cost of a forward should grow far slower
than ``E``: the target is ``t(E=1024) / t(E=1) <= 20`` (a Python loop over members would
give ~1024). The sizes are those of a small inverse problem:

* ODEs (RK4 unless named): Lorenz-63 observed every 0.1 for 2 time units with dt = 0.01
  (also with Dormand-Prince, rtol 1e-6); Lorenz-96 with 40 sites and scalar forcing, every
  0.05 for 1 time unit, dt = 0.01; SIR daily for 20 days, dt = 0.1; Lotka-Volterra every 0.5
  for 10 time units, dt = 0.02.
* SDEs (Euler-Maruyama, dt = 0.01, every 0.1 for 2 time units): Ornstein-Uhlenbeck,
  geometric Brownian motion, stochastic Lorenz-63.
* Jump processes: birth-death (birth 10, death 1) every time unit for 10 units, by SSA and by
  tau-leaping (tau = 0.05); stochastic SIR (N = 200, 5 infected) daily for 10 days by SSA;
  stochastic Lotka-Volterra (Wilkinson's rates, from (50, 100)) every 0.1 for 1 time unit by
  SSA and by tau-leaping (tau = 0.01).

Members are drawn log-normally around the nominal parameters (5% spread, fixed seed), so
adaptive steps and event counts differ between members as in a real ensemble (an SSA sweep
lasts as long as the busiest member, so its ratio includes that). Each timing is the median of
``--repeats`` calls after one warm-up, sizes interleaved within each repeat so that the ratio is
robust to the load of a shared machine.

Threads: one by default. The ops of one step are small (``E x d`` elements), and on a loaded
machine torch's intra-op threads mostly wait for each other: on the shared 2-core development
box, with a load average of 5, two threads made some E=1024 forwards 20-50x slower than one
thread (Lorenz-96: 9.6 s against 0.17 s) while one thread kept every ratio below 7. Pass
``--threads 0`` for torch's default on a machine of your own.

Run ``python bench/models.py [--quick] [--threads N]``. The last line is ``BENCH_JSON {...}``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch
from _common import emit

from enkal.models import (
    RK4,
    SIR,
    BirthDeath,
    DormandPrince,
    GeometricBrownianMotion,
    Lorenz63,
    Lorenz96,
    LotkaVolterra,
    OrnsteinUhlenbeck,
    StochasticLorenz63,
    StochasticLotkaVolterra,
    StochasticSIR,
    TauLeaping,
)

TARGET_RATIO = 20.0
SIZES = (1, 64, 1024)


def _grid(step: float, stop: float) -> list[float]:
    n = round(stop / step)
    return [round(step * (i + 1), 12) for i in range(n)]


def cases() -> list[tuple[str, Callable[[], object], list[float]]]:
    """``(name, model factory, nominal physical parameters)``."""
    t2 = _grid(0.1, 2.0)
    lv_rates = [1.0, 0.005, 0.6, 0.005]
    return [
        ("Lorenz63 RK4", lambda: Lorenz63(t2, solver=RK4(dt=0.01)), [10.0, 28.0, 8 / 3]),
        ("Lorenz63 DormandPrince", lambda: Lorenz63(t2, solver=DormandPrince(rtol=1e-6)),
         [10.0, 28.0, 8 / 3]),
        ("Lorenz96 N=40", lambda: Lorenz96(_grid(0.05, 1.0), n_sites=40), [8.0]),
        ("SIR", lambda: SIR(_grid(1.0, 20.0), solver=RK4(dt=0.1)), [0.5, 0.1]),
        ("LotkaVolterra", lambda: LotkaVolterra(_grid(0.5, 10.0), solver=RK4(dt=0.02)),
         [1.1, 0.4, 0.4, 0.1]),
        ("OrnsteinUhlenbeck EM", lambda: OrnsteinUhlenbeck(t2, dt=0.01), [1.0, 0.5, 0.7]),
        ("GeometricBM EM", lambda: GeometricBrownianMotion(t2, dt=0.01), [0.1, 0.3]),
        ("StochasticLorenz63 EM", lambda: StochasticLorenz63(t2, dt=0.01), [10.0, 28.0, 8 / 3]),
        ("BirthDeath SSA", lambda: BirthDeath(_grid(1.0, 10.0)), [10.0, 1.0]),
        ("BirthDeath tau-leap", lambda: BirthDeath(_grid(1.0, 10.0),
                                                   solver=TauLeaping(tau=0.05)), [10.0, 1.0]),
        ("StochasticSIR SSA", lambda: StochasticSIR(_grid(1.0, 10.0), population=200,
                                                    infected=5), [1.5, 0.5]),
        ("StochasticLV SSA", lambda: StochasticLotkaVolterra(_grid(0.1, 1.0)), lv_rates),
        ("StochasticLV tau-leap", lambda: StochasticLotkaVolterra(
            _grid(0.1, 1.0), solver=TauLeaping(tau=0.01)), lv_rates),
    ]


def _members(nominal: list[float], n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.tensor(nominal, dtype=torch.float64)
    z = torch.randn(n, len(nominal), generator=g, dtype=torch.float64)
    return base * torch.exp(0.05 * z)


def _time(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def run(repeats: int, sizes: tuple[int, ...], only: str | None) -> list[dict]:
    rows = []
    for name, factory, nominal in cases():
        if only and only.lower() not in name.lower():
            continue
        model = factory()
        thetas = {e: _members(nominal, e) for e in sizes}
        for e in sizes:  # warm-up
            model(thetas[e])
        times: dict[int, list[float]] = {e: [] for e in sizes}
        for _ in range(repeats):
            for e in sizes:
                times[e].append(_time(lambda m=model, x=thetas[e]: m(x)))
        med = {e: statistics.median(v) for e, v in times.items()}
        ratio = med[sizes[-1]] / med[sizes[0]]
        rows.append({"model": name, "n_obs": model.output_size,
                     "seconds": {str(e): med[e] for e in sizes}, "ratio": ratio,
                     "ok": ratio <= TARGET_RATIO})
    return rows


def _table(rows: list[dict], sizes: tuple[int, ...]) -> str:
    head = f"{'model':<24}{'N_obs':>6}" + "".join(f"{'E=' + str(e) + ' ms':>12}" for e in sizes)
    head += f"{'ratio':>8}{'us/member':>11}  verdict"
    lines = [head, "-" * len(head)]
    for r in rows:
        s = r["seconds"]
        per = s[str(sizes[-1])] / sizes[-1] * 1e6
        lines.append(
            f"{r['model']:<24}{r['n_obs']:>6}"
            + "".join(f"{s[str(e)] * 1e3:>12.2f}" for e in sizes)
            + f"{r['ratio']:>8.1f}{per:>11.1f}  {'ok' if r['ok'] else 'SLOW'}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/models.py", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="E in (1, 64) only, 1 repeat")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats (median), default 5")
    p.add_argument("--threads", type=int, default=1,
                   help="torch.set_num_threads; 0 keeps torch's default (default 1: see above)")
    p.add_argument("--only", default=None, help="run the models whose name contains this")
    args = p.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    sizes = (1, 64) if args.quick else SIZES
    repeats = 1 if args.quick else args.repeats
    rows = run(repeats, sizes, args.only)
    print(f"enkal.models forward cost, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s), float64 CPU, median of {repeats}")
    print(_table(rows, sizes))
    all_ok = all(r["ok"] for r in rows)
    print(f"target t(E={sizes[-1]}) / t(E={sizes[0]}) <= {TARGET_RATIO:g}: "
          f"{'met by every model' if all_ok else 'MISSED by ' + ', '.join(r['model'] for r in rows if not r['ok'])}")
    payload = {"bench": "models", "torch": torch.__version__, "python": platform.python_version(),
               "threads": torch.get_num_threads(), "repeats": repeats, "sizes": list(sizes),
               "target_ratio": TARGET_RATIO, "all_ok": all_ok, "results": rows}
    emit(payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
