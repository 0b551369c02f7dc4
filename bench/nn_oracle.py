r"""The best a fresh random subspace per step can do: an oracle for ``Redraw`` learners.

Every step of :class:`enkal.EnsembleKalmanOptimizer` with ``Redraw`` learns about the loss
only along ``N_ens - 1`` random directions around the mean. This script gives a learner the
*exact* information along such directions and nothing else: each step draws ``K = E - 1``
directions as ``Redraw`` shapes them (Kaiming std per tensor), computes the exact directional
derivatives of the network's logits on the minibatch by forward-mode AD (``torch.func.jvp``),
forms the exact Gauss-Newton matrix of the minibatch cross-entropy in that subspace,
``H = (J D)^T (diag p - p p^T) (J D) / B``, and the projected gradient ``b``, and steps
``m -= alpha * D^T (H + lam * mean(diag H) I)^-1 b``. No ensemble spread, no nonlinearity of
the members, the true metric: what is left is the subspace.

Run on a pair of ``bench/nn_suite.py`` (same networks, data, initialisation, batch order)::

    python bench/nn_oracle.py digits/cnn-relu-max --alpha 0.03 --lam 0.01
    python bench/nn_oracle.py fashion/lenet-relu-max --alpha 0.05 --lam 0.01

It prints the test accuracy per epoch and a ``BENCH_JSON`` line. It uses gradients (forward
mode) by design: it is a measuring device, not a learner enkal ships.
"""
from __future__ import annotations

import argparse
import math
import sys
import time

import torch
from _common import accuracy, emit, environment
from nn_suite import PAIRS, epochs, setup
from torch import nn
from torch.func import functional_call, jvp, vmap

from enkal.nn import NeuralModel, kaiming_std


def oracle_step(net: nn.Module, names: list[tuple], m: torch.Tensor, std: torch.Tensor,
                x: torch.Tensor, y: torch.Tensor, k: int, alpha: float, lam: float,
                gen: torch.Generator) -> torch.Tensor:
    """One oracle step from the mean ``m`` (``(N_par,)``); the new mean."""
    def logits(v: torch.Tensor) -> torch.Tensor:
        return functional_call(net, {n: v[s].reshape(sh) for n, s, sh in names}, (x,))

    d = torch.randn(k, m.numel(), generator=gen) * std
    with torch.no_grad():
        out, jd = vmap(lambda v: jvp(logits, (m,), (v,)), out_dims=(None, 0))(d)
    p = torch.softmax(out.double(), -1)
    jd = jd.double()                                                  # (K, B, C)
    b = torch.einsum("kbc,bc->k", jd, p - nn.functional.one_hot(y, p.shape[-1]).double())
    pj = jd * p
    h = torch.einsum("kbc,lbc->kl", pj, jd) - torch.einsum("kb,lb->kl", pj.sum(-1), pj.sum(-1))
    h, b = h / len(y), b / len(y)
    h = h + lam * h.diagonal().mean() * torch.eye(k, dtype=h.dtype)
    w, info = torch.linalg.solve_ex(h, b)
    if int(info) != 0:  # H singular (lam = 0, or a direction with no effect): least squares
        w = torch.linalg.lstsq(h, b.unsqueeze(1)).solution.squeeze(1)
    return m - alpha * (w.to(m.dtype) @ d)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("pair", choices=sorted(PAIRS))
    ap.add_argument("--ensemble", type=int, default=64, help="N_ens (K = N_ens - 1 directions)")
    ap.add_argument("--alpha", type=float, default=0.03, help="step (0.03)")
    ap.add_argument("--lam", type=float, default=0.01, help="relative damping (0.01)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=None, help="default: the suite's")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    net, (xtr, ytr, xte, yte), ds = setup(a.pair, a.seed, a.threads)
    model = NeuralModel(net)
    sig = kaiming_std(net, [b.name for b in model.layout.blocks])
    std = torch.empty(model.n_parameters)
    for blk in model.layout.blocks:
        std[blk.slice] = sig[blk.name]
    names = [(blk.name, blk.slice, blk.shape) for blk in model.layout.blocks]
    m = model.flatten().clone()
    gen = torch.Generator().manual_seed(a.seed)
    acc, t0 = [accuracy(net, xte, yte)], time.perf_counter()
    for epoch, minibatches in epochs(len(xtr), ds.batch, a.seed, a.epochs or ds.epochs):
        for idx in minibatches:
            m = oracle_step(net, names, m, std, xtr[idx], ytr[idx], a.ensemble - 1, a.alpha,
                            a.lam, gen)
            if not torch.isfinite(m).all():
                break
        model.load_into(m)
        acc.append(accuracy(net, xte, yte) if torch.isfinite(m).all() else math.nan)
        print(f"epoch {epoch}: test accuracy {acc[-1]:.4f} ({time.perf_counter() - t0:.0f} s)",
              flush=True)
    rec = {"bench": "nn_oracle", "pair": a.pair, "ensemble": a.ensemble, "alpha": a.alpha,
           "lam": a.lam, "seed": a.seed, "accuracy": acc, **environment()}
    emit(rec)
    return rec


if __name__ == "__main__":
    main(sys.argv[1:])
