"""How many checkpoints an adaptive solve may keep under its byte budget, from one step measured for real.

A step's taped re-run and backward are measured once per function, shape and method, as
the allocator counts them (:class:`StepCosts`); what the budget leaves beside them and the
outputs is divided into checkpoints of ``(y, f)``. Background: ``docs/algorithms.md`` §10.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Callable

import torch

from anode_plan.errors import InfeasibleBudgetError, SolverConfigError
from anode_plan.memory import AllocatorMeter, LiveStorageTracker, allocated_bytes, measure_peak_memory
from anode_plan.ode.problem import Problem
from anode_plan.ode.steps import Step, outputs_in, step_function, step_vjp
from anode_plan.ode.tableaus import error_ratio, rk_step
from planners.errors import format_bytes

MAX_SLOTS = 10_000
"""At most this many checkpoints, whatever the budget allows (the online bookkeeping is linear in them)."""


# ------------------------------------------------------------------------------------------------ the budget


@dataclass(frozen=True)
class StepCosts:
    """What one step of a solve allocates, measured once per function, shape and method.

    Attributes:
        slot_bytes: one checkpoint: the state and its derivative.
        advance_bytes: the peak of an untaped step (its stages, the error estimate, the dense output).
        vjp_bytes: the peak of a step re-run with its tape and differentiated (the gradients it makes included).
        fixed_bytes: the rest of a solve's peak, as charged: the outputs and their gradient, what the loss is
            allowed (three outputs' worth, as :func:`anode_plan.compile` allows), the parameters' gradients
            twice (the running sum, and a margin of one copy), the live state and its two gradients, and the
            larger of the two peaks above. Conservative by design; ``tests/test_adaptive.py`` checks that the
            allocator's peak stays within the budget it gives.
    """

    slot_bytes: int
    advance_bytes: int
    vjp_bytes: int
    fixed_bytes: int

    def budget_for(self, slots: int) -> int:
        """The budget that gives ``slots`` checkpoints."""
        return self.fixed_bytes + slots * self.slot_bytes


_COSTS: dict[tuple, tuple[Callable[[], Any], StepCosts]] = {}


def _peak(fn: Callable[[], Any], device: torch.device) -> int:
    """The allocator's peak of ``fn()``. Inside an allocator meter (:class:`~anode_plan.memory.AllocatorMeter`
    nests) too; inside a profiler of the caller's own, which cannot be nested, the storage view's (kernel
    workspaces unseen)."""
    if device.type == "cpu" and torch.autograd.profiler._is_profiler_enabled and not AllocatorMeter._active:
        with LiveStorageTracker() as tracker:
            base = tracker.reset_peak()
            fn()
        return tracker.peak_bytes - base
    return measure_peak_memory(fn, device=device).peak_bytes


def step_costs(problem: Problem, y0: torch.Tensor) -> StepCosts:
    """Measure (once per function, shape and method) what a step of ``problem`` allocates."""
    cached = _COSTS.get(problem.key)
    if cached is not None and cached[0]() is problem.source:  # the key holds id(source); a dead one is measured anew
        return cached[1]
    times = problem.times
    span = float(times[-1] - times[0]) if len(times) > 1 and bool(torch.isfinite(times[-1])) else 1.0
    step = Step(times[0], torch.tensor(span / 16, dtype=torch.float64), times[0] + span / 16, (min(1, len(times) - 1),))
    with torch.no_grad():
        y = y0.detach().clone()
        f = problem.func(times[0].to(y.dtype), y) if problem.tableau is not None else None
    ones = torch.ones_like(y)
    grad_out = torch.ones((len(times), *y.shape), dtype=y.dtype, device=y.device)

    def advance() -> None:
        with torch.no_grad():
            if problem.tableau is None:
                step_function(problem, step)(y, f)
                return
            y1, f1, err, ks = rk_step(problem.func, problem.tableau, y, f, step.t0, step.dt, step.t1)
            error_ratio(err, problem.rtol, problem.atol, y, y1, problem.norm)
            list(outputs_in(problem, step, y, y1, ks))

    advance_bytes = _peak(advance, y.device)
    vjp_bytes = _peak(lambda: step_vjp(problem, step, y, f, ones, ones if f is not None else None, grad_out), y.device)
    state = allocated_bytes(y)
    outputs = allocated_bytes(grad_out)
    params = sum(allocated_bytes(p) for p in problem.params)
    fixed = (2 + 3) * outputs + 2 * params + 3 * 2 * state + max(advance_bytes, vjp_bytes)
    costs = StepCosts(2 * state, advance_bytes, vjp_bytes, fixed)
    try:
        reference = weakref.ref(problem.source)
    except TypeError:  # a function object that takes no weak reference: keep it
        reference = (lambda source: lambda: source)(problem.source)
    _COSTS[problem.key] = (reference, costs)
    return costs


def checkpoint_slots(problem: Problem, y0: torch.Tensor) -> int | None:
    """How many checkpoints the budget allows (``None``: no budget, keep every state)."""
    if problem.checkpoints is not None:
        return int(min(problem.checkpoints, MAX_SLOTS))
    if problem.budget_bytes is None:
        return None
    costs = step_costs(problem, y0)
    slots = (problem.budget_bytes - costs.fixed_bytes) // costs.slot_bytes
    if slots < 1:
        need = costs.budget_for(1)
        raise InfeasibleBudgetError(
            f"odeint: memory_budget {format_bytes(problem.budget_bytes)} ({problem.budget_bytes} bytes) cannot hold "
            f"one checkpoint: a solve needs {format_bytes(costs.fixed_bytes)} besides (the outputs and their gradient, "
            f"the loss's allowance, the parameters' gradients, one step's taped re-run and backward: "
            f"{format_bytes(costs.vjp_bytes)}), and a checkpoint is {format_bytes(costs.slot_bytes)}. Give at least "
            f"{need} bytes, or ask for fewer output times.", budget_bytes=problem.budget_bytes, min_budget_bytes=need)
    return int(min(slots, MAX_SLOTS, problem.max_num_steps + 1))


def checkpoint_budget(func: Callable, y0, t: torch.Tensor, checkpoints: int, *, rtol: float = 1e-7,
                      atol: float = 1e-9, method: str = "dopri5", params=None) -> int:
    """The ``memory_budget`` (bytes) that gives :func:`odeint` exactly ``checkpoints`` checkpoints (slot 0 included).

    Use it to size a budget by a checkpoint count, as diffrax and equinox take one; the
    step's costs are measured as :func:`odeint` measures them.
    """
    if checkpoints < 1:
        raise SolverConfigError(f"checkpoint_budget: checkpoints={checkpoints} must be at least 1 (the initial state)")
    problem = Problem.make(func, y0, t, rtol, atol, method, {}, params)
    return step_costs(problem, problem.flat_y0).budget_for(checkpoints)
