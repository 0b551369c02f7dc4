r"""Train networks with AdamW, ensemble Kalman updates (enkal) and the hybrid of both
(issue #5's acceptance benchmark; the seed paper's Figs. 2 and 3).

Problems:

* ``digits``: the MLP 64-32-10 (2410 parameters) on scikit-learn's 8x8 digits (1437
  training, 360 test images), batch 64, 20 epochs;
* ``fashion``: LeNet-5 (61706 parameters) on Fashion-MNIST (60000 / 10000), batch 256,
  3 epochs. ``--train-subset N`` trains on the first ``N`` images of a fixed permutation
  (``--test-subset`` likewise): such a run is labelled ``SUBSET`` everywhere and is never
  counted against the Fashion-MNIST target.

Methods (``--methods``, comma separated):

* ``adamw``: ``torch.optim.AdamW`` with its default hyper-parameters (``lr=1e-3``,
  ``weight_decay=1e-2``), cross-entropy loss;
* ``enkal``: ``enkal.EnsembleKalmanOptimizer(net, ensemble_size=E, seed=seed,
  schedule=enkal.RelativeNoise(steps=epochs * steps_per_epoch))`` with the library's
  defaults for everything else. The run's length is the only thing it is told (as a
  learning-rate schedule such as ``OneCycleLR`` is); no per-problem tuning, and when the
  defaults change this benchmark follows;
* ``hybrid``: ``enkal.HybridOptimizer(EnsembleKalmanOptimizer(...the same...), AdamW(...
  defaults...), loss_fn=cross_entropy)``;
* ``paper`` (not run unless named): the seed paper's literal variant, which carries its
  ensemble: ``members=Carry(CollapseGuard(1e-4, 1e-3)), rule=PerturbedObservations(),
  schedule=FixedAnnealing(0.75, initial=1.0, floor=0.1)``. Its variance histograms are the
  paper's Fig. 3 (the carried ensemble's variances shrink as it learns).

For each seed the network's initialisation, the minibatch order and the optimizer's seed are
the same for the three methods. After every epoch the test accuracy of the model is measured
by plain user code, ``net(x).argmax(1)`` (the ensemble optimizers write the ensemble mean
into ``net``); epoch 0 is before training (for an optimizer that carries its ensemble,
``members=Carry``: the prior mean). Wall time counts training steps only (not evaluation).
Tables give the median over seeds. With ``members=Carry(guard)`` the collapse guard's redraws
per step are reported as a fraction of ``N_par``.

Targets (with enkal's defaults, median of 3 seeds; a verdict is printed only for the target
configuration, otherwise ``n/a`` with the reason):

* digits, E = 64, 20 epochs: enkal's final test accuracy >= AdamW's; hybrid >= AdamW at
  every epoch 1..20;
* Fashion-MNIST LeNet-5, 3 epochs on the full training set: enkal >= 0.80 (0.70 is the
  plain learner's floor, AdamW's 0.863 the goal);
* ``--sweep``: enkal on digits for E in {32, 64, 128} x the MLPs 64-32-10 and 64-128-64-10:
  "no cliff" means every cell's final accuracy is at least 0.9 x the best cell's.

Figures (matplotlib, Agg) in ``--out`` (default ``bench_out/nn_training/``):
``<problem>_accuracy.png`` (test accuracy per epoch, median and range over seeds: Fig. 2)
and ``<problem>_variance_<method>.png`` (histograms of the ensemble's per-parameter
variances at several epochs, first seed, log-x: Fig. 3). With the default ``members=Redraw``
the ensemble is redrawn every step with a fixed Kaiming-relative spread, so the ``enkal`` and
``hybrid`` histograms show that fixed exploration spread and do not change over epochs;
``paper`` (carried ensemble) shows the shrinking variances of the paper's Fig. 3.

Run ``python bench/nn_training.py [--problem digits|fashion|both] [--methods
adamw,enkal,hybrid[,paper]] [--seeds 0 1 2] [--epochs N] [--ensemble 64] [--batch B] [--out DIR]
[--threads T] [--device cpu|cuda] [--dtype bfloat16] [--forward-dtype bfloat16] [--quick]
[--sweep [--no-main]] [--train-subset N] [--test-subset N] [--json PATH]``. ``--quick``
(digits, 2 epochs, seed 0) is a smoke check of well under a minute. Threads: one by
default (the shared 2-core development machine); ``--threads 0`` keeps torch's default.
``--device cuda`` runs the networks, data and ensembles there, with the step timed between
synchronisations. ``--dtype bfloat16`` stores the ensemble optimizers' members in bfloat16
(the mean and forward in float32); ``--forward-dtype bfloat16`` runs their networks in
bfloat16 too (issue #16). The last line is ``BENCH_JSON {...}`` (``bench/_common.emit``).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from _common import accuracy, emit, environment, parse_device, synchronize
from torch import nn

import enkal
from enkal._checks import column_variance
from enkal.models.nn import LeNet5, mlp

METHODS = ("adamw", "enkal", "hybrid", "paper")
DEFAULT_METHODS = ("adamw", "enkal", "hybrid")
PROBLEMS = {
    # name: (default batch, default epochs, target epochs, default sizes)
    "digits": {"batch": 64, "epochs": 20, "sizes": [64, 32, 10]},
    "fashion": {"batch": 256, "epochs": 3, "sizes": None},
}
SWEEP_ENSEMBLES = (32, 64, 128)
SWEEP_SIZES = ([64, 32, 10], [64, 128, 64, 10])
CLIFF_FRACTION = 0.9
FASHION_FLOOR, FASHION_TARGET, FASHION_GOAL = 0.70, 0.80, 0.863


# -- data and models ------------------------------------------------------------------------
def load(problem: str, train_subset: int | None, test_subset: int | None,
         device: torch.device | None = None):
    if problem == "digits":
        from enkal.problems.datasets import load_digits

        data = load_digits()
    else:
        from enkal.problems.datasets import load_fashion_mnist

        data = load_fashion_mnist()
    xtr, ytr, xte, yte = data.train_inputs, data.train_labels, data.test_inputs, data.test_labels
    g = torch.Generator().manual_seed(12345)
    if train_subset is not None and train_subset < xtr.shape[0]:
        idx = torch.randperm(xtr.shape[0], generator=g)[:train_subset]
        xtr, ytr = xtr[idx], ytr[idx]
    if test_subset is not None and test_subset < xte.shape[0]:
        idx = torch.randperm(xte.shape[0], generator=g)[:test_subset]
        xte, yte = xte[idx], yte[idx]
    if device is not None:
        xtr, ytr, xte, yte = (t.to(device) for t in (xtr, ytr, xte, yte))
    return xtr, ytr, xte, yte


def make_net(problem: str, sizes: list[int] | None, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return mlp(sizes) if problem == "digits" else LeNet5()


def variance_snapshot_epochs(epochs: int) -> list[int]:
    return sorted({0, 1, max(1, epochs // 4), max(1, epochs // 2), epochs})


# -- one training run -----------------------------------------------------------------------
def train(problem: str, method: str, seed: int, data, *, epochs: int, batch: int,
          ensemble: int, sizes: list[int] | None, keep_variances: bool,
          log_prefix: str = "", dtypes: dict | None = None) -> dict:
    xtr, ytr, xte, yte = data
    device = xtr.device
    net = make_net(problem, sizes, seed).to(device)
    loss_fn = nn.functional.cross_entropy
    kalman = None
    schedule = enkal.RelativeNoise(steps=epochs * math.ceil(xtr.shape[0] / batch))
    low = dtypes or {}  # dtype / forward_dtype of the ensemble optimizers
    if method == "adamw":
        opt = torch.optim.AdamW(net.parameters())

        def step(x, y):
            opt.zero_grad(set_to_none=True)
            loss_fn(net(x), y).backward()
            opt.step()
    elif method == "enkal":
        kalman = enkal.EnsembleKalmanOptimizer(net, ensemble_size=ensemble, seed=seed,
                                               schedule=schedule, **low)
        step = kalman.step
    elif method == "hybrid":
        kalman = enkal.EnsembleKalmanOptimizer(net, ensemble_size=ensemble, seed=seed,
                                               schedule=schedule, **low)
        hybrid = enkal.HybridOptimizer(kalman, torch.optim.AdamW(net.parameters()),
                                       loss_fn=loss_fn)
        step = hybrid.step
    elif method == "paper":
        kalman = enkal.EnsembleKalmanOptimizer(
            net, ensemble_size=ensemble, seed=seed, rule=enkal.PerturbedObservations(),
            members=enkal.Carry(guard=enkal.CollapseGuard(threshold=1e-4, reset=1e-3)),
            schedule=enkal.FixedAnnealing(factor=0.75, initial=1.0, floor=0.1), **low)
        step = kalman.step
    else:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")

    snaps = variance_snapshot_epochs(epochs) if keep_variances and kalman is not None else []
    variances: dict[int, torch.Tensor] = {}
    if 0 in snaps:
        variances[0] = column_variance(kalman.ensemble).float().cpu()
    acc = [accuracy(net, xte, yte)]
    wall = [0.0]
    step_times: list[float] = []
    redrawn: list[float] = []  # per epoch: collapse-guard redraws per step / N_par
    mean_gap = 0.0
    n = xtr.shape[0]
    order_gen = torch.Generator().manual_seed(1000 + seed)
    for epoch in range(1, epochs + 1):
        perm = torch.randperm(n, generator=order_gen)
        n_redrawn = 0
        for i in range(0, n, batch):
            idx = perm[i:i + batch]
            x, y = xtr[idx], ytr[idx]
            synchronize(device)
            t = time.perf_counter()
            info = step(x, y)
            synchronize(device)
            step_times.append(time.perf_counter() - t)
            if method == "hybrid":
                info = info[1]
            if isinstance(info, enkal.StepInfo):
                n_redrawn += info.n_resampled
        wall.append(wall[-1] + sum(step_times[-math.ceil(n / batch):]))
        acc.append(accuracy(net, xte, yte))
        if kalman is not None:  # the model holds the ensemble mean
            with torch.no_grad():
                theta = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
            mean = kalman.mean if hasattr(kalman, "mean") else kalman.ensemble.mean(0)
            mean_gap = max(mean_gap, float((theta - mean).abs().max()))
            if epoch in snaps:
                variances[epoch] = column_variance(kalman.ensemble).float().cpu()
            redrawn.append(n_redrawn / math.ceil(n / batch) / kalman.net.n_parameters)
        print(f"{log_prefix}{method:6s} seed {seed} epoch {epoch:3d}: test acc {acc[-1]:.4f}, "
              f"train {wall[-1]:8.1f} s, step median {statistics.median(step_times):.4f} s"
              + (f", redrawn/step {redrawn[-1]:.3f} of N_par" if any(redrawn) else ""),
              flush=True)
    run = {"method": method, "seed": seed, "accuracy": acc, "wall_s": wall,
           "step_s_median": statistics.median(step_times), "steps": len(step_times)}
    if kalman is not None:
        run["max_model_minus_mean"] = mean_gap
        run["forward_dtype"] = str(kalman.net.dtype).removeprefix("torch.")  # as it ran
        run["redrawn_fraction_per_step"] = redrawn
        v = column_variance(kalman.ensemble)
        run["final_variance_quantiles"] = {
            q: float(torch.quantile(v.double(), q)) for q in (0.05, 0.5, 0.95)}
    run["_variances"] = variances  # tensors for the figures; dropped from the JSON
    return run


def medians(runs: list[dict], key: str) -> list[float]:
    return [statistics.median(vals) for vals in zip(*(r[key] for r in runs), strict=True)]


# -- figures --------------------------------------------------------------------------------
def plot_accuracy(path: Path, problem: str, by_method: dict[str, list[dict]], label: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, runs in by_method.items():
        acc = torch.tensor([r["accuracy"] for r in runs])
        epochs = range(acc.shape[1])
        med = acc.median(dim=0).values
        ax.plot(epochs, med, marker="o", ms=3, label=f"{method} (median of {len(runs)})")
        if len(runs) > 1:
            ax.fill_between(epochs, acc.min(0).values, acc.max(0).values, alpha=0.2)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"{problem}\n{label}", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_variances(path: Path, problem: str, method: str, variances: dict[int, torch.Tensor],
                   label: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    pos = [v[v > 0] for v in variances.values()]
    if not any(p.numel() for p in pos):
        plt.close(fig)
        return
    lo = min(float(p.min()) for p in pos if p.numel())
    hi = max(float(p.max()) for p in pos if p.numel())
    bins = torch.logspace(math.log10(lo), math.log10(hi) + 1e-9, 60).numpy()
    for (epoch, v), p in zip(variances.items(), pos, strict=True):
        zeros = int((v <= 0).sum())
        extra = f", {zeros} zero" if zeros else ""
        ax.hist(p.numpy(), bins=bins, histtype="step", label=f"epoch {epoch}{extra}")
    ax.set_xscale("log")
    ax.set_xlabel("ensemble variance of a parameter")
    ax.set_ylabel("parameters")
    ax.set_title(f"{problem}, {method}\n{label}", fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- one problem ----------------------------------------------------------------------------
def precision(args) -> dict:
    """``dtype`` / ``forward_dtype`` keywords of the ensemble optimizers from ``--dtype`` and
    ``--forward-dtype`` (float32: the model's own, no keyword)."""
    return {k: getattr(torch, v) for k, v in (("dtype", args.dtype),
                                              ("forward_dtype", args.forward_dtype))
            if v != "float32"}


def run_problem(problem: str, args, out: Path) -> dict:
    cfg = PROBLEMS[problem]
    batch = args.batch or cfg["batch"]
    epochs = args.epochs or cfg["epochs"]
    sizes = cfg["sizes"]
    subset = args.train_subset if problem == "fashion" else None
    test_subset = args.test_subset if problem == "fashion" else None
    data = load(problem, subset, test_subset, args.device)
    n_train, n_test = data[0].shape[0], data[2].shape[0]
    full = {"digits": 1437, "fashion": 60000}[problem]
    is_subset = n_train < full or (problem == "fashion" and n_test < 10000)
    net_name = "MLP " + "-".join(map(str, sizes)) if sizes else "LeNet-5"
    low = precision(args)
    label = (f"{net_name}, E={args.ensemble}, batch {batch}, {epochs} epochs, "
             f"{n_train} train / {n_test} test" + (" [SUBSET]" if is_subset else "")
             + "".join(f", {k} {str(v).removeprefix('torch.')}" for k, v in low.items()))
    print(f"\n## {problem}: {label}; seeds {args.seeds}", flush=True)
    by_method: dict[str, list[dict]] = {}
    for method in args.methods:
        by_method[method] = [
            train(problem, method, seed, data, epochs=epochs, batch=batch,
                  ensemble=args.ensemble, sizes=sizes, keep_variances=(k == 0),
                  dtypes=low)
            for k, seed in enumerate(args.seeds)]

    # table: median over seeds per epoch
    med = {m: medians(runs, "accuracy") for m, runs in by_method.items()}
    wall = {m: medians(runs, "wall_s") for m, runs in by_method.items()}
    step_s = {m: statistics.median(r["step_s_median"] for r in runs)
              for m, runs in by_method.items()}
    print(f"\n### {problem}: test accuracy, median of {len(args.seeds)} seed(s) "
          f"(train seconds cumulative, median){' [SUBSET]' if is_subset else ''}")
    head = "epoch " + " ".join(f"{m + ' acc':>11s} {'s':>7s}" for m in by_method)
    print(head)
    for e in range(epochs + 1):
        print(f"{e:5d} " + " ".join(f"{med[m][e]:11.4f} {wall[m][e]:7.1f}" for m in by_method))
    print("step time (median, s): " + ", ".join(f"{m} {step_s[m]:.4f}" for m in by_method))
    redrawn = {m: medians(runs, "redrawn_fraction_per_step") for m, runs in by_method.items()
               if "redrawn_fraction_per_step" in runs[0]}
    for m, r in redrawn.items():
        if not any(r):  # no collapse guard (members=Redraw) or no redraws
            continue
        print(f"{m}: collapse-guard redraws per step / N_par, median, epochs 1..{epochs}: "
              + " ".join(f"{v:.3f}" for v in r))

    # figures
    plot_accuracy(out / f"{problem}_accuracy.png", problem, by_method, label)
    figures = [str(out / f"{problem}_accuracy.png")]
    for m, runs in by_method.items():
        if runs[0]["_variances"]:
            p = out / f"{problem}_variance_{m}.png"
            plot_variances(p, problem, m, runs[0]["_variances"],
                           f"{label}, seed {runs[0]['seed']}")
            figures.append(str(p))

    targets = check_targets(problem, args, med, epochs, batch, n_train, full, is_subset)
    for r in (r for runs in by_method.values() for r in runs):
        del r["_variances"]
    return {"problem": problem, "label": label, "subset": is_subset, "n_train": n_train,
            "n_test": n_test, "batch": batch, "epochs": epochs, "ensemble": args.ensemble,
            "seeds": args.seeds, "median_accuracy": med, "median_wall_s": wall,
            "median_step_s": step_s, "median_redrawn_fraction": redrawn, "runs": by_method, "targets": targets,
            "figures": figures}


def _verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def check_targets(problem, args, med, epochs, batch, n_train, full, is_subset) -> list[dict]:
    out = []
    if problem == "digits":
        why = []
        if args.ensemble != 64:
            why.append(f"E={args.ensemble} (target E=64)")
        if epochs != 20:
            why.append(f"{epochs} epochs (target 20)")
        if batch != 64:
            why.append(f"batch {batch} (target 64)")
        if len(args.seeds) < 3:
            why.append(f"{len(args.seeds)} seed(s) (target median of 3)")
        if "adamw" in med and "enkal" in med:
            a, k = med["adamw"][-1], med["enkal"][-1]
            out.append({"target": "digits: enkal >= AdamW at the last epoch",
                        "enkal": k, "adamw": a,
                        "verdict": "n/a: " + "; ".join(why) if why else _verdict(k >= a)})
        if "adamw" in med and "hybrid" in med:
            bad = [e for e in range(1, epochs + 1) if med["hybrid"][e] < med["adamw"][e]]
            out.append({"target": "digits: hybrid >= AdamW at every epoch",
                        "epochs_below": bad,
                        "verdict": "n/a: " + "; ".join(why) if why else _verdict(not bad)})
    else:
        if "enkal" in med:
            k = med["enkal"][min(3, epochs)]
            why = []
            if is_subset:
                why.append(f"SUBSET ({n_train} of {full} training images)")
            if epochs < 3:
                why.append(f"{epochs} epoch(s) (target 3)")
            if args.ensemble != 64:
                why.append(f"E={args.ensemble} (target E=64)")
            if len(args.seeds) < 3:
                why.append(f"{len(args.seeds)} seed(s) (target median of 3)")
            out.append({"target": f"fashion: enkal >= {FASHION_TARGET} at 3 epochs "
                                  f"(floor {FASHION_FLOOR}, goal {FASHION_GOAL})",
                        "enkal": k,
                        "verdict": "n/a: " + "; ".join(why) if why
                        else _verdict(k >= FASHION_TARGET)
                        + (" (above floor)" if k >= FASHION_FLOOR else " (below floor)")})
    for t in out:
        extra = ", ".join(f"{k} {v:.4f}" for k, v in t.items() if isinstance(v, float))
        print(f"TARGET {t['target']}: {t['verdict']}" + (f" ({extra})" if extra else "")
              + (f" below at epochs {t['epochs_below']}" if t.get("epochs_below") else ""))
    return out


def run_sweep(args, out: Path) -> dict:
    epochs = args.epochs or PROBLEMS["digits"]["epochs"]
    batch = args.batch or PROBLEMS["digits"]["batch"]
    data = load("digits", None, None, args.device)
    print(f"\n## sweep: enkal defaults on digits, E in {SWEEP_ENSEMBLES} x MLPs "
          f"{['-'.join(map(str, s)) for s in SWEEP_SIZES]}, batch {batch}, {epochs} epochs, "
          f"seeds {args.seeds}", flush=True)
    cells = []
    for sizes in SWEEP_SIZES:
        name = "-".join(map(str, sizes))
        ref = [train("digits", "adamw", s, data, epochs=epochs, batch=batch, ensemble=0,
                     sizes=sizes, keep_variances=False, log_prefix=f"[{name}] ")
               for s in args.seeds]
        for r in ref:
            del r["_variances"]
        adamw = statistics.median(r["accuracy"][-1] for r in ref)
        for e in SWEEP_ENSEMBLES:
            runs = [train("digits", "enkal", s, data, epochs=epochs, batch=batch, ensemble=e,
                          sizes=sizes, keep_variances=False, log_prefix=f"[{name} E={e}] ")
                    for s in args.seeds]
            for r in runs:
                del r["_variances"]
            finals = [r["accuracy"][-1] for r in runs]
            cells.append({"sizes": sizes, "ensemble": e, "final_accuracy": finals,
                          "median": statistics.median(finals), "adamw_median": adamw,
                          "step_s": statistics.median(r["step_s_median"] for r in runs),
                          "train_s": statistics.median(r["wall_s"][-1] for r in runs)})
    best = max(c["median"] for c in cells)
    print(f"\n### sweep: enkal final test accuracy (epoch {epochs}), median of "
          f"{len(args.seeds)} seed(s)")
    print(f"{'MLP':>14s} {'N_par':>6s} " + " ".join(f"{'E=' + str(e):>8s}"
                                                   for e in SWEEP_ENSEMBLES)
          + f" {'AdamW':>8s}   step s at E=" + "/".join(map(str, SWEEP_ENSEMBLES)))
    for sizes in SWEEP_SIZES:
        row = [c for c in cells if c["sizes"] == sizes]
        n_par = sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:], strict=True))
        print(f"{'-'.join(map(str, sizes)):>14s} {n_par:6d} "
              + " ".join(f"{c['median']:8.4f}" for c in row)
              + f" {row[0]['adamw_median']:8.4f}   "
              + "/".join(f"{c['step_s']:.3f}" for c in row))
    worst = min(c["median"] for c in cells)
    no_cliff = worst >= CLIFF_FRACTION * best
    print(f"TARGET sweep: no cliff (every cell >= {CLIFF_FRACTION} x best = "
          f"{CLIFF_FRACTION * best:.4f}; worst {worst:.4f}): "
          f"{'met' if no_cliff else 'MISSED'}"
          + ("" if epochs == 20 else f" [{epochs} epochs, not the target's 20]"))
    return {"epochs": epochs, "batch": batch, "seeds": args.seeds, "cells": cells,
            "best": best, "worst": worst, "no_cliff": no_cliff}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problem", choices=("digits", "fashion", "both"), default="digits")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help=f"comma separated, of {','.join(METHODS)} (default "
                             f"{','.join(DEFAULT_METHODS)})")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=None,
                        help="default: 20 (digits), 3 (fashion)")
    parser.add_argument("--ensemble", type=int, default=64)
    parser.add_argument("--batch", type=int, default=None,
                        help="default: 64 (digits), 256 (fashion)")
    parser.add_argument("--train-subset", type=int, default=None,
                        help="fashion: train on N images only (labelled SUBSET)")
    parser.add_argument("--test-subset", type=int, default=None,
                        help="fashion: evaluate on N test images only (labelled SUBSET)")
    parser.add_argument("--out", default="bench_out/nn_training")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--device", default="cpu",
                        help="torch device of the networks, data and ensembles (cpu; cuda...)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="the ensemble optimizers' ensemble (bfloat16: stored in it, the "
                             "mean and forward in float32)")
    parser.add_argument("--forward-dtype", choices=("float32", "bfloat16"), default="float32",
                        help="the members' forward (bfloat16: the networks run in it)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke check: digits, 2 epochs, seed 0")
    parser.add_argument("--sweep", action="store_true",
                        help="also sweep E in {32,64,128} x two MLP sizes on digits")
    parser.add_argument("--no-main", action="store_true",
                        help="with --sweep: run only the sweep")
    parser.add_argument("--json", default=None, help="also write the record to this file")
    args = parser.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in args.methods if m not in METHODS]
    if bad:
        parser.error(f"--methods: unknown {bad}; expected some of {METHODS}")
    if args.quick:
        args.problem, args.epochs, args.seeds = "digits", args.epochs or 2, args.seeds[:1]
    args.device = parse_device(args.device)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"# enkal {enkal.__version__}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s), device {args.device}"
          + (f" ({torch.cuda.get_device_name(args.device)})" if args.device.type == "cuda"
             else "") + "; load average "
          f"{os.getloadavg()[0]:.1f}; figures in {out}/", flush=True)
    ek = enkal.EnsembleKalmanOptimizer(nn.Linear(2, 2))  # every default
    defaults = repr(ek).replace(f"N_par={ek.net.n_parameters}, ", "")
    print(f"# enkal defaults: {defaults}; schedule per run: "
          f"RelativeNoise(steps=epochs * steps_per_epoch)", flush=True)
    t0 = time.perf_counter()
    record: dict = {"bench": "nn_training", **environment(), "device": str(args.device),
                    "quick": args.quick, "dtype": args.dtype,
                    "forward_dtype": args.forward_dtype,
                    "methods": args.methods, "defaults": defaults, "problems": []}
    if not args.no_main:
        problems = ("digits", "fashion") if args.problem == "both" else (args.problem,)
        for p in problems:
            record["problems"].append(run_problem(p, args, out))
    if args.sweep:
        record["sweep"] = run_sweep(args, out)
    record["total_s"] = time.perf_counter() - t0
    print(f"\n# total {record['total_s']:.1f} s")
    emit(record, args.json)
    return record


if __name__ == "__main__":
    main(sys.argv[1:])
