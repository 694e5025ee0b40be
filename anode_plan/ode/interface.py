"""torchdiffeq's other entry points, ``odeint_adjoint`` and ``odeint_event``, on :func:`anode_plan.odeint`.

Porting is changing the import: ``from torchdiffeq import odeint_adjoint`` becomes
``from anode_plan import odeint_adjoint``, with the same arguments. The adjoint method
(Chen, Rubanova, Bettencourt and Duvenaud, "Neural Ordinary Differential Equations",
NeurIPS 2018) trades exactness for memory by re-solving an adjoint ODE backwards; here the
memory is the budget's (``options={"memory_budget": ...}``) and the gradients stay exact
for the steps taken, so ``odeint_adjoint`` *is* :func:`anode_plan.odeint`: ``adjoint_params``
chooses the tensors that get gradients (as ``params=``), and ``adjoint_rtol``,
``adjoint_atol``, ``adjoint_method`` and ``adjoint_options`` are checked and accepted but
have nothing to control (there is no adjoint solve).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from anode_plan.errors import SolverConfigError
from anode_plan.ode.solve import METHODS, odeint, solve_ode

ADJOINT_NORMS = ("seminorm",)
"""The named ``adjoint_options['norm']`` values torchdiffeq takes (a function is taken too)."""


def odeint_adjoint(func: Callable, y0, t: torch.Tensor, *, rtol: float = 1e-7, atol: float = 1e-9,
                   method: str | None = None, options: dict | None = None, event_fn: Callable | None = None,
                   adjoint_rtol: float | None = None, adjoint_atol: float | None = None,
                   adjoint_method: str | None = None, adjoint_options: dict | None = None,
                   adjoint_params: Sequence[torch.Tensor] | None = None):
    """``torchdiffeq.odeint_adjoint``'s signature, solved by :func:`anode_plan.odeint` (exact gradients).

    Use it to port code that calls torchdiffeq's ``odeint_adjoint``: change the import. The
    ``adjoint_*`` arguments are validated and otherwise ignored (see the module docstring);
    ``adjoint_params`` is :func:`anode_plan.odeint`'s ``params``. As torchdiffeq's adjoint does, the
    tensors ``func`` reaches but does not use get zero gradients (``odeint`` leaves them ``None``).
    """
    if adjoint_method is not None and adjoint_method not in METHODS:
        raise SolverConfigError(f"odeint_adjoint(adjoint_method={adjoint_method!r}): the methods are {list(METHODS)}")
    for name, value in (("adjoint_rtol", adjoint_rtol), ("adjoint_atol", adjoint_atol)):
        if value is not None and not isinstance(value, (float, int, torch.Tensor)):
            raise SolverConfigError(f"odeint_adjoint({name}={value!r}): a tolerance is a float or a tensor")
    if adjoint_options is not None:
        if not isinstance(adjoint_options, dict):
            raise SolverConfigError(f"odeint_adjoint(adjoint_options={adjoint_options!r}) must be a dict")
        norm = adjoint_options.get("norm")
        if norm is not None and not callable(norm) and norm not in ADJOINT_NORMS:
            raise SolverConfigError(f"odeint_adjoint: adjoint_options['norm']={norm!r}; it is a function or one of "
                                    f"{list(ADJOINT_NORMS)}")
    params = None if adjoint_params is None else tuple(adjoint_params)
    return solve_ode(func, y0, t, rtol, atol, method, options, event_fn, params, zero_unused=True)


def odeint_event(func: Callable, y0, t0: torch.Tensor, *, event_fn: Callable, reverse_time: bool = False,
                 odeint_interface: Callable = odeint, **kwargs):
    """``torchdiffeq.odeint_event``: solve from ``t0`` until ``event_fn(t, y)`` changes sign.

    Returns ``(event_t, solution)``, ``solution`` the states at ``t0`` and at ``event_t``; the
    event time's gradient is the implicit function theorem's (:mod:`anode_plan.ode.events`).
    ``reverse_time`` solves towards decreasing time.
    """
    start = torch.as_tensor(t0).reshape(-1)[:1]
    t = torch.cat([start, start.detach() + (-1.0 if reverse_time else 1.0)])
    return odeint_interface(func, y0, t, event_fn=event_fn, **kwargs)
