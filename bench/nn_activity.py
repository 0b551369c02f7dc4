r"""Activity perturbation: ``N_ens - 1`` directions per *sample*, a measuring device for issue #15.

enkal's network learner perturbs the *weights*: every member is one network, the same for
every sample of the batch, so a step learns about the loss along ``N_ens - 1`` directions in
all. This script perturbs the *activities* instead (Ren, Kornblith, Liao & Hinton, "Scaling
forward gradient with local losses", ICLR 2023): all members run the mean network, and every
member-sample pair adds its own noise ``sigma_l * eps`` to the output of every layer that has
parameters (``sigma_l = spread *`` the RMS of that output on the batch). Per sample ``b`` and
layer ``l`` the noise ``A`` (``N_ens x U_l``, centred) and the logits' anomalies ``Y``
(``N_ens x C``) estimate the gradient of the cross-entropy with respect to the layer's output,

    d_b = A^T Y g_b / ((N_ens - 1) sigma_l^2),      g_b = softmax(z_b) - onehot(y_b),

(unbiased where the network is linear around the mean: ``Y = A J^T``), and the layer's own
parameters get ``sum_b d_b`` through the layer alone (its inputs detached: the local
derivative of one layer, ``d x^T`` for a linear one; nothing is propagated backwards through
the network). AdamW consumes that estimate. So ``N_ens - 1`` directions are measured per
sample and layer, ``B`` times more than one weight-space draw measures, at the same forward
cost (``N_ens x B`` samples through the mean network).

Run on a pair of ``bench/nn_suite.py`` (same networks, data, initialisation, batch order)::

    python bench/nn_activity.py digits/mlp-relu --lr 3e-3
    python bench/nn_activity.py fashion/lenet-relu-max --cosine 3

``--cosine K`` trains nothing: at the initialisation, on ``K`` batches, it prints the cosine
between the true minibatch gradient (backpropagation, for the comparison only) and (a) this
estimate, (b) the mean increment of one step of enkal's defaults, per parameter tensor. It
prints the test accuracy per epoch and a ``BENCH_JSON`` line. A measuring device, not a
learner enkal ships (it needs the network's layers, not a black box).
"""
from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import time

import torch
from _common import accuracy, emit, environment
from nn_suite import ALL_PAIRS, epochs, setup
from torch import nn

import enkal


class ActivityGradient:
    """``grad = ActivityGradient(net, ensemble, spread, generator)``; ``grad(x, y)`` writes
    the activity-perturbation estimate of the mean cross-entropy's gradient into every
    parameter's ``.grad`` (no backpropagation through the network)."""

    def __init__(self, net: nn.Module, ensemble: int, spread: float,
                 generator: torch.Generator) -> None:
        if ensemble < 2:
            raise ValueError(f"ensemble: expected at least 2 members, got {ensemble}")
        if not spread > 0:
            raise ValueError(f"spread: expected a positive float, got {spread}")
        self.net, self.ensemble, self.spread, self.generator = net, ensemble, spread, generator
        self.layers = [m for m in net.modules() if next(m.parameters(recurse=False), None)
                       is not None]

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        e, b = self.ensemble, x.shape[0]
        outs: dict[nn.Module, torch.Tensor] = {}
        noise: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}

        def detach_inputs(mod, inp):
            return tuple(t.detach() if torch.is_tensor(t) else t for t in inp)

        def keep(mod, inp, out):
            outs[mod] = out

        def perturb(mod, inp, out):
            sigma = self.spread * outs[mod].detach().pow(2).mean().sqrt().clamp(min=1e-3)
            eps = torch.randn(out.shape, generator=self.generator, dtype=out.dtype) * sigma
            noise[mod] = (eps, sigma)
            return out + eps

        # the mean network with every layer's input detached: one local graph per layer
        hooks = [h for m in self.layers for h in (m.register_forward_pre_hook(detach_inputs),
                                                  m.register_forward_hook(keep))]
        try:
            z = self.net(x)
        finally:
            for h in hooks:
                h.remove()
        hooks = [m.register_forward_hook(perturb) for m in self.layers]
        try:
            with torch.no_grad():  # the members: E copies of the batch, noise on every layer
                logits = self.net(x.repeat(e, *([1] * (x.dim() - 1)))).view(e, b, -1)
        finally:
            for h in hooks:
                h.remove()
        with torch.no_grad():
            g = torch.softmax(z, -1) - nn.functional.one_hot(y, z.shape[-1]).to(z)
            yg = torch.einsum("ebc,bc->eb", logits - logits.mean(0), g)   # (E, B)
        local = z.new_zeros(())
        for m in self.layers:
            eps, sigma = noise[m]
            a = eps.view(e, b, -1)
            d = torch.einsum("eb,ebu->bu", yg, a - a.mean(0)) / ((e - 1) * sigma ** 2)
            local = local + (outs[m] * d.view(outs[m].shape)).sum()
        for p in self.net.parameters():
            p.grad = None
        (local / b).backward()


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(nn.functional.cosine_similarity(a.flatten(), b.flatten(), 0))


def cosines(net: nn.Module, data, ensemble: int, spread: float, k: int,
            seed: int) -> list[dict]:
    """Per batch and parameter tensor: cosine of the true gradient with the activity estimate
    and with (minus) one default enkal step's mean increment."""
    xtr, ytr, batch = data
    rows = []
    for trial in range(k):
        idx = torch.randperm(len(xtr), generator=torch.Generator().manual_seed(seed + trial))
        x, y = xtr[idx[:batch]], ytr[idx[:batch]]
        net.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        true = [p.grad.clone() for p in net.parameters()]
        est_net = copy.deepcopy(net)
        ActivityGradient(est_net, ensemble, spread, torch.Generator().manual_seed(trial))(x, y)
        est = [p.grad for p in est_net.parameters()]
        step_net = copy.deepcopy(net)
        before = [p.detach().clone() for p in step_net.parameters()]
        enkal.EnsembleKalmanOptimizer(step_net, ensemble_size=ensemble, seed=trial).step(x, y)
        inc = [p0 - p.detach()  # minus the step
               for p, p0 in zip(step_net.parameters(), before, strict=True)]
        whole = [nn.utils.parameters_to_vector(v) for v in (true, est, inc)]
        total = whole[0].square().sum()
        named = [("all", *whole)] + [
            (n, t, s, i) for (n, _), t, s, i in zip(net.named_parameters(), true, est, inc,
                                                      strict=True)]
        for name, t, s, i in named:
            rows.append({"batch": trial, "tensor": name, "numel": t.numel(),
                         "grad_share": float(t.square().sum() / total),
                         "cos_activity": _cos(t, s), "cos_enkal": _cos(t, i)})
    return rows


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("pair", choices=sorted(ALL_PAIRS))
    ap.add_argument("--ensemble", type=int, default=64, help="N_ens (default 64)")
    ap.add_argument("--spread", type=float, default=0.03,
                    help="noise std over each layer output's RMS (default 0.03)")
    ap.add_argument("--lr", type=float, default=1e-3, help="AdamW's learning rate (1e-3)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=None, help="default: the suite's")
    ap.add_argument("--cosine", type=int, default=0, metavar="K",
                    help="measure gradient cosines on K batches at the initialisation instead "
                         "of training")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    net, (xtr, ytr, xte, yte), ds = setup(a.pair, a.seed, a.threads)
    rec = {"bench": "nn_activity", "pair": a.pair, "ensemble": a.ensemble, "spread": a.spread,
           "seed": a.seed}
    if a.cosine:
        rows = cosines(net, (xtr, ytr, ds.batch), a.ensemble, a.spread, a.cosine,
                       a.seed)
        n_par = sum(p.numel() for p in net.parameters())
        print(f"Medians over {a.cosine} batches; a random {a.ensemble - 1}-dimensional "
              f"subspace has cosine {math.sqrt((a.ensemble - 1) / n_par):.3f}.\n")
        print("| tensor | numel | share of the squared gradient norm | cos(activity, grad) | "
              "cos(enkal step, -grad) |")
        print("|---|---:|---:|---:|---:|")
        for name in dict.fromkeys(r["tensor"] for r in rows):
            rs = [r for r in rows if r["tensor"] == name]
            med = {k: statistics.median(r[k] for r in rs)
                   for k in ("grad_share", "cos_activity", "cos_enkal")}
            print(f"| {name} | {rs[0]['numel']} | {med['grad_share']:.3f} | "
                  f"{med['cos_activity']:+.3f} | {med['cos_enkal']:+.3f} |")
        rec.update(cosines=rows, **environment())
        emit(rec)
        return rec
    grad = ActivityGradient(net, a.ensemble, a.spread, torch.Generator().manual_seed(a.seed))
    opt = torch.optim.AdamW(net.parameters(), lr=a.lr)
    acc, t0 = [accuracy(net, xte, yte)], time.perf_counter()
    for epoch, minibatches in epochs(len(xtr), ds.batch, a.seed, a.epochs or ds.epochs):
        for idx in minibatches:
            grad(xtr[idx], ytr[idx])
            opt.step()
        acc.append(accuracy(net, xte, yte))
        print(f"epoch {epoch}: test accuracy {acc[-1]:.4f} ({time.perf_counter() - t0:.0f} s)",
              flush=True)
    rec.update(lr=a.lr, accuracy=acc, train_s=time.perf_counter() - t0, **environment())
    emit(rec)
    return rec


if __name__ == "__main__":
    main(sys.argv[1:])
