r"""Scale out and scale up: forwards on a Dask cluster, and the memory-bounded update.

Two measurements, printed as tables and as one ``BENCH_JSON {...}`` line at the end.

1. **Forwards on Dask.** ``E`` members (64) of a black-box simulator costing about
   ``--cost`` seconds each (0.05: ``time.sleep`` plus a little numpy work, a module-level
   function, wrapped per member with ``CallableModel(batched=False, numpy=True)``). Wall time
   of ``InProcess().evaluate`` against ``Dask(n_workers=W).evaluate`` on a LocalCluster of
   ``W`` (2) single-threaded worker processes, warm (the workers have imported torch and
   enkal), median of ``--repeats``. For each task size:

   * speedup = in-process wall / Dask wall;
   * ideal = in-process wall / W (perfect division of the members over the workers; with
     ``ceil`` for uneven task counts: ``ceil(n_tasks / W) * members_per_task`` members'
     time);
   * per-task overhead = (Dask wall - ideal) / n_tasks: submission, serialisation of the
     model and the parameters, scheduling, the worker-side ``enkal.evaluate`` and gathering.

2. **The memory-bounded update** of ``P`` (10^7) float32 parameters and ``E`` (64) members
   (2.56 GB), from ``M`` (100) observations, each path in a *fresh* subprocess so the peak is
   its own:

   * ``inplace``  ``assimilate(X, Y, obs, out=X, chunk_size=k)`` (the memory-bounded path);
   * ``alloc``    ``assimilate(X, Y, obs)`` (a new ``(E, P)`` result).

   Peak extra memory is the growth of the peak resident set (``VmHWM`` in
   ``/proc/self/status``, reset after setup by writing 5 to ``/proc/self/clear_refs``; where
   that is refused the peak after setup is the baseline) over the resident set before the
   call. ``tracemalloc`` is also reported but only sees Python/numpy allocations, not
   torch's: it is there to show no numpy copy is made, not to measure the update. Target:
   the in-place path's peak extra at most 1.5x the ensemble's own size.

Run ``python bench/scale.py`` (about a minute and 6 GB of memory at the defaults), or
``python bench/scale.py --quick`` (16 members of 20 ms, P = 10^5: seconds).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time

import numpy as np
from _common import emit

RATIO_TARGET = 1.5


# -- the simulator (module level, so worker processes can unpickle it) -----------------------

def simulator(theta: np.ndarray, cost: float = 0.05) -> np.ndarray:
    """A stand-in black-box simulator: ``cost`` seconds of waiting plus a small decay
    integration; ``(N_par,) -> (8,)``."""
    time.sleep(cost * 0.9)
    t = np.linspace(0.0, 1.0, 200)
    rates = np.abs(theta[:4]) + 0.1
    traj = np.exp(-np.outer(t, rates)) @ np.ones(4)
    return np.interp(np.linspace(0.0, 1.0, 8), t, traj)


def _make_model(n_par: int, cost: float):
    import functools

    from enkal import CallableModel

    return CallableModel(functools.partial(simulator, cost=cost), parameters=n_par,
                         output_size=8, batched=False, numpy=True)


def _bench_forwards(members: int, cost: float, workers: int, task_sizes: list[int | None],
                    repeats: int) -> dict:
    import torch

    from enkal.executors import Dask, InProcess

    model = _make_model(4, cost)
    x = torch.randn(members, 4, generator=torch.Generator().manual_seed(0),
                    dtype=torch.float64)

    def wall(fn) -> float:
        samples = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
        return statistics.median(samples)

    ref = InProcess().evaluate(model, x)
    inproc = wall(lambda: InProcess().evaluate(model, x))
    rows = []
    t0 = time.perf_counter()
    with Dask(n_workers=workers) as ex:
        start_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        y, ok = ex.evaluate(model, x)  # warm-up: workers import torch and enkal
        warmup_s = time.perf_counter() - t0
        assert torch.equal(y, ref[0]) and bool(ok.all()), "Dask result differs from in-process"
        for k in task_sizes:
            run = Dask(ex.connect(), members_per_task=k)
            per_task = k or math.ceil(members / (2 * workers))
            n_tasks = math.ceil(members / per_task)
            dask_wall = wall(lambda run=run: run.evaluate(model, x))
            ideal = math.ceil(n_tasks / workers) * per_task * inproc / members
            rows.append({
                "members_per_task": per_task, "default": k is None, "n_tasks": n_tasks,
                "dask_s": dask_wall, "ideal_s": ideal, "speedup": inproc / dask_wall,
                "overhead_per_task_ms": 1e3 * (dask_wall - ideal) / n_tasks,
            })
    return {"members": members, "cost_s": cost, "workers": workers, "inprocess_s": inproc,
            "cluster_start_s": start_s, "warmup_s": warmup_s, "rows": rows}


# -- the update's memory, one path per fresh subprocess ------------------------------------------

def _status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _memory_child(mode: str, n_par: int, members: int, n_obs: int, chunk: int) -> dict:
    import tracemalloc

    import torch

    from enkal import Observations, assimilate

    g = torch.Generator().manual_seed(0)
    x = torch.randn(members, n_par, generator=g, dtype=torch.float32)
    y = torch.randn(members, n_obs, generator=g, dtype=torch.float32)
    obs = Observations(torch.zeros(n_obs, dtype=torch.float64), noise_std=1.0)
    # load the kernels and BLAS on something tiny first
    assimilate(x[:, :128].clone(), y, obs, out=None, chunk_size=64)
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # reset VmHWM to the current RSS
        reset = True
    except OSError:
        reset = False
    base_kb = _status_kb("VmRSS") if reset else max(_status_kb("VmHWM"), _status_kb("VmRSS"))
    tracemalloc.start()
    t0 = time.perf_counter()
    if mode == "inplace":
        result = assimilate(x, y, obs, out=x, chunk_size=chunk)
        assert result is x
    elif mode == "alloc":
        result = assimilate(x, y, obs)
    else:
        raise ValueError(mode)
    seconds = time.perf_counter() - t0
    traced_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    peak_kb = _status_kb("VmHWM")
    ensemble = x.numel() * x.element_size()
    extra = (peak_kb - base_kb) * 1024
    assert bool(torch.isfinite(result[:, :1000]).all())
    return {"mode": mode, "P": n_par, "E": members, "M": n_obs, "chunk_size": chunk,
            "ensemble_bytes": ensemble, "peak_extra_bytes": extra,
            "peak_extra_over_ensemble": extra / ensemble, "tracemalloc_peak_bytes": traced_peak,
            "hwm_reset": reset, "seconds": seconds, "threads": torch.get_num_threads()}


def _bench_memory(n_par: int, members: int, n_obs: int, chunk: int,
                  env: dict[str, str]) -> list[dict]:
    out = []
    for mode in ("inplace", "alloc"):
        proc = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--_memory-child", mode, str(n_par),
             str(members), str(n_obs), str(chunk)],
            capture_output=True, text=True, check=False, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"memory child {mode} failed:\n{proc.stderr[-3000:]}")
        out.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return out


# -- main -----------------------------------------------------------------------------------------

def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/scale.py", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="16 members of 20 ms, P = 1e5: a few seconds")
    p.add_argument("--members", type=int, default=None, help="ensemble size E (64)")
    p.add_argument("--cost", type=float, default=None, help="seconds per member (0.05)")
    p.add_argument("--workers", type=int, default=2, help="Dask worker processes (2)")
    p.add_argument("--task-sizes", type=int, nargs="*", default=None,
                   help="members per task besides the default (4 8)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats (3; 2 quick)")
    p.add_argument("--P", type=float, default=None, help="parameters of the update (1e7)")
    p.add_argument("--M", type=int, default=100, help="observations of the update (100)")
    p.add_argument("--chunk-size", type=int, default=65536,
                   help="parameter columns per block of the in-place update (65536)")
    p.add_argument("--no-dask", action="store_true", help="skip the forwards on Dask")
    p.add_argument("--no-memory", action="store_true", help="skip the update's memory")
    p.add_argument("--json", metavar="PATH", default=None, help="also write the record here")
    p.add_argument("--_memory-child", nargs=5, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.members = args.members or (16 if args.quick else 64)
    args.cost = args.cost if args.cost is not None else (0.02 if args.quick else 0.05)
    args.repeats = args.repeats or (2 if args.quick else 3)
    args.P = int(args.P or (1e5 if args.quick else 1e7))
    if args.task_sizes is None:
        args.task_sizes = [2] if args.quick else [4, 8]
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args._memory_child is not None:
        mode, n_par, members, n_obs, chunk = args._memory_child
        print(json.dumps(_memory_child(mode, int(n_par), int(members), int(n_obs),
                                       int(chunk))))
        return 0

    # a LocalCluster's nannies set OMP_NUM_THREADS=1 (and friends) in *this* process's
    # environment (distributed's pre-spawn-environ): the memory children get the original
    env = dict(os.environ)

    import torch

    import enkal

    print(f"enkal {enkal.__version__}, torch {torch.__version__}, numpy {np.__version__}, "
          f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}")
    record: dict = {"bench": "scale", "enkal": enkal.__version__, "torch": torch.__version__,
                    "machine": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "quick": args.quick}

    if not args.no_memory:
        mem = _bench_memory(args.P, args.members if args.quick else 64, args.M,
                            args.chunk_size, env)
        record["update"] = mem
        size = mem[0]["ensemble_bytes"]
        print(f"\nupdate: P = {args.P:.3g} float32, E = {mem[0]['E']}, M = {args.M} "
              f"(ensemble {size / 1e9:.3g} GB), each path in a fresh process")
        print(f"  {'path':>8} {'seconds':>8} {'peak extra GB':>14} {'/ ensemble':>11} "
              f"{'tracemalloc MB':>15}")
        for r in mem:
            print(f"  {r['mode']:>8} {r['seconds']:>8.2f} {r['peak_extra_bytes'] / 1e9:>14.3f} "
                  f"{r['peak_extra_over_ensemble']:>11.3f} "
                  f"{r['tracemalloc_peak_bytes'] / 1e6:>15.3f}")
        inplace = mem[0]
        record["inplace_peak_over_ensemble"] = inplace["peak_extra_over_ensemble"]
        record["inplace_seconds"] = inplace["seconds"]
        record["inplace_within_target"] = inplace["peak_extra_over_ensemble"] <= RATIO_TARGET
        print(f"  in-place target: peak extra <= {RATIO_TARGET}x the ensemble: "
              f"{'met' if record['inplace_within_target'] else 'MISSED'}")

    if not args.no_dask:
        try:
            import distributed  # noqa: F401
        except ImportError:
            print('distributed not installed (pip install "enkal[dask]"): forwards skipped')
        else:
            fw = _bench_forwards(args.members, args.cost, args.workers,
                                 [None, *args.task_sizes], args.repeats)
            record["forwards"] = fw
            print(f"\nforwards: {fw['members']} members x {1e3 * fw['cost_s']:.0f} ms, "
                  f"{fw['workers']} Dask workers (cluster start {fw['cluster_start_s']:.1f} s, "
                  f"first call {fw['warmup_s']:.1f} s), median of {args.repeats}")
            print(f"  in-process: {fw['inprocess_s']:.2f} s")
            print(f"  {'per task':>9} {'tasks':>6} {'dask s':>8} {'ideal s':>8} "
                  f"{'speedup':>8} {'overhead/task ms':>17}")
            for r in fw["rows"]:
                tag = " (default)" if r["default"] else ""
                print(f"  {r['members_per_task']:>9} {r['n_tasks']:>6} {r['dask_s']:>8.2f} "
                      f"{r['ideal_s']:>8.2f} {r['speedup']:>8.2f} "
                      f"{r['overhead_per_task_ms']:>17.1f}{tag}")
            default = next(r for r in fw["rows"] if r["default"])
            record["speedup"] = default["speedup"]
            record["overhead_per_task_ms"] = default["overhead_per_task_ms"]

    emit(record, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
