"""What storing the history costs next to the update itself.

A 64-member x 60,000-parameter float32 ensemble is updated 50 times (``enkal.assimilate``,
square root, M = 2000 observations of a linear model that observes the first M parameters);
after each update the ensemble is appended to a history file with ``HistoryWriter`` and a
checkpoint is written. For each storage option the script reports the append time per
iteration as a fraction of the update's time, the file size against the raw array bytes,
and the time to read everything back. The target: storage adds at most 10% to an
iteration (the update alone; a real iteration also runs the forward model, so the real
fraction is smaller).

    python bench/storage.py [--members 64] [--parameters 60000] [--iterations 50]
                            [--observations 2000] [--dir /tmp] [--quick]

Prints a table and one line ``BENCH_JSON {...}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch

import enkal
from enkal import storage

OPTIONS = [
    # name, History kwargs, writer fsync
    ("none", {}, False),
    ("none+fsync", {}, True),
    ("every=10", {"every": 10}, False),
    ("lzf", {"compression": "lzf"}, False),
    ("gzip-1", {"compression": "gzip", "compression_level": 1}, False),
    ("gzip-4", {"compression": "gzip", "compression_level": 4}, False),
]


def _update_setup(e: int, p: int, m: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(e, p, generator=g, dtype=torch.float32)
    truth = torch.randn(p, generator=g, dtype=torch.float32)
    obs = enkal.Observations(truth[:m].double() + 0.1 * torch.randn(m, generator=g,
                                                                    dtype=torch.float64),
                             noise_std=0.1)
    return x, obs


def _forward(x: torch.Tensor, m: int) -> torch.Tensor:
    return x[:, :m].contiguous()  # a linear model observing the first M parameters


def run_option(name, history_kw, fsync, args, directory: Path) -> dict:
    e, p, m, n = args.members, args.parameters, args.observations, args.iterations
    x, obs = _update_setup(e, p, m)
    layout = enkal.ParameterLayout.flat(p)
    smoother = enkal.EnsembleSmoother(obs, schedule=enkal.ESMDA.constant(n), seed=0)
    path = directory / f"history-{name}.h5"
    ckpt = directory / f"checkpoint-{name}.h5"
    writer = storage.HistoryWriter(path, layout=layout, observations=obs,
                                   config=smoother.config(), fsync=fsync,
                                   history=storage.History(**history_kw))
    t0 = time.perf_counter()
    writer.append(0, x)
    first = time.perf_counter() - t0
    update_s, append_s, ckpt_s, raw_s = [], [], [], []
    raw_path = directory / f"raw-{name}.bin"
    raw_file = raw_path.open("wb")
    state = smoother.init(x)
    for k in range(1, n + 1):
        t0 = time.perf_counter()
        x = enkal.assimilate(x, _forward(x, m), obs, alpha=float(n))
        update_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        writer.append(k, x, {"alpha": float(n), "n_failed": 0}, final=k == n)
        append_s.append(time.perf_counter() - t0)
        if name == "none":  # the floor: the same bytes appended to a plain binary file
            t0 = time.perf_counter()
            raw_file.write(memoryview(x.numpy()).cast("B"))
            raw_file.flush()
            raw_s.append(time.perf_counter() - t0)
        if name == "none":  # the checkpoint does not depend on the history options
            state = enkal.SmootherState(parameters=x, iteration=k, schedule=state.schedule,
                                        rng_state=state.rng_state)
            t0 = time.perf_counter()
            storage.write_checkpoint(ckpt, smoother, state, fsync=False)
            ckpt_s.append(time.perf_counter() - t0)
    writer.close()
    raw_file.close()
    raw_path.unlink()
    size = path.stat().st_size
    raw = (n + 1) * e * p * 4
    t0 = time.perf_counter()
    with storage.open(path) as ds:
        values = ds.parameters.values
    read_all = time.perf_counter() - t0
    assert values.shape == (n + 1, e, p) and np.array_equal(values[-1], x.numpy())
    t0 = time.perf_counter()
    with h5py.File(path, "r") as f:
        f["parameters"][n // 2]
    read_row = time.perf_counter() - t0
    del values
    out = {
        "option": name,
        "update_ms": 1e3 * statistics.median(update_s),
        "append_ms": 1e3 * statistics.median(append_s),
        "append_ms_mean": 1e3 * statistics.fmean(append_s),
        "first_row_ms": 1e3 * first,
        # each append is timed right after its update, so the two see the same machine
        # load: the median of the per-iteration ratios is robust on a shared machine
        "fraction": statistics.median(a / u for a, u in zip(append_s, update_s, strict=True)),
        "fraction_best": min(append_s) / min(update_s),
        "fraction_total": sum(append_s) / sum(update_s),
        "size_over_raw": size / raw,
        "file_mb": size / 2**20,
        "read_all_s": read_all,
        "read_row_ms": 1e3 * read_row,
    }
    if raw_s:
        out["raw_write_ms"] = 1e3 * statistics.median(raw_s)
        out["raw_fraction"] = statistics.median(
            r / u for r, u in zip(raw_s, update_s, strict=True))
    if ckpt_s:
        out["checkpoint_ms"] = 1e3 * statistics.median(ckpt_s)
        t0 = time.perf_counter()
        storage.write_checkpoint(ckpt, smoother, state, fsync=True)
        out["checkpoint_fsync_ms"] = 1e3 * (time.perf_counter() - t0)
        t0 = time.perf_counter()
        storage.read_checkpoint(ckpt, smoother)
        out["checkpoint_read_ms"] = 1e3 * (time.perf_counter() - t0)
    path.unlink()
    if ckpt.exists():
        ckpt.unlink()
    return out


def run_overhead(args, directory: Path, repeats: int = 3) -> dict:
    """Wall time of whole ``EnsembleSmoother.run`` calls: no store, store written in the
    foreground, store written in a background thread (the default), checkpoints included.

    The model is a cheap linear map (a forward costs next to nothing), so this is the worst
    case for storage: an iteration is only the update."""
    e, p, m, n = args.members, args.parameters, args.observations, min(args.iterations, 20)
    x, obs = _update_setup(e, p, m)
    model = enkal.CallableModel(lambda z: _forward(z, m), parameters=p, output_size=m,
                                dtype=torch.float32)
    smoother = enkal.EnsembleSmoother(obs, rule=enkal.PerturbedObservations(),
                                      schedule=enkal.FixedAnnealing(initial=1.0, floor=1.0))
    modes = {"no store": {}, "store": {"background_io": False},
             "store, background": {"background_io": True},
             "store, ckpt every 10": {"background_io": False, "checkpoint_every": 10}}
    times: dict[str, list[float]] = {k: [] for k in modes}
    for rep in range(repeats):
        for name, kw in modes.items():  # interleaved, so load drifts hit every mode alike
            store = directory / f"run-{rep}-{name.replace(' ', '').replace(',', '')}.h5"
            kwargs = dict(kw, store=store) if kw else {}
            t0 = time.perf_counter()
            smoother.run(model, x, max_iterations=n, **kwargs)
            times[name].append((time.perf_counter() - t0) / n * 1e3)
            for f in directory.glob("run-*"):
                f.unlink()
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["no store"]
    return {"iterations": n, "repeats": repeats,
            "ms_per_iteration": {k: round(v, 2) for k, v in med.items()},
            "overhead": {k: round(v / base - 1, 4) for k, v in med.items() if k != "no store"}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=64)
    parser.add_argument("--parameters", type=int, default=60_000)
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--observations", type=int, default=2000)
    parser.add_argument("--dir", type=Path, default=None,
                        help="where the files go (default: a temporary directory)")
    parser.add_argument("--quick", action="store_true", help="only the default option")
    args = parser.parse_args()
    directory = Path(tempfile.mkdtemp(prefix="enkal-bench-", dir=args.dir))
    options = OPTIONS[:1] if args.quick else OPTIONS
    rows = []
    try:
        for name, kw, fsync in options:
            rows.append(run_option(name, kw, fsync, args, directory))
        whole = run_overhead(args, directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    e, p, m, n = args.members, args.parameters, args.observations, args.iterations
    print(f"history of a {e} x {p} float32 ensemble, {n} iterations, update with M = {m} "
          f"(torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.machine()}, {os.cpu_count()} cpus)")
    head = (f"{'option':<12}{'update ms':>10}{'append ms':>10}{'append/upd':>11}{'best':>7}"
            f"{'total':>7}"
            f"{'size/raw':>9}{'file MB':>9}{'read all s':>11}{'read row ms':>12}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['option']:<12}{r['update_ms']:>10.1f}{r['append_ms']:>10.1f}"
              f"{r['fraction']:>11.1%}{r['fraction_best']:>7.1%}{r['fraction_total']:>7.1%}"
              f"{r['size_over_raw']:>9.3f}{r['file_mb']:>9.0f}"
              f"{r['read_all_s']:>11.2f}{r['read_row_ms']:>12.1f}")
    base = rows[0]
    print("update/append ms: medians over the iterations; append/upd: median of the "
          "per-iteration ratios; best: fastest append / fastest update (the estimate for an "
          "idle machine); total: all appends / all updates (amortised, for every=10)")
    print(f"floor: the same bytes appended to a plain binary file take "
          f"{base['raw_write_ms']:.1f} ms ({base['raw_fraction']:.1%} of an update)")
    print(f"checkpoint: write {base['checkpoint_ms']:.1f} ms ({base['checkpoint_ms'] / base['update_ms']:.1%}"
          f" of an update), with fsync {base['checkpoint_fsync_ms']:.1f} ms, read "
          f"{base['checkpoint_read_ms']:.1f} ms")
    met_median = base["fraction"] <= 0.10
    met_best = base["fraction_best"] <= 0.10
    print(f"target (default option, append <= 10% of an update): "
          f"{'met' if met_median else 'missed'} by the median per-iteration ratio "
          f"({base['fraction']:.1%}), {'met' if met_best else 'missed'} against the fastest "
          f"update ({base['fraction_best']:.1%}); the plain-file floor is "
          f"{base['raw_fraction']:.1%}")
    print(f"\nwhole runs ({whole['iterations']} iterations, median of {whole['repeats']}; history "
          "row + checkpoint every iteration):")
    for k, v in whole["ms_per_iteration"].items():
        extra = f"  (+{whole['overhead'][k]:.1%})" if k in whole["overhead"] else ""
        print(f"  {k:<24}{v:>9.1f} ms / iteration{extra}")
    default = whole["overhead"]["store"]
    print(f"  run's default (history row + checkpoint every iteration, foreground) adds "
          f"{default:.1%}; target <= 10%: {'met' if default <= 0.10 else 'missed'}")
    print("BENCH_JSON " + json.dumps({
        "run_overhead": whole,
        "bench": "storage", "members": e, "parameters": p, "observations": m,
        "iterations": n, "dtype": "float32", "threads": torch.get_num_threads(),
        "results": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}
                    for r in rows],
        "target_fraction": 0.10, "default_fraction": round(base["fraction"], 4),
        "default_fraction_best": round(base["fraction_best"], 4),
        "target_met": met_median and met_best, "target_met_median": met_median,
        "target_met_best": met_best,
    }))


if __name__ == "__main__":
    main()
