r"""Time the ensemble forward of networks: vmap vs loop vs auto, and a training step vs its
forward.

Two networks, each on a batch of 256 inputs:

* the digits MLP 64-64-32-10 (6570 parameters) on 8x8 digit images (64 features);
* LeNet-5 (61706 parameters) on 28x28 images.

For ``E`` in {16, 64, 256} members (``--quick``: 16, 64) it times one ensemble forward
``NeuralModel.predict`` with ``backend="vmap"``, ``"loop"`` and ``"auto"`` (the documented
rule of :mod:`enkal.nn`), and one full ``EnsembleKalmanOptimizer.step`` (forward, softmax,
update, redraw, mean written back) with the auto backend. It checks

* ``picked / min(vmap, loop) <= 1.10`` (column ``p/best``): the backend that the rule picks
  is the faster one, or within 10% of it. ``a/best`` is the same with auto's own timing (the
  same code as the picked backend, timed separately: its spread shows the timing noise);
* ``step / forward``: the cost of everything but the forward; the target is ``<= 1.2``
  (it is met where the forward dominates: LeNet-5, 1.03-1.20; for the small MLP the step's
  fixed costs are of the order of its ~9 ms forward at ``E = 64``: measured on an idle
  machine, one thread, 2.2-2.5x. A profile of 40 default steps (idle, 2026-11-23): forward
  8.7 ms alone, step 19.1 ms; in the step the forward 9.7 ms, the ``E x N_par`` normal draw
  1.7 ms, the transform 2.6 ms (whitening, the ``E x E`` Gram and its eigendecomposition, in
  float64), softmax 0.7 ms, the remaining 4.4 ms bookkeeping (misfits, spread, finiteness
  checks, writing the mean). The draw and the transform alone exceed the 1.7 ms that 1.2x
  would allow: with no bookkeeping at all the step would still be 1.7x its forward).

Each timing is the median of ``--repeats`` calls after one warm-up, the variants of one size
interleaved within each repeat so that a load change on a shared machine hits them alike.
Threads: one by default (as in ``bench/models.py``: on the shared 2-core development machine
torch's intra-op threads mostly wait for each other); ``--threads 0`` keeps torch's default.

Run ``python bench/forward.py [--quick] [--threads N] [--repeats R] [--device D]``. The last
line is ``BENCH_JSON {...}``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import torch
from _common import parse_device, synchronize

from enkal import EnsembleKalmanOptimizer, NeuralModel
from enkal.models.nn import LeNet5, mlp


def _time(fn, device: torch.device) -> float:
    synchronize(device)
    t = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t


def bench_network(name: str, make, inputs: torch.Tensor, sizes, repeats: int,
                  device: torch.device) -> list[dict]:
    rows = []
    labels = torch.randint(0, 10, (inputs.shape[0],), generator=torch.Generator().manual_seed(0))
    for n in sizes:
        torch.manual_seed(0)
        net = make().to(device)
        models = {b: NeuralModel(net, backend=b) for b in ("vmap", "loop", "auto")}
        opt = EnsembleKalmanOptimizer(net, ensemble_size=n, seed=0)
        theta = opt.ensemble.clone()
        x, y = inputs.to(device), labels.to(device)
        calls = {b: (lambda m=m, t=theta, x=x: m.predict(t, x)) for b, m in models.items()}
        calls["step"] = lambda o=opt, x=x, y=y: o.step(x, y)
        times: dict[str, list[float]] = {k: [] for k in calls}
        for fn in calls.values():  # warm-up
            fn()
        for _ in range(repeats):
            for k, fn in calls.items():
                times[k].append(_time(fn, device))
        med = {k: statistics.median(v) for k, v in times.items()}
        best = min(med["vmap"], med["loop"])
        picked = models["auto"].choose_backend(n)
        rows.append({
            "network": name, "n_members": n, "n_par": models["auto"].n_parameters,
            "vmap_s": med["vmap"], "loop_s": med["loop"], "auto_s": med["auto"],
            "auto_backend": picked, "step_s": med["step"],
            "auto_over_best": med["auto"] / best, "pick_over_best": med[picked] / best,
            "step_over_forward": med["step"] / med["auto"],
        })
        r = rows[-1]
        print(f"{name:8s} {n:5d} {r['n_par']:7d} {r['vmap_s']:9.4f} {r['loop_s']:9.4f} "
              f"{r['auto_s']:9.4f} {r['auto_backend']:>5s} {r['pick_over_best']:6.2f} "
              f"{r['auto_over_best']:6.2f} "
              f"{r['step_s']:9.4f} {r['step_over_forward']:6.2f}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="E in {16, 64} only")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--networks", default="mlp,lenet5")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = parse_device(args.device)
    sizes = (16, 64) if args.quick else (16, 64, 256)
    g = torch.Generator().manual_seed(0)
    nets = {
        "mlp": (lambda: mlp([64, 64, 32, 10]), torch.randn(256, 64, generator=g)),
        "lenet5": (LeNet5, torch.randn(256, 1, 28, 28, generator=g)),
    }
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} thread(s), device {device}, "
          f"medians of {args.repeats} (seconds)")
    print(f"{'network':8s} {'E':>5s} {'N_par':>7s} {'vmap':>9s} {'loop':>9s} {'auto':>9s} "
          f"{'picks':>5s} {'p/best':>6s} {'a/best':>6s} {'step':>9s} {'st/fw':>6s}")
    rows = []
    for name in args.networks.split(","):
        make, inputs = nets[name]
        rows += bench_network(name, make, inputs, sizes, args.repeats, device)
    worst_pick = max(r["pick_over_best"] for r in rows)
    worst_auto = max(r["auto_over_best"] for r in rows)
    summary = {
        "bench": "forward", "torch": torch.__version__, "threads": torch.get_num_threads(),
        "device": str(device), "machine": platform.machine(), "repeats": args.repeats,
        "rows": rows, "worst_pick_over_best": worst_pick, "worst_auto_over_best": worst_auto,
        "auto_picks_within_10_percent": worst_pick <= 1.10,
    }
    print("BENCH_JSON " + json.dumps(summary))
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
