r"""Observation series and minibatches: a different subset of the data at every update.

With many independent observation samples (experiments under different conditions, windows
of a long record, repeated measurements), each update can assimilate a *minibatch* of them,
as EnsembleKalmanProcesses.jl's ``ObservationSeries`` with its minibatcher does: every
epoch goes through the samples in a new random order (or in order), ``batch_size`` at a
time, and an update uses the samples of its batch only, their values stacked and their noise
block-diagonal. The update's cost then scales with the batch, not with all the data.

The batch of update ``k`` is a function of ``k`` and the series' ``seed`` alone (the epoch's
permutation is drawn from a generator seeded by ``(seed, epoch)``), so a run resumed from a
checkpoint continues with the right batch and no state is kept. Each epoch has ``n_samples
// batch_size`` batches of equal size; with a ``batch_size`` that does not divide the number
of samples, the samples left over in an epoch's order are not used in that epoch (EKP's
"trim").

All samples have the same size ``m``. The model predicts every sample (``N_obs = n_samples m``
columns, the order of ``samples``): the smoother takes the batch's columns. Driving the model
yourself (ask/tell), give only the batch's predictions (``batch_size m`` columns, the order of
``series.batch(k)``) and run only those samples: ``EnsembleSmoother.batch(state)`` says which.

>>> import torch
>>> samples = [Observations(torch.tensor([float(i), -float(i)]), noise_std=0.1)
...            for i in range(6)]
>>> series = ObservationSeries(samples, batch_size=2, shuffle=False)
>>> series.batch(0), series.batch(1), series.batch(3)     # epoch 2 starts at update 3
((0, 1), (2, 3), (0, 1))
>>> series.columns((2, 3)).tolist()
[4, 5, 6, 7]
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from ._checks import check_positive_int
from .observations import Observations

__all__ = ["ObservationSeries"]


class ObservationSeries:
    """Independent observation samples, assimilated ``batch_size`` at a time.

    Parameters
    ----------
    samples : sequence of Observations
        The samples, all of one size ``m``; at least one.
    batch_size : int
        Samples per update (at most ``len(samples)``).
    shuffle : bool
        A new random order every epoch (default); ``False``: in order.
    seed : int
        Seeds the epochs' orders.
    """

    def __init__(self, samples: Sequence[Observations], batch_size: int, *,
                 shuffle: bool = True, seed: int = 0) -> None:
        if isinstance(samples, Observations) or not isinstance(samples, Sequence):
            raise TypeError("samples: expected a sequence of enkal.Observations, got "
                            f"{type(samples).__name__}")
        samples = list(samples)
        if not samples:
            raise ValueError("samples: expected at least one Observations, got none")
        for i, s in enumerate(samples):
            if not isinstance(s, Observations):
                raise TypeError(f"samples[{i}]: expected enkal.Observations, got "
                                f"{type(s).__name__}")
        sizes = sorted({s.size for s in samples})
        if len(sizes) != 1:
            raise ValueError(f"samples: expected samples of one size, got sizes {sizes}")
        check_positive_int(batch_size, "batch_size")
        if batch_size > len(samples):
            raise ValueError(f"batch_size: expected at most {len(samples)} (the number of "
                             f"samples), got {batch_size}")
        if not isinstance(shuffle, bool):
            raise TypeError(f"shuffle: expected a bool, got {type(shuffle).__name__}")
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 31:
            raise ValueError(f"seed: expected an int in [0, 2**31), got {seed!r}")
        self.samples = tuple(samples)
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.seed = seed
        self.sample_size = sizes[0]
        self.all = _stack(self.samples)

    @classmethod
    def split(cls, observations: Observations, n_samples: int, batch_size: int, *,
              shuffle: bool = True, seed: int = 0) -> ObservationSeries:
        """``observations`` cut into ``n_samples`` consecutive samples of equal size (its
        noise must not correlate two samples: a diagonal one, or block-diagonal)."""
        if not isinstance(observations, Observations):
            raise TypeError(f"observations: expected enkal.Observations, got "
                            f"{type(observations).__name__}")
        check_positive_int(n_samples, "n_samples")
        if observations.size % n_samples:
            raise ValueError(f"n_samples: {n_samples} does not divide the {observations.size} "
                             "observations into samples of one size")
        m = observations.size // n_samples
        y = observations.values
        if observations.is_diagonal:
            std = observations.noise_std
            parts = [Observations(y[i * m:(i + 1) * m], noise_std=std[i * m:(i + 1) * m])
                     for i in range(n_samples)]
        else:
            cov = observations.covariance()
            blocks = torch.block_diag(*[cov[i * m:(i + 1) * m, i * m:(i + 1) * m]
                                        for i in range(n_samples)])
            if not torch.equal(blocks, cov):
                raise ValueError("observations: the noise covariance correlates different "
                                 "samples; they cannot be assimilated in separate batches")
            parts = [Observations(y[i * m:(i + 1) * m],
                                  noise_cov=cov[i * m:(i + 1) * m, i * m:(i + 1) * m])
                     for i in range(n_samples)]
        return cls(parts, batch_size, shuffle=shuffle, seed=seed)

    def __len__(self) -> int:
        return len(self.samples)

    def __repr__(self) -> str:
        return (f"ObservationSeries({len(self)} samples of {self.sample_size}, "
                f"batch_size={self.batch_size}, shuffle={self.shuffle}, seed={self.seed})")

    @property
    def batches_per_epoch(self) -> int:
        return len(self.samples) // self.batch_size

    def batch(self, iteration: int) -> tuple[int, ...]:
        """The sample indices of update ``iteration`` (0 for the first), in order."""
        if isinstance(iteration, bool) or not isinstance(iteration, int) or iteration < 0:
            raise ValueError(f"iteration: expected an int >= 0, got {iteration!r}")
        epoch, k = divmod(iteration, self.batches_per_epoch)
        order = self._order(epoch)
        return order[k * self.batch_size:(k + 1) * self.batch_size]

    def columns(self, batch: Sequence[int]) -> torch.Tensor:
        """The columns of the full predictions ``(N_ens, n_samples m)`` that ``batch`` uses."""
        m = self.sample_size
        idx = torch.tensor(list(batch), dtype=torch.long)
        return (idx[:, None] * m + torch.arange(m)).reshape(-1)

    def observations(self, batch: Sequence[int]) -> Observations:
        """The batch's samples as one :class:`Observations` (values stacked, noise
        block-diagonal)."""
        return self._stacked(tuple(int(i) for i in batch))

    def describe(self) -> dict:
        """A plain description (for a run's configuration)."""
        return {"type": "ObservationSeries", "n_samples": len(self),
                "sample_size": self.sample_size, "batch_size": self.batch_size,
                "shuffle": self.shuffle, "seed": self.seed}

    @functools.lru_cache(maxsize=64)  # noqa: B019 - the series lives as long as its smoother
    def _stacked(self, batch: tuple[int, ...]) -> Observations:
        return _stack([self.samples[i] for i in batch])

    @functools.lru_cache(maxsize=4)  # noqa: B019
    def _order(self, epoch: int) -> tuple[int, ...]:
        n = len(self.samples)
        if not self.shuffle:
            return tuple(range(n))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return tuple(int(i) for i in torch.randperm(n, generator=g))


def _stack(samples: Sequence[Observations]) -> Observations:
    """One :class:`Observations`: values concatenated, noise block-diagonal."""
    values = torch.cat([s.values for s in samples])
    if all(s.is_diagonal for s in samples):
        return Observations(values, noise_std=torch.cat([s.noise_std for s in samples]))
    blocks = [s.noise_chol if s.noise_chol is not None else torch.diag(s.noise_std)
              for s in samples]
    return Observations(values, noise_chol=torch.block_diag(*blocks))
