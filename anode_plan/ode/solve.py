"""``anode_plan.odeint``: adaptive-step solves with exact gradients under a byte budget, by online checkpointing.

torchdiffeq's calling convention (``odeint(func, y0, t, rtol=, atol=, method=)``, a tensor
or tuple ``y0``, the solution at every time in ``t``, increasing or decreasing), the same
step-size control and dense output (:mod:`anode_plan.ode.tableaus`), and gradients that are exactly
those of backprop through the steps the solver took (discretise-then-optimise), with the
memory of ``c`` checkpoints instead of every step's tape:

* **Forward** runs the adaptive loop without a tape. Before each accepted step, the online
  checkpointer (:class:`planners.online.OnlineCheckpointing`: Stumm–Walther, then
  Wang–Moin) decides from the step's index alone whether to keep the state there, and
  the solver's carried derivative ``f`` (the FSAL value) with it. Rejected attempts are
  never kept or replayed. The accepted steps' times and sizes are recorded.
* **Backward** knows the step count and reverses the gaps between kept states offline
  (:func:`planners.online.reverse_actions`): each step is re-run with its tape from its
  state, differentiated with the gradients of its end state, of its end derivative and
  of the outputs interpolated inside it, and the gradients flow to the step before. The
  derivative's gradient is carried like the state's (dropping it changes the gradient;
  ``tests/test_adaptive.py`` shows it). Last, ``f₀ = func(t₀, y₀)`` is differentiated.
* The accepted step sizes and the first step are constants: torchdiffeq's ``odeint``
  differentiates through its first-step selection (its issue 284), so its gradients differ
  from these by that term; with ``first_step`` given they agree (``tests/test_adaptive.py``).

The budget (``options={"memory_budget": "64MB"}``) bounds the peak of the solve's
forward and backward on top of what was allocated when it started: the outputs and their
gradient, the parameters' gradients, the live state and its gradients, one step's taped
re-run and backward (measured once per function, shape and method, as the allocator
counts it), and ``c`` checkpoints of ``(y, f)``, as many as fit. Fewer than one raises
:class:`~anode_plan.InfeasibleBudgetError` with the smallest budget.

Background, papers and test values: ``docs/algorithms.md`` §10.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import nn

from anode_plan.errors import SolverConfigError
from anode_plan.model_state import RestoreRunningStats, generator_states, norm_layers_with_stats
from anode_plan.ode.checkpoints import checkpoint_slots
from anode_plan.ode.problem import OPTIONS, Problem
from anode_plan.ode.steps import (
    Solve,
    Step,
    outputs_in,
    step_function,
    step_vjp,
)
from anode_plan.ode.tableaus import TABLEAUS, error_ratio, initial_step, next_step, rk_step
from planners.online import OnlineCheckpointing, reverse_actions


CARRY_DERIVATIVE_GRADIENT = True
"""Carry the gradient of the FSAL derivative from step to step (it must be; a test turns it off to show why)."""


def odeint(func: Callable, y0: torch.Tensor | tuple[torch.Tensor, ...], t: torch.Tensor, *, rtol: float = 1e-7,
           atol: float = 1e-9, method: str = "dopri5", options: dict | None = None,
           params: Sequence[torch.Tensor] | None = None) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Solve ``dy/dt = func(t, y)`` from ``y(t[0]) = y0`` and return ``y`` at every time in ``t``.

    A drop-in for ``torchdiffeq.odeint`` with an adaptive method (``"dopri5"``, ``"bosh3"``,
    ``"tsit5"``), whose gradients are exact for the steps taken, in the memory ``options``
    allows (see the module docstring).

    Args:
        func: ``func(t, y)``, an ``nn.Module`` (its parameters get gradients) or a function
            (give the tensors it closes over that need gradients in ``params``).
        y0: the initial state, a tensor or a tuple of tensors.
        t: a 1-d tensor of strictly increasing or decreasing times.
        rtol, atol: the error tolerances.
        method: the embedded Runge–Kutta pair.
        options: ``memory_budget`` (``"64MB"``, ``"1GiB"`` or bytes; ``None``, the default,
            keeps every accepted state, so backward only re-runs each step once with its tape), or ``checkpoints`` (a count,
            slot 0 the initial state's, as diffrax and equinox take it), ``max_num_steps``
            (default ``2**31 - 1``), ``first_step`` (default: chosen from ``func`` at ``y0``).
        params: the tensors needing gradients that ``func`` uses (default: its parameters).

    Raises:
        SolverConfigError: an unknown method or option, bad ``t``, or too many steps.
        InfeasibleBudgetError: not even one checkpoint fits the budget.
    """
    options = dict(options or {})
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise SolverConfigError(f"odeint: unknown options {unknown}; the options are {list(OPTIONS)}")
    if method not in TABLEAUS:
        raise SolverConfigError(f"odeint(method={method!r}): the adaptive methods are {sorted(TABLEAUS)}; for fixed "
                                "steps use anode_plan.ODEBlock(func, nt=..., method='rk4') inside compile")
    problem = Problem.make(func, y0, t, rtol, atol, TABLEAUS[method], options, params)
    flat = problem.flat_y0
    wanted = torch.is_grad_enabled() and (flat.requires_grad or any(p.requires_grad for p in problem.params))
    if not wanted:
        with torch.no_grad():
            out = _forward(problem, flat, slots=0)[0]  # nothing to keep
    else:
        out = _OdeintFunction.apply(problem, flat, *problem.params)
    return problem.unflatten(out)


def _forward(problem: Problem, y0: torch.Tensor, slots: int | None) -> tuple[torch.Tensor, Solve]:
    """The adaptive loop (no tape): the outputs, and the record with the states ``slots`` checkpoints keep."""
    times, tableau = problem.times, problem.tableau
    out = y0.new_empty((len(times), *y0.shape))
    out[0] = y0
    t0 = times[0]
    f0 = problem.func(t0.to(y0.dtype), y0)
    with torch.no_grad():  # the first step is a constant of the discretisation, not differentiated
        dt = (torch.tensor(problem.first_step, dtype=torch.float64) if problem.first_step is not None
              else initial_step(problem.func, t0, y0, f0, tableau.order, problem.rtol, problem.atol, problem.norm))
    solve = Solve([], {}, slots)
    checkpointer = OnlineCheckpointing(slots) if slots else None  # None: keep every state; 0: keep none
    state = checkpointer.start() if checkpointer else None
    y, f, t_now = y0, f0, t0
    decided = -1
    index = 1  # the next output time
    while index < len(times):
        if solve.attempts >= problem.max_num_steps:
            raise SolverConfigError(f"odeint: max_num_steps={problem.max_num_steps} reached at t={float(t_now):.6g} "
                                    f"before t={float(times[index]):.6g}; loosen rtol/atol or raise "
                                    "options['max_num_steps']")
        step = len(solve.steps)
        if step != decided:  # the state at `step` exists: keep it or not, once
            decided = step
            if slots is None:
                solve.kept[step] = (y, f)
            elif checkpointer is not None:
                decision, state = checkpointer.decide(state, step)
                if decision.keep:  # into a slot: what it held is dropped
                    held = set(state.slot_steps)
                    solve.kept = {s: v for s, v in solve.kept.items() if s in held}
                    solve.kept[step] = (y, f)
        solve.attempts += 1
        if not torch.isfinite(dt):
            raise SolverConfigError(f"odeint: the step size became {float(dt)} at t={float(t_now):.6g}")
        t1 = t_now + dt
        if not bool(t1 > t_now):
            raise SolverConfigError(f"odeint: the step size {float(dt):.3g} underflows at t={float(t_now):.6g}")
        y1, f1, err, ks = rk_step(problem.func, tableau, y, f, t_now, dt, t1)
        ratio = error_ratio(err, problem.rtol, problem.atol, y, y1, problem.norm)
        del err
        if not bool(torch.isfinite(ratio)):
            raise SolverConfigError(f"odeint: the error estimate is not finite at t={float(t_now):.6g} (the state "
                                    "or func's value overflowed or became NaN); check func, or lower first_step")
        if bool(ratio <= 1):
            # The outputs inside this step are interpolated now, so its stages die with the attempt.
            first = index
            while index < len(times) and times[index] <= t1:
                index += 1
            accepted = Step(t_now, dt, t1, tuple(range(first, index)))
            for at, value in zip(accepted.outputs, outputs_in(problem, accepted, y, y1, ks)):
                out[at] = value
            solve.steps.append(accepted)
            y, f, t_now = y1, f1, t1
        dt = next_step(dt, ratio, tableau.order)
        del ks, y1, f1
    solve.kept = {s: v for s, v in solve.kept.items() if s < len(solve.steps) or s == 0}
    return out, solve


class _OdeintFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, problem: Problem, y0: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        slots = checkpoint_slots(problem, y0)
        before = generator_states(y0.device)
        with torch.no_grad():
            out, solve = _forward(problem, y0, slots)
        if any(not torch.equal(a, b) for a, b in zip(before, generator_states(y0.device))):
            raise SolverConfigError(
                "odeint: func draws random numbers (dropout, randn), and the backward re-runs its steps, which would "
                "draw other numbers and give wrong gradients; make func deterministic (dropout outside the solve, "
                "or func.eval())")
        ctx.problem, ctx.solve = problem, solve
        ctx.save_for_backward(y0)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple:
        problem, solve = ctx.problem, ctx.solve
        (y0,) = ctx.saved_tensors
        ctx.solve = None
        with RestoreRunningStats(norm_layers_with_stats(problem.source) if isinstance(problem.source, nn.Module)
                                 else []):  # the re-runs leave BatchNorm statistics as the forward left them
            return _backward(ctx, problem, solve, y0, grad_out)


def _add(total, value):
    if value is None:
        return total
    return value if total is None else total + value


def _accumulate(total, value):
    """``total + value`` in place: the parameters' running sums stay one copy each."""
    if value is None:
        return total
    return value if total is None else total.add_(value)


def _backward(ctx: Any, problem: Problem, solve: Solve, y0: torch.Tensor, grad_out: torch.Tensor) -> tuple:
    n = len(solve.steps)
    g_y = g_f = None
    param_grads: list = [None] * len(problem.params)
    if n:
        store, solve.kept = solve.kept, {}  # the backward owns the kept states: each is freed after its vjp
        slots = solve.slots if solve.slots else len(store)
        live = None
        for action in reverse_actions(store, n, slots):
            k = action.step
            y, f = store[k] if k in store else live[1:]
            step = solve.steps[k]
            if action.kind == "advance":
                with torch.no_grad():
                    y1, f1, _ = step_function(problem, _quiet(step))(y, f)
                live = (k + 1, y1, f1)
                if action.keep:
                    store[k + 1] = (y1, f1)
                continue
            g_y, g_f, grads = step_vjp(problem, step, y, f, g_y, g_f, grad_out)
            param_grads = [_accumulate(total, grad) for total, grad in zip(param_grads, grads)]
            live = None
            if store.pop(k, None) is not None and not CARRY_DERIVATIVE_GRADIENT and k:
                g_f = None  # what dropping the kept derivative's gradient would do (tests show it is wrong)
    g_y0 = _add(g_y, grad_out[0])
    if g_f is not None:  # f0 = func(t0, y0)
        with torch.enable_grad():
            y_ = y0.detach().requires_grad_()
            f0 = problem.func(problem.times[0].to(y0.dtype), y_)
            found = (torch.autograd.grad(f0, [y_, *problem.params], g_f, allow_unused=True) if f0.requires_grad
                     else [None] * (1 + len(problem.params)))
        g_y0 = _add(g_y0, found[0])
        param_grads = [_accumulate(total, grad) for total, grad in zip(param_grads, found[1:])]
    return (None, g_y0 if ctx.needs_input_grad[1] else None, *param_grads)


def _quiet(step: Step) -> Step:
    """The step without its outputs: an advance in backward only needs the end state."""
    return Step(step.t0, step.dt, step.t1, ())


def solve_taped(func: Callable, y0, t: torch.Tensor, *, rtol: float = 1e-7, atol: float = 1e-9,
                method: str = "dopri5", options: dict | None = None, params=None):
    """Backprop through the same solver with every step's tape kept: ``(outputs, accepted steps)``.

    The reference :func:`odeint`'s gradients are checked against (the same loop under
    autograd, its step sizes constants); it takes the steps :func:`odeint` takes.
    """
    options = dict(options or {})
    options.pop("memory_budget", None)
    problem = Problem.make(func, y0, t, rtol, atol, TABLEAUS[method], options, params)
    out, solve = _forward(problem, problem.flat_y0, slots=None)
    return problem.unflatten(out), [(float(s.t0), float(s.t1)) for s in solve.steps]
