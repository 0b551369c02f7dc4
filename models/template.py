"""Templates for your own forward models: a vectorised one, and one around an external program.

Copy :class:`TemplateModel` to wrap a simulator you can write in torch; copy (or use)
:class:`ExternalProgramModel` for a simulator you can only run as a program. The contract
of :class:`enkal.ForwardModel`, in short:

1. ``layout``: a :class:`~enkal.ParameterLayout` naming the ``N_par`` parameters, their
   shapes and constraints (``Positive()`` for rates and scales; the smoother works in the
   unconstrained space and hands ``forward`` the *physical* values).
2. ``output_size``: ``N_obs``, the length of one member's prediction; ``output_names``
   optionally names them.
3. ``forward(parameters)``: ``(n, N_par)`` -> ``(n, N_obs)``, members first, for any ``n``
   (the smoother may pass the whole ensemble or chunks of it, and retries a failed chunk
   one member at a time). Vectorise over the members when you can.
4. ``device`` and ``dtype``: where and in what precision the model computes;
   :func:`enkal.evaluate` moves the parameters there and the predictions back.
5. Failure: return NaN/inf for a member that failed, or raise; either way only that member
   is marked failed (``evaluate``'s ``ok`` mask) and the failure policy deals with it.
6. Randomness: make the prediction a deterministic function of ``(seed, parameters)``
   (see :mod:`enkal.models.sde`), never of a global RNG.

>>> import torch
>>> model = TemplateModel(t_obs=[0.0, 0.5, 1.0])
>>> model(torch.tensor([[1.0, 0.0, 3.0]], dtype=torch.float64)).shape
torch.Size([1, 3])
"""

from __future__ import annotations

import math
import subprocess
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from enkal import ForwardModel, ParameterLayout, Positive, Real
from enkal._checks import check_ensemble, check_members_first, check_positive_int

from ._common import check_dtype_device, check_times

__all__ = ["TemplateModel", "ExternalProgramModel"]


class TemplateModel(ForwardModel):
    """A damped oscillator in closed form: a template for a vectorised forward model.

    ``y(t) = amplitude * exp(-damping * t) * cos(frequency * t)``, observed at ``t_obs``.

    Parameters
    ----------
    t_obs : sequence of floats
        The ``N_obs`` observation times.
    device, dtype :
        Where and in what precision to compute (default CPU, float64).

    Notes
    -----
    Parameters: ``amplitude`` (``Real``), ``damping`` (``Positive``), ``frequency``
    (``Real``); ``forward`` maps ``(N_ens, 3)`` to ``(N_ens, N_obs)``.

    Examples
    --------
    >>> import torch
    >>> m = TemplateModel(t_obs=[0.0, 1.0])
    >>> m(torch.tensor([[2.0, 0.0, 0.0]], dtype=torch.float64))
    tensor([[2., 2.]], dtype=torch.float64)
    """

    def __init__(
        self,
        t_obs: Sequence[float],
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float64,
    ) -> None:
        # 1. validate at the boundary: TypeError for types, ValueError for values
        self.dtype, self.device = check_dtype_device(dtype, device)
        self.t_obs = check_times(t_obs, t0=-math.inf)
        # 2. the parameter layout: readable names and constraints
        self._layout = ParameterLayout(
            [("amplitude", (), Real()), ("damping", (), Positive()), ("frequency", (), Real())]
        )
        # 3. constants live on the model's device, in its dtype
        self._t = torch.tensor(self.t_obs, dtype=self.dtype, device=self.device)

    @property
    def layout(self) -> ParameterLayout:
        return self._layout

    @property
    def output_size(self) -> int:
        return len(self.t_obs)

    @property
    def output_names(self) -> list[str]:
        return [f"y(t={t:g})" for t in self.t_obs]

    def forward(self, parameters: torch.Tensor) -> torch.Tensor:
        """``(N_ens, 3)`` physical parameters -> ``(N_ens, N_obs)`` predictions."""
        check_ensemble(parameters, "parameters", n_columns=self._layout.size)
        if not bool(torch.isfinite(parameters).all()):
            raise ValueError("parameters: expected finite values, got NaN/inf")
        x = parameters.to(device=self.device, dtype=self.dtype)
        p = self._layout.unflatten(x)  # {"amplitude": (n,), "damping": (n,), ...}
        t = self._t[None, :]
        # 4. members are the batch dimension: no loop over members
        return p["amplitude"][:, None] * torch.exp(-p["damping"][:, None] * t) \
            * torch.cos(p["frequency"][:, None] * t)


def _parse_floats(stdout: str) -> list[float]:
    return [float(tok) for tok in stdout.split()]


class ExternalProgramModel(ForwardModel):
    """A forward model that runs an external program once per member and reads its stdout.

    Parameters
    ----------
    command : callable
        ``command(theta) -> argv``: the command line (a list of strings) for one member, from
        ``theta``, a dict ``{name: float}`` (``{name: list}`` for array blocks) of its physical
        parameter values. Format floats with ``repr`` so they round-trip exactly.
    parameters : ParameterLayout or list of names / (name, shape[, constraint]) tuples
    output_size : int
        ``N_obs``.
    parse : callable, optional
        ``parse(stdout: str) -> sequence of N_obs floats``; default: whitespace-separated
        numbers.
    timeout : float, optional
        Seconds per run; a run that times out counts as failed.
    max_workers : int
        Members run concurrently in this many threads (each waits on its own process).
    cwd, env :
        Passed to :func:`subprocess.run`.
    dtype :
        Of the returned predictions (on the CPU).

    Notes
    -----
    A member whose program exits non-zero, times out, or prints something ``parse`` cannot
    read gets a NaN row (so :func:`enkal.evaluate` marks just that member failed, without
    re-running its neighbours) and a ``RuntimeWarning`` with the first line of the reason.

    Examples
    --------
    The "external program" here is Python itself, so the example runs anywhere:

    >>> import sys, torch
    >>> prog = "import sys; a, b = map(float, sys.argv[1:]); print(a + b, a * b)"
    >>> model = ExternalProgramModel(
    ...     lambda th: [sys.executable, "-c", prog, repr(th["a"]), repr(th["b"])],
    ...     parameters=["a", "b"], output_size=2)
    >>> model(torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64))
    tensor([[ 3.,  2.],
            [ 7., 12.]], dtype=torch.float64)
    """

    def __init__(
        self,
        command: Callable[[dict[str, Any]], Sequence[str]],
        *,
        parameters: Any,
        output_size: int,
        parse: Callable[[str], Sequence[float]] | None = None,
        timeout: float | None = None,
        max_workers: int = 1,
        cwd: str | None = None,
        env: dict[str, str] | None = None,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        if not callable(command):
            raise TypeError(f"command: expected a callable theta -> argv, got "
                            f"{type(command).__name__}")
        if parse is not None and not callable(parse):
            raise TypeError(
                f"parse: expected a callable stdout -> floats, got {type(parse).__name__}"
            )
        check_positive_int(output_size, "output_size")
        check_positive_int(max_workers, "max_workers")
        if timeout is not None and not (isinstance(timeout, (int, float)) and timeout > 0):
            raise ValueError(f"timeout: expected seconds > 0 or None, got {timeout!r}")
        self.dtype, self.device = check_dtype_device(dtype, "cpu")
        if isinstance(parameters, ParameterLayout):
            self._layout = parameters
        elif isinstance(parameters, (list, tuple)):
            self._layout = ParameterLayout(parameters)
        else:
            raise TypeError(f"parameters: expected a ParameterLayout or a list of names, got "
                            f"{type(parameters).__name__}")
        self.command = command
        self.parse = parse or _parse_floats
        self.timeout = timeout
        self.max_workers = max_workers
        self.cwd = cwd
        self.env = env
        self._output_size = output_size

    @property
    def layout(self) -> ParameterLayout:
        return self._layout

    @property
    def output_size(self) -> int:
        return self._output_size

    def _theta(self, row: np.ndarray) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for b in self._layout.blocks:
            v = row[b.slice]
            out[b.name] = float(v[0]) if b.shape == () else v.reshape(b.shape).tolist()
        return out

    def _run_one(self, row: np.ndarray) -> tuple[np.ndarray, str | None]:
        nan = np.full(self._output_size, np.nan)
        try:
            argv = [str(a) for a in self.command(self._theta(row))]
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=self.timeout,
                                  cwd=self.cwd, env=self.env, check=False)
        except (OSError, subprocess.SubprocessError) as err:
            return nan, f"{type(err).__name__}: {err}"
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or [""])[-1]
            return nan, f"exit status {proc.returncode}: {last}"
        try:
            y = np.asarray(self.parse(proc.stdout), dtype=np.float64).reshape(-1)
        except (TypeError, ValueError) as err:
            return nan, f"could not parse stdout ({err})"
        if y.shape != (self._output_size,):
            return nan, f"expected {self._output_size} numbers on stdout, got {y.size}"
        return y, None

    def forward(self, parameters: torch.Tensor) -> torch.Tensor:
        """``(N_ens, N_par)`` -> ``(N_ens, N_obs)``: one program run per member."""
        if not isinstance(parameters, torch.Tensor):
            raise TypeError(f"parameters: expected a torch.Tensor, got {type(parameters).__name__}")
        check_members_first(parameters, "parameters", n_columns=self._layout.size)
        rows = parameters.detach().to("cpu", torch.float64).numpy()
        if self.max_workers > 1 and rows.shape[0] > 1:
            with ThreadPoolExecutor(self.max_workers) as pool:
                results = list(pool.map(self._run_one, rows))
        else:
            results = [self._run_one(r) for r in rows]
        for i, (_, why) in enumerate(results):
            if why is not None:
                warnings.warn(f"ExternalProgramModel: member {i} failed: {why}"[:500],
                              RuntimeWarning, stacklevel=2)
        y = np.stack([r[0] for r in results]) if results else np.empty((0, self._output_size))
        return torch.as_tensor(y).to(dtype=self.dtype)
