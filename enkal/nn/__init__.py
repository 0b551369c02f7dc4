r"""Neural networks as ensembles: evaluate ``N_ens`` weight vectors of one ``nn.Module``, and
train it with ensemble Kalman updates like a torch optimizer.

Two levels, one implementation:

* :class:`NeuralModel` -- the ensemble forward of a module. Its trainable parameters are
  flattened, in ``module.named_parameters()`` order, through a :class:`ParameterLayout`
  whose block names are the parameters' names (``"0.weight"``, ``"fc1.bias"``), so an
  ensemble ``(N_ens, N_par)`` is stored and named like any other. ``predict(parameters,
  inputs)`` maps ``(N_ens, N_par)`` weights and a batch ``(B, ...)`` to outputs
  ``(N_ens, B, n_out)``, by ``torch.func`` (``functional_call`` on stacked parameters under
  ``vmap``) or by a loop over members (the same ``functional_call`` per member); both give
  the same outputs. ``with_inputs(inputs)`` is the :class:`~enkal.ForwardModel` of one fixed
  batch, ``(N_ens, N_par) -> (N_ens, B * n_out)``, for :class:`~enkal.EnsembleSmoother`.
* :class:`EnsembleKalmanOptimizer` -- a ``torch.optim.Optimizer``: ``opt.step(inputs,
  targets)`` on minibatches, the ensemble mean written into the module after every step so
  evaluation code is unchanged; ``lr`` (LR schedulers) multiplies the mean increment.
  :class:`HybridOptimizer` alternates it with a gradient optimizer (AdamW).

The modules: ``model`` (:class:`NeuralModel`, :class:`BatchForward`), ``tasks`` (the output
and target maps), ``members`` (:class:`Sections`, :class:`Redraw`, :class:`Carry`),
``noise`` (:class:`RelativeNoise`), ``optimizer`` and ``hybrid``; import from
:mod:`enkal.nn` (or :mod:`enkal`).

What a member's prediction is (:class:`Classification`, :class:`Regression`)
---------------------------------------------------------------------------
The update needs predictions ``(N_ens, N_obs)`` and observations ``y`` ``(N_obs,)`` with
``N_obs = B * n_out``:

* :class:`Classification` (default for integer class labels): a member's prediction is its
  softmax probabilities ``(B, C)`` flattened row by row, and ``y`` is the one-hot encoding
  of the labels (or given class probabilities, ``(B, C)`` floats). Probabilities beat raw
  logits as predictions (logits are unbounded; an update that matches one-hot targets in
  logit space pushes them to infinity). With ``probabilities=False`` the raw outputs are
  compared with the one-hot targets instead.
* :class:`Regression` (default for floating targets): the raw outputs against targets of
  shape ``(B, n_out)`` (or ``(B,)`` when ``n_out = 1``).

The noise is diagonal, ``noise_std = noise`` for every entry (in units of the mapped
targets: probabilities for classification), scaled by the schedule's ``rho`` (``alpha =
rho^2``). The default schedule, :meth:`RelativeNoise.newton`, sets ``rho`` from the spread
of the predictions instead (small: a Gauss-Newton step in the ensemble's subspace, of
which the optimizer takes a tenth, inside a trust region of the redraw's spread), and the
default :class:`Redraw` draws a fresh ensemble around the mean every step (the researched recipe;
``docs/nn.md`` 1.6).

Backends
--------
``backend="vmap"`` runs all members of a chunk in one batched call; ``"loop"`` calls the
module once per member. ``"auto"`` (default) uses a fixed, documented rule (deterministic,
so a resumed run repeats itself): the loop when the module has a convolution and computes on
a CPU (``vmap`` turns the members' convolutions into one grouped convolution, 2-3x slower
than separate ones on CPU; ``bench/forward.py``), or when a call holds fewer than
``AUTO_VMAP_MIN_MEMBERS`` members (vmap's fixed overhead dominates); ``vmap`` otherwise.
If ``vmap`` cannot batch an operation of the module, ``"auto"`` falls back to the loop.

Buffers (BatchNorm running statistics) are not parameters: they are shared, read-only, by
all members. A BatchNorm layer in training mode normalises each member by that member's own
statistics on the batch, as it does for one network in training, and no member writes the
running statistics: :class:`EnsembleKalmanOptimizer` updates them once per step from a
forward of the new mean (:meth:`NeuralModel.track_statistics`), so that after
``module.eval()`` the network normalises as after gradient training. In evaluation mode
every member uses the running statistics. A Dropout layer in training mode would make
predictions random: it is refused with a message (call ``module.eval()``). Parameters
with ``requires_grad=False`` are frozen: they stay out of the layout and out of the
ensemble, like buffers.

>>> import torch
>>> from torch import nn
>>> net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
>>> model = NeuralModel(net)
>>> model.layout.size, [b.name for b in model.layout.blocks]
(26, ['0.weight', '0.bias', '2.weight', '2.bias'])
>>> theta = model.flatten().expand(5, -1)              # 5 identical members
>>> x = torch.randn(7, 3, dtype=torch.float64)
>>> out = model.predict(theta, x)
>>> out.shape, bool(torch.allclose(out[0], net(x)))
(torch.Size([5, 7, 2]), True)
"""

from .hybrid import HybridOptimizer
from .members import Carry, Redraw, Sections, kaiming_std
from .model import AUTO_VMAP_MIN_MEMBERS, BatchForward, NeuralModel
from .model import BACKENDS as BACKENDS
from .noise import RelativeNoise, RelativeNoiseState
from .optimizer import EnsembleKalmanOptimizer
from .tasks import Classification, Regression

__all__ = [
    "NeuralModel",
    "BatchForward",
    "Classification",
    "Regression",
    "Sections",
    "EnsembleKalmanOptimizer",
    "HybridOptimizer",
    "Redraw",
    "Carry",
    "RelativeNoise",
    "RelativeNoiseState",
    "kaiming_std",
    "AUTO_VMAP_MIN_MEMBERS",
]
