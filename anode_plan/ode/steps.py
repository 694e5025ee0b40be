"""One accepted step of a solve: what it records, its outputs, and its vector-Jacobian product.

The forward loops (:mod:`anode_plan.ode.forward`) record each accepted step as a :class:`Step`;
backward re-runs a step from its kept state and differentiates it with :func:`step_vjp`,
which the checkpoint budget (:mod:`anode_plan.ode.checkpoints`) also measures.

Gradients with respect to the times ``t``: a step's ends move with an entry of ``t``
(``t0_at``, ``t1_at``: an adaptive step's with ``t[0]``, since its size is a constant of the
discretisation, until a step clipped onto a ``step_t``/``jump_t`` time, which does not move;
a fixed-grid step's with the grid point's entry), and an output with its own time. When
``t`` needs a gradient, :func:`step_function` builds the step's times as
``value + (T[j] − T[j].detach())``, the recorded value exactly, with derivative one with
respect to ``T[j]``, so the taped re-run differentiates the step with respect to them too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from anode_plan.ode.fixed_grid import NEXT, cubic_interp, fixed_step, linear_interp
from anode_plan.ode.problem import Problem
from anode_plan.ode.tableaus import interpolate, interpolation, rk_step


@dataclass(frozen=True)
class Step:
    """One accepted step: from ``t0`` by ``dt`` to ``t1`` (0-d float64 tensors), and the outputs it interpolates.

    ``jump``: it ends on a discontinuity (``jump_t``), so the next step's derivative is
    re-evaluated just after it. ``t0_at``/``t1_at``: the entry of ``t`` its start/end moves
    with (``None``: a fixed time).
    """

    t0: torch.Tensor
    dt: torch.Tensor
    t1: torch.Tensor
    outputs: tuple[int, ...]
    jump: bool = False
    t0_at: int | None = None
    t1_at: int | None = None


@dataclass
class Solve:
    """A forward solve's record: the accepted steps, the kept ``(y, f)`` per step index, the checkpoint slots.

    ``kept`` is ``None`` once a backward has used it (a second backward replays the forward).
    """

    steps: list[Step]
    kept: dict[int, tuple[torch.Tensor, torch.Tensor | None]] | None
    slots: int | None
    attempts: int = 0


def shift(times: torch.Tensor | None, at: int | None):
    """``T[at] − T[at].detach()``: zero, with derivative one with respect to ``T[at]`` (``None`` when no gradient)."""
    if times is None or at is None or not times.requires_grad:
        return None
    return times[at] - times[at].detach()


def _moved(value: torch.Tensor, delta) -> torch.Tensor:
    return value if delta is None else value + delta


def step_times(step: Step, times: torch.Tensor | None):
    """The step's ``(t0, dt, t1)``, moving with ``times`` when it needs a gradient."""
    d0, d1 = shift(times, step.t0_at), shift(times, step.t1_at)
    if d0 is None and d1 is None:
        return step.t0, step.dt, step.t1
    dt = step.dt
    if d1 is not None:
        dt = dt + d1
    if d0 is not None:
        dt = dt - d0
    return _moved(step.t0, d0), dt, _moved(step.t1, d1)


def output_time(problem: Problem, times: torch.Tensor | None, index: int) -> torch.Tensor:
    return _moved(problem.times[index], shift(times, index))


def outputs_in(problem: Problem, step: Step, y0, y1, ks, times=None, span=None) -> Iterator[torch.Tensor]:
    """The dense output at each of ``step``'s output times, one at a time (an adaptive step)."""
    if step.outputs:
        t0, dt, t1 = span if span is not None else (step.t0, step.dt, step.t1)
        coefficients = interpolation(problem.tableau, y0, y1, ks, dt)
        yield from (interpolate(coefficients, t0, t1, output_time(problem, times, i)) for i in step.outputs)


def fixed_outputs(problem: Problem, step: Step, y0, k0, y1, times=None, span=None) -> list[torch.Tensor]:
    """The interpolated outputs inside a fixed-grid step (linear, or cubic with ``interp="cubic"``)."""
    if not step.outputs:
        return []
    t0, dt, t1 = span if span is not None else (step.t0, step.dt, step.t1)
    found = []
    f1 = None
    for i in step.outputs:
        at = output_time(problem, times, i)
        if problem.interp == "cubic":
            if f1 is None:
                f1 = problem.func(t1.to(y1.dtype), y1)
            found.append(cubic_interp(t0, y0, k0, t1, y1, f1, at))
        else:
            value = float(problem.times[i])
            found.append(linear_interp(t0, t1, y0, y1, at, value == float(step.t0), value == float(step.t1)))
    return found


def step_function(problem: Problem, step: Step, times: torch.Tensor | None = None):
    """Step ``step`` as a function of its start ``(y, f)``: ``(y1, f1, outputs interpolated inside it)``."""
    def run(y: torch.Tensor, f: torch.Tensor | None):
        t0, dt, t1 = span = step_times(step, times)
        if problem.fixed is not None:
            y1, k0 = fixed_step(problem.func, problem.fixed, y, t0, dt, t1, problem.perturb)
            return y1, None, fixed_outputs(problem, step, y, k0, y1, times, span)
        y1, f1, _, ks = rk_step(problem.func, problem.tableau, y, f, t0, dt, t1, end_perturb=step.jump)
        emitted = list(outputs_in(problem, step, y, y1, ks, times, span))
        if step.jump:  # past a discontinuity: the next step starts from f just after it
            f1 = problem.func(t1.to(y1.dtype), y1, NEXT)
        return y1, f1, emitted
    return run


def step_vjp(problem: Problem, step: Step, y, f, g_y, g_f, grad_out, times=None):
    """Re-run ``step`` with its tape from ``(y, f)`` and differentiate it.

    Returns the gradients of its start ``(y, f)``, the parameters' and (``times`` needing a
    gradient) the times'.
    """
    with torch.enable_grad():
        y_ = y.detach().requires_grad_()
        f_ = f.detach().requires_grad_() if f is not None else None
        y1, f1, emitted = step_function(problem, step, times)(y_, f_)
        outs, grads = [], []
        for value, grad in [(y1, g_y), (f1, g_f), *zip(emitted, (grad_out[i] for i in step.outputs))]:
            # a value not depending on the inputs adds nothing
            if grad is not None and value is not None and value.requires_grad:
                outs.append(value)
                grads.append(grad)
        wants_times = times is not None and times.requires_grad
        count = len(problem.params) + (1 if wants_times else 0)
        if not outs:
            return None, None, [None] * len(problem.params), None
        inputs = [y_, *([f_] if f_ is not None else []), *problem.params, *([times] if wants_times else [])]
        found = list(torch.autograd.grad(outs, inputs, grads, allow_unused=True))
    g_y0 = found.pop(0)
    g_f0 = found.pop(0) if f_ is not None else None
    g_times = found.pop() if wants_times else None
    assert len(found) == count - (1 if wants_times else 0)
    return g_y0, g_f0, found, g_times
