"""Forward-model implementations (installed as ``enkal.models``).

Simulators, vectorised over ensemble members (``(N_ens, N_par) -> (N_ens, N_obs)``):

* :mod:`enkal.models.ode` -- :class:`ODEModel` with :class:`RK4` / :class:`DormandPrince`;
  :class:`Lorenz63`, :class:`Lorenz96`, :class:`SIR`, :class:`LotkaVolterra`.
* :mod:`enkal.models.sde` -- :class:`SDEModel` (Euler-Maruyama);
  :class:`OrnsteinUhlenbeck`, :class:`GeometricBrownianMotion`, :class:`StochasticLorenz63`.
* :mod:`enkal.models.jump` -- :class:`JumpModel` with :class:`Gillespie` /
  :class:`TauLeaping`; :class:`BirthDeath`, :class:`StochasticSIR`,
  :class:`StochasticLotkaVolterra`.
* :mod:`enkal.models.polynomial` -- :class:`PolynomialODE`: a library of monomials (sparse
  identification of dynamics by structure adaptation, ``docs/adaptation.md``).
* :mod:`enkal.models.nn` -- neural networks: :class:`NeuralModel` (from :mod:`enkal.nn`),
  :func:`mlp`, :class:`LeNet5`.
* :mod:`enkal.models.template` -- :class:`TemplateModel` (copy me) and
  :class:`ExternalProgramModel` (one external program run per member).
"""

from .jump import (
    BirthDeath,
    Gillespie,
    JumpModel,
    StochasticLotkaVolterra,
    StochasticSIR,
    TauLeaping,
)
from .nn import LeNet5, NeuralModel, mlp
from .ode import RK4, SIR, DormandPrince, Lorenz63, Lorenz96, LotkaVolterra, ODEModel
from .polynomial import PolynomialODE
from .sde import GeometricBrownianMotion, OrnsteinUhlenbeck, SDEModel, StochasticLorenz63
from .template import ExternalProgramModel, TemplateModel

__all__ = [
    "BirthDeath",
    "DormandPrince",
    "ExternalProgramModel",
    "GeometricBrownianMotion",
    "Gillespie",
    "JumpModel",
    "Lorenz63",
    "Lorenz96",
    "LeNet5",
    "LotkaVolterra",
    "NeuralModel",
    "ODEModel",
    "OrnsteinUhlenbeck",
    "PolynomialODE",
    "RK4",
    "SDEModel",
    "SIR",
    "StochasticLorenz63",
    "StochasticLotkaVolterra",
    "StochasticSIR",
    "TauLeaping",
    "TemplateModel",
    "mlp",
]
