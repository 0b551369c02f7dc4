"""Neural forward models: networks whose weights are the unknowns.

The machinery lives in the core, :mod:`enkal.nn`, because :class:`EnsembleKalmanOptimizer`
(a core class) evaluates networks and the core never imports ``enkal.models``; this module
re-exports it next to the other forward models and adds the reference architectures:

* :class:`NeuralModel` -- the ensemble forward of any ``nn.Module``: ``(N_ens, N_par)``
  weights and a batch ``(B, ...)`` -> outputs ``(N_ens, B, n_out)`` by ``torch.func.vmap``
  or a loop over members, in chunks of ``members_per_call``, on one or several devices;
  ``with_inputs(inputs)`` is the :class:`~enkal.ForwardModel` ``(N_ens, N_par) ->
  (N_ens, B * n_out)`` of one fixed batch (:class:`BatchForward`).
* :func:`mlp` -- a fully connected ReLU network, e.g. the digits MLP ``mlp([64, 64, 32, 10])``.
* :class:`LeNet5` -- LeCun et al.'s convolutional network for 28x28 images (tanh, average
  pooling, 61706 parameters).

>>> import torch
>>> net = mlp([64, 64, 32, 10])
>>> model = NeuralModel(net)
>>> model.layout.size
6570
>>> model.predict(model.flatten().expand(3, -1), torch.zeros(5, 64)).shape
torch.Size([3, 5, 10])
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from enkal.nn import BatchForward, Classification, NeuralModel, Regression

__all__ = ["NeuralModel", "BatchForward", "Classification", "Regression", "mlp", "LeNet5"]


def mlp(sizes: Sequence[int], *, activation: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    """A fully connected network ``sizes[0] -> ... -> sizes[-1]`` with ``activation``
    between layers (none after the last). Parameter names ``"0.weight"``, ``"0.bias"``,
    ``"2.weight"``...

    >>> [n for n, _ in mlp([3, 4, 2]).named_parameters()]
    ['0.weight', '0.bias', '2.weight', '2.bias']
    """
    sizes = list(sizes)
    if len(sizes) < 2 or not all(isinstance(s, int) and s > 0 for s in sizes):
        raise ValueError(f"sizes: expected at least two positive ints, got {sizes}")
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)


class LeNet5(nn.Module):
    """LeNet-5 for ``(B, 1, 28, 28)`` images: conv 5x5 (6, padding 2) - tanh - avgpool -
    conv 5x5 (16) - tanh - avgpool - 120 - 84 - ``n_classes``; 61706 parameters for 10
    classes.

    >>> sum(p.numel() for p in LeNet5().parameters())
    61706
    """

    def __init__(self, n_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 6, 5, padding=2), nn.Tanh(), nn.AvgPool2d(2),
            nn.Conv2d(6, 16, 5), nn.Tanh(), nn.AvgPool2d(2), nn.Flatten())
        self.classifier = nn.Sequential(
            nn.Linear(400, 120), nn.Tanh(), nn.Linear(120, 84), nn.Tanh(),
            nn.Linear(84, n_classes))

    def forward(self, x):
        return self.classifier(self.features(x))
