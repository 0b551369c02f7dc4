r"""The network learner on common networks (issue #15): AdamW, enkal's defaults and the hybrid
on seven architecture x dataset pairs.

Pairs (``--pairs``: names or prefixes such as ``digits`` or ``digits/cnn``):

* ``digits/cnn-tanh-avg``: ``cnn(nn.Tanh, nn.AvgPool2d)``, conv 16 - conv 32 - linear with
  tanh and average pooling (6090 parameters);
* ``digits/cnn-relu-max``: ``cnn()``, the same with ReLU and max pooling (6090);
* ``digits/gap-relu``: ``gap_cnn()``, two ReLU convolutions, global average pooling (5130);
* ``digits/mlp-relu``: ``mlp([64, 32, 10])`` (2410);
* ``digits/mlp-gelu-ln``: ``mlp([64, 128, 64, 10], activation=nn.GELU, layer_norm=True)``
  (17610);
* ``fashion/lenet5``: ``LeNet5()``, tanh and average pooling (61706);
* ``fashion/lenet-relu-max``: ``LeNet5(activation=nn.ReLU, pool=nn.MaxPool2d)`` (61706).

One more pair runs only when named in full (it is not one of the seven the issue's targets
judge): ``digits/cnn-relu-bn``, ``cnn(norm=nn.BatchNorm2d)``, the ReLU CNN with BatchNorm
after each convolution, trained in training mode (6186; ``docs/nn.md`` 3).

Digits: scikit-learn's 8x8 digits (1437 training, 360 test images, flat and standardised;
the convolutional networks reshape them), batch 64, 20 epochs. Fashion: Fashion-MNIST
(60000 / 10000), batch 256, 3 epochs. The architectures are in ``enkal.models.nn``.

Methods (``--methods``, comma separated, default ``adamw,enkal,hybrid``):

* ``adamw``: ``torch.optim.AdamW(net.parameters())`` with its defaults, cross-entropy;
* ``enkal``: ``enkal.EnsembleKalmanOptimizer(net, ensemble_size=E, seed=seed)`` and nothing
  else: the library's defaults, not even told the run's length (that is the point of the
  issue: the defaults must serve any common network); when the defaults change, this
  benchmark follows;
* ``hybrid``: ``enkal.HybridOptimizer(EnsembleKalmanOptimizer(...the same...),
  AdamW(...defaults...), loss_fn=cross_entropy)``.

``--dtype bfloat16`` gives the ensemble optimizers ``dtype=torch.bfloat16`` (members stored
in bfloat16, the mean, the forward and the update in float32; issue #16's low-precision
ensembles); AdamW stays in float32. Runs are keyed by it, so float32 and bfloat16 runs share
a ``runs.jsonl`` (bfloat16 runs recorded before commit 3de152a ran the forward in bfloat16
too: keep them in another ``--out``).

For each seed the network's initialisation (``torch.manual_seed(seed)`` right before building
it), the split and the minibatch order (a ``randperm`` per epoch from
``torch.Generator().manual_seed(1000 + seed)``) are the same for every method. After every
epoch the test accuracy of the model is measured by plain user code, ``net(x).argmax(1)``
(the ensemble optimizers write the ensemble mean into ``net``); epoch 0 is before training.
Wall time counts training steps only.

Targets (with enkal's defaults, ``E = 64``, the default epochs, the full data, median of 3
seeds; a verdict is printed only for that configuration, otherwise ``n/a`` with the reason):

* every pair: enkal's final test accuracy within 3 points of AdamW's at equal epochs (at most
  0.03 below; above counts as within);
* ``fashion/lenet5``: enkal >= 0.81.

``--reach E1 E2 ...`` (enkal only) also trains at each ``E`` in increasing order, per pair,
until the median final accuracy reaches AdamW's median final, and reports the smallest such
``E`` ("not reached up to E_max" otherwise; larger ``E`` are not run once one reaches).

Cost on one thread (an estimate from the step times of ``docs/nn.md`` and ``--quick``): a
Fashion-MNIST run of enkal or hybrid is 705 steps of ~1.2 s, ~15 min, so the two fashion
pairs take ~3 h for 3 seeds; the five digits pairs ~15 min together.

Results are kept run by run: each finished run (pair, method, seed, ``E``, epochs, batch,
training / test set sizes and, for enkal and hybrid, the defaults' ``repr``) is appended as
one JSON line to ``OUT/runs.jsonl`` (flushed and fsynced), and a later invocation with the
same ``--out`` does not train it again (it prints ``cached``): the full suite takes hours on
two cores and can be run in pieces (``--pairs digits``, then ``--pairs fashion/lenet5``...,
one process per piece), interrupted and resumed. Runs made with other enkal defaults are kept
in the file but not used. ``--report-only`` builds the tables and the figure from
``runs.jsonl`` without training (what is missing is listed): run it with every pair at the
end. Failed runs are reported and not recorded (the next invocation retries them).

Outputs in ``--out`` (default ``bench_out/nn_suite/``; with ``--quick``
``bench_out/nn_suite/quick/``): ``runs.jsonl``; ``nn_suite.md``, the report also printed:
per pair and method the final accuracy median [min, max] over seeds, the gap to AdamW's
median in points and whether it is within 3 points, a per-epoch table of medians, the reach
table, the machine; ``nn_suite.png``, one panel per pair, test accuracy per epoch (median
line, min-max band per method). ``--train-subset N`` / ``--test-subset N`` use the first
``N`` images of a fixed permutation (as ``bench/nn_training.py``): such runs are labelled
``SUBSET`` everywhere and never judged against the targets.

Run ``python bench/nn_suite.py [--pairs digits fashion/lenet5 ...] [--methods
adamw,enkal,hybrid] [--seeds 0 1 2] [--ensemble 64] [--reach 16 32 64 128] [--epochs N]
[--train-subset N] [--test-subset N] [--threads 1] [--out DIR] [--json PATH] [--report-only]
[--quick]``. ``--quick`` (the digits pairs, 2 epochs, seed 0, 256 training / 200 test
images) is a smoke check of well under a minute on one thread. Threads: one by default (the
shared 2-core development machine); ``--threads 0`` keeps torch's default. The last line is
``BENCH_JSON {...}`` (``bench/_common.emit``).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, astuple, dataclass, fields
from pathlib import Path

import torch
from _common import accuracy, emit, environment
from torch import nn

import enkal
from enkal.models.nn import LeNet5, cnn, gap_cnn, mlp

METHODS = ("adamw", "enkal", "hybrid")
METHOD_COLORS = {"adamw": "C0", "enkal": "C1", "hybrid": "C2"}
WITHIN_POINTS = 3.0
LENET_PAIR, LENET_TARGET = "fashion/lenet5", 0.81
TARGET_ENSEMBLE, TARGET_SEEDS = 64, 3
PROGRESS_EVERY_S = 30.0  # a training run prints an epoch line at most this often
QUICK = {"epochs": 2, "train_subset": 256, "test_subset": 200}
RUNS_FILE, REPORT_FILE, FIGURE_FILE = "runs.jsonl", "nn_suite.md", "nn_suite.png"


@dataclass(frozen=True)
class Dataset:
    batch: int
    epochs: int
    n_train: int
    n_test: int


DATASETS = {"digits": Dataset(batch=64, epochs=20, n_train=1437, n_test=360),
            "fashion": Dataset(batch=256, epochs=3, n_train=60000, n_test=10000)}


@dataclass(frozen=True)
class Pair:
    name: str  # "<dataset>/<architecture>"
    code: str  # how the network is built (for the reader)
    build: Callable[[], nn.Module]

    @property
    def dataset(self) -> str:
        return self.name.split("/")[0]


PAIRS = {p.name: p for p in (
    Pair("digits/cnn-tanh-avg", "cnn(nn.Tanh, nn.AvgPool2d)",
         functools.partial(cnn, nn.Tanh, nn.AvgPool2d)),
    Pair("digits/cnn-relu-max", "cnn()", cnn),
    Pair("digits/gap-relu", "gap_cnn()", gap_cnn),
    Pair("digits/mlp-relu", "mlp([64, 32, 10])", functools.partial(mlp, [64, 32, 10])),
    Pair("digits/mlp-gelu-ln", "mlp([64, 128, 64, 10], activation=nn.GELU, layer_norm=True)",
         functools.partial(mlp, [64, 128, 64, 10], activation=nn.GELU, layer_norm=True)),
    Pair("fashion/lenet5", "LeNet5()", LeNet5),
    Pair("fashion/lenet-relu-max", "LeNet5(activation=nn.ReLU, pool=nn.MaxPool2d)",
         functools.partial(LeNet5, activation=nn.ReLU, pool=nn.MaxPool2d)),
)}
#: Pairs selected only by their full name, outside the targets' seven.
EXTRA_PAIRS = {p.name: p for p in (
    Pair("digits/cnn-relu-bn", "cnn(norm=nn.BatchNorm2d)",
         functools.partial(cnn, norm=nn.BatchNorm2d)),
)}
ALL_PAIRS = {**PAIRS, **EXTRA_PAIRS}


@functools.cache
def n_parameters(pair: str) -> int:
    return sum(p.numel() for p in ALL_PAIRS[pair].build().parameters())


# -- what a run is --------------------------------------------------------------------------
@dataclass(frozen=True)
class Spec:
    """Everything that decides a run's result: its key in ``runs.jsonl``."""

    pair: str
    method: str
    seed: int
    ensemble: int | None  # None for adamw
    epochs: int
    batch: int
    n_train: int
    n_test: int
    defaults: str | None  # repr of enkal's defaults (enkal, hybrid); None for adamw
    dtype: str = "float32"  # of the ensemble optimizers; float32 for adamw

    @property
    def subset(self) -> bool:
        full = DATASETS[ALL_PAIRS[self.pair].dataset]
        return self.n_train < full.n_train or self.n_test < full.n_test

    def label(self) -> str:
        e = f" E={self.ensemble}" if self.ensemble is not None else ""
        d = f" {self.dtype}" if self.dtype != "float32" else ""
        return f"{self.pair} {self.method}{e}{d} seed {self.seed}"


SPEC_FIELDS = tuple(f.name for f in fields(Spec))


@dataclass(frozen=True)
class Settings:
    """The invocation's choices that enter a run's key (besides pair, method, seed, E)."""

    epochs: int | None
    train_subset: int | None
    test_subset: int | None
    defaults: str
    dtype: str = "float32"

    def spec(self, pair: str, method: str, seed: int, ensemble: int) -> Spec:
        ds = DATASETS[ALL_PAIRS[pair].dataset]
        return Spec(pair=pair, method=method, seed=seed,
                    ensemble=None if method == "adamw" else ensemble,
                    epochs=self.epochs or ds.epochs, batch=ds.batch,
                    n_train=min(self.train_subset or ds.n_train, ds.n_train),
                    n_test=min(self.test_subset or ds.n_test, ds.n_test),
                    defaults=None if method == "adamw" else self.defaults,
                    dtype="float32" if method == "adamw" else self.dtype)


def enkal_defaults() -> str:
    """``repr`` of an optimizer built with every default, without the run-specific ``N_ens``,
    ``N_par`` and ``seed`` (and any memory address): the defaults' identity in a run's key."""
    text = repr(enkal.EnsembleKalmanOptimizer(nn.Linear(2, 2)))
    text = re.sub(r"\b(N_ens|N_par|seed)=\d+, |, (N_ens|N_par|seed)=\d+(?=\))", "", text)
    return re.sub(r" at 0x[0-9a-fA-F]+", "", text)


def enkal_commit() -> str | None:
    """The commit of the enkal checkout that runs (``-dirty`` with local changes in
    ``enkal/``), for the record; ``None`` outside a git checkout."""
    root = Path(enkal.__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10, check=True)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "enkal"],
                               capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


# -- runs.jsonl -----------------------------------------------------------------------------
def read_runs(path: Path) -> dict[tuple, dict]:
    """The finished runs in ``path`` by key (the first of duplicates); unreadable lines (a
    run killed while writing) are skipped with a note."""
    runs: dict[tuple, dict] = {}
    if not path.exists():
        return runs
    bad = 0
    with open(path) as fh:
        for line in fh:
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                rec.setdefault("dtype", "float32")  # runs recorded before --dtype
                key = tuple(rec[f] for f in SPEC_FIELDS)
            except (json.JSONDecodeError, KeyError, TypeError):
                bad += 1
                continue
            runs.setdefault(key, rec)
    if bad:
        print(f"# note: {bad} unreadable line(s) in {path} skipped", flush=True)
    return runs


def append_run(path: Path, rec: dict) -> None:
    """Append one run as one JSON line in one write (``O_APPEND``), flushed and fsynced: a
    kill loses at most the run being written."""
    data = (json.dumps(rec, separators=(",", ":")) + "\n").encode()
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":  # a torn last line stays alone
            data = b"\n" + data
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


# -- data -----------------------------------------------------------------------------------
Data = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


@functools.cache
def load(dataset: str, n_train: int, n_test: int) -> Data:
    """Training and test sets; smaller sizes are the first images of a fixed permutation
    (the same subsets as ``bench/nn_training.py``)."""
    from enkal.problems import datasets

    data = datasets.load_digits() if dataset == "digits" else datasets.load_fashion_mnist()
    xtr, ytr, xte, yte = data.train_inputs, data.train_labels, data.test_inputs, data.test_labels
    g = torch.Generator().manual_seed(12345)
    if n_train < xtr.shape[0]:
        idx = torch.randperm(xtr.shape[0], generator=g)[:n_train]
        xtr, ytr = xtr[idx], ytr[idx]
    if n_test < xte.shape[0]:
        idx = torch.randperm(xte.shape[0], generator=g)[:n_test]
        xte, yte = xte[idx], yte[idx]
    return xtr, ytr, xte, yte


def setup(pair: str, seed: int, threads: int) -> tuple[nn.Module, Data, Dataset]:
    """For the suite's measuring devices (``bench/nn_oracle.py``, ``nn_activity.py``,
    ``nn_diagnose.py``):
    ``threads`` intra-op threads (0: torch's default), the pair's whole data set and its
    network as :func:`train` initialises it for ``seed``."""
    if threads > 0:
        torch.set_num_threads(threads)
    pair_ = ALL_PAIRS[pair]
    ds = DATASETS[pair_.dataset]
    data = load(pair_.dataset, ds.n_train, ds.n_test)
    torch.manual_seed(seed)
    return pair_.build(), data, ds


def epochs(n_train: int, batch: int, seed: int, n_epochs: int
           ) -> Iterator[tuple[int, tuple[torch.Tensor, ...]]]:
    """The suite's minibatch order, the same for every method and measuring device: per
    epoch (numbered from 1) the indices of a ``randperm`` of the training set from
    ``torch.Generator().manual_seed(1000 + seed)``, in consecutive blocks of ``batch``."""
    order = torch.Generator().manual_seed(1000 + seed)
    for epoch in range(1, n_epochs + 1):
        yield epoch, torch.randperm(n_train, generator=order).split(batch)


# -- one training run -----------------------------------------------------------------------
def make_step(method: str, net: nn.Module, ensemble: int | None, seed: int,
              dtype: str = "float32") -> Callable[[torch.Tensor, torch.Tensor], object]:
    loss_fn = nn.functional.cross_entropy
    if method == "adamw":
        opt = torch.optim.AdamW(net.parameters())

        def step(x: torch.Tensor, y: torch.Tensor) -> None:
            opt.zero_grad(set_to_none=True)
            loss_fn(net(x), y).backward()
            opt.step()
        return step
    kw = {} if dtype == "float32" else {"dtype": getattr(torch, dtype)}
    kalman = enkal.EnsembleKalmanOptimizer(net, ensemble_size=ensemble, seed=seed, **kw)
    if method == "enkal":
        return kalman.step
    if method == "hybrid":  # step(x, y) -> (loss, StepInfo)
        return enkal.HybridOptimizer(kalman, torch.optim.AdamW(net.parameters()),
                                     loss_fn=loss_fn).step
    raise ValueError(f"method: expected one of {METHODS}, got {method!r}")


class Progress:
    """A line at most every ``PROGRESS_EVERY_S`` seconds while a run trains (a Fashion-MNIST
    epoch of enkal takes many minutes on one thread)."""

    def __init__(self, spec: Spec, steps_per_epoch: int) -> None:
        self.spec, self.steps_per_epoch = spec, steps_per_epoch
        self.last = time.perf_counter()

    def __call__(self, epoch: int, steps_done: int, train_s: float, acc: float | None) -> None:
        if time.perf_counter() - self.last < PROGRESS_EVERY_S:
            return
        self.last = time.perf_counter()
        where = (f"epoch {epoch} done: test acc {acc:.4f}" if acc is not None
                 else f"epoch {epoch}, step {steps_done}/{self.steps_per_epoch}")
        print(f"  {self.spec.label()}: {where}, train {train_s:.1f} s", flush=True)


def train(spec: Spec, commit: str | None) -> dict:
    """Train one network with one method; the record appended to ``runs.jsonl``."""
    xtr, ytr, xte, yte = load(ALL_PAIRS[spec.pair].dataset, spec.n_train, spec.n_test)
    if (xtr.shape[0], xte.shape[0]) != (spec.n_train, spec.n_test):
        raise RuntimeError(f"{spec.pair}: the data has {xtr.shape[0]} training / "
                           f"{xte.shape[0]} test images, the suite expected {spec.n_train} / "
                           f"{spec.n_test} (DATASETS is out of date)")
    torch.manual_seed(spec.seed)
    net = ALL_PAIRS[spec.pair].build()
    step = make_step(spec.method, net, spec.ensemble, spec.seed, spec.dtype)
    progress = Progress(spec, math.ceil(spec.n_train / spec.batch))
    acc, wall, step_times = [accuracy(net, xte, yte)], [0.0], []
    for epoch, minibatches in epochs(spec.n_train, spec.batch, spec.seed, spec.epochs):
        for k, idx in enumerate(minibatches, start=1):
            x, y = xtr[idx], ytr[idx]
            t = time.perf_counter()
            step(x, y)
            step_times.append(time.perf_counter() - t)
            progress(epoch, k, sum(step_times), None)
        wall.append(sum(step_times))
        acc.append(accuracy(net, xte, yte))
        progress(epoch, 0, wall[-1], acc[-1])
    return {**asdict(spec), "subset": spec.subset, "n_par": n_parameters(spec.pair),
            "accuracy": acc, "wall_s": wall, "steps": len(step_times),
            "step_s_median": statistics.median(step_times), **environment(),
            "enkal_commit": commit, "load_average": os.getloadavg()[0],
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


class Store:
    """The runs of ``OUT/runs.jsonl``: returns a run from there, or trains and appends it
    (unless ``report_only``), counting what it did."""

    def __init__(self, path: Path, *, report_only: bool, commit: str | None) -> None:
        self.path, self.report_only, self.commit = path, report_only, commit
        self.runs = read_runs(path)
        self.counts = {"trained": 0, "cached": 0, "missing": 0, "failed": 0}
        self.missing: dict[tuple, list[int]] = {}  # (pair, method, E) -> seeds
        self.failed: list[str] = []
        self.used: dict[tuple, dict] = {}  # the runs this invocation reports

    def get(self, spec: Spec) -> dict | None:
        key = astuple(spec)
        if key in self.used:  # asked again (the reach table's AdamW): already counted
            return self.used[key]
        if key in self.runs:
            if not self.report_only:
                print(f"cached  {spec.label()}: final {self.runs[key]['accuracy'][-1]:.4f}",
                      flush=True)
            self.counts["cached"] += 1
            self.used[key] = self.runs[key]
            return self.runs[key]
        if self.report_only:
            seeds = self.missing.setdefault((spec.pair, spec.method, spec.ensemble), [])
            if spec.seed not in seeds:
                self.counts["missing"] += 1
                seeds.append(spec.seed)
            return None
        return self._train(spec, key)

    def _train(self, spec: Spec, key: tuple) -> dict | None:
        try:
            rec = train(spec, self.commit)
        except Exception as err:  # one failed run must not stop hours of others
            print(f"FAILED  {spec.label()}: {type(err).__name__}: {err}", flush=True)
            traceback.print_exc(limit=3)
            self.counts["failed"] += 1
            self.failed.append(f"{spec.label()}: {type(err).__name__}: {err}")
            return None
        append_run(self.path, rec)
        self.runs[key] = self.used[key] = rec
        self.counts["trained"] += 1
        print(f"trained {spec.label()}: final {rec['accuracy'][-1]:.4f} (epoch 0 "
              f"{rec['accuracy'][0]:.4f}), train {rec['wall_s'][-1]:.1f} s, step median "
              f"{rec['step_s_median']:.4f} s", flush=True)
        return rec

    def other_defaults(self, defaults: str) -> dict[str, int]:
        """Runs in the file made with other enkal defaults (not used): count by defaults."""
        out: dict[str, int] = {}
        for rec in self.runs.values():
            if rec["defaults"] is not None and rec["defaults"] != defaults:
                out[rec["defaults"]] = out.get(rec["defaults"], 0) + 1
        return out


# -- the suite ------------------------------------------------------------------------------
def run_main(store: Store, settings: Settings, args: argparse.Namespace) -> dict:
    """``{pair: {method: [runs over seeds]}}`` at ``--ensemble``; seed-major order, so an
    interrupted piece leaves comparable methods."""
    results: dict[str, dict[str, list[dict]]] = {}
    for pair in args.pairs:
        results[pair] = {m: [] for m in args.methods}
        for seed in args.seeds:
            for method in args.methods:
                rec = store.get(settings.spec(pair, method, seed, args.ensemble))
                if rec is not None:
                    results[pair][method].append(rec)
    return results


def final_median(runs: list[dict]) -> float | None:
    return statistics.median(r["accuracy"][-1] for r in runs) if runs else None


def run_reach(store: Store, settings: Settings, args: argparse.Namespace) -> list[dict]:
    """Per pair: enkal at each ``E`` of ``--reach`` in increasing order until the median
    final accuracy reaches AdamW's median final."""
    rows = []
    for pair in args.pairs:
        adamw = [r for s in args.seeds
                 if (r := store.get(settings.spec(pair, "adamw", s, 0))) is not None]
        target = final_median(adamw) if len(adamw) == len(args.seeds) else None
        cells: dict[int, float | None] = {}
        reached = None
        for e in args.reach:
            if reached is not None:
                break
            runs = [r for s in args.seeds
                    if (r := store.get(settings.spec(pair, "enkal", s, e))) is not None]
            cells[e] = final_median(runs) if len(runs) == len(args.seeds) else None
            if target is not None and cells[e] is not None and cells[e] >= target:
                reached = e
        rows.append({"pair": pair, "adamw": target, "enkal_by_ensemble": cells,
                     "reached_at": reached})
    return rows


# -- summaries ------------------------------------------------------------------------------
def paired_gaps(runs: list[dict], reference: list[dict]) -> dict | None:
    """Final accuracy minus the reference's on the same seed (same initialisation and
    batches), in points, over the seeds both have: the gaps, their median and range, and
    how many seeds are within ``WITHIN_POINTS`` (the targets judge the difference of the
    medians instead; ``docs/nn.md`` 1.8). ``None`` without a common seed.

    >>> paired_gaps([{"seed": 0, "accuracy": [0.80]}, {"seed": 1, "accuracy": [0.84]}],
    ...             [{"seed": 0, "accuracy": [0.85]}, {"seed": 2, "accuracy": [0.90]}])
    {'seeds': [0], 'gaps': [-5.0], 'median': -5.0, 'min': -5.0, 'max': -5.0, 'n_within': 0}
    """
    ref = {r["seed"]: r["accuracy"][-1] for r in reference}
    pairs = [(r["seed"], round(100 * (r["accuracy"][-1] - ref[r["seed"]]), 6))
             for r in runs if r["seed"] in ref]
    if not pairs:
        return None
    gaps = [g for _, g in pairs]
    return {"seeds": [s for s, _ in pairs], "gaps": gaps, "median": statistics.median(gaps),
            "min": min(gaps), "max": max(gaps),
            "n_within": sum(g >= -WITHIN_POINTS for g in gaps)}


def summarize(results: dict[str, dict[str, list[dict]]]) -> dict[str, dict]:
    """Per pair and method: finals over seeds, median, range, per-epoch medians, gap to
    AdamW's median in points and whether it is within ``WITHIN_POINTS``, and the gaps to
    AdamW seed by seed (:func:`paired_gaps`)."""
    out: dict[str, dict] = {}
    for pair, by_method in results.items():
        ref = final_median(by_method.get("adamw", []))
        rows = {}
        for method, runs in by_method.items():
            if not runs:
                rows[method] = {"seeds": []}
                continue
            finals = [r["accuracy"][-1] for r in runs]
            med = statistics.median(finals)
            gap = None if ref is None or method == "adamw" else 100 * (med - ref)
            rows[method] = {
                "seeds": [r["seed"] for r in runs], "final": finals, "median": med,
                "min": min(finals), "max": max(finals), "gap_points": gap,
                "within": None if gap is None else gap >= -WITHIN_POINTS,
                "paired": None if method == "adamw" else
                paired_gaps(runs, by_method.get("adamw", [])),
                "median_per_epoch": [statistics.median(v) for v in
                                     zip(*(r["accuracy"] for r in runs), strict=True)],
                "train_s_median": statistics.median(r["wall_s"][-1] for r in runs),
                "step_s_median": statistics.median(r["step_s_median"] for r in runs)}
        out[pair] = {"n_par": n_parameters(pair), "methods": rows}
    return out


def target_reasons(spec: Spec, n_seeds: int) -> list[str]:
    """Why a configuration is not the targets' (empty: it is)."""
    ds = DATASETS[ALL_PAIRS[spec.pair].dataset]
    why = []
    if spec.ensemble != TARGET_ENSEMBLE:
        why.append(f"E={spec.ensemble} (target E={TARGET_ENSEMBLE})")
    if spec.epochs != ds.epochs:
        why.append(f"{spec.epochs} epoch(s) (target {ds.epochs})")
    if spec.subset:
        why.append(f"SUBSET ({spec.n_train}/{ds.n_train} train, {spec.n_test}/{ds.n_test} test)")
    if n_seeds < TARGET_SEEDS:
        why.append(f"{n_seeds} seed(s) (target median of {TARGET_SEEDS})")
    if spec.dtype != "float32":
        why.append(f"{spec.dtype} (targets in float32)")
    return why


def check_targets(summary: dict[str, dict], settings: Settings,
                  args: argparse.Namespace) -> list[dict]:
    out = []
    for pair, s in summary.items():
        enk, ref = s["methods"].get("enkal", {}), s["methods"].get("adamw", {})
        if not enk.get("seeds") or not ref.get("seeds"):
            continue
        why = target_reasons(settings.spec(pair, "enkal", 0, args.ensemble),
                             min(len(enk["seeds"]), len(ref["seeds"])))
        ok = enk["within"]
        out.append({"target": f"{pair}: enkal within {WITHIN_POINTS:g} points of AdamW",
                    "enkal": enk["median"], "adamw": ref["median"], "gap_points": enk["gap_points"],
                    "verdict": "n/a: " + "; ".join(why) if why else ("met" if ok else "MISSED")})
        if pair == LENET_PAIR:
            out.append({"target": f"{pair}: enkal >= {LENET_TARGET}", "enkal": enk["median"],
                        "verdict": "n/a: " + "; ".join(why) if why
                        else ("met" if enk["median"] >= LENET_TARGET else "MISSED")})
    return out + [overall_target(out)]


def overall_target(per_pair: list[dict]) -> dict:
    """Every pair within ``WITHIN_POINTS`` of AdamW: judged only when all pairs were."""
    within = [t for t in per_pair if "within" in t["target"]
              and t["target"].split(":")[0] in PAIRS]  # the seven, not EXTRA_PAIRS
    judged = [t for t in within if not t["verdict"].startswith("n/a")]
    below = [t["target"].split(":")[0] for t in judged if t["verdict"] == "MISSED"]
    target = f"every pair: enkal within {WITHIN_POINTS:g} points of AdamW"
    if len(judged) < len(PAIRS):
        return {"target": target, "verdict": f"n/a: {len(judged)} of {len(PAIRS)} pairs judged"}
    return {"target": target, "pairs_below": below,
            "verdict": f"MISSED ({len(below)} of {len(PAIRS)} below: {', '.join(below)})"
            if below else "met"}


# -- the report -----------------------------------------------------------------------------
def _yes_no(flag: bool | None) -> str:
    return "n/a" if flag is None else ("yes" if flag else "no")


def results_table(summary: dict[str, dict], args: argparse.Namespace) -> list[str]:
    lines = ["| pair | N_par | method | final accuracy, median [min, max] | seeds | "
             f"gap to AdamW (points) | within {WITHIN_POINTS:g} points of AdamW | "
             "paired gap, median [min, max] (seeds within) | "
             "train s (median) | step s (median) |",
             "|---|---:|---|---|---:|---:|---|---|---:|---:|"]
    for pair, s in summary.items():
        for method, r in s["methods"].items():
            name = method if method == "adamw" else f"{method} (E={args.ensemble})"
            if not r["seeds"]:
                lines.append(f"| {pair} | {s['n_par']} | {name} | missing | 0 | | | | | |")
                continue
            gap = "n/a" if r["gap_points"] is None else f"{r['gap_points']:+.1f}"
            p = r["paired"]
            paired = "n/a" if p is None else (
                f"{p['median']:+.1f} [{p['min']:+.1f}, {p['max']:+.1f}] "
                f"({p['n_within']} of {len(p['seeds'])})")
            lines.append(
                f"| {pair} | {s['n_par']} | {name} | {r['median']:.4f} [{r['min']:.4f}, "
                f"{r['max']:.4f}] | {len(r['seeds'])} | {gap} | {_yes_no(r['within'])} | "
                f"{paired} | {r['train_s_median']:.2f} | {r['step_s_median']:.4f} |")
    return lines


def epoch_tables(summary: dict[str, dict]) -> list[str]:
    lines = []
    for pair, s in summary.items():
        methods = [m for m, r in s["methods"].items() if r["seeds"]]
        if not methods:
            continue
        per_epoch = [s["methods"][m]["median_per_epoch"] for m in methods]
        lines += ["", f"**{pair}** ({s['n_par']} parameters): test accuracy per epoch, "
                      "median over seeds", "",
                  "| epoch | " + " | ".join(methods) + " |",
                  "|---:|" + "---:|" * len(methods)]
        for e in range(len(per_epoch[0])):
            lines.append(f"| {e} | " + " | ".join(f"{v[e]:.4f}" for v in per_epoch) + " |")
    return lines


def reach_table(rows: list[dict], args: argparse.Namespace) -> list[str]:
    lines = ["| pair | AdamW | " + " | ".join(f"enkal E={e}" for e in args.reach)
             + " | smallest E reaching AdamW |",
             "|---|---:|" + "---:|" * len(args.reach) + "---|"]
    for row in rows:
        got = row["enkal_by_ensemble"]
        cells = ["not run" if e not in got else "missing" if got[e] is None
                 else f"{got[e]:.4f}" for e in args.reach]
        if row["reached_at"] is not None:
            verdict = f"E={row['reached_at']}"
        elif row["adamw"] is None:
            verdict = "n/a: AdamW runs missing"
        else:
            verdict = f"not reached up to E={max(args.reach)}"
        adamw = "missing" if row["adamw"] is None else f"{row['adamw']:.4f}"
        lines.append(f"| {row['pair']} | {adamw} | " + " | ".join(cells)
                     + f" | {verdict} |")
    return lines


def machine_lines(store: Store) -> list[str]:
    """The reporting process's machine and, counted, those the reported runs were made on."""
    env = environment()
    lines = [f"- this process: enkal {env['enkal']} (commit {store.commit}), torch {env['torch']}, "
             f"python {env['python']}, {env['threads']} thread(s), {env['machine']}; load "
             f"average {os.getloadavg()[0]:.1f}"]
    made: dict[str, int] = {}
    for run in store.used.values():
        line = (f"enkal {run['enkal']} (commit {run.get('enkal_commit')}), torch "
                f"{run['torch']}, python {run['python']}, {run['threads']} thread(s), "
                f"{run['machine']}")
        made[line] = made.get(line, 0) + 1
    return lines + [f"- {n} run(s) made with {k}" for k, n in made.items()]


def report(summary: dict[str, dict], reach: list[dict] | None, targets: list[dict],
           store: Store, settings: Settings, args: argparse.Namespace) -> str:
    subset = any(settings.spec(p, "adamw", 0, 0).subset for p in summary)
    lines = [f"# enkal network suite (issue #15){' [SUBSET]' if subset else ''}", "",
             f"AdamW (defaults) vs enkal (`EnsembleKalmanOptimizer(net, ensemble_size="
             f"{args.ensemble}, seed=seed)`, nothing else) vs hybrid; seeds {args.seeds}; "
             f"enkal defaults: `{settings.defaults}`.", ""]
    for pair in summary:
        spec = settings.spec(pair, "adamw", 0, 0)
        lines.append(f"- {pair}: `{ALL_PAIRS[pair].code}`, batch {spec.batch}, {spec.epochs} "
                     f"epoch(s), {spec.n_train} train / {spec.n_test} test"
                     + (" [SUBSET]" if spec.subset else ""))
    lines += ["", "## Final test accuracy", ""] + results_table(summary, args)
    lines += ["", "## Per epoch"] + epoch_tables(summary)
    if reach is not None:
        lines += ["", "## Reach: the smallest E at which enkal's median final accuracy reaches "
                      "AdamW's", ""] + reach_table(reach, args)
    lines += ["", "## Targets", ""]
    lines += [f"- TARGET {t['target']}: {t['verdict']}" + _target_values(t) for t in targets]
    lines += ["", "## Runs", "",
              "- " + ", ".join(f"{k} {v}" for k, v in store.counts.items())]
    lines += [f"- missing: {pair} {method}" + (f" E={e}" if e is not None else "")
              + f", seed(s) {', '.join(map(str, seeds))}"
              for (pair, method, e), seeds in store.missing.items()]
    lines += [f"- FAILED: {m}" for m in store.failed]
    lines += [f"- {n} run(s) in {RUNS_FILE} made with other enkal defaults, not used: `{d}`"
              for d, n in store.other_defaults(settings.defaults).items()]
    lines += ["", "## Machine", ""] + machine_lines(store)
    return "\n".join(lines) + "\n"


def _target_values(t: dict) -> str:
    vals = [f"{k} {v:.4f}" if k != "gap_points" else f"gap {v:+.1f} points"
            for k, v in t.items() if isinstance(v, float)]
    return f" ({', '.join(vals)})" if vals else ""


# -- the figure -----------------------------------------------------------------------------
def plot(path: Path, summary: dict[str, dict], results: dict[str, dict[str, list[dict]]], *,
         title: str, ensemble: int) -> bool:
    """One panel per pair: test accuracy per epoch, median line and min-max band per method;
    one legend for all, below the panels. Returns whether a figure was written."""
    pairs = [p for p in summary if any(results[p].values())]
    if not pairs:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    nrows = math.ceil(len(pairs) / 4)
    ncols = math.ceil(len(pairs) / nrows)  # 7 pairs: 4 + 3 panels, 5: 3 + 2
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.3 * ncols + 0.4, 2.7 * nrows + 1.0),
                             squeeze=False, layout="constrained")
    handles: dict[str, object] = {}
    for ax, pair in zip(axes.flat, pairs, strict=False):
        for method, runs in results[pair].items():
            if runs:
                handles[method] = _plot_method(ax, method, runs)
        ax.set_title(f"{pair}\n{summary[pair]['n_par']:,} parameters", fontsize=9)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(pairs):]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel("test accuracy", fontsize=9)
    for ax in axes.flat[max(0, len(pairs) - ncols):len(pairs)]:
        ax.set_xlabel("epoch", fontsize=9)
    fig.suptitle(title, fontsize=10)
    labels = [m if m == "adamw" else f"{m} (E={ensemble})" for m in handles]
    fig.legend(list(handles.values()), labels, loc="outside lower center",
               ncol=len(handles), fontsize=9, frameon=False)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _plot_method(ax, method: str, runs: list[dict]):
    acc = torch.tensor([r["accuracy"] for r in runs])
    epochs = range(acc.shape[1])
    color = METHOD_COLORS.get(method)
    (line,) = ax.plot(epochs, acc.median(0).values, marker="o", ms=2.5, lw=1.4, color=color)
    if len(runs) > 1:
        ax.fill_between(epochs, acc.min(0).values, acc.max(0).values, alpha=0.2, color=color,
                        lw=0)
    return line


def figure_title(settings: Settings, args: argparse.Namespace, pairs: Iterable[str]) -> str:
    subset = [p for p in pairs if settings.spec(p, "adamw", 0, 0).subset]
    seeds = ", ".join(map(str, args.seeds))
    over = (f"median and range over seeds {seeds}" if len(args.seeds) > 1
            else f"seed {seeds} (one run per method)")
    low = "" if args.dtype == "float32" else f", {args.dtype}"
    names = {"adamw": "AdamW", "enkal": f"enkal defaults (E={args.ensemble}{low})",
             "hybrid": "hybrid"}
    shown = " vs ".join(names[m] for m in METHODS if m in args.methods)
    return f"{shown}: test accuracy, {over}" + (" [SUBSET]" if subset else "")


# -- command line ---------------------------------------------------------------------------
def select_pairs(items: list[str]) -> list[str]:
    """Pairs named by ``items`` (comma or space separated names or prefixes), in suite
    order; ``ValueError`` for an item that names none."""
    wanted = [w.strip() for item in items for w in item.split(",") if w.strip()]
    unknown = [w for w in wanted if w not in EXTRA_PAIRS
               and not any(p.startswith(w) for p in PAIRS)]
    if unknown:
        raise ValueError(f"--pairs: {unknown} name no pair; expected names or prefixes of "
                         f"{list(PAIRS)}, or one of {list(EXTRA_PAIRS)}")
    return [p for p in PAIRS if any(p.startswith(w) for w in wanted)] + \
        [p for p in EXTRA_PAIRS if p in wanted]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", nargs="+", default=["digits", "fashion"],
                        help=f"names or prefixes (default: all): {', '.join(PAIRS)}; "
                        f"by full name only: {', '.join(EXTRA_PAIRS)}")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma separated, of {','.join(METHODS)} (default all)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--ensemble", type=int, default=TARGET_ENSEMBLE,
                        help="N_ens of enkal and hybrid (default 64)")
    parser.add_argument("--reach", type=int, nargs="+", default=None, metavar="E",
                        help="enkal at these E until its median final accuracy reaches AdamW's")
    parser.add_argument("--epochs", type=int, default=None,
                        help="default: 20 (digits), 3 (fashion)")
    parser.add_argument("--train-subset", type=int, default=None,
                        help="train on N images only (labelled SUBSET)")
    parser.add_argument("--test-subset", type=int, default=None,
                        help="evaluate on N test images only (labelled SUBSET)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="precision of the ensemble optimizers (AdamW: float32)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--out", default=None,
                        help="default bench_out/nn_suite (--quick: bench_out/nn_suite/quick)")
    parser.add_argument("--json", default=None, help="also write the record to this file")
    parser.add_argument("--report-only", action="store_true",
                        help="tables and figure from OUT/runs.jsonl, no training")
    parser.add_argument("--quick", action="store_true",
                        help="smoke check: digits pairs, 2 epochs, seed 0, 256 train / 200 test")
    args = parser.parse_args(argv)
    try:
        _finish_args(args)
    except ValueError as err:
        parser.error(str(err))
    return args


def _finish_args(args: argparse.Namespace) -> None:
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in args.methods if m not in METHODS]
    if bad or not args.methods:
        raise ValueError(f"--methods: unknown {bad}; expected some of {METHODS}")
    args.pairs = select_pairs(args.pairs)
    if args.quick:
        args.pairs = [p for p in args.pairs if ALL_PAIRS[p].dataset == "digits"]
        if not args.pairs:
            raise ValueError("--quick: runs the digits pairs only; --pairs named none")
        args.seeds = args.seeds[:1]
        for name, value in QUICK.items():
            setattr(args, name, getattr(args, name) or value)
    for name, minimum in (("ensemble", 2), ("epochs", 1), ("train_subset", 1),
                          ("test_subset", 1)):
        value = getattr(args, name)
        if value is not None and value < minimum:
            raise ValueError(f"--{name.replace('_', '-')}: expected >= {minimum}, got {value}")
    if any(s < 0 for s in args.seeds) or len(set(args.seeds)) != len(args.seeds):
        raise ValueError(f"--seeds: expected distinct ints >= 0, got {args.seeds}")
    if args.reach is not None:
        if any(e < 2 for e in args.reach):
            raise ValueError(f"--reach: expected ensemble sizes >= 2, got {args.reach}")
        args.reach = sorted(set(args.reach))
    args.out = Path(args.out or ("bench_out/nn_suite/quick" if args.quick
                                 else "bench_out/nn_suite"))


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    commit = enkal_commit()
    settings = Settings(epochs=args.epochs, train_subset=args.train_subset,
                        test_subset=args.test_subset, defaults=enkal_defaults(),
                        dtype=args.dtype)
    print(f"# enkal {enkal.__version__} (commit {commit}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s), cpu; load average {os.getloadavg()[0]:.1f}; "
          f"out {args.out}/", flush=True)
    print(f"# enkal defaults: {settings.defaults}", flush=True)
    print(f"# pairs {args.pairs}; methods {args.methods}; seeds {args.seeds}; "
          f"E={args.ensemble}; {args.dtype}"
          + (f"; reach {args.reach}" if args.reach else "")
          + ("; report only" if args.report_only else ""), flush=True)
    t0 = time.perf_counter()
    store = Store(args.out / RUNS_FILE, report_only=args.report_only, commit=commit)
    results = run_main(store, settings, args)
    reach = run_reach(store, settings, args) if args.reach else None
    summary = summarize(results)
    targets = check_targets(summary, settings, args)
    text = report(summary, reach, targets, store, settings, args)
    (args.out / REPORT_FILE).write_text(text)
    figure = args.out / FIGURE_FILE
    drawn = plot(figure, summary, results, title=figure_title(settings, args, summary),
                 ensemble=args.ensemble)
    if not drawn:
        figure.unlink(missing_ok=True)  # not an older selection's figure next to this report
    print("\n" + text + f"\nreport {args.out / REPORT_FILE}; figure "
          f"{figure if drawn else '(none: no runs)'}", flush=True)
    record = {"bench": "nn_suite", **environment(), "enkal_commit": commit,
              "quick": args.quick, "report_only": args.report_only, "pairs": args.pairs,
              "methods": args.methods, "seeds": args.seeds, "ensemble": args.ensemble,
              "defaults": settings.defaults, "out": str(args.out), **store.counts,
              "failed_runs": store.failed,
              "missing_runs": [{"pair": p, "method": m, "ensemble": e, "seeds": seeds}
                               for (p, m, e), seeds in store.missing.items()],
              "results": summary, "reach": reach, "targets": targets,
              "figure": str(figure) if drawn else None, "report": str(args.out / REPORT_FILE),
              "total_s": time.perf_counter() - t0}
    print(f"# total {record['total_s']:.1f} s", flush=True)
    emit(record, args.json)
    return record


if __name__ == "__main__":
    sys.exit(1 if main(sys.argv[1:])["failed"] else 0)
