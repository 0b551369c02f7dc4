r"""Seeded results of enkal, captured for a bit-for-bit comparison across versions.

A refactor keeps behaviour: its seeded results are bitwise those of the version before. This
script captures, with the ``enkal`` of the interpreter that runs it:

* ``demo_*``: the README demo (``python -m enkal.problems.demo``): both runs' HDF5 files;
* ``cli_l63*``: ``enkal run problems/lorenz63.toml --seed 1``: the history and checkpoint;
* ``digits.pt``: the README's network run (digits MLP, two epochs, ``N_ens = 64``): the
  network's weights, the optimizer's ensemble, mean and generator, the per-step misfits;
* ``kill_*``: a run killed by SIGKILL after its fifth update and resumed from its history
  (``tests/_storage_worker.py``'s problem), and the same run uninterrupted;

each HDF5 file as every dataset (``.npz``) and every attribute but the times and versions
(``.attrs.json``). ``compare`` then reports every array or text that differs, byte for byte.

Usage, with a second checkout and environment of the older version (``git worktree add``)::

    (cd OLD && OLD/.venv/bin/python bench/seeded_results.py capture /tmp/old)
    .venv/bin/python bench/seeded_results.py capture /tmp/new
    .venv/bin/python bench/seeded_results.py compare /tmp/old /tmp/new

Run it from the root of the checkout whose ``problems/`` and ``tests/`` it should use. The
last line of ``compare`` is ``BENCH_JSON {...}`` with the number of differences.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np

SKIP_ATTRS = {"created", "enkal_version", "torch_version", "numpy_version", "h5py_version",
              "python_version", "versions", "platform", "modified"}

DIGITS = r'''
import sys, torch, enkal
from enkal.models import mlp
from enkal.problems.datasets import load_digits
torch.manual_seed(0)
data = load_digits()
net = mlp([64, 32, 10])
x, y = data.train_inputs, data.train_labels
steps = 2 * -(-len(x) // 64)
opt = enkal.EnsembleKalmanOptimizer(net, ensemble_size=64, seed=0,
                                    schedule=enkal.RelativeNoise(steps=steps))
infos = [opt.step(x[i:i + 64], y[i:i + 64]) for _ in range(2) for i in range(0, len(x), 64)]
accuracy = (net(data.test_inputs).argmax(1) == data.test_labels).float().mean()
sd = opt.state_dict()
f64 = dict(dtype=torch.float64)
torch.save({"net": net.state_dict(), "ensemble": sd["ensemble"], "mean": sd["mean"],
            "rng": sd["rng_state"], "accuracy": accuracy,
            "misfit": torch.tensor([i.misfit for i in infos], **f64),
            "mean_misfit": torch.tensor([i.mean_misfit for i in infos], **f64),
            "alpha": torch.tensor([i.alpha for i in infos], **f64)}, sys.argv[1])
'''

KILL = r'''
import os, signal, sys, enkal
sys.path.insert(0, sys.argv[3])
from _storage_worker import build
model, smoother, prior = build()
path, mode = sys.argv[1], sys.argv[2]
run = getattr(enkal, "run", None)  # the one-call runner; before it, the smoother's method
run = (lambda *a, **k: enkal.run(smoother, *a, **k)) if callable(run) else smoother.run

def killer(state, info):
    if mode == "kill" and info.iteration == 5:
        os.kill(os.getpid(), signal.SIGKILL)

if mode == "resume":
    run(model, resume=path, max_iterations=12)
else:
    run(model, prior, store=path, max_iterations=12, callbacks=[killer])
'''


def _plain(v):
    return v.tolist() if hasattr(v, "tolist") else v


def dump_h5(path: str, out: str, tag: str) -> None:
    """Every dataset of ``path`` to ``tag.npz``, its attributes to ``tag.attrs.json``."""
    import h5py

    arrays, attrs = {}, {}
    with h5py.File(path, "r") as f:
        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                a = np.asarray(obj[()])
                if a.dtype.kind in "OS":  # strings: no pickled object arrays in the .npz
                    a = np.asarray([x.decode() if isinstance(x, bytes) else str(x)
                                    for x in a.reshape(-1)]).reshape(a.shape)
                arrays[name.replace("/", "|")] = a
            for k, v in obj.attrs.items():
                if k not in SKIP_ATTRS and k not in ("DIMENSION_LIST", "REFERENCE_LIST") \
                        and not k.startswith("_"):
                    attrs[f"{name}@{k}"] = repr(_plain(v))

        f.visititems(visit)
        for k, v in f.attrs.items():
            if k not in SKIP_ATTRS and not k.startswith("_"):
                attrs[f"/@{k}"] = repr(_plain(v))
    np.savez(os.path.join(out, f"{tag}.npz"), **arrays)
    with open(os.path.join(out, f"{tag}.attrs.json"), "w") as fh:
        json.dump(attrs, fh, indent=0, sort_keys=True)


def _run(argv: list[str], cwd: str) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, cwd=cwd)


def capture(out: str) -> None:
    out = os.path.abspath(out)
    repo = os.getcwd()
    work = os.path.join(out, "work")
    os.makedirs(work, exist_ok=True)
    py = sys.executable
    r = _run([py, "-m", "enkal.problems.demo", "--out", os.path.join(work, "demo")], work)
    kept = [line for line in r.stdout.splitlines()
            if not line.rstrip().endswith(" s") and "wrote" not in line]
    with open(os.path.join(out, "demo.stdout"), "w") as fh:
        fh.write("\n".join(kept))
    for method in ("esmda", "annealing"):
        dump_h5(os.path.join(work, "demo", f"lorenz63_{method}.h5"), out, f"demo_{method}")
    cli = os.path.join(os.path.dirname(py), "enkal")
    r = _run([cli, "run", os.path.join(repo, "problems", "lorenz63.toml"), "--seed", "1",
              "--out", os.path.join(work, "l63.h5"), "--quiet"], work)
    with open(os.path.join(out, "cli.stdout"), "w") as fh:
        fh.write(r.stdout.replace(work, "WORK"))
    dump_h5(os.path.join(work, "l63.h5"), out, "cli_l63")
    dump_h5(os.path.join(work, "l63.ckpt.h5"), out, "cli_l63_ckpt")
    _run([py, "-c", DIGITS, os.path.join(out, "digits.pt")], work)
    tests = os.path.join(repo, "tests")
    for mode, name in (("full", "full.h5"), ("kill", "killed.h5")):
        _run([py, "-c", KILL, os.path.join(work, name), mode, tests], work)
    dump_h5(os.path.join(work, "killed.h5"), out, "kill_before_resume")
    _run([py, "-c", KILL, os.path.join(work, "killed.h5"), "resume", tests], work)
    dump_h5(os.path.join(work, "full.h5"), out, "kill_full")
    dump_h5(os.path.join(work, "killed.h5"), out, "kill_resumed")
    print(f"captured into {out}")


def _flat(d: dict, prefix: str = ""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _flat(v, f"{prefix}{k}.")
        else:
            yield prefix + k, v


def compare(a: str, b: str) -> int:
    import torch

    bad = 0
    for name in sorted(os.listdir(a)):
        pa, pb = os.path.join(a, name), os.path.join(b, name)
        if os.path.isdir(pa):
            continue
        if not os.path.exists(pb):
            print(f"MISSING {name}")
            bad += 1
        elif name.endswith(".npz"):
            x, y = np.load(pa), np.load(pb)
            for k in sorted(set(x.files) | set(y.files)):
                if k not in x.files or k not in y.files:
                    print(f"ONLY IN ONE {name}:{k}")
                    bad += 1
                elif x[k].dtype != y[k].dtype or x[k].shape != y[k].shape or \
                        x[k].tobytes() != y[k].tobytes():
                    print(f"DIFF {name}:{k}")
                    bad += 1
        elif name.endswith(".pt"):
            fx = dict(_flat(torch.load(pa, weights_only=True)))
            fy = dict(_flat(torch.load(pb, weights_only=True)))
            for k in sorted(set(fx) | set(fy)):
                if k not in fx or k not in fy or not torch.equal(fx[k], fy[k]):
                    print(f"DIFF {name}:{k}")
                    bad += 1
        else:
            with open(pa) as fa, open(pb) as fb:
                if fa.read() != fb.read():
                    print(f"DIFF {name}")
                    bad += 1
    print(f"{bad} differences")
    print("BENCH_JSON " + json.dumps({"bench": "seeded_results", "differences": bad}))
    return bad


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("capture", help="capture the seeded results into a folder")
    c.add_argument("out")
    d = sub.add_parser("compare", help="compare two captures byte for byte")
    d.add_argument("a")
    d.add_argument("b")
    args = p.parse_args()
    if args.command == "capture":
        capture(args.out)
        return 0
    return 1 if compare(args.a, args.b) else 0


if __name__ == "__main__":
    sys.exit(main())
