r"""Why the network learner's recipe carries over or not (issue #15): per-layer measurements
of the redraw on a network, at its initialisation and after training with the defaults.

For each pair (``bench/nn_suite.py``'s names; default the five digits pairs), with ``N_ens``
members drawn as the default ``Redraw`` draws them:

* ``share``: each layer's share of the prediction anomalies' variance (the members perturbed
  in that layer only, ``sum D^2`` over the sum for all layers, softmax outputs, the spread
  the optimizer holds: at ``init`` the Kaiming shape it holds before its first step, then
  that of its last step);
* ``signal``: the same share as the analysis sees it: the spread the next step draws on the
  batch (``Redraw(scale="inputs")``'s input scales) and the anomalies whitened by the task's
  noise (the multinomial weighting): where the step's information comes from;
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

Run ``python bench/nn_diagnose.py [--pairs ...] [--ensemble 64] [--epochs 5] [--steps N]
[--threads 1]``: seconds for a digits pair; a Fashion-MNIST pair (``--steps 100``) a few
minutes. The suite's initialisation (seed 0) and minibatch order. The last line is
``BENCH_JSON {...}``.
"""

from __future__ import annotations

import argparse
import itertools
import math
import statistics

import torch
from _common import emit, environment
from nn_suite import PAIRS, epochs, setup
from torch import nn
from torch.func import functional_call

import enkal

DEFAULT_PAIRS = ("digits/cnn-tanh-avg", "digits/cnn-relu-max", "digits/gap-relu",
                 "digits/mlp-relu", "digits/mlp-gelu-ln")


def _shares(opt: enkal.EnsembleKalmanOptimizer, x: torch.Tensor, members: torch.Tensor,
            anomalies) -> dict[str, float]:
    """Per tensor, the share of ``sum D^2`` (``D = anomalies(outputs)``) when the members
    differ from the mean in that tensor only, taking its entries from ``members``."""
    mean = opt.mean
    out = {}
    for b in opt.layout.blocks:
        xs = mean.expand_as(members).clone()
        xs[:, b.slice] = members[:, b.slice]
        out[b.name] = float(anomalies(opt.net.predict(xs, x)).square().sum())
    total = sum(out.values())
    return {k: v / total for k, v in out.items()}


def layer_shares(opt: enkal.EnsembleKalmanOptimizer, x: torch.Tensor) -> dict[str, float]:
    """Shares of the softmax outputs' anomalies, members as the optimizer draws them now."""
    def anomalies(out: torch.Tensor) -> torch.Tensor:
        p = torch.softmax(out, -1).reshape(out.shape[0], -1)
        return p - p.mean(0)
    return _shares(opt, x, opt._draw(), anomalies)


def signal_shares(opt: enkal.EnsembleKalmanOptimizer, x: torch.Tensor, y: torch.Tensor
                  ) -> dict[str, float]:
    """Shares of the whitened anomalies, with the spread the next step draws on ``x`` and
    the noise of ``y``'s task (what the analysis sees)."""
    mean = opt.mean
    std = opt.members.std(opt.net, x, mean, kaiming=opt._kaiming)
    z = torch.randn(opt.ensemble_size, mean.numel(), generator=torch.Generator().manual_seed(0),
                    dtype=mean.dtype)
    task = opt._task_for(y)

    def anomalies(out: torch.Tensor) -> torch.Tensor:
        p = task.predictions(out)
        return (p - p.mean(0)) / task.noise_std(p, opt.noise)
    return _shares(opt, x, mean + z * std, anomalies)


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


def diagnose(pair: str, ensemble: int, n_epochs: int, steps: int | None = None) -> dict:
    """The measurements at the suite's initialisation (seed 0) and after ``n_epochs`` epochs
    of the suite's minibatches with the defaults (or the first ``steps`` steps)."""
    net, (x, y, _, _), ds = setup(pair, 0, 0)
    opt = enkal.EnsembleKalmanOptimizer(net, ensemble_size=ensemble, seed=0)
    rec: dict = {"pair": pair, "N_par": opt.net.n_parameters, "batch": ds.batch}
    for when in ("init", "trained"):
        if when == "trained":
            order = (idx for _, mbs in epochs(x.shape[0], ds.batch, 0, n_epochs) for idx in mbs)
            rec["steps"] = 0
            for idx in itertools.islice(order, steps):
                opt.step(x[idx], y[idx])
                rec["steps"] += 1
        std = opt._redraw_std
        rel = {b.name: float(std[b.slice].mean() / opt.mean[b.slice].square().mean().sqrt())
               for b in opt.layout.blocks}
        n = ds.batch
        batches = [x[i:i + n] for i in range(0, 20 * n, n)]
        labels = [y[i:i + n] for i in range(0, 20 * n, n)]
        state = opt.state_dict()
        cos, ratio = step_alignment(net, opt, batches, labels)
        opt.load_state_dict(state)
        opt._redraw_std = std  # the probe's steps leave nothing behind (not in the state)
        rec[when] = {"share": layer_shares(opt, x[:256]),
                     "signal": signal_shares(opt, x[:256], y[:256]), "rel_std": rel,
                     "flips": flips(net, opt, x[:256]), "cos_grad": cos, "step_over_adam": ratio}
    rec["param_share"] = {b.name: b.size / opt.net.n_parameters for b in opt.layout.blocks}
    rec["random_subspace_cos"] = math.sqrt((ensemble - 1) / opt.net.n_parameters)
    return rec


def report(rec: dict) -> None:
    print(f"\n## {rec['pair']} (N_par {rec['N_par']}; random-subspace cosine "
          f"{rec['random_subspace_cos']:.3f}; trained: {rec['steps']} steps of batch "
          f"{rec['batch']})\n")
    print("| tensor | param share | share init | share trained | signal init | "
          "signal trained | rel std init | rel std trained |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, ps in rec["param_share"].items():
        i, t = rec["init"], rec["trained"]
        print(f"| {name} | {ps:.3f} | {i['share'][name]:.3f} | {t['share'][name]:.3f} | "
              f"{i['signal'][name]:.3f} | {t['signal'][name]:.3f} | "
              f"{i['rel_std'][name]:.3f} | {t['rel_std'][name]:.3f} |")
    for when in ("init", "trained"):
        r = rec[when]
        fl = ", ".join(f"{k} {v:.3f}" for k, v in r["flips"].items()) or "none"
        print(f"\n{when}: cos(step, -grad) {r['cos_grad']:.3f}, step / AdamW step "
              f"{r['step_over_adam']:.2f}; flips: {fl}")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", nargs="+", default=list(DEFAULT_PAIRS),
                    help="pairs of bench/nn_suite.py (default: the five digits pairs)")
    ap.add_argument("--ensemble", type=int, default=64, help="N_ens (default 64)")
    ap.add_argument("--epochs", type=int, default=5, help="epochs of training with the defaults before the 'trained' "
                    "measurements (default 5)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (default 1; 0: torch's default)")
    ap.add_argument("--steps", type=int, default=None,
                    help="stop the training before the 'trained' measurements after this "
                    "many steps (default: --epochs whole epochs)")
    args = ap.parse_args(argv)
    bad = [p for p in args.pairs if p not in PAIRS]
    if bad:
        ap.error(f"--pairs: pairs of bench/nn_suite.py ({', '.join(PAIRS)}), got {bad}")
    if args.steps is not None and args.steps < 0:
        ap.error(f"--steps: expected an int >= 0, got {args.steps}")
    if args.threads:
        torch.set_num_threads(args.threads)
    recs = [diagnose(p, args.ensemble, args.epochs, args.steps) for p in args.pairs]
    for r in recs:
        report(r)
    record = {"bench": "nn_diagnose", "env": environment(), "ensemble": args.ensemble,
              "epochs": args.epochs, "steps": args.steps, "pairs": recs}
    emit(record)
    return record


if __name__ == "__main__":
    main()
