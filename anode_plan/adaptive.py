"""``anode_plan.odeint``: adaptive-step solves with exact gradients under a byte budget, by online checkpointing.

torchdiffeq's calling convention (``odeint(func, y0, t, rtol=, atol=, method=)``, a tensor
or tuple ``y0``, the solution at every time in ``t``, increasing or decreasing), the same
step-size control and dense output (:mod:`anode_plan.rk`), and gradients that are exactly
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

import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from anode_plan.budget import parse_memory_budget
from anode_plan.errors import InfeasibleBudgetError, SolverConfigError
from anode_plan.calibrate import generator_states
from anode_plan.memory import AllocatorMeter, LiveStorageTracker, allocated_bytes, measure_peak_memory
from anode_plan.runtime import RestoreRunningStats, norm_layers_with_stats
from anode_plan.rk import (TABLEAUS, Tableau, error_ratio, initial_step, interpolate, interpolation, next_step,
                           rk_step, rms_norm)
from planners.errors import format_bytes
from planners.online import OnlineCheckpointing, reverse_actions

CARRY_DERIVATIVE_GRADIENT = True
"""Carry the gradient of the FSAL derivative from step to step (it must be; a test turns it off to show why)."""

MAX_SLOTS = 10_000
"""At most this many checkpoints, whatever the budget allows (the online bookkeeping is linear in them)."""

OPTIONS = ("memory_budget", "max_num_steps", "first_step", "checkpoints")


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
    problem = _Problem.make(func, y0, t, rtol, atol, TABLEAUS[method], options, params)
    flat = problem.flat_y0
    wanted = torch.is_grad_enabled() and (flat.requires_grad or any(p.requires_grad for p in problem.params))
    if not wanted:
        with torch.no_grad():
            out = _forward(problem, flat, slots=0)[0]  # nothing to keep
    else:
        out = _OdeintFunction.apply(problem, flat, *problem.params)
    return problem.unflatten(out)


@dataclass(frozen=True)
class _Problem:
    func: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # on the flat state, in increasing time
    flat_y0: torch.Tensor
    times: torch.Tensor  # float64, increasing
    rtol: torch.Tensor
    atol: torch.Tensor
    tableau: Tableau
    norm: Callable[[torch.Tensor], torch.Tensor]
    params: tuple[torch.Tensor, ...]
    budget_bytes: int | None
    checkpoints: int | None
    max_num_steps: int
    first_step: float | None
    unflatten: Callable[[torch.Tensor], Any]
    key: tuple
    source: Callable  # the user's func

    @classmethod
    def make(cls, func, y0, t, rtol, atol, tableau, options, params) -> "_Problem":
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or not t.is_floating_point() or len(t) < 1:
            raise SolverConfigError(f"odeint: t must be a 1-d floating-point tensor of times, got "
                                    f"{type(t).__name__} {tuple(getattr(t, 'shape', ()))}")
        if t.requires_grad:
            raise SolverConfigError("odeint: gradients with respect to t are not computed (the accepted steps are "
                                    "constants); pass t.detach()")
        times = t.detach().to(torch.float64)
        sign = 1.0
        if len(times) > 1 and bool((times[1:] < times[:-1]).all()):
            sign, times = -1.0, -times
        elif len(times) > 1 and not bool((times[1:] > times[:-1]).all()):
            raise SolverConfigError(f"odeint: t must be strictly increasing or decreasing, got {t.tolist()}")
        parts = tuple(y0) if isinstance(y0, (tuple, list)) else (y0,)
        if not parts or not all(isinstance(p, torch.Tensor) and p.is_floating_point() for p in parts):
            raise SolverConfigError("odeint: y0 must be a floating-point tensor or a tuple of them")
        shapes = [p.shape for p in parts]
        sizes = [p.numel() for p in parts]
        tuple_state = isinstance(y0, (tuple, list))
        flat_y0 = torch.cat([p.reshape(-1) for p in parts]) if tuple_state else y0

        def split(flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
            lead = flat.shape[:-1] if tuple_state else ()
            pieces, at = [], 0
            for shape, size in zip(shapes, sizes):
                pieces.append(flat[..., at:at + size].view(*lead, *shape))
                at += size
            return tuple(pieces)

        def inner(time: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            out = func(sign * time, split(y) if tuple_state else y)
            if tuple_state:
                out = torch.cat([o.reshape(-1) for o in out])
            return out if sign > 0 else -out

        def norm(x: torch.Tensor) -> torch.Tensor:
            return max(rms_norm(piece) for piece in split(x)) if tuple_state else rms_norm(x)

        if params is None:
            if isinstance(func, nn.Module):
                params = [p for p in func.parameters() if p.requires_grad]
            else:
                _refuse_hidden_tensors(func)
                params = []
        params = tuple(p for p in params if isinstance(p, torch.Tensor) and p.requires_grad)
        budget = options.get("memory_budget")
        first = options.get("first_step")
        dtype = torch.promote_types(torch.float64, flat_y0.dtype)
        key = (id(func), tableau.name, tuple(flat_y0.shape), flat_y0.dtype, flat_y0.device, len(times),
               tuple(tuple(p.shape) for p in params))
        return cls(inner, flat_y0, times, torch.as_tensor(rtol, dtype=dtype), torch.as_tensor(atol, dtype=dtype),
                   tableau, norm, params, None if budget is None else parse_memory_budget(budget),
                   _checkpoints(options.get("checkpoints"), budget), int(options.get("max_num_steps", 2**31 - 1)),
                   None if first is None else float(first), split if tuple_state else (lambda out: out), key, func)


def _checkpoints(count: Any, budget: Any) -> int | None:
    if count is None:
        return None
    if budget is not None:
        raise SolverConfigError("odeint: give options['memory_budget'] or options['checkpoints'], not both")
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise SolverConfigError(f"odeint: options['checkpoints']={count!r} must be a positive int (slot 0 holds the "
                                "initial state)")
    return count


def _refuse_hidden_tensors(func: Callable) -> None:
    """A plain function closing over tensors that need gradients would lose them silently: refuse it."""
    cells = [cell.cell_contents for cell in (getattr(func, "__closure__", None) or ()) if cell.cell_contents is not None]
    code, scope = getattr(func, "__code__", None), getattr(func, "__globals__", {})
    named = [scope[name] for name in (code.co_names if code is not None else ()) if name in scope]
    owner = getattr(func, "__self__", None)
    held = list(vars(owner).values()) if owner is not None and hasattr(owner, "__dict__") else []
    found = [c for c in cells + named + held + ([owner] if owner is not None else [])
             if (isinstance(c, torch.Tensor) and c.requires_grad)
             or (isinstance(c, nn.Module) and any(p.requires_grad for p in c.parameters()))]
    if found:
        raise SolverConfigError(
            "odeint: func is a plain function that uses tensors needing gradients (a module or tensor it closes "
            "over, reads as a global or holds on its object); pass them as odeint(..., params=[...]) (e.g. "
            "params=list(module.parameters())) or make func an nn.Module, so their gradients are computed rather than "
            "silently dropped")


def _outputs_in(problem: _Problem, step: Step, y0, y1, ks) -> Iterator[torch.Tensor]:
    """The dense output at each of ``step``'s output times, one at a time."""
    if step.outputs:
        coefficients = interpolation(problem.tableau, y0, y1, ks, step.dt)
        yield from (interpolate(coefficients, step.t0, step.t1, problem.times[i]) for i in step.outputs)


def _forward(problem: _Problem, y0: torch.Tensor, slots: int | None) -> tuple[torch.Tensor, Solve]:
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
            for at, value in zip(accepted.outputs, _outputs_in(problem, accepted, y, y1, ks)):
                out[at] = value
            solve.steps.append(accepted)
            y, f, t_now = y1, f1, t1
        dt = next_step(dt, ratio, tableau.order)
        del ks, y1, f1
    solve.kept = {s: v for s, v in solve.kept.items() if s < len(solve.steps) or s == 0}
    return out, solve


def _step_function(problem: _Problem, step: Step):
    """Step ``step`` as a function of its start ``(y, f)``: ``(y1, f1, outputs interpolated inside it)``."""
    def run(y: torch.Tensor, f: torch.Tensor):
        y1, f1, _, ks = rk_step(problem.func, problem.tableau, y, f, step.t0, step.dt, step.t1)
        return y1, f1, list(_outputs_in(problem, step, y, y1, ks))
    return run


def _vjp(problem: _Problem, step: Step, y, f, g_y, g_f, grad_out):
    """Re-run ``step`` with its tape from ``(y, f)`` and differentiate it: the start's gradients and the parameters'."""
    with torch.enable_grad():
        y_, f_ = y.detach().requires_grad_(), f.detach().requires_grad_()
        y1, f1, emitted = _step_function(problem, step)(y_, f_)
        outs, grads = [], []
        for value, grad in [(y1, g_y), (f1, g_f), *zip(emitted, (grad_out[i] for i in step.outputs))]:
            if grad is not None and value.requires_grad:  # a value that does not depend on the inputs adds nothing
                outs.append(value)
                grads.append(grad)
        if not outs:
            return None, None, [None] * len(problem.params)
        found = torch.autograd.grad(outs, [y_, f_, *problem.params], grads, allow_unused=True)
    return found[0], found[1], list(found[2:])


def _add(total, value):
    if value is None:
        return total
    return value if total is None else total + value


def _accumulate(total, value):
    """``total + value`` in place: the parameters' running sums stay one copy each."""
    if value is None:
        return total
    return value if total is None else total.add_(value)


class _OdeintFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, problem: _Problem, y0: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
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


def _backward(ctx: Any, problem: _Problem, solve: Solve, y0: torch.Tensor, grad_out: torch.Tensor) -> tuple:
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
                    y1, f1, _ = _step_function(problem, _quiet(step))(y, f)
                live = (k + 1, y1, f1)
                if action.keep:
                    store[k + 1] = (y1, f1)
                continue
            g_y, g_f, grads = _vjp(problem, step, y, f, g_y, g_f, grad_out)
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
    problem = _Problem.make(func, y0, t, rtol, atol, TABLEAUS[method], options, params)
    out, solve = _forward(problem, problem.flat_y0, slots=None)
    return problem.unflatten(out), [(float(s.t0), float(s.t1)) for s in solve.steps]


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


def step_costs(problem: _Problem, y0: torch.Tensor) -> StepCosts:
    """Measure (once per function, shape and method) what a step of ``problem`` allocates."""
    cached = _COSTS.get(problem.key)
    if cached is not None and cached[0]() is problem.source:  # the key holds id(source); a dead one is measured anew
        return cached[1]
    times = problem.times
    span = float(times[-1] - times[0]) if len(times) > 1 else 1.0
    step = Step(times[0], torch.tensor(span / 16, dtype=torch.float64), times[0] + span / 16, (min(1, len(times) - 1),))
    with torch.no_grad():
        y = y0.detach().clone()
        f = problem.func(times[0].to(y.dtype), y)
    ones = torch.ones_like(y)
    grad_out = torch.ones((len(times), *y.shape), dtype=y.dtype, device=y.device)

    def advance() -> None:
        with torch.no_grad():
            y1, f1, err, ks = rk_step(problem.func, problem.tableau, y, f, step.t0, step.dt, step.t1)
            error_ratio(err, problem.rtol, problem.atol, y, y1, problem.norm)
            list(_outputs_in(problem, step, y, y1, ks))

    advance_bytes = _peak(advance, y.device)
    vjp_bytes = _peak(lambda: _vjp(problem, step, y, f, ones, ones, grad_out), y.device)
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


def checkpoint_slots(problem: _Problem, y0: torch.Tensor) -> int | None:
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
    problem = _Problem.make(func, y0, t, rtol, atol, TABLEAUS[method], {}, params)
    return step_costs(problem, problem.flat_y0).budget_for(checkpoints)
