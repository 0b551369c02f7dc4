"""What storing the history costs next to an iteration: the update alone, and a full one.

The ensemble is a LeNet-5 (the seed paper's Fashion-MNIST net: 61,706 parameters, about the
issue's 60,000) with 64 members, float32. A realistic iteration is

* the forward: every member classifies a minibatch of 256 28x28 images (64 x 256 image
  forwards through ``torch.func.functional_call`` + ``vmap``; the net is defined here), the
  2,560 logits are the predictions;
* the update (``enkal.assimilate``, square root, M = 2,560 observations);
* storage: the history row (which holds the whole state: the ensemble, the generator and
  schedule state and a checksum, so that ``enkal.run(..., resume=history)`` needs no second file) and,
  where asked for, a separate checkpoint file.

Part 1 (per option, 50 iterations): after each update the ensemble is appended with
``HistoryWriter.record``; the append time is reported as a fraction of the update (the strict
measure) and of a full iteration (update + the median forward, measured in the same run: what
the target "storage adds at most 10% to an iteration" means); file size against the raw
array bytes, and the time to read everything back. Part 2: whole ``EnsembleSmoother.run``
calls with the LeNet forward, without storage, with ``store=`` and its default checkpoint
policy (the history is the checkpoint), with ``checkpoint=True`` (a second file every
iteration, the previous default) and in a background thread, medians of interleaved repeats.
Part 3: the same runs with a linear model (an iteration is only the update: the worst case).

    python bench/storage.py [--members 64] [--iterations 50] [--batch 256] [--runs 6]
                            [--repeats 3] [--dir /tmp] [--quick]

Prints tables and one line ``BENCH_JSON {...}``.
"""

from __future__ import annotations

import argparse
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
import torch.nn.functional as F
from _common import emit
from torch import nn

import enkal
from enkal import storage

OPTIONS = [
    # name, History kwargs, writer fsync, rows hold the state
    ("default", {}, False, True),
    ("no state", {}, False, False),
    ("fsync", {}, True, True),
    ("every=10", {"every": 10}, False, True),
    ("lzf", {"compression": "lzf"}, False, True),
    ("gzip-1", {"compression": "gzip", "compression_level": 1}, False, True),
]


# -- the forward: LeNet-5 on a Fashion-MNIST-sized minibatch, for every member --------------
class LeNet5(nn.Module):
    """LeNet-5 for 28x28 inputs (conv1 pads by 2): 61,706 parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(400, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.fc1(x.flatten(1)))
        return self.fc3(F.relu(self.fc2(x)))


class EnsembleForward:
    """``(N_ens, N_par)`` flat parameters -> ``(N_ens, batch * 10)`` logits of one
    minibatch, all members at once (``vmap`` over ``functional_call``)."""

    def __init__(self, batch: int, seed: int = 0) -> None:
        self.net = LeNet5()
        self.names = [n for n, _ in self.net.named_parameters()]
        self.shapes = [p.shape for _, p in self.net.named_parameters()]
        self.sizes = [p.numel() for _, p in self.net.named_parameters()]
        self.size = sum(self.sizes)
        g = torch.Generator().manual_seed(seed)
        self.images = torch.rand(batch, 1, 28, 28, generator=g)  # a stand-in minibatch
        self.output_size = batch * 10

        def one(flat: torch.Tensor) -> torch.Tensor:
            parts = torch.split(flat, self.sizes)
            params = {n: p.view(s) for n, p, s in zip(self.names, parts, self.shapes,
                                                       strict=True)}
            return torch.func.functional_call(self.net, params, (self.images,)).reshape(-1)

        self._batched = torch.func.vmap(one)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self._batched(x)

    def prior(self, n_members: int, seed: int = 1) -> torch.Tensor:
        """Members drawn around PyTorch's default initialisation scale."""
        g = torch.Generator().manual_seed(seed)
        return 0.1 * torch.randn(n_members, self.size, generator=g)


def _observations(m: int, seed: int = 2) -> enkal.Observations:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (m // 10,), generator=g)
    y = F.one_hot(labels, 10).to(torch.float64).reshape(-1) * 5.0  # target logits
    return enkal.Observations(y, noise_std=1.0)


def _median_ms(values) -> float:
    return 1e3 * statistics.median(values)


# -- part 1: the history appends, per option ------------------------------------------------
def run_option(name, history_kw, fsync, with_state, args, directory: Path, fwd) -> dict:
    e, n = args.members, args.iterations
    p, m = fwd.size, fwd.output_size
    obs = _observations(m)
    x = fwd.prior(e)
    layout = enkal.ParameterLayout.flat(p)
    smoother = enkal.EnsembleSmoother(obs, schedule=enkal.ESMDA.constant(n), seed=0)
    path = directory / f"history-{name}.h5"
    ckpt = directory / f"checkpoint-{name}.h5"
    writer = storage.HistoryWriter(path, layout=layout, observations=obs,
                                   config=smoother.config(), fsync=fsync,
                                   history=storage.History(**history_kw))
    state = smoother.init(x)
    t0 = time.perf_counter()
    writer.start(state) if with_state else writer.append(0, x)
    first = time.perf_counter() - t0
    update_s, append_s, ckpt_s, raw_s = [], [], [], []
    raw_path = directory / f"raw-{name}.bin"
    raw_file = raw_path.open("wb")
    # the update's cost depends on E, N_par and M only: a stand-in for the LeNet
    # predictions (the first M parameters) keeps part 1 short; the forward is timed apart
    for k in range(1, n + 1):
        t0 = time.perf_counter()
        x = enkal.assimilate(x, x[:, :m].contiguous(), obs, alpha=float(n))
        update_s.append(time.perf_counter() - t0)
        state = enkal.SmootherState(parameters=x, iteration=k,
                                    schedule=enkal.schedule.ESMDAState(k),
                                    rng_state=state.rng_state)
        info = {"alpha": float(n), "n_failed": 0}
        t0 = time.perf_counter()
        if with_state:
            writer.record(state, info, final=k == n)
        else:
            writer.append(k, x, info, final=k == n)
        append_s.append(time.perf_counter() - t0)
        if name == "default":  # the floor: the same bytes appended to a plain binary file
            t0 = time.perf_counter()
            raw_file.write(memoryview(x.numpy()).cast("B"))
            raw_file.flush()
            raw_s.append(time.perf_counter() - t0)
            # a separate checkpoint file (checkpoint=True / a path), as run writes it
            t0 = time.perf_counter()
            storage.write_checkpoint(ckpt, smoother, state, fsync=False)
            ckpt_s.append(time.perf_counter() - t0)
    writer.close()
    raw_file.close()
    raw_path.unlink()
    size = path.stat().st_size
    kept = sum(1 for k in range(n + 1) if writer.history.keeps(k, final=k == n))
    raw = kept * e * p * 4
    t0 = time.perf_counter()
    with storage.open(path) as ds:
        values = ds.parameters.values
    read_all = time.perf_counter() - t0
    assert values.shape == (n + 1, e, p) and np.array_equal(values[-1], x.numpy())
    del values
    t0 = time.perf_counter()
    with h5py.File(path, "r") as f:
        f["parameters"][n]
    read_row = time.perf_counter() - t0
    out = {
        "option": name, "rows_hold_state": with_state,
        "update_ms": _median_ms(update_s), "append_ms": _median_ms(append_s),
        "append_ms_mean": 1e3 * statistics.fmean(append_s), "first_row_ms": 1e3 * first,
        # each append is timed right after its update, so the two see the same machine
        # load: the median of the per-iteration ratios is robust on a shared machine
        "of_update": statistics.median(a / u for a, u in zip(append_s, update_s, strict=True)),
        "of_update_total": sum(append_s) / sum(update_s),
        "size_over_raw": size / raw, "file_mb": size / 2**20,
        "read_all_s": read_all, "read_row_ms": 1e3 * read_row,
    }
    if with_state:
        t0 = time.perf_counter()
        storage.read_state(path, smoother)
        out["resume_read_ms"] = 1e3 * (time.perf_counter() - t0)
    if raw_s:
        out["raw_write_ms"] = _median_ms(raw_s)
        out["raw_of_update"] = statistics.median(
            r / u for r, u in zip(raw_s, update_s, strict=True))
        out["checkpoint_ms"] = _median_ms(ckpt_s)
        out["checkpoint_of_update"] = statistics.median(
            c / u for c, u in zip(ckpt_s, update_s, strict=True))
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


# -- parts 2 and 3: whole runs ----------------------------------------------------------------
MODES = {
    "no store": {},
    "store (history = checkpoint)": {"store": True},
    "store + checkpoint file/iter": {"store": True, "checkpoint": True},
    "store, background": {"store": True, "background_io": True},
}


def run_overhead(model, prior, obs, n: int, repeats: int, directory: Path) -> dict:
    """Median ms per iteration of whole ``run`` calls per mode (interleaved repeats, so
    load drifts on a shared machine hit every mode alike), and the overhead against no
    store. Runs with ``store`` include the checkpoint file written at the start and the
    end (amortised over ``n`` iterations)."""
    smoother = enkal.EnsembleSmoother(obs, rule=enkal.PerturbedObservations(),
                                      schedule=enkal.FixedAnnealing(initial=1.0, floor=1.0))
    times: dict[str, list[float]] = {k: [] for k in MODES}
    for rep in range(repeats):
        for name, kw in MODES.items():
            kwargs = dict(kw)
            if kwargs.pop("store", False):
                kwargs["store"] = directory / f"run-{rep}-{len(times[name])}.h5"
            t0 = time.perf_counter()
            enkal.run(smoother, model, prior, max_iterations=n, **kwargs)
            times[name].append((time.perf_counter() - t0) / n * 1e3)
            for f in directory.glob("run-*"):
                f.unlink()
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["no store"]
    return {"iterations": n, "repeats": repeats,
            "ms_per_iteration": {k: round(v, 2) for k, v in med.items()},
            # (max - min) / median of the repeats: the noise a difference must beat
            "spread": {k: round((max(v) - min(v)) / med[k], 4) for k, v in times.items()},
            "overhead": {k: round(v / base - 1, 4) for k, v in med.items() if k != "no store"}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=64)
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--runs", type=int, default=6, help="iterations of each whole run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--forwards", type=int, default=7, help="forwards timed (median)")
    parser.add_argument("--dir", type=Path, default=None,
                        help="where the files go (default: a temporary directory)")
    parser.add_argument("--quick", action="store_true",
                        help="the default option only, fewer iterations and repeats")
    args = parser.parse_args()
    if args.quick:
        args.iterations, args.runs, args.repeats, args.forwards = 10, 3, 1, 3
    directory = Path(tempfile.mkdtemp(prefix="enkal-bench-", dir=args.dir))
    fwd = EnsembleForward(args.batch)
    e, p, m = args.members, fwd.size, fwd.output_size
    prior = fwd.prior(e)
    forward_s = []
    for _ in range(args.forwards):
        t0 = time.perf_counter()
        fwd(prior)
        forward_s.append(time.perf_counter() - t0)
    forward_ms = _median_ms(forward_s)
    options = OPTIONS[:1] if args.quick else OPTIONS
    rows = []
    try:
        for name, kw, fsync, with_state in options:
            rows.append(run_option(name, kw, fsync, with_state, args, directory, fwd))
        obs = _observations(m)
        lenet = enkal.CallableModel(fwd, parameters=p, output_size=m, dtype=torch.float32)
        whole = run_overhead(lenet, prior, obs, args.runs, args.repeats, directory)
        linear = enkal.CallableModel(lambda z: z[:, :m].contiguous(), parameters=p,
                                     output_size=m, dtype=torch.float32)
        strict = run_overhead(linear, prior, obs, max(args.runs, 10), args.repeats, directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    for r in rows:
        r["of_iteration"] = r["append_ms"] / (r["update_ms"] + forward_ms)
    base = rows[0]
    base["checkpoint_of_iteration"] = base["checkpoint_ms"] / (base["update_ms"] + forward_ms)
    base["raw_of_iteration"] = base["raw_write_ms"] / (base["update_ms"] + forward_ms)

    print(f"LeNet-5 ensemble: {e} members x {p} float32 parameters, {args.iterations} "
          f"iterations; forward = {e} x {args.batch} images, M = {m} outputs "
          f"(torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.machine()}, {os.cpu_count()} cpus)")
    print(f"forward {forward_ms:.0f} ms (median of {args.forwards}), update "
          f"{base['update_ms']:.1f} ms: a full iteration is about "
          f"{forward_ms + base['update_ms']:.0f} ms")
    head = (f"{'option':<10}{'upd ms':>8}{'append':>8}{'of upd':>8}{'of iter':>8}"
            f"{'size/raw':>9}{'file MB':>8}{'read all s':>11}{'row ms':>8}{'resume ms':>10}")
    print("\nhistory appends (append: median ms; of upd: median per-iteration ratio to the "
          "update; of iter: to update + forward)")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['option']:<10}{r['update_ms']:>8.1f}{r['append_ms']:>8.1f}"
              f"{r['of_update']:>8.1%}{r['of_iteration']:>8.2%}{r['size_over_raw']:>9.3f}"
              f"{r['file_mb']:>8.0f}{r['read_all_s']:>11.2f}{r['read_row_ms']:>8.1f}"
              f"{r.get('resume_read_ms', float('nan')):>10.1f}")
    print("size/raw: file bytes / bytes of the kept ensembles; resume ms: "
          "storage.read_state of the last row (checks included)")
    print(f"floor: the same bytes appended to a plain binary file take "
          f"{base['raw_write_ms']:.1f} ms ({base['raw_of_update']:.1%} of an update, "
          f"{base['raw_of_iteration']:.2%} of an iteration)")
    print(f"separate checkpoint file (checkpoint=True or a path): write "
          f"{base['checkpoint_ms']:.1f} ms ({base['checkpoint_of_update']:.1%} of an update, "
          f"{base['checkpoint_of_iteration']:.2%} of an iteration), with fsync "
          f"{base['checkpoint_fsync_ms']:.1f} ms, read {base['checkpoint_read_ms']:.1f} ms")
    for title, res in (("LeNet forward", whole), ("linear model: the update alone", strict)):
        print(f"\nwhole runs, {title} ({res['iterations']} iterations, median of "
              f"{res['repeats']}; store includes the start and end checkpoint files):")
        for k, v in res["ms_per_iteration"].items():
            extra = f"  ({res['overhead'][k]:+.1%})" if k in res["overhead"] else "         "
            print(f"  {k:<30}{v:>9.1f} ms / iteration{extra}   repeats spread "
                  f"{res['spread'][k]:.0%}")
    store_key = "store (history = checkpoint)"
    met_iteration = base["of_iteration"] <= 0.10
    met_update = base["of_update"] <= 0.10
    met_runs = whole["overhead"][store_key] <= 0.10
    print(f"\ntarget (storage adds <= 10% to an iteration): per iteration "
          f"{'met' if met_iteration else 'missed'} for a full iteration (append "
          f"{base['of_iteration']:.2%}); against the update alone "
          f"{'met' if met_update else 'missed'} ({base['of_update']:.1%}; the plain-file "
          f"floor is {base['raw_of_update']:.1%}); whole runs "
          f"{whole['overhead'][store_key]:+.1%} ({'met' if met_runs else 'missed'}; compare "
          f"with the repeats' spread of {whole['spread']['no store']:.0%})")
    emit({
        "bench": "storage", "members": e, "parameters": p, "observations": m,
        "batch": args.batch, "iterations": args.iterations, "dtype": "float32",
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "forward_ms": forward_ms, "results": rows,
        "run_overhead_lenet": whole, "run_overhead_update_only": strict,
        "target_fraction": 0.10, "target_met_iteration": met_iteration,
        "target_met_update": met_update, "target_met_whole_runs": met_runs,
    })


if __name__ == "__main__":
    main()
