r"""Why the network learner's recipe carries over or not (issue #15): per-layer measurements
of the redraw on a network, at its initialisation and after training with the defaults.

For each pair (``bench/nn_suite.py``'s names; default three digits pairs), with ``N_ens``
members drawn as the default ``Redraw`` draws them:

* ``share``: each layer's share of the prediction anomalies' variance (the members perturbed
  in that layer only, ``sum D^2`` over the sum for all layers): where the ensemble's
  information comes from;
* ``param share``: the layer's share of the parameters (of the random directions);
* ``rel std``: the redraw std over the RMS of the layer's current weights;
* ``flips``: after each ReLU (GELU: sign of the input) and max-pool, the fraction of
  activations that differ in on/off state or argmax selection between a member and the mean
  network (units switched off or re-routed by the redraw);
* ``cos(grad)``: cosine between one default step's mean increment and the negative gradient
  of the cross-entropy at the mean on the same batch (median over 20 steps), against
  ``sqrt((N_ens - 1) / N_par)``, what a step in a random ``(N_ens - 1)``-dimensional
  subspace reaches;
* ``step/adam``: the norm of that increment over the norm of AdamW's first step on the same
  batch (``lr * sqrt(N_par)``, ``lr = 1e-3``).

Run ``python bench/nn_diagnose.py [--pairs ...] [--ensemble 64] [--epochs 5] [--threads 1]``;
digits only (seconds). The last line is ``BENCH_JSON {...}``.
"""

from __future__ import annotations

import argparse
import math
import statistics

import torch
from _common import emit, environment
from nn_suite import PAIRS
from torch import nn
from torch.func import functional_call

import enkal
from enkal.problems.datasets import load_digits

DEFAULT_PAIRS = ("digits/cnn-tanh-avg", "digits/cnn-relu-max", "digits/gap-relu",
                 "digits/mlp-relu", "digits/mlp-gelu-ln")


def layer_shares(opt: enkal.EnsembleKalmanOptimizer, x: torch.Tensor) -> dict[str, float]:
    """Share of sum(D^2) from perturbing each tensor alone (same draw)."""
    draw = opt._draw()
    mean = opt.mean
    out = {}
    for b in opt.layout.blocks:
        xs = mean.expand_as(draw).clone()
        xs[:, b.slice] = draw[:, b.slice]
        p = torch.softmax(opt.net.predict(xs, x), -1).reshape(xs.shape[0], -1)
        out[b.name] = float((p - p.mean(0)).square().sum())
    total = sum(out.values())
    return {k: v / total for k, v in out.items()}


def flips(net: nn.Module, opt: enkal.EnsembleKalmanOptimizer, x: torch.Tensor,
          members: int = 8) -> dict[str, float]:
    """Fraction of on/off (ReLU, GELU) or argmax (max-pool) changes member vs mean."""
    acts: dict[str, list[torch.Tensor]] = {}
    hooks = []
    for name, mod in net.named_modules():
        if isinstance(mod, (nn.ReLU, nn.GELU)):
            hooks.append(mod.register_forward_hook(
                lambda m, i, o, n=name: acts.setdefault(n, []).append(i[0] > 0)))
        elif isinstance(mod, nn.MaxPool2d):
            hooks.append(mod.register_forward_hook(
                lambda m, i, o, n=name: acts.setdefault(n, []).append(_argmax_pool(i[0]))))
    names = [b.name for b in opt.layout.blocks]
    draw = opt._draw()[:members]
    try:
        with torch.no_grad():
            for row in torch.cat([opt.mean[None], draw]):
                params = {n: row[b.slice].reshape(b.shape)
                          for n, b in zip(names, opt.layout.blocks, strict=True)}
                functional_call(net, params, (x,))
    finally:
        for h in hooks:
            h.remove()
    return {n: float(torch.stack([(a != v[0]).float().mean() for a in v[1:]]).mean())
            for n, v in acts.items()}


def _argmax_pool(t: torch.Tensor) -> torch.Tensor:
    return nn.functional.max_pool2d(t, 2, return_indices=True)[1]


def step_alignment(net: nn.Module, opt: enkal.EnsembleKalmanOptimizer, xs, ys) -> tuple:
    cosines, ratios = [], []
    for x, y in zip(xs, ys, strict=True):
        m = opt.mean
        net.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        g = torch.cat([p.grad.reshape(-1) for p in net.parameters()])
        opt.step(x, y)
        d = opt.mean - m
        cosines.append(float(d @ -g / (d.norm() * g.norm())))
        ratios.append(float(d.norm()) / (1e-3 * math.sqrt(d.numel())))
    return statistics.median(cosines), statistics.median(ratios)


def diagnose(pair: str, ensemble: int, epochs: int) -> dict:
    data = load_digits()
    torch.manual_seed(0)
    net = PAIRS[pair].build()
    opt = enkal.EnsembleKalmanOptimizer(net, ensemble_size=ensemble, seed=0)
    x, y = data.train_inputs, data.train_labels
    rec: dict = {"pair": pair, "N_par": opt.net.n_parameters}
    g = torch.Generator().manual_seed(1000)
    for when in ("init", "trained"):
        if when == "trained":
            for _ in range(epochs):
                perm = torch.randperm(x.shape[0], generator=g)
                for i in range(0, x.shape[0], 64):
                    opt.step(x[perm[i:i + 64]], y[perm[i:i + 64]])
        std = opt._redraw_std
        rel = {b.name: float(std[b.slice].mean() / opt.mean[b.slice].square().mean().sqrt())
               for b in opt.layout.blocks}
        batches = [x[i:i + 64] for i in range(0, 20 * 64, 64)]
        labels = [y[i:i + 64] for i in range(0, 20 * 64, 64)]
        state = opt.state_dict()
        cos, ratio = step_alignment(net, opt, batches, labels)
        opt.load_state_dict(state)
        rec[when] = {"share": layer_shares(opt, x[:256]), "rel_std": rel,
                     "flips": flips(net, opt, x[:256]), "cos_grad": cos, "step_over_adam": ratio}
    rec["param_share"] = {b.name: b.size / opt.net.n_parameters for b in opt.layout.blocks}
    rec["random_subspace_cos"] = math.sqrt((ensemble - 1) / opt.net.n_parameters)
    return rec


def report(rec: dict) -> None:
    print(f"\n## {rec['pair']} (N_par {rec['N_par']}; random-subspace cosine "
          f"{rec['random_subspace_cos']:.3f})\n")
    print("| tensor | param share | share init | share trained | rel std init | "
          "rel std trained |")
    print("|---|---|---|---|---|---|")
    for name, ps in rec["param_share"].items():
        i, t = rec["init"], rec["trained"]
        print(f"| {name} | {ps:.3f} | {i['share'][name]:.3f} | {t['share'][name]:.3f} | "
              f"{i['rel_std'][name]:.3f} | {t['rel_std'][name]:.3f} |")
    for when in ("init", "trained"):
        r = rec[when]
        fl = ", ".join(f"{k} {v:.3f}" for k, v in r["flips"].items()) or "none"
        print(f"\n{when}: cos(step, -grad) {r['cos_grad']:.3f}, step / AdamW step "
              f"{r['step_over_adam']:.2f}; flips: {fl}")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", nargs="+", default=list(DEFAULT_PAIRS),
                    help="digits pairs of bench/nn_suite.py (default: all five)")
    ap.add_argument("--ensemble", type=int, default=64, help="N_ens (default 64)")
    ap.add_argument("--epochs", type=int, default=5, help="epochs of training with the defaults before the 'trained' "
                    "measurements (default 5)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (default 1; 0: torch's default)")
    args = ap.parse_args(argv)
    bad = [p for p in args.pairs if p not in PAIRS or not p.startswith("digits/")]
    if bad:
        ap.error(f"--pairs: digits pairs of bench/nn_suite.py only, got {bad}")
    if args.threads:
        torch.set_num_threads(args.threads)
    recs = [diagnose(p, args.ensemble, args.epochs) for p in args.pairs]
    for r in recs:
        report(r)
    record = {"bench": "nn_diagnose", "env": environment(), "ensemble": args.ensemble,
              "epochs": args.epochs, "pairs": recs}
    emit(record)
    return record


if __name__ == "__main__":
    main()
