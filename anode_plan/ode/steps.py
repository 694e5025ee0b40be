"""One accepted step of an adaptive solve: what it records, its outputs, and its vector-Jacobian product.

The forward loop (:mod:`anode_plan.ode.solve`) records each accepted step as a :class:`Step`;
backward re-runs a step from its kept state and differentiates it with :func:`step_vjp`,
which the checkpoint budget (:mod:`anode_plan.ode.checkpoints`) also measures.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from anode_plan.ode.problem import Problem
from anode_plan.ode.tableaus import interpolate, interpolation, rk_step



@dataclass(frozen=True)
class Step:
    """One accepted step: from ``t0`` by ``dt`` to ``t1`` (0-d float64 tensors), and the outputs it interpolates."""

    t0: torch.Tensor
    dt: torch.Tensor
    t1: torch.Tensor
    outputs: tuple[int, ...]


@dataclass
class Solve:
    """A forward solve's record: the accepted steps, the kept ``(y, f)`` per step index, the checkpoint slots."""

    steps: list[Step]
    kept: dict[int, tuple[torch.Tensor, torch.Tensor]]
    slots: int | None
    attempts: int = 0


def outputs_in(problem: Problem, step: Step, y0, y1, ks) -> Iterator[torch.Tensor]:
    """The dense output at each of ``step``'s output times, one at a time."""
    if step.outputs:
        coefficients = interpolation(problem.tableau, y0, y1, ks, step.dt)
        yield from (interpolate(coefficients, step.t0, step.t1, problem.times[i]) for i in step.outputs)


def step_function(problem: Problem, step: Step):
    """Step ``step`` as a function of its start ``(y, f)``: ``(y1, f1, outputs interpolated inside it)``."""
    def run(y: torch.Tensor, f: torch.Tensor):
        y1, f1, _, ks = rk_step(problem.func, problem.tableau, y, f, step.t0, step.dt, step.t1)
        return y1, f1, list(outputs_in(problem, step, y, y1, ks))
    return run


def step_vjp(problem: Problem, step: Step, y, f, g_y, g_f, grad_out):
    """Re-run ``step`` with its tape from ``(y, f)`` and differentiate it: the start's gradients and the parameters'."""
    with torch.enable_grad():
        y_, f_ = y.detach().requires_grad_(), f.detach().requires_grad_()
        y1, f1, emitted = step_function(problem, step)(y_, f_)
        outs, grads = [], []
        for value, grad in [(y1, g_y), (f1, g_f), *zip(emitted, (grad_out[i] for i in step.outputs))]:
            if grad is not None and value.requires_grad:  # a value that does not depend on the inputs adds nothing
                outs.append(value)
                grads.append(grad)
        if not outs:
            return None, None, [None] * len(problem.params)
        found = torch.autograd.grad(outs, [y_, f_, *problem.params], grads, allow_unused=True)
    return found[0], found[1], list(found[2:])
