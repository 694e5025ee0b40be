"""The forward loops of :func:`anode_plan.odeint`, without a tape: adaptive steps, fixed-grid steps, events.

Both loops record the accepted steps (:class:`~anode_plan.ode.steps.Step`) and keep the
states the checkpointing asks for:

* **adaptive** (torchdiffeq's ``RKAdaptiveStepsizeODESolver._adaptive_step``): the step
  size is clamped to ``[min_step, max_step]``, cut short onto the next ``step_t`` or
  ``jump_t`` time (after a ``jump_t`` the derivative is re-evaluated just past it), accepted
  when the error ratio is at most 1 or the step is at ``min_step``, and the next one is
  ``dt·min(ifactor, max(safety·ratio^(−1/order), dfactor))`` (no shrinking after an
  accepted step). The online checkpointer decides per accepted step which states to keep.
* **fixed grid** (:mod:`anode_plan.ode.fixed_grid`): the step count is known, so the kept
  states are revolve's first sweep (:func:`planners.online.reverse_actions` from the start).

With an event function, either loop runs until its sign changes and the event time is
found in the last step (:mod:`anode_plan.ode.events`); it becomes output 1.
"""

from __future__ import annotations

from typing import Callable

import torch

from anode_plan.errors import SolverConfigError
from anode_plan.ode.events import find_event
from anode_plan.ode.fixed_grid import NEXT, cubic_interp, fixed_step, linear_interp
from anode_plan.ode.problem import Problem
from anode_plan.ode.steps import Solve, Step, fixed_outputs, outputs_in
from anode_plan.ode.tableaus import error_ratio, initial_step, interpolate, interpolation, next_step, rk_step
from planners.online import OnlineCheckpointing, reverse_actions

MAX_EVENT_STEPS = 20_000
"""A fixed-grid solve looking for an event gives up after this many steps (torchdiffeq's bound)."""


class _Keeper:
    """Which states a forward keeps: every one (no budget), the online checkpointer's, or an offline set."""

    def __init__(self, solve: Solve, slots: int | None, offline: frozenset[int] | None = None):
        self.solve, self.slots, self.offline = solve, slots, offline
        self.checkpointer = OnlineCheckpointing(slots) if slots and offline is None else None
        self.state = self.checkpointer.start() if self.checkpointer else None
        self.decided = -1

    def at(self, step: int, y: torch.Tensor, f: torch.Tensor | None) -> None:
        if step == self.decided:
            return
        self.decided = step
        kept = self.solve.kept
        if self.slots is None or (self.offline is not None and (step == 0 or step in self.offline)):
            kept[step] = (y, f)
        elif self.checkpointer is not None:
            decision, self.state = self.checkpointer.decide(self.state, step)
            if decision.keep:  # into a slot: what it held is dropped
                held = set(self.state.slot_steps)
                self.solve.kept = {s: v for s, v in kept.items() if s in held}
                self.solve.kept[step] = (y, f)


def run_forward(problem: Problem, y0: torch.Tensor, slots: int | None,
                event: Callable | None = None) -> tuple[torch.Tensor, Solve]:
    """The solve without a tape: the outputs, and the record with the states ``slots`` checkpoints keep.

    ``slots``: ``None`` keeps every state, ``0`` none. ``event(time, flat y)``: stop where it
    changes sign (its time becomes ``problem.times[1]``).
    """
    if problem.fixed is not None:
        return _fixed(problem, y0, slots, event)
    return _adaptive(problem, y0, slots, event)


def _event_start(problem: Problem, event, y0):
    if event is None:
        return None, False
    problem.times[1:] = float("inf")  # no output time until the event is found
    value = event(problem.times[0], y0)
    return torch.sign(value), bool(value == 0)


def _adaptive(problem: Problem, y0: torch.Tensor, slots: int | None, event) -> tuple[torch.Tensor, Solve]:
    times, tableau = problem.times, problem.tableau
    out = y0.new_empty((len(times), *y0.shape))
    out[0] = y0
    t0 = times[0]
    sign0, at_start = _event_start(problem, event, y0)
    f0 = problem.func(t0.to(y0.dtype), y0)
    with torch.no_grad():  # the first step is a constant of the discretisation, not differentiated
        dt = (torch.tensor(problem.first_step, dtype=torch.float64) if problem.first_step is not None
              else initial_step(problem.func, t0, y0, f0, tableau.order, problem.rtol, problem.atol, problem.norm))
    solve = Solve([], {}, slots)
    keeper = _Keeper(solve, slots)
    y, f, t_now = y0, f0, t0
    anchor: int | None = 0  # the entry of t the steps' ends move with; none after a step cut onto step_t / jump_t
    index = 1  # the next output time
    if at_start:  # the event holds at t[0]: torchdiffeq returns the initial state
        times[1] = t0
        out[1] = y0
        index = len(times)
    while index < len(times):
        if solve.attempts >= problem.max_num_steps:
            raise SolverConfigError(f"odeint: max_num_steps={problem.max_num_steps} reached at "
                                    f"t={float(problem.user_time(t_now)):.6g}; loosen rtol/atol or raise "
                                    "options['max_num_steps']")
        keeper.at(len(solve.steps), y, f)
        solve.attempts += 1
        if not torch.isfinite(dt):
            if problem.min_step <= 0:
                raise SolverConfigError(f"odeint: the step size became {float(dt)} at "
                                        f"t={float(problem.user_time(t_now)):.6g}")
            dt = torch.tensor(problem.min_step, dtype=torch.float64, device=t_now.device)
        dt = dt.clamp(problem.min_step, problem.max_step)
        problem.callback("callback_step", t_now, y, dt)
        t1 = t_now + dt
        if not bool(t1 > t_now):
            raise SolverConfigError(f"odeint: the step size {float(dt):.3g} underflows at "
                                    f"t={float(problem.user_time(t_now)):.6g}")
        on_mark = on_jump = False
        next_step_t = next((v for v in problem.step_t if v > float(t_now)), None)
        next_jump_t = next((v for v in problem.jump_t if v > float(t_now)), None)
        if next_step_t is not None and next_step_t < float(t1):  # step_t first, then jump_t, as torchdiffeq
            t1, on_mark = torch.tensor(next_step_t, dtype=torch.float64, device=t_now.device), True
        if next_jump_t is not None and next_jump_t < float(t1):
            t1, on_mark, on_jump = torch.tensor(next_jump_t, dtype=torch.float64, device=t_now.device), True, True
        step_dt = t1 - t_now if on_mark else dt
        y1, f1, err, ks = rk_step(problem.func, tableau, y, f, t_now, step_dt, t1, end_perturb=on_jump)
        ratio = error_ratio(err, problem.rtol, problem.atol, y, y1, problem.norm)
        del err
        if not bool(torch.isfinite(ratio)):
            raise SolverConfigError(f"odeint: the error estimate is not finite at "
                                    f"t={float(problem.user_time(t_now)):.6g} (the state or func's value overflowed "
                                    "or became NaN); check func, or lower first_step")
        accept = bool(ratio <= 1) or bool(step_dt <= problem.min_step)
        if accept:
            problem.callback("callback_accept_step", t_now, y, step_dt)
            first = index
            while index < len(times) and times[index] <= t1:
                index += 1
            step = Step(t_now, step_dt, t1, tuple(range(first, index)), on_jump, anchor, None if on_mark else anchor)
            if on_mark:
                anchor = None
            for at, value in zip(step.outputs, outputs_in(problem, step, y, y1, ks)):
                out[at] = value
            if on_jump:
                f1 = problem.func(t1.to(y1.dtype), y1, NEXT)
            if event is not None and bool(torch.sign(event(t1, y1)) != sign0):
                coefficients = interpolation(tableau, y, y1, ks, step_dt)
                state_at = (lambda c, a, b: lambda time: interpolate(c, a, b, time))(coefficients, t_now, t1)
                times[1] = find_event(state_at, event, sign0, t_now, t1)
                out[1] = state_at(times[1])
                step = Step(step.t0, step.dt, step.t1, (1,), step.jump, step.t0_at, step.t1_at)
                index = len(times)
            solve.steps.append(step)
            y, f, t_now = y1, f1, t1
        else:
            problem.callback("callback_reject_step", t_now, y, step_dt)
        dt = next_step(step_dt, ratio, tableau.order, problem.safety, problem.ifactor, problem.dfactor)
        del ks, y1, f1
    solve.kept = {s: v for s, v in solve.kept.items() if s < len(solve.steps) or s == 0}
    return out, solve


def _offline_kept(steps: int, slots: int | None) -> frozenset[int] | None:
    """The states revolve's first sweep keeps (with the initial one), for a solve of known length."""
    if slots is None or slots == 0 or steps == 0:
        return None if slots is None else frozenset()
    actions = reverse_actions([0], steps, max(1, slots))
    kept = set()
    for action in actions:
        if action.kind != "advance":
            break
        if action.keep:
            kept.add(action.step + 1)
    return frozenset(kept)


def _fixed(problem: Problem, y0: torch.Tensor, slots: int | None, event) -> tuple[torch.Tensor, Solve]:
    times, grid = problem.times, problem.grid
    out = y0.new_empty((len(times), *y0.shape))
    out[0] = y0
    sign0, at_start = _event_start(problem, event, y0)
    solve = Solve([], {}, slots)
    steps_known = None if event is not None else len(grid) - 1
    keeper = _Keeper(solve, slots, _offline_kept(steps_known, slots) if steps_known is not None else None)
    y = y0
    index = 1
    if at_start:
        times[1] = times[0]
        out[1] = y0
        return out, solve
    step_size = float(grid[1] - grid[0]) if len(grid) > 1 else 0.0
    k = 0
    while (event is None and k < len(grid) - 1) or (event is not None and index < len(times)):
        if event is None:
            t0, t1 = grid[k], grid[k + 1]
            t0_at, t1_at = problem.grid_anchors[k], problem.grid_anchors[k + 1]
        else:
            if k >= MAX_EVENT_STEPS:
                raise SolverConfigError(f"odeint: no event in {MAX_EVENT_STEPS} fixed steps of {step_size}")
            t0 = times[0] + k * step_size if k else times[0]
            t1 = times[0] + (k + 1) * step_size
            t0_at, t1_at = 0, 0
        dt = t1 - t0
        keeper.at(k, y, None)
        problem.callback("callback_step", t0, y, dt)
        y1, k0 = fixed_step(problem.func, problem.fixed, y, t0, dt, t1, problem.perturb)
        first = index
        while event is None and index < len(times) and times[index] <= t1:
            index += 1
        step = Step(t0, dt, t1, tuple(range(first, index)), False, t0_at, t1_at)
        for at, value in zip(step.outputs, fixed_outputs(problem, step, y, k0, y1)):
            out[at] = value
        if event is not None and bool(torch.sign(event(t1, y1)) != sign0):
            if problem.interp == "cubic":
                f1 = problem.func(t1.to(y1.dtype), y1)
                state_at = (lambda a, b, c, d, e, g: lambda time: cubic_interp(a, b, c, d, e, g, time))(
                    t0, y, k0, t1, y1, f1)
            else:
                state_at = (lambda a, b, c, d: lambda time: linear_interp(a, b, c, d, time, False, False))(
                    t0, t1, y, y1)
            times[1] = find_event(state_at, event, sign0, t0, t1)
            out[1] = state_at(times[1])
            step = Step(step.t0, step.dt, step.t1, (1,), False, t0_at, t1_at)
            index = len(times)
        solve.steps.append(step)
        y = y1
        k += 1
    solve.kept = {s: v for s, v in solve.kept.items() if s < len(solve.steps) or s == 0}
    if 0 not in solve.kept and solve.steps and slots != 0:
        solve.kept[0] = (y0, None)
    return out, solve
