"""torchdiffeq's fixed-grid methods for :func:`anode_plan.odeint`: ``euler``, ``midpoint``, ``rk4``, on its grid.

Use them where torchdiffeq code calls ``odeint(..., method="rk4", options={"step_size": h})``:
the grid, the steps and the outputs are torchdiffeq's (``torchdiffeq/_impl/fixed_grid.py``,
``solvers.py``, ``rk_common.py``), so values agree to rounding:

* the grid is ``t`` itself, or ``t[0], t[0] + h, …`` with the last point moved onto
  ``t[-1]`` (``step_size``), or what ``grid_constructor(func, y0, t)`` returns;
* ``euler``; ``midpoint`` (explicit midpoint, torchdiffeq's rk2); ``rk4`` is Kutta's 3/8 rule
  (torchdiffeq's ``rk4_alt_step_func``; :class:`anode_plan.ODEBlock`'s ``rk4`` is the classical one);
* an output between grid points is the linear interpolant (exact at grid points), or the
  cubic Hermite one with ``interp="cubic"``; ``perturb=True`` evaluates a step's first
  stage just after its start and its last just before its end (torchdiffeq's ``perturb``).

The step count is known before the solve, so :mod:`anode_plan.ode.solve` places the
checkpoints offline (revolve's binomial schedule, :func:`planners.online.reverse_actions`
from the initial state) rather than online.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from anode_plan.errors import SolverConfigError

PREV, NEXT, NONE = 1, 2, 0  # the values of anode_plan.ode.problem's PERTURB_* (that module imports this one)


@dataclass(frozen=True)
class FixedMethod:
    """A fixed-grid explicit Runge–Kutta method: its name, order and function evaluations per step."""

    name: str
    order: int
    stages: int


FIXED = {m.name: m for m in (FixedMethod("euler", 1, 1), FixedMethod("midpoint", 2, 2), FixedMethod("rk4", 4, 4))}
"""The fixed-grid methods, by name."""


def fixed_step(func: Callable, method: FixedMethod, y0: torch.Tensor, t0: torch.Tensor, dt: torch.Tensor,
               t1: torch.Tensor, perturb: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One step from ``y0`` at ``t0`` to ``t1 = t0 + dt``: ``(y1, f(t0, y0))`` (the derivative is the cubic's)."""
    dtype = y0.dtype
    t0_, dt_, t1_ = t0.to(dtype), dt.to(dtype), t1.to(dtype)
    first, last = (NEXT, PREV) if perturb else (NONE, NONE)
    k1 = func(t0_, y0, first)
    if method.name == "euler":
        return y0 + dt_ * k1, k1
    if method.name == "midpoint":
        k2 = func(t0_ + 0.5 * dt_, y0 + (0.5 * dt_) * k1, last)
        return y0 + dt_ * k2, k1
    k2 = func(t0_ + dt_ * (1 / 3), y0 + dt_ * k1 * (1 / 3))
    k3 = func(t0_ + dt_ * (2 / 3), y0 + dt_ * (k2 - k1 * (1 / 3)))
    k4 = func(t1_, y0 + dt_ * (k1 - k2 + k3), last)
    return y0 + (k1 + 3 * (k2 + k3) + k4) * dt_ * 0.125, k1


def linear_interp(t0: torch.Tensor, t1: torch.Tensor, y0: torch.Tensor, y1: torch.Tensor, t: torch.Tensor,
                  at_start: bool, at_end: bool) -> torch.Tensor:
    """torchdiffeq's linear interpolant: exactly ``y0`` / ``y1`` at the ends (``at_start`` / ``at_end``)."""
    if at_start:
        return y0
    if at_end:
        return y1
    slope = ((t - t0) / (t1 - t0)).to(y0.dtype)
    return y0 + slope * (y1 - y0)


def cubic_interp(t0: torch.Tensor, y0: torch.Tensor, f0: torch.Tensor, t1: torch.Tensor, y1: torch.Tensor,
                 f1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """torchdiffeq's cubic Hermite interpolant through both ends and their derivatives."""
    h = ((t - t0) / (t1 - t0)).to(y0.dtype)
    dt = (t1 - t0).to(y0.dtype)
    h00 = (1 + 2 * h) * (1 - h) * (1 - h)
    h10 = h * (1 - h) * (1 - h)
    h01 = h * h * (3 - 2 * h)
    h11 = h * h * (h - 1)
    return h00 * y0 + h10 * dt * f0 + h01 * y1 + h11 * dt * f1


def fixed_grid(func: Callable, y0, t: torch.Tensor, times: torch.Tensor, sign: float, step_size,
               grid_constructor) -> tuple[torch.Tensor, tuple[int | None, ...]]:
    """The grid in the solve's (increasing) time, float64, and which entry of ``times`` each point moves with."""
    if step_size is not None and grid_constructor is not None:
        raise SolverConfigError("odeint: give options['step_size'] or options['grid_constructor'], not both")
    last = len(times) - 1
    if step_size is not None:
        step = float(step_size.item() if isinstance(step_size, torch.Tensor) else step_size)
        if not step > 0:
            raise SolverConfigError(f"odeint: options['step_size']={step_size} must be positive")
        count = int(torch.ceil((times[-1] - times[0]) / step + 1).item())
        grid = torch.arange(0, count, dtype=torch.float64, device=times.device) * step + times[0]
        grid[-1] = times[-1]
        anchors = tuple([0] * (count - 1) + [last])
        if count == 1:
            anchors = (0,)
        return grid, anchors
    if grid_constructor is not None:
        made = grid_constructor(func, y0, t)
        grid = torch.as_tensor(made).detach().to(device=times.device, dtype=torch.float64).reshape(-1) * sign
        if len(grid) < 1 or float(grid[0]) != float(times[0]) or float(grid[-1]) != float(times[-1]):
            raise SolverConfigError(f"odeint: grid_constructor returned a grid from {float(grid[0]) * sign} to "
                                    f"{float(grid[-1]) * sign}; it must start at t[0] and end at t[-1]")
        if len(grid) > 1 and not bool((grid[1:] > grid[:-1]).all()):
            raise SolverConfigError("odeint: grid_constructor's grid must be strictly monotonic in the direction of t")
        return grid, tuple([0] + [None] * (len(grid) - 2) + [last])[:len(grid)]
    return times.clone(), tuple(range(len(times)))
