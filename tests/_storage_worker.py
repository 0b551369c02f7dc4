"""A small streaming smoother run for ``tests/test_storage.py`` to kill and resume.

    python tests/_storage_worker.py DIR --iterations N [--sleep S] [--resume] [--run]

Without ``--run``: writes ``DIR/history.h5`` (a row per iteration, predictions kept) and an
explicit ``DIR/checkpoint.h5`` (after the start and after every update, always after the
history row) in the loop ``EnsembleSmoother.run`` does, and prints each completed iteration
on its own line (flushed), so that a test can SIGKILL it mid-run and then resume it with
``--resume`` (from the checkpoint).

With ``--run``: ``enkal.run(smoother, ..., store=DIR/history.h5)`` with its default checkpoint
policy (the history rows hold the state; ``DIR/history.ckpt.h5`` only at the start and the
end); each iteration is printed by a callback, i.e. *before* its row is written.
``--resume`` then is ``run(resume=DIR/history.h5)``: the history is its own checkpoint.

The problem: a nonlinear 3-parameter model (one ``Positive`` parameter), 32 members, the
perturbed-observations update and fixed annealing, so the generator state matters.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import enkal
from enkal import storage

N_ENS = 32
HISTORY = storage.History(every=1, final=True, predictions=True)


def _forward(x: torch.Tensor) -> torch.Tensor:
    return torch.stack([x[:, 0] ** 2 + x[:, 1], torch.sin(x[:, 1]), x[:, 0] * x[:, 2]], 1)


def build() -> tuple[enkal.CallableModel, enkal.EnsembleSmoother, torch.Tensor]:
    model = enkal.CallableModel(
        _forward, parameters=["a", ("b", (), enkal.Positive()), "c"], output_size=3,
        output_names=["a^2+b", "sin(b)", "a*c"])
    observations = enkal.Observations([1.2, 0.4, -0.5], noise_std=[0.1, 0.05, 0.1])
    smoother = enkal.EnsembleSmoother(
        observations, rule=enkal.PerturbedObservations(),
        schedule=enkal.FixedAnnealing(factor=0.9, initial=1.0, floor=0.05), seed=11)
    prior = torch.randn(N_ENS, 3, generator=torch.Generator().manual_seed(5),
                        dtype=torch.float64)
    return model, smoother, prior


def run(directory: Path, iterations: int, *, sleep: float = 0.0, resume: bool = False):
    model, smoother, prior = build()
    history, checkpoint = directory / "history.h5", directory / "checkpoint.h5"
    directory.mkdir(parents=True, exist_ok=True)
    state = storage.read_checkpoint(checkpoint, smoother) if resume else smoother.init(prior)
    writer = storage.HistoryWriter(
        history, layout=model.layout, observations=smoother.observations,
        config=smoother.config(), history=HISTORY, output_names=model.output_names,
        resume_from=state.iteration if resume else None)
    writer.start(state.iteration, state.parameters, mask=state.mask)
    if not resume:
        storage.write_checkpoint(checkpoint, smoother, state)
    while state.iteration < iterations:
        predictions, ok = enkal.evaluate(model, model.layout.to_physical(state.parameters))
        state, info = smoother.step(state, predictions, ok=ok)
        writer.record(state, info, predictions=predictions,
                      final=state.iteration == iterations)
        storage.write_checkpoint(checkpoint, smoother, state)
        print(state.iteration, flush=True)
        if sleep:
            time.sleep(sleep)
    writer.close(attrs={"stopped_by": "max_iterations"})
    return state


def run_smoother(directory: Path, iterations: int, *, sleep: float = 0.0,
                 resume: bool = False) -> enkal.SmootherResult:
    model, smoother, prior = build()
    history = directory / "history.h5"
    directory.mkdir(parents=True, exist_ok=True)

    def report(state, info):
        print(state.iteration, flush=True)
        if sleep:
            time.sleep(sleep)

    return enkal.run(smoother, model, None if resume else prior, store=history,
                     history=HISTORY, resume=history if resume else None,
                     max_iterations=iterations, callbacks=[report])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--iterations", type=int, required=True)
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--run", action="store_true", help="enkal.run, store=")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the same BLAS path in every process: bitwise comparisons
    (run_smoother if args.run else run)(args.directory, args.iterations, sleep=args.sleep,
                                        resume=args.resume)


if __name__ == "__main__":
    main()
