"""Sparsity benchmark: mutual-information pruning vs magnitude pruning on digits.

For a digits MLP (64-64-32-10) and a small LeNet for 8x8 images, a dense network is trained
with :class:`enkal.nn.EnsembleKalmanOptimizer`; then, from that same dense ensemble, each
method prunes the *weights* (biases are kept) to 50/80/90/95% sparsity in ``rounds``
geometric steps, each followed by the same number of fine-tuning ensemble Kalman steps:

* ``mi``: the weights of lowest mutual information with the errors (IEKL eq. 12, from
  :meth:`EnsembleKalmanOptimizer.information`: 16 fresh ensembles around the mean scored
  together on one batch of 256 training images),
* ``saliency``: the weights whose zeroing the ensemble predicts to raise the misfit least
  (:func:`enkal.information.saliency`: significance times eq. 12's squared correlations),
* ``magnitude``: ``torch.nn.utils.prune.global_unstructured`` with ``L1Unstructured`` on
  the ensemble mean (the usual baseline); ``magnitude_eq``: the same, given the forwards the
  scores cost as extra fine-tuning steps (an equal forward budget).

It reports test accuracy against nonzero parameters (weights and biases) and draws the
Pareto plot ``sparsity.png``. Run ``python bench/sparsity.py [--quick] [--nets mlp,lenet]``;
CPU, one thread, about 15 min on a shared 2-core machine.

Measured with the defaults (seed 0; test accuracy; dense: MLP 0.917, LeNet 0.953)::

    net    sparsity      mi saliency magnitude magnitude_eq
    mlp        0.50  0.8944   0.9000    0.9139       0.9278
    mlp        0.80  0.8389   0.8861    0.8583       0.9167
    mlp        0.90  0.8528   0.8500    0.7806       0.8389
    mlp        0.95  0.8194   0.8139    0.7194       0.8000
    lenet      0.50  0.9111   0.9139    0.9250       0.9361
    lenet      0.80  0.8667   0.8500    0.8722       0.9333
    lenet      0.90  0.8556   0.8333    0.7472       0.8861
    lenet      0.95  0.5917   0.8028    0.6944       0.8556

One seed, 360 test images (about 2 points standard error per entry); see
``docs/adaptation.md`` for the reading (equal fine-tuning vs equal forward budget).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from _common import emit, environment
from torch import nn
from torch.nn.utils import prune

from enkal import mutual_information, prune_mask
from enkal.information import count_nonzero, saliency
from enkal.nn import EnsembleKalmanOptimizer, NeuralModel, RelativeNoise
from enkal.problems.datasets import load_digits


@dataclass(frozen=True)
class Config:
    ensemble_size: int = 64
    noise: float = 0.1
    batch: int = 64
    dense_epochs: int = 20
    rounds: int = 3
    finetune_steps: int = 60        # per round, the same for both methods
    score_batch: int = 256          # training images the scores are computed on
    score_draws: int = 16           # fresh ensembles scored together (N = 16 x 64 members)
    sparsities: tuple[float, ...] = (0.5, 0.8, 0.9, 0.95)
    seed: int = 0


def mlp_digits() -> nn.Sequential:
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(),
                         nn.Linear(32, 10))


def lenet_digits() -> nn.Sequential:
    """LeNet for 8x8 digits: conv3 (6) - tanh - avgpool - conv3 (16) - tanh - 120 - 84 - 10."""
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 6, 3, padding=1), nn.Tanh(), nn.AvgPool2d(2),
        nn.Conv2d(6, 16, 3), nn.Tanh(), nn.Flatten(),
        nn.Linear(16 * 2 * 2, 120), nn.Tanh(), nn.Linear(120, 84), nn.Tanh(),
        nn.Linear(84, 10))


NETS = {"mlp": mlp_digits, "lenet": lenet_digits}
METHODS = ("mi", "saliency", "magnitude", "magnitude_eq")


def _optimizer(net: nn.Module, cfg: Config) -> EnsembleKalmanOptimizer:
    # the library's defaults as they were when docs/adaptation.md was measured: gamma 3
    # growing x10 over 500 updates (today's default sets gamma from the run's coverage)
    return EnsembleKalmanOptimizer(
        net, ensemble_size=cfg.ensemble_size, seed=cfg.seed,
        schedule=RelativeNoise(gamma=3.0, growth=10.0, final_gamma=None, steps=500))


def _batches(n: int, batch: int, g: torch.Generator):
    perm = torch.randperm(n, generator=g)
    for s in range(0, n - batch + 1, batch):
        yield perm[s:s + batch]


def accuracy(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((net(x).argmax(dim=1) == y).float().mean())


def weight_columns(opt: EnsembleKalmanOptimizer) -> torch.Tensor:
    """Which layout columns are weights (prunable) rather than biases."""
    cols = torch.zeros(opt.layout.size, dtype=torch.bool)
    for b in opt.layout.blocks:
        if b.name.endswith("weight"):
            cols[b.slice] = True
    return cols


def mi_scores(opt: EnsembleKalmanOptimizer, x: torch.Tensor, y: torch.Tensor, cfg: Config,
              g: torch.Generator, score=mutual_information) -> torch.Tensor:
    """Eq. 12 (or ``score``) from ``cfg.score_draws`` fresh ensembles on one training batch
    of ``cfg.score_batch`` images (:meth:`EnsembleKalmanOptimizer.information`)."""
    idx = torch.randperm(x.shape[0], generator=g)[:cfg.score_batch]
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=g))
    return opt.information(x[idx], y[idx], draws=cfg.score_draws, score=score,
                           seed=seed).cpu()


def magnitude_mask(opt: EnsembleKalmanOptimizer, n_zero: int) -> torch.Tensor:
    """Global L1 (torch.nn.utils.prune) on the ensemble mean: a mask over the layout."""
    net = copy.deepcopy(opt.model)
    mean = opt.mean if opt.mask is None else opt.mean * opt.mask
    NeuralModel(net).load_into(mean)
    params = [(m, "weight") for m in net.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=n_zero)
    masks = {name: buf for name, buf in net.named_buffers() if name.endswith("weight_mask")}
    out = torch.ones(opt.layout.size, dtype=torch.bool)
    for b in opt.layout.blocks:
        key = b.name + "_mask"
        if key in masks:
            out[b.slice] = masks[key].reshape(-1).bool()
    return out


def finetune(opt: EnsembleKalmanOptimizer, x, y, steps: int, batch: int,
             g: torch.Generator) -> None:
    done = 0
    while done < steps:
        for idx in _batches(x.shape[0], batch, g):
            opt.step(x[idx], y[idx])
            done += 1
            if done == steps:
                return


def run_net(name: str, cfg: Config, split, *, log=print) -> list[dict]:
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    net = NETS[name]()
    opt = _optimizer(net, cfg)
    x, y = split.train_inputs, split.train_labels
    t0 = time.perf_counter()
    steps_per_epoch = x.shape[0] // cfg.batch
    finetune(opt, x, y, cfg.dense_epochs * steps_per_epoch, cfg.batch, g)
    dense_acc = accuracy(net, split.test_inputs, split.test_labels)
    log(f"{name}: dense accuracy {dense_acc:.4f} ({count_nonzero(net)} parameters, "
        f"{time.perf_counter() - t0:.0f}s)")
    dense_state = opt.state_dict()
    wcols = weight_columns(opt)
    n_w = int(wcols.sum())
    rows = [{"net": name, "method": "dense", "sparsity": 0.0, "nonzero": count_nonzero(net),
             "accuracy": dense_acc}]
    for sparsity in cfg.sparsities:
        for method in METHODS:
            net_m = NETS[name]()
            opt_m = _optimizer(net_m, cfg)
            opt_m.load_state_dict(copy.deepcopy(dense_state))
            gm = torch.Generator().manual_seed(cfg.seed + 1)
            t1 = time.perf_counter()
            for r in range(1, cfg.rounds + 1):
                live_w = math.ceil(n_w * (1.0 - sparsity) ** (r / cfg.rounds))
                n_zero = n_w - live_w
                if method in ("mi", "saliency"):
                    scores = mi_scores(opt_m, x, y, cfg, gm, score=mutual_information
                                       if method == "mi" else saliency)
                    scores[~wcols] = math.inf                    # biases are not pruned
                    current = opt_m.mask if opt_m.mask is not None else \
                        torch.ones(opt_m.layout.size, dtype=torch.bool)
                    already = int((~current & wcols).sum())
                    mask = prune_mask(scores, current, n=max(0, n_zero - already))
                else:
                    mask = magnitude_mask(opt_m, n_zero)
                opt_m.set_mask(mask)
                steps = cfg.finetune_steps
                if method == "magnitude_eq":  # + the forwards the scores cost, as steps
                    steps += cfg.score_draws * cfg.score_batch // cfg.batch
                finetune(opt_m, x, y, steps, cfg.batch, gm)
            acc = accuracy(net_m, split.test_inputs, split.test_labels)
            row = {"net": name, "method": method, "sparsity": sparsity,
                   "nonzero": count_nonzero(net_m), "accuracy": acc,
                   "weights_zero": int((~opt_m.mask & wcols).sum()), "n_weights": n_w,
                   "seconds": round(time.perf_counter() - t1, 1)}
            rows.append(row)
            log(f"{name} {method:9s} sparsity {sparsity:.2f}: accuracy {acc:.4f}, "
                f"{row['nonzero']} nonzero ({row['seconds']}s)")
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nets = sorted({r["net"] for r in rows})
    fig, axes = plt.subplots(1, len(nets), figsize=(5 * len(nets), 3.5), squeeze=False)
    for ax, name in zip(axes[0], nets, strict=True):
        for method, style, label in (("mi", "o-", "mutual information (eq. 12)"),
                                     ("saliency", "^-", "ensemble saliency"),
                                     ("magnitude", "s--", "magnitude (L1)"),
                                     ("magnitude_eq", "d:", "magnitude (L1), + scoring "
                                      "forwards as fine-tuning")):
            pts = sorted((r["nonzero"], r["accuracy"]) for r in rows
                         if r["net"] == name and r["method"] == method)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=label)
        dense = [r for r in rows if r["net"] == name and r["method"] == "dense"]
        if dense:
            ax.axhline(dense[0]["accuracy"], color="gray", lw=0.8, label="dense")
        ax.set_xscale("log")
        ax.set_xlabel("nonzero parameters")
        ax.set_ylabel("test accuracy")
        ax.set_title(f"digits {name}")
        ax.legend(fontsize=8)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nets", default="mlp,lenet")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default="sparsity")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cfg = Config()
    if args.quick:
        cfg = Config(dense_epochs=2, rounds=1, finetune_steps=10, score_draws=4,
                     sparsities=(0.5, 0.9))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    split = load_digits()
    rows = []
    for name in args.nets.split(","):
        rows += run_net(name, cfg, split, log=lambda s: print(s, flush=True))
        (out / "sparsity.json").write_text(json.dumps({"config": asdict(cfg), "rows": rows},
                                                      indent=1))
        plot(rows, out / "sparsity.png")
    cols = ("mi", "saliency", "magnitude", "magnitude_eq")
    print(f"\n{'net':6s} {'sparsity':>8s} " + " ".join(f"{c:>12s}" for c in cols)
          + f" {'mi-magnitude':>12s}")
    verdicts = {}
    for name in args.nets.split(","):
        for s in cfg.sparsities:
            acc = {r["method"]: r["accuracy"] for r in rows
                   if r["net"] == name and r["sparsity"] == s}
            diff = acc.get("mi", math.nan) - acc.get("magnitude", math.nan)
            print(f"{name:6s} {s:8.2f} " + " ".join(f"{acc.get(c, math.nan):12.4f}"
                                                    for c in cols) + f" {100 * diff:+11.1f}p")
            if s == 0.9:
                verdicts[name] = diff >= 0.02
    for name, ok in verdicts.items():
        print(f"target (90% sparsity, MI >= magnitude + 2 points) on {name}: "
              f"{'met' if ok else 'MISSED'}")
    emit({"bench": "sparsity", **environment(), "config": asdict(cfg), "rows": rows,
          "target_met": verdicts})
    return 0


if __name__ == "__main__":
    sys.exit(main())
