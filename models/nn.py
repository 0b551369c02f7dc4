"""Neural forward models: networks whose weights are the unknowns.

The machinery lives in the core, :mod:`enkal.nn`, because :class:`EnsembleKalmanOptimizer`
(a core class) evaluates networks and the core never imports ``enkal.models``; this module
re-exports it next to the other forward models and adds the reference architectures:

* :class:`NeuralModel` -- the ensemble forward of any ``nn.Module``: ``(N_ens, N_par)``
  weights and a batch ``(B, ...)`` -> outputs ``(N_ens, B, n_out)`` by ``torch.func.vmap``
  or a loop over members, in chunks of ``members_per_call``, on one or several devices;
  ``with_inputs(inputs)`` is the :class:`~enkal.ForwardModel` ``(N_ens, N_par) ->
  (N_ens, B * n_out)`` of one fixed batch (:class:`BatchForward`).
* :func:`mlp` -- a fully connected ReLU network, e.g. the digits MLP ``mlp([64, 64, 32, 10])``;
  any activation, optionally a LayerNorm after each hidden layer.
* :class:`LeNet5` -- LeCun et al.'s convolutional network for 28x28 images (tanh, average
  pooling, 61706 parameters); ``LeNet5(activation=nn.ReLU, pool=nn.MaxPool2d)`` is the
  modern variant.
* :func:`cnn` -- a small two-convolution network for ``image x image`` inputs (the 8x8
  digits): conv - activation - pool, twice, then a linear classifier (6090 parameters).
* :func:`gap_cnn` -- the same convolutions without pooling between them, then global average
  pooling and a linear classifier (5130 parameters).
* :class:`AsImage` -- the first layer of :func:`cnn` and :func:`gap_cnn`: flat ``(B,
  image * image)`` or image ``(B, 1, image, image)`` inputs to ``(B, 1, image, image)``.

The activation (and pooling) arguments are module classes, called once per layer:
``nn.ReLU``, ``nn.GELU``, ``nn.Tanh``, ``nn.MaxPool2d``, ``nn.AvgPool2d``, or any callable
returning a module, such as ``functools.partial(nn.LeakyReLU, 0.1)``.

>>> import torch
>>> net = mlp([64, 64, 32, 10])
>>> model = NeuralModel(net)
>>> model.layout.size
6570
>>> model.predict(model.flatten().expand(3, -1), torch.zeros(5, 64)).shape
torch.Size([3, 5, 10])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from enkal._checks import check_positive_int
from enkal.nn import BatchForward, Classification, NeuralModel, Regression

__all__ = ["NeuralModel", "BatchForward", "Classification", "Regression", "mlp", "LeNet5",
           "cnn", "gap_cnn", "AsImage"]

#: A module class, or any callable returning a module (``nn.ReLU``, ``nn.MaxPool2d``).
ModuleFactory = Callable[..., nn.Module]


def _check_factory(factory: Any, name: str, example: str = "ReLU") -> None:
    """Refuse what cannot make a layer: a module instance (one object cannot be several
    layers) or something not callable."""
    if isinstance(factory, nn.Module):
        cls = type(factory).__name__
        raise TypeError(f"{name}: expected a module class such as nn.{cls} (called once per "
                        f"layer), got the instance {factory!r}: pass the class, without ()")
    if not callable(factory):
        raise TypeError(f"{name}: expected a module class such as nn.{example}, got "
                        f"{type(factory).__name__} {factory!r}")


def _make(factory: ModuleFactory, name: str, *args: Any, example: str | None = None
          ) -> nn.Module:
    """One layer from ``factory(*args)``, with an error naming the argument (``args`` are
    the pooling's kernel size, ``2``, a norm's channels, or nothing for an activation)."""
    try:
        module = factory(*args)
    except TypeError as err:
        call = f"{getattr(factory, '__name__', repr(factory))}({', '.join(map(repr, args))})"
        example = example or ("MaxPool2d" if args else "ReLU")
        raise TypeError(f"{name}: calling {call} failed ({err}); expected a module class such "
                        f"as nn.{example} or a callable returning an nn.Module") from err
    if not isinstance(module, nn.Module):
        raise TypeError(f"{name}: expected a callable returning an nn.Module, got one "
                        f"returning {type(module).__name__}")
    return module


def mlp(sizes: Sequence[int], *, activation: ModuleFactory = nn.ReLU,
        layer_norm: bool = False) -> nn.Sequential:
    """A fully connected network ``sizes[0] -> ... -> sizes[-1]`` with ``activation``
    between layers (none after the last).

    Parameters
    ----------
    sizes : sequence of int
        Widths, inputs first, classes (outputs) last; at least two.
    activation : module class
        Called once per hidden layer (default ``nn.ReLU``).
    layer_norm : bool
        Put ``nn.LayerNorm(width)`` after each hidden ``Linear``, before its activation
        (``Linear - LayerNorm - activation``); not after the output layer.

    Returns
    -------
    nn.Sequential
        Parameter names ``"0.weight"``, ``"0.bias"``, ``"2.weight"``... (with
        ``layer_norm``: ``"0.weight"``, ``"1.weight"`` (the LayerNorm's), ``"3.weight"``...).

    >>> [n for n, _ in mlp([3, 4, 2]).named_parameters()]
    ['0.weight', '0.bias', '2.weight', '2.bias']
    >>> net = mlp([64, 128, 64, 10], activation=nn.GELU, layer_norm=True)
    >>> sum(p.numel() for p in net.parameters())
    17610
    >>> [type(m).__name__ for m in net][:3]
    ['Linear', 'LayerNorm', 'GELU']
    """
    sizes = list(sizes)
    if len(sizes) < 2 or not all(isinstance(s, int) and s > 0 for s in sizes):
        raise ValueError(f"sizes: expected at least two positive ints, got {sizes}")
    _check_factory(activation, "activation")
    if not isinstance(layer_norm, bool):
        raise TypeError(f"layer_norm: expected True or False, got {type(layer_norm).__name__} "
                        f"{layer_norm!r}")
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            if layer_norm:
                layers.append(nn.LayerNorm(b))
            layers.append(_make(activation, "activation"))
    return nn.Sequential(*layers)


class LeNet5(nn.Module):
    """LeNet-5 for ``(B, 1, 28, 28)`` images: conv 5x5 (6, padding 2) - tanh - avgpool -
    conv 5x5 (16) - tanh - avgpool - 120 - 84 - ``n_classes``; 61706 parameters for 10
    classes.

    Parameters
    ----------
    n_classes : int
        Outputs of the last layer.
    activation : module class
        After each convolution and hidden linear layer (default ``nn.Tanh``, the original).
    pool : module class
        Called as ``pool(2)`` after each convolution's activation (default ``nn.AvgPool2d``,
        the original; ``nn.MaxPool2d`` with ``activation=nn.ReLU`` is the modern variant).

    The defaults give the original network: the same layers, parameter names
    (``features.0.weight`` ... ``classifier.4.bias``) and, for a given ``torch.manual_seed``,
    the same initial weights; ``activation`` and ``pool`` have no parameters, so every
    variant has the same 61706.

    >>> sum(p.numel() for p in LeNet5().parameters())
    61706
    >>> net = LeNet5(activation=nn.ReLU, pool=nn.MaxPool2d)
    >>> net(torch.zeros(2, 1, 28, 28)).shape
    torch.Size([2, 10])
    """

    def __init__(self, n_classes: int = 10, *, activation: ModuleFactory = nn.Tanh,
                 pool: ModuleFactory = nn.AvgPool2d) -> None:
        super().__init__()
        check_positive_int(n_classes, "n_classes")
        _check_factory(activation, "activation")
        _check_factory(pool, "pool", "MaxPool2d")
        self.features = nn.Sequential(
            nn.Conv2d(1, 6, 5, padding=2), _make(activation, "activation"), _make(pool, "pool", 2),
            nn.Conv2d(6, 16, 5), _make(activation, "activation"), _make(pool, "pool", 2),
            nn.Flatten())
        self.classifier = nn.Sequential(
            nn.Linear(400, 120), _make(activation, "activation"),
            nn.Linear(120, 84), _make(activation, "activation"),
            nn.Linear(84, n_classes))

    def forward(self, x):
        return self.classifier(self.features(x))


# -- small convolutional networks for 8x8 images (the digits) ---------------------------------
class AsImage(nn.Module):
    """Inputs ``(B, image * image)`` (flat, as :func:`enkal.problems.datasets.load_digits`
    gives them) or ``(B, 1, image, image)`` as ``(B, 1, image, image)``: one-channel images
    for the convolutions that follow. No parameters.

    >>> AsImage(8)(torch.zeros(5, 64)).shape
    torch.Size([5, 1, 8, 8])
    >>> AsImage(8)(torch.zeros(5, 1, 8, 8)).shape
    torch.Size([5, 1, 8, 8])
    """

    def __init__(self, image: int) -> None:
        super().__init__()
        check_positive_int(image, "image")
        self.image = image

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.image
        if tuple(x.shape[1:]) not in ((n * n,), (1, n, n)):
            raise ValueError(f"inputs: expected (B, {n * n}) or (B, 1, {n}, {n}) images, got "
                             f"shape {tuple(x.shape)}")
        return x.reshape(x.shape[0], 1, n, n)

    def extra_repr(self) -> str:
        return f"image={self.image}"


def _check_channels(channels: Any) -> tuple[int, int]:
    if isinstance(channels, (str, bytes)) or not isinstance(channels, Sequence):
        raise TypeError(f"channels: expected two ints (first, second convolution), got "
                        f"{type(channels).__name__} {channels!r}")
    if len(channels) != 2:
        raise ValueError(f"channels: expected two ints (first, second convolution), got "
                         f"{len(channels)}: {tuple(channels)}")
    for c in channels:
        check_positive_int(c, "channels")
    return int(channels[0]), int(channels[1])


def cnn(activation: ModuleFactory = nn.ReLU, pool: ModuleFactory = nn.MaxPool2d, *,
        image: int = 8, channels: Sequence[int] = (16, 32), n_classes: int = 10,
        norm: ModuleFactory | None = None) -> nn.Sequential:
    """A small convolutional network for ``image x image`` one-channel images.

    ``AsImage(image)`` - conv 3x3 (``channels[0]``, padding 1) - activation - ``pool(2)`` -
    conv 3x3 (``channels[1]``, padding 1) - activation - ``pool(2)`` - flatten - linear to
    ``n_classes``. With the defaults (8x8 digits): 160 + 4640 + 1290 = 6090 parameters.

    Parameters
    ----------
    activation : module class
        After each convolution (default ``nn.ReLU``; ``nn.Tanh`` with ``nn.AvgPool2d`` is the
        LeNet-style variant).
    pool : module class
        Called as ``pool(2)``: halves the image after each activation (default
        ``nn.MaxPool2d``).
    image : int
        Side of the square input images (at least 4: two poolings by 2).
    channels : pair of int
        Output channels of the two convolutions.
    n_classes : int
        Outputs.
    norm : module class, optional
        Called as ``norm(channels)`` between each convolution and its activation (e.g.
        ``nn.BatchNorm2d``: 2 x (16 + 32) = 96 more parameters with the defaults). Default
        none.

    Returns
    -------
    nn.Sequential
        Accepts flat ``(B, image * image)`` or ``(B, 1, image, image)`` inputs, gives
        ``(B, n_classes)``. Layers are built in order (first convolution, second, linear),
        so ``torch.manual_seed(s); cnn()`` initialises as a hand-built ``nn.Sequential`` of
        the same layers does. Parameters ``"1.weight"``, ``"1.bias"``, ``"4.*"``, ``"8.*"``
        (with ``norm``: ``"1.*"``, ``"2.*"``, ``"5.*"``, ``"6.*"``, ``"10.*"``).

    >>> net = cnn()
    >>> sum(p.numel() for p in net.parameters())
    6090
    >>> net(torch.zeros(5, 64)).shape, net(torch.zeros(5, 1, 8, 8)).shape
    (torch.Size([5, 10]), torch.Size([5, 10]))
    >>> sum(p.numel() for p in cnn(nn.Tanh, nn.AvgPool2d).parameters())
    6090
    >>> sum(p.numel() for p in cnn(norm=nn.BatchNorm2d).parameters())
    6186
    """
    _check_factory(activation, "activation")
    _check_factory(pool, "pool", "MaxPool2d")
    if norm is not None:
        _check_factory(norm, "norm", "BatchNorm2d")
    check_positive_int(image, "image", minimum=4)
    c0, c1 = _check_channels(channels)
    check_positive_int(n_classes, "n_classes")

    def block(c_in: int, c_out: int) -> list[nn.Module]:
        normed = [] if norm is None else [_make(norm, "norm", c_out, example="BatchNorm2d")]
        return [nn.Conv2d(c_in, c_out, 3, padding=1), *normed, _make(activation, "activation"),
                _make(pool, "pool", 2)]

    return nn.Sequential(AsImage(image), *block(1, c0), *block(c0, c1),
                         nn.Flatten(), nn.Linear(c1 * (image // 4) ** 2, n_classes))


def gap_cnn(activation: ModuleFactory = nn.ReLU, *, image: int = 8,
            channels: Sequence[int] = (16, 32), n_classes: int = 10) -> nn.Sequential:
    """A convolutional network with global average pooling for ``image x image`` images.

    ``AsImage(image)`` - conv 3x3 (``channels[0]``, padding 1) - activation - conv 3x3
    (``channels[1]``, padding 1) - activation - ``AdaptiveAvgPool2d(1)`` - flatten - linear
    ``channels[1] -> n_classes``. With the defaults: 160 + 4640 + 330 = 5130 parameters,
    whatever the image size.

    Parameters
    ----------
    activation : module class
        After each convolution (default ``nn.ReLU``).
    image : int
        Side of the square input images.
    channels : pair of int
        Output channels of the two convolutions.
    n_classes : int
        Outputs.

    Returns
    -------
    nn.Sequential
        Accepts flat ``(B, image * image)`` or ``(B, 1, image, image)`` inputs, gives
        ``(B, n_classes)``; layers built in order (first convolution, second, linear).

    >>> net = gap_cnn()
    >>> sum(p.numel() for p in net.parameters())
    5130
    >>> net(torch.zeros(5, 64)).shape
    torch.Size([5, 10])
    """
    _check_factory(activation, "activation")
    check_positive_int(image, "image")
    c0, c1 = _check_channels(channels)
    check_positive_int(n_classes, "n_classes")
    return nn.Sequential(
        AsImage(image),
        nn.Conv2d(1, c0, 3, padding=1), _make(activation, "activation"),
        nn.Conv2d(c0, c1, 3, padding=1), _make(activation, "activation"),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c1, n_classes))
