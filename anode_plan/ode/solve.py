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
* Gradients with respect to ``t`` (only when ``t`` needs one): an output time moves its
  dense output along the step that holds it; ``t[0]`` moves every step of the solve (their
  sizes fixed) up to the first step cut onto a ``step_t``/``jump_t`` time
  (:mod:`anode_plan.ode.steps`). These are the derivatives of the discretisation with its
  step sizes held, so at the end time the gradient is ``f(t_N, y_N)·grad_N`` to the
  interpolant's accuracy, as torchdiffeq's adjoint gives it.
* Autograd like any op: a second backward through the same solve replays the forward
  from ``y0`` (the first one freed its checkpoints as it went); a backward that builds a
  graph (``create_graph=True``: ``gradgradcheck``, gradient penalties) differentiates a taped
  replay of the same steps, so it holds every step's tape, whatever the budget.

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
from anode_plan.ode.events import EventGradient
from anode_plan.ode.fixed_grid import FIXED
from anode_plan.ode.forward import run_forward
from anode_plan.ode.problem import Problem
from anode_plan.ode.steps import Solve, Step, shift, step_function, step_vjp
from anode_plan.ode.tableaus import TABLEAUS
from planners.online import reverse_actions

METHODS = (*TABLEAUS, *FIXED)
"""The methods :func:`odeint` solves with: the adaptive pairs, then the fixed-grid methods."""

CARRY_DERIVATIVE_GRADIENT = True
"""Carry the gradient of the FSAL derivative from step to step (it must be; a test turns it off to show why)."""


def odeint(func: Callable, y0: torch.Tensor | tuple[torch.Tensor, ...], t: torch.Tensor, *, rtol: float = 1e-7,
           atol: float = 1e-9, method: str | None = None, options: dict | None = None,
           event_fn: Callable | None = None, params: Sequence[torch.Tensor] | None = None):
    """Solve ``dy/dt = func(t, y)`` from ``y(t[0]) = y0`` and return ``y`` at every time in ``t``.

    A drop-in for ``torchdiffeq.odeint``: the same arguments and results, with gradients exact
    for the steps taken (discretise-then-optimise), in the memory ``options`` allows (see the
    module docstring). Use it wherever torchdiffeq's ``odeint`` or ``odeint_adjoint`` is called.

    Args:
        func: ``func(t, y)`` (or ``func(t, y, perturb=...)``, torchdiffeq's discontinuity
            flag, when it takes ``perturb``): an ``nn.Module``, a function, a bound method; the
            tensors needing gradients it reaches (parameters, closures, attributes) get them.
        y0: the initial state, a tensor or a tuple of tensors (0-d ones too).
        t: a 1-d tensor of strictly increasing or decreasing times (it may need a gradient).
        rtol, atol: the error tolerances, floats or tensors (broadcast against the state).
        method: ``"dopri5"`` (the default), ``"bosh3"``, ``"tsit5"`` (adaptive), or
            ``"euler"``, ``"midpoint"``, ``"rk4"`` (fixed grid, :mod:`anode_plan.ode.fixed_grid`).
        options: torchdiffeq's: ``first_step``, ``safety``, ``ifactor``, ``dfactor``,
            ``max_num_steps``, ``min_step``, ``max_step``, ``step_t``, ``jump_t``, ``norm``,
            ``dtype`` (adaptive); ``step_size``, ``grid_constructor``, ``interp``, ``perturb``
            (fixed grid); and the budget: ``memory_budget`` (``"64MB"``, ``"1GiB"`` or bytes;
            ``None``, the default, keeps every state) or ``checkpoints`` (a count, slot 0 the
            initial state's, as diffrax and equinox take it).
        event_fn: ``event_fn(t, y)``: solve from ``t[0]`` until its sign changes, and return
            ``(event_t, solution)`` (:mod:`anode_plan.ode.events`).
        params: the tensors needing gradients that ``func`` uses (default: all it reaches).

    Raises:
        SolverConfigError: an unknown method or option, bad ``t``, or too many steps.
        InfeasibleBudgetError: not even one checkpoint fits the budget.
    """
    return solve_ode(func, y0, t, rtol, atol, method, options, event_fn, params)


def solve_ode(func: Callable, y0, t: torch.Tensor, rtol, atol, method: str | None, options: dict | None,
              event_fn: Callable | None, params, zero_unused: bool = False):
    """:func:`odeint`; ``zero_unused``: the tensors ``func`` does not use get zero gradients (the adjoint's way)."""
    method = method or "dopri5"
    if event_fn is not None:
        return _odeint_until_event(func, y0, t, rtol, atol, method, options, event_fn, params, zero_unused)
    problem = Problem.make(func, y0, t, rtol, atol, method, options, params)
    return problem.unflatten(_solve(problem, t, None, zero_unused))


def _solve(problem: Problem, t: torch.Tensor, event: Callable | None, zero_unused: bool) -> torch.Tensor:
    flat = problem.flat_y0
    t_grad = t.requires_grad and torch.is_grad_enabled()
    wanted = torch.is_grad_enabled() and (flat.requires_grad or t_grad or any(p.requires_grad for p in problem.params))
    if not wanted:
        with torch.no_grad():
            return run_forward(problem, flat, slots=0, event=event)[0]  # nothing to keep
    return _OdeintFunction.apply(problem, event, zero_unused, flat, t if t_grad else None, *problem.params)


def _odeint_until_event(func, y0, t, rtol, atol, method, options, event_fn, params, zero_unused):
    """``odeint(..., event_fn=)``: ``(event_t, [y(t0), y(event_t)])``, the event time differentiable."""
    if not isinstance(t, torch.Tensor) or t.dim() != 1 or len(t) < 1:
        raise SolverConfigError("odeint(event_fn=...): t must be a 1-d tensor whose first time is the start (and "
                                "whose second, if any, gives the direction)")
    if method in FIXED and "step_size" not in (options or {}):
        raise SolverConfigError(f"odeint(method={method!r}, event_fn=...): a fixed-grid method looks for the event "
                                "step by step, so give options['step_size']")
    backwards = len(t) > 1 and bool(t[1] < t[0])
    start = t[:1]
    span = torch.cat([start, start.detach() + (-1.0 if backwards else 1.0)])
    problem = Problem.make(func, y0, span, rtol, atol, method, options, params)
    tuple_state = isinstance(y0, (tuple, list))

    def event(time: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # solve time, flat state
        return event_fn(problem.user_time(time).to(t.dtype), problem.unflatten(y) if tuple_state else y)

    out = _solve(problem, span, event, zero_unused)
    event_t = problem.user_time(problem.times[1]).to(t.dtype)
    if out.requires_grad:
        def user_event(time, y):
            return event_fn(time, problem.unflatten(y) if tuple_state else y)

        def user_func(time, y):
            return problem.sign * problem.func(time * problem.sign, y)  # dy/dt in the user's time

        event_t, state_t = EventGradient.apply(user_func, user_event, event_t, out[-1])
        out = torch.cat([out[:-1], state_t[None]])
    return event_t, problem.unflatten(out)


class _OdeintFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, problem: Problem, event, zero_unused: bool, y0: torch.Tensor, t: torch.Tensor | None,
                *params: torch.Tensor) -> torch.Tensor:
        slots = checkpoint_slots(problem, y0)
        before = generator_states(y0.device)
        with torch.no_grad():
            out, solve = run_forward(problem, y0, slots, event)
        if any(not torch.equal(a, b) for a, b in zip(before, generator_states(y0.device))):
            raise SolverConfigError(
                "odeint: func draws random numbers (dropout, randn), and the backward re-runs its steps, which would "
                "draw other numbers and give wrong gradients; make func deterministic (dropout outside the solve, "
                "or func.eval())")
        ctx.problem, ctx.solve, ctx.zero_unused = problem, solve, zero_unused
        ctx.save_for_backward(y0, t)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple:
        problem, solve = ctx.problem, ctx.solve
        y0, t = ctx.saved_tensors
        with RestoreRunningStats(norm_layers_with_stats(problem.source) if isinstance(problem.source, nn.Module)
                                 else []):  # the re-runs leave BatchNorm statistics as the forward left them
            if torch.is_grad_enabled():  # create_graph=True: a backward that is itself differentiable
                grads = _taped_backward(problem, solve, y0, t, grad_out, ctx.needs_input_grad)
            else:
                grads = _backward(problem, solve, y0, t, grad_out)
        g_y0, g_t, param_grads = grads
        if ctx.zero_unused:
            param_grads = [torch.zeros_like(p) if g is None else g for p, g in zip(problem.params, param_grads)]
        return (None, None, None, g_y0 if ctx.needs_input_grad[3] else None,
                g_t if ctx.needs_input_grad[4] else None, *param_grads)


def _add(total, value):
    if value is None:
        return total
    return value if total is None else total + value


def _accumulate(total, value):
    """``total + value`` in place: the parameters' running sums stay one copy each."""
    if value is None:
        return total
    return value if total is None else total.add_(value)


def _start(problem: Problem, y0: torch.Tensor, times: torch.Tensor | None = None):
    """``(t0, f0)``: the start time (moving with ``times``) and ``f0 = func(t0, y0)`` (``None`` for fixed grids)."""
    moved = shift(times, 0)
    t0 = problem.times[0] if moved is None else problem.times[0] + moved
    if problem.fixed is not None:
        return t0, None
    return t0, problem.func(t0.to(y0.dtype), y0)


def _backward(problem: Problem, solve: Solve, y0: torch.Tensor, t: torch.Tensor | None, grad_out: torch.Tensor):
    n = len(solve.steps)
    g_y = g_f = g_times = None
    times = problem.times.clone().requires_grad_() if t is not None else None
    param_grads: list = [None] * len(problem.params)
    if n:
        store, solve.kept = solve.kept, None  # the backward owns the kept states: each is freed after its vjp
        if store is None:  # a second backward: the first used the checkpoints up; start again from y0
            with torch.no_grad():
                store = {0: (y0.detach(), _start(problem, y0.detach())[1])}
            slots = solve.slots if solve.slots else n + 1
        else:
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
            problem.callback("callback_step_adjoint", step.t1, y, -step.dt)
            g_y, g_f, grads, g_t = step_vjp(problem, step, y, f, g_y, g_f, grad_out, times)
            if problem.tableau is not None:
                problem.callback("callback_accept_step_adjoint", step.t1, y, -step.dt)
            param_grads = [_accumulate(total, grad) for total, grad in zip(param_grads, grads)]
            g_times = _accumulate(g_times, g_t)
            live = None
            if store.pop(k, None) is not None and not CARRY_DERIVATIVE_GRADIENT and k:
                g_f = None  # what dropping the kept derivative's gradient would do (tests show it is wrong)
    g_y0 = _add(g_y, grad_out[0])
    if g_f is not None:  # f0 = func(t0, y0)
        with torch.enable_grad():
            y_ = y0.detach().requires_grad_()
            _, f0 = _start(problem, y_, times)
            inputs = [y_, *problem.params, *([times] if times is not None else [])]
            found = (list(torch.autograd.grad(f0, inputs, g_f, allow_unused=True)) if f0.requires_grad
                     else [None] * len(inputs))
        g_y0 = _add(g_y0, found[0])
        param_grads = [_accumulate(total, grad) for total, grad in zip(param_grads, found[1:1 + len(problem.params)])]
        if times is not None:
            g_times = _accumulate(g_times, found[-1])
    g_t = None
    if t is not None:
        g_t = torch.zeros_like(t) if g_times is None else (problem.sign * g_times).to(t.dtype)
    return g_y0, g_t, param_grads


def _taped_backward(problem: Problem, solve: Solve, y0: torch.Tensor, t: torch.Tensor | None,
                    grad_out: torch.Tensor, needs: tuple[bool, ...]):
    """The backward as a graph: replay the recorded steps with their tape, and differentiate with create_graph."""
    times = None
    if t is not None:
        user = t.to(torch.float64)
        times = (user if problem.sign > 0 else -user)
        times = problem.times + (times - times.detach())  # the recorded values (an event's time too), t's gradient
    y, (_, f) = y0, _start(problem, y0, times)
    outputs: dict[int, torch.Tensor] = {0: y0}
    for step in solve.steps:
        y, f, emitted = step_function(problem, step, times)(y, f)
        outputs.update(zip(step.outputs, emitted))
    grads_for = [grad_out[i] for i in sorted(outputs)]
    values = [outputs[i] for i in sorted(outputs)]
    inputs = [y0, *([t] if t is not None else []), *problem.params]
    wanted = [x for x in inputs if x.requires_grad]
    found = iter(torch.autograd.grad(values, wanted, grads_for, create_graph=True, allow_unused=True))
    grads = [next(found) if x.requires_grad else None for x in inputs]
    g_y0 = grads[0]
    g_t = grads[1] if t is not None else None
    param_grads = grads[2 if t is not None else 1:]
    return g_y0, g_t, param_grads


def _quiet(step: Step) -> Step:
    """The step without its outputs: an advance in backward only needs the end state."""
    return Step(step.t0, step.dt, step.t1, (), step.jump, step.t0_at, step.t1_at)


def solve_taped(func: Callable, y0, t: torch.Tensor, *, rtol: float = 1e-7, atol: float = 1e-9,
                method: str = "dopri5", options: dict | None = None, params=None):
    """Backprop through the same solver with every step's tape kept: ``(outputs, accepted steps)``.

    The reference :func:`odeint`'s gradients are checked against (the same loop under
    autograd, its step sizes constants); it takes the steps :func:`odeint` takes.
    """
    options = dict(options or {})
    options.pop("memory_budget", None)
    options.pop("checkpoints", None)
    problem = Problem.make(func, y0, t, rtol, atol, method, options, params)
    out, solve = run_forward(problem, problem.flat_y0, slots=None)
    return problem.unflatten(out), [(float(s.t0), float(s.t1)) for s in solve.steps]
